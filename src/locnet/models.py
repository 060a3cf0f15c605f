"""Models of the study: one U-Net builder, Loc-Net, and the six methods of Table 1.

Contract (``docs/architecture.md``)
-----------------------------------
* Inputs: a dict ``{"level{l}": (B, n_l, n_l, n_l, 1)}`` of whole pyramid levels (windowed
  to [0, 1]); ``model.input_levels`` lists the levels a model reads, other keys are ignored.
* Outputs: a dict with ``"position"`` (B, K, 3) in *grid millimetres*; multi-scale models
  add ``"level{l}"`` for every level, the heatmap U-Net adds ``"heatmap"``, the patch
  baseline ``"logits"`` and ``"displacement"``.
* Targets: ``{"position": (B, K, 3) grid mm, "mask": (B, K)}``; mask 0 marks a missing
  landmark, which contributes nothing to any loss (its position value is ignored).
* Grid millimetres: level-``l`` voxel coordinate ``v`` <-> ``g = s_l v + (s_l - s0) / 2``
  with ``s_l = s0 2^l`` (:func:`voxel_to_mm`, :func:`mm_to_voxel`).
* Every model computes its own loss in ``compute_loss`` (backend-agnostic ``keras.ops``):
  compile with an optimizer only (``model.compile(optimizer=...)``). Per-level losses are
  logged as ``loss_level{l}`` (and ``val_loss_level{l}``). ``model.loss_weights`` is a
  non-trainable variable holding one weight per entry of ``model.loss_levels``; the
  training schedule assigns it each epoch (``model.loss_weights.assign(w)``).

Methods (:func:`build_model`)
-----------------------------
``heatmap_unet``, ``locnet_single``, ``patch_baseline``, ``multiscale_multistep``,
``multiscale_e2e``, ``multiscale_e2e_noise``; see each class docstring.
"""

from __future__ import annotations

import copy
import weakref

import keras
import numpy as np
from keras import ops

from locnet.layers import (
    CenterOfMass,
    CropResample,
    RandomShift,
    cut_centres_of_mass,
    decode_heatmap,
    patch_to_volume,
)

__all__ = [
    "METHODS",
    "MODEL_DEFAULTS",
    "unet",
    "LocNet",
    "LandmarkModel",
    "HeatmapUNet",
    "SingleLocNet",
    "PatchBaseline",
    "MultiScaleLocNet",
    "build_model",
    "predict_passes",
    "ESTIMATORS",
    "sample_shifts",
    "voxel_to_mm",
    "mm_to_voxel",
]

METHODS = (
    "heatmap_unet",
    "locnet_single",
    "patch_baseline",
    "multiscale_multistep",
    "multiscale_e2e",
    "multiscale_e2e_noise",
)

#: Defaults merged under every method's config block by :func:`build_model`.
MODEL_DEFAULTS = {
    "level": 1,
    "unet": {
        "filters": [16, 32, 64, 128],
        "convs_per_level": 1,
        "dropout": 0.0,
        "upsampling": "upsample",
    },
    "out_activation": "softplus",
    "com_epsilon": 1e-6,
    "patch": 16,
    "noise_mm": 5.0,
    "background": 0.0,
    "heatmap_sigma_mm": 6.0,
    "heatmap_activation": "linear",
    "heatmap_peak": 100.0,
    "heatmap_foreground_weight": 10.0,
    "regress_radius_mm": None,
    "regression_weight": 1.0,
    "cls_threshold": 0.5,
    "seed": 0,
}


# ----------------------------------------------------------------------------------------
# Geometry helpers (tensor versions of the docs/architecture.md rules)
# ----------------------------------------------------------------------------------------
def voxel_to_mm(v, level: int, finest_spacing_mm: float):
    """Level-``level`` voxel coordinate -> grid mm: ``s_l v + (s_l - s0) / 2``."""
    s0 = float(finest_spacing_mm)
    s = s0 * 2**level
    return v * s + (s - s0) / 2.0


def mm_to_voxel(g, level: int, finest_spacing_mm: float):
    """Grid mm -> level-``level`` voxel coordinate (inverse of :func:`voxel_to_mm`)."""
    s0 = float(finest_spacing_mm)
    s = s0 * 2**level
    return (g - (s - s0) / 2.0) / s


# ----------------------------------------------------------------------------------------
# The one U-Net builder
# ----------------------------------------------------------------------------------------
def _conv_block(x, filters, convs, dropout, prefix):
    for c in range(convs):
        x = keras.layers.Conv3D(
            filters,
            3,
            padding="same",
            activation="relu",
            kernel_initializer="he_normal",
            name=f"{prefix}_conv{c}",
        )(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name=f"{prefix}_dropout")(x)
    return x


