"""Method ``locnet_single``: one Loc-Net on a whole pyramid level."""

from __future__ import annotations

import keras

from locnet.models.base import LandmarkModel
from locnet.models.unet import LocNet, unet_kwargs

__all__ = ['SingleLocNet', 'build']


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
        self.built = True

    def level_net(self, level: int) -> LocNet:
        if int(level) != self.level:
            raise ValueError(f"{self.name} reads level {self.level}, not level {level}")
        return self.locnet

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


def build(c: dict, common: dict) -> SingleLocNet:
    """``locnet_single`` from its merged config block ``c`` (see :func:`locnet.models.build_model`)."""
    return SingleLocNet(
        level=int(c["level"]),
        unet=unet_kwargs(c["unet"]),
        out_activation=str(c["out_activation"]),
        com_epsilon=float(c["com_epsilon"]),
        **common,
    )
