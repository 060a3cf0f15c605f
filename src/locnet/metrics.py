"""Error metrics, confidence volumes and Table 1.

Conventions used throughout this module (and by :mod:`locnet.stats`, :mod:`locnet.figures`):

* Errors are Euclidean distances in world millimetres, read from the ``error_mm`` column of a
  prediction table (``predictions/{method}.csv``, see ``docs/architecture.md``). When the column
  is absent it is computed from ``x, y, z`` and ``true_x, true_y, true_z``.
* A landmark that was not annotated has NaN truth and NaN error. It is *missing*: it is counted
  in ``n_missing`` and excluded from every other number (means, rates, tests), never a crash.
* Standard deviations use ``ddof=1`` (sample sd), as is usual for "mean +- sd" in papers.
* Percentiles use numpy's default (linear interpolation between order statistics).
* Success rates are fractions (0..1) of the *annotated* landmarks with error <= threshold;
  failures are errors strictly greater than the failure threshold (10 mm).
* Method labels follow the run's config: a single-level method says the spacing of its level
  (``finest_spacing_mm * 2**level``), a multi-scale chain the spacings of all its levels,
  coarsest to finest: ``"U-Net heatmap (2.5 mm)"``, ``"Loc-Net multi-scale, end to end + noise
  (10-1.25 mm)"``. Pass the config to :func:`method_label`, or wrap a whole job in
  ``with labels_from_config(config):`` so that every table and figure drawn inside it (Table 1,
  the statistics, the figures) uses it. Without a config a label is the bare method name.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as _sps

from locnet import config as _config
from locnet.fileio import write_text_atomic
from locnet.methods import PROPOSED, REGISTRY

__all__ = [
    "PROPOSED_METHOD",
    "SUCCESS_THRESHOLDS_MM",
    "FAILURE_THRESHOLD_MM",
    "method_order",
    "method_label",
    "method_labels",
    "method_levels",
    "labels_from_config",
    "PAPER_SETTING",
    "method_color",
    "chi2_radius_sq",
    "confidence_volume",
    "pass_uncertainty",
    "mahalanobis_sq",
    "inside_ellipsoid",
    "errors_of",
    "select_subset",
    "landmark_order",
    "error_summary",
    "format_mean_sd",
    "table1",
    "table1_markdown",
    "table1_latex",
    "write_table1",
]


# ---------------------------------------------------------------------------------------------
# Methods of Table 1 (locnet.methods.REGISTRY): order, labels, the paper's numbers, colours
# ---------------------------------------------------------------------------------------------


PROPOSED_METHOD = PROPOSED
#: where the paper's Table 1 numbers come from (not this run's data): its own 54 test scans
#: on a 448³ grid at 0.5 mm, so its single-scale rows read 1 mm and its chains 4-0.5 mm
PAPER_SETTING = "neck CTA, 448³ at 0.5 mm"
SUCCESS_THRESHOLDS_MM: tuple[float, ...] = (2.0, 2.5, 3.0, 4.0)
FAILURE_THRESHOLD_MM = 10.0
_EXTRA_COLORS = ("#CC79A7", "#F0E442", "#000000", "#8C564B", "#17BECF", "#BCBD22")
# the schema's defaults, for the keys a partial config leaves out
_DEFAULT_FINEST_SPACING_MM = _config.defaults("pyramid")["finest_spacing_mm"]
_DEFAULT_LEVELS = _config.defaults("pyramid")["levels"]
_DEFAULT_METHOD_LEVEL = _config.DEFAULT_LEVEL
_LABEL_CONFIG: ContextVar[Mapping | None] = ContextVar("locnet_label_config", default=None)


def method_order(methods: Iterable[str]) -> list[str]:
    """Sort method keys in Table 1's order; unknown methods follow, alphabetically."""
    methods = list(dict.fromkeys(methods))
    known = [m for m in REGISTRY if m in methods]
    unknown = sorted(m for m in methods if m not in REGISTRY)
    return known + unknown


@contextmanager
def labels_from_config(config: Mapping | None) -> Iterator[None]:
    """Within the block, :func:`method_label` without a config argument uses ``config``."""
    token = _LABEL_CONFIG.set(config)
    try:
        yield
    finally:
        _LABEL_CONFIG.reset(token)


