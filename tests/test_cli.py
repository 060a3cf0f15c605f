"""Tests of the ``locnet predict`` command line (in-process, and once as a subprocess)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import keras
import numpy as np
import pandas as pd
import pytest

from locnet import cli, geometry, inference, pyramid, quality, seeds, study_predict
from locnet import train as T
from test_inference import GRID, LANDMARKS, make_model_dir, write_scans

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def run_cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run over two good scans and five bad ones."""
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
    # all air: no content
    nib.save(nib.Nifti1Image(np.full((40, 40, 40), -1000, np.int16),
                             np.diag([4.0, 4.0, 4.0, 1.0])), str(bad / "air.nii.gz"))
    scans = [good[0], bad / "missing.nii.gz", bad / "text.nii.gz", bad / "frames.nii.gz",
             bad / "slab.nii.gz", bad / "air.nii.gz", good[1]]
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
    assert by_case["air"] == "air: no content: every voxel of air.nii.gz has the value -1000"
    assert lines[-1] == "locnet: 5 of 7 scan(s) failed"
    # the model has no training intensity summary (as models trained before it): one note
    (note,) = [l for l in lines if l.startswith("locnet: note:")]
    assert "no intensity summary of the training cases" in note
    assert len(lines) == 7
    out = run["out"]
    df = pd.read_csv(out / "landmarks.csv", keep_default_na=False)
    assert sorted(df.case_id.unique()) == ["case_0110", "case_0111"]
    assert list(df.landmark[:2]) == LANDMARKS
    assert set(df.quality) == {"ok"}  # threshold from quality.json
    for case in ("case_0110", "case_0111"):
        assert (out / f"{case}.mrk.json").is_file()
        png = out / f"{case}_overlay.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(df.intensity) == {""}  # nothing to compare with
    for case in ("missing", "text", "frames", "slab", "air"):
        assert not (out / f"{case}.mrk.json").exists()
    doc = json.loads((out / "landmarks.json").read_text())
    assert [f["case_id"] for f in doc["failed"]] == ["missing", "text", "frames", "slab", "air"]
    assert doc["intensity_check"] is None and doc["cases"][0]["intensity"]["flag"] is None
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
    rc, err = run_cli(["predict", "--model", str(run["model_dir"]), "--out", str(tmp_path)])
    assert rc == cli.EXIT_USAGE and "no scans given" in err


