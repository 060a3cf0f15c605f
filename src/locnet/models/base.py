"""The base class of every method's model: grid geometry, loss weights, per-level losses."""

from __future__ import annotations

import keras
from keras import ops

from locnet.config import defaults
from locnet.geometry import grid_mm_to_voxel, voxel_to_grid_mm
from locnet.models.maps import gaussian_maps, map_prior_loss

__all__ = ["LandmarkModel", "masked_mean", "map_supervision_config", "MAP_SUPERVISION_OFF"]

#: The map prior switched off: the paper's Loc-Net (centre-of-mass loss alone).
MAP_SUPERVISION_OFF = defaults("definitions", "map_supervision")  # the schema's: weight 0


def masked_mean(values, mask):
    """Mean of ``values`` (B, K) over entries with ``mask > 0``; 0 when none is valid."""
    valid = ops.cast(mask > 0, values.dtype)
    values = ops.where(valid > 0, values, 0.0)
    return ops.sum(values * valid) / ops.maximum(ops.sum(valid), 1.0)


def map_supervision_config(value) -> dict:
    """A complete ``map_supervision`` block (weight, sigma_voxels, threshold, peak) from a
    partial one or ``None`` (off)."""
    out = {**MAP_SUPERVISION_OFF, **(value or {})}
    out = {k: float(out[k]) for k in MAP_SUPERVISION_OFF}
    if (out["weight"] < 0 or out["sigma_voxels"] <= 0 or not 0 <= out["threshold"] < 1
            or out["peak"] <= 0):
        raise ValueError("map_supervision: weight >= 0, sigma_voxels > 0, 0 <= threshold < 1 "
                         f"and peak > 0, got {out}")
    return out


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
        return voxel_to_grid_mm(v, level, self.finest_spacing_mm)

    def to_voxel(self, g, level: int):
        return grid_mm_to_voxel(g, level, self.finest_spacing_mm)

    def level_net(self, level: int):
        """The :class:`~locnet.models.unet.LocNet` reading pyramid level ``level`` (its maps
        are what the heatmap figure shows). Models without Loc-Nets raise ``TypeError``."""
        raise TypeError(f"{self.name} has no Loc-Net")

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

    def map_prior(self, logits, target_vox, mask):
        """The map prior (mean over valid landmarks) of linear maps ``logits`` (B, n, n, n, K)
        against Gaussians of ``map_supervision["sigma_voxels"]`` at ``target_vox`` (B, K, 3),
        voxel coordinates of those maps (:func:`locnet.models.maps.map_prior_loss`).

        A landmark outside the map's grid (a crop that missed it) is left out: asking for an
        empty map there taught the finer nets of a chain, whose crops miss the landmark while
        the coarser nets are still poor, to answer zero everywhere, and their ReLU units died
        on the way (the finest level then returned its crop centre for good).
        """
        n = int(logits.shape[1])
        target_vox = ops.stop_gradient(ops.convert_to_tensor(target_vox, logits.dtype))
        inside = ops.all((target_vox >= -0.5) & (target_vox <= n - 0.5), axis=-1)
        mask = ops.cast(ops.convert_to_tensor(mask) > 0, logits.dtype) * ops.cast(inside, logits.dtype)
        unit = gaussian_maps(target_vox, n, self.map_supervision["sigma_voxels"])
        peak = self.map_supervision["peak"]
        return masked_mean(map_prior_loss(logits, ops.cast(unit, logits.dtype), peak), mask)

    def position_loss(self, pred_mm, y):
        """Mean over valid landmarks of the squared Euclidean error (mm^2)."""
        target = ops.cast(y["position"], pred_mm.dtype)
        d2 = ops.sum(ops.square(pred_mm - target), axis=-1)
        return masked_mean(d2, y["mask"])

