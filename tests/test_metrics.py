"""Tests of locnet.metrics: confidence volumes, ellipsoids, error summaries, Table 1.

Conventions under test: sd with ddof = 1, numpy's linear percentile, success = error <= t
among annotated landmarks, failure = error > 10 mm, missing landmarks (NaN) excluded.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from locnet import metrics
from locnet.methods import KEYS as METHODS
from locnet.metrics import (
    confidence_volume,
    error_summary,
    format_mean_sd,
    inside_ellipsoid,
    table1,
    write_table1,
)


def make_predictions(method_scales, landmarks, n_cases=20, seed=0, n_missing=3, n_val=4):
    """Synthetic prediction tables: test + val rows, a few unannotated landmarks per method."""
    rng = np.random.default_rng(seed)
    out = {}
    for method, scale in method_scales.items():
        rows = []
        for subset, n in (("test", n_cases), ("val", n_val)):
            for c in range(n):
                for lm in landmarks:
                    t = rng.normal(0.0, 30.0, 3)
                    p = t + rng.normal(0.0, scale, 3)
                    rows.append(dict(case_id=f"{subset}{c:03d}", subset=subset, landmark=lm,
                                     x=p[0], y=p[1], z=p[2], true_x=t[0], true_y=t[1],
                                     true_z=t[2], error_mm=float(np.linalg.norm(p - t))))
        df = pd.DataFrame(rows)
        test_idx = np.flatnonzero(df["subset"] == "test")
        miss = rng.choice(test_idx, n_missing, replace=False)
        df.loc[miss, ["true_x", "true_y", "true_z", "error_mm"]] = np.nan
        out[method] = df
    return out


# --------------------------------------------------------------------------------------------
# Confidence volume and ellipsoid
# --------------------------------------------------------------------------------------------


def test_confidence_volume_constant():
    const = confidence_volume([1.0, 1.0, 1.0])
    assert const == pytest.approx(65.47, abs=0.01)
    assert const == pytest.approx(4 / 3 * math.pi * sps.chi2.ppf(0.9, 3) ** 1.5)
    assert confidence_volume([1.0, 2.0, 3.0]) == pytest.approx(6 * const)
    v = confidence_volume(np.array([[1.0, 1.0, 1.0], [0.5, 2.0, 4.0], [0.0, 1.0, 1.0]]))
    np.testing.assert_allclose(v, [const, 4 * const, 0.0])
    # a wider level gives a larger volume
    assert confidence_volume([1, 1, 1], level=0.95) > const


def test_confidence_volume_rejects_bad_input():
    with pytest.raises(ValueError):
        confidence_volume([1.0, 2.0])
    with pytest.raises(ValueError):
        confidence_volume([1.0, -1.0, 1.0])
    with pytest.raises(ValueError):
        confidence_volume([1.0, 1.0, 1.0], level=1.5)


def _simulate(n, sd_true, seed):
    rng = np.random.default_rng(seed)
    truth = rng.normal(0.0, 20.0, (n, 3))
    pred = truth + rng.normal(size=(n, 3)) * sd_true
    return pred, truth


def test_inside_ellipsoid_coverage_matches_level():
    rng = np.random.default_rng(1)
    n = 20000
    sd = rng.uniform(0.5, 4.0, (n, 3))  # anisotropic, different per point
    pred, truth = _simulate(n, sd, seed=2)
    cov90 = inside_ellipsoid(pred, truth, sd, 0.90).mean()
    assert cov90 == pytest.approx(0.90, abs=0.01)
    assert inside_ellipsoid(pred, truth, sd, 0.50).mean() == pytest.approx(0.50, abs=0.015)
    # overconfident sds (70% of the truth) cover much less: P(chi2_3 <= 0.49 * 6.25) ~ 0.62
    under = inside_ellipsoid(pred, truth, 0.7 * sd, 0.90).mean()
    assert under < cov90 - 0.2
    assert under == pytest.approx(sps.chi2.cdf(0.49 * sps.chi2.ppf(0.9, 3), 3), abs=0.015)


def test_inside_ellipsoid_edge_cases():
    r = math.sqrt(sps.chi2.ppf(0.9, 3))
    pred = np.zeros((4, 3))
    truth = np.array([[0.99 * r, 0, 0], [1.01 * r, 0, 0], [np.nan, 0, 0], [0, 0, 0]])
    sd = np.array([[1.0, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(inside_ellipsoid(pred, truth, sd), [True, False, False, True])
    # sd = 0 on an axis with a non-zero difference: outside
    assert not inside_ellipsoid([0, 0, 0], [0.1, 0, 0], [0, 1, 1])
    # single point gives a 0-d result
    assert inside_ellipsoid([0, 0, 0], [1, 1, 1], [2, 2, 2]).shape == ()


# --------------------------------------------------------------------------------------------
# Error summary
# --------------------------------------------------------------------------------------------


def test_error_summary_hand_computed():
    e = [1.0, 2.0, 2.5, 3.0, 5.0, 12.0, np.nan]
    s = error_summary(e)
    vals = np.array([1.0, 2.0, 2.5, 3.0, 5.0, 12.0])
    assert s["n"] == 6 and s["n_missing"] == 1
    assert s["mean"] == pytest.approx(25.5 / 6)
    sd = math.sqrt(((vals - 25.5 / 6) ** 2).sum() / 5)  # ddof = 1
    assert s["sd"] == pytest.approx(sd)
    assert s["median"] == pytest.approx(2.75)
    assert s["p90"] == pytest.approx(8.5)  # linear: 5 + 0.5 * (12 - 5)
    assert s["max"] == 12.0
    # thresholds are inclusive
    assert s["success_2mm"] == pytest.approx(2 / 6)
    assert s["success_2.5mm"] == pytest.approx(3 / 6)
    assert s["success_3mm"] == pytest.approx(4 / 6)
    assert s["success_4mm"] == pytest.approx(4 / 6)
    assert s["failures_10mm"] == 1
    assert s["failure_rate_10mm"] == pytest.approx(1 / 6)


def test_error_summary_degenerate():
    s = error_summary([np.nan, np.nan])
    assert s["n"] == 0 and s["n_missing"] == 2
    assert np.isnan(s["mean"]) and np.isnan(s["success_2mm"])
    assert s["failures_10mm"] == 0
    s1 = error_summary([3.0])
    assert s1["mean"] == 3.0 and np.isnan(s1["sd"])


def test_format_mean_sd():
    assert format_mean_sd(2.8111, 2.3749) == "2.81 ± 2.37"
    assert format_mean_sd(np.nan, np.nan) == "n/a"
    assert format_mean_sd(3.0, np.nan) == "3.00"


def test_errors_computed_from_coordinates_when_column_absent():
    df = pd.DataFrame(dict(x=[0.0, 1.0], y=[0.0, 0.0], z=[0.0, 0.0], true_x=[3.0, np.nan],
                           true_y=[4.0, 0.0], true_z=[0.0, 0.0]))
    e = metrics.errors_of(df)
    assert e.iloc[0] == pytest.approx(5.0) and np.isnan(e.iloc[1])


def test_method_order_and_labels():
    got = metrics.method_order(["zzz_new", "multiscale_e2e_noise", "heatmap_unet", "aaa_new"])
    assert got == ["heatmap_unet", "multiscale_e2e_noise", "aaa_new", "zzz_new"]
    # without a config: the bare name, no spacing (there is no level to read it from)
    assert metrics.method_label("patch_baseline") == "Patch-based CNN, Noothout 2018"
    assert metrics.method_label("heatmap_unet") == "U-Net heatmap"
    assert metrics.method_label("zzz_new") == "zzz_new"
    assert list(METHODS) == ["heatmap_unet", "locnet_single", "patch_baseline",
                             "multiscale_multistep", "multiscale_e2e", "multiscale_e2e_noise"]
    colours = {metrics.method_color(m) for m in METHODS}
    assert len(colours) == len(METHODS)


def _cfg(finest, levels=4, **method_levels):
    return {"pyramid": {"finest_spacing_mm": finest, "levels": levels},
            "methods": {m: {"level": lv} for m, lv in method_levels.items()}}


@pytest.mark.parametrize("finest, level, want", [(1.25, 1, "2.5 mm"), (0.5, 1, "1 mm"),
                                                 (1.25, 0, "1.25 mm"), (5.0, 2, "20 mm")])
def test_single_level_labels_give_the_spacing_of_their_level(finest, level, want):
    cfg = _cfg(finest, heatmap_unet=level, locnet_single=level, patch_baseline=level)
    assert metrics.method_label("heatmap_unet", cfg) == f"U-Net heatmap ({want})"
    assert metrics.method_label("locnet_single", cfg) == f"Loc-Net single scale ({want})"
    assert metrics.method_label("patch_baseline", cfg) == \
        f"Patch-based CNN, Noothout 2018 ({want})"


def test_multiscale_labels_span_every_level_coarsest_first():
    assert metrics.method_label("multiscale_e2e_noise", _cfg(1.25, 4)) == \
        "Loc-Net multi-scale, end to end + noise (10-1.25 mm)"
    assert metrics.method_label("multiscale_multistep", _cfg(0.5, 4)) == \
        "Loc-Net multi-scale, multi-step (4-0.5 mm)"
    assert metrics.method_label("multiscale_e2e", _cfg(2.0, 2)) == \
        "Loc-Net multi-scale, end to end (4-2 mm)"
    assert metrics.method_levels("multiscale_e2e", _cfg(1.25, 3)) == \
        [(2, 5.0), (1, 2.5), (0, 1.25)]
    assert metrics.method_levels("zzz_new", _cfg(1.25)) == []
    assert metrics.method_label("zzz_new", _cfg(1.25)) == "zzz_new"


def test_labels_of_the_shipped_configs_and_schema_defaults():
    from locnet import config as cfgmod

    default = cfgmod.load("config.yaml")
    assert metrics.method_labels(METHODS, default) == {
        "heatmap_unet": "U-Net heatmap (2.5 mm)",
        "locnet_single": "Loc-Net single scale (2.5 mm)",
        "patch_baseline": "Patch-based CNN, Noothout 2018 (1.25 mm)",  # its own level 0
        "multiscale_multistep": "Loc-Net multi-scale, multi-step (5-1.25 mm)",
        "multiscale_e2e": "Loc-Net multi-scale, end to end (5-1.25 mm)",
        "multiscale_e2e_noise": "Loc-Net multi-scale, end to end + noise (5-1.25 mm)",
    }
    # the paper's own settings give the paper's spacings (its Table 1 says "1 mm")
    paper = cfgmod.load("config/paper.yaml")
    assert metrics.method_label("heatmap_unet", paper) == "U-Net heatmap (1 mm)"
    assert metrics.method_label("multiscale_e2e_noise", paper).endswith("(4-0.5 mm)")
    assert metrics.method_label("patch_baseline", paper).endswith("(1 mm)")
    # a partial config takes the schema's defaults (4 levels of 1.25 mm and up)
    assert metrics.method_labels(METHODS, {}) == metrics.method_labels(METHODS, cfgmod.validate({}))
    assert metrics.method_label("multiscale_e2e", {}).endswith("(10-1.25 mm)")


def test_labels_from_config_context():
    assert metrics.method_label("locnet_single") == "Loc-Net single scale"
    with metrics.labels_from_config(_cfg(0.5, locnet_single=2)):
        assert metrics.method_label("locnet_single") == "Loc-Net single scale (2 mm)"
        # an explicit config wins over the context
        assert metrics.method_label("locnet_single", _cfg(1.0, locnet_single=0)) == \
            "Loc-Net single scale (1 mm)"
    assert metrics.method_label("locnet_single") == "Loc-Net single scale"


# --------------------------------------------------------------------------------------------
# Table 1
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("landmarks", [["left_bifurcation", "right_bifurcation"],
                                       ["lm_a", "lm_b", "lm_c"]])
def test_table1_values_order_and_missing(landmarks):
    # dict given in the wrong order, with a method the paper does not have
    preds = make_predictions({"my_method": 2.0, "multiscale_e2e_noise": 1.0,
                              "heatmap_unet": 3.0}, landmarks)
    t = table1(preds, subset="test")
    methods = ["heatmap_unet", "multiscale_e2e_noise", "my_method"]
    assert list(t["scope"]) == [s for s in ["all", *landmarks] for _ in methods]
    assert list(t["method"]) == methods * (1 + len(landmarks))
    assert list(t["label"][:3]) == ["U-Net heatmap", "Loc-Net multi-scale, end to end + noise",
                                    "my_method"]
    with_cfg = table1(preds, subset="test", config=_cfg(1.25, 4, heatmap_unet=1))
    assert list(with_cfg["label"][:3]) == [
        "U-Net heatmap (2.5 mm)", "Loc-Net multi-scale, end to end + noise (10-1.25 mm)",
        "my_method"]
    for _, row in t.iterrows():
        df = preds[row["method"]]
        df = df[df["subset"] == "test"]
        if row["scope"] != "all":
            df = df[df["landmark"] == row["scope"]]
        e = df["error_mm"].to_numpy()
        ok = e[~np.isnan(e)]
        assert row["n"] == ok.size
        assert row["n_missing"] == np.isnan(e).sum()
        assert row["mean_mm"] == pytest.approx(ok.mean())
        assert row["sd_mm"] == pytest.approx(ok.std(ddof=1))
        assert row["median_mm"] == pytest.approx(np.median(ok))
        assert row["max_mm"] == pytest.approx(ok.max())
        assert row["success_2mm"] == pytest.approx((ok <= 2).sum() / ok.size)
        assert row["success_4mm"] == pytest.approx((ok <= 4).sum() / ok.size)
        assert row["mean_sd"] == f"{ok.mean():.2f} ± {ok.std(ddof=1):.2f}"
    pooled = t[t["scope"] == "all"].set_index("method")
    assert pooled.loc["heatmap_unet", "n"] == 20 * len(landmarks) - 3  # val rows excluded
    assert pooled.loc["heatmap_unet", "n_missing"] == 3
    assert pooled.loc["heatmap_unet", "paper_mean_sd"] == "6.45 ± 9.18"
    assert pooled.loc["multiscale_e2e_noise", "paper_mean_sd"] == "2.81 ± 2.37"
    assert pooled.loc["my_method", "paper_mean_sd"] == ""
    assert (t.loc[t["scope"] != "all", "paper_mean_sd"] == "").all()


def test_table1_subset_none_uses_all_rows():
    preds = make_predictions({"heatmap_unet": 3.0}, ["a", "b"], n_cases=5, n_val=2)
    t = table1(preds, subset=None)
    assert t.loc[0, "n"] + t.loc[0, "n_missing"] == (5 + 2) * 2
    assert t.loc[0, "n_cases"] == 7


def test_write_table1(tmp_path):
    preds = make_predictions({"multiscale_e2e": 2.0, "multiscale_e2e_noise": 1.0},
                             ["left_bifurcation", "right_bifurcation"])
    t = table1(preds, config=_cfg(1.25, 4))
    paths = write_table1(t, tmp_path / "tables" / "table1")
    assert {p.name for p in paths.values()} == {"table1.csv", "table1.md", "table1.tex"}
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == \
        ["table1.csv", "table1.md", "table1.tex"]  # no temporary files left
    back = pd.read_csv(paths["csv"], keep_default_na=False)
    assert list(back["method"]) == list(t["method"])
    np.testing.assert_allclose(back["mean_mm"].astype(float), t["mean_mm"])
    md = paths["md"].read_text(encoding="utf-8")
    assert md.index("All landmarks (pooled)") < md.index("Landmark: left_bifurcation") \
        < md.index("Landmark: right_bifurcation")
    assert "| Loc-Net multi-scale, end to end + noise (10-1.25 mm) |" in md
    assert "2.81 ± 2.37" in md
    # the paper's column says whose numbers they are, in the header and in the note
    assert "| Paper (neck CTA, 448³ at 0.5 mm), mm |" in md
    assert "not this run's data" in md
    assert list(back["label"]) == list(t["label"])
    assert back["label"].str.contains(r"\(10-1\.25 mm\)").all()
    tex = paths["tex"].read_text(encoding="utf-8")
    assert tex.count(r"\toprule") == 1 and tex.count(r"\bottomrule") == 1
    assert r"left\_bifurcation" in tex and r"2.81 $\pm$ 2.37" in tex
    assert r"Paper (neck CTA, 448$^3$ at 0.5 mm), mm" in tex and "³" not in tex
    assert r"\begin{tabular}" in tex and r"\end{tabular}" in tex
    # every data line has as many cells as the header
    lines = [ln for ln in tex.splitlines() if ln.endswith(r"\\") and "multicolumn" not in ln]
    assert len({ln.count(" & ") for ln in lines}) == 1


def test_statistics_summary_labels_follow_config():
    from locnet import stats

    preds = make_predictions({"heatmap_unet": 3.0, "multiscale_e2e_noise": 1.0}, ["a", "b"],
                             n_cases=8)
    with metrics.labels_from_config({"pyramid": {"finest_spacing_mm": 0.5, "levels": 4}}):
        table = stats.statistics_table(preds, n_boot=20, seed=1)
        summary = stats.statistics_summary(table)
    assert "U-Net heatmap (1 mm)" in summary
    assert "Loc-Net multi-scale, end to end + noise (4-0.5 mm)" in summary
    # outside the block: the bare names again
    assert "U-Net heatmap (1 mm)" not in stats.statistics_summary(table)


def test_table1_over_seeds_known_answer():
    def table(errors):
        return pd.DataFrame({"case_id": ["c0", "c0", "c1", "c1"], "subset": "test",
                             "landmark": ["a", "b", "a", "b"], "error_mm": errors})

    pooled = metrics.pool_seeds({0: table([1.0, 3.0, 5.0, 7.0]), 1: table([2.0, 2.0, 2.0, 2.0]),
                           2: table([3.0, 3.0, 3.0, np.nan])})
    assert list(pooled.columns[:2]) == ["seed", "case_id"] and len(pooled) == 12
    t = metrics.table1({"locnet_single": pooled}, subset="test")
    row = t[t["scope"] == "all"].iloc[0]
    assert row["n_seeds"] == 3 and row["seed_means_mm"] == "4.00, 2.00, 3.00"
    assert row["mean_mm"] == pytest.approx(3.0)
    assert row["seed_sd_mm"] == pytest.approx(1.0)
    assert row["sd_mm"] == pytest.approx(np.mean([np.std([1, 3, 5, 7], ddof=1), 0.0, 0.0]))
    assert row["n"] == 4  # per seed (the first seed's count)
    md = metrics.table1_markdown(t)
    assert "Between-seed sd" in md and "| 4.00, 2.00, 3.00 |" in md
    # the seeds of a comparison must predict the same rows
    with pytest.raises(ValueError, match="seed 1 predicts other"):
        metrics.pool_seeds({0: table([1.0] * 4), 1: table([1.0] * 4).iloc[:3]})
    # averaged over seeds: one row per (case, landmark); NaN where any seed is missing
    avg = metrics.seed_mean_errors(pooled)
    assert len(avg) == 4 and avg["n_seeds"].iloc[0] == 3
    np.testing.assert_allclose(avg["error_mm"], [2.0, 8 / 3, 10 / 3, np.nan])
