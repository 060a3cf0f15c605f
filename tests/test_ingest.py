"""Ingest and io: good cohorts pass through, every bad input is reported with case and file."""

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from locnet import geometry as geo
from locnet.ingest import ingest
from locnet.fileio import (InputError, atomic_write, load_volume, read_landmarks, read_manifest,
                       write_json_atomic, write_landmarks)

NAMES = ["left_bifurcation", "right_bifurcation"]
SHAPE = (12, 10, 8)


def ct_like(shape=SHAPE, seed=0):
    """int16 'HU' values from air to bone: most of them inside the default window."""
    return np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.int16)


def make_cohort(tmp_path, write_nifti, oblique_affine, n=3):
    """n small scans, a manifest with relative paths, and per-case affines."""
    affines = {}
    rows = []
    for i in range(n):
        case = f"c{i}"
        aff = oblique_affine(angles_deg=(3 * i, -2, 5), origin=(-5.0 * i, 2.0, 3.0))
        write_nifti(ct_like(seed=i), aff, f"images/{case}.nii.gz")
        affines[case] = aff
        rows.append({"case_id": case, "image": f"images/{case}.nii.gz"})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return affines


def centre(aff):
    return geo.scan_centre(aff, SHAPE)


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
        ("c1", "left_carotid", *centre(affs["c1"])),            # unknown landmark name
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
    from locnet import fileio

    target = tmp_path / "table.csv"
    fileio.write_text_atomic("old\n", target)
    with pytest.raises(RuntimeError):
        with fileio.atomic_write(target) as tmp:
            tmp.write_text("half a fi")
            raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]
    # what a SIGKILLed writer leaves behind is recognised and removed; other files are not
    (tmp_path / ".tmp-0123456789ab-table.csv").write_text("partial")
    (tmp_path / ".hidden-but-mine").write_text("keep")
    removed = fileio.remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".tmp-0123456789ab-table.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden-but-mine", "table.csv"]


# ---- issue 11: input that ingest must refuse --------------------------------------------

def add_cases(tmp_path, cases):
    """Append ``{case: image}`` rows to the manifest."""
    manifest = pd.read_csv(tmp_path / "manifest.csv", dtype=str)
    extra = pd.DataFrame({"case_id": list(cases), "image": list(cases.values())})
    pd.concat([manifest, extra]).to_csv(tmp_path / "manifest.csv", index=False)


def problem_lines(tmp_path, **kw):
    """The lines of the InputError of a run; checks that the header counts them right."""
    with pytest.raises(InputError) as info:
        run(tmp_path, **kw)
    msg = str(info.value)
    lines = msg.splitlines()[1:]
    assert msg.startswith(f"{len(lines)} problem(s) in the input cohort:\n"), msg
    assert not (tmp_path / "data").exists()  # nothing written on failure
    return lines


def only_hit(lines, *parts):
    hits = [ln for ln in lines if all(p in ln for p in parts)]
    assert len(hits) == 1, (parts, "\n".join(lines))
    return hits[0]


