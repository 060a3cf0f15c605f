"""The paper's coarse-to-fine chain of Loc-Nets: ``multiscale_multistep``, ``multiscale_e2e``, ``multiscale_e2e_noise``."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from locnet.layers import CenterOfMass, CropResample, RandomShift, patch_to_volume
from locnet.models.base import LandmarkModel, map_supervision_config
from locnet.models.unet import LocNet, unet_kwargs

__all__ = ['MultiScaleLocNet', 'build_multistep', 'build_e2e', 'build_e2e_noise']


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

    ``map_supervision`` (``weight > 0``): the loss also gets ``weight`` x every level's map
    prior (:meth:`LandmarkModel.map_prior`, logged as ``loss_map{l}``), at every epoch (the
    schedule weighs the position errors only, so no level's maps drift while its position
    error is weighted 0): the coarsest net's
    maps against Gaussians at the targets on its level, each finer net's selected map
    against a Gaussian at the target in the coordinates of the patch it was given (wherever
    the coarser levels put that patch; a patch that missed its landmark has no prior).
    In training the model then also outputs ``"logits{l}"`` and ``"origin{l}"`` (the level
    voxel of patch voxel 0).

    Boxes (training input, ``locnet.data.chain_boxes``): ``inputs`` may hold, for a finer
    level, only a box of it and ``"offset{l}"`` (B, 3), the level voxel of the box's voxel 0.
    The crop reads the box with the integer offset taken off after the sampling positions are
    split into voxel and fraction, so the patches, and every output, are bit for bit those of
    the whole level while they lie inside the box. Without ``offset{l}`` the level is whole.
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
        map_supervision: dict | None = None,
        **kwargs,
    ):
        self.map_supervision = map_supervision_config(map_supervision)
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
                supervised=self.map_supervision["weight"] > 0,
                map_threshold=self.map_supervision["threshold"],
                map_peak=self.map_supervision["peak"],
                name=f"locnet_level{l}",
            )
            for l in range(self.n_levels)
        ]
        if self.supervised:
            self.map_trackers = [
                keras.metrics.Mean(name=f"loss_map{l}") for l in self.loss_levels
            ]
        self.crop = CropResample(self.patch, self.background, name="crop")
        self.com = CenterOfMass(com_epsilon, name="patch_com")
        self.noise = RandomShift(self.noise_mm, seed=self.seed, name="finest_noise")
        self.built = True

    # pieces used by call() and predict_passes() --------------------------------------
    def level_net(self, level: int) -> LocNet:
        return self.level_nets[int(level)]

    @property
    def supervised(self) -> bool:
        return self.map_supervision["weight"] > 0

    def coarsest(self, inputs, training=None, logits=None):
        """Level ``L-1`` on the whole level -> (B, K, 3) grid mm; with a dict ``logits``, its
        linear maps go to ``logits["logits{L-1}"]`` (origin 0)."""
        top = self.n_levels - 1
        net = self.level_nets[top]
        z = net.logits(inputs[f"level{top}"], training=training)
        g = self.to_mm(net.com(net.mass(z)), top)
        if logits is not None:
            logits[f"logits{top}"] = z
            logits[f"origin{top}"] = ops.zeros_like(ops.stop_gradient(g))
        return g

    def refine(self, level: int, volume, centres_mm, training=None, logits=None, offset=None):
        """One finer stage: centres (B, M, 3) grid mm -> (B, M, 3) grid mm at ``level``.

        ``M`` may be any multiple of K: entry ``m`` is treated as landmark ``m mod K``
        (used to run many test-time passes as one batch). With a dict ``logits`` (M = K),
        the selected linear maps (B, P, P, P, K) go to ``logits["logits{level}"]`` and the
        level voxel of each patch's voxel 0 to ``logits["origin{level}"]``. ``offset`` (B, 3):
        the level voxel of ``volume``'s voxel 0 when it is a box of the level (None: 0).
        """
        k, p = self.n_landmarks, self.patch
        m = int(centres_mm.shape[1])
        v = self.to_voxel(centres_mm, level)
        if offset is None:
            patches = self.crop(volume, v)  # (B, M, P, P, P, 1)
        else:  # volume is a box of the level: the same patches while they lie inside it
            patches = self.crop(volume, v, offset=offset)
        net = self.level_nets[level]
        maps = net.logits(
            ops.reshape(patches, (-1, p, p, p, 1)), training=training
        )  # (B*M, P, P, P, K)
        select = np.eye(k, dtype="float32")[np.arange(m) % k]  # (M, K)
        maps = ops.reshape(maps, (-1, m, p, p, p, k))
        sel = ops.sum(
            maps * ops.convert_to_tensor(select)[None, :, None, None, None, :],
            axis=-1,
            keepdims=True,
        )  # (B, M, P, P, P, 1)
        if logits is not None:
            logits[f"logits{level}"] = ops.transpose(sel[..., 0], (0, 2, 3, 4, 1))
            logits[f"origin{level}"] = ops.stop_gradient(v) - (p - 1) / 2.0
        q = self.com(net.mass(ops.reshape(sel, (-1, p, p, p, 1))))  # (B*M, 1, 3)
        q = ops.reshape(q, (-1, m, 3))
        return self.to_mm(patch_to_volume(v, q, p), level)

    def _link(self, g):
        return ops.stop_gradient(g) if self.stop_gradient else g

    def call(self, inputs, training=None, finest_shift_mm=None, noise=None):
        top = self.n_levels - 1
        logits = {} if (training and self.supervised) else None
        g = self.coarsest(inputs, training=training, logits=logits)
        out = {f"level{top}": g}
        for level in range(top - 1, -1, -1):
            c = self._link(g)
            if level == 0:
                if finest_shift_mm is not None:
                    c = c + ops.cast(finest_shift_mm, c.dtype)
                else:
                    c = self.noise(c, training=training, active=noise)
            g = self.refine(level, inputs[f"level{level}"], c, training=training, logits=logits,
                            offset=inputs.get(f"offset{level}"))
            out[f"level{level}"] = g
        out["position"] = g
        out.update(logits or {})
        return out

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        total = 0.0
        for i, level in enumerate(self.loss_levels):
            loss = self.position_loss(y_pred[f"level{level}"], y)
            self.level_trackers[i].update_state(loss)
            total = total + self.loss_weights[i] * loss
            if f"logits{level}" in y_pred:
                # the prior is not scheduled: every level's maps stay peaks all the time
                target = self.to_voxel(ops.cast(y["position"], "float32"), level)
                prior = self.map_prior(
                    y_pred[f"logits{level}"], target - y_pred[f"origin{level}"], y["mask"]
                )
                self.map_trackers[i].update_state(prior)
                total = total + self.map_supervision["weight"] * prior
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
                "map_supervision": dict(self.map_supervision),
            }
        )
        return config


def _build_chain(c: dict, common: dict, stop_gradient: bool, noise_mm: float) -> MultiScaleLocNet:
    return MultiScaleLocNet(
        patch=int(c["patch"]),
        unet=unet_kwargs(c["unet"]),
        out_activation=str(c["out_activation"]),
        com_epsilon=float(c["com_epsilon"]),
        stop_gradient=stop_gradient,
        noise_mm=noise_mm,
        background=float(c["background"]),
        seed=None if c.get("seed") is None else int(c["seed"]),
        map_supervision=c.get("map_supervision"),
        **common,
    )


def build_multistep(c: dict, common: dict) -> MultiScaleLocNet:
    """``multiscale_multistep``: no gradient between levels (trained one level at a time)."""
    return _build_chain(c, common, stop_gradient=True, noise_mm=0.0)


def build_e2e(c: dict, common: dict) -> MultiScaleLocNet:
    """``multiscale_e2e``: trained end to end through the differentiable crops."""
    return _build_chain(c, common, stop_gradient=False, noise_mm=0.0)


def build_e2e_noise(c: dict, common: dict) -> MultiScaleLocNet:
    """``multiscale_e2e_noise``: end to end, with the finest crop shifted by up to ``noise_mm``."""
    return _build_chain(c, common, stop_gradient=False, noise_mm=float(c["noise_mm"]))
