"""Unit tests of locnet.models on tiny volumes (a few seconds each on a CPU)."""

import keras
import numpy as np
import pytest
from keras import ops

from locnet.geometry import Grid, grid_mm_to_voxel, voxel_to_grid_mm
from locnet.layers import decode_heatmap
from locnet.methods import KEYS as METHODS
from locnet.models import (
    LocNet,
    MultiScaleLocNet,
    build_model,
    build_unet,
    predict_passes,
    sample_shifts,
)

# finest 16^3 at 5 mm, 3 levels (16, 8, 4 voxels), 4^3 patches, a 2-level U-Net
TINY_GRID = {"finest_shape": 16, "finest_spacing_mm": 5.0, "levels": 3}
TINY_CFG = {
    "landmarks": ["left", "right"],
    "level": 1,
    "patch": 4,
    "unet": {"filters": [4, 8]},
    "heatmap_sigma_mm": 12.0,
    "noise_mm": 5.0,
    "seed": 1,
}


def _np(x):
    return ops.convert_to_numpy(x)


def _pyramid(finest, levels):
    """Average a (B, n, n, n, 1) volume down by 2 per level, as the pyramid stage does."""
    out = {"level0": finest.astype(np.float32)}
    v = finest
    for level in range(1, levels):
        b, n = v.shape[0], v.shape[1] // 2
        v = v.reshape(b, n, 2, n, 2, n, 2, 1).mean(axis=(2, 4, 6))
        out[f"level{level}"] = v.astype(np.float32)
    return out