def test_degenerate_scans_are_refused_with_case_and_file(tmp_path, write_nifti, oblique_affine):
    make_cohort(tmp_path, write_nifti, oblique_affine)
    write_rows(tmp_path / "landmarks.csv", [])
    aff = oblique_affine()
    write_nifti(ct_like((12, 10, 1)), aff, "images/one_slice.nii.gz")   # X x Y x 1
    write_nifti(ct_like((12, 3, 8)), aff, "images/three_rows.nii.gz")
    write_nifti(ct_like((40, 40, 5)), np.diag([1.0, 1.0, 2.0, 1.0]), "images/slab.nii.gz")
    write_nifti(np.full(SHAPE, 40, np.int16), aff, "images/constant.nii.gz")
    air_and_metal = np.where(ct_like() > 0, 3000, -1000).astype(np.int16)
    write_nifti(air_and_metal, aff, "images/outside_window.nii.gz")
    unit = np.random.default_rng(1).random(SHAPE).astype(np.float32)   # scaled to [0, 1]
    write_nifti(unit, aff, "images/unit.nii.gz")
    nan = ct_like().astype(np.float32)
    nan[3, 4, 5] = np.nan
    write_nifti(nan, aff, "images/nan.nii.gz")
    inf = ct_like().astype(np.float32)
    inf[0, 0, 0] = -np.inf
    write_nifti(inf, aff, "images/inf.nii")
    full = write_nifti(ct_like((40, 40, 40)), aff, "images/full.nii.gz").read_bytes()
    (tmp_path / "images/cut.nii.gz").write_bytes(full[:len(full) // 2])
    raw = write_nifti(ct_like(), aff, "images/cut_raw.nii").read_bytes()
    (tmp_path / "images/cut_raw.nii").write_bytes(raw[:len(raw) - 100])
    add_cases(tmp_path, {c: f"images/{c}.nii{'' if c in ('inf', 'cut_raw') else '.gz'}"
                         for c in ["one_slice", "three_rows", "slab", "constant",
                                   "outside_window", "unit", "nan", "inf", "cut", "cut_raw"]})
    window = (-200.0, 800.0)
    lines = problem_lines(tmp_path, window=window, min_extent_mm=10.5)
    only_hit(lines, "case 'one_slice'", "one_slice.nii.gz", "too thin", "array axis 2: 1 voxel")
    only_hit(lines, "case 'three_rows'", "three_rows.nii.gz", "too thin", "array axis 1: 3 voxel")
    only_hit(lines, "case 'slab'", "slab.nii.gz", "too thin", "array axis 2: 5 voxel(s), 10 mm",
             "10.5 mm")
    only_hit(lines, "case 'constant'", "constant.nii.gz", "no intensity variation", "40")
    only_hit(lines, "case 'outside_window'", "outside_window.nii.gz", "intensity window",
             "[-200, 800]", "only 0% of the voxels", "binary mask")
    only_hit(lines, "case 'unit'", "unit.nii.gz", "span only 0.1% of the intensity window")
    only_hit(lines, "case 'nan'", "nan.nii.gz", "NaN or infinite")
    only_hit(lines, "case 'inf'", "inf.nii", "NaN or infinite")
    only_hit(lines, "case 'cut'", "cut.nii.gz", "unreadable voxel data")
    only_hit(lines, "case 'cut_raw'", "cut_raw.nii", "unreadable voxel data")
    # the slab (10 mm) is thin only against a field of view; one_slice is thin whatever
    assert len(lines) == 10
    # window=None (intensities not windowed in HU): no window check, everything else stays
    lines = problem_lines(tmp_path, window=None, min_extent_mm=None, threads=3)
    assert not [ln for ln in lines if "window" in ln or "'slab'" in ln]
    assert len(lines) == 7
    # and a clean cohort passes with every check on
    manifest = pd.read_csv(tmp_path / "manifest.csv", dtype=str)
    manifest[manifest.case_id.str.match(r"c\d")].to_csv(tmp_path / "manifest.csv", index=False)
    man, _ = run(tmp_path, window=window, min_extent_mm=8.0, threads=2)
    assert man.case_id.tolist() == ["c0", "c1", "c2"]


def test_every_landmark_table_problem_is_listed_and_counted(tmp_path, write_nifti,
                                                            oblique_affine):
    affs = make_cohort(tmp_path, write_nifti, oblique_affine)
    c0, c1 = centre(affs["c0"]), centre(affs["c1"])
    write_rows(tmp_path / "landmarks.csv", [
        ("c0", "left_bifurcation", "12,5", c0[1], c0[2]),      # 2: non-numeric x
        ("c0", "right_bifurcation", c0[0], "abc", "inf"),      # 3: non-numeric y and z
        ("c1", "left_bifurcation", c1[0], "", c1[2]),          # 4: partly empty
        ("c1", "left_bifurcation", *c1),                       # 5: given twice
        ("ghost", "right_bifurcation", 1.0, "", ""),           # 6: unknown case, partly empty
        ("c2", "left_carotid", 0, 0, 0),                       # 7: unknown name, outside scan
        ("", "left_bifurcation", 1, 2, 3),                     # 8: empty case id
        ("c1", "right_bifurcation", *c1),                      # 9: fine
    ])
    lines = problem_lines(tmp_path)
    where = "landmarks.csv), line"
    only_hit(lines, "case 'c0'", where + " 2", "non-numeric x value '12,5'")
    only_hit(lines, "case 'c0'", where + " 3", "non-numeric y value 'abc'")
    only_hit(lines, "case 'c0'", where + " 3", "non-numeric z value 'inf'")
    only_hit(lines, "case 'c1'", where + " 4", "not all of x, y, z empty")
    only_hit(lines, "case 'c1'", where + " 5", "given twice (first on line 4)")
    only_hit(lines, "case 'ghost'", where + " 6", "not in the manifest")
    only_hit(lines, "case 'ghost'", where + " 6", "not all of x, y, z empty")
    only_hit(lines, "case 'c2'", where + " 7", "unknown landmark name 'left_carotid'")
    only_hit(lines, "case 'c2'", where + " 7", "outside the scan")
    only_hit(lines, "landmarks.csv, line 8", "empty case_id or landmark name")
    assert len(lines) == 10


@pytest.mark.parametrize("bad", ["p 001", "pé01", "..", ".hidden", "-rf", "a/b", "x" * 101])
def test_case_ids_outside_the_allowed_pattern_are_refused(tmp_path, write_nifti, oblique_affine,
                                                          bad):
    from locnet.fileio import CASE_ID_PATTERN

    make_cohort(tmp_path, write_nifti, oblique_affine)
    write_nifti(ct_like(), oblique_affine(), "images/odd.nii.gz")
    add_cases(tmp_path, {bad: "images/odd.nii.gz"})
    write_rows(tmp_path / "landmarks.csv", [])
    lines = problem_lines(tmp_path)
    assert len(lines) == 1
    line = only_hit(lines, f"case {bad!r}", "manifest.csv", "line 5", "not allowed",
                    CASE_ID_PATTERN)
    assert "no spaces" in line


def test_allowed_case_ids_pass(tmp_path, write_nifti, oblique_affine):
    make_cohort(tmp_path, write_nifti, oblique_affine)
    write_nifti(ct_like(seed=5), oblique_affine(), "images/odd.nii.gz")
    write_nifti(ct_like(seed=6), oblique_affine(), "images/odd2.nii.gz")
    add_cases(tmp_path, {"P-001.b_2": "images/odd.nii.gz", "9" * 100: "images/odd2.nii.gz"})
    write_rows(tmp_path / "landmarks.csv", [])
    man, _ = run(tmp_path)
    assert man.case_id.tolist()[3:] == ["P-001.b_2", "9" * 100]


def test_empty_tables_are_refused_naming_the_file(tmp_path, write_nifti, oblique_affine):
    make_cohort(tmp_path, write_nifti, oblique_affine)
    (tmp_path / "landmarks.csv").write_bytes(b"")
    lines = problem_lines(tmp_path)
    assert len(lines) == 1
    only_hit(lines, "landmark file", "landmarks.csv", "is empty (0 bytes)", "case_id,landmark,x,y,z")
    (tmp_path / "manifest.csv").write_bytes(b"")
    (tmp_path / "landmarks.csv").write_text("\n\n")
    lines = problem_lines(tmp_path)
    only_hit(lines, "manifest file", "manifest.csv", "is empty (0 bytes)", "case_id,image")
    only_hit(lines, "landmark file", "landmarks.csv", "is empty (no header line)")
    assert len(lines) == 2


def test_empty_manifest_cells_do_not_hide_other_problems(tmp_path, write_nifti, oblique_affine):
    make_cohort(tmp_path, write_nifti, oblique_affine)
    add_cases(tmp_path, {"": "images/c0.nii.gz", "nofile": "", "gone": "images/gone.nii.gz"})
    write_rows(tmp_path / "landmarks.csv", [])
    lines = problem_lines(tmp_path)
    only_hit(lines, "manifest.csv, line 5", "empty case_id or image")
    only_hit(lines, "manifest.csv, line 6", "empty case_id or image")
    only_hit(lines, "case 'gone'", "gone.nii.gz", "not found")
    assert len(lines) == 3


def test_landmark_inside_scan_but_outside_finest_grid(tmp_path, write_nifti):
    from locnet.ingest import pyramid_checks

    # a 200 mm scan, a 10^3 grid of 4 mm (40 mm) centred on it
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    rows = []
    for i in range(3):
        write_nifti(ct_like((100, 100, 100), seed=i), aff, f"images/c{i}.nii.gz")
        rows.append({"case_id": f"c{i}", "image": f"images/c{i}.nii.gz"})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    c = geo.scan_centre(aff, (100, 100, 100))
    write_rows(tmp_path / "landmarks.csv", [
        ("c0", "left_bifurcation", *(c + [15.0, -10, 19.9])),   # inside the grid (20 mm half)
        ("c1", "left_bifurcation", *(c + [0, 0, 20.2])),         # just outside the grid
        ("c2", "right_bifurcation", *(c + [-60.0, 0, 0])),       # far outside the grid
    ])
    grid = {"finest_shape": 10, "finest_spacing_mm": 4.0, "levels": 2}
    lines = problem_lines(tmp_path, grid=grid)
    only_hit(lines, "case 'c1'", "landmarks.csv), line 3", "'left_bifurcation'",
             "inside the scan", "c1.nii.gz", "outside the pyramid's finest grid")
    only_hit(lines, "case 'c2'", "landmarks.csv), line 4", "'right_bifurcation'",
             "outside the pyramid's finest grid")
    assert len(lines) == 2
    write_rows(tmp_path / "landmarks.csv", [("c0", "left_bifurcation", *(c + [15.0, -10, 19.9]))])
    run(tmp_path, grid=grid)
    # the config's pyramid block gives the same grid, window and field of view
    checks = pyramid_checks({"finest_shape": 128, "finest_spacing_mm": 1.25, "levels": 4,
                             "background_hu": -1000.0, "window_hu": [-200.0, 800.0]})
    assert checks == {"grid": {"finest_shape": 128, "finest_spacing_mm": 1.25, "levels": 4},
                      "window": (-200.0, 800.0), "min_extent_mm": 20.0}


def test_synthetic_cases_pass_every_check(tmp_path):
    """The synthetic cohort (tiny config's spacing) passes ingest with the config's checks."""
    import yaml

    from locnet import phantom
    from locnet.config import SCHEMA_PATH
    from locnet.ingest import pyramid_checks

    cfg = yaml.safe_load((SCHEMA_PATH.parents[2] / "config" / "tiny.yaml").read_text())
    for i in range(3):
        phantom.write_case(i, cfg["synthetic"], tmp_path / "cohort")
    manifest, landmarks = phantom.write_tables(3, cfg["synthetic"], tmp_path / "cohort")
    man, lm = ingest(manifest, landmarks, NAMES, "RAS",
                     tmp_path / "data/manifest.csv", tmp_path / "data/landmarks.csv",
                     threads=2, **pyramid_checks(cfg["pyramid"]))
    assert len(man) == 3 and not lm[["x", "y", "z"]].isna().any().any()


def test_window_check_follows_the_intensity_mode():
    from locnet.ingest import pyramid_checks

    pyr = {"finest_shape": 448, "finest_spacing_mm": 0.5, "levels": 4,
           "window_hu": [-200.0, 800.0]}
    assert pyramid_checks(pyr)["min_extent_mm"] == 28.0     # the paper's 56 voxels at 0.5 mm
    assert pyramid_checks({**pyr, "intensity": {"mode": "ct_window"}})["window"] == (-200, 800)
    assert pyramid_checks({**pyr, "intensity": {"mode": "percentile"}})["window"] is None


# ---- content digests, one scan per case, a table with something to learn -------------------

def test_the_same_image_under_two_case_ids_is_refused(tmp_path, write_nifti, oblique_affine):
    """By path (the same file listed twice) and by content (the same voxels and affine in
    another file, saved uncompressed: every byte differs), naming both case ids and files."""
    affs = make_cohort(tmp_path, write_nifti, oblique_affine)
    img = nib.load(str(tmp_path / "images/c1.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), str(tmp_path / "copy.nii"))
    add_cases(tmp_path, {"again": "images/c0.nii.gz", "twin": "copy.nii"})
    write_rows(tmp_path / "landmarks.csv", [("c0", "left_bifurcation", *centre(affs["c0"]))])
    lines = problem_lines(tmp_path)
    assert len(lines) == 2, lines
    only_hit(lines, "cases 'c0' and 'again'", "manifest.csv", "c0.nii.gz", "same image file")
    only_hit(lines, "cases 'c1' (file", "c1.nii.gz", "and 'twin' (file", "copy.nii",
             "same image (voxel data and affine", "sha256:")


def test_scan_digest_follows_content_not_file_bytes(tmp_path, write_nifti, oblique_affine):
    from locnet.fileio import load_volume
    from locnet.ingest import scan_digest, write_digest

    aff = oblique_affine()
    a = write_nifti(ct_like(seed=1), aff, "a.nii.gz")
    b = write_nifti(ct_like(seed=1), aff, "b.nii")            # same image, other bytes
    c = write_nifti(ct_like(seed=2), aff, "c.nii.gz")         # other voxels
    moved = aff.copy()
    moved[0, 3] += 0.5
    d = write_nifti(ct_like(seed=1), moved, "d.nii.gz")       # same voxels, moved
    digest = {p.name: scan_digest(*load_volume(p, dtype=None)) for p in (a, b, c, d)}
    assert digest["a.nii.gz"] == digest["b.nii"] and digest["a.nii.gz"].startswith("sha256:")
    assert len({digest["a.nii.gz"], digest["c.nii.gz"], digest["d.nii.gz"]}) == 3
    # written only when it changes: an unchanged digest keeps its file and its time stamp
    path = tmp_path / "digests" / "c0.json"
    assert write_digest(path, "c0", digest["a.nii.gz"]) is True
    stamp = path.stat().st_mtime_ns
    assert write_digest(path, "c0", digest["b.nii"]) is False
    assert path.stat().st_mtime_ns == stamp
    assert write_digest(path, "c0", digest["c.nii.gz"]) is True
    assert json.loads(path.read_text()) == {"case_id": "c0", "digest": digest["c.nii.gz"]}


def test_ingest_writes_each_cases_digest(tmp_path, write_nifti, oblique_affine):
    from locnet.fileio import load_volume
    from locnet.ingest import scan_digest

    affs = make_cohort(tmp_path, write_nifti, oblique_affine)
    write_rows(tmp_path / "landmarks.csv", [("c0", "left_bifurcation", *centre(affs["c0"]))])
    run(tmp_path, digest_dir=tmp_path / "data" / "digests")
    for case in affs:
        got = json.loads((tmp_path / "data" / "digests" / f"{case}.json").read_text())
        want = scan_digest(*load_volume(tmp_path / "images" / f"{case}.nii.gz", dtype=None))
        assert got == {"case_id": case, "digest": want}


def test_a_table_with_only_its_header_is_refused_naming_it(tmp_path, write_nifti,
                                                             oblique_affine):
    make_cohort(tmp_path, write_nifti, oblique_affine)
    write_rows(tmp_path / "landmarks.csv", [])
    lines = problem_lines(tmp_path, min_annotated=1)
    assert len(lines) == 1
    only_hit(lines, "landmark file", "landmarks.csv", "0 annotated landmark(s)",
             "at least 1 needed", "only its header")
    # every x, y, z empty is the same
    write_rows(tmp_path / "landmarks.csv", [("c0", "left_bifurcation", "", "", "")])
    only_hit(problem_lines(tmp_path, min_annotated=1), "landmarks.csv", "0 annotated")



def test_ingest_cohort_is_the_workflows_ingest(tmp_path, write_nifti, oblique_affine):
    """Rule ingest's call: split counts, the pyramid block's checks, at least one annotated
    landmark, and the digests; the same call ``benchmarks/device_cohort.py`` makes."""
    from locnet.ingest import ingest_cohort

    affs = make_cohort(tmp_path, write_nifti, oblique_affine)
    # an 8 mm finest grid on each scan's centre; 8 mm is also the thinnest scan it takes
    pyr = {"finest_shape": 4, "finest_spacing_mm": 2.0, "levels": 1,
           "window_hu": [-200.0, 800.0], "background_hu": -1000.0}

    def cohort(split_cfg):
        return ingest_cohort(tmp_path / "manifest.csv", tmp_path / "landmarks.csv",
                             landmark_names=NAMES, coordinate_system="RAS", split_cfg=split_cfg,
                             pyramid_cfg=pyr, out_manifest=tmp_path / "data/manifest.csv",
                             out_landmarks=tmp_path / "data/landmarks.csv",
                             digest_dir=tmp_path / "data/digests")

    c0 = centre(affs["c0"])
    write_rows(tmp_path / "landmarks.csv", [("c0", "left_bifurcation", "", "", "")])
    with pytest.raises(InputError, match="at least 1 needed"):
        cohort({})
    write_rows(tmp_path / "landmarks.csv", [("c0", "left_bifurcation", *(c0 + [0, 0, 5.0]))])
    with pytest.raises(InputError, match="outside the pyramid's finest grid"):
        cohort({})
    write_rows(tmp_path / "landmarks.csv", [("c0", "left_bifurcation", *c0)])
    with pytest.raises(InputError, match=r"sum to 4"):
        cohort({"counts": {"train": 2, "val": 1, "test": 1}})
    assert not (tmp_path / "data").exists()  # nothing written while a check fails
    man, lm = cohort({"counts": {"train": 1, "val": 1, "test": 1}})
    assert man["case_id"].tolist() == ["c0", "c1", "c2"]
    np.testing.assert_allclose(lm.loc[0, ["x", "y", "z"]].to_numpy(float), c0)
    assert sorted(p.name for p in (tmp_path / "data/digests").iterdir()) == [
        "c0.json", "c1.json", "c2.json"]
