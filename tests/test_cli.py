"""Tests of the ``locnet predict`` command line (in-process, and once as a subprocess)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from locnet import cli, geometry
from test_inference import LANDMARKS, make_model_dir, write_scans

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def run_cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run over two good scans and four bad ones."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = make_model_dir(root / "model")
    (model_dir / "quality.json").write_text(json.dumps({"threshold_mm3": 1e12}))
    good, _ = write_scans(root / "scans", indices=(110, 111))
    bad = root / "bad"
    bad.mkdir()
    (bad / "text.nii.gz").write_text("this is not a NIfTI file\n")
    frames = np.zeros((20, 20, 20, 3), np.int16)
    nib.save(nib.Nifti1Image(frames, np.diag([8.0, 8.0, 8.0, 1.0])), str(bad / "frames.nii.gz"))
    # a 4 mm thick slab: covers a few per cent of the model's 160 mm cube
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 1), np.int16), np.diag([4.0, 4.0, 4.0, 1.0])),
             str(bad / "slab.nii.gz"))
    scans = [good[0], bad / "missing.nii.gz", bad / "text.nii.gz", bad / "frames.nii.gz",
             bad / "slab.nii.gz", good[1]]
    out = root / "out"
    rc, err = run_cli(["predict", "--model", model_dir, "--out", out, "--passes", 4,
                       "--seed", 3, "--quiet", *scans])
    return {"rc": rc, "err": err, "out": out, "good": good, "model_dir": model_dir}


def test_bad_scans_fail_with_one_line_each_and_good_ones_are_written(run):
    assert run["rc"] == cli.EXIT_SCAN_FAILED
    lines = [l for l in run["err"].splitlines() if l.strip()]
    by_case = {l.split(":", 1)[0]: l for l in lines}
    assert "image file not found" in by_case["missing"]
    assert "unreadable NIfTI file" in by_case["text"]
    assert "not 3D" in by_case["frames"] and "(20, 20, 20, 3)" in by_case["frames"]
    assert "outside the trained field of view" in by_case["slab"]
    assert lines[-1] == "locnet: 4 of 6 scan(s) failed"
    assert len(lines) == 5
    out = run["out"]
    df = pd.read_csv(out / "landmarks.csv", keep_default_na=False)
    assert sorted(df.case_id.unique()) == ["case_0110", "case_0111"]
    assert list(df.landmark[:2]) == LANDMARKS
    assert set(df.quality) == {"ok"}  # threshold from quality.json
    for case in ("case_0110", "case_0111"):
        assert (out / f"{case}.mrk.json").is_file()
        png = out / f"{case}_overlay.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for case in ("missing", "text", "frames", "slab"):
        assert not (out / f"{case}.mrk.json").exists()
    doc = json.loads((out / "landmarks.json").read_text())
    assert [f["case_id"] for f in doc["failed"]] == ["missing", "text", "frames", "slab"]
    assert [c["case_id"] for c in doc["cases"]] == ["case_0110", "case_0111"]
    assert doc["preprocessing"]["window_hu"] == [-200.0, 800.0] and doc["passes"] == 4
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_coordinates_in_the_table(run):
    df = pd.read_csv(run["out"] / "landmarks.csv")
    for path in run["good"]:
        img = nib.load(str(path))
        rows = df[df.case_id == path.name[:-7]]
        ras = rows[["x_ras", "y_ras", "z_ras"]].to_numpy()
        lps = rows[["x_lps", "y_lps", "z_lps"]].to_numpy()
        np.testing.assert_allclose(lps, ras * [-1, -1, 1])
        ijk = rows[["i", "j", "k"]].to_numpy()
        np.testing.assert_allclose(geometry.voxel_to_world(img.affine, ijk), ras, atol=1e-4)
        assert (rows[["sd_x", "sd_y", "sd_z", "conf_volume_mm3"]].to_numpy() > 0).all()


def test_markups_file_is_a_slicer_point_list(run):
    df = pd.read_csv(run["out"] / "landmarks.csv")
    doc = json.loads((run["out"] / "case_0110.mrk.json").read_text())
    assert doc["@schema"].endswith("markups-schema-v1.0.3.json#")
    (m,) = doc["markups"]
    assert m["type"] == "Fiducial" and m["coordinateSystem"] == "LPS"
    assert m["coordinateUnits"] == "mm"
    cps = m["controlPoints"]
    assert [c["label"] for c in cps] == LANDMARKS
    assert [c["id"] for c in cps] == ["1", "2"]
    rows = df[df.case_id == "case_0110"]
    for c, (_, r) in zip(cps, rows.iterrows()):
        assert c["positionStatus"] == "defined" and len(c["orientation"]) == 9
        np.testing.assert_allclose(c["position"], [r.x_lps, r.y_lps, r.z_lps], atol=1e-6)


def test_manifest_and_all_good_exit_zero(run, tmp_path):
    man = tmp_path / "scans.csv"
    rel = [Path(p).resolve() for p in run["good"]]
    man.write_text("case_id,image\n" + f"patient_a,{rel[0]}\n")
    rc, err = run_cli(["predict", "--model", run["model_dir"], "--out", tmp_path / "o",
                       "--manifest", man, "--passes", 4, "--seed", 3, "--threshold", "0",
                       "--no-overlay", "--quiet"])
    assert rc == 0, err
    df = pd.read_csv(tmp_path / "o" / "landmarks.csv")
    assert list(df.case_id) == ["patient_a"] * 2 and set(df.quality) == {"review"}
    assert not (tmp_path / "o" / "patient_a_overlay.png").exists()
    assert (tmp_path / "o" / "patient_a.mrk.json").is_file()


def test_estimator_is_recorded_and_a_mismatch_with_the_threshold_warned(run, tmp_path):
    # the module's model has quality.json without an estimator: its threshold is 'exact'
    argv = ["predict", "--model", run["model_dir"], "--passes", 3, "--no-overlay", "--quiet",
            run["good"][0]]
    rc, err = run_cli(argv + ["--out", tmp_path / "exact"])
    assert rc == 0 and "warning" not in err
    assert json.loads((tmp_path / "exact" / "landmarks.json").read_text())["estimator"] == "exact"
    rc, err = run_cli(argv + ["--out", tmp_path / "window", "--estimator", "window"])
    assert rc == 0 and "chosen with the 'exact' estimator" in err
    doc = json.loads((tmp_path / "window" / "landmarks.json").read_text())
    assert doc["estimator"] == "window"
    a = pd.read_csv(tmp_path / "exact" / "landmarks.csv")
    b = pd.read_csv(tmp_path / "window" / "landmarks.csv")
    assert not np.allclose(a.conf_volume_mm3, b.conf_volume_mm3)
    rc, err = run_cli(argv + ["--out", tmp_path / "w2", "--estimator", "window", "--threshold", 1])
    assert rc == 0 and "warning" not in err  # an explicit threshold is the user's own


def test_estimator_choices_are_the_models():
    # the parser lists them itself, so that --help needs no Keras import
    from locnet.models import ESTIMATORS

    action = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["predict"]
                  ._actions if a.dest == "estimator")
    assert tuple(action.choices) == ESTIMATORS


def test_usage_errors(run, tmp_path):
    rc, err = run_cli(["predict", "--model", tmp_path / "nowhere", "--out", tmp_path / "o",
                       run["good"][0]])
    assert rc == cli.EXIT_USAGE and "model.keras not found" in err
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(io.StringIO()):
        cli.main(["predict", "--model", str(run["model_dir"]), "--out", str(tmp_path)])
    assert exc.value.code == 2


def test_help_as_a_console_script():
    exe = Path(sys.executable).with_name("locnet")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "locnet.cli"]
    res = subprocess.run(cmd + ["predict", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0
    for option in ("--model", "--out", "--manifest", "--passes", "--seed", "--threshold",
                   "--min-coverage", "--no-overlay", "example:", "exit status"):
        assert option in res.stdout
