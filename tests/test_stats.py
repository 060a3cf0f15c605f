"""Tests of locnet.stats: paired tests + Holm, AUROC, calibration, correlations, bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import beta, chi2
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from locnet import stats
from locnet.metrics import confidence_volume

LMS = ["left_bifurcation", "right_bifurcation"]


def make_table(errors, landmarks=LMS, seed=0, sd=None, subset="test"):
    """A prediction table whose error_mm equals ``errors`` (cases x landmarks, NaN = missing).

    The prediction is the truth shifted by ``error`` along a random direction; with ``sd``
    (same shape + (3,)) the noisy-method columns are added.
    """
    rng = np.random.default_rng(seed)
    errors = np.asarray(errors, float)
    rows = []
    for c in range(errors.shape[0]):
        for j, lm in enumerate(landmarks):
            t = rng.normal(0, 30, 3)
            u = rng.normal(size=3)
            u /= np.linalg.norm(u)
            e = errors[c, j]
            p = t + (0.0 if np.isnan(e) else e) * u
            r = dict(case_id=f"case{c:03d}", subset=subset, landmark=lm, x=p[0], y=p[1],
                     z=p[2], true_x=t[0], true_y=t[1], true_z=t[2], error_mm=e)
            if np.isnan(e):
                r.update(true_x=np.nan, true_y=np.nan, true_z=np.nan)
            if sd is not None:
                s = sd[c, j]
                r.update(sd_x=s[0], sd_y=s[1], sd_z=s[2], conf_volume_mm3=confidence_volume(s))
            rows.append(r)
    return pd.DataFrame(rows)


def gaussian_noisy_table(n_cases, sd_scale=1.0, seed=0):
    """Noisy-method table with truth - prediction ~ N(0, diag(sd^2)); reports sd_scale * sd."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_cases):
        for lm in LMS:
            sd = rng.uniform(0.3, 3.0, 3)
            t = rng.normal(0, 30, 3)
            p = t + rng.normal(size=3) * sd
            rsd = sd_scale * sd
            rows.append(dict(case_id=f"c{c}", subset="test", landmark=lm, x=p[0], y=p[1],
                             z=p[2], true_x=t[0], true_y=t[1], true_z=t[2],
                             error_mm=float(np.linalg.norm(p - t)), sd_x=rsd[0], sd_y=rsd[1],
                             sd_z=rsd[2], conf_volume_mm3=confidence_volume(rsd)))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Wilcoxon + Holm
# --------------------------------------------------------------------------------------------


def test_wilcoxon_holm_matches_direct_calls():
    rng = np.random.default_rng(3)
    n = 30
    prop = rng.gamma(2.0, 1.0, (n, 2))
    others = {"heatmap_unet": rng.gamma(2.0, 1.6, (n, 2)),
              "locnet_single": rng.gamma(2.0, 1.3, (n, 2)),
              "multiscale_e2e": rng.gamma(2.0, 1.05, (n, 2))}
    prop[[1, 4], [0, 1]] = np.nan                      # missing in the proposed method
    others["heatmap_unet"][[2, 4], [0, 0]] = np.nan    # missing in another
    preds = {"multiscale_e2e_noise": make_table(prop, seed=1)}
    for i, (m, e) in enumerate(others.items()):
        preds[m] = make_table(e, seed=10 + i)
    # an extra test case only the other method has, and val rows: both must be ignored
    extra = make_table(np.array([[1.0, 1.0]]), seed=5)
    extra["case_id"] = "case999"
    preds["locnet_single"] = pd.concat(
        [preds["locnet_single"], extra, make_table(np.ones((3, 2)), seed=6, subset="val")],
        ignore_index=True)

    res = stats.paired_wilcoxon(preds, "multiscale_e2e_noise", subset="test")
    assert list(res["method"]) == ["heatmap_unet", "locnet_single", "multiscale_e2e"]
    ps = []
    for _, row in res.iterrows():
        o = others[row["method"]]
        ok = ~np.isnan(prop) & ~np.isnan(o)
        # the case is the unit: mean over the case's landmarks annotated in both methods
        keep = ok.any(axis=1)
        a = np.nanmean(np.where(ok, prop, np.nan)[keep], axis=1)
        b = np.nanmean(np.where(ok, o, np.nan)[keep], axis=1)
        direct = sps.wilcoxon(a, b)
        assert row["n_pairs"] == ok.sum() and row["n_cases"] == keep.sum()
        assert row["statistic"] == pytest.approx(direct.statistic)
        assert row["p"] == pytest.approx(direct.pvalue, rel=1e-9)
        assert row["median_diff_mm"] == pytest.approx(np.median(a - b))
        assert row["mean_diff_mm"] == pytest.approx(np.mean(a - b))
        assert row["mean_diff_ci_low"] < row["mean_diff_mm"] < row["mean_diff_ci_high"]
        ps.append(direct.pvalue)
    np.testing.assert_allclose(res["p_holm"], multipletests(ps, method="holm")[1], rtol=1e-9)
    assert list(res["significant"]) == list(res["p_holm"] < 0.05)


