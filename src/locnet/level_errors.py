"""Per-level errors of the multi-scale chains: does each finer level improve on the coarser one?

A multi-scale prediction table (``predictions/{method}.csv``) holds, besides the final
prediction, the world position and error after every level of the chain:
``level{l}_x, level{l}_y, level{l}_z, error_level{l}_mm``, coarsest level first
(:func:`locnet.study_predict.level_columns`). :func:`level_table` summarises them per method, level
and scope (``all`` landmarks pooled, then each landmark); :func:`level_warnings` names every
method whose finer level ``l-1`` has a pooled mean error not below that of level ``l``.
:func:`level_table` also gives how far each finer level moves the prediction (``moved_mm``, the
median distance from the coarser level's position, which is the centre of the crop the finer
Loc-Net reads) and names the training seeds in which a level is ``dead``, hardly moving it at
all (median below :data:`DEAD_MOVE_MM`): a Loc-Net whose map holds no mass, or mass placed symmetrically about
the crop centre, returns that centre whatever the image shows. The finest level of a noisy
chain is the mean over shifted crops, so its move includes the mean shift and a dead finest
level shows there only as a level that does not improve.
Tables without level columns (single-scale methods) are skipped. Missing (unannotated)
landmarks are NaN and excluded, as in :mod:`locnet.metrics`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from locnet import metrics
from locnet.fileio import write_text_atomic

ERROR_COLUMN = re.compile(r"^error_level(\d+)_mm$")
COLUMNS = ["method", "label", "scope", "level", "step", "n", "mean_mm", "sd_mm", "median_mm",
           "change_mm", "improves", "moved_mm", "dead"]
#: A finer level whose median move from its crop centre is below this (mm) is dead.
DEAD_MOVE_MM = 0.05


def is_dead(value) -> bool:
    """Whether a ``dead`` entry of :func:`level_table` (or of its CSV) names a seed."""
    return isinstance(value, str) and value.startswith("seed")


def _dead(df: pd.DataFrame, level: int, coarser: int) -> tuple[float, str | None]:
    """Median move (mm) of ``level`` from ``coarser`` over all rows, and the training seeds in
    which that level is dead (median move below :data:`DEAD_MOVE_MM`), as ``"seed 1"`` or
    ``"seeds 0, 2"`` (never a number, so a CSV reads it back as written); ``""`` when none is,
    ``None`` without positions. Per seed, because one dead seed of three hides
    in a median over all rows."""
    if f"level{level}_x" not in df.columns:
        return np.nan, None
    moved = _moves(df, level, coarser)
    if not moved.size:
        return np.nan, None
    seeds = df["seed"] if "seed" in df.columns else pd.Series(0, index=df.index)
    dead = [str(s) for s, part in df.groupby(seeds, sort=True)
            if (m := _moves(part, level, coarser)).size and np.median(m) < DEAD_MOVE_MM]
    label = "" if not dead else ("seed " if len(dead) == 1 else "seeds ") + ", ".join(dead)
    return float(np.median(moved)), label


def _moves(df: pd.DataFrame, level: int, coarser: int) -> np.ndarray:
    """Distance (mm) from level ``coarser``'s to level ``level``'s position, per row."""
    a = df[[f"level{level}_{c}" for c in "xyz"]].to_numpy(float)
    b = df[[f"level{coarser}_{c}" for c in "xyz"]].to_numpy(float)
    d = np.linalg.norm(a - b, axis=1)
    return d[np.isfinite(d)]


def levels_of(df: pd.DataFrame) -> list[int]:
    """The chain levels with an error column in a prediction table, coarsest first."""
    found = [int(m.group(1)) for c in df.columns if (m := ERROR_COLUMN.match(str(c)))]
    return sorted(found, reverse=True)


def level_table(
    predictions: Mapping[str, pd.DataFrame],
    subset: str | None = "test",
    landmarks: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Error after each level, per method (Table 1's order), scope and level.

    One row per scope x method x level, scopes ``"all"`` first and then each landmark,
    levels coarsest first (``step`` 1 is the coarsest). ``n``: annotated landmarks;
    ``mean_mm``, ``sd_mm`` (ddof 1), ``median_mm`` of ``error_level{l}_mm``; ``change_mm``: the
    mean minus the coarser level's mean (negative = the level improved); ``improves``: whether
    the mean is below the coarser level's (empty on the coarsest level or without data).
    Tables of several training seeds are averaged over the seeds per (case, landmark) first
    (:func:`locnet.metrics.seed_mean_errors`); each seed's predict job logs its own warnings.
    """
    raw = {m: df for m, df in predictions.items() if levels_of(df)}
    chains = {m: metrics.seed_mean_errors(df) for m, df in raw.items()}
    methods = metrics.method_order(chains)
    landmarks = list(landmarks) if landmarks is not None else metrics.landmark_order(chains)
    rows = []
    for scope in ["all", *landmarks]:
        for m in methods:
            df = metrics.select_subset(chains[m], subset)
            every = metrics.select_subset(raw[m], subset)
            if scope != "all":
                df = df[df["landmark"].astype(str) == scope]
                every = every[every["landmark"].astype(str) == scope]
            previous = np.nan
            levels = levels_of(chains[m])
            for step, level in enumerate(levels, start=1):
                moved_mm, dead = _dead(every, level, levels[step - 2]) if step > 1 else (np.nan, None)
                e = pd.to_numeric(df[f"error_level{level}_mm"], errors="coerce").dropna()
                e = e.to_numpy(float)
                mean = float(e.mean()) if e.size else np.nan
                compare = step > 1 and np.isfinite(mean) and np.isfinite(previous)
                rows.append({
                    "method": m,
                    "label": metrics.method_label(m),
                    "scope": scope,
                    "level": level,
                    "step": step,
                    "n": int(e.size),
                    "mean_mm": mean,
                    "sd_mm": float(e.std(ddof=1)) if e.size > 1 else np.nan,
                    "median_mm": float(np.median(e)) if e.size else np.nan,
                    "change_mm": mean - previous if compare else np.nan,
                    "improves": bool(mean < previous) if compare else None,
                    "moved_mm": moved_mm,
                    "dead": dead,
                })
                previous = mean
    return pd.DataFrame(rows, columns=COLUMNS)


