"""Test-time passes of the multi-scale chain: noisy finest crops and the stage models that run them."""

from __future__ import annotations

import weakref

import keras
import numpy as np
from keras import ops

from locnet.layers import CropResample, cut_centres_of_mass, patch_to_volume
from locnet.models.multiscale import MultiScaleLocNet

__all__ = ['ESTIMATORS', 'PASS_CHUNK', 'CoarseStages', 'FinestStage', 'WindowStage', 'coarse_stages', 'finest_stage', 'predict_passes', 'predict_position', 'sample_shifts', 'window_size', 'window_stage']


def sample_shifts(n_passes: int, n_landmarks: int, noise_mm: float, seed=None) -> np.ndarray:
    """``U(-noise_mm, +noise_mm)`` shifts of shape (n_passes, K, 3), float32."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-noise_mm, noise_mm, size=(n_passes, n_landmarks, 3)).astype("float32")


#: Noisy passes per batch of finest crops: one batch of all 50 passes (100 patches of 56^3 at
#: paper scale) peaked at 14 GiB on the CPU and ran 3x slower than batches of 5-10
#: (benchmarks/README.md, "Performance at paper scale").
PASS_CHUNK = 8


def predict_position(model, inputs: dict) -> np.ndarray:
    """The model's noise-free ``position`` output (B, K, 3) in grid mm for one batch of inputs.

    Through ``predict_on_batch``, which the backend compiles (traced once per input shape):
    at paper scale on the 2-core CPU, 0.65 s against 0.87 s for an eager call
    (benchmarks/README.md).
    """
    out = model.predict_on_batch(dict(inputs))
    if isinstance(out, dict):
        out = out["position"]
    return np.asarray(out, dtype=np.float64)


class FinestStage(keras.Model):
    """The finest refinement of a multi-scale model for ``m`` crop centres, as a model of its own.

    ``{"volume": level 0 (1, n, n, n, 1), "centres": (1, m, 3) grid mm} -> (1, m, 3)`` grid mm,
    with the chain's own layers and weights (nothing is copied). Running it through
    ``predict_on_batch`` lets Keras compile it the backend's way (``tf.function``, ``jax.jit``;
    torch stays eager), traced once and reused for every later chunk and case: the finest
    patches of the noisy passes are 100 of the 105 patch nets of 50 passes. One stage serves
    one ``m`` because the crop and the per-landmark channel selection need a static ``m``
    (TensorFlow relaxes a second shape to ``None``); a last, shorter chunk gets its own stage.
    """

    def __init__(self, chain: MultiScaleLocNet, m: int, **kwargs):
        super().__init__(**kwargs)
        self.chain = chain
        self.m = int(m)

    def call(self, inputs, training=None):
        centres = inputs["centres"]
        if int(centres.shape[1]) != self.m:
            raise ValueError(f"this stage takes {self.m} centres, got {centres.shape[1]}")
        return self.chain.refine(0, inputs["volume"], centres, training=False)


class CoarseStages(keras.Model):
    """The deterministic part of the noisy passes: the coarsest level and every finer level but
    the finest, ``{"level1": ..., "level{top}": ...} -> (1, K, 3)`` grid mm at level 1.

    Compiled through ``predict_on_batch`` like :class:`FinestStage`; it runs once per case.
    """

    def __init__(self, chain: MultiScaleLocNet, **kwargs):
        super().__init__(**kwargs)
        self.chain = chain

    def call(self, inputs, training=None):
        chain = self.chain
        g = chain.coarsest(inputs, training=False)
        for level in range(chain.n_levels - 2, 0, -1):
            g = chain.refine(level, inputs[f"level{level}"], g, training=False)
        return g


class WindowStage(keras.Model):
    """The finest refinement for many shifts at once from one shared window (``estimator="window"``).

    ``{"volume": level 0 (1, n, n, n, 1), "centres": (1, K, 3) grid mm, "shifts": (1, N, K, 3)
    grid mm} -> (1, N, K, 3)`` grid mm. Per landmark, the finest Loc-Net runs once on a
    ``W^3`` window around the unshifted centre, ``W = P + 2 * ceil(noise_mm / s0)`` rounded up to
    the U-Net's pooling stride, wide enough to hold every shifted ``P^3`` patch. Each pass then
    takes the centre of mass of its ``P^3`` cut of that window's output map (trilinear, like
    the crop of the input), computed from box sums without resampling the cut
    (:func:`locnet.layers.cut_centres_of_mass`). The U-Net over the window is the chain's own
    finest U-Net applied to a wider input (its layers, so its weights, are shared).

    This is *not* the exact estimator: in the exact passes the network sees each shifted patch
    with its own borders and pooling grid, here every pass reads the same map, so the spread
    across passes comes only from what each cut includes (benchmarks/README.md compares the
    two on a trained model). It costs one window net per landmark instead of one patch net
    per pass and landmark.
    """

    def __init__(self, chain: MultiScaleLocNet, n_passes: int, **kwargs):
        super().__init__(**kwargs)
        self.chain = chain
        self.n_passes = int(n_passes)
        self.window = window_size(chain)
        net = chain.level_nets[0].net
        w = self.window
        self.window_net = keras.models.clone_model(
            net, input_tensors=keras.Input((w, w, w, 1)), clone_function=lambda layer: layer
        )
        self.window_crop = CropResample(w, chain.background)

    def call(self, inputs, training=None):
        chain, w, p = self.chain, self.window, self.chain.patch
        k, n = chain.n_landmarks, self.n_passes
        shifts = inputs["shifts"]
        if tuple(int(d) for d in shifts.shape[1:]) != (n, k, 3):
            raise ValueError(f"this stage takes shifts of shape (1, {n}, {k}, 3), got {shifts.shape}")
        centres = inputs["centres"]
        v = chain.to_voxel(centres, 0)  # (1, K, 3)
        windows = self.window_crop(inputs["volume"], v)  # (1, K, W, W, W, 1)
        maps = self.window_net(ops.reshape(windows, (k, w, w, w, 1)), training=False)  # (K, W^3, K)
        select = ops.convert_to_tensor(np.eye(k, dtype="float32"))[:, None, None, None, :]
        own = ops.sum(maps * select, axis=-1, keepdims=True)  # window k keeps map k: (K, W^3, 1)
        shifted = chain.to_voxel(centres[:, None] + shifts, 0)[0]  # (N, K, 3) level-0 voxels
        shifted = ops.transpose(shifted, (1, 0, 2))  # (K, N, 3)
        in_window = shifted - ops.transpose(v, (1, 0, 2)) + (w - 1) / 2.0
        # each pass's P^3 cut of its landmark's map, reduced to its centre of mass directly
        q = cut_centres_of_mass(own[..., 0], in_window, p, chain.com.epsilon)  # (K, N, 3)
        pos = chain.to_mm(patch_to_volume(shifted, q, p), 0)  # (K, N, 3)
        return ops.transpose(pos, (1, 0, 2))[None]


def window_size(model: MultiScaleLocNet) -> int:
    """Side of the shared window of :class:`WindowStage`: the patch plus the noise range on
    both sides, rounded up to a multiple of the U-Net's pooling stride."""
    stride = 2 ** (len(model.level_nets[0].unet_config["filters"]) - 1)
    reach = int(np.ceil(model.noise_mm / model.finest_spacing_mm - 1e-6))
    return int(-(-(model.patch + 2 * reach) // stride) * stride)


#: compiled stages ``{model: {"coarse" or m: stage}}``, dropped with the model
_STAGES: "weakref.WeakKeyDictionary[MultiScaleLocNet, dict]" = weakref.WeakKeyDictionary()


def finest_stage(model: MultiScaleLocNet, m: int) -> FinestStage:
    """The :class:`FinestStage` of ``model`` for ``m`` centres (made on first use, then reused)."""
    stages = _STAGES.setdefault(model, {})
    if int(m) not in stages:
        stages[int(m)] = FinestStage(model, m, name=f"{model.name}_finest_{int(m)}")
    return stages[int(m)]


def coarse_stages(model: MultiScaleLocNet) -> CoarseStages:
    """The :class:`CoarseStages` of ``model`` (made on first use, then reused)."""
    stages = _STAGES.setdefault(model, {})
    if "coarse" not in stages:
        stages["coarse"] = CoarseStages(model, name=f"{model.name}_coarse")
    return stages["coarse"]


def window_stage(model: MultiScaleLocNet, n_passes: int) -> WindowStage:
    """The :class:`WindowStage` of ``model`` for ``n_passes`` shifts (made on first use, then reused)."""
    stages = _STAGES.setdefault(model, {})
    key = ("window", int(n_passes))
    if key not in stages:
        stages[key] = WindowStage(model, n_passes, name=f"{model.name}_window_{int(n_passes)}")
    return stages[key]


#: the estimators of :func:`predict_passes`
ESTIMATORS = ("exact", "window")


def predict_passes(model: MultiScaleLocNet, inputs: dict, shifts_mm, chunk: int | None = PASS_CHUNK,
                   compiled: bool = True, estimator: str = "exact"):
    """Finest-level predictions of one case for many shifts of the finest crop centre.

    ``inputs``: the model inputs of a single case (batch 1); ``shifts_mm``: (n_passes, K, 3)
    added to the level-1 prediction before the finest crop. The deterministic coarse
    levels run once; the finest crops then run in batches of ``chunk`` passes (``None``:
    all passes in one batch). Both parts are stage models (:func:`coarse_stages`,
    :func:`finest_stage`), run compiled unless ``compiled`` is false (then called eagerly; the
    two agree to float32 rounding). Returns a NumPy array (n_passes, K, 3) in grid mm, equal to calling
    ``model(inputs, finest_shift_mm=shifts_mm[i:i+1])["position"][0]`` for each pass.

    ``estimator="window"`` replaces the finest passes by :class:`WindowStage`: one finest
    Loc-Net per landmark over a window holding every shifted patch, each pass cut from its
    output map. Faster (at paper scale one window net of 80^3 per landmark instead of 50 patch
    nets of 56^3) but a different estimator; ``chunk`` does not apply. Shifts must stay within
    the model's ``noise_mm``, for which the window is sized.
    """
    if not isinstance(model, MultiScaleLocNet):
        raise TypeError("predict_passes needs a multi-scale model")
    shifts = np.asarray(shifts_mm, dtype="float32")
    k = model.n_landmarks
    if shifts.ndim != 3 or shifts.shape[1:] != (k, 3):
        raise ValueError(f"shifts_mm must have shape (n_passes, {k}, 3), got {shifts.shape}")
    # convert_to_tensor, not np.asarray first: inputs already on the accelerator stay there
    # (a round trip of the 392 MiB pyramid through host memory costs ~90 ms on an H200)
    x = {f"level{l}": ops.convert_to_tensor(inputs[f"level{l}"], "float32")
         for l in model.input_levels}
    if int(x["level0"].shape[0]) != 1:
        raise ValueError("predict_passes takes a single case (batch size 1)")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
    if estimator == "window" and shifts.size and np.abs(shifts).max() > model.noise_mm + 1e-4:
        raise ValueError(f"the window estimator takes shifts within +-{model.noise_mm} mm (noise_mm), "
                         f"got {np.abs(shifts).max():.3f} mm")
    def run(stage, stage_inputs):  # the same stage model, compiled or called eagerly
        return stage.predict_on_batch(stage_inputs) if compiled else stage(stage_inputs)

    g = run(coarse_stages(model),
            {f"level{l}": x[f"level{l}"] for l in model.input_levels if l > 0})
    base = np.asarray(ops.convert_to_numpy(g))[0]  # (K, 3)
    n = shifts.shape[0]
    if estimator == "window":
        pos = run(window_stage(model, n), {"volume": x["level0"],
                                           "centres": ops.convert_to_tensor(base[None]),
                                           "shifts": ops.convert_to_tensor(shifts[None])})
        return np.asarray(ops.convert_to_numpy(pos))[0]
    chunk = n if not chunk else int(chunk)
    out = []
    for start in range(0, n, chunk):
        c = base[None] + shifts[start : start + chunk]  # (n_c, K, 3)
        centres = ops.convert_to_tensor(c.reshape(1, -1, 3))
        pos = run(finest_stage(model, c.shape[0] * k), {"volume": x["level0"], "centres": centres})
        out.append(np.asarray(ops.convert_to_numpy(pos)).reshape(-1, k, 3))
    return np.concatenate(out, axis=0)