def test_wilcoxon_detects_real_difference_and_not_equal_methods():
    rng = np.random.default_rng(7)
    n = 40
    base = rng.gamma(2.0, 1.5, (n, 2))
    preds = {
        "multiscale_e2e_noise": make_table(0.6 * base * rng.uniform(0.8, 1.2, (n, 2)), seed=1),
        "heatmap_unet": make_table(base, seed=2),
        # same distribution as the proposed method, independent draws
        "multiscale_e2e": make_table(0.6 * rng.gamma(2.0, 1.5, (n, 2)), seed=3),
    }
    res = stats.paired_wilcoxon(preds).set_index("method")
    assert res.loc["heatmap_unet", "p_holm"] < 0.05
    assert res.loc["heatmap_unet", "significant"]
    assert res.loc["heatmap_unet", "median_diff_mm"] < 0
    assert res.loc["multiscale_e2e", "p_holm"] > 0.05
    assert not res.loc["multiscale_e2e", "significant"]


def test_landmarks_of_a_case_are_not_independent_pairs():
    """Twenty copies of each case's landmark must not make a difference 'significant': the
    paired test runs on per-case means, so its n and p stay those of the cases."""
    rng = np.random.default_rng(2)
    n = 10
    a = rng.gamma(2.0, 1.0, n) + 1.0
    b = a + np.array([0.5, 0.62, 0.41, 0.73, -0.33, -0.21, 0.55, -0.44, 0.66, -0.37])
    many = [f"lm{k}" for k in range(20)]
    one = {"multiscale_e2e_noise": make_table(a[:, None], landmarks=["lm0"]),
           "multiscale_e2e": make_table(b[:, None], landmarks=["lm0"], seed=1)}
    rep = {"multiscale_e2e_noise": make_table(np.repeat(a[:, None], 20, 1), landmarks=many),
           "multiscale_e2e": make_table(np.repeat(b[:, None], 20, 1), landmarks=many, seed=1)}
    r1, r20 = stats.paired_wilcoxon(one).iloc[0], stats.paired_wilcoxon(rep).iloc[0]
    assert r20["n_pairs"] == 200 and r20["n_cases"] == r1["n_cases"] == n
    assert r20["p"] == pytest.approx(r1["p"], rel=1e-6) and r20["p"] > 0.05
    # pooled over the 200 landmark pairs the same data would look decisive
    assert sps.wilcoxon(np.repeat(a, 20), np.repeat(b, 20)).pvalue < 1e-6