def method_levels(method: str, config: Mapping) -> list[tuple[int, float]]:
    """``(level, spacing_mm)`` of the pyramid levels a method reads, coarsest first.

    Level ``l`` has spacing ``pyramid.finest_spacing_mm * 2**l``. A single-level method reads
    ``methods.<method>.level``; a multi-scale chain every level from the coarsest
    (``pyramid.levels - 1``) to the finest (0). Keys the config lacks take the schema defaults.
    Unknown methods read no level (empty list).
    """
    info = REGISTRY.get(method)
    if info is None:
        return []
    pyr = config.get("pyramid") or {}
    finest = float(pyr.get("finest_spacing_mm", _DEFAULT_FINEST_SPACING_MM))
    if info.multiscale:
        levels = list(range(int(pyr.get("levels", _DEFAULT_LEVELS)) - 1, -1, -1))
    else:
        block = (config.get("methods") or {}).get(method) or {}
        levels = [int(block.get("level", _DEFAULT_METHOD_LEVEL))]
    return [(lv, finest * 2.0**lv) for lv in levels]


def method_label(method: str, config: Mapping | None = None) -> str:
    """Human-readable label of a method, with the spacing of the level(s) it reads.

    ``config`` (the study config; default: the one set by :func:`labels_from_config`, if any)
    gives the spacings: ``"U-Net heatmap (2.5 mm)"`` for level 1 at a 1.25 mm finest grid,
    ``"Loc-Net multi-scale, end to end (10-1.25 mm)"`` for four levels. Without a config the
    label is the bare name (``"U-Net heatmap"``); a method not of the paper is its key.
    """
    info = REGISTRY.get(method)
    if info is None:
        return method
    config = _LABEL_CONFIG.get() if config is None else config
    if config is None:
        return info.label
    spacings = [sp for _, sp in method_levels(method, config)]
    span = f"{spacings[0]:g}" if len(spacings) == 1 else f"{spacings[0]:g}-{spacings[-1]:g}"
    return f"{info.label} ({span} mm)"


def method_labels(methods: Iterable[str], config: Mapping | None = None) -> dict[str, str]:
    """``{method: method_label(method, config)}`` for each method."""
    return {m: method_label(m, config) for m in methods}


def method_color(method: str) -> str:
    """Fixed colour of a method (hex string); unknown methods get a stable extra colour."""
    info = REGISTRY.get(method)
    if info:
        return info.color
    return _EXTRA_COLORS[sum(map(ord, method)) % len(_EXTRA_COLORS)]


def _success_column(threshold: float) -> str:
    return f"success_{threshold:g}mm"


# ---------------------------------------------------------------------------------------------
# Gaussian confidence ellipsoids
# ---------------------------------------------------------------------------------------------


