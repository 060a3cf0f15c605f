"""Seeded train / validation / test split of the cohort.

:func:`make_split` is a pure function of the *set* of case ids and the seed: ids are sorted
before a seeded permutation, so the order of the manifest does not matter. Subset sizes come
from explicit ``counts`` or from ``proportions`` by largest-remainder rounding (the paper's
167 / 42 / 54 of 263 is reproduced exactly; other cohort sizes keep the proportions), with at
least one case in every subset. :func:`write_split` writes ``data/split.csv`` once and refuses
to replace a different existing split unless forced: every rule reuses the same split.
:func:`check_annotations` refuses a split whose subsets hold too few annotated landmarks
(:data:`MIN_ANNOTATED`) for what each subset is for, before any model is trained on it.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .fileio import InputError, read_landmarks, read_manifest, write_csv_atomic

__all__ = ["MIN_ANNOTATED", "SUBSETS", "SplitExistsError", "check_annotations", "make_split",
           "read_split", "split_cohort", "split_sizes", "write_split"]

SUBSETS = ("train", "val", "test")

#: fewest annotated landmarks (rows with x, y, z) each subset needs, and what for. Training
#: with none has a loss of 0 and learns nothing; model selection with none compares NaN
#: validation errors and keeps the untrained epoch 0, and the quality threshold and the
#: calibration have no sample; a test subset with none has no error to report.
MIN_ANNOTATED = {
    "train": (1, "training (the loss needs a target)"),
    "val": (1, "model selection and calibration (the validation error needs a target)"),
    "test": (1, "the test errors of Table 1"),
}


class SplitExistsError(FileExistsError):
    """A different split is already stored; it is kept unless the caller forces a rewrite."""


def _fraction(p: Any) -> Fraction:
    if isinstance(p, (int, np.integer)):
        return Fraction(int(p))
    return Fraction(str(float(p)))  # decimal value as written: 0.6 is 3/5, not its binary twin


def _counts_from(counts: Mapping[str, int] | Sequence[int]) -> list[int]:
    if isinstance(counts, Mapping):
        unknown = set(counts) - set(SUBSETS)
        if unknown or len(counts) != 3:
            raise ValueError(f"split counts need exactly the keys {SUBSETS}, got {sorted(counts)}")
        values = [counts[s] for s in SUBSETS]
    else:
        values = list(counts)
        if len(values) != 3:
            raise ValueError(f"split counts need 3 values (train, val, test), got {values}")
    out = [int(v) for v in values]
    if any(v != c for v, c in zip(out, values)):
        raise ValueError(f"split counts must be whole numbers, got {values}")
    return out


def split_sizes(n: int, proportions: Sequence[float] = (167, 42, 54),
                counts: Mapping[str, int] | Sequence[int] | None = None) -> tuple[int, int, int]:
    """Sizes (train, val, test) for ``n`` cases.

    ``counts`` (mapping with keys train/val/test, or 3 numbers) are used as given and must sum
    to ``n`` with every subset >= 1. Otherwise ``proportions`` (3 positive numbers, any scale)
    are rounded by largest remainder (ties to the earlier subset); a subset rounded to 0 takes
    one case from the largest subset. Needs ``n >= 3``.
    """
    n = int(n)
    if n < 3:
        raise ValueError(f"a train/val/test split needs at least 3 cases, got {n}")
    if counts is not None:
        c = _counts_from(counts)
        if sum(c) != n or min(c) < 1:
            raise ValueError(f"split counts {dict(zip(SUBSETS, c))} must each be >= 1 and sum "
                             f"to the number of cases, {n} (they sum to {sum(c)})")
        return tuple(c)  # type: ignore[return-value]
    props = [_fraction(p) for p in proportions]
    if len(props) != 3 or min(props) <= 0:
        raise ValueError(f"split proportions need 3 positive numbers, got {list(proportions)}")
    total = sum(props)
    quotas = [n * p / total for p in props]
    sizes = [int(q) for q in quotas]  # floor: quotas are non-negative
    order = sorted(range(3), key=lambda i: (-(quotas[i] - sizes[i]), i))
    for i in order[: n - sum(sizes)]:
        sizes[i] += 1
    for i in range(3):
        if sizes[i] == 0:
            donor = max(range(3), key=lambda j: (sizes[j], -j))
            sizes[donor] -= 1
            sizes[i] += 1
    return tuple(sizes)  # type: ignore[return-value]


def make_split(case_ids: Iterable[Any], seed: int,
               proportions: Sequence[float] = (167, 42, 54),
               counts: Mapping[str, int] | Sequence[int] | None = None) -> pd.DataFrame:
    """Assign every case to train / val / test: DataFrame ``case_id,subset`` sorted by case id.

    Deterministic for a given seed and set of ids, whatever their order. Raises
    ``ValueError`` for duplicate ids, fewer than 3 cases, or counts that do not fit.
    """
    ids = [str(c) for c in case_ids]
    if len(set(ids)) != len(ids):
        dup = sorted({c for c in ids if ids.count(c) > 1})
        raise ValueError(f"duplicate case ids in the split input: {', '.join(dup)}")
    if seed is None:
        raise ValueError("the split needs a seed (it must be reproducible)")
    ids.sort()
    sizes = split_sizes(len(ids), proportions, counts)
    perm = np.random.default_rng(int(seed)).permutation(len(ids))
    subset = np.empty(len(ids), dtype=object)
    bounds = np.cumsum((0,) + tuple(sizes))
    for name, a, b in zip(SUBSETS, bounds[:-1], bounds[1:]):
        subset[perm[a:b]] = name
    return pd.DataFrame({"case_id": ids, "subset": subset.astype(str)})


def read_split(path: Any) -> pd.DataFrame:
    """Read and check a split file ``case_id,subset``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"split file not found: {path}")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(df.columns[:2]) != ["case_id", "subset"]:
        raise InputError(f"split file {path}: expected columns case_id,subset, got "
                         f"{','.join(df.columns)}")
    bad = sorted(set(df["subset"]) - set(SUBSETS))
    if bad:
        raise InputError(f"split file {path}: unknown subset(s) {bad}")
    if df["case_id"].duplicated().any():
        dup = sorted(df.loc[df["case_id"].duplicated(), "case_id"])
        raise InputError(f"split file {path}: duplicate case id(s) {dup}")
    return df[["case_id", "subset"]]


