"""Unit tests of locnet.layers: centre of mass, trilinear crop, noise shift, heatmap decoding."""

import itertools

import numpy as np
import pytest
from keras import ops

from locnet.layers import (
    CenterOfMass,
    CropResample,
    RandomShift,
    centre_of_mass,
    crop_resample,
    cut_centres_of_mass,
    decode_heatmap,
    patch_to_volume,
)


def _np(x):
    return ops.convert_to_numpy(x)


def _gaussian(n, mu, sigma):
    g = np.arange(n, dtype=np.float64)
    d2 = (
        (g[:, None, None] - mu[0]) ** 2
        + (g[None, :, None] - mu[1]) ** 2
        + (g[None, None, :] - mu[2]) ** 2
    )
    return np.exp(-d2 / (2.0 * sigma**2))


# ----------------------------------------------------------------------------------------
# Centre of mass
# ----------------------------------------------------------------------------------------
def test_com_of_delta():
    m = np.zeros((1, 16, 12, 10, 1), np.float32)
    m[0, 3, 5, 7, 0] = 2.0
    np.testing.assert_allclose(_np(CenterOfMass()(m)), [[[3.0, 5.0, 7.0]]], atol=1e-4)


def test_com_of_off_centre_gaussian_is_its_mean():
    # A sampled Gaussian (sd >= 1, far from the borders) has its discrete mean at mu
    # up to exp(-2 pi^2 sd^2) ~ 1e-13 (Poisson summation) plus negligible truncation.
    mu = np.array([9.3, 12.7, 14.1])
    m = _gaussian(24, mu, 1.5)[None, ..., None].astype(np.float32)
    np.testing.assert_allclose(_np(centre_of_mass(m))[0, 0], mu, atol=1e-4)


def test_com_two_channels_are_independent():
    m = np.zeros((2, 8, 8, 8, 2), np.float32)
    m[0, 1, 2, 3, 0] = 1.0
    m[0, 6, 6, 6, 0] = 1.0  # channel 0 of case 0: midpoint of two deltas
    m[0, 7, 0, 4, 1] = 5.0
    m[1, 2, 2, 2, 0] = 1.0
    m[1, 5, 1, 0, 1] = 3.0
    out = _np(CenterOfMass()(m))
    assert out.shape == (2, 2, 3)
    np.testing.assert_allclose(out[0, 0], [3.5, 4.0, 4.5], atol=1e-4)
    np.testing.assert_allclose(out[0, 1], [7.0, 0.0, 4.0], atol=1e-4)
    np.testing.assert_allclose(out[1, 0], [2.0, 2.0, 2.0], atol=1e-4)
    np.testing.assert_allclose(out[1, 1], [5.0, 1.0, 0.0], atol=1e-4)


def test_com_of_dead_map_is_volume_centre_and_finite():
    m = np.zeros((1, 8, 6, 4, 3), np.float32)
    out = _np(CenterOfMass()(m))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, np.broadcast_to([3.5, 2.5, 1.5], (1, 3, 3)), atol=1e-6)


@pytest.mark.tensorflow_only
def test_com_gradient_of_dead_map_is_finite():
    import tensorflow as tf

    m = tf.zeros((1, 8, 8, 8, 1))
    with tf.GradientTape() as tape:
        tape.watch(m)
        out = tf.reduce_sum(centre_of_mass(m))
    g = tape.gradient(out, m).numpy()
    assert np.all(np.isfinite(g)) and np.any(g != 0)


# ----------------------------------------------------------------------------------------
# Crop and resample
# ----------------------------------------------------------------------------------------
def _reference_sample(vol, point, background):
    """Trilinear value of vol[i, j, k] (3D array) at a point, explicit 8-corner loop."""
    base = np.floor(point).astype(int)
    frac = point - base
    value = 0.0
    for corner in itertools.product((0, 1), repeat=3):
        idx = base + np.array(corner)
        weight = np.prod([f if c else 1.0 - f for f, c in zip(frac, corner)])
        inside = all(0 <= idx[a] < vol.shape[a] for a in range(3))
        value += weight * (vol[tuple(idx)] if inside else background)
    return value


def test_crop_matches_numpy_trilinear_reference():
    rng = np.random.default_rng(0)
    vol = rng.random((2, 9, 10, 11, 1)).astype(np.float32)
    # case 0: interior centre and a centre hanging over the low corner (background);
    # case 1: a centre hanging over the high faces.
    centres = np.array(
        [[[4.3, 5.6, 4.2], [0.4, -0.7, 1.25]], [[7.8, 8.5, 10.2], [3.0, 4.0, 5.0]]],
        np.float32,
    )
    p, bg = 4, 0.25
    patches = _np(CropResample(p, background=bg)(vol, centres))
    assert patches.shape == (2, 2, p, p, p, 1)
    for b, m in itertools.product(range(2), range(2)):
        for q in [(0, 0, 0), (3, 3, 3), (1, 2, 3), (2, 0, 1), (3, 1, 0)]:
            point = centres[b, m].astype(np.float64) - (p - 1) / 2 + np.array(q)
            ref = _reference_sample(vol[b, ..., 0].astype(np.float64), point, bg)
            np.testing.assert_allclose(patches[(b, m) + q + (0,)], ref, atol=1e-5)
    # a patch entirely outside the volume is pure background
    far = _np(crop_resample(vol, np.full((2, 1, 3), -20.0, np.float32), p, bg))
    np.testing.assert_allclose(far, bg)