def _tiny_inputs(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return _pyramid(rng.random((batch, 16, 16, 16, 1)), TINY_GRID["levels"])


def _tiny_targets(batch=2, seed=0):
    rng = np.random.default_rng(seed + 100)
    pos = rng.uniform(10.0, 70.0, (batch, 2, 3)).astype(np.float32)
    return {"position": pos, "mask": np.ones((batch, 2), np.float32)}


def _build(method, **overrides):
    keras.utils.set_random_seed(0)
    return build_model(method, {**TINY_CFG, **overrides}, TINY_GRID)


# ----------------------------------------------------------------------------------------
# Geometry and builder
# ----------------------------------------------------------------------------------------
def test_grid_mm_conversions_follow_the_pyramid_contract():
    s0 = 0.5
    # level-l voxel 0 is the mean of level-0 voxels 0 .. 2^l - 1
    for level in range(4):
        np.testing.assert_allclose(voxel_to_grid_mm(0.0, level, s0), s0 * (2**level - 1) / 2)
    v = np.array([3.25, 0.0, 17.5])
    for level in range(4):
        g = voxel_to_grid_mm(v, level, s0)
        np.testing.assert_allclose(g, voxel_to_grid_mm(2**level * v + (2**level - 1) / 2, 0, s0))
        np.testing.assert_allclose(grid_mm_to_voxel(g, level, s0), v)


def test_grid_mm_conversions_agree_with_the_grid_methods():
    grid = Grid(origin=(1.0, 2.0, 3.0), spacing=1.25, shape=32, levels=4)
    v = np.array([[3.25, 0.0, 7.5], [1.0, 2.0, 3.0]])
    for level in range(4):
        np.testing.assert_allclose(
            voxel_to_grid_mm(v, level, 1.25), grid.voxel_to_grid_mm(v, level), atol=1e-12
        )


def test_unet_shapes_and_checks():
    net = build_unet((8, 8, 8, 1), 3, filters=(4, 8, 16), out_activation="softplus")
    assert net.output_shape == (None, 8, 8, 8, 3)
    enc = build_unet((8, 8, 8, 1), 5, filters=(4, 8, 16), decoder=False)
    assert enc.output_shape == (None, 2, 2, 2, 5)
    tr = build_unet((8, 8, 8, 1), 2, filters=(4, 8), convs_per_level=2, dropout=0.1,
              upsampling="transpose")
    assert tr.output_shape == (None, 8, 8, 8, 2)
    kinds = [type(layer).__name__ for layer in tr.layers]
    assert kinds.count("Conv3D") == 2 * 3 + 1  # 2 convs x (2 down + 1 up) + head
    assert kinds.count("Conv3DTranspose") == 1
    with pytest.raises(ValueError):
        build_unet((10, 10, 10, 1), 1, filters=(4, 8, 16))


def test_build_model_dispatch_and_config():
    for method in METHODS:
        model = _build(method)
        assert model.n_landmarks == 2
    e2e, noisy, multi = (
        _build(m) for m in ("multiscale_e2e", "multiscale_e2e_noise", "multiscale_multistep")
    )
    assert e2e.noise_mm == 0.0 and not e2e.stop_gradient
    assert noisy.noise_mm == 5.0 and not noisy.stop_gradient
    assert multi.noise_mm == 0.0 and multi.stop_gradient
    assert e2e.input_levels == (0, 1, 2) and _build("locnet_single").input_levels == (1,)
    with pytest.raises(ValueError):
        build_model("nope", TINY_CFG, TINY_GRID)
    with pytest.raises(ValueError):
        build_model("locnet_single", {**TINY_CFG, "landmarks": []}, TINY_GRID)
    with pytest.raises(ValueError):
        build_model("locnet_single", {**TINY_CFG, "level": 3}, TINY_GRID)


# ----------------------------------------------------------------------------------------
# Shift equivariance
# ----------------------------------------------------------------------------------------
def _blob_volume(n, lo, hi, seed=0):
    x = np.zeros((1, n, n, n, 1), np.float32)
    rng = np.random.default_rng(seed)
    x[0, lo:hi, lo:hi, lo:hi, 0] = rng.random((hi - lo,) * 3)
    return x


def test_locnet_is_shift_equivariant():
    # Random He-initialised kernels, zero biases (Keras default), ReLU maps: an all-zero
    # background stays exactly zero (also across the zero padding), so all mass comes from
    # the blob and moves with it. With max pooling the equivariance is exact for shifts by
    # multiples of the pooling stride (2 here); other shifts are approximate (aliasing).
    keras.utils.set_random_seed(3)
    net = LocNet(32, 2, unet={"filters": [4, 8]}, out_activation="relu")
    x = _blob_volume(32, 12, 20)
    assert np.all(_np(ops.sum(net.maps(x), axis=(1, 2, 3))) > 0)
    p0 = _np(net(x))
    for shift in [(2, -4, 2), (-6, 0, 4)]:
        p1 = _np(net(np.roll(x, shift, axis=(1, 2, 3))))
        np.testing.assert_allclose(p1 - p0, np.broadcast_to(shift, p0.shape), atol=1e-3)


def test_multiscale_chain_is_shift_equivariant():
    # finest 128^3, 3 levels: shifts by multiples of 8 finest voxels are multiples of 2
    # voxels (the pooling stride) on the coarsest level (32^3); every crop centre moves by
    # exactly the shift, so every patch is resampled identically and every level's
    # prediction moves by the shift. The blob and its receptive-field footprint stay well
    # inside the volume, where zero padding cannot cut mass off.
    keras.utils.set_random_seed(5)
    grid = {"finest_shape": 128, "finest_spacing_mm": 1.0, "levels": 3}
    cfg = {**TINY_CFG, "patch": 8, "out_activation": "relu"}
    model = build_model("multiscale_e2e", cfg, grid)
    x = _blob_volume(128, 56, 72, seed=1)
    shift = np.array([8, -8, 16])
    out0 = model(_pyramid(x, 3))
    out1 = model(_pyramid(np.roll(x, tuple(shift), axis=(1, 2, 3)), 3))
    for key in ("level2", "level1", "level0", "position"):
        np.testing.assert_allclose(
            _np(out1[key]) - _np(out0[key]),
            np.broadcast_to(shift * 1.0, (1, 2, 3)),
            atol=2e-3,
            err_msg=key,
        )


# ----------------------------------------------------------------------------------------
# Gradients through the chain
# ----------------------------------------------------------------------------------------
def _finest_loss_grads(model, x, y):
    import tensorflow as tf

    coarse = model.level_nets[model.n_levels - 1].trainable_weights
    with tf.GradientTape() as tape:
        out = model(x, training=True)
        loss = model.position_loss(out["level0"], y)
    return tape.gradient(loss, coarse)


@pytest.mark.tensorflow_only
def test_finest_loss_reaches_coarsest_net_only_end_to_end():
    x, y = _tiny_inputs(1), _tiny_targets(1)
    grads = _finest_loss_grads(_build("multiscale_e2e"), x, y)
    assert any(g is not None and np.any(g.numpy() != 0) for g in grads)
    grads = _finest_loss_grads(_build("multiscale_multistep"), x, y)
    assert all(g is None or not np.any(g.numpy()) for g in grads)


@pytest.mark.tensorflow_only
def test_leaky_relu_units_switched_off_still_learn():
    """A unit whose input is negative everywhere gets no gradient with ReLU (it is dead) and
    a gradient with unet.activation leaky_relu; build_model passes the key through."""
    import tensorflow as tf

    x = _blob_volume(8, 2, 6)
    grads = {}
    for act in ("relu", "leaky_relu"):
        keras.utils.set_random_seed(0)
        net = build_unet((8, 8, 8, 1), 1, filters=(4, 8), activation=act, out_activation="linear")
        last = net.get_layer("unet_dec0_conv0")
        kernel, bias = last.get_weights()
        last.set_weights([kernel, bias - 1e3])  # every unit of the last block off
        with tf.GradientTape() as tape:
            loss = ops.sum(ops.square(net(x) - 1.0))
        grads[act] = tape.gradient(loss, last.trainable_weights)[0].numpy()
    assert not np.any(grads["relu"]) and np.all(np.abs(grads["leaky_relu"]).sum(axis=(0, 1, 2, 3)) > 0)
    model = build_model("locnet_single", {**TINY_CFG, "unet": {**TINY_CFG.get("unet", {}),
                                                                "activation": "leaky_relu"}},
                        TINY_GRID)
    acts = {getattr(l, "activation", None) for l in model.locnet.net.layers if "conv" in l.name}
    assert keras.activations.leaky_relu in acts and keras.activations.relu not in acts
    with pytest.raises(ValueError, match="activation"):
        build_unet((8, 8, 8, 1), 1, filters=(4, 8), activation="tanh")


@pytest.mark.tensorflow_only
def test_gradient_flows_through_the_resampled_patch_content():
    # d position / d centre = identity (the additive term) + the content term of the
    # trilinear crop; with an integer-slice crop (authors' code) it would be exactly 1.
    import tensorflow as tf

    model = _build("multiscale_e2e")
    x = _tiny_inputs(1)
    c = tf.constant([[[31.3, 42.1, 38.9], [44.2, 35.5, 30.7]]])
    with tf.GradientTape() as tape:
        tape.watch(c)
        g = tf.reduce_sum(model.refine(0, tf.constant(x["level0"]), c))
    d = tape.gradient(g, c).numpy()
    assert np.max(np.abs(d - 1.0)) > 1e-4


# ----------------------------------------------------------------------------------------
# Losses, metrics and schedule plumbing
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_missing_landmarks_do_not_change_the_loss(method):
    model = _build(method)
    x = _tiny_inputs()
    y = _tiny_targets()
    pred = model(x)
    y1 = {"position": y["position"].copy(), "mask": np.array([[1, 0], [0, 1]], np.float32)}
    y2 = {"position": y1["position"].copy(), "mask": y1["mask"]}
    y2["position"][0, 1] = [1000.0, -50.0, 3.0]
    y2["position"][1, 0] = 0.0
    l1 = float(_np(model.compute_loss(x, y1, pred)))
    l2 = float(_np(model.compute_loss(x, y2, pred)))
    assert np.isfinite(l1) and l1 == pytest.approx(l2, rel=1e-6)
    none = {"position": y["position"], "mask": np.zeros((2, 2), np.float32)}
    assert float(_np(model.compute_loss(x, none, pred))) == 0.0


def test_multiscale_loss_uses_loss_weights_and_logs_levels():
    model = _build("multiscale_e2e")
    x, y = _tiny_inputs(), _tiny_targets()
    pred = model(x)
    per_level = [float(_np(model.position_loss(pred[f"level{l}"], y))) for l in range(3)]
    for level in range(3):
        w = np.zeros(3, np.float32)
        w[level] = 1.0
        model.loss_weights.assign(w)
        loss = float(_np(model.compute_loss(x, y, pred)))
        assert loss == pytest.approx(per_level[level], rel=1e-5)
    model.loss_weights.assign(np.ones(3, np.float32))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), run_eagerly=True)
    hist = model.fit(x, y, validation_data=(x, y), epochs=1, batch_size=2, verbose=0)
    for level in range(3):
        assert f"loss_level{level}" in hist.history
        assert f"val_loss_level{level}" in hist.history
    assert np.isfinite(hist.history["loss"][0])