def test_too_few_cases_give_no_p_value_and_detectable_difference_is_known():
    rng = np.random.default_rng(4)
    few = {"multiscale_e2e_noise": make_table(rng.gamma(2.0, 1.0, (5, 2))),
           "multiscale_e2e": make_table(rng.gamma(2.0, 1.0, (5, 2)) + 5.0, seed=2)}
    r = stats.paired_wilcoxon(few).iloc[0]
    assert np.isnan(r["p"]) and np.isnan(r["p_holm"]) and not r["significant"]
    assert "too few" in r["note"] and r["n_cases"] == 5
    text = stats.statistics_summary(stats.statistics_table(few, n_boot=50))
    assert "no test" in text and "too few" in text
    # large n: the t approximation on n * 3/pi cases, (z_{1-a/2} + z_{0.8}) sd / sqrt(n_eff)
    d = rng.normal(0.0, 2.0, 400)
    want = (sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) * d.std(ddof=1) / math.sqrt(400 * 3 / math.pi)
    assert stats.min_detectable_difference(d, 0.05) == pytest.approx(want, rel=0.01)
    # and a simulated paired test at that difference has about 80% power
    hits = 0
    sims = np.random.default_rng(9)
    n = 30
    mdd = stats.min_detectable_difference(sims.normal(0, 1.0, n), 0.05)
    for _ in range(400):
        x = sims.normal(mdd, 1.0, n)
        hits += sps.wilcoxon(x).pvalue < 0.05
    assert 0.6 < hits / 400 < 0.95


def test_wilcoxon_identical_methods_and_missing_proposed():
    e = np.random.default_rng(0).gamma(2.0, 1.0, (10, 2))
    preds = {"multiscale_e2e_noise": make_table(e), "multiscale_e2e": make_table(e, seed=4)}
    res = stats.paired_wilcoxon(preds)
    assert res.loc[0, "p"] == 1.0 and not res.loc[0, "significant"]
    assert "zero" in res.loc[0, "note"]
    with pytest.raises(KeyError):
        stats.paired_wilcoxon({"multiscale_e2e": make_table(e)})


def test_duplicate_rows_are_rejected():
    df = make_table(np.ones((3, 2)))
    with pytest.raises(ValueError, match="duplicate"):
        stats.paired_errors(pd.concat([df, df.iloc[:1]]), df)


# --------------------------------------------------------------------------------------------
# AUROC and Wilson interval
# --------------------------------------------------------------------------------------------


def test_auroc():
    assert stats.auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert stats.auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert stats.auroc([1.0, 1.0, 1.0, 1.0], [0, 1, 0, 1]) == 0.5  # ties count one half
    assert math.isnan(stats.auroc([1.0, 2.0], [1, 1]))
    rng = np.random.default_rng(0)
    s, y = rng.normal(size=4000), rng.integers(0, 2, 4000)
    assert stats.auroc(s, y) == pytest.approx(0.5, abs=0.03)
    # equals the Mann-Whitney U statistic / (n1 n0), with ties
    s = rng.integers(0, 5, 300).astype(float)
    y = rng.integers(0, 2, 300)
    u = sps.mannwhitneyu(s[y == 1], s[y == 0]).statistic
    assert stats.auroc(s, y) == pytest.approx(u / ((y == 1).sum() * (y == 0).sum()))


def test_wilson_ci_formula():
    k, n, z = 45, 50, sps.norm.ppf(0.975)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = stats.wilson_ci(k, n)
    assert lo == pytest.approx(centre - half) and hi == pytest.approx(centre + half)
    assert all(math.isnan(v) for v in stats.wilson_ci(0, 0))


# --------------------------------------------------------------------------------------------
# Confidence volume versus error; calibration
# --------------------------------------------------------------------------------------------