def test_crop_at_integer_centre_is_a_slice():
    rng = np.random.default_rng(1)
    vol = rng.random((1, 12, 12, 12, 2)).astype(np.float32)
    out = _np(crop_resample(vol, np.array([[[6.5, 5.5, 4.5]]], np.float32), 4))
    np.testing.assert_allclose(out[0, 0], vol[0, 5:9, 4:8, 3:7], atol=1e-6)
    out = _np(crop_resample(vol, np.array([[[5.0, 6.0, 7.0]]], np.float32), 3))
    np.testing.assert_allclose(out[0, 0], vol[0, 4:7, 5:8, 6:9], atol=1e-6)


@pytest.mark.parametrize("patch", [5, 6])
def test_cut_centres_of_mass_equal_crop_then_centre_of_mass(patch):
    # the box-sum shortcut against the long way: resample each cut, then its centre of mass
    rng = np.random.default_rng(patch)
    w = 14
    maps = (rng.random((2, w, w, w)) ** 4).astype(np.float32)  # uneven, positive
    maps[1, 3:6, 8:11, 2:5] += 5.0  # and a peak
    lo, hi = (patch - 1) / 2.0, w - 1 - (patch - 1) / 2.0  # cuts inside the map
    centres = rng.uniform(lo, hi, size=(2, 7, 3)).astype(np.float32)
    centres[0, 0] = [lo, hi, lo]  # cuts touching the edges
    centres[0, 1] = np.floor(centres[0, 1]) + (patch - 1) / 2.0 % 1  # integer-aligned cut
    got = _np(cut_centres_of_mass(maps, centres, patch, epsilon=1e-6))
    cuts = _np(crop_resample(maps[..., None], centres, patch))  # (2, 7, P, P, P, 1)
    ref = _np(centre_of_mass(cuts.reshape(14, patch, patch, patch, 1), 1e-6)).reshape(2, 7, 3)
    assert got.shape == (2, 7, 3)
    np.testing.assert_allclose(got, ref, atol=2e-4)
    # the peak pulls landmark 1's cuts that hold it
    assert np.abs(got - (patch - 1) / 2.0).max() > 0.2


def test_cut_centres_of_mass_of_a_dead_map_is_the_cut_centre():
    got = _np(cut_centres_of_mass(np.zeros((1, 10, 10, 10), np.float32),
                                  np.array([[[4.3, 5.1, 4.9]]], np.float32), 4))
    np.testing.assert_allclose(got, np.full((1, 1, 3), 1.5), atol=1e-6)


def test_patch_to_volume_inverts_the_sampling_rule():
    c = np.array([[[3.2, 4.7, 5.1]]], np.float32)
    np.testing.assert_allclose(_np(patch_to_volume(c, np.full((1, 1, 3), 1.5), 4)), c)
    np.testing.assert_allclose(_np(patch_to_volume(c, np.zeros((1, 1, 3)), 4)), c - 1.5)


@pytest.mark.tensorflow_only
def test_crop_gradient_wrt_centre_matches_finite_differences():
    import tensorflow as tf

    rng = np.random.default_rng(2)
    vol = tf.constant(rng.random((1, 10, 10, 10, 1)).astype(np.float32))
    weights = tf.constant(rng.standard_normal((1, 1, 4, 4, 4, 1)).astype(np.float32))
    # fractional parts away from 0 so a +-h step stays in one interpolation cell
    centre = np.array([[[4.3, 5.6, 3.7]]], np.float32)

    def f(c):
        return tf.reduce_sum(crop_resample(vol, c, 4) * weights)

    c = tf.constant(centre)
    with tf.GradientTape() as tape:
        tape.watch(c)
        y = f(c)
    grad = tape.gradient(y, c).numpy()[0, 0]
    h = 1e-2
    fd = []
    for a in range(3):
        e = np.zeros_like(centre)
        e[0, 0, a] = h
        fd.append((f(tf.constant(centre + e)) - f(tf.constant(centre - e))).numpy() / (2 * h))
    assert np.max(np.abs(grad)) > 1e-3
    np.testing.assert_allclose(grad, fd, rtol=2e-2, atol=2e-3)


# ----------------------------------------------------------------------------------------
# Noise shift
# ----------------------------------------------------------------------------------------
def test_random_shift_modes_bounds_and_seed():
    x = np.zeros((4, 2, 3), np.float32)
    layer = RandomShift(5.0, seed=3)
    np.testing.assert_array_equal(_np(layer(x)), x)  # inference: identity
    np.testing.assert_array_equal(_np(layer(x, training=True, active=False)), x)
    train = _np(layer(x, training=True))
    forced = _np(layer(x, training=False, active=True))
    for out in (train, forced):
        assert np.all(np.abs(out) <= 5.0) and np.std(out) > 1.0
    assert np.any(out < 0) and np.any(out > 0)  # symmetric U(-a, +a), not one-sided
    again = _np(RandomShift(5.0, seed=3)(x, training=True))
    np.testing.assert_array_equal(again, train)  # seeded
    assert RandomShift.from_config(layer.get_config()).max_shift == 5.0


# ----------------------------------------------------------------------------------------
# Heatmap decoding
# ----------------------------------------------------------------------------------------
def test_decode_heatmap_subvoxel_and_border():
    mu = np.array([6.3, 8.7, 9.5])
    h = np.zeros((1, 16, 16, 16, 2), np.float32)
    h[0, ..., 0] = _gaussian(16, mu, 2.0)
    h[0, 15, 0, 7, 1] = 1.0  # argmax on the border: no refinement, no NaN
    out = _np(decode_heatmap(h))
    np.testing.assert_allclose(out[0, 0], mu, atol=0.05)
    np.testing.assert_allclose(out[0, 1], [15.0, 0.0, 7.0], atol=1e-6)
