"""Method ``heatmap_unet``: Gaussian heatmap regression with a U-Net on one pyramid level."""

from __future__ import annotations

import keras
from keras import ops

from locnet.layers import decode_heatmap
from locnet.models.maps import gaussian_maps, weighted_map_error
from locnet.models.base import LandmarkModel, masked_mean
from locnet.models.unet import build_unet, unet_kwargs

__all__ = ['HeatmapUNet', 'build']


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
        self.unet_config = unet_kwargs(unet or {})
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
        self.net = build_unet(
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
        v = self.to_voxel(ops.cast(positions_mm, "float32"), self.level)
        sigma = self.heatmap_sigma_mm / self.level_spacing(self.level)
        return gaussian_maps(v, self.level_size(self.level), sigma)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        hm = y_pred["heatmap"]
        unit = ops.cast(self.target_heatmaps(y["position"]), hm.dtype)  # peak 1
        per_lm = self.heatmap_loss(hm, unit)
        loss = masked_mean(per_lm, y["mask"])
        self.level_trackers[0].update_state(loss)
        return self._finish_loss(self.loss_weights[0] * loss)

    def heatmap_loss(self, hm, unit):
        """Per case and landmark (B, K): the foreground-weighted mean squared error of ``hm``
        against the targets ``heatmap_peak * unit`` (``unit``: Gaussians of peak 1)."""
        return weighted_map_error(hm, unit, self.heatmap_peak, self.heatmap_foreground_weight)

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


def build(c: dict, common: dict) -> HeatmapUNet:
    """``heatmap_unet`` from its merged config block ``c`` (see :func:`locnet.models.build_model`)."""
    return HeatmapUNet(
        level=int(c["level"]),
        unet=unet_kwargs(c["unet"]),
        heatmap_sigma_mm=float(c["heatmap_sigma_mm"]),
        heatmap_activation=str(c["heatmap_activation"]),
        heatmap_peak=float(c["heatmap_peak"]),
        heatmap_foreground_weight=c["heatmap_foreground_weight"],
        **common,
    )
