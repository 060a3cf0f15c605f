"""Does a method follow the landmark? The slope of predicted against true position per axis.

A mean error can hide a method that predicts one position for every scan: near the average
position its error is moderate, yet it reads nothing from the image. The slope of the
predicted against the true position (least squares, per landmark and axis, over the test
cases) shows it: 1 when the prediction moves with the landmark, 0 when it stays put.

Positions are compared in grid millimetres (``world - grid origin``, axes along world RAS x,
y, z; :class:`locnet.geometry.Grid`), the frame the networks see: each scan's pyramid grid is
centred on the scan, so in world coordinates a model that always answers one grid position
would still seem to follow where each scan was placed. Per landmark, because the landmarks of
one case lie far apart (a slope pooled over the left and right bifurcations along x would be
near 1 for any method that tells left from right). Each method's slope of an axis is the mean
over its landmarks and training seeds.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from locnet.geometry import Grid

__all__ = ["AXES", "LOW_SLOPE", "axis_slope", "slope_table", "method_slopes"]

AXES = ("x", "y", "z")
#: Below this slope on an axis, the results page says that the method hardly follows the
#: landmark along that axis.
LOW_SLOPE = 0.5


def axis_slope(pred: np.ndarray, true: np.ndarray) -> float:
    """Least-squares slope of ``pred`` on ``true`` (1-D); NaN below 3 points or without spread."""
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    if pred.size < 3 or np.ptp(true) <= 0:
        return float("nan")
    t = true - true.mean()
    return float(np.dot(t, pred - pred.mean()) / np.dot(t, t))


def _grid_mm(df: pd.DataFrame, grids: Mapping[str, Grid], cols) -> np.ndarray:
    out = np.full((len(df), 3), np.nan)
    for i, (case, xyz) in enumerate(zip(df["case_id"].astype(str), df[list(cols)].to_numpy(float))):
        if case not in grids:
            raise KeyError(f"no grid for case {case}")
        out[i] = grids[case].world_to_grid_mm(xyz[None])[0]
    return out


def slope_table(predictions: Mapping[str, pd.DataFrame], grids: Mapping[str, Grid],
                subset: str | None = "test") -> pd.DataFrame:
    """One row per method, seed, landmark and axis: ``slope`` of the predicted on the true grid
    position and ``n`` annotated landmarks (prediction tables as written by rule predict)."""
    rows = []
    for method, df in predictions.items():
        df = df.dropna(subset=["true_x", "true_y", "true_z"])
        if subset is not None and "subset" in df.columns:
            df = df[df["subset"] == subset]
        seeds = df["seed"] if "seed" in df.columns else pd.Series(0, index=df.index)
        for (seed, landmark), part in df.groupby([seeds, df["landmark"].astype(str)], sort=True):
            pred = _grid_mm(part, grids, ("x", "y", "z"))
            true = _grid_mm(part, grids, ("true_x", "true_y", "true_z"))
            for a, axis in enumerate(AXES):
                rows.append({"method": method, "seed": int(seed), "landmark": landmark,
                             "axis": axis, "slope": axis_slope(pred[:, a], true[:, a]),
                             "n": len(part)})
    return pd.DataFrame(rows, columns=["method", "seed", "landmark", "axis", "slope", "n"])


def method_slopes(table: pd.DataFrame) -> pd.DataFrame:
    """Per method (rows, in the table's order) and axis (columns x, y, z): the mean slope over
    landmarks and seeds."""
    if table.empty:
        return pd.DataFrame(columns=list(AXES))
    order = list(dict.fromkeys(table["method"]))
    wide = table.groupby(["method", "axis"])["slope"].mean().unstack("axis")
    return wide.reindex(index=order, columns=list(AXES))
