"""Ingest and io: good cohorts pass through, every bad input is reported with case and file."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from locnet import geometry as geo
from locnet.ingest import ingest
from locnet.io import (InputError, atomic_write, load_volume, read_landmarks, read_manifest,
                       write_json_atomic, write_landmarks)

NAMES = ["left_bifurcation", "right_bifurcation"]
SHAPE = (12, 10, 8)


def make_cohort(tmp_path, write_nifti, oblique_affine, n=3):
    """n small scans, a manifest with relative paths, and per-case affines."""
    affines = {}
    rows = []
    for i in range(n):
        case = f"c{i}"
        aff = oblique_affine(angles_deg=(3 * i, -2, 5), origin=(-5.0 * i, 2.0, 3.0))
        write_nifti(np.zeros(SHAPE, np.int16), aff, f"images/{case}.nii.gz")
        affines[case] = aff
        rows.append({"case_id": case, "image": f"images/{case}.nii.gz"})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return affines


def centre(aff):
    return geo.scan_center(aff, SHAPE)


def write_rows(path, rows):
    pd.DataFrame(rows, columns=["case_id", "landmark", "x", "y", "z"]).to_csv(path, index=False)


def run(tmp_path, system="RAS", **kw):
    return ingest(tmp_path / "manifest.csv", tmp_path / "landmarks.csv", NAMES, system,
                  tmp_path / "data/manifest.csv", tmp_path / "data/landmarks.csv", **kw)


def test_good_cohort_with_missing_landmarks(tmp_path, write_nifti, oblique_affine):
    affs = make_cohort(tmp_path, write_nifti, oblique_affine)
    p0, p1 = centre(affs["c0"]) + [1, 2, -1], centre(affs["c1"]) - [2, 0, 1]
    write_rows(tmp_path / "landmarks.csv", [
        ("c0", "left_bifurcation", *p0),
        ("c0", "right_bifurcation", "", "", ""),   # empty cells: not annotated
        ("c1", "right_bifurcation", *p1),          # c1 left and all of c2: no rows at all
    ])
    man, lm = run(tmp_path)
    assert list(man.columns) == ["case_id", "image", "shape", "spacing"]
    assert man["shape"].tolist() == ["12x10x8"] * 3
    assert man["spacing"].iloc[0] == "0.9x1.1x1.6"
    # image paths stay relative, now to data/manifest.csv, and resolve to the same files
    back = read_manifest(tmp_path / "data/manifest.csv")
    assert back["image"].tolist() == [str((tmp_path / f"images/c{i}.nii.gz").resolve())
                                      for i in range(3)]
    stored = read_landmarks(tmp_path / "data/landmarks.csv")
    assert len(stored) == 6 and stored[["case_id", "landmark"]].values.tolist() == [
        [c, n] for c in ("c0", "c1", "c2") for n in NAMES]
    xyz = stored[["x", "y", "z"]].to_numpy()
    np.testing.assert_allclose(xyz[0], p0)
    np.testing.assert_allclose(xyz[3], p1)
    assert np.isnan(xyz[[1, 2, 4, 5]]).all()
    text = (tmp_path / "data/landmarks.csv").read_text().splitlines()
    assert text[2] == "c0,right_bifurcation,,,"


def test_lps_landmarks_are_converted_to_ras(tmp_path, write_nifti, oblique_affine):
    affs = make_cohort(tmp_path, write_nifti, oblique_affine)
    p_ras = centre(affs["c2"]) + [3.0, -1.0, 0.5]
    p_lps = [-p_ras[0], -p_ras[1], p_ras[2]]
    write_rows(tmp_path / "landmarks.csv", [("c2", "left_bifurcation", *p_lps)])
    _, lm = run(tmp_path, system="LPS")
    row = lm[(lm.case_id == "c2") & (lm.landmark == "left_bifurcation")]
    np.testing.assert_allclose(row[["x", "y", "z"]].to_numpy()[0], p_ras)
    # the same numbers declared as RAS lie outside the scan, and the message says so
    with pytest.raises(InputError, match=r"case 'c2'.*landmarks\.csv.*outside the scan"):
        run(tmp_path, system="RAS")


def test_trailing_singleton_axis_is_accepted(tmp_path, write_nifti):
    aff = np.diag([0.5, 0.5, 2.0, 1.0])
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6, 1)
    path = write_nifti(data, aff, "four_d.nii.gz")
    vol, a = load_volume(path, case="x")
    assert vol.shape == (4, 5, 6) and vol.dtype == np.float32
    np.testing.assert_array_equal(vol, data[..., 0])
    raw, _ = load_volume(path, dtype=None)
    assert raw.dtype == np.int16
    np.testing.assert_array_equal(a, aff)


def raw_header_nifti(path, srow_x):
    """A NIfTI whose sform row x is written verbatim (nibabel refuses such affines otherwise)."""
    h = nib.Nifti1Header()
    h.set_data_dtype(np.float32)
    h["srow_x"], h["srow_y"], h["srow_z"] = srow_x, [0, 1, 0, 0], [0, 0, 1, 0]
    h["sform_code"], h["qform_code"] = 1, 0
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), None, h), str(path))


def test_every_problem_is_reported_once_with_case_and_file(tmp_path, write_nifti, oblique_affine):
    affs = make_cohort(tmp_path, write_nifti, oblique_affine, n=2)
    img = tmp_path / "images"
    (img / "garbage.nii.gz").write_bytes(b"this is not a nifti file at all" * 20)
    write_nifti(np.zeros((5, 5, 5, 2), np.float32), np.eye(4), "images/two_vol.nii.gz")
    write_nifti(np.zeros((5, 5), np.float32), np.eye(4), "images/flat.nii.gz")
    raw_header_nifti(img / "nan_aff.nii", [np.nan, 0, 0, 0])
    raw_header_nifti(img / "singular.nii", [0, 0, 0, 0])
    manifest = pd.read_csv(tmp_path / "manifest.csv")
    extra = pd.DataFrame({
        "case_id": ["gone", "bad", "two", "flat", "nanaff", "sing", "c1"],
        "image": ["images/missing.nii.gz", "images/garbage.nii.gz", "images/two_vol.nii.gz",
                  "images/flat.nii.gz", "images/nan_aff.nii", "images/singular.nii",
                  "images/c0.nii.gz"]})
    pd.concat([manifest, extra]).to_csv(tmp_path / "manifest.csv", index=False)
    far = centre(affs["c0"]) + [500, 0, 0]
    write_rows(tmp_path / "landmarks.csv", [
        ("c0", "left_bifurcation", *centre(affs["c0"])),        # fine
        ("c0", "right_bifurcation", *far),                      # outside the scan
        ("c1", "left_carotid", 0, 0, 0),                        # unknown landmark name
        ("ghost", "left_bifurcation", 0, 0, 0),                 # unknown case
        ("c1", "right_bifurcation", 1.0, "", 2.0),              # partly empty
    ])
    with pytest.raises(InputError) as info:
        run(tmp_path)
    msg = str(info.value)
    lines = msg.splitlines()[1:]
    expected = {
        "gone": ("missing.nii.gz", "not found"),
        "bad": ("garbage.nii.gz", "unreadable"),
        "two": ("two_vol.nii.gz", "not 3D"),
        "flat": ("flat.nii.gz", "not 3D"),
        "nanaff": ("nan_aff.nii", "not finite"),
        "sing": ("singular.nii", "singular"),
        "c1": ("manifest.csv", "duplicate case id"),
    }
    for case, (file, what) in expected.items():
        hits = [ln for ln in lines if f"case {case!r}" in ln and file in ln and what in ln]
        assert len(hits) == 1, (case, msg)
    for case, what in [("c0", "outside the scan"), ("c1", "unknown landmark name"),
                       ("ghost", "not in the manifest"), ("c1", "not all of x, y, z")]:
        hits = [ln for ln in lines if f"case {case!r}" in ln and "landmarks.csv" in ln
                and what in ln]
        assert len(hits) == 1, (case, what, msg)
    assert msg.startswith(f"{len(lines)} problem(s)") and len(lines) == 11
    assert not (tmp_path / "data").exists()  # nothing written on failure


def test_too_few_cases_and_counts_mismatch(tmp_path, write_nifti, oblique_affine):
    make_cohort(tmp_path, write_nifti, oblique_affine, n=2)
    write_rows(tmp_path / "landmarks.csv", [])
    with pytest.raises(InputError, match=r"manifest\.csv: 2 case\(s\); the split needs at least 3"):
        run(tmp_path)
    with pytest.raises(InputError, match="sum to 3"):
        run(tmp_path, min_cases=2, split_counts={"train": 1, "val": 1, "test": 1})
    man, _ = run(tmp_path, min_cases=2)
    assert len(man) == 2


def test_non_numeric_coordinate_names_case_and_file(tmp_path, write_nifti, oblique_affine):
    make_cohort(tmp_path, write_nifti, oblique_affine)
    write_rows(tmp_path / "landmarks.csv", [("c0", "left_bifurcation", "12,5", 1, 2)])
    pattern = r"case 'c0' \(file .*landmarks\.csv\), line 2.*non-numeric x"
    with pytest.raises(InputError, match=pattern):
        run(tmp_path)


def test_landmark_table_round_trip_keeps_nan(tmp_path):
    df = pd.DataFrame({"case_id": ["a", "a"], "landmark": ["l", "r"],
                       "x": [1.25, np.nan], "y": [-3.0, np.nan], "z": [1e-3, np.nan]})
    write_landmarks(df, tmp_path / "lm.csv")
    back = read_landmarks(tmp_path / "lm.csv")
    pd.testing.assert_frame_equal(back, df)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list((tmp_path / "out").iterdir()) == []
    write_json_atomic({"a": np.float32(1.5), "b": np.arange(2)}, target)
    assert target.read_text() == '{\n  "a": 1.5,\n  "b": [\n    0,\n    1\n  ]\n}\n'
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.json"]


def test_atomic_write_keeps_old_file_on_failure_and_cleans_up(tmp_path):
    from locnet import io

    target = tmp_path / "table.csv"
    io.write_text_atomic("old\n", target)
    with pytest.raises(RuntimeError):
        with io.atomic_write(target) as tmp:
            tmp.write_text("half a fi")
            raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]
    # what a SIGKILLed writer leaves behind is recognised and removed; other files are not
    (tmp_path / ".tmp-0123456789ab-table.csv").write_text("partial")
    (tmp_path / ".hidden-but-mine").write_text("keep")
    removed = io.remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".tmp-0123456789ab-table.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden-but-mine", "table.csv"]