def test_help_as_a_console_script():
    exe = Path(sys.executable).with_name("locnet")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "locnet.cli"]
    res = subprocess.run(cmd + ["predict", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0
    for option in ("--model", "--out", "--manifest", "--passes", "--seed", "--threshold",
                   "--min-coverage", "--no-overlay", "example:", "exit status", "--overwrite"):
        assert option in res.stdout
    # the examples name a folder that holds a model.keras: the deployed seed's
    examples = [l for l in res.stdout.splitlines() if "--model results/" in l]
    assert len(examples) == 2
    assert all("--model results/models/multiscale_e2e_noise/seed0 " in l for l in examples)


def test_unusable_out_is_refused_before_any_scan_is_computed(run, tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("computed before --out was checked")

    monkeypatch.setattr(inference, "load_model_dir", must_not_run)
    monkeypatch.setattr(inference, "predict_scan", must_not_run)
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder\n")
    argv = ["predict", "--model", run["model_dir"], "--quiet", run["good"][0], "--out"]
    rc, err = run_cli(argv + [a_file])
    assert rc == cli.EXIT_USAGE
    assert err.strip() == f"locnet: error: --out {a_file}: exists and is not a folder"
    rc, err = run_cli(argv + [a_file / "sub"])
    assert rc == cli.EXIT_USAGE and "cannot create the folder" in err
    assert "Traceback" not in err and a_file.read_text() == "not a folder\n"


def test_read_only_out_is_refused(run, tmp_path, monkeypatch):
    monkeypatch.setattr(inference, "predict_scan", lambda *a, **k: pytest.fail("computed"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root writes anyway: as the OS would say

        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(cli.tempfile, "mkstemp", denied)
    try:
        rc, err = run_cli(["predict", "--model", run["model_dir"], "--out", locked, "--quiet",
                           run["good"][0]])
    finally:
        locked.chmod(0o755)
    assert rc == cli.EXIT_USAGE and "not writable" in err and "Traceback" not in err


# --------------------------------------------------------------------------- the study's numbers

@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny study: phantom scans, their pyramids, a multiscale_e2e_noise trained one epoch,
    its predictions as the predict rule makes them (with the sidecar), and quality.json as the
    quality_threshold rule writes it."""
    root = tmp_path_factory.mktemp("study")
    scans, table = write_scans(root / "scans", indices=(130, 131, 132, 133))
    dirs = []
    for path in scans:
        case = inference.case_id_from_path(path)
        pyramid.build_pyramid(path, GRID, GRID["window_hu"], GRID["background_hu"],
                              root / "pyramid" / case, case=case, threads=1)
        dirs.append(root / "pyramid" / case)
    model_dir = root / "models" / "multiscale_e2e_noise"
    T.train("multiscale_e2e_noise", {"patch": 4, "noise_mm": 5.0, "unet": {"filters": [4, 8]}},
            {"epochs": 1, "learning_rate": 0.001}, dict(GRID), LANDMARKS, dirs[:2], dirs[2:3],
            table, model_dir, root / "state", seed=5)
    # the predict rule: its own seed, passes, confidence and estimator (config evaluation.*)
    seed, passes, confidence = seeds.derive(2020, "predict/multiscale_e2e_noise"), 5, 0.8
    model = keras.saving.load_model(model_dir / "model.keras", compile=False)
    subsets = {"case_0132": "val", "case_0133": "test"}
    preds = study_predict.predict_cases(model, dirs[2:], subsets, table, LANDMARKS, passes=passes,
                                  seed=seed, confidence=confidence, progress=False)
    csv = root / "predictions" / "multiscale_e2e_noise.csv"
    csv.parent.mkdir()
    quality.write_prediction_settings(csv, method="multiscale_e2e_noise", seed=seed,
                                      passes=passes, confidence=confidence, estimator="exact")
    preds.to_csv(csv, index=False)
    # the quality_threshold rule
    result = quality.choose_threshold(pd.read_csv(csv), 5.0, 0.9)
    result.update(quality.study_settings(csv, confidence=0.9, estimator="exact"))
    quality.write_quality(result, model_dir / "quality.json")
    return {"root": root, "scans": scans, "model_dir": model_dir, "preds": preds,
            "seed": seed, "passes": passes, "confidence": confidence}


def test_cli_reproduces_the_study_predictions(study, tmp_path):
    meta = json.loads((study["model_dir"] / "metadata.json").read_text())
    assert meta["intensity"]["level"] == GRID["levels"] - 1 and meta["intensity"]["n_cases"] == 2
    qual = json.loads((study["model_dir"] / "quality.json").read_text())
    assert (qual["seed"], qual["passes"], qual["confidence"], qual["estimator"]) == \
        (study["seed"], study["passes"], study["confidence"], "exact")
    # no --seed, --passes or confidence given: the study's are used
    rc, err = run_cli(["predict", "--model", study["model_dir"], "--out", tmp_path / "o",
                       "--no-overlay", "--quiet", *study["scans"][2:]])
    assert rc == cli.EXIT_OK, err
    assert "note" not in err and "warning" not in err
    df = pd.read_csv(tmp_path / "o" / "landmarks.csv", keep_default_na=False)
    merged = df.merge(study["preds"], on=["case_id", "landmark"], suffixes=("_cli", "_study"))
    assert len(merged) == 4
    for a, b in (("x_ras", "x"), ("y_ras", "y"), ("z_ras", "z"), ("sd_x_cli", "sd_x_study"),
                 ("sd_y_cli", "sd_y_study"), ("sd_z_cli", "sd_z_study")):
        np.testing.assert_allclose(merged[a].astype(float), merged[b], atol=1e-4)
    np.testing.assert_allclose(merged.conf_volume_mm3_cli.astype(float),
                               merged.conf_volume_mm3_study, rtol=1e-4)
    doc = json.loads((tmp_path / "o" / "landmarks.json").read_text())
    assert (doc["seed"], doc["seed_source"], doc["passes"], doc["confidence"]) == \
        (study["seed"], "quality.json", study["passes"], study["confidence"])
    assert set(df.intensity) <= {"ok", "atypical"} and doc["intensity_check"] is not None
    # another seed gives other numbers: the seed is what made them equal
    rc, _ = run_cli(["predict", "--model", study["model_dir"], "--out", tmp_path / "s0",
                     "--seed", 0, "--no-overlay", "--quiet", study["scans"][3]])
    other = pd.read_csv(tmp_path / "s0" / "landmarks.csv")
    assert rc == 0 and not np.allclose(other.sd_x, df[df.case_id == "case_0133"].sd_x.astype(float))


def test_cli_flags_a_scan_of_another_kind(study, tmp_path):
    img = nib.load(str(study["scans"][3]))
    bright = tmp_path / "bright.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32) + 700.0, img.affine),
             str(bright))
    rc, err = run_cli(["predict", "--model", study["model_dir"], "--out", tmp_path / "o",
                       "--no-overlay", "--quiet", "--passes", 2, "--threshold", 1e12, bright,
                       study["scans"][3]])
    assert rc == cli.EXIT_OK, err  # answered, flagged
    (line,) = [l for l in err.splitlines() if l.strip()]
    assert line.startswith("bright: warning: intensities atypical of the training cases: mean ")
    assert line.endswith(f"({bright})")
    df = pd.read_csv(tmp_path / "o" / "landmarks.csv", keep_default_na=False)
    assert set(df[df.case_id == "bright"].intensity) == {"atypical"}
    # every volume is under the threshold, but an atypical scan is never 'ok'
    assert set(df[df.case_id == "bright"].quality) == {"review"}
    assert set(df[df.case_id == "case_0133"].quality) == {"ok"}
    doc = json.loads((tmp_path / "o" / "landmarks.json").read_text())
    case = next(c for c in doc["cases"] if c["case_id"] == "bright")
    assert case["intensity"]["flag"] == "atypical" and case["intensity"]["outside_training_range"]
    mrk = json.loads((tmp_path / "o" / "bright.mrk.json").read_text())
    assert "atypical" in mrk["markups"][0]["controlPoints"][0]["description"]


# --------------------------------------------------------------------------- issue 24

def test_case_ids_cannot_write_outside_out_and_all_problems_are_listed(run, tmp_path,
                                                                       monkeypatch):
    """A manifest id '../escaped' or an absolute id once wrote beside or far from --out. Every
    id (manifest or file name) must match ingest's pattern; all problems are listed at once
    and nothing is computed or written."""
    monkeypatch.setattr(inference, "predict_scan", lambda *a, **k: pytest.fail("computed"))
    good = Path(run["good"][0]).resolve()
    far = tmp_path / "far"
    far.mkdir()
    man = tmp_path / "scans.csv"
    man.write_text("case_id,image\n"
                   f"../escaped,{good}\n"
                   f"{far / 'abs_escape'},{good}\n"
                   f"fine,\n"
                   f"ok_1,{good}\n"
                   f"ok_1,{good}\n")
    spaced = tmp_path / "my scan.nii.gz"
    spaced.write_bytes(good.read_bytes())
    out = tmp_path / "sub" / "out"
    rc, err = run_cli(["predict", "--model", run["model_dir"], "--out", out, "--quiet",
                       "--manifest", man, spaced])
    assert rc == cli.EXIT_USAGE
    lines = err.splitlines()
    assert lines[0] == ("locnet: error: 5 problem(s) with the scans given; nothing was "
                        "computed:")
    assert f"manifest {man}, line 2: case id '../escaped' is not allowed" in err
    assert f"manifest {man}, line 3: case id '{far / 'abs_escape'}' is not allowed" in err
    assert f"manifest file {man}, line 4: empty case_id or image" in err
    assert f"manifest {man}, line 6: duplicate case id 'ok_1'" in err
    assert f"scan {spaced} (its case id is the file name" in err and "'my scan'" in err
    assert "[A-Za-z0-9][A-Za-z0-9_.-]{0,99}" in err
    assert not list(tmp_path.rglob("*.mrk.json")) and not list(far.iterdir())
    assert not (out / "landmarks.csv").exists()


def test_predict_batch_checks_every_path_it_writes(run, tmp_path):
    from locnet.fileio import InputError, inside

    lm = inference.load_model_dir(run["model_dir"])
    settings, _ = inference.batch_settings(lm, passes=2, overlays=False, quiet=True)
    out = tmp_path / "out"
    out.mkdir()
    for bad in ("../escaped", str(tmp_path / "abs_escape"), "a/b"):
        with pytest.raises(InputError, match="is not allowed"):
            inference.predict_batch(lm, [("ok", run["good"][0]), (bad, run["good"][0])], out,
                                    settings, progress=False)
    assert not list(tmp_path.rglob("*.mrk.json")) and not list(out.iterdir())
    # the last guard: a path that resolves outside the folder (a link out of it) is refused
    assert inside(out, "x.mrk.json") == out / "x.mrk.json"
    (out / "link.mrk.json").symlink_to(tmp_path / "elsewhere.mrk.json")
    for name in ("../escaped.mrk.json", str(tmp_path / "abs.mrk.json"), "link.mrk.json"):
        with pytest.raises(InputError, match="outside the output folder"):
            inside(out, name)


def test_a_non_empty_out_needs_overwrite_which_removes_only_the_previous_runs_files(run,
                                                                                    tmp_path):
    man = tmp_path / "scans.csv"
    good = [Path(p).resolve() for p in run["good"]]
    man.write_text(f"case_id,image\nfirst,{good[0]}\nsecond,{good[1]}\n")
    out = tmp_path / "out"
    base = ["predict", "--model", run["model_dir"], "--out", out, "--passes", 2, "--quiet"]
    rc, err = run_cli(base + ["--manifest", man])
    assert rc == 0, err
    assert {p.name for p in out.iterdir()} >= {"first.mrk.json", "second_overlay.png"}
    (out / "my_notes.txt").write_text("mine\n")
    (out / "other.mrk.json").write_text("{}\n")  # not written by locnet predict
    rc, err = run_cli(base + [good[1]])
    assert rc == cli.EXIT_USAGE
    assert f"--out {out}: the folder is not empty" in err and "--overwrite" in err
    rc, err = run_cli(base + ["--overwrite", "--no-overlay", good[1]])
    assert rc == 0, err
    assert "removed 6 file(s) of the previous run" in err
    assert {p.name for p in out.iterdir()} == {
        "landmarks.csv", "landmarks.json", "case_0111.mrk.json", "my_notes.txt",
        "other.mrk.json"}
    assert set(pd.read_csv(out / "landmarks.csv").case_id) == {"case_0111"}


def test_unusable_model_files_are_named(run, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(run["model_dir"], model)
    keras_file = model / "model.keras"
    data = keras_file.read_bytes()
    keras_file.write_bytes(data[: len(data) // 2])  # an interrupted copy
    argv = ["predict", "--model", model, "--quiet", run["good"][0], "--out"]
    rc, err = run_cli(argv + [tmp_path / "o1"])
    assert rc == cli.EXIT_USAGE
    assert f"{keras_file}: not a valid .keras file" in err and "not found" not in err.lower()
    keras_file.write_bytes(data)
    (model / "quality.json").write_text('{"threshold_mm3": 12,\n')
    rc, err = run_cli(argv + [tmp_path / "o2"])
    assert rc == cli.EXIT_USAGE and "Traceback" not in err
    assert f"locnet: error: {model / 'quality.json'}: not valid JSON" in err


def test_tensorflow_import_lines_obey_the_log_level(run, tmp_path):
    """TensorFlow 2.21 prints absl's preamble and an 'oneDNN custom operations' info line
    while imported, even with TF_CPP_MIN_LOG_LEVEL=3."""
    import locnet

    line = ("I0000 00:00:1796556817.425910    4691 port.cc:153] oneDNN custom operations are "
            "on.")
    assert locnet._shown(line, 0) and not locnet._shown(line, 1)
    assert not locnet._shown("WARNING: All log messages before absl::InitializeLog() is "
                             "called are written to STDERR", 3)
    assert locnet._shown("E0000 00:00:1.5  1 x.cc:1] bad", 2)
    assert not locnet._shown("E0000 00:00:1.5  1 x.cc:1] bad", 3)
    assert locnet._shown("Traceback (most recent call last):", 3)
    exe = Path(sys.executable).with_name("locnet")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "locnet.cli"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    res = subprocess.run(cmd + ["predict", "--model", str(run["model_dir"]), "--out",
                                str(tmp_path / "o"), "--passes", "2", "--no-overlay",
                                "--quiet", str(run["good"][0])],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert "absl" not in res.stderr and "oneDNN" not in res.stderr and "I0000" not in res.stderr
    assert "locnet: note:" in res.stderr  # locnet's own lines stay