def test_confidence_correlation_matches_scipy():
    df = gaussian_noisy_table(60, seed=2)
    df.loc[[3, 7], ["true_x", "true_y", "true_z", "error_mm"]] = np.nan
    c = stats.confidence_correlation(df)
    ok = df["error_mm"].notna()
    v, e = df.loc[ok, "conf_volume_mm3"], df.loc[ok, "error_mm"]
    assert c["n"] == ok.sum() == 118
    r = sps.pearsonr(v, e)
    assert c["pearson_r"] == pytest.approx(r.statistic) and c["pearson_p"] == pytest.approx(
        r.pvalue)
    assert c["pearson_r_logvol"] == pytest.approx(sps.pearsonr(np.log10(v), e).statistic)
    assert c["spearman_rho"] == pytest.approx(sps.spearmanr(v, e).statistic)
    assert c["pearson_r"] > 0.3  # error grows with the sds by construction
    one = stats.confidence_correlation(df, landmark="left_bifurcation")
    assert one["n"] == (ok & (df["landmark"] == "left_bifurcation")).sum()
    # volume recomputed from the sds when the column is absent
    c2 = stats.confidence_correlation(df.drop(columns="conf_volume_mm3"))
    assert c2["pearson_r"] == pytest.approx(c["pearson_r"])


def test_paper_p_value_implies_54_points():
    # the paper's r = 0.608, p = 1.08e-6 is reproduced by n = 54 (its test cases)
    r, n = stats.PAPER_PEARSON_R, 54
    t = r * math.sqrt((n - 2) / (1 - r * r))
    assert 2 * sps.t.sf(t, n - 2) == pytest.approx(stats.PAPER_PEARSON_P, rel=0.01)


def test_calibration_coverage_and_auroc():
    good = stats.calibration(gaussian_noisy_table(1500, seed=4))
    assert good["n"] == 3000
    assert good["coverage"] == pytest.approx(0.90, abs=0.02)
    assert good["coverage_ci_low"] < 0.90 < good["coverage_ci_high"]
    assert good["auroc"] > 0.7  # large sds go with large errors
    over = stats.calibration(gaussian_noisy_table(1500, sd_scale=0.6, seed=4))
    assert over["coverage"] < 0.7 and over["coverage_ci_high"] < 0.9
    # one class only: NaN with a note
    tiny = stats.calibration(gaussian_noisy_table(5, seed=1), error_threshold_mm=100.0)
    assert math.isnan(tiny["auroc"]) and "undefined" in tiny["auroc_note"]


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


def test_bootstrap_resamples_cases_and_is_seeded():
    rng = np.random.default_rng(5)
    per_case = rng.gamma(2.0, 1.5, 30)
    one = make_table(per_case[:, None], landmarks=["a"])
    two = make_table(np.repeat(per_case[:, None], 2, axis=1), landmarks=["a", "b"])
    b1 = stats.bootstrap_mean_ci({"m": one}, n_boot=500, seed=9)
    b2 = stats.bootstrap_mean_ci({"m": two}, n_boot=500, seed=9)
    # duplicating every landmark within its case adds no information: a case bootstrap
    # gives exactly the same interval (a landmark bootstrap would narrow it by ~1/sqrt(2))
    assert b2.loc[0, "n"] == 60 and b2.loc[0, "n_cases"] == 30
    assert b2.loc[0, "ci_low"] == pytest.approx(b1.loc[0, "ci_low"])
    assert b2.loc[0, "ci_high"] == pytest.approx(b1.loc[0, "ci_high"])
    assert b1.loc[0, "ci_low"] < per_case.mean() < b1.loc[0, "ci_high"]
    again = stats.bootstrap_mean_ci({"m": one}, n_boot=500, seed=9)
    pd.testing.assert_frame_equal(b1, again)
    # a method's interval does not depend on the other methods present
    both = stats.bootstrap_mean_ci({"m": one, "heatmap_unet": two}, n_boot=500, seed=9)
    assert both.set_index("method").loc["m", "ci_low"] == b1.loc[0, "ci_low"]


# --------------------------------------------------------------------------------------------
# Statistics table and summary
# --------------------------------------------------------------------------------------------