def chi2_radius_sq(level: float = 0.90, dof: int = 3) -> float:
    """Squared Mahalanobis radius of the ``level`` Gaussian confidence region (chi2 quantile)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    return float(_sps.chi2.ppf(level, dof))


def confidence_volume(sd_xyz, level: float = 0.90):
    """Volume (mm^3) of the ``level`` confidence ellipsoid of an uncorrelated 3D Gaussian.

    ``V = 4/3 * pi * chi2_3(level)^(3/2) * sd_x * sd_y * sd_z`` (about ``65.5 * prod(sd)`` at
    0.90). ``sd_xyz`` has shape ``(..., 3)``; returns a float for one point, else an array of
    shape ``(...)``. NaN sds give NaN.
    """
    sd = np.asarray(sd_xyz, dtype=float)
    if sd.shape[-1:] != (3,):
        raise ValueError(f"sd_xyz must have a last axis of length 3, got shape {sd.shape}")
    if np.any(sd < 0):
        raise ValueError("standard deviations must be non-negative")
    const = 4.0 / 3.0 * math.pi * chi2_radius_sq(level) ** 1.5
    vol = const * np.prod(sd, axis=-1)
    return float(vol) if vol.ndim == 0 else vol


def pass_uncertainty(samples, level: float = 0.90) -> tuple[np.ndarray, np.ndarray]:
    """Uncertainty of a prediction from its noisy passes ``samples`` (n_passes, K, 3).

    Returns the per-landmark sample sd (K, 3) (``ddof=1``; NaN with fewer than two passes)
    and the volume (K,) of the ``level`` confidence ellipsoid (:func:`confidence_volume`),
    NaN where an sd is. The study's predictions and inference on new scans both use it.
    """
    samples = np.asarray(samples, dtype=np.float64)
    if samples.shape[0] > 1:
        sd = samples.std(axis=0, ddof=1)
    else:
        sd = np.full(samples.shape[1:], np.nan)
    vol = np.atleast_1d(confidence_volume(np.nan_to_num(sd, nan=0.0), level=level))
    return sd, np.where(np.isnan(sd).any(axis=-1), np.nan, vol)


def mahalanobis_sq(pred, truth, sd) -> np.ndarray:
    """Squared Mahalanobis distance of ``truth`` from ``pred`` under diag(sd^2); shape ``(...)``.

    An axis with sd = 0 contributes 0 when the coordinates agree exactly and +inf otherwise.
    NaN anywhere in a row gives NaN.
    """
    pred, truth, sd = (np.asarray(a, dtype=float) for a in (pred, truth, sd))
    diff = truth - pred
    with np.errstate(divide="ignore", invalid="ignore"):
        z2 = np.where(sd > 0, (diff / np.where(sd > 0, sd, 1.0)) ** 2,
                      np.where(diff == 0, 0.0, np.inf))
    z2 = np.where(np.isnan(diff) | np.isnan(sd), np.nan, z2)
    return z2.sum(axis=-1)


def inside_ellipsoid(pred, truth, sd, level: float = 0.90) -> np.ndarray:
    """Whether ``truth`` lies inside the axis-aligned ``level`` Gaussian ellipsoid around ``pred``.

    Inside means Mahalanobis^2 <= chi2_3(level). Arrays of shape ``(..., 3)``; returns a boolean
    array of shape ``(...)``. Rows with missing truth (NaN) are *False*: mask them out before
    computing a coverage (:func:`locnet.stats.calibration` does).
    """
    d2 = mahalanobis_sq(pred, truth, sd)
    with np.errstate(invalid="ignore"):
        return np.asarray(d2 <= chi2_radius_sq(level))


# ---------------------------------------------------------------------------------------------
# Errors and their summary
# ---------------------------------------------------------------------------------------------

_TRUTH = ["true_x", "true_y", "true_z"]
_PRED = ["x", "y", "z"]


def errors_of(df: pd.DataFrame) -> pd.Series:
    """Euclidean error (mm) per row: the ``error_mm`` column, or computed from the coordinates."""
    if "error_mm" in df.columns:
        return pd.to_numeric(df["error_mm"], errors="coerce").astype(float)
    missing = [c for c in _PRED + _TRUTH if c not in df.columns]
    if missing:
        raise KeyError(f"prediction table has no error_mm and lacks columns {missing}")
    d = df[_PRED].to_numpy(float) - df[_TRUTH].to_numpy(float)
    return pd.Series(np.sqrt((d**2).sum(axis=1)), index=df.index, name="error_mm")


def select_subset(df: pd.DataFrame, subset: str | None) -> pd.DataFrame:
    """Rows of one subset (``val``/``test``); all rows when ``subset`` is None or no column."""
    if subset is None or "subset" not in df.columns:
        return df
    return df[df["subset"].astype(str) == subset]


def landmark_order(predictions: Mapping[str, pd.DataFrame]) -> list[str]:
    """Landmark names in order of first appearance over the tables (the configured order)."""
    names: dict[str, None] = {}
    for df in predictions.values():
        if "landmark" in df.columns:
            names.update(dict.fromkeys(df["landmark"].astype(str)))
    return list(names)


# ---------------------------------------------------------------------------------------------
# Seeds: a pooled prediction table holds every training seed's rows (column ``seed``)
# ---------------------------------------------------------------------------------------------

SEED_COLUMN = "seed"
_ROW_KEY = ["case_id", "subset", "landmark"]


def pool_seeds(tables: Mapping[int, pd.DataFrame]) -> pd.DataFrame:
    """One table of every seed's predictions, ``seed`` first, seeds in increasing order.

    Every seed must predict the same (case, subset, landmark) rows: a difference means the
    tables come from different splits or landmark sets, and is refused naming the seed.
    """
    if not tables:
        raise ValueError("no prediction tables to pool")
    parts, first_keys, first = [], None, None
    for s in sorted(tables):
        df = tables[s]
        keys = set(map(tuple, df[_ROW_KEY].astype(str).to_numpy()))
        if first_keys is None:
            first_keys, first = keys, s
        elif keys != first_keys:
            raise ValueError(f"seed {s} predicts other (case, subset, landmark) rows than seed "
                             f"{first}: {len(keys ^ first_keys)} rows differ")
        parts.append(df.drop(columns=[SEED_COLUMN], errors="ignore")
                     .assign(**{SEED_COLUMN: int(s)}))
    out = pd.concat(parts, ignore_index=True)
    return out[[SEED_COLUMN] + [c for c in out.columns if c != SEED_COLUMN]]


def seed_tables(df: pd.DataFrame) -> dict[int, pd.DataFrame]:
    """The rows of each seed (a table without a ``seed`` column is one seed, 0)."""
    if SEED_COLUMN not in df.columns:
        return {0: df}
    return {int(s): g for s, g in df.groupby(SEED_COLUMN, sort=True)}


def n_seeds(df: pd.DataFrame) -> int:
    return len(seed_tables(df))


def deployed_seed_rows(df: pd.DataFrame) -> tuple[int, pd.DataFrame]:
    """``(seed, rows)`` of the lowest seed: the deployed model (the workflow's seed 0)."""
    tables = seed_tables(df)
    s = min(tables)
    return s, tables[s]


def _error_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c == "error_mm" or c == "det_error_mm"
            or (c.startswith("error_level") and c.endswith("_mm"))]