def unet(
    input_shape,
    out_channels: int,
    filters=(16, 32, 64, 128),
    convs_per_level: int = 1,
    dropout: float = 0.0,
    out_activation="relu",
    name: str = "unet",
    decoder: bool = True,
    upsampling: str = "upsample",
    out_init_std: float | None = None,
) -> keras.Model:
    """3D U-Net used by every method (functional ``keras.Model``).

    One level per entry of ``filters``: ``convs_per_level`` 3x3x3 convolutions + ReLU
    (paper: one, with 16/32/64/128 filters), max-pooling by 2 between levels; the decoder
    upsamples by 2 (``"upsample"``: nearest neighbour as in the authors' code, or
    ``"transpose"``: a learned 2x2x2 transposed convolution), concatenates the skip
    connection and applies the same conv block; a final 1x1x1 convolution gives
    ``out_channels`` maps with ``out_activation``. ``dropout > 0`` adds dropout after each
    conv block.

    ``out_init_std``: the 1x1x1 head's kernel starts as N(0, out_init_std^2) with a zero bias
    instead of He-normal (``None``), so the first outputs are close to 0 (see
    :class:`HeatmapUNet`).

    ``decoder=False`` returns the encoder only: the 1x1x1 head is applied to the bottleneck,
    i.e. an FCN with output stride ``2^(len(filters) - 1)`` (used by the patch baseline).

    Spatial sizes must be divisible by ``2^(len(filters) - 1)``.
    """
    filters = [int(f) for f in filters]
    depth = len(filters)
    stride = 2 ** (depth - 1)
    input_shape = tuple(int(s) for s in input_shape)
    for n in input_shape[:-1]:
        if n % stride:
            raise ValueError(
                f"{name}: spatial size {n} is not divisible by 2^(levels-1) = {stride}"
            )
    if upsampling not in ("upsample", "transpose"):
        raise ValueError(f"upsampling must be 'upsample' or 'transpose', got {upsampling!r}")
    inputs = keras.Input(shape=input_shape, name=f"{name}_input")
    x = inputs
    skips = []
    for d, f in enumerate(filters):
        if d > 0:
            x = keras.layers.MaxPooling3D(2, name=f"{name}_pool{d}")(x)
        x = _conv_block(x, f, convs_per_level, dropout, f"{name}_down{d}")
        skips.append(x)
    if decoder:
        for d in range(depth - 2, -1, -1):
            if upsampling == "upsample":
                x = keras.layers.UpSampling3D(2, name=f"{name}_up{d}")(x)
            else:
                x = keras.layers.Conv3DTranspose(
                    filters[d], 2, strides=2, kernel_initializer="he_normal",
                    name=f"{name}_up{d}",
                )(x)
            x = keras.layers.Concatenate(axis=-1, name=f"{name}_concat{d}")([skips[d], x])
            x = _conv_block(x, filters[d], convs_per_level, dropout, f"{name}_dec{d}")
    head_init = ("he_normal" if out_init_std is None
                 else keras.initializers.RandomNormal(stddev=float(out_init_std)))
    outputs = keras.layers.Conv3D(
        int(out_channels),
        1,
        activation=out_activation,
        kernel_initializer=head_init,
        name=f"{name}_out",
    )(x)
    return keras.Model(inputs, outputs, name=name)


_build_unet = unet  # the builder, reachable where a parameter is named ``unet``


def _unet_kwargs(cfg_unet: dict) -> dict:
    return {
        "filters": [int(f) for f in cfg_unet.get("filters", (16, 32, 64, 128))],
        "convs_per_level": int(cfg_unet.get("convs_per_level", 1)),
        "dropout": float(cfg_unet.get("dropout", 0.0)),
        "upsampling": str(cfg_unet.get("upsampling", "upsample")),
    }


# ----------------------------------------------------------------------------------------
# Loc-Net: U-Net + centre of mass
# ----------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="locnet")
class LocNet(keras.layers.Layer):
    """Loc-Net: U-Net with K non-negative output maps followed by a centre-of-mass layer.

    ``(B, n, n, n, 1) -> (B, K, 3)`` voxel coordinates of the input. ``self.net`` is the
    U-Net (maps via :meth:`maps`). Shift equivariant up to padding and pooling-grid
    effects: the output map is pointwise, the CoM moves with the mass.

    Output activation: ``softplus`` (default) or ``relu`` (the paper). ReLU maps give exact
    zeros (sharp CoM) but a map whose pre-activations are all negative is dead: the CoM
    layer then predicts the centre (see :func:`locnet.layers.center_of_mass`) and no
    gradient reaches the network again. Softplus is strictly positive with a nowhere-zero
    derivative, so a map can never die; the network still learns a near-sparse map by
    driving background pre-activations negative, and the CoM is unaffected by the
    (scale-free) normalisation.
    """

    def __init__(
        self,
        input_size: int,
        out_channels: int,
        unet: dict | None = None,
        out_activation: str = "softplus",
        com_epsilon: float = 1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.input_size = int(input_size)
        self.out_channels = int(out_channels)
        self.unet_config = _unet_kwargs(unet or {})
        self.out_activation = str(out_activation)
        self.com_epsilon = float(com_epsilon)
        n = self.input_size
        self.net = _build_unet(
            (n, n, n, 1),
            self.out_channels,
            out_activation=self.out_activation,
            name=f"{self.name}_unet",
            **self.unet_config,
        )
        self.com = CenterOfMass(self.com_epsilon, name=f"{self.name}_com")
        self.built = True

    def maps(self, x, training=None):
        return self.net(x, training=training)

    def call(self, x, training=None):
        return self.com(self.net(x, training=training))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.out_channels, 3)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "input_size": self.input_size,
                "out_channels": self.out_channels,
                "unet": dict(self.unet_config),
                "out_activation": self.out_activation,
                "com_epsilon": self.com_epsilon,
            }
        )
        return config


