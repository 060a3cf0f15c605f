"""The whole study on config/tiny.yaml through Snakemake, and the content of what it writes.

One session-scoped run (about 2 minutes on 2 cores, `tiny_study` in conftest.py) in a temporary working directory; the
tests then read its outputs. Dry runs check the paper config plans and bad configs stop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import locnet.metrics

from conftest import run_snakemake

ROOT = Path(__file__).resolve().parents[1]
METHODS = list(locnet.metrics.METHODS)  # Table 1's order


def test_cohort_tables(tiny_study):
    raw = pd.read_csv(tiny_study / "synthetic" / "landmarks.csv")
    lm = pd.read_csv(tiny_study / "data" / "landmarks.csv")
    assert len(lm) == 8 * 2 and set(lm["landmark"]) == {"left_bifurcation", "right_bifurcation"}
    merged = raw.merge(lm, on=["case_id", "landmark"], suffixes=("_raw", ""))
    # the synthetic table is RAS: ingest must carry it through unchanged
    for c in "xyz":
        np.testing.assert_allclose(merged[c], merged[f"{c}_raw"], atol=1e-6)
    split = pd.read_csv(tiny_study / "data" / "split.csv")
    assert split["subset"].value_counts().to_dict() == {"train": 5, "test": 2, "val": 1}


def test_pyramid_levels_and_affines(tiny_study):
    import nibabel as nib

    for level, n in enumerate([32, 16, 8, 4]):
        img = nib.load(tiny_study / "pyramid" / "case_0000" / f"level{level}.nii")
        assert img.shape == (n, n, n)
        assert img.get_data_dtype() == np.float32
        s = 5.0 * 2**level
        # stored [k, j, i] (locnet.pyramid); reoriented to RAS the axes are the grid's
        canonical = nib.as_closest_canonical(img)
        np.testing.assert_allclose(canonical.affine[:3, :3], np.diag([s, s, s]), atol=1e-5)
        data = np.asarray(img.dataobj)
        assert 0.0 <= data.min() and data.max() <= 1.0


def test_every_model_loads_and_predicts(tiny_study):
    import keras

    import locnet.models  # noqa: F401
    from locnet import data

    case = tiny_study / "pyramid" / "case_0000"
    for method in METHODS:
        model = keras.saving.load_model(tiny_study / "models" / method / "model.keras")
        out = model(data.load_case_inputs(case, data.model_levels(model)), training=False)
        pos = np.asarray(keras.ops.convert_to_numpy(out["position"]))
        assert pos.shape == (1, 2, 3) and np.isfinite(pos).all(), method
        hist = pd.read_csv(tiny_study / "models" / method / "history.csv")
        assert list(hist["epoch"]) == [0, 1, 2], method  # row 0: untrained model
        assert hist["val_error_mm"].notna().all(), method


def test_predictions_are_world_coordinates_with_errors(tiny_study):
    split = pd.read_csv(tiny_study / "data" / "split.csv")
    want = set(split.loc[split["subset"].isin(["val", "test"]), "case_id"])
    for method in METHODS:
        df = pd.read_csv(tiny_study / "predictions" / f"{method}.csv")
        assert set(df["case_id"]) == want and len(df) == 2 * len(want)
        err = np.linalg.norm(
            df[["x", "y", "z"]].to_numpy() - df[["true_x", "true_y", "true_z"]].to_numpy(), axis=1
        )
        np.testing.assert_allclose(df["error_mm"], err, rtol=1e-6)
        # predictions lie in the scanner frame of the truth, not in voxel or grid units
        assert np.all(np.abs(df[["x", "y", "z"]].to_numpy() - df[["true_x", "true_y", "true_z"]].to_numpy()) < 160)
    noisy = pd.read_csv(tiny_study / "predictions" / "multiscale_e2e_noise.csv")
    sd = noisy[["sd_x", "sd_y", "sd_z"]].to_numpy()
    assert (sd > 0).all()
    np.testing.assert_allclose(noisy["conf_volume_mm3"], 65.5 * sd.prod(axis=1), rtol=2e-3)


def test_table1_matches_predictions(tiny_study):
    t = pd.read_csv(tiny_study / "tables" / "table1.csv")
    pooled = t[t["scope"] == "all"]
    assert list(pooled["method"]) == METHODS  # the paper's order
    for method in METHODS:
        df = pd.read_csv(tiny_study / "predictions" / f"{method}.csv")
        e = df.loc[df["subset"] == "test", "error_mm"]
        row = pooled[pooled["method"] == method].iloc[0]
        assert row["mean_mm"] == pytest.approx(e.mean())
        assert row["sd_mm"] == pytest.approx(e.std(ddof=1))
        assert row["n"] == e.notna().sum()
    assert (pooled["paper_mean_sd"].iloc[-1]) == "2.81 ± 2.37"
    assert "\\begin{tabular}" in (tiny_study / "tables" / "table1.tex").read_text()


def test_statistics(tiny_study):
    s = pd.read_csv(tiny_study / "tables" / "statistics.csv")
    wil = s[(s["test"] == "wilcoxon_holm") & (s["quantity"] == "p_holm")]
    assert len(wil) == 5  # proposed method against each other method
    assert ((wil["value"] >= 0) & (wil["value"] <= 1)).all()
    tests = set(s["test"])
    assert {"bootstrap_mean", "wilcoxon_holm", "confidence_vs_error", "calibration"} <= tests
    assert "Statistics" in (tiny_study / "tables" / "statistics.md").read_text()


@pytest.mark.parametrize(
    "name",
    ["fig3_heatmaps", "fig4_violin_errors", "fig5_confidence_vs_error", "training_curves"],
)
def test_figures_are_drawn(tiny_study, name):
    import matplotlib.image as mpimg

    png = tiny_study / "figures" / f"{name}.png"
    img = mpimg.imread(png)
    h, w = img.shape[:2]
    assert w >= 600 and h >= 300, (name, img.shape)
    assert img[..., :3].std() > 0.05, f"{name} looks blank"
    pdf = tiny_study / "figures" / f"{name}.pdf"
    assert pdf.read_bytes()[:5] == b"%PDF-"


def test_rerun_has_nothing_to_do(tiny_study):
    run = run_snakemake(tiny_study.parent, "-n", "--cores", "2", "--configfile",
                    str(ROOT / "config" / "tiny.yaml"), "--config", "results=results")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Nothing to be done" in run.stdout + run.stderr


def test_quality_threshold_and_a_change_of_estimator(tiny_study, tmp_path):
    import json

    from locnet import quality

    q = json.loads((tiny_study / "models" / "multiscale_e2e_noise" / "quality.json").read_text())
    preds = pd.read_csv(tiny_study / "predictions" / "multiscale_e2e_noise.csv")
    assert q["estimator"] == "exact"  # the config's, for inference to use the same
    assert q["threshold_mm3"] == pytest.approx(quality.choose_threshold(preds)["threshold_mm3"])
    # another estimator re-runs the noisy method's predictions and what depends on them only
    overlay = tmp_path / "window.yaml"
    overlay.write_text("evaluation:\n  estimator: window\n")
    run = run_snakemake(tiny_study.parent, "-n", "--cores", "2", "--configfile",
                        str(ROOT / "config" / "tiny.yaml"), str(overlay), "--config",
                        "results=results")
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    counts = {l.split()[0]: int(l.split()[1]) for l in out.splitlines()
              if len(l.split()) == 2 and l.split()[1].isdigit()}
    assert counts.get("predict") == 1 and counts.get("quality_threshold") == 1, out[-3000:]
    assert "train" not in counts and "pyramid" not in counts


def test_paper_config_plans(tmp_path):
    run = run_snakemake(tmp_path, "-n", "--quiet", "rules", "--cores", "8", "--resources", "gpu=1",
                    "--configfile", str(ROOT / "config" / "paper.yaml"), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    for rule, count in [("pyramid", 263), ("train", 6), ("predict", 6), ("synthetic_case", 263)]:
        line = next(l for l in out.splitlines() if l.split()[:1] == [rule])
        assert int(line.split()[1]) == count, line


def test_bad_config_key_is_named(tmp_path):
    run = run_snakemake(tmp_path, "-n", "--cores", "1", "--configfile",
                    str(ROOT / "config" / "tiny.yaml"), "--config", "pyramid={'finest_shap': 3}")
    assert run.returncode != 0
    assert "pyramid.finest_shap" in run.stdout + run.stderr


def test_html_report_gathers_figures_and_tables(tiny_study):
    report = tiny_study / "report.html"
    run = run_snakemake(tiny_study.parent, "--report", str(report), "--configfile",
                    str(ROOT / "config" / "tiny.yaml"), "--config", "results=results")
    assert run.returncode == 0, run.stderr[-3000:]
    html = report.read_text(errors="replace")
    for name in ["fig3_heatmaps.png", "fig4_violin_errors.png", "fig5_confidence_vs_error.png",
                 "training_curves.png", "table1.csv", "statistics.csv"]:
        assert name in html, name
    assert "paper Fig. 4" in html  # a caption from workflow/report/
