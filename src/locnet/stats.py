"""Statistics of the study: paired tests, uncertainty-vs-error, calibration, bootstrap CIs.

Everything reads the prediction tables of ``docs/architecture.md`` (one DataFrame per method)
and ignores missing (unannotated) landmarks. The numbers end up in one tidy long table,
``tables/statistics.csv``, with columns ``test, comparison, quantity, value, note``.

Choices (see also the README):

* The case is the statistical unit: landmarks of one scan share its anatomy, image quality and
  the errors of the coarse levels, so they are not independent. Paired comparisons therefore
  use the two-sided Wilcoxon signed-rank test (scipy defaults) on the per-case mean errors
  over the landmarks annotated and predicted by both methods, differences taken as
  *proposed - other* (negative = proposed better); the (case, landmark) pairs only describe
  (``n_pairs``, median). With fewer than 6 cases no two-sided p below 0.05 is possible, and no
  p-value is given. The p-values of the comparisons of the proposed method with every other
  method are Holm-corrected together. ``mdd80_mm`` is the smallest mean case-level difference
  the test could detect with 80% power at the Holm family's strictest level ``alpha / m``:
  a paired t-test's detectable effect (statsmodels' ``TTestPower``) on ``n * 3 / pi`` cases
  (the Wilcoxon test's asymptotic relative efficiency), times the sd of the case differences.
* Seeds: a method is a training recipe, not one trained model. Tables with several training
  seeds (column ``seed``) are compared on errors averaged over the seeds per (case, landmark)
  (:func:`locnet.metrics.seed_mean_errors`), then per case as above; the bootstrap CIs use the
  same seed means. The uncertainty analyses (correlation, coverage, calibration) describe one
  model: the deployed one, the lowest seed (the workflow's seed 0).
* Bootstrap CIs resample *cases* with replacement (all landmarks of a drawn case come along),
  percentile intervals, seeded; the statistic is the pooled mean over annotated landmarks.
* The confidence volume is correlated with the error as the paper did (Pearson on the volume),
  and also with Pearson on log10(volume) and Spearman (rank, scale-free): per landmark (one
  point per case), on per-case means (``case means``: one point per case), and pooled over
  landmarks. Pooled p-values count the landmarks of a case as independent points and are
  description only (the table says so). The paper's r = 0.608 with p = 1.08e-6 corresponds to
  n = 54 points (its test cases), i.e. one landmark or one value per case.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as _sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower
from statsmodels.stats.proportion import proportion_confint

from .fileio import write_text_atomic
from .metrics import (
    PROPOSED_METHOD,
    chi2_radius_sq,
    deployed_seed_rows,
    confidence_volume,
    errors_of,
    inside_ellipsoid,
    landmark_order,
    mahalanobis_sq,
    method_label,
    method_order,
    n_seeds,
    seed_mean_errors,
    select_subset,
)

__all__ = [
    "PAPER_PEARSON_R",
    "PAPER_PEARSON_P",
    "paired_errors",
    "paired_wilcoxon",
    "auroc",
    "wilson_ci",
    "volumes_of",
    "confidence_correlation",
    "confidence_correlation_case_means",
    "case_means",
    "MIN_CALIBRATION_CASES",
    "conformal_scale",
    "conformal_coverage_interval",
    "calibrated_coverage",
    "min_detectable_difference",
    "calibration",
    "bootstrap_mean_ci",
    "statistics_table",
    "write_statistics",
    "statistics_summary",
]

PAPER_PEARSON_R = 0.608
PAPER_PEARSON_P = 1.08e-6
_KEY = ["case_id", "landmark"]


def _annotated(df: pd.DataFrame, subset: str | None) -> pd.DataFrame:
    """Rows of ``subset`` with a finite error, with an ``error_mm`` column; keys as strings."""
    df = select_subset(df, subset).copy()
    df["error_mm"] = errors_of(df)
    df = df[np.isfinite(df["error_mm"])]
    for k in _KEY:
        df[k] = df[k].astype(str)
    if df.duplicated(_KEY).any():
        dup = df.loc[df.duplicated(_KEY, keep=False), _KEY].drop_duplicates().head(3)
        raise ValueError(f"duplicate (case_id, landmark) rows, e.g. {dup.to_dict('records')}")
    return df


# ---------------------------------------------------------------------------------------------
# Paired Wilcoxon tests with Holm correction
# ---------------------------------------------------------------------------------------------


def paired_errors(
    a: pd.DataFrame, b: pd.DataFrame, subset: str | None = "test"
) -> pd.DataFrame:
    """Inner join of two prediction tables on (case_id, landmark): columns ``error_a, error_b``."""
    ea = _annotated(a, subset)[_KEY + ["error_mm"]].rename(columns={"error_mm": "error_a"})
    eb = _annotated(b, subset)[_KEY + ["error_mm"]].rename(columns={"error_mm": "error_b"})
    return ea.merge(eb, on=_KEY, how="inner").sort_values(_KEY, ignore_index=True)


def _case_bootstrap_weights(n_cases: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_cases) multiplicities of each case in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_cases, np.full(n_cases, 1.0 / n_cases), size=n_boot)


def _cluster_mean_ci(values: np.ndarray, clusters: np.ndarray, n_boot: int, seed: int,
                     level: float) -> tuple[float, float]:
    """Percentile CI of the pooled mean of ``values``, resampling whole clusters (cases)."""
    codes, uniq = pd.factorize(pd.Series(clusters), sort=True)
    if len(uniq) < 2:
        return np.nan, np.nan
    sums = np.bincount(codes, weights=values, minlength=len(uniq))
    counts = np.bincount(codes, minlength=len(uniq)).astype(float)
    w = _case_bootstrap_weights(len(uniq), n_boot, seed)
    means = (w @ sums) / (w @ counts)  # every case has >= 1 value, so counts > 0
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


#: fewest cases for a paired test: below 6, two-sided exact Wilcoxon p-values cannot reach 0.05
MIN_CASES_FOR_TEST = 6


def case_means(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per-case means of ``error_a`` and ``error_b`` over the case's paired landmarks."""
    return (pairs.groupby("case_id", sort=True)[["error_a", "error_b"]].mean()
            .reset_index())


