"""Geometric Keras layers of Loc-Net: centre of mass, differentiable crop, noise shift.

All layers use ``keras.ops`` only, so they run under the TensorFlow, JAX and PyTorch
backends. Tensors are channels-last and spatial axes are indexed ``[i, j, k]`` exactly as
the NIfTI arrays (no transposes). Coordinates handled here are *voxel* coordinates of the
tensor they refer to (voxel centres at integer positions); conversion to grid millimetres
is done by the models (see ``docs/architecture.md``).
"""

from __future__ import annotations

import itertools

import keras
from keras import ops

__all__ = [
    "CenterOfMass",
    "CropResample",
    "RandomShift",
    "centre_of_mass",
    "crop_resample",
    "cut_centres_of_mass",
    "patch_to_volume",
    "decode_heatmap",
]


# ----------------------------------------------------------------------------------------
# Centre of mass
# ----------------------------------------------------------------------------------------
def centre_of_mass(mass, epsilon: float = 1e-6):
    """Per-channel centre of mass of a non-negative 3D map.

    ``mass``: (B, n1, n2, n3, K), non-negative. Returns (B, K, 3) voxel coordinates
    ``sum(index * mass) / sum(mass)`` per channel and axis.

    Dead maps: a total mass ``epsilon`` is spread uniformly over the volume, i.e. the
    result is ``(sum(index * mass) + epsilon * centre) / (sum(mass) + epsilon)`` with
    ``centre = (n - 1) / 2``. A live map is biased by a negligible ``epsilon / sum(mass)``
    towards the centre; an all-zero map predicts the volume centre (finite, never NaN,
    never a silent 0 at the corner voxel) and the gradient with respect to the map stays
    finite (``1 / epsilon`` scale at worst).
    """
    shape = mass.shape
    n1, n2, n3 = int(shape[1]), int(shape[2]), int(shape[3])
    dtype = mass.dtype
    eps = ops.cast(epsilon, dtype)
    # Marginals along each axis: (B, n_a, K).
    m1 = ops.sum(mass, axis=(2, 3))
    m2 = ops.sum(mass, axis=(1, 3))
    m3 = ops.sum(mass, axis=(1, 2))
    total = ops.sum(m1, axis=1) + eps  # (B, K)
    coords = []
    for marg, n in ((m1, n1), (m2, n2), (m3, n3)):
        idx = ops.reshape(ops.arange(n, dtype=dtype), (1, n, 1))
        first = ops.sum(idx * marg, axis=1) + eps * ((n - 1) / 2.0)
        coords.append(first / total)
    return ops.stack(coords, axis=-1)


@keras.saving.register_keras_serializable(package="locnet")
class CenterOfMass(keras.layers.Layer):
    """(B, n1, n2, n3, K) non-negative map -> (B, K, 3) voxel coordinates.

    See :func:`centre_of_mass` for the treatment of all-zero (dead) maps. The class keeps the
    American spelling of Keras's own names because saved models record it
    (``locnet>CenterOfMass``); everything else in the project writes "centre".
    """

    def __init__(self, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)
        # Weightless: built from the start. Keras's JAX trainer re-runs the whole model eagerly
        # before every predict_on_batch while any layer is unbuilt, and a multi-scale chain
        # never calls its level nets' own CenterOfMass (it reads their maps).
        self.built = True

    def call(self, mass):
        return centre_of_mass(mass, self.epsilon)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1], 3)

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon})
        return config


# ----------------------------------------------------------------------------------------
# Differentiable crop (trilinear resampling)
# ----------------------------------------------------------------------------------------
def _patch_offsets(patch_size: int, dtype="float32"):
    """(P, P, P, 3) offsets ``p - (P - 1) / 2`` of the patch voxels from the centre."""
    r = ops.arange(patch_size, dtype=dtype) - (patch_size - 1) / 2.0
    gi, gj, gk = ops.meshgrid(r, r, r, indexing="ij")
    return ops.stack([gi, gj, gk], axis=-1)


