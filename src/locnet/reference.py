"""A no-image reference for Table 1: where the landmark usually lies in the grid.

Every test scan's landmarks are predicted at the mean position of that landmark over the
training cases, in grid millimetres (``world - grid origin``, see
:class:`locnet.geometry.Grid`); no image is read. The pyramid grid is centred on each scan,
so this is the error of a "method" that knows only the field of view and the training
annotations. A method whose error is close to it has learned little from the images.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from locnet.geometry import Grid

__all__ = ["mean_position_errors", "summary", "LEARNED_LITTLE"]

XYZ = ["x", "y", "z"]
# A method whose mean error is above this share of the reference's learned little from the
# images (the results page names it).
LEARNED_LITTLE = 0.75


def mean_position_errors(landmarks: pd.DataFrame, split: pd.DataFrame,
                         grids: Mapping[str, Grid], subset: str = "test") -> pd.DataFrame:
    """Per annotated landmark of the ``subset`` cases: the reference prediction (world mm)
    and its Euclidean error.

    ``landmarks``: ``case_id,landmark,x,y,z`` (world RAS mm, NaN = not annotated);
    ``split``: ``case_id,subset``; ``grids``: the grid of every training and ``subset`` case.
    A landmark annotated in no training case has no reference (its rows are left out).
    Returns ``case_id, landmark, x, y, z, true_x, true_y, true_z, error_mm``.
    """
    which = dict(zip(split["case_id"].astype(str), split["subset"].astype(str)))
    lm = landmarks.dropna(subset=XYZ).copy()
    lm["case_id"] = lm["case_id"].astype(str)
    lm["subset"] = lm["case_id"].map(which)
    missing = sorted(set(lm.loc[lm["subset"].isin(["train", subset]), "case_id"]) - set(grids))
    if missing:
        raise KeyError(f"no grid for case(s) {', '.join(missing[:5])}"
                       + (" ..." if len(missing) > 5 else ""))
    grid_mm = np.full((len(lm), 3), np.nan)
    for i, (case, xyz) in enumerate(zip(lm["case_id"], lm[XYZ].to_numpy(float))):
        if case in grids:
            grid_mm[i] = grids[case].world_to_grid_mm(xyz[None])[0]
    lm[["gx", "gy", "gz"]] = grid_mm
    mean = lm[lm["subset"] == "train"].groupby("landmark")[["gx", "gy", "gz"]].mean()
    test = lm[(lm["subset"] == subset) & lm["landmark"].isin(mean.index)]
    rows = []
    for r in test.itertuples(index=False):
        pred = grids[r.case_id].grid_mm_to_world(mean.loc[r.landmark].to_numpy()[None])[0]
        true = np.array([r.x, r.y, r.z], float)
        rows.append({"case_id": r.case_id, "landmark": r.landmark,
                     "x": pred[0], "y": pred[1], "z": pred[2],
                     "true_x": true[0], "true_y": true[1], "true_z": true[2],
                     "error_mm": float(np.linalg.norm(pred - true))})
    cols = ["case_id", "landmark", *XYZ, "true_x", "true_y", "true_z", "error_mm"]
    return pd.DataFrame(rows, columns=cols)


def summary(errors: pd.DataFrame) -> dict:
    """``n`` landmarks, ``n_cases``, ``mean_mm``, ``sd_mm``, ``median_mm`` of the errors;
    ``case_mean_mm``: the mean of the per-case mean errors (the case as the unit)."""
    e = errors["error_mm"].astype(float)
    case_means = errors.groupby("case_id")["error_mm"].mean()
    return {
        "n": int(e.size),
        "n_cases": int(errors["case_id"].nunique()),
        "mean_mm": float(e.mean()) if e.size else float("nan"),
        "sd_mm": float(e.std(ddof=1)) if e.size > 1 else float("nan"),
        "median_mm": float(e.median()) if e.size else float("nan"),
        "case_mean_mm": float(case_means.mean()) if e.size else float("nan"),
    }