def min_detectable_difference(d_cases: np.ndarray, alpha: float, power: float = 0.8) -> float:
    """Smallest mean of the case differences the signed-rank test detects with ``power``.

    Approximation: a two-sided paired t-test on ``n * 3 / pi`` cases (the Wilcoxon test's
    asymptotic relative efficiency against the t-test under normality) at level ``alpha``,
    effect = difference / sd of the case differences. NaN with fewer than 3 cases or sd 0.
    """
    d = np.asarray(d_cases, float)
    if d.size < 3 or not np.std(d, ddof=1) > 0:
        return float("nan")
    n_eff = d.size * 3.0 / math.pi
    effect = TTestPower().solve_power(effect_size=None, nobs=n_eff, alpha=alpha, power=power,
                                      alternative="two-sided")
    return float(effect * np.std(d, ddof=1))


def paired_wilcoxon(
    predictions: Mapping[str, pd.DataFrame],
    proposed: str = PROPOSED_METHOD,
    subset: str | None = "test",
    alpha: float = 0.05,
    alternative: str = "two-sided",
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Wilcoxon signed-rank test of ``proposed`` against every other method on per-case mean
    errors (the case is the unit), Holm-corrected.

    One row per other method (Table 1 order): ``method, label, n_cases, n_pairs`` (landmark
    pairs, description), ``median_diff_mm, mean_diff_mm`` (over cases), ``mean_diff_ci_low,
    mean_diff_ci_high`` (case bootstrap, 95%), ``statistic, p, p_holm, significant`` (p_holm <
    alpha), ``mdd80_mm`` (see :func:`min_detectable_difference`, at ``alpha / m`` for m
    comparisons) and ``note``. Differences are proposed - other. A comparison with fewer than
    :data:`MIN_CASES_FOR_TEST` cases or only zero differences gets p = NaN or 1 and a note, and
    is left out of the Holm family when its p is NaN.
    """
    if proposed not in predictions:
        raise KeyError(f"proposed method {proposed!r} not among {sorted(predictions)}")
    rows, case_diffs = [], []
    for m in method_order(predictions):
        if m == proposed:
            continue
        pairs = paired_errors(predictions[proposed], predictions[m], subset)
        cases = case_means(pairs)
        d = (cases["error_a"] - cases["error_b"]).to_numpy(float)
        case_diffs.append(d)
        row = {"method": m, "label": method_label(m), "n_cases": int(d.size),
               "n_pairs": int(len(pairs)), "median_diff_mm": np.nan, "mean_diff_mm": np.nan,
               "mean_diff_ci_low": np.nan, "mean_diff_ci_high": np.nan, "statistic": np.nan,
               "p": np.nan, "note": ""}
        if d.size == 0:
            row["note"] = "no common annotated (case, landmark) pairs"
        else:
            row["median_diff_mm"] = float(np.median(d))
            row["mean_diff_mm"] = float(d.mean())
            row["mean_diff_ci_low"], row["mean_diff_ci_high"] = _cluster_mean_ci(
                d, cases["case_id"].to_numpy(), n_boot, seed, 0.95)
            if np.all(d == 0):
                row.update(statistic=0.0, p=1.0, note="all paired differences are zero")
            elif d.size < MIN_CASES_FOR_TEST:
                row["note"] = (f"{d.size} cases: too few for a paired test (below "
                               f"{MIN_CASES_FOR_TEST} no two-sided p < 0.05 is possible)")
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    res = _sps.wilcoxon(cases["error_a"], cases["error_b"],
                                        alternative=alternative)
                row["statistic"], row["p"] = float(res.statistic), float(res.pvalue)
        rows.append(row)
    out = pd.DataFrame(rows, columns=["method", "label", "n_cases", "n_pairs", "median_diff_mm",
                                      "mean_diff_mm", "mean_diff_ci_low", "mean_diff_ci_high",
                                      "statistic", "p", "note"])
    out["p_holm"] = np.nan
    valid = out["p"].notna().to_numpy()
    if valid.any():
        out.loc[valid, "p_holm"] = multipletests(out.loc[valid, "p"].to_numpy(float),
                                                 alpha=alpha, method="holm")[1]
    out["significant"] = out["p_holm"] < alpha
    family = max(int(valid.sum()), 1)
    out["mdd80_mm"] = [min_detectable_difference(d, alpha / family) for d in case_diffs]
    out.insert(0, "proposed", proposed)
    return out[["proposed", "method", "label", "n_cases", "n_pairs", "median_diff_mm",
                "mean_diff_mm", "mean_diff_ci_low", "mean_diff_ci_high", "statistic", "p",
                "p_holm", "significant", "mdd80_mm", "note"]]


# ---------------------------------------------------------------------------------------------
# Small building blocks
# ---------------------------------------------------------------------------------------------


def auroc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive).

    Rank-based (Mann-Whitney): AUROC = U / (n1 * n0) with ``U = sum(ranks of positives) -
    n1 (n1 + 1) / 2`` and average ranks for ties (a tie counts one half). NaN scores are
    dropped. Returns NaN when either class is empty.
    """
    s = np.asarray(scores, dtype=float).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError("scores and labels must have the same length")
    ok = ~np.isnan(s)
    s, y = s[ok], y[ok]
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = _sps.rankdata(s)
    u = ranks[y].sum() - n1 * (n1 + 1) / 2.0
    return float(u / (n1 * n0))


def wilson_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (NaNs when n = 0)."""
    if n == 0:
        return float("nan"), float("nan")
    lo, hi = proportion_confint(successes, n, alpha=1.0 - level, method="wilson")
    return float(lo), float(hi)


def volumes_of(df: pd.DataFrame, level: float = 0.90) -> pd.Series:
    """The ``conf_volume_mm3`` column, or the volume computed from ``sd_x, sd_y, sd_z``."""
    if "conf_volume_mm3" in df.columns:
        return pd.to_numeric(df["conf_volume_mm3"], errors="coerce").astype(float)
    sds = ["sd_x", "sd_y", "sd_z"]
    if not set(sds) <= set(df.columns):
        raise KeyError("prediction table has neither conf_volume_mm3 nor sd_x, sd_y, sd_z")
    return pd.Series(confidence_volume(df[sds].to_numpy(float), level), index=df.index)


# ---------------------------------------------------------------------------------------------
# Confidence volume versus error
# ---------------------------------------------------------------------------------------------


def _corr(x: np.ndarray, y: np.ndarray, fn) -> tuple[float, float]:
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    res = fn(x, y)
    return float(res.statistic), float(res.pvalue)


def confidence_correlation(
    pred: pd.DataFrame, subset: str | None = "test", landmark: str | None = None,
    level: float = 0.90,
) -> dict[str, float | str]:
    """Correlation of the confidence volume (mm^3) with the error (mm) of a noisy method.

    Returns ``n, pearson_r, pearson_p`` (on the volume, as the paper), ``pearson_r_logvol,
    pearson_p_logvol`` (log10 volume), ``spearman_rho, spearman_p`` and a ``note``. Rows
    without truth or volume are dropped; log correlations use positive volumes only. Fewer
    than 3 points or a constant variable gives NaN.
    """
    df = _annotated(pred, subset)
    if landmark is not None:
        df = df[df["landmark"] == landmark]
    vol = volumes_of(df, level).to_numpy(float)
    err = df["error_mm"].to_numpy(float)
    ok = np.isfinite(vol)
    vol, err = vol[ok], err[ok]
    notes = []
    out: dict[str, float | str] = {"n": int(vol.size)}
    out["pearson_r"], out["pearson_p"] = _corr(vol, err, _sps.pearsonr)
    pos = vol > 0
    if (~pos).any():
        notes.append(f"{int((~pos).sum())} non-positive volumes left out of the log correlation")
    out["pearson_r_logvol"], out["pearson_p_logvol"] = _corr(np.log10(vol[pos]), err[pos],
                                                             _sps.pearsonr)
    out["spearman_rho"], out["spearman_p"] = _corr(vol, err, _sps.spearmanr)
    if vol.size < 3:
        notes.append("fewer than 3 points")
    out["note"] = "; ".join(notes)
    return out


def confidence_correlation_case_means(
    pred: pd.DataFrame, subset: str | None = "test", level: float = 0.90,
) -> dict[str, float | str]:
    """:func:`confidence_correlation` on one point per case: the case's mean confidence volume
    and mean error over its annotated landmarks (the case as the statistical unit)."""
    df = _annotated(pred, subset)
    df = df.assign(conf_volume_mm3=volumes_of(df, level).to_numpy(float))
    df = df[np.isfinite(df["conf_volume_mm3"])]
    g = df.groupby("case_id", sort=True)
    cases = pd.DataFrame({"case_id": list(g.groups), "landmark": "case mean",
                          "conf_volume_mm3": g["conf_volume_mm3"].mean().to_numpy(),
                          "error_mm": g["error_mm"].mean().to_numpy()})
    return confidence_correlation(cases, None, None, level)


# ---------------------------------------------------------------------------------------------
# Calibration of the confidence ellipsoids
# ---------------------------------------------------------------------------------------------


def calibration(
    pred: pd.DataFrame, subset: str | None = "test", level: float = 0.90,
    error_threshold_mm: float = 5.0, landmark: str | None = None,
) -> dict[str, float | str]:
    """Coverage of the ``level`` ellipsoids and AUROC of the volume for large errors.

    ``coverage`` = share of annotated landmarks whose truth lies inside the axis-aligned
    Gaussian ellipsoid (centre = prediction, sds = ``sd_x, sd_y, sd_z``) with its Wilson 95% CI
    (``coverage_ci_low/high``); a calibrated method has coverage close to ``level``.
    ``auroc`` = AUROC of the confidence volume for detecting errors > ``error_threshold_mm``
    (``n_large_error`` positives); NaN with ``auroc_note`` when one class is empty.
    """
    df = _annotated(pred, subset)
    if landmark is not None:
        df = df[df["landmark"] == landmark]
    notes = []
    out: dict[str, float | str] = {"level": level}
    sds = ["sd_x", "sd_y", "sd_z"]
    if set(sds) <= set(df.columns):
        out.update(_coverage(df, level))
        out["chi2_radius_sq"] = chi2_radius_sq(level)
    else:
        out.update(n=np.nan, n_inside=np.nan, coverage=np.nan, coverage_ci_low=np.nan,
                   coverage_ci_high=np.nan)
        notes.append("no sd_x, sd_y, sd_z columns: coverage not computed")
    vol = volumes_of(df, level).to_numpy(float)
    err = df["error_mm"].to_numpy(float)
    ok = np.isfinite(vol)
    large = err[ok] > error_threshold_mm
    out["error_threshold_mm"] = error_threshold_mm
    out["n_large_error"] = int(large.sum())
    out["n_small_error"] = int((~large).sum())
    out["auroc"] = auroc(vol[ok], large)
    out["note"] = "; ".join(notes)
    out["auroc_note"] = "" if np.isfinite(out["auroc"]) else (
        f"AUROC undefined: all errors on one side of {error_threshold_mm:g} mm")
    return out


#: the least number of validation cases a conformal scale is fitted on; with fewer, the raw
#: ellipsoids are kept (:func:`conformal_scale`)
MIN_CALIBRATION_CASES = 10


def conformal_coverage_interval(n: int, k: int, level: float = 0.95) -> tuple[float, float]:
    """Central ``level`` interval of the coverage a split-conformal set gives new cases when
    its threshold is the ``k``-th smallest of ``n`` calibration scores: over calibration sets,
    that coverage is Beta(k, n + 1 - k) distributed (continuous scores; mean k / (n + 1)).
    NaNs when ``k`` is not in 1..n."""
    if not 1 <= k <= n:
        return float("nan"), float("nan")
    a = (1.0 - level) / 2.0
    lo, hi = _sps.beta.ppf([a, 1.0 - a], k, n + 1 - k)
    return float(lo), float(hi)


def conformal_scale(pred: pd.DataFrame, subset: str | None = "val", level: float = 0.90,
                    min_cases: int = MIN_CALIBRATION_CASES) -> dict:
    """Split-conformal scale factor of the sds, fitted on the cases of ``subset`` (validation).

    The landmarks of one case share its errors (its anatomy, its scan), so they are not
    exchangeable units; the cases are. A landmark's score is its Mahalanobis radius over the
    ``level`` ellipsoid's, ``r = sqrt(mahalanobis^2 / chi2_3(level))`` (inside: r <= 1), and a
    **case's score is the largest r of its annotated landmarks**. The scale ``s`` is the
    ``k = ceil((n + 1) level)``-th smallest of the n case scores: for a new case exchangeable
    with the calibration cases, the ellipsoids with sds ``s * sd`` hold the truths of *all*
    its landmarks at once with probability at least ``level`` (so each landmark's with at
    least ``level``; with several landmarks per case this is conservative per landmark).

    Fewer than ``min_cases`` cases (or ``k > n``) gives no scale: ``calibrated`` False with a
    ``reason``, and the raw ellipsoids stay the ones to use. Returns ``n`` (cases),
    ``n_landmarks``, ``scale`` (NaN when not calibrated), ``calibrated``, ``rank`` (k),
    ``coverage_expected`` (k / (n + 1)), ``coverage_low`` / ``coverage_high`` (the central
    95% range of the coverage such a calibration gives new cases, over calibration sets of n
    cases: :func:`conformal_coverage_interval`), ``reason`` and ``note`` (the same).
    """
    df = _annotated(pred, subset)
    sds = ["sd_x", "sd_y", "sd_z"]
    out = {"n": 0, "n_landmarks": 0, "scale": np.nan, "calibrated": False, "rank": np.nan,
           "coverage_expected": np.nan, "coverage_low": np.nan, "coverage_high": np.nan,
           "min_cases": int(min_cases), "reason": ""}
    if not set(sds) <= set(df.columns):
        out["reason"] = out["note"] = "no sd_x, sd_y, sd_z columns"
        return out
    d2 = mahalanobis_sq(df[["x", "y", "z"]].to_numpy(float),
                        df[["true_x", "true_y", "true_z"]].to_numpy(float), df[sds].to_numpy(float))
    keep = ~np.isnan(d2)  # +inf (a zero sd missed) stays: it is a miss
    r = pd.Series(np.sqrt(d2[keep] / chi2_radius_sq(level)), index=df.index[keep])
    case_scores = np.sort(r.groupby(df.loc[keep, "case_id"]).max().to_numpy(float))
    n = int(case_scores.size)
    k = math.ceil((n + 1) * level)
    out.update(n=n, n_landmarks=int(keep.sum()))
    if n < min_cases:
        out["reason"] = (f"{n} validation case(s) ({out['n_landmarks']} landmarks): a conformal "
                         f"scale needs at least {min_cases} cases, as the landmarks of one case "
                         "share its errors, so the raw ellipsoids are kept")
    elif k > n:
        out["reason"] = (f"{n} validation cases: too few for a {100 * level:g}% conformal scale "
                         f"(needs ceil((n + 1) x {level:g}) <= n), so the raw ellipsoids are kept")
    elif not math.isfinite(case_scores[k - 1]):
        out["reason"] = ("a zero sd missed the truth in too many validation cases: no finite "
                         "scale, so the raw ellipsoids are kept")
    else:
        lo, hi = conformal_coverage_interval(n, k)
        out.update(scale=float(case_scores[k - 1]), calibrated=True, rank=k,
                   coverage_expected=k / (n + 1), coverage_low=lo, coverage_high=hi)
    out["note"] = out["reason"]
    return out


def calibrated_coverage(pred: pd.DataFrame, scale: float, subset: str | None = "test",
                        level: float = 0.90) -> dict[str, float]:
    """Coverage of the ``level`` ellipsoids with sds multiplied by ``scale`` on ``subset``,
    with its Wilson 95% CI (``n, n_inside, coverage, coverage_ci_low, coverage_ci_high``)."""
    df = _annotated(pred, subset)
    if not np.isfinite(scale) or not {"sd_x", "sd_y", "sd_z"} <= set(df.columns):
        return {"n": np.nan, "n_inside": np.nan, "coverage": np.nan, "coverage_ci_low": np.nan,
                "coverage_ci_high": np.nan}
    return _coverage(df, level, float(scale))


def _coverage(df: pd.DataFrame, level: float, scale: float = 1.0) -> dict[str, float]:
    """Coverage of the ``level`` ellipsoids with sds ``scale * sd`` over the rows of ``df``
    (annotated, with sd columns) whose prediction, truth and sds are finite; Wilson 95% CI."""
    p = df[["x", "y", "z"]].to_numpy(float)
    t = df[["true_x", "true_y", "true_z"]].to_numpy(float)
    sd = df[["sd_x", "sd_y", "sd_z"]].to_numpy(float) * scale
    ok = np.isfinite(p).all(1) & np.isfinite(t).all(1) & np.isfinite(sd).all(1)
    inside = inside_ellipsoid(p[ok], t[ok], sd[ok], level)
    k, n = int(inside.sum()), int(ok.sum())
    lo, hi = wilson_ci(k, n)
    return {"n": n, "n_inside": k, "coverage": k / n if n else np.nan, "coverage_ci_low": lo,
            "coverage_ci_high": hi}


# ---------------------------------------------------------------------------------------------
# Bootstrap CI of each method's mean error
# ---------------------------------------------------------------------------------------------


def bootstrap_mean_ci(
    predictions: Mapping[str, pd.DataFrame], subset: str | None = "test", n_boot: int = 2000,
    seed: int = 0, level: float = 0.95,
) -> pd.DataFrame:
    """Percentile bootstrap CI of each method's mean error, resampling cases (not landmarks).

    Each resample draws as many cases as there are (with replacement); its statistic is the
    mean error over all annotated landmarks of the drawn cases. Every method uses its own
    generator seeded with ``seed``, so a method's CI does not depend on which other methods
    are present. Columns: ``method, label, n_cases, n, mean_mm, ci_low, ci_high``.
    """
    rows = []
    for m in method_order(predictions):
        df = _annotated(predictions[m], subset)
        e = df["error_mm"].to_numpy(float)
        lo, hi = _cluster_mean_ci(e, df["case_id"].to_numpy(), n_boot, seed, level) \
            if e.size else (np.nan, np.nan)
        rows.append({"method": m, "label": method_label(m),
                     "n_cases": int(df["case_id"].nunique()), "n": int(e.size),
                     "mean_mm": float(e.mean()) if e.size else np.nan,
                     "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=["method", "label", "n_cases", "n", "mean_mm", "ci_low",
                                       "ci_high"])


# ---------------------------------------------------------------------------------------------
# The statistics table
# ---------------------------------------------------------------------------------------------

_COLUMNS = ["test", "comparison", "quantity", "value", "note"]


def statistics_table(
    predictions: Mapping[str, pd.DataFrame],
    proposed: str = PROPOSED_METHOD,
    subset: str | None = "test",
    level: float = 0.90,
    error_threshold_mm: float = 5.0,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
    landmarks: Sequence[str] | None = None,
) -> pd.DataFrame:
    """All statistics as one tidy long table: ``test, comparison, quantity, value, note``.

    Tests: ``bootstrap_mean`` (comparison = method), ``wilcoxon_holm`` (comparison =
    ``"proposed vs other"``), ``confidence_vs_error`` and ``calibration`` (comparison =
    ``"proposed"`` pooled, or ``"proposed [landmark]"``). Values are numbers (booleans as 1/0);
    a part that cannot be computed (method disabled, no sds) is one row with NaN and a note.
    """
    rows: list[dict] = []
    seeds = {m: n_seeds(df) for m, df in predictions.items()}
    # comparisons and CIs: per-(case, landmark) errors averaged over each method's seeds
    all_seeds = predictions
    predictions = {m: seed_mean_errors(df) for m, df in predictions.items()}

    def seed_note(methods) -> str:
        n = sorted({seeds[m] for m in methods if m in seeds})
        if not n or n == [1]:
            return ""
        return "errors averaged over " + "/".join(map(str, n)) + " training seeds"

    def add(test, comparison, quantities: Mapping, note=""):
        for q, v in quantities.items():
            v = float(v) if v is not None and not isinstance(v, str) else np.nan
            rows.append({"test": test, "comparison": comparison, "quantity": q,
                         "value": v, "note": note})

    boot = bootstrap_mean_ci(predictions, subset, n_boot, seed)
    for r in boot.itertuples(index=False):
        add("bootstrap_mean", r.method,
            {"n_cases": r.n_cases, "n": r.n, "mean_mm": r.mean_mm, "ci_low": r.ci_low,
             "ci_high": r.ci_high},
            "; ".join(x for x in (f"{int(n_boot)} case resamples, seed {seed}, percentile 95% "
                                  "CI", seed_note([r.method])) if x))

    if proposed not in predictions:
        add("wilcoxon_holm", proposed, {"p_holm": np.nan},
            f"proposed method {proposed!r} not in this run")
    elif len(predictions) < 2:
        add("wilcoxon_holm", proposed, {"p_holm": np.nan}, "no other method to compare with")
    else:
        wx = paired_wilcoxon(predictions, proposed, subset, alpha, n_boot=n_boot, seed=seed)
        for r in wx.itertuples(index=False):
            note = ("per-case mean errors, differences proposed - other (mm); Holm over "
                    f"{int(wx['p'].notna().sum())} comparisons")
            if seed_note([proposed, r.method]):
                note += "; " + seed_note([proposed, r.method])
            if r.note:
                note += f"; {r.note}"
            add("wilcoxon_holm", f"{proposed} vs {r.method}",
                {"n_cases": r.n_cases, "n_pairs": r.n_pairs, "median_diff_mm": r.median_diff_mm,
                 "mean_diff_mm": r.mean_diff_mm, "mean_diff_ci_low": r.mean_diff_ci_low,
                 "mean_diff_ci_high": r.mean_diff_ci_high, "statistic": r.statistic,
                 "p": r.p, "p_holm": r.p_holm, "significant": float(bool(r.significant)),
                 "mdd80_mm": r.mdd80_mm},
                note)

    pred = all_seeds.get(proposed)
    unc_note = ""
    if pred is not None and seeds.get(proposed, 1) > 1:
        deployed, pred = deployed_seed_rows(pred)
        unc_note = f"the deployed model (seed {deployed} of {seeds[proposed]})"
    has_unc = pred is not None and (
        "conf_volume_mm3" in pred.columns or {"sd_x", "sd_y", "sd_z"} <= set(pred.columns))
    if not has_unc:
        why = (f"proposed method {proposed!r} not in this run" if pred is None
               else f"{proposed!r} has no confidence volume / sd columns")
        add("confidence_vs_error", proposed, {"pearson_r": np.nan}, why)
        add("calibration", proposed, {"coverage": np.nan}, why)
    else:
        def add_unc(test, comparison, quantities, note=""):
            add(test, comparison, quantities, "; ".join(x for x in (note, unc_note) if x))

        lms = list(landmarks) if landmarks is not None else landmark_order({proposed: pred})
        conf = conformal_scale(pred, "val", level)
        cov = calibrated_coverage(pred, conf["scale"], subset, level)
        add_unc("calibration_conformal", proposed,
            {"n_calibration": conf["n"], "n_calibration_landmarks": conf["n_landmarks"],
             "min_cases": conf["min_cases"], "calibrated": float(conf["calibrated"]),
             "scale": conf["scale"], "coverage_expected": conf["coverage_expected"],
             "coverage_guarantee_low": conf["coverage_low"],
             "coverage_guarantee_high": conf["coverage_high"], **cov},
            "; ".join(x for x in (
                "split-conformal scale of the sds fitted on the validation cases (a case's "
                "score: the largest scaled Mahalanobis radius of its landmarks), coverage "
                f"of the scaled {100 * level:g}% ellipsoids on the {subset} landmarks, Wilson "
                "95% CI (landmarks counted as independent); coverage_guarantee_low/high: the "
                "central 95% of Beta(k, n + 1 - k), the case coverage such a calibration "
                "gives", conf["note"]) if x))
        cm = confidence_correlation_case_means(pred, subset, level)
        note = cm.pop("note")
        add_unc("confidence_vs_error", f"{proposed} [case means]", cm, note)
        for lm in [None, *lms]:
            comp = proposed if lm is None else f"{proposed} [{lm}]"
            c = confidence_correlation(pred, subset, lm, level)
            note = c.pop("note")
            if lm is None and len(lms) > 1:
                note = "; ".join(x for x in (note, "pooled over landmarks: p-values count the "
                                             "landmarks of a case as independent (description "
                                             "only)") if x)
            add_unc("confidence_vs_error", comp, c, note)
            cal = calibration(pred, subset, level, error_threshold_mm, lm)
            note, auroc_note = cal.pop("note"), cal.pop("auroc_note")
            thr = {q: cal.pop(q) for q in ("error_threshold_mm", "n_large_error",
                                           "n_small_error", "auroc")}
            add_unc("calibration", comp, cal, note)
            add_unc("calibration", comp, thr, auroc_note)
    return pd.DataFrame(rows, columns=_COLUMNS)


def write_statistics(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the statistics table as CSV, atomically (full float precision)."""
    return write_text_atomic(df.to_csv(index=False, lineterminator="\n"), path)


def _get(df: pd.DataFrame, test: str, comparison: str, quantity: str) -> float:
    v = df.loc[(df["test"] == test) & (df["comparison"] == comparison)
               & (df["quantity"] == quantity), "value"]
    return float(v.iloc[0]) if len(v) else float("nan")


def _p(p: float) -> str:
    if not np.isfinite(p):
        return "n/a"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.2e}"