def crop_resample(volume, centres, patch_size: int, background: float = 0.0, offset=None):
    """Trilinear crop of ``P^3`` patches centred on (sub-voxel) positions.

    ``volume``: (B, D, H, W, C); ``centres``: (B, M, 3) voxel coordinates of ``volume``.
    Returns (B, M, P, P, P, C): patch voxel ``p`` (per axis) samples the volume at
    ``centre - (P - 1) / 2 + p`` by trilinear interpolation; corners outside the volume
    contribute ``background``. Differentiable with respect to ``centres`` (through the
    interpolation weights) and ``volume``.

    Memory: one gather of ``B * M * P^3`` values per corner from the flattened volume (the
    volume itself is never copied or padded), so a 448^3 volume with 56^3 patches costs
    a few MB per landmark.

    ``offset`` (B, 3), integer-valued: ``volume`` is a box of a larger volume whose voxel
    ``offset`` is the box's voxel 0, and ``centres`` are in the larger volume's coordinates.
    The integer offset is taken off after the sampling positions are split into voxel and
    fraction, so a patch inside the box is bit for bit the patch of the larger volume; a
    sample outside the box reads ``background``.
    """
    vshape = volume.shape
    d, h, w, c = int(vshape[1]), int(vshape[2]), int(vshape[3]), int(vshape[4])
    dtype = volume.dtype
    centres = ops.cast(centres, dtype)
    m = int(centres.shape[1])
    p = int(patch_size)
    coords = centres[:, :, None, None, None, :] + _patch_offsets(p, dtype)  # (B,M,P,P,P,3)
    base = ops.floor(ops.stop_gradient(coords))
    frac = coords - base  # gradient w.r.t. centres flows through here
    base = ops.cast(base, "int32")
    if offset is not None:
        shift = ops.cast(ops.round(ops.stop_gradient(ops.convert_to_tensor(offset))), "int32")
        base = base - ops.reshape(shift, (-1, 1, 1, 1, 1, 3))
    bi, bj, bk = base[..., 0], base[..., 1], base[..., 2]
    fi, fj, fk = frac[..., 0], frac[..., 1], frac[..., 2]

    batch = ops.shape(volume)[0]
    batch_offset = ops.reshape(
        ops.arange(batch, dtype="int32") * (d * h * w), (-1, 1, 1, 1, 1)
    )
    flat = ops.reshape(volume, (-1, c))
    bg = ops.cast(background, dtype)
    out = None
    for di, dj, dk in itertools.product((0, 1), repeat=3):
        ii, jj, kk = bi + di, bj + dj, bk + dk
        valid = (
            (ii >= 0) & (ii < d) & (jj >= 0) & (jj < h) & (kk >= 0) & (kk < w)
        )
        lin = (
            batch_offset
            + ops.clip(ii, 0, d - 1) * (h * w)
            + ops.clip(jj, 0, h - 1) * w
            + ops.clip(kk, 0, w - 1)
        )
        vals = ops.take(flat, ops.reshape(lin, (-1,)), axis=0)
        vals = ops.reshape(vals, (-1, m, p, p, p, c))
        vals = ops.where(valid[..., None], vals, bg)
        wgt = (
            (fi if di else 1.0 - fi)
            * (fj if dj else 1.0 - fj)
            * (fk if dk else 1.0 - fk)
        )
        term = wgt[..., None] * vals
        out = term if out is None else out + term
    return out


def patch_to_volume(centres, q, patch_size: int):
    """Map a patch-voxel coordinate ``q`` back to the cropped volume's voxel coordinates.

    Inverse of the sampling rule of :func:`crop_resample`: ``centre - (P - 1) / 2 + q``.
    """
    return centres - (patch_size - 1) / 2.0 + q