def test_freezing_a_level_net():
    model = _build("multiscale_multistep")
    n_all = len(model.trainable_weights)
    model.level_nets[2].trainable = False
    n_coarse = len(model.level_nets[2].net.weights)
    assert len(model.trainable_weights) == n_all - n_coarse


# ----------------------------------------------------------------------------------------
# Heatmap and patch baseline specifics
# ----------------------------------------------------------------------------------------
def test_heatmap_targets_decode_back_to_the_positions():
    model = _build("heatmap_unet", heatmap_sigma_mm=20.0)  # 2 voxels at 10 mm
    pos = np.array([[[33.0, 41.7, 52.2], [20.4, 60.0, 44.4]]], np.float32)
    h = model.target_heatmaps(pos)
    assert tuple(h.shape) == (1, 8, 8, 8, 2)
    back = _np(model.to_mm(decode_heatmap(h), 1))
    np.testing.assert_allclose(back, pos, atol=0.3)


def test_heatmap_unet_starts_near_zero_and_its_loss_balances_the_foreground():
    """The heatmap head starts near 0 (not at a He-initialised unit scale over every voxel,
    which cost 40x the zero map's loss in the default study and ended in the all-zero map),
    and the balanced weighting gives the Gaussian's neighbourhood as much weight as the rest
    of the volume, so the all-zero map is no longer a good answer."""
    model = _build("heatmap_unet", heatmap_sigma_mm=10.0, heatmap_foreground_weight="balanced")
    x, y = _tiny_inputs(2), _tiny_targets(2)
    hm = _np(model(x)["heatmap"])
    assert np.abs(hm).max() < 0.01 * model.heatmap_peak
    he = _build("heatmap_unet", heatmap_sigma_mm=10.0)
    he = type(he).from_config({**he.get_config(), "head_init_std": None})
    assert np.abs(_np(he(x)["heatmap"])).max() > 0.05  # the He head: unit-scale outputs
    unit = model.target_heatmaps(y["position"])
    perfect = _np(model.heatmap_loss(model.heatmap_peak * unit, unit))
    zero = _np(model.heatmap_loss(ops.zeros_like(unit), unit))
    np.testing.assert_allclose(perfect, 0.0, atol=1e-6)
    # balanced: the foreground term's total weight equals the background's (n^3), so the
    # zero map costs far more than under the plain mean of squares
    u = _np(unit)
    n3 = np.prod(u.shape[1:4])
    lam = n3 / u.sum(axis=(1, 2, 3))
    w = 1.0 + lam[:, None, None, None, :] * u
    want = (w * (model.heatmap_peak * u) ** 2).sum(axis=(1, 2, 3)) / w.sum(axis=(1, 2, 3))
    np.testing.assert_allclose(zero, want, rtol=1e-4)
    plain_mean = (model.heatmap_peak * u) ** 2
    assert np.all(zero > 5 * plain_mean.mean(axis=(1, 2, 3)))  # 10x here, ~1000x at 64^3
    # the model's own loss at initialisation is about the zero map's
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    first = model.train_on_batch(x, y, return_dict=True)["loss"]
    assert 0.8 < first / zero.mean() < 1.2
    with pytest.raises(ValueError, match="heatmap_foreground_weight"):
        _build("heatmap_unet", heatmap_foreground_weight="lots")