def seed_mean_errors(df: pd.DataFrame) -> pd.DataFrame:
    """Errors averaged over the seeds, one row per (case, subset, landmark).

    The statistical unit of a comparison is the case, and a method is its training recipe,
    not one draw of it: a paired test compares per-case errors averaged over seeds. Keeps the
    key columns and every error column (``error_mm``, ``det_error_mm``, ``error_level{l}_mm``);
    a row is NaN where any seed's error is (a missing annotation is missing in all seeds).
    A table of one seed (or without ``seed``) is returned as it is.
    """
    if SEED_COLUMN not in df.columns or df[SEED_COLUMN].nunique() <= 1:
        return df
    work = df.copy()
    if "error_mm" not in work.columns:
        work["error_mm"] = errors_of(work)
    cols = _error_columns(work)
    keys = [work[k].astype(str) for k in _ROW_KEY]
    out = work[cols].groupby(keys, sort=False).mean()
    out = out.mask(work[cols].isna().groupby(keys, sort=False).any()).reset_index()
    out["n_seeds"] = int(df[SEED_COLUMN].nunique())
    return out


def error_summary(
    errors,
    thresholds: Sequence[float] = SUCCESS_THRESHOLDS_MM,
    failure_mm: float = FAILURE_THRESHOLD_MM,
) -> dict[str, float]:
    """Summary of a set of errors (mm); NaN entries are missing landmarks and are ignored.

    Returns ``n`` (annotated), ``n_missing``, ``mean``, ``sd`` (ddof=1), ``median``, ``p90``,
    ``max``, ``success_{t}mm`` (fraction of annotated landmarks with error <= t, for each
    threshold), ``failures_{f}mm`` (count of errors > f) and ``failure_rate_{f}mm``. With no
    annotated landmark all statistics are NaN; with one, ``sd`` is NaN.
    """
    e = np.asarray(errors, dtype=float).ravel()
    ok = ~np.isnan(e)
    e = e[ok]
    n = int(e.size)
    out: dict[str, float] = {"n": n, "n_missing": int((~ok).sum())}
    if n == 0:
        out.update(mean=np.nan, sd=np.nan, median=np.nan, p90=np.nan, max=np.nan)
    else:
        out.update(
            mean=float(e.mean()),
            sd=float(e.std(ddof=1)) if n > 1 else np.nan,
            median=float(np.median(e)),
            p90=float(np.percentile(e, 90)),
            max=float(e.max()),
        )
    for t in thresholds:
        out[_success_column(t)] = float((e <= t).mean()) if n else np.nan
    out[f"failures_{failure_mm:g}mm"] = int((e > failure_mm).sum())
    out[f"failure_rate_{failure_mm:g}mm"] = float((e > failure_mm).mean()) if n else np.nan
    return out


