"""The one U-Net builder of the study and Loc-Net (U-Net + centre of mass).

Every method builds its networks here: :func:`build_unet` (functional ``keras.Model``) and
:class:`LocNet`, the layer that turns a U-Net's non-negative maps into landmark positions.
"""

from __future__ import annotations

import keras

from locnet.config import defaults
from locnet.layers import CenterOfMass

__all__ = ["build_unet", "unet_kwargs", "LocNet"]


def _conv_block(x, filters, convs, dropout, prefix, activation="relu"):
    for c in range(convs):
        x = keras.layers.Conv3D(
            filters,
            3,
            padding="same",
            activation=activation,
            kernel_initializer="he_normal",
            name=f"{prefix}_conv{c}",
        )(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name=f"{prefix}_dropout")(x)
    return x


def build_unet(
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
    activation: str = "relu",
) -> keras.Model:
    """3D U-Net used by every method (functional ``keras.Model``).

    One level per entry of ``filters``: ``convs_per_level`` 3x3x3 convolutions + ReLU
    (paper: one, with 16/32/64/128 filters), max-pooling by 2 between levels; the decoder
    upsamples by 2 (``"upsample"``: nearest neighbour as in the authors' code, or
    ``"transpose"``: a learned 2x2x2 transposed convolution), concatenates the skip
    connection and applies the same conv block; a final 1x1x1 convolution gives
    ``out_channels`` maps with ``out_activation``. ``dropout > 0`` adds dropout after each
    conv block.

    ``activation``: of every 3x3x3 convolution, ``"relu"`` (the paper) or ``"leaky_relu"``
    (slope 0.2 below zero: a unit is never off for every input, so it cannot die).

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
    if activation not in ("relu", "leaky_relu"):
        raise ValueError(f"activation must be 'relu' or 'leaky_relu', got {activation!r}")
    if upsampling not in ("upsample", "transpose"):
        raise ValueError(f"upsampling must be 'upsample' or 'transpose', got {upsampling!r}")
    inputs = keras.Input(shape=input_shape, name=f"{name}_input")
    x = inputs
    skips = []
    for d, f in enumerate(filters):
        if d > 0:
            x = keras.layers.MaxPooling3D(2, name=f"{name}_pool{d}")(x)
        x = _conv_block(x, f, convs_per_level, dropout, f"{name}_down{d}", activation)
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
            x = _conv_block(x, filters[d], convs_per_level, dropout, f"{name}_dec{d}",
                            activation)
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


def unet_kwargs(cfg_unet: dict) -> dict:
    """:func:`build_unet`'s keywords from a ``unet`` config block; missing keys take the
    schema's defaults (``definitions.unet``)."""
    c = {**defaults("definitions", "unet"), **cfg_unet}
    return {
        "filters": [int(f) for f in c["filters"]],
        "convs_per_level": int(c["convs_per_level"]),
        "dropout": float(c["dropout"]),
        "upsampling": str(c["upsampling"]),
        "activation": str(c["activation"]),
    }


@keras.saving.register_keras_serializable(package="locnet")
class LocNet(keras.layers.Layer):
    """Loc-Net: U-Net with K non-negative output maps followed by a centre-of-mass layer.

    ``(B, n, n, n, 1) -> (B, K, 3)`` voxel coordinates of the input. ``self.net`` is the
    U-Net (maps via :meth:`maps`). Shift equivariant up to padding and pooling-grid
    effects: the output map is pointwise, the CoM moves with the mass.

    Output activation: ``softplus`` (default) or ``relu`` (the paper). ReLU maps give exact
    zeros (sharp CoM) but a map whose pre-activations are all negative is dead: the CoM
    layer then predicts the centre (see :func:`locnet.layers.centre_of_mass`) and no
    gradient reaches the network again. Softplus is strictly positive with a nowhere-zero
    derivative, so a map can never die; the network still learns a near-sparse map by
    driving background pre-activations negative, and the CoM is unaffected by the
    (scale-free) normalisation.

    ``supervised=True`` (the map prior, ``map_supervision.weight > 0``): the U-Net's head is
    linear and starts near zero; :meth:`logits` is that linear output, which the model's loss
    trains towards a Gaussian of peak ``map_peak`` at the landmark
    (:func:`locnet.models.maps.map_prior_loss`), and the mass of the centre of mass is
    ``relu(logits - map_threshold * map_peak)``: the part of the map above a tenth of the
    target peak (default), exactly zero elsewhere. The linear logits always get a gradient
    from the prior, and the threshold keeps the small residuals of the background (a quarter
    of a million voxels at 64^3) out of the centre of mass. The ReLU units that feed the head
    can still all switch off, leaving the map at its bias; ``unet.activation: leaky_relu``
    prevents that (docs/methods.md, "Dead units").
    ``out_activation`` is then unused.
    """

    def __init__(
        self,
        input_size: int,
        out_channels: int,
        unet: dict | None = None,
        out_activation: str = "softplus",
        com_epsilon: float = 1e-6,
        supervised: bool = False,
        map_threshold: float = 0.1,
        map_peak: float = 30.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.input_size = int(input_size)
        self.out_channels = int(out_channels)
        self.unet_config = unet_kwargs(unet or {})
        self.out_activation = str(out_activation)
        self.com_epsilon = float(com_epsilon)
        self.supervised = bool(supervised)
        self.map_threshold = float(map_threshold)
        self.map_peak = float(map_peak)
        n = self.input_size
        self.net = build_unet(
            (n, n, n, 1),
            self.out_channels,
            out_activation="linear" if self.supervised else self.out_activation,
            out_init_std=1e-3 if self.supervised else None,
            name=f"{self.name}_unet",
            **self.unet_config,
        )
        self.com = CenterOfMass(self.com_epsilon, name=f"{self.name}_com")
        self.built = True

    def logits(self, x, training=None):
        """The U-Net's output: linear maps when supervised, else the activated maps."""
        return self.net(x, training=training)

    def mass(self, logits):
        """The non-negative maps of the centre of mass, from :meth:`logits`."""
        if not self.supervised:
            return logits
        return keras.ops.relu(logits - self.map_threshold * self.map_peak)

    def maps(self, x, training=None):
        return self.mass(self.logits(x, training=training))

    def call(self, x, training=None):
        return self.com(self.maps(x, training=training))

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
                "supervised": self.supervised,
                "map_threshold": self.map_threshold,
                "map_peak": self.map_peak,
            }
        )
        return config