def test_heatmap_unet_learns_a_blob_that_marks_the_landmark():
    """A few dozen steps on volumes whose only structure is a bright blob at each landmark:
    the heatmap U-Net must beat the zero map's loss clearly and move its argmax towards the
    blobs (the model before the fix stayed at the zero map)."""
    keras.utils.set_random_seed(3)
    model = _build("heatmap_unet", heatmap_sigma_mm=10.0, unet={"filters": [8, 16]})
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    rng = np.random.default_rng(5)
    grid = np.arange(16) * 5.0 + 2.5  # finest voxel centres in grid mm (5 mm spacing)

    def case():
        pos = rng.uniform(15.0, 65.0, (1, 2, 3)).astype(np.float32)
        d2 = [sum((g - pos[0, k, a]) ** 2 for a, g in enumerate(np.meshgrid(grid, grid, grid,
              indexing="ij"))) for k in range(2)]
        vol = sum(np.exp(-d / (2 * 7.0**2)) for d in d2)[None, ..., None]
        return _pyramid(vol, TINY_GRID["levels"]), {"position": pos,
                                                     "mask": np.ones((1, 2), np.float32)}

    cases = [case() for _ in range(12)]
    x0, y0 = cases[0]
    unit = model.target_heatmaps(y0["position"])
    zero = float(_np(ops.mean(model.heatmap_loss(ops.zeros_like(unit), unit))))

    def error():
        return np.mean([np.linalg.norm(_np(model.predict_on_batch(x)["position"]) - y["position"],
                                       axis=-1).mean() for x, y in cases])

    before = error()
    for _ in range(8):
        for x, y in cases:
            model.train_on_batch(x, y)
    after_loss = np.mean([model.test_on_batch(x, y) for x, y in cases])
    assert after_loss < 0.5 * zero
    assert error() < 0.6 * before


def test_patch_baseline_decoding_and_perfect_prediction_loss():
    model = _build("patch_baseline")  # level 1: 8^3 at 10 mm, 2-voxel cells -> 4^3 cells
    assert model.n_cells == 4 and model.cell_mm == 20.0
    pos = np.array([[[33.0, 41.7, 52.2], [20.4, 60.0, 44.4]]], np.float32)
    centres = model._cell_centres_mm.reshape(4, 4, 4, 3)
    disp = np.broadcast_to(pos[:, None, None, None, :, :], (1, 4, 4, 4, 2, 3)) - centres[
        None, :, :, :, None, :
    ]
    logits = np.full((1, 4, 4, 4, 2), -8.0, np.float32)
    cells = np.floor((grid_mm_to_voxel(pos, 1, 5.0) + 0.5) / 2).astype(int)
    for k in range(2):
        logits[(0, *cells[0, k], k)] = 8.0
    disp = disp.astype(np.float32)
    np.testing.assert_allclose(_np(model.decode(logits, disp)), pos, atol=1e-4)
    # no positive cell: fall back to the most probable one
    low = logits - 20.0
    np.testing.assert_allclose(_np(model.decode(low, disp)), pos, atol=1e-4)
    y = {"position": pos, "mask": np.ones((1, 2), np.float32)}
    model.compute_loss(None, y, {"logits": logits, "displacement": disp})
    assert float(_np(model.reg_tracker.result())) < 1e-5
    assert float(_np(model.cls_tracker.result())) < 1e-2


