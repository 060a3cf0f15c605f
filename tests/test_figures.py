"""Tests of locnet.figures: every figure is written (PNG + PDF), sized and not blank."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from locnet import figures, metrics
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


# --------------------------------------------------------------------------------------------
# Labels from the config, and 20 landmarks
# --------------------------------------------------------------------------------------------

MANY = [f"landmark_number_{i:02d}" for i in range(20)]
DEFAULT_CFG = {"pyramid": {"finest_spacing_mm": 1.25, "levels": 4},
               "methods": {"heatmap_unet": {"level": 1}, "locnet_single": {"level": 1}}}


@pytest.fixture
def drawn(monkeypatch):
    """The Figure objects the figure functions save (drawn, so text extents are known)."""
    figs = []
    save = figures.save_figure

    def spy(fig, prefix):
        paths = save(fig, prefix)
        FigureCanvasAgg(fig).draw()  # the layout of the saved PNG, with a renderer to ask
        figs.append(fig)
        return paths

    monkeypatch.setattr(figures, "save_figure", spy)
    return figs


def _texts(fig):
    """Titles, axis labels, annotations, figure texts and legend entries of a figure."""
    texts = [fig._suptitle, *fig.texts]
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label,
                  *ax.texts]
    for leg in [*fig.legends, *(ax.get_legend() for ax in fig.axes)]:
        if leg is not None:
            texts += list(leg.get_texts())
    return [t for t in texts if t is not None and t.get_visible() and t.get_text().strip()]


def assert_text_inside(fig, tol_px=1.0):
    """Every title, axis label, legend entry and figure text lies within the figure."""
    renderer = fig.canvas.get_renderer()
    fb = fig.bbox
    texts = _texts(fig)
    assert texts
    for t in texts:
        bb = t.get_window_extent(renderer)
        assert bb.x0 >= fb.x0 - tol_px and bb.x1 <= fb.x1 + tol_px, \
            f"{t.get_text()!r} runs off the figure ({bb.x0:.0f}..{bb.x1:.0f} of {fb.x1:.0f})"
        assert bb.y0 >= fb.y0 - tol_px and bb.y1 <= fb.y1 + tol_px, \
            f"{t.get_text()!r} runs off the figure vertically"
    return texts


def test_landmark_colors_and_markers_tell_20_landmarks_apart():
    few = figures.landmark_colors(["a", "b"])
    assert few == {"a": "#0072B2", "b": "#D55E00"}  # Okabe-Ito for few
    cols = figures.landmark_colors(MANY)
    assert len(set(cols.values())) == 20
    assert set(figures.landmark_markers(MANY).values()) == {"o"}
    many = [f"l{i}" for i in range(45)]
    pairs = {(figures.landmark_colors(many)[m], figures.landmark_markers(many)[m]) for m in many}
    assert len(pairs) == 45


def test_confidence_vs_error_20_landmarks(tmp_path, drawn):
    preds = predictions(["multiscale_e2e_noise"], MANY, n_cases=6,
                        noisy=("multiscale_e2e_noise",))
    with metrics.labels_from_config(DEFAULT_CFG):
        paths = figures.confidence_vs_error(preds["multiscale_e2e_noise"], tmp_path / "fig5")
    img = assert_figure(paths, figures.COLUMN_WIDTH_IN)
    assert 2.8 * DPI < img.shape[0] < 6.0 * DPI  # grown for the legend, still a figure
    (fig,) = drawn
    (ax,) = fig.axes
    # the title is the configured label, within the figure
    assert "".join(ax._left_title.get_text().split()) == \
        "".join("Loc-Net multi-scale, end to end + noise (10-1.25 mm)".split())
    # one legend below the axes: 20 landmarks + the fit, 20 distinct colours, several columns
    (leg,) = fig.legends
    labels = [t.get_text() for t in leg.get_texts()]
    assert labels[:20] == [lm.replace("_", " ") for lm in MANY] and labels[20] == "log-log fit"
    colours = {tuple(np.round(h.get_facecolor()[0][:3], 3)) for h in leg.legend_handles[:20]}
    assert len(colours) == 20
    assert leg._ncols > 1
    renderer = fig.canvas.get_renderer()
    assert leg.get_window_extent(renderer).y1 <= ax.get_window_extent(renderer).y0
    assert_text_inside(fig)


def test_confidence_vs_error_two_landmarks_keeps_legend_inside(tmp_path, drawn):
    preds = predictions(["multiscale_e2e_noise"], ["left_bifurcation", "right_bifurcation"],
                        n_cases=10, noisy=("multiscale_e2e_noise",))
    figures.confidence_vs_error(preds["multiscale_e2e_noise"], tmp_path / "f")
    (fig,) = drawn
    assert not fig.legends and fig.axes[0].get_legend() is not None
    # no config: the bare name
    assert fig.axes[0]._left_title.get_text() == "Loc-Net multi-scale, end to end + noise"


def test_violin_by_landmark_20_landmarks(tmp_path, drawn):
    preds = predictions(["multiscale_e2e", "multiscale_e2e_noise"], MANY, n_cases=4)
    with metrics.labels_from_config(DEFAULT_CFG):
        paths = figures.violin_errors(preds, tmp_path / "v", by_landmark=True)
    assert_figure(paths, figures.PAGE_WIDTH_IN, 2.6)
    (fig,) = drawn
    leg = fig.axes[0].get_legend()
    assert len(leg.get_texts()) == 20 and 1 < leg._ncols < 20
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert "(10-1.25 mm)" in ticks[0].replace("\n", " ")
    assert_text_inside(fig)


def test_training_curves_titles_follow_config(tmp_path, drawn):
    hist = {"multiscale_e2e_noise": _history(10, 4), "heatmap_unet": _history(10, 0)}
    with metrics.labels_from_config({"pyramid": {"finest_spacing_mm": 0.5, "levels": 4}}):
        assert_figure(figures.training_curves(hist, tmp_path / "t"), figures.PAGE_WIDTH_IN)
    (fig,) = drawn
    titles = [" ".join(ax._left_title.get_text().split()) for ax in fig.axes]
    assert "U-Net heatmap (1 mm)" in titles
    assert "Loc-Net multi-scale, end to end + noise (4-0.5 mm)" in titles
    assert_text_inside(fig)


def test_heatmap_figure_titles_follow_config_and_fit(tmp_path, drawn):
    vol, truth, pred, lmap, heat = _case()
    with metrics.labels_from_config(DEFAULT_CFG):
        paths = figures.heatmap_figure(
            vol, 1.0, truth, pred, lmap, heat, tmp_path / "h",
            "a_very_long_landmark_name_" * 6 + "end", case_id="case_0007")
    assert_figure(paths, figures.PAGE_WIDTH_IN)
    (fig,) = drawn
    titles = [" ".join(ax.title.get_text().split()) for ax in fig.axes[:3]]
    assert titles == ["Image", "Loc-Net single scale (2.5 mm) map", "U-Net heatmap (2.5 mm)"]
    assert_text_inside(fig)


def test_inference_overlay_20_landmarks(tmp_path):
    from locnet import geometry, inference

    n = 32
    grid = geometry.Grid(origin=(-20.0, -20.0, -20.0), spacing=1.25, shape=n, levels=4)
    rng = np.random.default_rng(1)
    world = rng.uniform(-15, 15, (20, 3))
    res = inference.ScanResult(
        case_id="case_0500", image="x.nii.gz", landmarks=MANY, world=world, voxel=world,
        sd=np.full((20, 3), 1.5), conf_volume_mm3=np.full(20, 200.0),
        flags=["review"] * 12 + ["ok"] * 8, coverage=1.0, grid=grid,
        level0=rng.uniform(0, 1, (n, n, n)))
    fig = figures.overlay_figure(res)
    try:
        FigureCanvasAgg(fig).draw()
        colours = {ln.get_color() for ax in fig.axes[::3] for ln in ax.get_lines()}
        assert len(colours) == 20  # one colour per landmark
        head = fig._suptitle.get_text()
        assert "review: 12 of 20" in head and "ok: 8 of 20" in head
        assert "landmark_number_11" in head and "landmark_number_12" not in head
        assert_text_inside(fig)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    path = tmp_path / "case_0500_overlay.png"
    figures.write_overlay(res, path)
    img = mpimg.imread(path)
    assert img.shape[:2] == (round(2.6 * 20 * 72), round(7.5 * 72))


def test_figures_show_the_seeds(tmp_path, drawn):
    """Violins: one short bar per seed's mean, the diamond at the mean over seeds, landmarks
    x seeds in the tick label; training curves: every seed's validation error and a dot at
    each seed's kept epoch (the lowest val_score_mm, not the lowest single val_error_mm)."""
    base = predictions(["locnet_single"], ["a", "b"], n_cases=12)["locnet_single"]
    seeds = {s: base.assign(error_mm=base["error_mm"] + s) for s in range(3)}
    pooled = metrics.pool_seeds(seeds)
    assert_figure(figures.violin_errors({"locnet_single": pooled}, tmp_path / "v"))
    fig = drawn[-1]
    ax = fig.axes[0]
    bars = [c for c in ax.collections if c.get_label() == "seed mean"]
    assert len(bars) == 1
    np.testing.assert_allclose(sorted(bars[0].get_offsets()[:, 1]),
                               [seeds[s]["error_mm"].mean() for s in range(3)])
    assert "× 3 seeds" in ax.get_xticklabels()[0].get_text()
    diamond = [c for c in ax.collections if c.get_label() == "mean"][0]
    assert diamond.get_offsets()[0, 1] == pytest.approx(np.mean(
        [seeds[s]["error_mm"].mean() for s in range(3)]))

    runs = []
    for s in range(3):
        h = _history(10, 0).assign(seed=s)
        h["val_error_mm"] = [9, 8, 2, 8, 8, 5, 5, 5, 6, 7.0][: len(h)]
        h["val_score_mm"] = h["val_error_mm"].rolling(5, center=True, min_periods=1).mean()
        runs.append(h)
    hist = {"locnet_single": pd.concat(runs, ignore_index=True)}
    assert_figure(figures.training_curves(hist, tmp_path / "t"), figures.PAGE_WIDTH_IN)
    fig = drawn[-1]
    err_ax = [a for a in fig.axes if a.get_ylabel() == "Mean error (mm)"][0]
    labels = [ln.get_label() for ln in err_ax.get_lines()]
    assert {"validation, seed 0", "validation, seed 1", "validation, seed 2"} <= set(labels)
    kept = [ln for ln in err_ax.get_lines() if ln.get_label() == "_kept"]
    assert len(kept) == 3
    h = runs[0]
    want = h["epoch"].iloc[int(np.argmin(h["val_score_mm"].to_numpy()))]
    assert all(ln.get_xdata()[0] == want for ln in kept)
    assert want != h["epoch"].iloc[int(np.argmin(h["val_error_mm"].to_numpy()))]