def level_warnings(table: pd.DataFrame, scope: str = "all", subset: str | None = "test") -> list[str]:
    """One line per method and pair of levels where the finer level does not improve.

    Reads the rows of ``scope`` (pooled by default) of a :func:`level_table`.
    """
    out = []
    rows = table[(table["scope"] == scope) & (table["improves"] == False)]  # noqa: E712
    for r in rows.itertuples():
        coarser = table[(table["method"] == r.method) & (table["scope"] == scope)
                        & (table["step"] == r.step - 1)].iloc[0]
        where = f"{subset} set" if subset else "all cases"
        what = "pooled" if scope == "all" else f"landmark {scope}"
        out.append(
            f"{r.method}: level {r.level} does not improve on level {int(coarser.level)} "
            f"({what}, {where}): mean error {r.mean_mm:.2f} mm after level {r.level}, "
            f"{coarser.mean_mm:.2f} mm after level {int(coarser.level)}"
        )
    for r in table[(table["scope"] == scope) & table["dead"].map(is_dead)].itertuples():
        out.append(
            f"{r.method}: level {r.level} returns its crop centre in {r.dead} (median "
            f"move below {DEAD_MOVE_MM} mm from the coarser level's prediction): that Loc-Net "
            f"is dead, its map holds no mass or mass placed symmetrically about the centre"
        )
    return out


def _num(v) -> str:
    return "" if v is None or not np.isfinite(float(v)) else f"{float(v):.2f}"


def level_markdown(table: pd.DataFrame, subset: str | None = "test") -> str:
    """Readable markdown: warnings first, a pooled table, then one table per landmark."""
    lines = [f"# Error after each level of the multi-scale chains ({subset or 'all'} set)", ""]
    lines.append(
        "Euclidean error in mm of the prediction after each level, coarsest (step 1) to finest "
        "(level 0: the reported prediction). Change: mean minus the coarser level's mean "
        "(negative = improved). Moved: median distance from the coarser level's prediction, "
        "the centre of the crop this level reads; dead: the training seeds in which it hardly "
        f"moves it (median below {DEAD_MOVE_MM} mm). Missing (unannotated) landmarks are excluded."
    )
    warnings = level_warnings(table, subset=subset)
    lines += ["", "## Warnings", ""]
    lines += [f"- WARNING: {w}" for w in warnings] or ["None: every finer level improves the "
                                                       "pooled mean error."]
    header = "| Method | Level | n | Mean | Sd | Median | Change | Improves | Moved | Dead |"
    for scope in dict.fromkeys(table["scope"]):
        part = table[table["scope"] == scope]
        title = "All landmarks (pooled)" if scope == "all" else f"Landmark: {scope}"
        lines += ["", f"## {title}", "", header, "|:---|---:|---:|---:|---:|---:|---:|:---|---:|:---|"]
        for r in part.itertuples():
            improves = "" if r.improves is None or pd.isna(r.improves) else (
                "yes" if r.improves else "**no**")
            dead = "" if r.dead is None or pd.isna(r.dead) else (f"**{r.dead}**" if is_dead(r.dead) else "no")
            lines.append(f"| {r.label} | {r.level} | {r.n} | {_num(r.mean_mm)} | {_num(r.sd_mm)} "
                         f"| {_num(r.median_mm)} | {_num(r.change_mm)} | {improves} "
                         f"| {_num(r.moved_mm)} | {dead} |")
    if table.empty:
        lines += ["", "No multi-scale method in this run."]
    return "\n".join(lines) + "\n"


def write_level_table(table: pd.DataFrame, csv_path: str | os.PathLike, md_path: str | os.PathLike,
                      subset: str | None = "test") -> dict[str, Path]:
    """Write the table (CSV) and its markdown atomically; returns the paths by suffix."""
    return {
        "csv": write_text_atomic(table.to_csv(index=False, lineterminator="\n"), Path(csv_path)),
        "md": write_text_atomic(level_markdown(table, subset), Path(md_path)),
    }
