"""Quality flags for predictions on new scans, from the test-time-noise confidence volume.

The noisy multi-scale model reports, per landmark, the volume (mm^3) of its 90% confidence
ellipsoid (:func:`locnet.metrics.confidence_volume`). Large volumes go with large errors
(Fig. 5 of the study), so a threshold on the volume splits predictions into ``ok`` and
``review``.

:func:`choose_threshold` picks that threshold on the validation set: the **largest**
confidence volume ``T`` such that, among the validation landmarks whose volume is ``<= T``,
at least ``target_fraction`` have an error ``<= target_error_mm``. A new prediction with a
volume ``<= T`` is flagged ``ok`` (it falls in the range of volumes where the model met the
target on validation data), a larger one ``review``. When no volume meets the target, ``T`` is
0 and every prediction is flagged ``review``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .io import read_json, write_json_atomic

__all__ = ["OK", "REVIEW", "choose_threshold", "flag", "read_quality", "write_quality",
           "QUALITY_FILE"]

OK = "ok"
REVIEW = "review"
QUALITY_FILE = "quality.json"


def choose_threshold(val_predictions_df: pd.DataFrame, target_error_mm: float = 5.0,
                     target_fraction: float = 0.9, subset: str | None = "val") -> dict:
    """Choose the confidence-volume threshold on validation predictions.

    ``val_predictions_df``: a prediction table (``results/predictions/{method}.csv``) with
    ``error_mm`` and ``conf_volume_mm3``; when it has a ``subset`` column, only rows of
    ``subset`` are used (``None``: all rows). Rows without an error (missing annotation) or a
    volume are ignored.

    Returns a JSON-ready dict: ``threshold_mm3`` (see the module docstring), the targets,
    ``n_landmarks`` used, ``n_accepted`` (volumes ``<= threshold``), ``accepted_fraction``
    and ``fraction_within_target`` among the accepted ones (NaN when none is accepted).
    """
    target_error_mm = float(target_error_mm)
    target_fraction = float(target_fraction)
    if not target_error_mm > 0:
        raise ValueError(f"target_error_mm must be > 0, got {target_error_mm}")
    if not 0 < target_fraction <= 1:
        raise ValueError(f"target_fraction must be in (0, 1], got {target_fraction}")
    df = val_predictions_df
    missing = [c for c in ("error_mm", "conf_volume_mm3") if c not in df.columns]
    if missing:
        raise ValueError(f"prediction table lacks column(s) {', '.join(missing)} (the quality "
                         "threshold needs a noisy model's confidence volumes)")
    if subset is not None and "subset" in df.columns:
        df = df[df["subset"].astype(str) == subset]
    vol = pd.to_numeric(df["conf_volume_mm3"], errors="coerce").to_numpy(float)
    err = pd.to_numeric(df["error_mm"], errors="coerce").to_numpy(float)
    keep = np.isfinite(vol) & np.isfinite(err)
    vol, err = vol[keep], err[keep]
    if vol.size == 0:
        raise ValueError(f"no {subset or ''} predictions with an error and a confidence volume "
                         "to choose the threshold from".replace("  ", " "))
    order = np.argsort(vol, kind="stable")
    vol, good = vol[order], (err[order] <= target_error_mm)
    # fraction within target among the i+1 smallest volumes; ties share the last index
    frac = np.cumsum(good) / np.arange(1, vol.size + 1)
    last_of_tie = np.r_[vol[1:] != vol[:-1], True]
    ok = np.flatnonzero((frac >= target_fraction - 1e-12) & last_of_tie)
    if ok.size:
        i = int(ok[-1])
        threshold, n_acc, within = float(vol[i]), i + 1, float(frac[i])
    else:
        threshold, n_acc, within = 0.0, 0, math.nan
    return {
        "threshold_mm3": threshold,
        "target_error_mm": target_error_mm,
        "target_fraction": target_fraction,
        "subset": subset,
        "n_landmarks": int(vol.size),
        "n_accepted": int(n_acc),
        "accepted_fraction": n_acc / vol.size,
        "fraction_within_target": within,
        "meaning": ("largest 90% confidence volume (mm^3) such that, among the validation "
                    "landmarks with a volume <= it, at least target_fraction have an error "
                    "<= target_error_mm; predictions with a larger volume are flagged 'review'"),
    }


def flag(conf_volume_mm3: Any, threshold_mm3: float | None) -> str:
    """``ok`` when the volume is ``<= threshold``, ``review`` otherwise (also for NaN);
    ``""`` when there is no volume or no threshold (nothing to judge)."""
    if threshold_mm3 is None or conf_volume_mm3 is None:
        return ""
    v = float(conf_volume_mm3)
    if math.isnan(float(threshold_mm3)):
        return ""
    return OK if v <= float(threshold_mm3) else REVIEW


def write_quality(result: dict, path: Any) -> None:
    """Write a :func:`choose_threshold` result (NaN as null) atomically."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()}
    write_json_atomic(clean, path)


def read_quality(model_dir: Any) -> dict | None:
    """``MODEL_DIR/quality.json`` as a dict, or ``None`` when the file does not exist."""
    path = Path(model_dir) / QUALITY_FILE
    if not path.is_file():
        return None
    d = read_json(path)
    if not isinstance(d, dict) or "threshold_mm3" not in d:
        raise ValueError(f"{path}: not a quality file (no 'threshold_mm3')")
    return d
