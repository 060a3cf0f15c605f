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

Two more checks serve inference on new scans: the intensity statistics of a scan against the
training cohort's (:func:`intensity_summary`, :func:`intensity_outliers`), and the settings of
the study's own noisy predictions (seed, passes, confidence, estimator) carried from the
predict rule into ``quality.json`` (:func:`study_settings`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .fileio import read_json, write_json_atomic

__all__ = ["OK", "REVIEW", "choose_threshold", "add_calibration", "flag", "read_quality", "write_quality",
           "QUALITY_FILE", "INTENSITY_MARGIN", "intensity_outliers", "intensity_stats",
           "intensity_summary", "summarise_intensities", "STUDY_SETTINGS", "study_settings",
           "read_prediction_settings", "write_prediction_settings", "settings_path"]

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


def add_calibration(result: dict, val_predictions_df: pd.DataFrame, confidence: float) -> dict:
    """Add the split-conformal scale of the sds (:func:`locnet.stats.conformal_scale`, fitted
    on the validation cases) to a :func:`choose_threshold` result.

    Calibrated (at least :data:`locnet.stats.MIN_CALIBRATION_CASES` validation cases):
    ``sd_scale`` and ``threshold_calibrated_mm3 = threshold_mm3 * sd_scale^3`` (the same
    threshold on the calibrated volumes, whose ellipsoids hold every landmark of a case at
    the stated level on validation data). Otherwise both are ``None``: the raw ellipsoids are
    kept. Always: ``calibrated``, ``calibration_reason`` (why not; empty when calibrated),
    ``sd_scale_n`` (validation cases), ``sd_scale_n_landmarks``, ``calibration_min_cases``
    and ``calibration_coverage`` (the coverage such a calibration gives new cases: expected
    value and central 95% range over calibration sets of this size; nulls when not
    calibrated)."""
    from .stats import conformal_scale

    fit = conformal_scale(val_predictions_df, "val" if "subset" in val_predictions_df.columns
                          else None, float(confidence))
    ok = bool(fit["calibrated"])
    scale = float(fit["scale"]) if ok else None
    finite = lambda v: float(v) if v is not None and math.isfinite(float(v)) else None  # noqa: E731
    result["sd_scale"] = scale
    result["calibrated"] = ok
    result["calibration_reason"] = fit["reason"]
    result["sd_scale_n"] = int(fit["n"])
    result["sd_scale_n_landmarks"] = int(fit["n_landmarks"])
    result["calibration_min_cases"] = int(fit["min_cases"])
    result["calibration_unit"] = ("case: a case's score is the largest Mahalanobis radius of "
                                  "its landmarks over the ellipsoid's")
    result["calibration_coverage"] = {
        "expected": finite(fit["coverage_expected"]), "low": finite(fit["coverage_low"]),
        "high": finite(fit["coverage_high"]),
        "meaning": ("coverage of all landmarks of a new case by the scaled ellipsoids: "
                    "Beta(k, n + 1 - k) over calibration sets of n cases (k = ceil((n + 1) "
                    "confidence)); expected value and central 95% range")}
    result["threshold_calibrated_mm3"] = (float(result["threshold_mm3"]) * scale ** 3
                                          if ok else None)
    return result


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
    try:
        d = read_json(path)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError name no file
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(d, dict) or "threshold_mm3" not in d:
        raise ValueError(f"{path}: not a quality file (no 'threshold_mm3')")
    return d


# --------------------------------------------------------------------------- intensities
#
# A scan far from the training data gets a confident-looking answer all the same (an all-air
# scan once got two landmarks 2.8 mm apart). Training records a summary of its cases'
# intensity statistics (:func:`intensity_summary`, in the model's ``metadata.json`` under
# ``"intensity"``), and inference compares a new scan's same statistics with it
# (:func:`intensity_outliers`).

#: the statistics, per case, of one pyramid level of the model's normalised input ([0, 1])
INTENSITY_STATS = ("mean", "sd", "foreground_fraction")
#: a voxel is foreground when its normalised value exceeds this (5% of the window)
FOREGROUND_LEVEL = 0.05
#: a statistic is out of range when it lies outside the training cases' [min, max] **and**
#: more than this many robust sds (1.4826 x MAD) from their median
INTENSITY_MARGIN = 5.0
#: the least robust sd used by that test (normalised units; a cohort of near-identical cases
#: has a MAD near 0)
MIN_SPREAD = 0.01


def intensity_stats(level: Any) -> dict:
    """``mean``, ``sd`` and ``foreground_fraction`` (share of voxels above
    :data:`FOREGROUND_LEVEL`) of one normalised pyramid level, as floats."""
    a = np.asarray(level, dtype=np.float32)
    return {"mean": float(a.mean(dtype=np.float64)), "sd": float(a.std(dtype=np.float64)),
            "foreground_fraction": float(np.count_nonzero(a > FOREGROUND_LEVEL) / a.size)}


def summarise_intensities(per_case: list[dict], level: int) -> dict:
    """The cohort summary of :func:`intensity_stats` records: per statistic the median, the
    robust sd (1.4826 x MAD), min, max and the 5th / 95th percentiles, over the cases."""
    if not per_case:
        raise ValueError("no cases to summarise")
    stats = {}
    for name in INTENSITY_STATS:
        v = np.array([float(c[name]) for c in per_case])
        med = float(np.median(v))
        stats[name] = {"median": med, "robust_sd": float(1.4826 * np.median(np.abs(v - med))),
                       "min": float(v.min()), "max": float(v.max()),
                       "p05": float(np.percentile(v, 5)), "p95": float(np.percentile(v, 95))}
    return {"level": int(level), "n_cases": len(per_case), "foreground_level": FOREGROUND_LEVEL,
            "statistics": stats,
            "meaning": ("per-case mean, sd and foreground fraction (share of voxels above "
                        "foreground_level) of pyramid level `level` of the normalised model "
                        "input, summarised over the training cases")}


def intensity_summary(case_dirs: Any, level: int) -> dict:
    """:func:`summarise_intensities` of the stored pyramid level ``level`` of ``case_dirs``
    (the training cases; written into the model's metadata by :func:`locnet.train.train`)."""
    from .pyramid import load_level

    return summarise_intensities([intensity_stats(load_level(d, level)[0]) for d in case_dirs],
                                 level)


def intensity_outliers(stats: dict, summary: dict, margin: float = INTENSITY_MARGIN) -> list[str]:
    """The statistics of ``stats`` that are out of the training cohort's range (see
    :data:`INTENSITY_MARGIN`), each as ``"name value (training min-max, median m)"``; empty
    when the scan looks like the training data."""
    out = []
    for name in INTENSITY_STATS:
        s = (summary.get("statistics") or {}).get(name)
        if s is None or name not in stats:
            continue
        v = float(stats[name])
        spread = max(float(s["robust_sd"]), MIN_SPREAD)
        outside = v < float(s["min"]) or v > float(s["max"])
        if outside and abs(v - float(s["median"])) > margin * spread:
            out.append(f"{name} {v:.3f} (training {float(s['min']):.3f}-{float(s['max']):.3f}, "
                       f"median {float(s['median']):.3f})")
    return out


# --------------------------------------------------------------------------- study settings
#
# ``locnet predict`` must give the study's numbers on a study scan: same noise seed, passes,
# estimator and confidence level. The predict rule records them beside its table (the
# predictions' sidecar, :func:`write_prediction_settings`); the quality_threshold rule copies
# them into ``MODEL_DIR/quality.json`` (:func:`study_settings`), the file inference reads.

#: the settings of the study's noisy predictions that inference reuses
STUDY_SETTINGS = ("seed", "passes", "confidence", "estimator")


def settings_path(predictions_csv: Any) -> Path:
    """The predictions' sidecar: ``{method}.json`` beside ``{method}.csv``."""
    return Path(predictions_csv).with_suffix(".json")


def write_prediction_settings(predictions_csv: Any, *, method: str, seed: int, passes: int,
                              confidence: float, estimator: str) -> Path:
    """Record how a prediction table's noisy passes were drawn (atomically, in its sidecar)."""
    path = settings_path(predictions_csv)
    write_json_atomic({
        "method": str(method), "seed": int(seed), "passes": int(passes),
        "confidence": float(confidence), "estimator": str(estimator),
        "noise_seeds": "each case's shifts are drawn with seed locnet.seeds.derive(seed, case_id)",
    }, path)
    return path


def read_prediction_settings(predictions_csv: Any) -> dict | None:
    """The sidecar of a prediction table, or ``None`` when it has none (older studies)."""
    path = settings_path(predictions_csv)
    if not path.is_file():
        return None
    d = read_json(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a prediction settings file")
    return d


def study_settings(predictions_csv: Any, confidence: float | None = None,
                   estimator: str | None = None) -> dict:
    """The :data:`STUDY_SETTINGS` of a prediction table, for ``quality.json``.

    From the table's sidecar; ``confidence`` and ``estimator`` fill in what it lacks (a study
    predicted before the sidecar existed: then ``seed`` and ``passes`` are absent, and
    inference falls back to its defaults).
    """
    recorded = read_prediction_settings(predictions_csv) or {}
    out = {k: recorded[k] for k in STUDY_SETTINGS if recorded.get(k) is not None}
    if "confidence" not in out and confidence is not None:
        out["confidence"] = float(confidence)
    if "estimator" not in out and estimator is not None:
        out["estimator"] = str(estimator)
    return out
