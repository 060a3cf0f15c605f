"""Per-level errors of the multi-scale chains: does each finer level improve on the coarser one?

A multi-scale prediction table (``predictions/{method}.csv``) holds, besides the final
prediction, the world position and error after every level of the chain:
``level{l}_x, level{l}_y, level{l}_z, error_level{l}_mm``, coarsest level first
(:func:`locnet.study_predict.level_columns`). :func:`level_table` summarises them per method, level
and scope (``all`` landmarks pooled, then each landmark); :func:`level_warnings` names every
method whose finer level ``l-1`` has a pooled mean error not below that of level ``l``.
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
           "change_mm", "improves"]


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
    chains = {m: metrics.seed_mean_errors(df) for m, df in predictions.items() if levels_of(df)}
    methods = metrics.method_order(chains)
    landmarks = list(landmarks) if landmarks is not None else metrics.landmark_order(chains)
    rows = []
    for scope in ["all", *landmarks]:
        for m in methods:
            df = metrics.select_subset(chains[m], subset)
            if scope != "all":
                df = df[df["landmark"].astype(str) == scope]
            previous = np.nan
            for step, level in enumerate(levels_of(chains[m]), start=1):
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
    return out


def _num(v) -> str:
    return "" if v is None or not np.isfinite(float(v)) else f"{float(v):.2f}"


def level_markdown(table: pd.DataFrame, subset: str | None = "test") -> str:
    """Readable markdown: warnings first, a pooled table, then one table per landmark."""
    lines = [f"# Error after each level of the multi-scale chains ({subset or 'all'} set)", ""]
    lines.append(
        "Euclidean error in mm of the prediction after each level, coarsest (step 1) to finest "
        "(level 0: the reported prediction). Change: mean minus the coarser level's mean "
        "(negative = improved). Missing (unannotated) landmarks are excluded."
    )
    warnings = level_warnings(table, subset=subset)
    lines += ["", "## Warnings", ""]
    lines += [f"- WARNING: {w}" for w in warnings] or ["None: every finer level improves the "
                                                       "pooled mean error."]
    header = "| Method | Level | n | Mean | Sd | Median | Change | Improves |"
    for scope in dict.fromkeys(table["scope"]):
        part = table[table["scope"] == scope]
        title = "All landmarks (pooled)" if scope == "all" else f"Landmark: {scope}"
        lines += ["", f"## {title}", "", header, "|:---|---:|---:|---:|---:|---:|---:|:---|"]
        for r in part.itertuples():
            improves = "" if r.improves is None or pd.isna(r.improves) else (
                "yes" if r.improves else "**no**")
            lines.append(f"| {r.label} | {r.level} | {r.n} | {_num(r.mean_mm)} | {_num(r.sd_mm)} "
                         f"| {_num(r.median_mm)} | {_num(r.change_mm)} | {improves} |")
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
