"""Tests of the synthetic neck-CTA cohort (locnet.phantom)."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import label, map_coordinates

from locnet import phantom

# Coarse and fast: about 0.05 s per case.
COARSE = {
    "seed": 5,
    "fov_mm": [150.0, 150.0, 150.0],
    "spacing_inplane_mm": [3.0, 4.0],
    "spacing_slice_mm": [3.0, 5.0],
    "noise_hu": 25.0,
    "max_rotation_deg": 12.0,
    "max_translation_mm": 10.0,
}
# Fine enough to resolve the branches, noise-free so thresholds are exact: about 0.5 s per case.
FINE = dict(COARSE, spacing_inplane_mm=[1.0, 1.3], spacing_slice_mm=[1.0, 2.0], noise_hu=0.0,
            fov_mm=[140.0, 140.0, 140.0])


def _data(img) -> np.ndarray:
    return np.asarray(img.dataobj)


def _sample(img, world: np.ndarray, data: np.ndarray | None = None) -> np.ndarray:
    """Trilinear samples of the image at world points (..., 3); -1000 outside the scan."""
    data = _data(img).astype(np.float32) if data is None else data
    inv = np.linalg.inv(img.affine)
    vox = world @ inv[:3, :3].T + inv[:3, 3]
    return map_coordinates(data, np.moveaxis(vox, -1, 0), order=1, cval=-1000.0)


@pytest.fixture(scope="module")
def fine_cases():
    return [phantom.build_case(i, FINE) for i in range(3)]


def write_cohort(n_cases, cfg, out_dir, cases=None):
    """The synthetic cohort as the workflow writes it: rule synthetic_case renders each case
    (:func:`phantom.write_case`), rule synthetic_cohort writes the tables of all cases."""
    for i in range(n_cases) if cases is None else cases:
        phantom.write_case(i, cfg, out_dir)
    manifest, landmarks = phantom.write_tables(n_cases, cfg, out_dir)
    return {"manifest": manifest, "landmarks": landmarks}


def test_case_is_deterministic_and_independent_of_cohort_size(tmp_path):
    paths = write_cohort(3, COARSE, tmp_path)
    img_alone, lm_alone = phantom.make_case(1, COARSE)
    img_cohort = nib.load(str(tmp_path / "images" / "case_0001.nii.gz"))
    np.testing.assert_array_equal(_data(img_cohort), _data(img_alone))
    np.testing.assert_array_equal(img_cohort.affine, img_alone.affine)
    assert img_cohort.get_data_dtype() == np.int16
    # the same call twice gives the same case; different cases differ
    img_again, lm_again = phantom.make_case(1, COARSE)
    np.testing.assert_array_equal(_data(img_again), _data(img_alone))
    img0, lm0 = phantom.make_case(0, COARSE)
    assert not np.allclose(lm0["left_bifurcation"], lm_alone["left_bifurcation"])
    # landmarks without rendering, and in the table, match the rendered case
    for name, xyz in phantom.case_landmarks(1, COARSE).items():
        np.testing.assert_allclose(xyz, lm_alone[name], atol=1e-9)
    with open(paths["landmarks"]) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6
    row = next(r for r in rows if r["case_id"] == "case_0001" and r["landmark"] == "left_bifurcation")
    np.testing.assert_allclose([float(row[k]) for k in "xyz"], lm_alone["left_bifurcation"], atol=1e-5)


def test_cohort_layout(tmp_path):
    write_cohort(2, COARSE, tmp_path)
    with open(tmp_path / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case_id"] for r in rows] == ["case_0000", "case_0001"]
    for r in rows:
        assert not Path(r["image"]).is_absolute()
        assert (tmp_path / r["image"]).is_file()
    leftovers = [p.name for p in tmp_path.rglob(".*")]
    assert leftovers == []
    # a subset renders only those images but the tables list the whole cohort
    sub = tmp_path / "sub"
    write_cohort(4, COARSE, sub, cases=[2])
    assert sorted(p.name for p in (sub / "images").iterdir()) == ["case_0002.nii.gz"]
    with open(sub / "manifest.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4


def test_storage_orientations_are_exact():
    """Every storage kind holds the same canonical volume: only array order and affine change."""
    ref = None
    for kind in ("RAS", "LPS", "LAS", "LPI", "permuted"):
        case = phantom.build_case(2, COARSE, storage=kind)
        can = nib.as_closest_canonical(case.image)
        if ref is None:
            ref = can
            continue
        np.testing.assert_array_equal(_data(can), _data(ref))
        np.testing.assert_allclose(can.affine, ref.affine, atol=1e-4)


def test_orientations_vary_and_values_are_realistic():
    cases = [phantom.build_case(i, COARSE) for i in range(5)]
    kinds = {c.storage for c in cases}
    assert {"LPS", "RAS", "permuted"} <= kinds
    assert len({c.axcodes for c in cases}) >= 4
    assert any(c.image.affine[0, 0] < 0 and c.image.affine[1, 1] < 0 for c in cases)   # LPS-like
    assert any(abs(c.image.affine[2, 0]) > 0 for c in cases)                            # slices first
    for c in cases:
        aff = c.image.affine
        assert np.all(np.isfinite(aff))
        data = _data(c.image)
        inv = np.linalg.inv(aff)
        for xyz in c.landmarks.values():
            vox = inv[:3, :3] @ xyz + inv[:3, 3]
            assert np.all(vox > 0) and np.all(vox < np.array(data.shape) - 1), (c.case_id, vox)
        assert (data < -900).mean() > 0.05                            # air around the body
        assert ((data > -150) & (data < -60)).mean() > 0.005          # subcutaneous fat
        assert ((data > 0) & (data < 80)).mean() > 0.1                # soft tissue
        assert (data > 400).sum() > 20                                # bone
        assert data.min() >= -1024 and data.max() < 2000


def test_landmark_sits_at_the_split(fine_cases):
    """Vessel at the landmark; one lumen 5 mm below it, two separate lumens 12 mm above it."""
    t = np.arange(-15.0, 15.0 + 1e-9, 0.5)
    U, V = np.meshgrid(t, t, indexing="ij")
    for case in fine_cases:
        data = _data(case.image).astype(np.float32)
        pr = case.anatomy.params
        thr = 0.5 * (pr["arterial_hu"] + pr["jugular_hu"])  # veins stay below, arteries above
        for side in ("left", "right"):
            B = case.landmarks_patient[f"{side}_bifurcation"]
            assert _sample(case.image, case.patient_to_world(B)[None], data)[0] > thr

            def plane(dz):
                """Thresholded patient-axial plane dz mm above B (patient frame: pose applied)."""
                pts = B + np.array([0.0, 0.0, dz]) + U[..., None] * [1, 0, 0] + V[..., None] * [0, 1, 0]
                lab, _ = label(_sample(case.image, case.patient_to_world(pts), data) > thr)
                return lab

            def at(lab, xy):
                i, j = np.round((np.asarray(xy) - B[:2] + 15.0) / 0.5).astype(int)
                return lab[i, j]

            above = plane(12.0)
            z = B[2] + 12.0
            ica = phantom._centre_at(case.anatomy.centrelines[f"ica_{side}"], np.array([z]))[0]
            eca = phantom._centre_at(case.anatomy.centrelines[f"eca_{side}"], np.array([z]))[0]
            a, e = at(above, ica), at(above, eca)
            assert a > 0 and e > 0 and a != e, (case.case_id, side)
            below = plane(-5.0)
            disc = U ** 2 + V ** 2 <= 6.0 ** 2
            ids = set(np.unique(below[disc])) - {0}
            assert len(ids) == 1, (case.case_id, side, ids)
            assert at(below, [B[0], B[1]]) in ids


def test_left_is_patient_left_and_heights_differ(fine_cases):
    for case in fine_cases + [phantom.build_case(i, COARSE) for i in range(3, 8)]:
        left, right = case.landmarks["left_bifurcation"], case.landmarks["right_bifurcation"]
        pl, pr = case.world_to_patient(left), case.world_to_patient(right)
        assert pl[0] < -15 and pr[0] > 15                    # patient frame
        assert left[0] < right[0]                            # RAS world: left has the smaller x
        assert 5.0 <= abs(pl[2] - pr[2]) <= 25.0
        np.testing.assert_allclose(pl, case.landmarks_patient["left_bifurcation"], atol=1e-9)


def test_bone_is_brighter_than_the_bifurcation():
    cfg = dict(FINE, noise_hu=25.0)
    case = phantom.build_case(0, cfg)
    img = case.image
    data = _data(img).astype(np.float32)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij"), -1)
    world = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    top = np.unravel_index(np.argmax(data), data.shape)
    bone = data[data > 400]
    for xyz in case.landmarks.values():
        near = np.linalg.norm(world - xyz, axis=-1) <= 5.0
        assert data[near].max() < np.percentile(bone, 99)
        assert np.linalg.norm(world[top] - xyz) > 15.0
        assert data[near].max() > 200  # the vessel is contrast-filled


def test_speed_knobs_do_not_change_anatomy():
    a = phantom.case_landmarks(4, COARSE)
    b = phantom.case_landmarks(4, dict(COARSE, spacing_inplane_mm=[0.5, 0.6], noise_hu=5.0))
    for k in phantom.LANDMARK_NAMES:
        np.testing.assert_array_equal(a[k], b[k])


def test_config_is_checked():
    with pytest.raises(ValueError):
        phantom.resolve_config(dict(COARSE, spacing_slice_mm=[3.0, 1.0]))
    with pytest.raises(ValueError):
        phantom.build_case(0, COARSE, storage="XYZ")