def test_patch_baseline_options_cells_soft_labels_positive_weight():
    # cell_voxels: the whole U-Net averaged over 2^3-voxel cells of level 1 (8^3 at 10 mm -> 4^3)
    model = _build("patch_baseline", cell_voxels=2)
    assert model.pool is not None and model.n_cells == 4 and model.cell_mm == 20.0
    out = model(_tiny_inputs(1))
    assert tuple(out["logits"].shape) == (1, 4, 4, 4, 2)
    net_out = _np(model.net(_tiny_inputs(1)["level1"]))  # (1, 8, 8, 8, 8): 4 K channels
    np.testing.assert_allclose(_np(out["logits"])[0, 1, 2, 3],
                               net_out[0, 2:4, 4:6, 6:8, :2].mean(axis=(0, 1, 2)), rtol=1e-5)
    again = type(model).from_config(model.get_config())
    assert again.cell_voxels == 2 and again.pool is not None
    with pytest.raises(ValueError, match="not divisible"):
        _build("patch_baseline", cell_voxels=3)
    # soft labels: a Gaussian of the distance to the landmark, 1 at a cell centre
    soft = _build("patch_baseline", label_sigma_mm=10.0)  # 20 mm cells
    centres = soft._cell_centres_mm
    target = centres[[5, 40]][None].astype(np.float32)  # (1, K=2, 3) at two cell centres
    disp = target[:, None] - centres[None, :, None]
    labels = _np(soft.cell_labels(target, disp))
    assert labels[0, 5, 0] == pytest.approx(1.0) and labels[0, 40, 1] == pytest.approx(1.0)
    d = np.linalg.norm(centres - centres[5], axis=1)
    np.testing.assert_allclose(labels[0, :, 0], np.exp(-0.5 * d**2 / 100.0), rtol=1e-5)
    hard = _np(_build("patch_baseline").cell_labels(target, disp))
    assert hard.sum() == 2 and hard[0, 5, 0] == 1 and hard[0, 40, 1] == 1
    # positive_weight w: one positive cell counts w negative ones (balanced: half the loss)
    lf = np.random.default_rng(0).normal(size=(1, 64, 2)).astype(np.float32)
    sp = lambda v: np.log1p(np.exp(v))  # noqa: E731
    p_term, n_term = sp(-lf[0, 5, 0]), sp(lf[0, :, 0]).sum() - sp(lf[0, 5, 0])
    weighted = _build("patch_baseline", positive_weight=20.0)
    got = _np(weighted.class_loss(lf, hard))[0, 0]
    assert got == pytest.approx((20 * p_term + n_term) / (20 + 63), rel=1e-5)
    got = _np(soft.class_loss(lf, hard))[0, 0]  # the default: balanced
    assert got == pytest.approx(p_term + n_term / 63, rel=1e-5)


# ----------------------------------------------------------------------------------------
# Saving and test-time passes
# ----------------------------------------------------------------------------------------
def test_noise_only_moves_the_finest_level():
    model = _build("multiscale_e2e_noise")
    x = _tiny_inputs(1)
    a, b = model(x), model(x)
    np.testing.assert_array_equal(_np(a["position"]), _np(b["position"]))  # inference
    noisy = model(x, noise=True)
    for key in ("level2", "level1"):
        np.testing.assert_allclose(_np(noisy[key]), _np(a[key]), atol=1e-5)
    assert np.max(np.abs(_np(noisy["level0"]) - _np(a["level0"]))) > 1e-3


def test_predict_passes_equals_naive_loop():
    model = _build("multiscale_e2e_noise")
    assert isinstance(model, MultiScaleLocNet)
    x = _tiny_inputs(1)
    shifts = sample_shifts(5, 2, 5.0, seed=0)
    assert shifts.shape == (5, 2, 3) and np.all(np.abs(shifts) <= 5.0)
    batched = predict_passes(model, x, shifts)
    chunked = predict_passes(model, x, shifts, chunk=2)
    naive = np.stack(
        [_np(model(x, finest_shift_mm=shifts[i : i + 1])["position"])[0] for i in range(5)]
    )
    assert batched.shape == (5, 2, 3)
    np.testing.assert_allclose(batched, naive, atol=1e-4)
    np.testing.assert_allclose(chunked, naive, atol=1e-4)
    eager = predict_passes(model, x, shifts, chunk=2, compiled=False)
    np.testing.assert_allclose(chunked, eager, atol=1e-5)
    with pytest.raises(ValueError):
        predict_passes(model, _tiny_inputs(2), shifts)