def format_mean_sd(mean: float, sd: float, digits: int = 2) -> str:
    """``"2.81 ± 2.37"``; ``"n/a"`` without data, the mean alone when the sd is undefined."""
    if mean is None or not np.isfinite(mean):
        return "n/a"
    if sd is None or not np.isfinite(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# Table 1
# ---------------------------------------------------------------------------------------------


def table1(
    predictions: Mapping[str, pd.DataFrame],
    subset: str | None = "test",
    landmarks: Sequence[str] | None = None,
    thresholds: Sequence[float] = SUCCESS_THRESHOLDS_MM,
    failure_mm: float = FAILURE_THRESHOLD_MM,
    config: Mapping | None = None,
) -> pd.DataFrame:
    """Table 1 as a tidy DataFrame.

    One row per scope x method: scope ``"all"`` (every landmark pooled) first, then each
    landmark (``landmarks`` or their order of first appearance); within a scope, methods in
    the paper's order (unknown methods last). ``n_cases`` counts cases with at least one
    annotated landmark in the scope. Columns: ``method, label, scope, n_seeds, n_cases, n,
    n_missing, mean_mm, sd_mm, median_mm, p90_mm, max_mm, success_{t}mm..., failures_{f}mm,
    failure_rate_{f}mm, seed_sd_mm, seed_means_mm, mean_sd`` (``"2.81 ± 2.37"``) and
    ``paper_mean_sd`` (the paper's value, on pooled rows of the paper's methods only; empty
    elsewhere). ``label`` is :func:`method_label` with ``config`` (the spacings of this run's
    levels).

    Seeds (a ``seed`` column, :func:`pool_seeds`): every statistic is computed per seed and
    the row gives its mean over the seeds; ``seed_sd_mm`` is the between-seed sd (ddof = 1)
    of the mean error and ``seed_means_mm`` lists the seeds' mean errors. ``n``, ``n_cases``
    and ``n_missing`` are per seed (every seed predicts the same rows).
    """
    methods = method_order(predictions)
    landmarks = list(landmarks) if landmarks is not None else landmark_order(predictions)
    rows = []
    for scope in ["all", *landmarks]:
        for m in methods:
            df = select_subset(predictions[m], subset)
            if scope != "all":
                df = df[df["landmark"].astype(str) == scope]
            per_seed = []
            for part in seed_tables(df).values():
                err = errors_of(part)
                summary = error_summary(err, thresholds, failure_mm)
                summary["n_cases"] = (int(part.loc[err.notna(), "case_id"].nunique())
                                      if "case_id" in part else np.nan)
                per_seed.append(summary)
            seed_means = [x["mean"] for x in per_seed]
            s = {k: (per_seed[0][k] if k in ("n", "n_missing", "n_cases")
                     else float(np.mean([x[k] for x in per_seed])))
                 for k in per_seed[0]}
            info = REGISTRY.get(m)
            rows.append(
                {
                    "method": m,
                    "label": method_label(m, config),
                    "scope": scope,
                    "n_seeds": len(per_seed),
                    "n_cases": s.pop("n_cases"),
                    "n": s.pop("n"),
                    "n_missing": s.pop("n_missing"),
                    **{
                        (f"{k}_mm" if k in ("mean", "sd", "median", "p90", "max") else k): v
                        for k, v in s.items()
                    },
                    "seed_sd_mm": (float(np.std(seed_means, ddof=1)) if len(per_seed) > 1
                                   else np.nan),
                    "seed_means_mm": ", ".join(f"{v:.2f}" for v in seed_means),
                    "mean_sd": format_mean_sd(s["mean"], s["sd"]),
                    "paper_mean_sd": (
                        format_mean_sd(info.paper_mean_mm, info.paper_sd_mm)
                        if info is not None and scope == "all"
                        else ""
                    ),
                }
            )
    return pd.DataFrame(rows)


def _pct(v: float) -> str:
    return "" if not np.isfinite(v) else f"{100 * v:.1f}"


def _num(v: float, digits: int = 2) -> str:
    return "" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def _display_columns(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(column, header) pairs shown in the markdown / LaTeX tables, in order."""
    cols = [("label", "Method"), ("n", "n"), ("mean_sd", "Mean ± sd (mm)")]
    if "n_seeds" in df.columns and (df["n_seeds"] > 1).any():
        cols += [("seed_sd_mm", "Between-seed sd"), ("seed_means_mm", "Seed means")]
    cols += [("median_mm", "Median"), ("p90_mm", "P90"), ("max_mm", "Max")]
    cols += [(c, f"≤{c[len('success_'):-2]} mm (%)") for c in df.columns
             if c.startswith("success_")]
    cols += [(c, f">{c[len('failures_'):-2]} mm") for c in df.columns
             if c.startswith("failures_")]
    cols += [("paper_mean_sd", f"Paper ({PAPER_SETTING}), mm")]
    return cols


def _cell(col: str, v) -> str:
    if col == "seed_means_mm":  # a list of numbers, already formatted
        return "" if pd.isna(v) else str(v)
    if col.startswith("success_"):
        return _pct(float(v))
    if col.endswith("_mm"):
        return _num(float(v))
    if col in ("n", "n_missing"):
        return "" if pd.isna(v) else str(int(v))
    if col.startswith("failures_"):  # a mean over seeds may be fractional
        return "" if pd.isna(v) else f"{float(v):g}"
    return "" if pd.isna(v) else str(v)


def table1_markdown(df: pd.DataFrame, subset: str | None = "test") -> str:
    """Readable markdown: a pooled table first, then one table per landmark."""
    cols = _display_columns(df)
    lines = [f"# Table 1: landmark localisation error ({subset or 'all'} set)", ""]
    lines.append(
        "Euclidean error in mm, mean ± sd (sd with ddof = 1); success = share of annotated "
        "landmarks within the threshold; missing (unannotated) landmarks are excluded. "
        "With several training seeds every number is the mean over the seeds' values, "
        "'Between-seed sd' is the sd of the seeds' mean errors and 'Seed means' lists them. "
        "A label gives the spacing of the pyramid level(s) the method reads in this run. "
        f"The last column is the paper's Table 1 ({PAPER_SETTING}: single-scale rows at "
        "1 mm, multi-scale 4-0.5 mm), not this run's data."
    )
    for scope in dict.fromkeys(df["scope"]):
        part = df[df["scope"] == scope]
        title = "All landmarks (pooled)" if scope == "all" else f"Landmark: {scope}"
        use = cols if scope == "all" else [c for c in cols if c[0] != "paper_mean_sd"]
        lines += ["", f"## {title}", ""]
        lines.append("| " + " | ".join(h for _, h in use) + " |")
        lines.append("|" + "|".join(":---" if c == "label" else "---:" for c, _ in use) + "|")
        for _, r in part.iterrows():
            lines.append("| " + " | ".join(_cell(c, r[c]).replace("|", "\\|") for c, _ in use)
                         + " |")
    return "\n".join(lines) + "\n"


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def _tex(s: str) -> str:
    s = "".join(_TEX_ESCAPES.get(ch, ch) for ch in s)
    return (s.replace("±", r"$\pm$").replace("≤", r"$\le$").replace(">", r"$>$")
            .replace("³", r"$^3$"))


def table1_latex(df: pd.DataFrame, subset: str | None = "test") -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``); no jinja2 needed."""
    cols = _display_columns(df)
    header = [_tex(h) for _, h in cols]
    align = "l" + "r" * (len(cols) - 1)
    out = [
        f"% Table 1: landmark localisation error ({subset or 'all'} set), mm; "
        "sd with ddof = 1; success rates in %",
        "% Paper: the paper's Table 1 ({}), not this run's data".format(
            PAPER_SETTING.replace("³", "^3")),
        rf"\begin{{tabular}}{{{align}}}",
        r"\toprule",
        " & ".join(header) + r" \\",
    ]
    for scope in dict.fromkeys(df["scope"]):
        part = df[df["scope"] == scope]
        title = "All landmarks (pooled)" if scope == "all" else f"Landmark: {scope}"
        out.append(r"\midrule")
        out.append(rf"\multicolumn{{{len(cols)}}}{{l}}{{\emph{{{_tex(title)}}}}} \\")
        for _, r in part.iterrows():
            out.append(" & ".join(_tex(_cell(c, r[c])) for c, _ in cols) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def write_table1(
    df: pd.DataFrame, out_prefix: str | os.PathLike, subset: str | None = "test"
) -> dict[str, Path]:
    """Write ``{out_prefix}.csv``, ``.md`` and ``.tex`` atomically; returns the paths by suffix."""
    prefix = Path(out_prefix)
    paths = {}
    paths["csv"] = write_text_atomic(
        df.to_csv(index=False, lineterminator="\n"), prefix.with_name(prefix.name + ".csv")
    )
    paths["md"] = write_text_atomic(table1_markdown(df, subset), prefix.with_name(prefix.name + ".md"))
    paths["tex"] = write_text_atomic(table1_latex(df, subset), prefix.with_name(prefix.name + ".tex"))
    return paths
