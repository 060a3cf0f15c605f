"""Method ``locnet_single``: one Loc-Net on a whole pyramid level."""

from __future__ import annotations

import keras
from keras import ops

from locnet.models.base import LandmarkModel, map_supervision_config
from locnet.models.unet import LocNet, unet_kwargs

__all__ = ['SingleLocNet', 'build']


@keras.saving.register_keras_serializable(package="locnet")
class SingleLocNet(LandmarkModel):
    """Single-scale Loc-Net on the whole level ``level`` (paper: level 1 = 1 mm).

    U-Net with K maps + centre of mass; loss: squared Euclidean error in mm averaged over
    valid landmarks (``loss_level{level}``). Outputs ``"position"`` and ``"level{level}"``.

    ``map_supervision`` (``weight > 0``): the map prior of :class:`LocNet` is added to the
    loss, ``weight`` x :meth:`LandmarkModel.map_prior` (logged as ``loss_map``); in training
    the model also outputs its linear maps as ``"logits"``.
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
        map_supervision: dict | None = None,
        **kwargs,
    ):
        self.level = int(level)
        self.map_supervision = map_supervision_config(map_supervision)
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
            supervised=self.map_supervision["weight"] > 0,
            map_threshold=self.map_supervision["threshold"],
            map_peak=self.map_supervision["peak"],
            name=f"locnet_level{self.level}",
        )
        if self.locnet.supervised:
            self.map_tracker = keras.metrics.Mean(name="loss_map")
        self.built = True

    def level_net(self, level: int) -> LocNet:
        if int(level) != self.level:
            raise ValueError(f"{self.name} reads level {self.level}, not level {level}")
        return self.locnet

    def call(self, inputs, training=None):
        z = self.locnet.logits(inputs[f"level{self.level}"], training=training)
        g = self.to_mm(self.locnet.com(self.locnet.mass(z)), self.level)
        out = {"position": g, f"level{self.level}": g}
        if training and self.locnet.supervised:
            out["logits"] = z
        return out

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = self.position_loss(y_pred["position"], y)
        self.level_trackers[0].update_state(loss)
        if "logits" in y_pred:
            target = self.to_voxel(ops.cast(y["position"], "float32"), self.level)
            prior = self.map_prior(y_pred["logits"], target, y["mask"])
            self.map_tracker.update_state(prior)
            loss = loss + self.map_supervision["weight"] * prior
        return self._finish_loss(self.loss_weights[0] * loss)

    def get_config(self):
        config = self._base_config()
        config.update(
            {
                "level": self.level,
                "unet": dict(self.locnet.unet_config),
                "out_activation": self.locnet.out_activation,
                "com_epsilon": self.locnet.com_epsilon,
                "map_supervision": dict(self.map_supervision),
            }
        )
        return config


def build(c: dict, common: dict) -> SingleLocNet:
    """``locnet_single`` from its merged config block ``c`` (see :func:`locnet.models.build_model`)."""
    return SingleLocNet(
        level=int(c["level"]),
        unet=unet_kwargs(c["unet"]),
        out_activation=str(c["out_activation"]),
        com_epsilon=float(c["com_epsilon"]),
        map_supervision=c.get("map_supervision"),
        **common,
    )