# ----------------------------------------------------------------------------------------
# Base model
# ----------------------------------------------------------------------------------------
def _masked_mean(values, mask):
    """Mean of ``values`` (B, K) over entries with ``mask > 0``; 0 when none is valid."""
    valid = ops.cast(mask > 0, values.dtype)
    values = ops.where(valid > 0, values, 0.0)
    return ops.sum(values * valid) / ops.maximum(ops.sum(valid), 1.0)


class LandmarkModel(keras.Model):
    """Common base: grid geometry, ``loss_weights`` variable, per-level loss trackers."""

    def __init__(
        self,
        finest_shape: int,
        finest_spacing_mm: float,
        n_levels: int,
        landmarks,
        loss_levels,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.finest_shape = int(finest_shape)
        self.finest_spacing_mm = float(finest_spacing_mm)
        self.n_levels = int(n_levels)
        self.landmarks = [str(n) for n in landmarks]
        self.n_landmarks = len(self.landmarks)
        if self.n_landmarks < 1:
            raise ValueError("at least one landmark is needed")
        if self.finest_shape % (2 ** (self.n_levels - 1)):
            raise ValueError("finest_shape must be divisible by 2^(levels-1)")
        self.loss_levels = tuple(int(l) for l in loss_levels)
        self.loss_weights = self.add_weight(
            name="loss_weights",
            shape=(len(self.loss_levels),),
            initializer=keras.initializers.Ones(),
            trainable=False,
        )
        self.level_trackers = [
            keras.metrics.Mean(name=f"loss_level{l}") for l in self.loss_levels
        ]

    # geometry -------------------------------------------------------------------------
    def level_size(self, level: int) -> int:
        return self.finest_shape // 2**level

    def level_spacing(self, level: int) -> float:
        return self.finest_spacing_mm * 2**level

    def to_mm(self, v, level: int):
        return voxel_to_mm(v, level, self.finest_spacing_mm)

    def to_voxel(self, g, level: int):
        return mm_to_voxel(g, level, self.finest_spacing_mm)

    # keras plumbing -------------------------------------------------------------------
    def build(self, *args, **kwargs):
        # Every weight is created in __init__ (shapes follow from the grid), so building
        # is a no-op; this also makes `.keras` reloading independent of input shapes.
        self.built = True

    def _base_config(self):
        config = super().get_config()
        config.update(
            {
                "finest_shape": self.finest_shape,
                "finest_spacing_mm": self.finest_spacing_mm,
                "n_levels": self.n_levels,
                "landmarks": list(self.landmarks),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def _finish_loss(self, total):
        if self.losses:
            total = total + ops.sum(ops.stack([ops.sum(l) for l in self.losses]))
        return total

    def position_loss(self, pred_mm, y):
        """Mean over valid landmarks of the squared Euclidean error (mm^2)."""
        target = ops.cast(y["position"], pred_mm.dtype)
        d2 = ops.sum(ops.square(pred_mm - target), axis=-1)
        return _masked_mean(d2, y["mask"])


# ----------------------------------------------------------------------------------------
# heatmap_unet
# ----------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="locnet")
class HeatmapUNet(LandmarkModel):
    """Heatmap regression U-Net on the whole level ``level`` (Table 1, first row).

    K output channels regress Gaussian heatmaps (standard deviation ``heatmap_sigma_mm``,
    peak ``heatmap_peak``) built inside the loss from the target positions. Position:
    per-channel argmax refined to sub-voxel precision by a per-axis quadratic fit
    (:func:`locnet.layers.decode_heatmap`), in grid mm; not differentiable and not used by
    the loss. Outputs ``"position"``, ``"heatmap"`` (B, n, n, n, K).

    Why the loss is not a plain sum of squares over the volume: a Gaussian of 6 mm covers a
    few hundred of the 64^3 voxels, so an all-zero map is an excellent answer to the plain
    L2 loss, and a He-initialised linear head starts with outputs of unit scale over every
    voxel (an initial loss ~40x that of the zero map). The network then learns the zero map
    first, its ReLU units die on the way, and it never leaves it. Three standard remedies of
    heatmap regression, all on by default:

    * the head starts near zero (kernel N(0, 1e-3^2), zero bias): the first loss equals the
      zero map's, and nothing has to be unlearned;
    * targets are scaled to ``heatmap_peak`` (100), so the foreground's gradient is not lost
      against float32 rounding and Adam's epsilon;
    * the squared error is weighted per voxel by ``1 + lambda * target / peak`` and averaged
      with those weights: ``heatmap_foreground_weight`` is ``lambda`` (default 10; 0 gives the
      plain mean L2 loss; ``balanced`` sets ``lambda = n^3 / sum(target/peak)`` so that the
      foreground's total weight equals the background's).

    Measured on the default study's cohort (``benchmarks/heatmap_training.py``, 10 epochs):
    the plain loss stays at the zero map; ``balanced`` learns the Gaussians but leaves false
    peaks at the mirror-image bifurcation, which cost it almost nothing (about 30 mm error);
    ``lambda = 10`` keeps the background's errors expensive and reaches about 7 mm.

    Per landmark the weighted mean is taken over voxels, then averaged over valid landmarks
    (``loss_level{level}``).
    """

    def __init__(
        self,
        finest_shape,
        finest_spacing_mm,
        n_levels,
        landmarks,
        level: int = 1,
        unet: dict | None = None,
        heatmap_sigma_mm: float = 6.0,
        heatmap_activation: str = "linear",
        heatmap_peak: float = 100.0,
        heatmap_foreground_weight=10.0,
        head_init_std: float | None = 1e-3,
        **kwargs,
    ):
        self.level = int(level)
        super().__init__(
            finest_shape, finest_spacing_mm, n_levels, landmarks, (self.level,), **kwargs
        )
        self.unet_config = _unet_kwargs(unet or {})
        self.heatmap_sigma_mm = float(heatmap_sigma_mm)
        self.heatmap_activation = str(heatmap_activation)
        self.heatmap_peak = float(heatmap_peak)
        if self.heatmap_peak <= 0:
            raise ValueError(f"heatmap_peak must be > 0, got {heatmap_peak}")
        fg = heatmap_foreground_weight
        if not (fg == "balanced" or (isinstance(fg, (int, float)) and float(fg) >= 0)):
            raise ValueError(
                f"heatmap_foreground_weight must be 'balanced' or a number >= 0, got {fg!r}"
            )
        self.heatmap_foreground_weight = fg if fg == "balanced" else float(fg)
        self.head_init_std = None if head_init_std is None else float(head_init_std)
        self.input_levels = (self.level,)
        n = self.level_size(self.level)
        self.net = _build_unet(
            (n, n, n, 1),
            self.n_landmarks,
            out_activation=self.heatmap_activation,
            name=f"heatmap_unet_level{self.level}",
            out_init_std=self.head_init_std,
            **self.unet_config,
        )
        self.built = True

    def call(self, inputs, training=None):
        hm = self.net(inputs[f"level{self.level}"], training=training)
        pos = self.to_mm(decode_heatmap(hm), self.level)
        return {"position": pos, "heatmap": hm}

    def target_heatmaps(self, positions_mm):
        """(B, K, 3) grid mm -> (B, n, n, n, K) Gaussian heatmaps of peak 1 on level ``level``."""
        n = self.level_size(self.level)
        sigma = self.heatmap_sigma_mm / self.level_spacing(self.level)
        v = self.to_voxel(ops.cast(positions_mm, "float32"), self.level)  # (B, K, 3)
        r = ops.reshape(ops.arange(n, dtype="float32"), (1, 1, n))
        g = [ops.exp(-ops.square(r - v[..., a : a + 1]) / (2.0 * sigma**2)) for a in range(3)]
        h = (
            g[0][:, :, :, None, None]
            * g[1][:, :, None, :, None]
            * g[2][:, :, None, None, :]
        )  # (B, K, n, n, n)
        return ops.transpose(h, (0, 2, 3, 4, 1))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        hm = y_pred["heatmap"]
        unit = ops.cast(self.target_heatmaps(y["position"]), hm.dtype)  # peak 1
        per_lm = self.heatmap_loss(hm, unit)
        loss = _masked_mean(per_lm, y["mask"])
        self.level_trackers[0].update_state(loss)
        return self._finish_loss(self.loss_weights[0] * loss)

    def heatmap_loss(self, hm, unit):
        """Per case and landmark (B, K): the foreground-weighted mean squared error of ``hm``
        against the targets ``heatmap_peak * unit`` (``unit``: Gaussians of peak 1)."""
        fg = self.heatmap_foreground_weight
        if fg == "balanced":
            n_vox = float(np.prod([int(d) for d in unit.shape[1:4]]))
            lam = n_vox / ops.maximum(ops.sum(unit, axis=(1, 2, 3), keepdims=True), 1e-6)
        else:
            lam = fg
        weight = 1.0 + ops.stop_gradient(lam * unit)
        err = ops.square(hm - self.heatmap_peak * unit)
        return ops.sum(weight * err, axis=(1, 2, 3)) / ops.sum(weight, axis=(1, 2, 3))

    def get_config(self):
        config = self._base_config()
        config.update(
            {
                "level": self.level,
                "unet": dict(self.unet_config),
                "heatmap_sigma_mm": self.heatmap_sigma_mm,
                "heatmap_activation": self.heatmap_activation,
                "heatmap_peak": self.heatmap_peak,
                "heatmap_foreground_weight": self.heatmap_foreground_weight,
                "head_init_std": self.head_init_std,
            }
        )
        return config


# ----------------------------------------------------------------------------------------
# locnet_single
# ----------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="locnet")
class SingleLocNet(LandmarkModel):
    """Single-scale Loc-Net on the whole level ``level`` (paper: level 1 = 1 mm).

    U-Net with K maps + centre of mass; loss: squared Euclidean error in mm averaged over
    valid landmarks (``loss_level{level}``). Outputs ``"position"`` and ``"level{level}"``.
    """

    def __init__(
        self,
        finest_shape,
        finest_spacing_mm,
        n_levels,
        landmarks,
        level: int = 1,
        unet: dict | None = None,
        out_activation: str = "softplus",
        com_epsilon: float = 1e-6,
        **kwargs,
    ):
        self.level = int(level)
        super().__init__(
            finest_shape, finest_spacing_mm, n_levels, landmarks, (self.level,), **kwargs
        )
        self.input_levels = (self.level,)
        self.locnet = LocNet(
            self.level_size(self.level),
            self.n_landmarks,
            unet=unet,
            out_activation=out_activation,
            com_epsilon=com_epsilon,
            name=f"locnet_level{self.level}",
        )
        self.level_nets = {self.level: self.locnet}
        self.built = True

    def call(self, inputs, training=None):
        v = self.locnet(inputs[f"level{self.level}"], training=training)
        g = self.to_mm(v, self.level)
        return {"position": g, f"level{self.level}": g}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = self.position_loss(y_pred["position"], y)
        self.level_trackers[0].update_state(loss)
        return self._finish_loss(self.loss_weights[0] * loss)

    def get_config(self):
        config = self._base_config()
        config.update(
            {
                "level": self.level,
                "unet": dict(self.locnet.unet_config),
                "out_activation": self.locnet.out_activation,
                "com_epsilon": self.locnet.com_epsilon,
            }
        )
        return config


# ----------------------------------------------------------------------------------------
# patch_baseline (Noothout et al. 2018)
# ----------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="locnet")
class PatchBaseline(LandmarkModel):
    """Patch classification + displacement regression (Noothout et al., MIDL 2018).

    A fully convolutional network analyses the whole level ``level``; each output cell
    stands for one image patch (a cell of ``c^3`` voxels, ``c = 2^(len(filters) - 1)``, the
    output stride). Per cell and landmark it predicts a classification logit ("the landmark
    lies in this cell") and a 3D displacement from the cell centre to the landmark.
    Prediction: the mean of ``cell centre + displacement`` over cells with probability
    above ``cls_threshold`` (0.5); if no cell is positive, the most probable cell's
    estimate. Loss per landmark: class-balanced binary cross-entropy (mean over positive
    cells + mean over negative cells) + ``regression_weight`` x L1 displacement error
    (in cell widths, summed over axes) averaged over the cells whose centre lies within
    ``regress_radius_mm`` of the landmark (default: two cell widths); averaged over valid
    landmarks. Logged as ``loss_level{level}`` (total), ``loss_cls``, ``loss_reg``.

    Network: the shared U-Net builder with ``decoder=False`` (its encoder: conv blocks and
    max pooling, then the 1x1x1 head), i.e. an FCN with output stride ``c``; displacements
    are predicted in cell widths and scaled to mm. Outputs ``"position"`` (grid mm),
    ``"logits"`` (B, m, m, m, K) and ``"displacement"`` (B, m, m, m, K, 3) in mm.

    Deviations from the paper: whole-level FCN training instead of sampled patches (the
    class-balanced BCE stands in for balanced patch sampling); the network is this study's
    U-Net encoder rather than the original architecture; positives are the single cell
    containing the landmark; regression is restricted to cells near the landmark.
    """

    def __init__(
        self,
        finest_shape,
        finest_spacing_mm,
        n_levels,
        landmarks,
        level: int = 1,
        unet: dict | None = None,
        regress_radius_mm: float | None = None,
        regression_weight: float = 1.0,
        cls_threshold: float = 0.5,
        **kwargs,
    ):
        self.level = int(level)
        super().__init__(
            finest_shape, finest_spacing_mm, n_levels, landmarks, (self.level,), **kwargs
        )
        self.input_levels = (self.level,)
        self.unet_config = _unet_kwargs(unet or {})
        self.cell = 2 ** (len(self.unet_config["filters"]) - 1)
        self.cell_mm = self.cell * self.level_spacing(self.level)
        self.regress_radius_mm = (
            2.0 * self.cell_mm if regress_radius_mm is None else float(regress_radius_mm)
        )
        self.regression_weight = float(regression_weight)
        self.cls_threshold = float(cls_threshold)
        n = self.level_size(self.level)
        self.n_cells = n // self.cell
        k = self.n_landmarks
        self.net = _build_unet(
            (n, n, n, 1),
            4 * k,
            out_activation="linear",
            decoder=False,
            name=f"patch_fcn_level{self.level}",
            **self.unet_config,
        )
        m = self.n_cells
        idx = np.stack(np.meshgrid(*([np.arange(m)] * 3), indexing="ij"), -1).reshape(-1, 3)
        self._cell_index = idx.astype("float32")  # (C, 3)
        centres_vox = self.cell * idx + (self.cell - 1) / 2.0
        self._cell_centres_mm = np.asarray(
            voxel_to_mm(centres_vox, self.level, self.finest_spacing_mm), "float32"
        )
        self.cls_tracker = keras.metrics.Mean(name="loss_cls")
        self.reg_tracker = keras.metrics.Mean(name="loss_reg")
        self.built = True

    def call(self, inputs, training=None):
        k, m = self.n_landmarks, self.n_cells
        out = self.net(inputs[f"level{self.level}"], training=training)
        logits = out[..., :k]
        disp = ops.reshape(out[..., k:], (-1, m, m, m, k, 3)) * self.cell_mm
        return {"position": self.decode(logits, disp), "logits": logits, "displacement": disp}

    def decode(self, logits, disp):
        """Position (B, K, 3) grid mm from logits (B, m, m, m, K) and displacements (mm)."""
        k, c = self.n_landmarks, self.n_cells**3
        lf = ops.reshape(logits, (-1, c, k))
        df = ops.reshape(disp, (-1, c, k, 3))
        prob = ops.sigmoid(lf)
        w = ops.cast(prob > self.cls_threshold, prob.dtype)
        none = ops.sum(w, axis=1, keepdims=True) <= 0.0
        best = ops.transpose(ops.one_hot(ops.argmax(prob, axis=1), c, dtype=prob.dtype), (0, 2, 1))
        w = ops.where(none, best, w)
        cand = ops.convert_to_tensor(self._cell_centres_mm)[None, :, None, :] + df
        pos = ops.sum(w[..., None] * cand, axis=1) / ops.sum(w, axis=1)[..., None]
        return ops.stop_gradient(pos)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        k, c = self.n_landmarks, self.n_cells**3
        lf = ops.reshape(y_pred["logits"], (-1, c, k))
        df = ops.reshape(y_pred["displacement"], (-1, c, k, 3))
        target = ops.cast(y["position"], lf.dtype)  # (B, K, 3)
        v = self.to_voxel(target, self.level)
        cell = ops.floor((v + 0.5) / self.cell)
        grid = ops.convert_to_tensor(self._cell_index)
        pos = ops.cast(
            ops.all(ops.equal(grid[None, :, None, :], cell[:, None, :, :]), axis=-1),
            lf.dtype,
        )  # (B, C, K)
        neg = 1.0 - pos
        bce = ops.sum(pos * ops.softplus(-lf), axis=1) / ops.maximum(
            ops.sum(pos, axis=1), 1.0
        ) + ops.sum(neg * ops.softplus(lf), axis=1) / ops.maximum(ops.sum(neg, axis=1), 1.0)
        centres = ops.convert_to_tensor(self._cell_centres_mm)
        disp_t = target[:, None, :, :] - centres[None, :, None, :]  # (B, C, K, 3)
        near = ops.cast(
            ops.sqrt(ops.sum(ops.square(disp_t), axis=-1)) <= self.regress_radius_mm,
            lf.dtype,
        )
        l1 = ops.sum(ops.abs(df - disp_t), axis=-1) / self.cell_mm
        reg = ops.sum(near * l1, axis=1) / ops.maximum(ops.sum(near, axis=1), 1.0)
        cls_loss = _masked_mean(bce, y["mask"])
        reg_loss = _masked_mean(reg, y["mask"])
        loss = cls_loss + self.regression_weight * reg_loss
        self.cls_tracker.update_state(cls_loss)
        self.reg_tracker.update_state(reg_loss)
        self.level_trackers[0].update_state(loss)
        return self._finish_loss(self.loss_weights[0] * loss)

    def get_config(self):
        config = self._base_config()
        config.update(
            {
                "level": self.level,
                "unet": dict(self.unet_config),
                "regress_radius_mm": self.regress_radius_mm,
                "regression_weight": self.regression_weight,
                "cls_threshold": self.cls_threshold,
            }
        )
        return config


# ----------------------------------------------------------------------------------------
# Multi-scale chain
# ----------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="locnet")
class MultiScaleLocNet(LandmarkModel):
    """Coarse-to-fine chain of Loc-Nets with differentiable crops (the paper's method).

    Level ``L-1`` (coarsest): a Loc-Net on the whole level gives K centres. For each finer
    level ``l = L-2 ... 0``: the previous centres (grid mm) are converted to level-``l``
    voxels, a ``P^3`` patch is cut around each landmark's centre by trilinear resampling
    (:class:`~locnet.layers.CropResample`), and one Loc-Net per level, *shared by all
    landmarks*, with K output maps processes the K patches as a batch; the patch of
    landmark ``k`` uses map ``k`` (channel ``k`` selects landmark ``k``, so the shared
    network still specialises per landmark while patch content and weights are shared).
    Its CoM ``q`` maps back to the level as ``centre - (P - 1) / 2 + q`` and then to grid
    mm. Outputs ``"level{l}"`` for every level and ``"position"`` (= level 0).

    * ``stop_gradient=False`` (``multiscale_e2e``): gradients flow through the crop
      centres (both the additive term and the resampling weights) into coarser nets.
    * ``noise_mm > 0`` (``multiscale_e2e_noise``): ``U(-noise_mm, +noise_mm)`` per axis is
      added to the centre before the finest crop, in training, when called with
      ``noise=True``, or deterministically with ``finest_shift_mm`` (test-time passes).
    * ``stop_gradient=True`` (``multiscale_multistep``): centres are constants between
      levels, so each level's loss trains only its own net. Train one level at a time,
      coarse to fine: set ``loss_weights`` one-hot (``schedules.level_weights("multistep",
      ...)``) and freeze finished levels with ``model.level_nets[l].trainable = False``
      followed by a new ``model.compile(...)`` (required for the change to take effect;
      freezing also stops Adam's momentum from moving finished levels).

    Loss: ``sum_l loss_weights[l] * loss_level{l}``, each the squared Euclidean error (mm^2)
    averaged over valid landmarks. ``model.level_nets[l]`` is the :class:`LocNet` of level l.
    """

    def __init__(
        self,
        finest_shape,
        finest_spacing_mm,
        n_levels,
        landmarks,
        patch: int = 16,
        unet: dict | None = None,
        out_activation: str = "softplus",
        com_epsilon: float = 1e-6,
        stop_gradient: bool = False,
        noise_mm: float = 0.0,
        background: float = 0.0,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(
            finest_shape,
            finest_spacing_mm,
            n_levels,
            landmarks,
            tuple(range(int(n_levels))),
            **kwargs,
        )
        if self.n_levels < 2:
            raise ValueError("a multi-scale chain needs at least 2 levels")
        self.patch = int(patch)
        self.stop_gradient = bool(stop_gradient)
        self.noise_mm = float(noise_mm)
        self.background = float(background)
        self.seed = None if seed is None else int(seed)
        self.input_levels = tuple(range(self.n_levels))
        top = self.n_levels - 1
        self.level_nets = [
            LocNet(
                self.level_size(top) if l == top else self.patch,
                self.n_landmarks,
                unet=unet,
                out_activation=out_activation,
                com_epsilon=com_epsilon,
                name=f"locnet_level{l}",
            )
            for l in range(self.n_levels)
        ]
        self.crop = CropResample(self.patch, self.background, name="crop")
        self.com = CenterOfMass(com_epsilon, name="patch_com")
        self.noise = RandomShift(self.noise_mm, seed=self.seed, name="finest_noise")
        self.built = True

    # pieces used by call() and predict_passes() --------------------------------------
    def coarsest(self, inputs, training=None):
        top = self.n_levels - 1
        v = self.level_nets[top](inputs[f"level{top}"], training=training)
        return self.to_mm(v, top)

    def refine(self, level: int, volume, centres_mm, training=None):
        """One finer stage: centres (B, M, 3) grid mm -> (B, M, 3) grid mm at ``level``.

        ``M`` may be any multiple of K: entry ``m`` is treated as landmark ``m mod K``
        (used to run many test-time passes as one batch).
        """
        k, p = self.n_landmarks, self.patch
        m = int(centres_mm.shape[1])
        v = self.to_voxel(centres_mm, level)
        patches = self.crop(volume, v)  # (B, M, P, P, P, 1)
        maps = self.level_nets[level].maps(
            ops.reshape(patches, (-1, p, p, p, 1)), training=training
        )  # (B*M, P, P, P, K)
        select = np.eye(k, dtype="float32")[np.arange(m) % k]  # (M, K)
        maps = ops.reshape(maps, (-1, m, p, p, p, k))
        sel = ops.sum(
            maps * ops.convert_to_tensor(select)[None, :, None, None, None, :],
            axis=-1,
            keepdims=True,
        )
        q = self.com(ops.reshape(sel, (-1, p, p, p, 1)))  # (B*M, 1, 3)
        q = ops.reshape(q, (-1, m, 3))
        return self.to_mm(patch_to_volume(v, q, p), level)

    def _link(self, g):
        return ops.stop_gradient(g) if self.stop_gradient else g

    def call(self, inputs, training=None, finest_shift_mm=None, noise=None):
        top = self.n_levels - 1
        g = self.coarsest(inputs, training=training)
        out = {f"level{top}": g}
        for level in range(top - 1, -1, -1):
            c = self._link(g)
            if level == 0:
                if finest_shift_mm is not None:
                    c = c + ops.cast(finest_shift_mm, c.dtype)
                else:
                    c = self.noise(c, training=training, active=noise)
            g = self.refine(level, inputs[f"level{level}"], c, training=training)
            out[f"level{level}"] = g
        out["position"] = g
        return out

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        total = 0.0
        for i, level in enumerate(self.loss_levels):
            loss = self.position_loss(y_pred[f"level{level}"], y)
            self.level_trackers[i].update_state(loss)
            total = total + self.loss_weights[i] * loss
        return self._finish_loss(total)

    def get_config(self):
        config = self._base_config()
        net = self.level_nets[0]
        config.update(
            {
                "patch": self.patch,
                "unet": dict(net.unet_config),
                "out_activation": net.out_activation,
                "com_epsilon": net.com_epsilon,
                "stop_gradient": self.stop_gradient,
                "noise_mm": self.noise_mm,
                "background": self.background,
                "seed": self.seed,
            }
        )
        return config


# ----------------------------------------------------------------------------------------
# Test-time noise passes
# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------
def _merge(defaults: dict, cfg: dict) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in (cfg or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_model(method: str, cfg: dict, grid: dict) -> keras.Model:
    """Build the model of ``method`` from its config block and the pyramid grid.

    ``cfg``: the method's block merged with shared defaults (missing keys fall back to
    :data:`MODEL_DEFAULTS`); must contain ``"landmarks"`` (list of names).
    ``grid``: ``{"finest_shape": N0, "finest_spacing_mm": s0, "levels": L}``.
    Keys used: ``level`` (single-level methods), ``unet``, ``out_activation``,
    ``com_epsilon`` (Loc-Nets), ``patch``, ``background``, ``seed`` (multi-scale),
    ``noise_mm`` (``multiscale_e2e_noise`` only), ``heatmap_sigma_mm``,
    ``heatmap_activation`` (heatmap), ``regress_radius_mm``, ``regression_weight``,
    ``cls_threshold`` (patch baseline). Other keys (``schedule``, training settings) are
    ignored here.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    c = _merge(MODEL_DEFAULTS, cfg)
    if "landmarks" not in c or not c["landmarks"]:
        raise ValueError("cfg must list the landmarks")
    common = {
        "finest_shape": int(grid["finest_shape"]),
        "finest_spacing_mm": float(grid["finest_spacing_mm"]),
        "n_levels": int(grid["levels"]),
        "landmarks": list(c["landmarks"]),
        "name": method,
    }
    level = int(c["level"])
    if not method.startswith("multiscale"):
        if not 0 <= level < common["n_levels"]:
            raise ValueError(f"level {level} outside the pyramid (levels: {common['n_levels']})")
    unet_cfg = _unet_kwargs(c["unet"])
    if method == "heatmap_unet":
        return HeatmapUNet(
            level=level,
            unet=unet_cfg,
            heatmap_sigma_mm=float(c["heatmap_sigma_mm"]),
            heatmap_activation=str(c["heatmap_activation"]),
            heatmap_peak=float(c["heatmap_peak"]),
            heatmap_foreground_weight=c["heatmap_foreground_weight"],
            **common,
        )
    if method == "locnet_single":
        return SingleLocNet(
            level=level,
            unet=unet_cfg,
            out_activation=str(c["out_activation"]),
            com_epsilon=float(c["com_epsilon"]),
            **common,
        )
    if method == "patch_baseline":
        radius = c["regress_radius_mm"]
        return PatchBaseline(
            level=level,
            unet=unet_cfg,
            regress_radius_mm=None if radius is None else float(radius),
            regression_weight=float(c["regression_weight"]),
            cls_threshold=float(c["cls_threshold"]),
            **common,
        )
    return MultiScaleLocNet(
        patch=int(c["patch"]),
        unet=unet_cfg,
        out_activation=str(c["out_activation"]),
        com_epsilon=float(c["com_epsilon"]),
        stop_gradient=method == "multiscale_multistep",
        noise_mm=float(c["noise_mm"]) if method == "multiscale_e2e_noise" else 0.0,
        background=float(c["background"]),
        seed=None if c.get("seed") is None else int(c["seed"]),
        **common,
    )
