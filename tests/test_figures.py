"""Tests of locnet.figures: every figure is written (PNG + PDF), sized and not blank."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from locnet import figures
from locnet.metrics import confidence_volume

DPI = figures.DPI


def assert_figure(paths, width_in=None, height_in=None, min_std=0.02):
    png, pdf = paths
    assert png.suffix == ".png" and pdf.suffix == ".pdf"
    assert png.with_suffix("").name == pdf.with_suffix("").name
    img = mpimg.imread(png)
    assert img.ndim == 3
    if width_in is not None:
        assert img.shape[1] == round(width_in * DPI)
    if height_in is not None:
        assert img.shape[0] == round(height_in * DPI)
    gray = img[..., :3].mean(axis=-1)
    assert gray.std() > min_std, "figure looks blank"
    head = pdf.read_bytes()[:5]
    assert head == b"%PDF-" and pdf.stat().st_size > 1000
    leftovers = [p for p in png.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left: {leftovers}"
    return img


def predictions(methods, landmarks, n_cases=15, seed=0, noisy=()):
    rng = np.random.default_rng(seed)
    out = {}
    for k, m in enumerate(methods):
        rows = []
        for c in range(n_cases):
            for lm in landmarks:
                sd = rng.uniform(0.3, 2.5, 3)
                t = rng.normal(0, 30, 3)
                p = t + rng.normal(size=3) * sd * (1 + k)
                r = dict(case_id=f"case{c:03d}", subset="test", landmark=lm, x=p[0], y=p[1],
                         z=p[2], true_x=t[0], true_y=t[1], true_z=t[2],
                         error_mm=float(np.linalg.norm(p - t)))
                if m in noisy:
                    r.update(sd_x=sd[0], sd_y=sd[1], sd_z=sd[2],
                             conf_volume_mm3=confidence_volume(sd))
                rows.append(r)
        df = pd.DataFrame(rows)
        df.loc[[0, len(df) // 2], ["true_x", "true_y", "true_z", "error_mm"]] = np.nan
        out[m] = df
    return out


def test_violin_errors(tmp_path):
    preds = predictions(["multiscale_e2e_noise", "heatmap_unet", "locnet_single"],
                        ["left_bifurcation", "right_bifurcation"])
    paths = figures.violin_errors(preds, tmp_path / "figs" / "fig4_errors")
    assert [p.name for p in paths] == ["fig4_errors.png", "fig4_errors.pdf"]
    assert_figure(paths, figures.PAGE_WIDTH_IN, 2.6)


def test_violin_errors_by_landmark_three_landmarks_column_width(tmp_path):
    preds = predictions(["multiscale_e2e", "multiscale_e2e_noise"], ["a", "b", "c"])
    paths = figures.violin_errors(preds, tmp_path / "v", by_landmark=True,
                                  width_in=figures.COLUMN_WIDTH_IN, height_in=2.4, log_y=True)
    assert_figure(paths, figures.COLUMN_WIDTH_IN, 2.4)


def test_violin_errors_without_annotations(tmp_path):
    preds = predictions(["heatmap_unet"], ["a"], n_cases=3)
    preds["heatmap_unet"]["error_mm"] = np.nan
    assert_figure(figures.violin_errors(preds, tmp_path / "empty"), min_std=0.001)


def test_confidence_vs_error(tmp_path):
    preds = predictions(["multiscale_e2e_noise"], ["left_bifurcation", "right_bifurcation"],
                        n_cases=30, noisy=("multiscale_e2e_noise",))
    paths = figures.confidence_vs_error(preds["multiscale_e2e_noise"], tmp_path / "fig5")
    assert_figure(paths, figures.COLUMN_WIDTH_IN, 2.8)


def _history(n_epochs, levels, with_val=True, with_weights=True):
    ep = np.arange(1, n_epochs + 1)
    h = {"epoch": ep, "loss": 100.0 / ep}
    for lv in range(levels):
        h[f"loss_level{lv}"] = (40.0 - 5 * lv) / ep
        if with_val:
            h[f"val_loss_level{lv}"] = (45.0 - 5 * lv) / ep
        if with_weights:
            h[f"weight_level{lv}"] = np.clip((ep - 5 * lv) / 5.0, 0, 1)
    if with_val:
        h["val_loss"] = 120.0 / ep
        h["val_error_mm"] = 3 + 10.0 / ep
    return pd.DataFrame(h)


def test_training_curves_tolerates_missing_columns(tmp_path):
    hist = {
        "multiscale_e2e_noise": _history(30, 4),
        "locnet_single": _history(30, 0, with_weights=False).drop(columns="epoch"),
        "heatmap_unet": pd.DataFrame({"loss": np.linspace(5, 1, 20)}),  # loss only
        "patch_baseline": pd.DataFrame({"epoch": [1, 2, 3]}),           # nothing logged
    }
    paths = figures.training_curves(hist, tmp_path / "training")
    assert_figure(paths, figures.PAGE_WIDTH_IN)


def test_training_curves_empty(tmp_path):
    assert_figure(figures.training_curves({}, tmp_path / "none"), min_std=0.001)


def _case(shape=(40, 36, 24)):
    g = np.indices(shape).transpose(1, 2, 3, 0).astype(float)
    truth = np.array([14.0, 20.0, 12.0])
    pred = truth + [1.5, -1.0, 0.5]
    rng = np.random.default_rng(0)
    vol = rng.normal(0, 0.2, shape) + np.exp(-((g - truth) ** 2).sum(-1) / 20.0)
    half = tuple(s // 2 for s in shape)
    gh = np.indices(half).transpose(1, 2, 3, 0).astype(float)
    locnet_map = np.maximum(0, rng.normal(0, 1, half)) * np.exp(
        -((gh - truth / 2) ** 2).sum(-1) / 30.0)
    heat = np.exp(-((g - pred) ** 2).sum(-1) / 4.0)
    return vol, truth, pred, locnet_map, heat


def test_heatmap_figure_with_affine_and_coarser_map(tmp_path):
    vol, truth, pred, lmap, heat = _case()
    aff = np.diag([0.8, 0.8, 2.0, 1.0])
    aff[:3, 3] = [-10.0, -20.0, -30.0]
    paths = figures.heatmap_figure(vol, aff, truth, pred, lmap, heat, tmp_path / "fig3",
                                   "left_bifurcation", case_id="case007")
    img = assert_figure(paths, figures.PAGE_WIDTH_IN)
    # anisotropic spacing: the sagittal row (z extent 48 mm vs y 28.8 mm) is taller than wide
    assert img.shape[0] > img.shape[1] * 0.8


def test_heatmap_figure_spacing_only_one_map_and_crop(tmp_path):
    vol, truth, pred, lmap, _ = _case()
    paths = figures.heatmap_figure(vol[..., None], (1.0, 1.0, 1.5), truth, pred, lmap, None,
                                   tmp_path / "fig3b", "lm", crop_mm=8.0,
                                   width_in=figures.COLUMN_WIDTH_IN)
    assert_figure(paths, figures.COLUMN_WIDTH_IN)


def test_heatmap_figure_missing_truth_and_bad_affine(tmp_path):
    vol, truth, pred, lmap, heat = _case()
    paths = figures.heatmap_figure(vol, 1.0, [np.nan] * 3, pred, None, heat, tmp_path / "f",
                                   "lm")
    assert_figure(paths)
    rot = np.eye(4)
    rot[0, 1] = 0.5
    with pytest.raises(ValueError, match="axis-aligned"):
        figures.heatmap_figure(vol, rot, truth, pred, lmap, heat, tmp_path / "g", "lm")