def test_compiled_finest_stage_is_reused_and_follows_the_weights():
    from locnet.models import coarse_stages, finest_stage

    model = _build("multiscale_e2e_noise")
    x = _tiny_inputs(1)
    shifts = sample_shifts(3, 2, 5.0, seed=1)
    before = predict_passes(model, x, shifts, chunk=2)  # chunks of 2 and 1 pass: 2 stages
    stage = finest_stage(model, 4)
    assert finest_stage(model, 4) is stage and finest_stage(model, 2) is not stage
    shared = {id(v) for v in stage.weights}
    assert all(id(v) in shared for v in model.level_nets[0].weights)  # the same variables
    # the stage shares the chain's variables: a weight change shows in the next compiled call
    net = model.level_nets[0]
    net.set_weights([w * 1.5 for w in net.get_weights()])
    coarse = model.level_nets[-1]
    coarse.set_weights([w * 0.7 for w in coarse.get_weights()])
    after = predict_passes(model, x, shifts, chunk=2)
    assert finest_stage(model, 4) is stage and coarse_stages(model) is coarse_stages(model)
    assert np.max(np.abs(after - before)) > 1e-4
    np.testing.assert_allclose(after, predict_passes(model, x, shifts, compiled=False), atol=1e-5)


def _blob_maps(size):
    """A stand-in finest U-Net for two landmarks: map 0 is its input, map 1 the input + 0.5."""
    inp = keras.Input((size, size, size, 1))
    conv = keras.layers.Conv3D(2, 1, kernel_initializer="ones",
                               bias_initializer=keras.initializers.Constant([0.0, 0.5]))
    return keras.Model(inp, conv(inp))


def test_window_estimator_maps_each_cut_back_to_the_volume():
    # Trilinear resampling keeps the centroid of a fully enclosed mass, so with map 0 equal to
    # the input each pass of landmark 0 finds its blob's centre, in both estimators, to float
    # rounding. Map 1 adds a uniform 0.5, which pulls landmark 1 towards each cut's centre by
    # the same amount in both. So the two estimators agree pass by pass, and landmark 0 sits on
    # its blob: this checks the window's crop, the cut positions, the per-landmark map and
    # the way back to grid mm, against the exact stage given the same centres and shifts.
    from locnet.models import finest_stage, window_size, window_stage

    grid = {"finest_shape": 48, "finest_spacing_mm": 1.0, "levels": 2}
    keras.utils.set_random_seed(0)
    model = build_model("multiscale_e2e_noise", {**TINY_CFG, "patch": 12, "noise_mm": 2.0}, grid)
    assert window_size(model) == 16  # 12 + 2 x 2 voxels, a multiple of the stride 2
    model.level_nets[0].net = _blob_maps(12)
    centres = np.array([[14.3, 16.0, 30.6], [33.2, 30.5, 15.1]], np.float32)  # grid mm = voxels
    blobs = centres + np.array([[0.6, -0.8, 0.3], [-0.4, 0.7, -0.5]], np.float32)
    ii = np.stack(np.meshgrid(*[np.arange(48.0)] * 3, indexing="ij"), -1)
    level0 = sum(np.exp(-np.sum((ii - b) ** 2, -1) / (2 * 0.8**2)) for b in blobs)
    volume = level0[None, ..., None].astype(np.float32)
    n = 6
    shifts = sample_shifts(n, 2, 2.0, seed=3)
    window = window_stage(model, n).predict_on_batch(
        {"volume": volume, "centres": centres[None], "shifts": shifts[None]})[0]
    exact = finest_stage(model, n * 2).predict_on_batch(
        {"volume": volume, "centres": (centres + shifts).reshape(1, -1, 3)}).reshape(n, 2, 3)
    np.testing.assert_allclose(window, exact, atol=2e-3)
    np.testing.assert_allclose(window[:, 0], np.broadcast_to(blobs[0], (n, 3)), atol=2e-3)
    # landmark 1 lies between its blob and each cut's centre, at one fixed fraction of the way
    # (the uniform mass over the mass of the whole cut): it moves with every shift
    towards = (centres[1] + shifts[:, 1]) - blobs[1]
    fraction = (window[:, 1] - blobs[1]) / towards
    assert 0.5 < fraction.mean() < 1.0
    np.testing.assert_allclose(fraction, fraction.mean(), atol=2e-3)


