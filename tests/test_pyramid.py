"""Pyramid building: resampling geometry, orientation invariance, block means, stored files."""

import itertools

import nibabel as nib
import numpy as np
import pytest

from locnet import geometry as geo
from locnet.fileio import InputError, load_volume, read_json
from locnet.pyramid import (apply_window, build_pyramid, downsample2, intensity_params,
                            load_level, read_grid, resample_to_grid, stored_affine, to_c_order)

WINDOW = (-1000.0, 1000.0)
BACKGROUND = -1000.0


def blob_scan(affine, shape, centre_world, sigma_mm=3.0, amplitude=1500.0):
    """A Gaussian blob at a world position on an air background (HU)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    d2 = ((geo.voxel_to_world(affine, ijk) - centre_world) ** 2).sum(-1)
    return (BACKGROUND + amplitude * np.exp(-d2 / (2 * sigma_mm**2))).astype(np.float32)


def centre_of_mass(a):
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in a.shape], indexing="ij"), axis=-1)
    return (idx * a[..., None]).sum((0, 1, 2)) / a.sum()


def signed_permutation(data, affine, perm, flips):
    """Store the same scan with its array axes permuted and flipped; adjust the affine to match.

    New voxel j holds old voxel i with i[perm[m]] = j[m] (or n - 1 - j[m] when flipped), so
    old_index = P @ new_index + t and new_affine = affine @ [[P, t], [0, 1]].
    """
    new = np.transpose(data, perm)
    m = np.zeros((4, 4))
    m[3, 3] = 1
    for axis_new, axis_old in enumerate(perm):
        if flips[axis_new]:
            new = np.flip(new, axis=axis_new)
            m[axis_old, axis_new] = -1
            m[axis_old, 3] = data.shape[axis_old] - 1
        else:
            m[axis_old, axis_new] = 1
    return np.ascontiguousarray(new), affine @ m


def test_identity_grid_reproduces_the_windowed_scan(write_nifti, tmp_path):
    # axis-aligned native scan whose voxels coincide with the grid: resampling is the identity
    rng = np.random.default_rng(0)
    data = rng.uniform(-1200, 1200, size=(16, 16, 16)).astype(np.float32)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-7.0, 3.0, 11.0]
    path = write_nifti(data, aff)
    grid = build_pyramid(path, {"finest_shape": 16, "finest_spacing_mm": 2.0, "levels": 3},
                         WINDOW, BACKGROUND, tmp_path / "pyr", threads=2)
    np.testing.assert_allclose(grid.level_affine(0), aff, atol=1e-12)
    level0, _ = load_level(tmp_path / "pyr", 0)
    expected = (np.clip(data, *WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
    np.testing.assert_allclose(level0, expected, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_known_world_point_lands_on_the_right_voxel_of_every_level(
        write_nifti, tmp_path, oblique_affine, threads):
    aff = oblique_affine(angles_deg=(6, -4, 9), spacing=(0.8, 0.9, 1.7), origin=(-30, -25, -20))
    shape = (64, 60, 36)
    centre = geo.scan_centre(aff, shape)
    point = centre + np.array([4.3, -6.1, 2.7])  # not on the grid centre, not on a voxel
    path = write_nifti(blob_scan(aff, shape, point), aff)
    out = tmp_path / "pyr"
    grid = build_pyramid(path, {"finest_shape": 48, "finest_spacing_mm": 1.0, "levels": 3},
                         WINDOW, BACKGROUND, out, threads=threads)
    for level in range(grid.levels):
        arr, g = load_level(out, level)
        assert g == grid
        expected = grid.world_to_voxel(point, level)
        assert np.abs(centre_of_mass(arr) - expected).max() < 0.1, level


def test_orientation_does_not_change_the_resampled_volume(tmp_path, oblique_affine):
    aff = oblique_affine(angles_deg=(4, 7, -5), spacing=(1.1, 0.9, 1.45), origin=(5, -8, 12))
    shape = (14, 12, 10)
    data = np.random.default_rng(3).uniform(-1000, 1000, size=shape).astype(np.float32)
    params = {"finest_shape": 16, "finest_spacing_mm": 0.85, "levels": 2}
    reference = None
    variants = list(itertools.product(itertools.permutations(range(3)),
                                      itertools.product((False, True), repeat=3)))
    assert len(variants) == 48  # all 6 permutations x all 8 flips (incl. LPS storage: flip i, j)
    for n, (perm, flips) in enumerate(variants):
        d, a = signed_permutation(data, aff, perm, flips)
        path = tmp_path / f"v{n}.nii"
        nib.save(nib.Nifti1Image(d, a), str(path))
        grid = build_pyramid(path, params, WINDOW, BACKGROUND, tmp_path / f"p{n}", threads=1)
        level0, _ = load_level(tmp_path / f"p{n}", 0, mmap=False)
        if reference is None:
            reference, ref_grid = level0, grid
            assert 0.05 < level0.mean() < 0.95  # the scan fills a good part of the grid
        else:
            np.testing.assert_allclose(grid.origin, ref_grid.origin, atol=1e-5)  # float32 header
            np.testing.assert_allclose(level0, reference, atol=1e-5, err_msg=f"{perm} {flips}")


def test_coarse_levels_carry_the_half_voxel_offset():
    grid = geo.Grid(origin=(-10.0, 20.0, 5.0), spacing=0.5, shape=32, levels=4)
    level0 = np.zeros(grid.level_shape(0), np.float32)
    lo, hi = np.array([8, 16, 24]), np.array([16, 24, 32])  # aligned with the coarsest blocks
    level0[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1.0
    expected_world = grid.voxel_to_world((lo + hi - 1) / 2, 0)
    arr = level0
    for level in range(grid.levels):
        if level:
            arr = downsample2(arr)
        com_world = geo.voxel_to_world(grid.level_affine(level), centre_of_mass(arr))
        np.testing.assert_allclose(com_world, expected_world, atol=1e-9)
        np.testing.assert_allclose(grid.world_to_voxel(expected_world, level),
                                   centre_of_mass(arr), atol=1e-9)


def test_downsample2_is_the_block_mean():
    a = np.random.default_rng(4).random((8, 6, 4), dtype=np.float32)
    expected = a.reshape(4, 2, 3, 2, 2, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(downsample2(a), expected, rtol=1e-6)
    assert downsample2(a).dtype == np.float32
    with pytest.raises(ValueError):
        downsample2(np.zeros((3, 4, 4), np.float32))


def test_stored_levels_files_and_grid(write_nifti, tmp_path, oblique_affine):
    aff = oblique_affine()
    shape = (20, 18, 12)
    data = np.random.default_rng(5).integers(-1100, 1500, size=shape).astype(np.int16)
    path = write_nifti(data, aff, "case.nii.gz")
    out = tmp_path / "pyr"
    grid = build_pyramid(path, {"finest_shape": 16, "finest_spacing_mm": 1.5, "levels": 3,
                                "background_hu": 0}, (-200, 800), -1000, out, case="c1")
    assert sorted(p.name for p in out.iterdir()) == ["grid.json", "level0.nii", "level1.nii",
                                                      "level2.nii"]  # no temporary files left
    assert read_grid(out) == grid
    prev = None
    for level in range(3):
        arr, g = load_level(out, level)
        assert isinstance(arr, np.memmap) and arr.dtype == np.float32
        assert arr.shape == grid.level_shape(level)
        # a view of the map in the order the backends take: no copy when fed to a model
        assert arr.flags.c_contiguous
        assert 0.0 <= arr.min() and arr.max() <= 1.0
        img = nib.load(str(out / f"level{level}.nii"))
        # stored [k, j, i]: the file's affine is the grid's with its axis columns reversed,
        # so any viewer (and nibabel's canonical reorientation) sees the level as load_level
        np.testing.assert_allclose(img.affine, stored_affine(grid.level_affine(level)),
                                   atol=1e-4)
        np.testing.assert_array_equal(np.asarray(img.dataobj), arr.T)
        canonical = nib.as_closest_canonical(img)
        np.testing.assert_allclose(canonical.affine, grid.level_affine(level), atol=1e-4)
        np.testing.assert_array_equal(np.asarray(canonical.dataobj), arr)
        assert int(img.header["sform_code"]) == 1
        if prev is not None:
            n = arr.shape[0]
            block_mean = prev.reshape(n, 2, n, 2, n, 2).mean(axis=(1, 3, 5))
            np.testing.assert_allclose(arr, block_mean, atol=1e-6)
        prev = np.array(arr)
    # the grid corner region lies outside the scan: background (air) -> 0 after windowing
    level0, _ = load_level(out, 0)
    assert level0[0, 0, 0] == 0.0


def test_window_scales_to_unit_range():
    a = np.array([-2000.0, -200.0, 300.0, 800.0, 5000.0], np.float32)
    np.testing.assert_allclose(apply_window(a, (-200, 800)), [0, 0, 0.5, 1, 1])
    with pytest.raises(ValueError):
        apply_window(a, (1, 1))


def test_resample_to_grid_without_window_keeps_hu(oblique_affine):
    aff = oblique_affine()
    data = np.full((10, 10, 10), 40, np.int16)
    grid = geo.grid_for_scan(aff, data.shape, N0=8, s0=1.0, levels=1)
    out = resample_to_grid(data, aff, grid, background=-1000.0, threads=2, slab=3)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[3:5, 3:5, 3:5], 40.0)


def test_missing_image_names_the_case(tmp_path):
    with pytest.raises(InputError, match=r"case 'c7'.*nope\.nii\.gz"):
        build_pyramid(tmp_path / "nope.nii.gz", {"finest_shape": 8, "finest_spacing_mm": 1.0,
                                                 "levels": 2}, WINDOW, BACKGROUND,
                      tmp_path / "pyr", case="c7")
    assert not (tmp_path / "pyr").exists()


def test_truncated_image_names_the_case(write_nifti, tmp_path):
    path = write_nifti(np.random.default_rng(6).normal(size=(20, 20, 20)).astype(np.float32),
                       np.eye(4), "trunc.nii.gz")
    path.write_bytes(path.read_bytes()[:3000])  # header intact, voxel data cut short
    with pytest.raises(InputError, match=r"case 'c9' \(file .*trunc\.nii\.gz\): unreadable"):
        build_pyramid(path, {"finest_shape": 8, "finest_spacing_mm": 1.0, "levels": 2},
                      WINDOW, BACKGROUND, tmp_path / "pyr", case="c9")


def test_load_level_refuses_the_older_layout_and_a_foreign_affine(write_nifti, tmp_path):
    data = np.random.default_rng(2).integers(-1000, 1000, size=(14, 12, 10)).astype(np.int16)
    out = tmp_path / "pyr"
    grid = build_pyramid(write_nifti(data, np.diag([1.2, 1.0, 1.6, 1.0]), "c.nii.gz"),
                         {"finest_shape": 8, "finest_spacing_mm": 2.0, "levels": 2},
                         (-500, 500), -1000, out, case="c")
    want = [np.array(load_level(out, lv, mmap=False)[0]) for lv in range(2)]
    # rewrite level 1 as pyramids were first written: array [i, j, k], the grid affine as is
    nib.save(nib.Nifti1Image(want[1], grid.level_affine(1)), str(out / "level1.nii"))
    for mmap in (True, False):
        with pytest.raises(InputError) as info:
            load_level(out, 1, mmap=mmap)
        message = str(info.value)
        assert str(out / "level1.nii") in message and "older [i, j, k] layout" in message
        assert "re-run the pyramid rule" in message
        assert f"delete {out}" in message and "--forcerun pyramid" in message
    # the level left as written still loads
    np.testing.assert_array_equal(load_level(out, 0)[0], want[0])
    # a level whose affine belongs to another grid is refused, naming the file
    nib.save(nib.Nifti1Image(want[0], np.diag([3.0, 3.0, 3.0, 1.0])), str(out / "level0.nii"))
    with pytest.raises(InputError, match=r"level0\.nii: its affine does not match") as info:
        load_level(out, 0)
    assert "older" not in str(info.value)


@pytest.mark.parametrize("threads", [1, 3])
def test_to_c_order_copies_any_layout_exactly(threads):
    rng = np.random.default_rng(4)
    a = np.asfortranarray(rng.random((37, 21, 50), dtype=np.float32))  # not multiples of 16
    c = to_c_order(a, threads=threads)
    assert c.flags.c_contiguous and c is not a
    np.testing.assert_array_equal(c, a)
    view = a[::2, 3:, ::-1]  # neither C nor Fortran contiguous
    np.testing.assert_array_equal(to_c_order(view, threads=threads), view)
    already = np.ascontiguousarray(a)
    assert to_c_order(already) is already


# ---- intensity modes (issue 11, item 11) ---------------------------------------------------
def mri_like_scan(shape=(24, 22, 20), seed=8):
    """An MRI-like volume: values 0-16,000, a smooth-contrast body in dark air, no HU."""
    rng = np.random.default_rng(seed)
    ijk = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    r2 = (ijk ** 2 / np.array([0.8, 0.75, 0.9]) ** 2).sum(-1)
    tissue = 1000.0 + 15500.0 * (0.5 + 0.5 * np.sin(3 * ijk[..., 0]) * np.cos(2 * ijk[..., 1]))
    data = np.where(r2 < 1.0, tissue, 30.0) + rng.normal(0.0, 40.0, shape)
    return np.clip(data, 0, 16000).astype(np.int16)


PARAMS = {"finest_shape": 16, "finest_spacing_mm": 2.0, "levels": 2}


def test_percentile_mode_keeps_an_mri_graded_and_ct_window_warns(write_nifti, tmp_path, caplog):
    data = mri_like_scan()
    assert data.min() >= 0 and data.max() > 15000
    path = write_nifti(data, np.diag([2.0, 2.0, 2.0, 1.0]), "mri.nii.gz")
    pct = {"mode": "percentile", "percentiles": [0.5, 99.5]}
    with caplog.at_level("WARNING", logger="locnet.pyramid"):
        build_pyramid(path, PARAMS, (-200, 800), -1000, tmp_path / "p", case="m1", intensity=pct)
    assert not caplog.records  # percentile mode never warns about the CT window
    level0, _ = load_level(tmp_path / "p", 0)
    assert level0.min() >= 0.0 and level0.max() <= 1.0
    inner = level0[(level0 > 0.05) & (level0 < 0.95)]
    assert inner.size > 0.3 * level0.size  # graded, not binary
    assert len(np.unique(np.round(level0, 2))) > 50
    meta = read_json(tmp_path / "p" / "grid.json")
    assert meta["intensity"] == pct
    lo, hi = np.percentile(data, [0.5, 99.5])
    np.testing.assert_allclose(meta["scan_window"], [lo, hi])
    # the same scan through the CT window: almost binary, and a warning names case and file
    with caplog.at_level("WARNING", logger="locnet.pyramid"):
        build_pyramid(path, PARAMS, (-200, 800), -1000, tmp_path / "c", case="m1")
    ct, _ = load_level(tmp_path / "c", 0)
    # air at about 0.2, the body saturated at 1, hardly anything between
    assert ((ct > 0.3) & (ct < 0.95)).mean() < 0.05 and (ct >= 0.999).mean() > 0.5
    (rec,) = caplog.records
    assert rec.levelname == "WARNING"
    assert "case 'm1'" in rec.getMessage() and str(path) in rec.getMessage()
    assert "pyramid.intensity.mode: percentile" in rec.getMessage()


def test_ct_window_is_unchanged_bit_for_bit(write_nifti, tmp_path, oblique_affine, caplog):
    aff = oblique_affine()
    shape = (20, 18, 12)
    data = np.random.default_rng(9).integers(-1100, 1500, size=shape).astype(np.int16)
    path = write_nifti(data, aff, "ct.nii.gz")
    # the path every pyramid took before the intensity modes existed
    stored, stored_aff = load_volume(path, dtype=None)
    grid = geo.grid_for_scan(stored_aff, shape, 16, 1.5, 3)
    before = to_c_order(resample_to_grid(stored, stored_aff, grid, -1000.0, window=(-200, 800)))
    for n, intensity in enumerate([None, {"mode": "ct_window"},
                                   {"mode": "ct_window", "percentiles": [0.5, 99.5]}]):
        out = tmp_path / f"p{n}"
        build_pyramid(path, {"finest_shape": 16, "finest_spacing_mm": 1.5, "levels": 3},
                      (-200, 800), -1000, out, intensity=intensity)
        level0, _ = load_level(out, 0, mmap=False)
        np.testing.assert_array_equal(level0, before)
        assert read_json(out / "grid.json")["intensity"] == {"mode": "ct_window"}
        assert "scan_window" not in read_json(out / "grid.json")


def test_a_ct_does_not_warn(write_nifti, tmp_path, caplog):
    # mostly air around a body of fat, muscle and bone: most voxels are clipped (air), but
    # air is what the window is meant to send to 0
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    rng = np.random.default_rng(10)
    ijk = np.stack(np.meshgrid(*[np.linspace(-1, 1, 20)] * 3, indexing="ij"), -1)
    r2 = (ijk ** 2 / np.array([0.5, 0.4, 0.9]) ** 2).sum(-1)
    data = np.where(r2 < 1.0, np.where(r2 < 0.7, 45.0, -100.0), -1000.0)
    data[r2 < 0.1] = 1200.0  # bone, above the window
    data = (data + rng.normal(0.0, 25.0, data.shape)).astype(np.int16)
    assert (data < -200).mean() > 0.6
    with caplog.at_level("WARNING", logger="locnet.pyramid"):
        build_pyramid(write_nifti(data, aff), PARAMS, (-200, 800), -1000, tmp_path / "p")
    assert not caplog.records


def test_percentile_mode_refuses_a_constant_scan(write_nifti, tmp_path):
    path = write_nifti(np.full((10, 10, 10), 7, np.int16), np.eye(4), "flat.nii.gz")
    with pytest.raises(InputError, match=r"case 'f'.*flat\.nii\.gz.*percentiles"):
        build_pyramid(path, {"finest_shape": 8, "finest_spacing_mm": 1.0, "levels": 2},
                      WINDOW, BACKGROUND, tmp_path / "p", case="f",
                      intensity={"mode": "percentile"})


def test_intensity_params_defaults_and_checks():
    assert intensity_params(None) == {"mode": "ct_window"}
    assert intensity_params({"mode": "percentile"}) == {"mode": "percentile",
                                                        "percentiles": [0.5, 99.5]}
    with pytest.raises(ValueError, match="mode"):
        intensity_params({"mode": "zscore"})
    with pytest.raises(ValueError, match="percentiles"):
        intensity_params({"mode": "percentile", "percentiles": [50, 50]})


@pytest.mark.parametrize("intensity", [None, {"mode": "ct_window"},
                                       {"mode": "percentile", "percentiles": [1.0, 99.0]}])
def test_inference_applies_the_mode_in_the_model_metadata(write_nifti, tmp_path, intensity):
    from locnet import inference

    data = mri_like_scan()
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    grid_block = {**PARAMS, "window_hu": [-200.0, 800.0], "background_hu": -1000.0}
    if intensity is not None:  # None: a model trained before the key existed
        grid_block["intensity"] = intensity
    params = inference.preprocessing_params({"grid": grid_block})
    inputs, _, level0 = inference.preprocess(data, aff, params)
    build_pyramid(write_nifti(data, aff), PARAMS, (-200, 800), -1000, tmp_path / "p",
                  intensity=intensity)
    for lv in range(2):
        stored, _ = load_level(tmp_path / "p", lv, mmap=False)
        np.testing.assert_array_equal(inputs[f"level{lv}"][0, ..., 0], stored)
    graded = ((level0 > 0.3) & (level0 < 0.95)).mean()
    assert graded > 0.3 if intensity and intensity["mode"] == "percentile" else graded < 0.05
    if intensity and intensity["mode"] == "percentile":
        assert params["intensity"] == intensity
    else:
        assert params.get("intensity", {"mode": "ct_window"}) == {"mode": "ct_window"}


def test_build_case_takes_every_setting_from_the_pyramid_block(write_nifti, tmp_path):
    """Rule pyramid's call (and ``benchmarks/device_cohort.py``'s): window, background and
    intensity mode all come from the config's block, so a changed block changes the level."""
    from locnet.pyramid import build_case

    path = write_nifti(mri_like_scan(), np.diag([2.0, 2.0, 2.0, 1.0]), "mri.nii.gz")
    pct = {"mode": "percentile", "percentiles": [1.0, 99.0]}
    blocks = {"ct": {**PARAMS, "window_hu": [-200.0, 800.0], "background_hu": -1000.0},
              "wide": {**PARAMS, "window_hu": [0.0, 30000.0], "background_hu": 0.0}}
    blocks["pct"] = {**blocks["ct"], "intensity": pct}
    levels = {}
    for name, block in blocks.items():
        build_case(path, block, tmp_path / name, case="m1", threads=1)
        build_pyramid(path, block, block["window_hu"], block["background_hu"],
                      tmp_path / f"{name}_direct", case="m1", intensity=block.get("intensity"))
        levels[name], _ = load_level(tmp_path / name, 0, mmap=False)
        direct, _ = load_level(tmp_path / f"{name}_direct", 0, mmap=False)
        np.testing.assert_array_equal(levels[name], direct)
    assert read_json(tmp_path / "pct" / "grid.json")["intensity"] == pct
    assert read_json(tmp_path / "wide" / "grid.json")["window_hu"] == [0.0, 30000.0]
    assert not np.array_equal(levels["ct"], levels["wide"])
    assert not np.array_equal(levels["ct"], levels["pct"])