def test_statistics_table_and_summary(tmp_path):
    rng = np.random.default_rng(11)
    noisy = gaussian_noisy_table(25, seed=3)
    preds = {"multiscale_e2e_noise": noisy,
             "heatmap_unet": make_table(rng.gamma(2.0, 2.0, (25, 2)), seed=8)}
    preds["heatmap_unet"]["case_id"] = noisy["case_id"].to_numpy()
    st = stats.statistics_table(preds, n_boot=200)
    assert list(st.columns) == ["test", "comparison", "quantity", "value", "note"]
    assert set(st["test"]) == {"bootstrap_mean", "wilcoxon_holm", "confidence_vs_error",
                               "calibration", "calibration_conformal"}
    assert pd.api.types.is_float_dtype(st["value"])
    sel = st[(st["test"] == "wilcoxon_holm") & (st["quantity"] == "n_pairs")]
    assert sel["comparison"].tolist() == ["multiscale_e2e_noise vs heatmap_unet"]
    assert sel["value"].iloc[0] == 50
    n_cases = st[(st["test"] == "wilcoxon_holm") & (st["quantity"] == "n_cases")]
    assert n_cases["value"].iloc[0] == 25
    cm = st[(st["test"] == "confidence_vs_error")
            & (st["comparison"] == "multiscale_e2e_noise [case means]")]
    assert cm.set_index("quantity").loc["n", "value"] == 25
    comps = set(st.loc[st["test"] == "calibration", "comparison"])
    assert comps == {"multiscale_e2e_noise", "multiscale_e2e_noise [left_bifurcation]",
                     "multiscale_e2e_noise [right_bifurcation]"}
    path = stats.write_statistics(st, tmp_path / "statistics.csv")
    back = pd.read_csv(path, keep_default_na=False, na_values=[""])
    assert len(back) == len(st)
    text = stats.statistics_summary(st)
    for s in ("Wilcoxon", "Holm", "bootstrap", "Pearson", "coverage", "AUROC", "0.608"):
        assert s.lower() in text.lower()


def test_statistics_table_without_proposed_or_sds():
    e = np.random.default_rng(0).gamma(2.0, 1.0, (8, 2))
    st = stats.statistics_table({"heatmap_unet": make_table(e)}, n_boot=50)
    notes = st.loc[st["test"] != "bootstrap_mean", "note"]
    assert (notes.str.contains("not in this run")).all()
    st2 = stats.statistics_table({"multiscale_e2e_noise": make_table(e),
                                  "heatmap_unet": make_table(e * 2, seed=3)}, n_boot=50)
    ce = st2[st2["test"] == "confidence_vs_error"]
    assert len(ce) == 1 and "no confidence volume" in ce["note"].iloc[0]
    assert "Not computed" in stats.statistics_summary(st2)


def test_conformal_scale_restores_coverage_of_overconfident_sds():
    """Sds reported at half their true size: the raw 90% ellipsoids cover far less than 90%,
    the split-conformal scale fitted on validation landmarks is about 2 and brings the test
    coverage back to about 90% (Gaussian errors, known answer)."""
    val = gaussian_noisy_table(300, sd_scale=0.5, seed=1)
    val["subset"] = "val"
    test = gaussian_noisy_table(300, sd_scale=0.5, seed=2)
    pred = pd.concat([val, test], ignore_index=True)
    raw = stats.calibration(pred, "test", 0.90)["coverage"]
    assert raw < 0.6
    conf = stats.conformal_scale(pred, "val", 0.90)
    assert conf["n"] == 300 and conf["n_landmarks"] == 600 and conf["calibrated"]
    # the unit is the case (the larger score of its two landmarks): both landmarks of a case
    # inside at once at 90%, so the scale is that of a 95% ellipsoid per landmark, ~2 x 1.18
    assert conf["scale"] == pytest.approx(2.0 * math.sqrt(chi2.ppf(0.95, 3) / chi2.ppf(0.9, 3)),
                                          rel=0.1)
    cov = stats.calibrated_coverage(pred, conf["scale"], "test", 0.90)
    assert 0.92 < cov["coverage"] < 0.98  # per landmark: conservative
    assert cov["coverage_ci_low"] < cov["coverage"] < cov["coverage_ci_high"]
    # well-calibrated sds get a scale near that ratio; too few cases get none
    ok = gaussian_noisy_table(300, sd_scale=1.0, seed=3)
    ok["subset"] = "val"
    assert stats.conformal_scale(ok, "val", 0.90)["scale"] == pytest.approx(
        math.sqrt(chi2.ppf(0.95, 3) / chi2.ppf(0.9, 3)), rel=0.1)
    tiny = ok.head(4)
    assert np.isnan(stats.conformal_scale(tiny, "val", 0.90)["scale"])
    st = stats.statistics_table({"multiscale_e2e_noise": pred}, n_boot=50)
    sel = st[st["test"] == "calibration_conformal"].set_index("quantity")["value"]
    assert sel["scale"] == pytest.approx(conf["scale"]) and sel["coverage"] == cov["coverage"]
    assert "Calibrated ellipsoids" in stats.statistics_summary(st)


