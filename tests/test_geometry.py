"""Coordinate conventions: world <-> voxel, RAS/LPS, pyramid grids and their half-voxel offsets."""

import itertools

import numpy as np
import pytest

from locnet import geometry as geo


def test_ras_lps_flips_x_and_y_and_is_an_involution():
    p = np.array([[10.0, -20.0, 30.0], [1.5, 2.5, -3.5]])
    q = geo.ras_lps(p)
    np.testing.assert_array_equal(q, [[-10.0, 20.0, 30.0], [-1.5, -2.5, -3.5]])
    np.testing.assert_array_equal(geo.ras_lps(q), p)
    np.testing.assert_array_equal(geo.to_ras(q, "lps"), p)
    np.testing.assert_array_equal(geo.to_ras(p, "RAS"), p)
    with pytest.raises(ValueError, match="RAS"):
        geo.to_ras(p, "RAI")


def test_world_voxel_round_trip_and_centres(oblique_affine):
    aff = oblique_affine()
    v = np.random.default_rng(0).uniform(-5, 40, size=(20, 3))
    w = geo.voxel_to_world(aff, v)
    np.testing.assert_allclose(geo.world_to_voxel(aff, w), v, atol=1e-10)
    # voxel (0,0,0) centre is the affine's translation; unit steps are the affine's columns
    np.testing.assert_allclose(geo.voxel_to_world(aff, [0, 0, 0]), aff[:3, 3])
    np.testing.assert_allclose(geo.voxel_to_world(aff, [0, 1, 0]) - aff[:3, 3], aff[:3, 1])
    np.testing.assert_allclose(geo.native_spacing(aff), [0.9, 1.1, 1.6])
    assert np.isnan(geo.world_to_voxel(aff, [np.nan, 0, 0])).any()


def test_level_voxel_centre_is_the_mean_of_its_level0_block():
    grid = geo.Grid(origin=(-31.0, 4.25, 100.0), spacing=0.5, shape=32, levels=4)
    for level in range(grid.levels):
        f = 2 ** level
        v = np.array([3, 0, 2])
        block = np.array(list(itertools.product(range(f), repeat=3))) + f * v
        expected = grid.voxel_to_world(block, 0).mean(axis=0)
        np.testing.assert_allclose(grid.voxel_to_world(v, level), expected, atol=1e-12)
        np.testing.assert_allclose(geo.voxel_to_world(grid.level_affine(level), v), expected,
                                   atol=1e-12)
        assert grid.level_shape(level) == (32 // f,) * 3
        assert grid.level_spacing(level) == 0.5 * f
        np.testing.assert_allclose(grid.level_origin(level),
                                   np.array(grid.origin) + (0.5 * f - 0.5) / 2)
    # grid mm: voxel (0,0,0) of level 0 is 0 mm; level l voxel 0 is at (s_l - s0) / 2
    np.testing.assert_allclose(grid.voxel_to_grid_mm([0, 0, 0], 0), 0.0)
    np.testing.assert_allclose(grid.voxel_to_grid_mm([0, 0, 0], 3), (4.0 - 0.5) / 2)


def test_world_grid_mm_voxel_round_trips_on_every_level():
    grid = geo.Grid(origin=(-12.3, 45.6, -7.8), spacing=1.25, shape=64, levels=4)
    w = np.random.default_rng(1).uniform(-20, 60, size=(10, 3))
    g = grid.world_to_grid_mm(w)
    np.testing.assert_allclose(g, w - np.array(grid.origin))
    np.testing.assert_allclose(grid.grid_mm_to_world(g), w, atol=1e-12)
    for level in range(grid.levels):
        v = grid.grid_mm_to_voxel(g, level)
        np.testing.assert_allclose(grid.voxel_to_grid_mm(v, level), g, atol=1e-12)
        np.testing.assert_allclose(grid.world_to_voxel(w, level),
                                   geo.world_to_voxel(grid.level_affine(level), w), atol=1e-10)
        np.testing.assert_allclose(grid.voxel_to_world(v, level), w, atol=1e-10)


def test_grid_for_scan_is_centred_on_the_bounding_box_not_landmarks(oblique_affine):
    aff = oblique_affine(angles_deg=(10, 0, -20))
    shape = (40, 30, 20)
    corners = np.array([aff @ [i, j, k, 1] for i in (0, 39) for j in (0, 29) for k in (0, 19)])
    centre = (corners[:, :3].min(0) + corners[:, :3].max(0)) / 2
    grid = geo.grid_for_scan(aff, shape, N0=16, s0=2.0, levels=3)
    np.testing.assert_allclose(grid.voxel_to_world([7.5, 7.5, 7.5], 0), centre, atol=1e-10)
    for level in range(3):  # the centre is the same on every level
        c = (grid.level_size(level) - 1) / 2
        np.testing.assert_allclose(grid.voxel_to_world([c, c, c], level), centre, atol=1e-10)
    np.testing.assert_allclose(grid.source_affine, aff)
    assert grid.source_shape == shape
    m = grid.source_voxel_map(0)
    np.testing.assert_allclose(m @ [7.5, 7.5, 7.5, 1], [19.5, 14.5, 9.5, 1], atol=1e-10)


def test_inside_scan_uses_half_a_voxel_tolerance(oblique_affine):
    aff = oblique_affine()
    shape = (10, 12, 8)
    vox = np.array([[0, 0, 0], [9, 11, 7], [-0.49, 5, 5], [9.49, 5, 5], [4, 4, 7.49]])
    assert geo.inside_scan(aff, shape, geo.voxel_to_world(aff, vox)).all()
    out = np.array([[-0.51, 5, 5], [9.51, 5, 5], [4, 11.6, 4], [4, 4, -3]])
    assert not geo.inside_scan(aff, shape, geo.voxel_to_world(aff, out)).any()
    assert geo.inside_scan(aff, shape, [np.nan, 0, 0]) is False


def test_grid_json_round_trip_and_validation(oblique_affine):
    grid = geo.grid_for_scan(oblique_affine(), (10, 11, 12), N0=24, s0=0.7, levels=4)
    back = geo.Grid.from_json(grid.to_json())
    assert back == grid
    assert back.origin == grid.origin  # exact floats
    np.testing.assert_array_equal(back.source_affine, grid.source_affine)
    assert back.source_shape == (10, 11, 12)
    assert set(grid.to_dict()) >= {"origin", "finest_spacing_mm", "finest_shape", "levels",
                                   "source_affine", "source_shape"}
    with pytest.raises(ValueError, match="multiple of"):
        geo.Grid((0, 0, 0), 1.0, 20, 4)
    with pytest.raises(ValueError, match="level"):
        grid.level_affine(4)