def _f(v: float, digits: int = 2) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:.{digits}f}"


def _i(v: float) -> str:
    """A count stored as float: the integer, or n/a."""
    return "n/a" if not np.isfinite(v) else str(int(v))


def _scope(comparison: str) -> str:
    """The scope of a per-landmark comparison ``"... [landmark]"``; all (pooled) otherwise."""
    return comparison.split(" [", 1)[1].rstrip("]") if " [" in comparison else "all (pooled)"


def _not_computed(rows: pd.DataFrame) -> str | None:
    """The note of a test that was not computed (one row, non-finite value), else None."""
    if len(rows) == 1 and not np.isfinite(rows["value"].iloc[0]):
        return f"Not computed: {rows['note'].iloc[0]}"
    return None


def statistics_summary(df: pd.DataFrame) -> str:
    """Readable markdown summary of a :func:`statistics_table` result."""
    lines = ["# Statistics", ""]
    boot = df[df["test"] == "bootstrap_mean"]
    if len(boot):
        note = boot["note"].iloc[0]
        lines += [f"## Mean error with bootstrap 95% CI ({note})", "",
                  "| Method | cases | landmarks | mean (mm) | 95% CI (mm) |",
                  "|:---|---:|---:|---:|---:|"]
        for m in dict.fromkeys(boot["comparison"]):
            g = lambda q: _get(df, "bootstrap_mean", m, q)  # noqa: E731
            n_cases, n = g("n_cases"), g("n")
            lines.append(
                f"| {method_label(m)} | {_i(n_cases)} | {_i(n)} | {_f(g('mean_mm'))} | "
                f"{_f(g('ci_low'))} to {_f(g('ci_high'))} |")
        lines.append("")

    wx = df[df["test"] == "wilcoxon_holm"]
    if len(wx):
        lines += ["## Paired Wilcoxon signed-rank tests, Holm-corrected", ""]
        comps = [c for c in dict.fromkeys(wx["comparison"]) if " vs " in c]
        if not comps:
            lines += [f"Not computed: {wx['note'].iloc[0]}", ""]
        else:
            prop = comps[0].split(" vs ")[0]
            lines += [f"Proposed: {method_label(prop)}. The unit is the case: each case's "
                      "errors are averaged over its landmarks first. Differences are proposed "
                      "- other (negative: the proposed method is better). Detectable: the "
                      "smallest mean difference the test finds with 80% power at the Holm "
                      "family's strictest level.", "",
                      "| Other method | cases | landmark pairs | median diff (mm) | mean diff "
                      "[95% CI] (mm) | W | p | p (Holm) | significant | detectable (mm) |",
                      "|:---|---:|---:|---:|---:|---:|---:|---:|:---:|---:|"]
            for c in comps:
                g = lambda q: _get(df, "wilcoxon_holm", c, q)  # noqa: E731
                other = c.split(" vs ", 1)[1]
                sig = g("significant")
                p = g("p")
                verdict = ("yes" if sig == 1 else "no") if np.isfinite(p) else "no test"
                lines.append(
                    f"| {method_label(other)} | {_i(g('n_cases'))} | {_i(g('n_pairs'))} | "
                    f"{_f(g('median_diff_mm'))} | {_f(g('mean_diff_mm'))} "
                    f"[{_f(g('mean_diff_ci_low'))}, {_f(g('mean_diff_ci_high'))}] | "
                    f"{_f(g('statistic'), 1)} | {_p(p)} | {_p(g('p_holm'))} | "
                    f"{verdict} | {_f(g('mdd80_mm'))} |")
            notes = [n.split("; ", 1)[1] for n in dict.fromkeys(wx["note"]) if "; " in n]
            lines += [""] + [f"Note: {n}" for n in dict.fromkeys(notes)]
            lines.append("")

    ce = df[df["test"] == "confidence_vs_error"]
    if len(ce):
        lines += ["## Confidence volume versus error", ""]
        comps = list(dict.fromkeys(ce["comparison"]))
        if note := _not_computed(ce):
            lines += [note, ""]
        else:
            lines += [f"Paper: Pearson r = {PAPER_PEARSON_R} (p = {PAPER_PEARSON_P:.2e}), "
                      "which corresponds to n = 54 points. Per landmark and on case means "
                      "there is one point per case; pooled p-values count the landmarks of a "
                      "case as independent points and only describe.", "",
                      "| Scope | n | Pearson r (p) | Pearson r, log10 volume (p) "
                      "| Spearman rho (p) |", "|:---|---:|---:|---:|---:|"]
            for c in comps:
                g = lambda q: _get(df, "confidence_vs_error", c, q)  # noqa: E731
                lines.append(
                    f"| {_scope(c)} | {_i(g('n'))} | "
                    f"{_f(g('pearson_r'), 3)} ({_p(g('pearson_p'))}) | "
                    f"{_f(g('pearson_r_logvol'), 3)} ({_p(g('pearson_p_logvol'))}) | "
                    f"{_f(g('spearman_rho'), 3)} ({_p(g('spearman_p'))}) |")
            lines.append("")

    cal = df[df["test"] == "calibration"]
    if len(cal):
        lines += ["## Calibration of the confidence ellipsoids", ""]
        comps = list(dict.fromkeys(cal["comparison"]))
        if note := _not_computed(cal):
            lines += [note, ""]
        else:
            lvl = _get(df, "calibration", comps[0], "level")
            thr = _get(df, "calibration", comps[0], "error_threshold_mm")
            lines += [f"Coverage: share of landmarks whose truth lies inside the predicted "
                      f"{100 * lvl:.0f}% ellipsoid (ideal {100 * lvl:.0f}%), Wilson 95% CI. "
                      f"AUROC: confidence volume as a detector of errors > {thr:g} mm.", "",
                      "| Scope | n | coverage [95% CI] | errors > thr | AUROC | note |",
                      "|:---|---:|---:|---:|---:|:---|"]
            for c in comps:
                g = lambda q: _get(df, "calibration", c, q)  # noqa: E731
                notes = "; ".join(x for x in dict.fromkeys(
                    cal.loc[cal["comparison"] == c, "note"]) if x)
                cov = g("coverage")
                lines.append(
                    f"| {_scope(c)} | {_i(g('n'))} | "
                    f"{_f(100 * cov, 1)}% [{_f(100 * g('coverage_ci_low'), 1)}, "
                    f"{_f(100 * g('coverage_ci_high'), 1)}] | {int(g('n_large_error'))} | "
                    f"{_f(g('auroc'), 3)} | {notes} |")
            lines.append("")
    conf = df[(df["test"] == "calibration_conformal")]
    if len(conf):
        c = conf["comparison"].iloc[0]
        g = lambda q: _get(df, "calibration_conformal", c, q)  # noqa: E731
        raw = _get(df, "calibration", c, "coverage")
        lines += ["## Calibrated ellipsoids (beyond the paper)", ""]
        if g("calibrated") == 1 or (np.isnan(g("calibrated")) and np.isfinite(g("scale"))):
            lines += [f"Scale of the sds from the validation set (split conformal on "
                      f"{_i(g('n_calibration'))} cases): **{_f(g('scale'))}**; over calibration "
                      f"sets of this size it gives new cases a coverage between "
                      f"{_f(100 * g('coverage_guarantee_low'), 1)}% and "
                      f"{_f(100 * g('coverage_guarantee_high'), 1)}% (central 95%). Test "
                      f"coverage raw {_f(100 * raw, 1)}%, calibrated "
                      f"{_f(100 * g('coverage'), 1)}% [{_f(100 * g('coverage_ci_low'), 1)}, "
                      f"{_f(100 * g('coverage_ci_high'), 1)}] ({_i(g('n'))} landmarks).", ""]
        else:
            lines += [f"Not calibrated: the raw ellipsoids (test coverage {_f(100 * raw, 1)}%) "
                      "are the ones to use.", ""]
        if conf["note"].iloc[0]:
            lines += [f"Note: {conf['note'].iloc[0]}", ""]
    return "\n".join(lines)