def test_window_estimator_shares_the_weights_and_checks_its_inputs():
    from locnet.models import window_stage

    model = _build("multiscale_e2e_noise")
    x = _tiny_inputs(1)
    shifts = sample_shifts(4, 2, 5.0, seed=2)
    compiled = predict_passes(model, x, shifts, estimator="window")
    np.testing.assert_allclose(
        compiled, predict_passes(model, x, shifts, estimator="window", compiled=False), atol=1e-5
    )
    stage = window_stage(model, 4)
    assert window_stage(model, 4) is stage
    shared = {id(v) for v in stage.weights}
    assert all(id(v) in shared for v in model.level_nets[0].weights)  # no copy of the weights
    net = model.level_nets[0]
    net.set_weights([w * 1.5 for w in net.get_weights()])
    after = predict_passes(model, x, shifts, estimator="window")
    assert np.max(np.abs(after - compiled)) > 1e-4
    with pytest.raises(ValueError, match="within"):
        predict_passes(model, x, shifts * 2.0, estimator="window")
    with pytest.raises(ValueError, match="unknown estimator"):
        predict_passes(model, x, shifts, estimator="bootstrap")


def _count_calls(monkeypatch, cls, name):
    """Count Python-level calls of ``cls.name`` from now on; returns the list that grows."""
    calls, original = [], getattr(cls, name)

    def counted(self, *args, **kwargs):
        calls.append(name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


@pytest.mark.parametrize("method", METHODS)
def test_compiled_steps_do_not_rerun_the_model_in_python(method, monkeypatch):
    """Once traced, predict_on_batch and train_on_batch run the compiled function alone.

    Keras's JAX trainer runs the whole model eagerly before every predict_on_batch while any
    layer is unbuilt; a weightless layer that is never called (a level net's own centre of
    mass, in a chain that reads the level nets' maps) kept that on and cost 200 ms per forward
    on an H200 (benchmarks/README.md). Torch runs eagerly by design, so it is not asked.
    """
    if keras.backend.backend() == "torch":
        pytest.skip("the torch backend runs the model in Python on every call")
    model = _build(method)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x, y = _tiny_inputs(1), _tiny_targets(1)
    model.predict_on_batch(x)
    model.train_on_batch(x, y)
    calls = _count_calls(monkeypatch, type(model), "call")
    first = model.predict_on_batch(x)
    model.train_on_batch(x, y)
    model.predict_on_batch(x)
    assert calls == []
    assert np.all(np.isfinite(first["position"]))


def test_compiled_passes_do_not_rerun_the_chain_in_python(monkeypatch):
    if keras.backend.backend() == "torch":
        pytest.skip("the torch backend runs the model in Python on every call")
    model = _build("multiscale_e2e_noise")
    x = _tiny_inputs(1)
    shifts = sample_shifts(4, 2, 5.0, seed=0)
    ref = predict_passes(model, x, shifts, chunk=2)
    window = predict_passes(model, x, shifts, estimator="window")
    # backend tensors are taken as they are (no round trip through NumPy), same answer
    on_device = {k: ops.convert_to_tensor(v) for k, v in x.items()}
    np.testing.assert_allclose(predict_passes(model, on_device, shifts, chunk=2), ref, atol=1e-6)
    calls = _count_calls(monkeypatch, MultiScaleLocNet, "refine")
    np.testing.assert_array_equal(predict_passes(model, x, shifts, chunk=2), ref)
    np.testing.assert_array_equal(predict_passes(model, x, shifts, estimator="window"), window)
    assert calls == []


# ---- the map prior (map_supervision) ---------------------------------------------------
def test_gaussian_maps_peak_at_the_position_with_the_given_width():
    from locnet.models.maps import gaussian_maps

    g = _np(gaussian_maps(np.array([[[3.0, 4.0, 5.0], [20.0, 20.0, 20.0]]], "float32"), 10, 1.5))
    assert g.shape == (1, 10, 10, 10, 2)
    assert np.unravel_index(np.argmax(g[0, ..., 0]), (10, 10, 10)) == (3, 4, 5)
    assert g[0, 3, 4, 5, 0] == pytest.approx(1.0)
    assert g[0, 3, 4, 6, 0] == pytest.approx(np.exp(-1 / (2 * 1.5**2)), rel=1e-6)
    assert g[0, ..., 1].max() < 1e-10  # a position outside the grid leaves it empty


def test_map_prior_of_an_empty_map_is_the_same_at_every_size_and_zero_at_the_target():
    from locnet.models.maps import gaussian_maps, map_prior_loss

    costs = []
    for n in (16, 32, 64):
        unit = gaussian_maps(np.full((1, 1, 3), n / 2, "float32"), n, 2.0)
        costs.append(float(_np(map_prior_loss(ops.zeros_like(unit), unit, 30.0))[0, 0]))
        assert float(_np(map_prior_loss(30.0 * unit, unit, 30.0))[0, 0]) == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(costs, costs[0], rtol=1e-3)
    assert 2.0 < costs[0] < 2.6


def test_supervised_locnet_takes_its_mass_above_the_threshold_only():
    keras.utils.set_random_seed(0)
    net = LocNet(8, 1, unet={"filters": [2, 4]}, supervised=True, map_threshold=0.1, map_peak=30.0)
    logits = np.full((1, 8, 8, 8, 1), 2.9, "float32")  # background just below 0.1 x 30
    logits[0, 1, 2, 6, 0] = 30.0  # one voxel above it
    mass = _np(net.mass(ops.convert_to_tensor(logits)))
    assert np.count_nonzero(mass) == 1 and mass[0, 1, 2, 6, 0] == pytest.approx(27.0)
    np.testing.assert_allclose(_np(net.com(mass))[0, 0], [1.0, 2.0, 6.0], atol=1e-4)
    # the head is linear and starts near zero: the untrained map holds no mass at all, and the
    # centre of mass is the grid centre (the map prior, not the centre of mass, trains it first)
    x = np.random.default_rng(0).uniform(0, 1, (1, 8, 8, 8, 1)).astype("float32")
    assert np.abs(_np(net.logits(x))).max() < 1.0 and not _np(net.maps(x)).any()
    np.testing.assert_allclose(_np(net(x))[0, 0], [3.5, 3.5, 3.5], atol=1e-4)


@pytest.mark.parametrize("method", ["locnet_single", "multiscale_e2e", "multiscale_e2e_noise"])
def test_map_prior_targets_sit_at_the_landmark_in_each_nets_own_voxels(method):
    keras.utils.set_random_seed(3)
    cfg = {**TINY_CFG, "map_supervision": {"weight": 10.0, "sigma_voxels": 1.0}}
    model = build_model(method, cfg, TINY_GRID)
    x = _pyramid(np.random.default_rng(1).uniform(0, 1, (2, 16, 16, 16, 1)), 3)
    out = model(x, training=True)
    assert "logits" in out or "logits2" in out
    assert not any(k.startswith("logits") for k in model(x, training=False))  # inference: none
    if method == "locnet_single":
        assert _np(out["logits"]).shape == (2, 8, 8, 8, 2)
        return
    for level in (1, 0):
        z = _np(out[f"logits{level}"])
        assert z.shape == (2, 4, 4, 4, 2)
        # patch voxel 0 of level l is the crop centre (the coarser level's prediction, noise
        # aside at level 0) minus (P - 1) / 2 in level-l voxels
        centre = _np(model.to_voxel(out[f"level{level + 1}"], level))
        origin = _np(out[f"origin{level}"])
        if level == 1 or method == "multiscale_e2e":
            np.testing.assert_allclose(origin, centre - 1.5, atol=1e-4)
        else:  # the finest crop of the noisy chain is shifted by up to noise_mm (5 mm = 1 voxel)
            assert np.abs(origin - (centre - 1.5)).max() <= 1.0 + 1e-4
    # the loss adds weight x the prior of every level (not scheduled) to the scheduled
    # position errors
    y = {"position": out["level1"], "mask": np.ones((2, 2), "float32")}
    loss = float(_np(model.compute_loss(x, y, out)))
    priors = [float(_np(t.result())) for t in model.map_trackers]
    positions = [float(_np(t.result())) for t in model.level_trackers]
    assert min(priors) > 0 and positions[1] == pytest.approx(0.0, abs=1e-6)  # y = level 1
    weights = _np(model.loss_weights)
    assert loss == pytest.approx(float(np.dot(weights, positions) + 10.0 * np.sum(priors)),
                                 rel=1e-4)


def test_map_prior_leaves_out_a_landmark_its_crop_missed():
    keras.utils.set_random_seed(0)
    model = build_model("locnet_single", {**TINY_CFG, "map_supervision": {"weight": 1.0}}, TINY_GRID)
    logits = ops.convert_to_tensor(np.zeros((1, 8, 8, 8, 2), "float32"))
    mask = np.ones((1, 2), "float32")
    inside = np.array([[[3.0, 4.0, 5.0], [3.0, 4.0, 5.0]]], "float32")
    both = float(_np(model.map_prior(logits, inside, mask)))
    missed = inside.copy()
    missed[0, 1] = [3.0, 4.0, 30.0]  # landmark 1 lies outside the 8^3 grid
    # the empty map's cost of landmark 0 alone, not the mean with a near-free landmark 1
    assert float(_np(model.map_prior(logits, missed, mask))) == pytest.approx(both, rel=1e-6)
    assert float(_np(model.map_prior(logits, np.full((1, 2, 3), 30.0, "float32"), mask))) == 0.0