def _box_sums(x, patch_size: int, axis: int):
    """Sums of ``P`` consecutive entries along ``axis``: (..., n, ...) -> (..., n - P + 1, ...).

    One cumulative sum along that axis only, so its rounding stays that of ``n`` terms.
    """
    n, p = int(x.shape[axis]), int(patch_size)
    c = ops.cumsum(x, axis=axis)
    pad = [(0, 0)] * len(x.shape)
    pad[axis] = (1, 0)
    c = ops.pad(c, pad)
    hi = [slice(None)] * len(x.shape)
    lo = [slice(None)] * len(x.shape)
    hi[axis], lo[axis] = slice(p, n + 1), slice(0, n - p + 1)
    return c[tuple(hi)] - c[tuple(lo)]


def cut_centres_of_mass(maps, centres, patch_size: int, epsilon: float = 1e-6):
    """Centre of mass of trilinearly resampled ``P^3`` cuts of maps, without resampling them.

    ``maps``: (B, W, W, W) non-negative; ``centres``: (B, M, 3) voxel coordinates of ``maps``.
    Returns (B, M, 3): for each centre, what :func:`centre_of_mass` gives on the patch that
    :func:`crop_resample` would cut there (patch voxel coordinates), for cuts inside the map.

    Every voxel of a cut shares one fractional offset, so a cut is a fixed blend of the
    eight integer-aligned ``P^3`` boxes around it, and its mass and first moments are the same
    blend of the boxes' sums. Those come from separable box sums of the map and of the map
    times each coordinate, computed once for all box origins; each cut then costs eight
    lookups instead of ``P^3`` resampled voxels. Cuts reaching outside the map are clamped
    to its edge (they would read ``background`` in :func:`crop_resample`).
    """
    maps = ops.convert_to_tensor(maps)
    w, p = int(maps.shape[1]), int(patch_size)
    dtype = maps.dtype
    n = w - p + 1  # box origins per axis
    idx = ops.arange(w, dtype=dtype)
    quantities = ops.stack([
        maps,
        maps * idx[:, None, None],
        maps * idx[None, :, None],
        maps * idx[None, None, :],
    ], axis=-1)  # (B, W, W, W, 4): mass and first moments about the map's origin
    for axis in (1, 2, 3):
        quantities = _box_sums(quantities, p, axis)  # -> (B, n, n, n, 4)
    flat = ops.reshape(quantities, (-1, 4))
    m = int(centres.shape[1])
    origin = ops.cast(centres, dtype) - (p - 1) / 2.0  # (B, M, 3) first cut voxel
    base = ops.floor(origin)
    frac = origin - base
    base = ops.cast(base, "int32")
    batch = ops.reshape(ops.arange(ops.shape(maps)[0], dtype="int32") * (n * n * n), (-1, 1))
    mass = 0.0
    first = 0.0
    for di, dj, dk in itertools.product((0, 1), repeat=3):
        corner = ops.clip(base + ops.convert_to_tensor([di, dj, dk], "int32"), 0, n - 1)
        lin = batch + corner[..., 0] * (n * n) + corner[..., 1] * n + corner[..., 2]
        box = ops.reshape(ops.take(flat, ops.reshape(lin, (-1,)), axis=0), (-1, m, 4))
        weight = ((frac[..., 0] if di else 1.0 - frac[..., 0])
                  * (frac[..., 1] if dj else 1.0 - frac[..., 1])
                  * (frac[..., 2] if dk else 1.0 - frac[..., 2]))[..., None]  # (B, M, 1)
        # moments about the box's own first voxel: about the map's origin minus corner * mass
        rel = box[..., 1:] - ops.cast(corner, dtype) * box[..., :1]
        mass = mass + weight * box[..., :1]
        first = first + weight * rel
    eps = ops.cast(epsilon, dtype)
    return (first + eps * ((p - 1) / 2.0)) / (mass + eps)