# --------------------------------------------------------------------------------------------
# Seeds: comparisons on per-case errors averaged over the seeds
# --------------------------------------------------------------------------------------------
def test_seeds_are_averaged_per_case_before_the_paired_test():
    from locnet.metrics import pool_seeds

    rng = np.random.default_rng(3)
    n = 12
    base = rng.uniform(2, 8, (n, 2))
    # the proposed method's two seeds scatter around base - 1; the other's around base
    prop = {s: make_table(base - 1 + rng.normal(0, 0.8, (n, 2)), seed=s) for s in (0, 1)}
    other = {s: make_table(base + rng.normal(0, 0.8, (n, 2)), seed=5 + s) for s in (0, 1)}
    preds = {"multiscale_e2e_noise": pool_seeds(prop), "locnet_single": pool_seeds(other)}
    table = stats.statistics_table(preds, n_boot=200, seed=1)
    got = table[(table["test"] == "wilcoxon_holm")].set_index("quantity")["value"]
    # the known answer: Wilcoxon on per-case means of the seed-averaged errors
    a = np.mean([prop[s]["error_mm"].to_numpy().reshape(n, 2) for s in (0, 1)], axis=0)
    b = np.mean([other[s]["error_mm"].to_numpy().reshape(n, 2) for s in (0, 1)], axis=0)
    want = sps.wilcoxon(a.mean(axis=1), b.mean(axis=1))
    assert got["n_cases"] == n and got["n_pairs"] == 2 * n  # not 2 seeds x 2 landmarks x n
    assert got["p"] == pytest.approx(want.pvalue)
    assert got["mean_diff_mm"] == pytest.approx((a.mean(axis=1) - b.mean(axis=1)).mean())
    note = table.loc[table["test"] == "wilcoxon_holm", "note"].iloc[0]
    assert "averaged over 2 training seeds" in note
    boot = table[(table["test"] == "bootstrap_mean")
                 & (table["comparison"] == "locnet_single")].set_index("quantity")["value"]
    assert boot["mean_mm"] == pytest.approx(b.mean()) and boot["n"] == 2 * n


def test_uncertainty_of_several_seeds_describes_the_deployed_model():
    from locnet.metrics import pool_seeds

    good = gaussian_noisy_table(40, sd_scale=1.0, seed=1)
    bad = gaussian_noisy_table(40, sd_scale=0.3, seed=2)  # seed 1: over-confident
    pred = pool_seeds({0: good, 1: bad})
    table = stats.statistics_table({"multiscale_e2e_noise": pred}, n_boot=50)
    cal = table[(table["test"] == "calibration") & (table["comparison"] == "multiscale_e2e_noise")]
    cov = cal.set_index("quantity")["value"]
    want = stats.calibration(good, "test")
    assert cov["coverage"] == pytest.approx(want["coverage"]) and cov["n"] == 80
    assert "deployed model (seed 0 of 2)" in cal["note"].iloc[0]


