"""Method ``patch_baseline``: patch classification and displacement regression (Noothout et al. 2018)."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from locnet.geometry import voxel_to_grid_mm
from locnet.models.base import LandmarkModel, masked_mean
from locnet.models.unet import build_unet, unet_kwargs

__all__ = ['PatchBaseline', 'build']


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
    are predicted in cell widths and scaled to mm. With ``cell_voxels`` the whole U-Net
    (encoder and decoder) runs instead and its outputs are averaged over cells of
    ``cell_voxels^3`` voxels: finer cells that still see the whole level's context. With
    ``positive_weight`` w the cross-entropy weighs a positive cell as w negatives instead of
    balancing the two classes; ``label_sigma_mm`` gives soft class targets (:meth:`cell_labels`).
    Outputs ``"position"`` (grid mm), ``"logits"`` (B, m, m, m, K) and ``"displacement"``
    (B, m, m, m, K, 3) in mm.

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
        cell_voxels: int | None = None,
        label_sigma_mm: float | None = None,
        positive_weight: float | None = None,
        **kwargs,
    ):
        self.level = int(level)
        super().__init__(
            finest_shape, finest_spacing_mm, n_levels, landmarks, (self.level,), **kwargs
        )
        self.input_levels = (self.level,)
        self.unet_config = unet_kwargs(unet or {})
        self.cell_voxels = None if cell_voxels is None else int(cell_voxels)
        # encoder only (output stride = the cell), or the whole U-Net averaged over cells
        decoder = self.cell_voxels is not None
        self.cell = self.cell_voxels if decoder else 2 ** (len(self.unet_config["filters"]) - 1)
        self.cell_mm = self.cell * self.level_spacing(self.level)
        self.regress_radius_mm = (
            2.0 * self.cell_mm if regress_radius_mm is None else float(regress_radius_mm)
        )
        self.regression_weight = float(regression_weight)
        self.cls_threshold = float(cls_threshold)
        self.label_sigma_mm = None if label_sigma_mm is None else float(label_sigma_mm)
        self.positive_weight = None if positive_weight is None else float(positive_weight)
        n = self.level_size(self.level)
        if n % self.cell:
            raise ValueError(f"patch_baseline: level {self.level} ({n} voxels) is not divisible "
                             f"into cells of {self.cell} voxels")
        self.n_cells = n // self.cell
        k = self.n_landmarks
        self.net = build_unet(
            (n, n, n, 1),
            4 * k,
            out_activation="linear",
            decoder=decoder,
            name=f"patch_fcn_level{self.level}",
            **self.unet_config,
        )
        self.pool = keras.layers.AveragePooling3D(self.cell, name="cells") if decoder else None
        m = self.n_cells
        idx = np.stack(np.meshgrid(*([np.arange(m)] * 3), indexing="ij"), -1).reshape(-1, 3)
        self._cell_index = idx.astype("float32")  # (C, 3)
        centres_vox = self.cell * idx + (self.cell - 1) / 2.0
        self._cell_centres_mm = np.asarray(
            voxel_to_grid_mm(centres_vox, self.level, self.finest_spacing_mm), "float32"
        )
        self.cls_tracker = keras.metrics.Mean(name="loss_cls")
        self.reg_tracker = keras.metrics.Mean(name="loss_reg")
        self.built = True

    def call(self, inputs, training=None):
        k, m = self.n_landmarks, self.n_cells
        out = self.net(inputs[f"level{self.level}"], training=training)
        if self.pool is not None:
            out = self.pool(out)
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

    def cell_labels(self, target, disp_t):
        """Class targets (B, C, K): 1 for the cell holding the landmark, else 0; with
        ``label_sigma_mm`` a Gaussian of the distance from the cell centre to the landmark
        (soft labels: a cell next to the landmark's is not a full negative)."""
        if self.label_sigma_mm is not None:
            d2 = ops.sum(ops.square(disp_t), axis=-1)
            return ops.exp(-0.5 * d2 / self.label_sigma_mm**2)
        v = self.to_voxel(target, self.level)
        cell = ops.floor((v + 0.5) / self.cell)
        grid = ops.convert_to_tensor(self._cell_index)
        return ops.cast(
            ops.all(ops.equal(grid[None, :, None, :], cell[:, None, :, :]), axis=-1),
            target.dtype,
        )

    def class_loss(self, lf, pos):
        """Cross-entropy (B, K) of the cell logits ``lf`` (B, C, K) against the class targets
        ``pos`` (B, C, K; negatives ``1 - pos``): balanced (the mean over positive cells + the
        mean over negative ones), or with ``positive_weight`` w the weighted mean in which a
        positive cell counts w times a negative one."""
        lf, pos = ops.convert_to_tensor(lf), ops.convert_to_tensor(pos)
        neg = 1.0 - pos
        pos_term = ops.sum(pos * ops.softplus(-lf), axis=1)
        neg_term = ops.sum(neg * ops.softplus(lf), axis=1)
        if self.positive_weight is None:
            return pos_term / ops.maximum(ops.sum(pos, axis=1), 1e-6) + neg_term / ops.maximum(
                ops.sum(neg, axis=1), 1.0)
        w = self.positive_weight
        return (w * pos_term + neg_term) / (w * ops.sum(pos, axis=1) + ops.sum(neg, axis=1))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        k, c = self.n_landmarks, self.n_cells**3
        lf = ops.reshape(y_pred["logits"], (-1, c, k))
        df = ops.reshape(y_pred["displacement"], (-1, c, k, 3))
        target = ops.cast(y["position"], lf.dtype)  # (B, K, 3)
        centres = ops.convert_to_tensor(self._cell_centres_mm)
        disp_t = target[:, None, :, :] - centres[None, :, None, :]  # (B, C, K, 3)
        bce = self.class_loss(lf, self.cell_labels(target, disp_t))
        near = ops.cast(
            ops.sqrt(ops.sum(ops.square(disp_t), axis=-1)) <= self.regress_radius_mm,
            lf.dtype,
        )
        l1 = ops.sum(ops.abs(df - disp_t), axis=-1) / self.cell_mm
        reg = ops.sum(near * l1, axis=1) / ops.maximum(ops.sum(near, axis=1), 1.0)
        cls_loss = masked_mean(bce, y["mask"])
        reg_loss = masked_mean(reg, y["mask"])
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
                "cell_voxels": self.cell_voxels,
                "label_sigma_mm": self.label_sigma_mm,
                "positive_weight": self.positive_weight,
            }
        )
        return config


def build(c: dict, common: dict) -> PatchBaseline:
    """``patch_baseline`` from its merged config block ``c`` (see :func:`locnet.models.build_model`)."""
    radius = c["regress_radius_mm"]
    return PatchBaseline(
        level=int(c["level"]),
        unet=unet_kwargs(c["unet"]),
        regress_radius_mm=None if radius is None else float(radius),
        regression_weight=float(c["regression_weight"]),
        cls_threshold=float(c["cls_threshold"]),
        cell_voxels=None if c["cell_voxels"] is None else int(c["cell_voxels"]),
        label_sigma_mm=None if c["label_sigma_mm"] is None else float(c["label_sigma_mm"]),
        positive_weight=None if c["positive_weight"] is None else float(c["positive_weight"]),
        **common,
    )