@keras.saving.register_keras_serializable(package="locnet")
class CropResample(keras.layers.Layer):
    """Differentiable crop: ``(volume (B,D,H,W,C), centres (B,M,3)) -> (B,M,P,P,P,C)``.

    See :func:`crop_resample` (also for ``offset``, when ``volume`` is a box). ``background`` is the value of samples outside the volume:
    0 is air once intensities are windowed to [0, 1].
    """

    def __init__(self, patch_size: int, background: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)
        self.background = float(background)
        self.built = True  # weightless (see CenterOfMass)

    def call(self, volume, centres, offset=None):
        return crop_resample(volume, centres, self.patch_size, self.background, offset)

    def compute_output_shape(self, volume_shape, centres_shape, offset_shape=None):
        p = self.patch_size
        return (volume_shape[0], centres_shape[1], p, p, p, volume_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update({"patch_size": self.patch_size, "background": self.background})
        return config


# ----------------------------------------------------------------------------------------
# Noise shift
# ----------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="locnet")
class RandomShift(keras.layers.Layer):
    """Adds ``U(-max_shift, +max_shift)`` independently per element (axis) of the input.

    Active when ``training`` is true, or when ``active=True`` is passed explicitly (test-time
    noise passes); ``active=False`` switches it off even in training. Units are those of the
    input (the models apply it to centres in grid millimetres). Seeded through a
    ``keras.random.SeedGenerator`` so runs are reproducible.
    """

    def __init__(self, max_shift: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.max_shift = float(max_shift)
        self.seed = None if seed is None else int(seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)
        self.built = True  # no weights; its seed state is made above (see CenterOfMass)

    def call(self, x, training=None, active=None):
        on = bool(training) if active is None else bool(active)
        if not on or self.max_shift <= 0.0:
            return x
        noise = keras.random.uniform(
            ops.shape(x),
            minval=-self.max_shift,
            maxval=self.max_shift,
            dtype=x.dtype,
            seed=self.seed_generator,
        )
        return x + noise

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"max_shift": self.max_shift, "seed": self.seed})
        return config


# ----------------------------------------------------------------------------------------
# Heatmap decoding
# ----------------------------------------------------------------------------------------
def decode_heatmap(heatmap):
    """Argmax of each channel of a (B, n1, n2, n3, K) heatmap with sub-voxel refinement.

    Returns (B, K, 3) voxel coordinates. Refinement: per axis, a parabola through the
    argmax and its two neighbours; its vertex offset ``(f- - f+) / (2 (f- - 2 f0 + f+))``
    is used when the argmax is an interior strict maximum along that axis (curvature < 0),
    clipped to [-0.5, 0.5]; otherwise the offset is 0. Not differentiable (argmax).
    """
    heatmap = ops.stop_gradient(ops.convert_to_tensor(heatmap))
    shape = heatmap.shape
    n1, n2, n3, k = (int(s) for s in shape[1:])
    flat = ops.reshape(ops.transpose(heatmap, (0, 4, 1, 2, 3)), (-1, k, n1 * n2 * n3))
    idx = ops.cast(ops.argmax(flat, axis=-1), "int32")  # (B, K)
    ci = idx // (n2 * n3)
    cj = (idx // n3) % n2
    ck = idx % n3

    def value_at(lin):
        return ops.squeeze(ops.take_along_axis(flat, lin[..., None], axis=-1), -1)

    f0 = value_at(idx)
    out = []
    for coord, n, stride in ((ci, n1, n2 * n3), (cj, n2, n3), (ck, n3, 1)):
        interior = (coord > 0) & (coord < n - 1)
        fm = value_at(ops.where(interior, idx - stride, idx))
        fp = value_at(ops.where(interior, idx + stride, idx))
        curv = fm - 2.0 * f0 + fp
        ok = interior & (curv < 0.0)
        safe = ops.where(ok, curv, -1.0)
        offset = ops.where(ok, 0.5 * (fm - fp) / safe, 0.0)
        offset = ops.clip(offset, -0.5, 0.5)
        out.append(ops.cast(coord, heatmap.dtype) + offset)
    return ops.stack(out, axis=-1)