def _known_scores(case_scores, other=0.1, lms=("a", "b")):
    """Validation rows whose cases have known scores: sd 1 on every axis, the first landmark's
    error along x gives the case's score (scaled Mahalanobis radius), the others ``other``."""
    r90 = math.sqrt(chi2.ppf(0.9, 3))
    rows = []
    for i, score in enumerate(case_scores):
        for j, lm in enumerate(lms):
            e = (score if j == 0 else other) * r90
            rows.append(dict(case_id=f"v{i}", subset="val", landmark=lm, x=e, y=0.0, z=0.0,
                             true_x=0.0, true_y=0.0, true_z=0.0, error_mm=e, sd_x=1.0,
                             sd_y=1.0, sd_z=1.0, conf_volume_mm3=confidence_volume(np.ones(3))))
    return pd.DataFrame(rows)


def test_conformal_scale_calibrates_on_cases_with_known_answers():
    """Issue 24: 20 validation landmarks of one case gave a scale of 0.70 that shrank the
    ellipsoids, and test coverage fell from 82.5% to 52.5%. The exchangeable unit is the case."""
    # one case with 20 landmarks: no calibration, whatever its landmarks say
    one = _known_scores([0.7], lms=[f"l{j}" for j in range(20)])
    fit = stats.conformal_scale(one, "val", 0.9)
    assert not fit["calibrated"] and np.isnan(fit["scale"])
    assert (fit["n"], fit["n_landmarks"]) == (1, 20)
    assert fit["reason"].startswith("1 validation case(s) (20 landmarks): a conformal scale "
                                    "needs at least 10 cases")
    # nine cases: still too few (the minimum is 10)
    assert not stats.conformal_scale(_known_scores(np.arange(1, 10) / 10), "val")["calibrated"]
    # 19 cases with scores 0.1 ... 1.9: k = ceil(20 x 0.9) = 18, the scale is 1.8; the
    # second landmark's small score does not pull it down (case max, not pooled landmarks)
    scores = np.arange(1, 20) / 10
    fit = stats.conformal_scale(_known_scores(scores[::-1]), "val", 0.9)
    assert fit["calibrated"] and (fit["n"], fit["n_landmarks"], fit["rank"]) == (19, 38, 18)
    assert fit["scale"] == pytest.approx(1.8)
    pooled = np.sort(np.r_[scores, np.full(19, 0.1)])[math.ceil(39 * 0.9) - 1]
    assert pooled == pytest.approx(1.7)  # what a landmark-level calibration would say
    # its own uncertainty: coverage of new cases ~ Beta(18, 2)
    assert fit["coverage_expected"] == pytest.approx(18 / 20)
    assert (fit["coverage_low"], fit["coverage_high"]) == pytest.approx(
        tuple(beta.ppf([0.025, 0.975], 18, 2)))
    assert 0.7 < fit["coverage_low"] < 0.75 and 0.98 < fit["coverage_high"] < 0.99
    # exactly the minimum: 10 cases, k = 10, the largest score
    fit = stats.conformal_scale(_known_scores(np.arange(1, 11) / 10), "val", 0.9)
    assert fit["calibrated"] and fit["scale"] == pytest.approx(1.0)
    assert fit["coverage_low"] == pytest.approx(0.025 ** 0.1)  # Beta(10, 1)
    # the statistics table and its summary say the same
    st = stats.statistics_table({"multiscale_e2e_noise": pd.concat(
        [one, gaussian_noisy_table(12)], ignore_index=True)}, n_boot=20)
    sel = st[st["test"] == "calibration_conformal"].set_index("quantity")["value"]
    assert sel["calibrated"] == 0 and np.isnan(sel["scale"]) and sel["n_calibration"] == 1
    summary = stats.statistics_summary(st)
    assert "Not calibrated: the raw ellipsoids" in summary and "1 validation case(s)" in summary