def _as_mapping(df: pd.DataFrame) -> dict[str, str]:
    return dict(zip(df["case_id"].astype(str), df["subset"].astype(str)))


def write_split(df: pd.DataFrame, path: Any, force: bool = False) -> bool:
    """Write the split to ``path`` atomically, once.

    If ``path`` already holds the same assignment nothing is written and ``False`` is returned.
    If it holds a different one, :class:`SplitExistsError` is raised unless ``force``.
    Returns ``True`` when the file was written.
    """
    path = Path(path)
    out = df[["case_id", "subset"]].astype(str).sort_values("case_id").reset_index(drop=True)
    bad = sorted(set(out["subset"]) - set(SUBSETS))
    if bad:
        raise ValueError(f"unknown subset(s) {bad}; expected {SUBSETS}")
    if path.exists() and not force:
        try:
            same = _as_mapping(read_split(path)) == _as_mapping(out)
        except InputError:
            same = False
        if same:
            return False
        raise SplitExistsError(
            f"{path} already holds a different split; every result depends on it, so it is "
            "kept. Delete it (and the results built on it) or force the rewrite to change it.")
    write_csv_atomic(out, path)
    return True


def check_annotations(split: pd.DataFrame, landmarks: pd.DataFrame, table: Any,
                      source: Any = None) -> dict[str, int]:
    """Annotated landmarks per subset; raises :class:`InputError` when a subset has fewer
    than :data:`MIN_ANNOTATED` asks, one line per such subset naming it, its count, what it
    needs and why, its cases and the landmark ``table`` (``source``: the user's table it
    was checked from, named too)."""
    annotated = landmarks.dropna(subset=["x", "y", "z"])
    per_case = annotated.groupby("case_id").size()
    counts, problems = {}, []
    for subset in SUBSETS:
        cases = split.loc[split["subset"] == subset, "case_id"].astype(str).tolist()
        counts[subset] = n = int(sum(per_case.get(c, 0) for c in cases))
        need, why = MIN_ANNOTATED[subset]
        if n >= need:
            continue
        shown = ", ".join(repr(c) for c in cases[:10]) + (", ..." if len(cases) > 10 else "")
        origin = f" (checked from {source})" if source is not None else ""
        problems.append(
            f"{subset} subset: {n} annotated landmark(s) in the landmark file {table}{origin}, "
            f"at least {need} needed for {why}; its {len(cases)} case(s): {shown}. Annotate "
            "more of these cases, or change split.seed or split.counts")
    if problems:
        raise InputError(f"{len(problems)} problem(s) in the split:\n" + "\n".join(problems))
    return counts


def split_cohort(manifest_csv: Any, landmarks_csv: Any, split_cfg: Mapping[str, Any],
                 out: Any, raw_landmarks: Any = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """The data step ``split``: the seeded split of the checked manifest's cases by the
    config's ``split`` block, refused (:func:`check_annotations`, naming ``raw_landmarks``
    too) before anything trains on it, then written to ``out``. Rule ``split`` and
    ``benchmarks/device_cohort.py`` both call this. Returns the split and the annotated
    landmarks per subset."""
    ids = read_manifest(manifest_csv)["case_id"].tolist()
    df = make_split(ids, seed=split_cfg["seed"], proportions=split_cfg["proportions"],
                    counts=split_cfg.get("counts"))
    # a subset without annotated landmarks would train with loss 0, or keep the untrained
    # epoch 0 on a NaN validation error
    annotated = check_annotations(df, read_landmarks(landmarks_csv), landmarks_csv,
                                  source=raw_landmarks)
    write_split(df, out, force=True)
    return df, annotated
