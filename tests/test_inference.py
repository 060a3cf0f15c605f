"""Tests of locnet.inference and locnet.quality: new scans give the study's predictions.

A tiny untrained ``multiscale_e2e_noise`` (32^3 grid, 4 levels) is saved with a
``metadata.json`` like the one ``locnet.train`` writes; the scans are fresh synthetic phantoms
(unseen indices, random storage orientations, 3-5 mm voxels).
"""

from __future__ import annotations

import json

import keras
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from locnet import geometry, inference, metrics, phantom, pyramid, quality, study_predict
from locnet.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

LANDMARKS = ["left_bifurcation", "right_bifurcation"]
GRID = {"finest_shape": 32, "finest_spacing_mm": 5.0, "levels": 4,
        "window_hu": [-200.0, 800.0], "background_hu": -1000.0}
PHANTOM = {"seed": 7, "fov_mm": [160.0, 160.0, 160.0], "spacing_inplane_mm": [3.0, 4.0],
           "spacing_slice_mm": [3.0, 5.0], "max_rotation_deg": 12.0}
SCAN_INDICES = (100, 101, 102)
PASSES = 6


def make_model_dir(root, method="multiscale_e2e_noise", method_cfg=None, grid=GRID,
                   intensity=None):
    """Build an untrained model and save it as ``locnet.train`` saves a trained one
    (``intensity``: the training cases' summary; ``None`` as in models trained before it)."""
    method_cfg = method_cfg or {"patch": 4, "noise_mm": 5.0, "unet": {"filters": [4, 8]}}
    keras.utils.set_random_seed(3)
    model = build_model(method, {**method_cfg, "landmarks": LANDMARKS},
                        {k: grid[k] for k in ("finest_shape", "finest_spacing_mm", "levels")})
    root.mkdir(parents=True, exist_ok=True)
    model.save(root / "model.keras")
    levels = list(range(grid["levels"]))
    meta = {"method": method, "method_cfg": method_cfg,
            "train_cfg": {"epochs": 0, "learning_rate": 0.0005, "batch_size": 1},
            "schedule": "linear", "phases": None, "grid": dict(grid), "landmarks": LANDMARKS,
            "levels": levels, "loss_weight_names": [f"level{l}" for l in levels], "seed": 3,
            "epochs": 0, "best_epoch": 0, "best_val_error_mm": float("nan"),
            "train_cases": [], "val_cases": [], "versions": {}}
    if intensity is not None:
        meta["intensity"] = intensity
    (root / "metadata.json").write_text(json.dumps(meta))
    return root


def write_scans(root, indices=SCAN_INDICES):
    """Phantom scans ``root/images/case_XXXX.nii.gz`` and their landmark table."""
    paths, rows = [], []
    for i in indices:
        paths.append(phantom.write_case(i, PHANTOM, root))
        for name, xyz in phantom.case_landmarks(i, PHANTOM).items():
            rows.append({"case_id": phantom.case_id(i), "landmark": name,
                         "x": xyz[0], "y": xyz[1], "z": xyz[2]})
    return paths, pd.DataFrame(rows)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    model_dir = make_model_dir(root / "model")
    scans, table = write_scans(root / "scans")
    return {"root": root, "model_dir": model_dir, "scans": scans, "table": table,
            "lm": inference.load_model_dir(model_dir)}


@pytest.mark.parametrize("estimator", ["exact", "window"])
def test_same_predictions_as_the_study(setup, tmp_path, estimator):
    lm, seed = setup["lm"], 17
    assert lm.noisy and lm.landmarks == LANDMARKS and lm.params == GRID
    # the study: pyramid on disk, then predict_cases
    dirs = []
    for path in setup["scans"]:
        case = inference.case_id_from_path(path)
        pyramid.build_pyramid(path, GRID, GRID["window_hu"], GRID["background_hu"],
                              tmp_path / case, case=case, threads=1)
        dirs.append(tmp_path / case)
    study = study_predict.predict_cases(lm.model, dirs, {}, setup["table"], LANDMARKS,
                                  passes=PASSES, seed=seed, progress=False, estimator=estimator)
    truth = {(r.case_id, r.landmark): np.array([r.x, r.y, r.z])
             for r in setup["table"].itertuples()}
    for path in setup["scans"]:
        res = inference.predict_scan(lm, path, passes=PASSES, seed=seed, threshold_mm3=None,
                                     estimator=estimator)
        for row in res.rows():
            s = study[(study.case_id == row["case_id"]) & (study.landmark == row["landmark"])]
            assert len(s) == 1
            s = s.iloc[0]
            ras = np.array([row["x_ras"], row["y_ras"], row["z_ras"]])
            np.testing.assert_allclose(ras, [s.x, s.y, s.z], atol=1e-4)
            np.testing.assert_allclose([row["sd_x"], row["sd_y"], row["sd_z"]],
                                       [s.sd_x, s.sd_y, s.sd_z], atol=1e-4)
            assert row["conf_volume_mm3"] == pytest.approx(s.conf_volume_mm3, rel=1e-4)
            err = np.linalg.norm(ras - truth[(row["case_id"], row["landmark"])])
            assert err == pytest.approx(s.error_mm, abs=1e-4)
            assert row["quality"] == ""


def test_coordinates_lps_and_voxels(setup):
    lm = setup["lm"]
    for path in setup["scans"]:
        res = inference.predict_scan(lm, path, passes=3, seed=0)
        img = nib.load(str(path))
        np.testing.assert_allclose(res.world_lps[:, :2], -res.world[:, :2])
        np.testing.assert_allclose(res.world_lps[:, 2], res.world[:, 2])
        back = geometry.voxel_to_world(img.affine, res.voxel)
        np.testing.assert_allclose(back, res.world, atol=1e-6)
        assert np.all(geometry.inside_scan(img.affine, img.shape, res.world))
        assert res.level0.shape == (32, 32, 32) and 0.9 < res.coverage <= 1.0


def test_predict_arrays_equals_case_prediction(setup, tmp_path):
    lm, path = setup["lm"], setup["scans"][0]
    pyramid.build_pyramid(path, GRID, GRID["window_hu"], GRID["background_hu"], tmp_path / "c")
    img = nib.load(str(path))
    inputs, _, _ = inference.preprocess(np.asanyarray(img.dataobj), img.affine, lm.params,
                                        lm.levels)
    a = inference.predict_arrays(lm.model, inputs, passes=4, seed=5)
    b = study_predict.case_prediction(lm.model, tmp_path / "c", passes=4, seed=5)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_estimator_follows_the_quality_file(setup, tmp_path):
    # inference computes its passes the way the quality threshold was chosen (quality.json)
    lm, path = setup["lm"], setup["scans"][0]
    assert lm.quality is None and lm.estimator == "exact"
    model_dir = make_model_dir(tmp_path / "model")
    (model_dir / "quality.json").write_text(json.dumps({"threshold_mm3": 50.0,
                                                        "estimator": "window"}))
    windowed = inference.load_model_dir(model_dir)
    assert windowed.estimator == "window" and windowed.threshold_mm3 == 50.0
    default = inference.predict_scan(windowed, path, passes=4, seed=2)
    window = inference.predict_scan(lm, path, passes=4, seed=2, estimator="window")
    exact = inference.predict_scan(lm, path, passes=4, seed=2)
    np.testing.assert_allclose(default.sd, window.sd, atol=1e-6)
    assert np.abs(window.sd - exact.sd).max() > 1e-3
    # an estimator the code does not know is refused when the folder is loaded, naming the file
    (model_dir / "quality.json").write_text(json.dumps({"threshold_mm3": 50.0,
                                                        "estimator": "fast"}))
    with pytest.raises(inference.ModelDirError, match=r"quality\.json: unknown estimator 'fast'"):
        inference.load_model_dir(model_dir)


def test_metadata_without_preprocessing_is_refused(setup, tmp_path):
    d = make_model_dir(tmp_path / "old", grid=GRID)
    meta = json.loads((d / "metadata.json").read_text())
    del meta["grid"]["window_hu"]
    (d / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(inference.ModelDirError, match="window_hu"):
        inference.load_model_dir(d)
    meta["grid"]["window_hu"] = [-200.0, 800.0]
    meta["grid"]["finest_spacing_mm"] = 2.5  # another grid than the model's
    (d / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(inference.ModelDirError, match="finest_spacing_mm"):
        inference.load_model_dir(d)


def test_far_outside_the_field_of_view(setup, write_nifti):
    thin = write_nifti(np.zeros((40, 40, 2), np.int16), np.diag([4.0, 4.0, 4.0, 1.0]),
                       "thin.nii.gz")
    with pytest.raises(inference.ScanError, match="outside the trained field of view"):
        inference.predict_scan(setup["lm"], thin, passes=2)


# --------------------------------------------------------------------------- quality

def _val_table(volumes, errors, subset="val"):
    return pd.DataFrame({"subset": subset, "conf_volume_mm3": volumes, "error_mm": errors})


def test_choose_threshold():
    df = _val_table([10, 20, 30, 40, 50, 60], [1, 2, 9, 3, 4, 20])
    # fractions within 5 mm among the n smallest: 1, 1, 2/3, 3/4, 4/5, 4/6
    r = quality.choose_threshold(df, target_error_mm=5.0, target_fraction=0.75)
    assert r["threshold_mm3"] == 50 and r["n_accepted"] == 5
    assert r["fraction_within_target"] == pytest.approx(0.8)
    r = quality.choose_threshold(df, target_error_mm=5.0, target_fraction=0.9)
    assert r["threshold_mm3"] == 20 and r["accepted_fraction"] == pytest.approx(2 / 6)
    # test rows are ignored; nothing meets the target -> 0 (everything 'review')
    both = pd.concat([df, _val_table([1.0], [0.1], subset="test")])
    assert quality.choose_threshold(both, 5.0, 0.9)["threshold_mm3"] == 20
    assert quality.choose_threshold(_val_table([5, 6], [9, 9]), 5.0, 0.9)["threshold_mm3"] == 0
    assert quality.flag(20.0, 20.0) == "ok" and quality.flag(20.5, 20.0) == "review"
    assert quality.flag(20.0, None) == ""
    with pytest.raises(ValueError, match="conf_volume_mm3"):
        quality.choose_threshold(df.drop(columns="conf_volume_mm3"))


def test_confidence_volume_matches_metrics(setup):
    res = inference.predict_scan(setup["lm"], setup["scans"][1], passes=5, seed=2,
                                 threshold_mm3=1e12)
    np.testing.assert_allclose(res.conf_volume_mm3, metrics.confidence_volume(res.sd))
    assert res.flags == ["ok", "ok"]


# --------------------------------------------------------------------------- unlike training

def test_scans_without_content_are_refused(setup, write_nifti):
    # an all-air scan once got two landmarks 2.8 mm apart and exit status 0
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    air = write_nifti(np.full((40, 40, 40), -1000, np.int16), affine, "air.nii.gz")
    with pytest.raises(inference.ScanError,
                       match=r"no content: every voxel of air\.nii\.gz has the value -1000"):
        inference.predict_scan(setup["lm"], air, passes=2)
    # noise around air: not constant, but nothing inside the model's window [-200, 800] HU
    noise = np.random.default_rng(0).normal(-1000, 20, (40, 40, 40)).astype(np.int16)
    hiss = write_nifti(noise, affine, "hiss.nii.gz")
    with pytest.raises(inference.ScanError, match=r"no content: no voxel of hiss\.nii\.gz "
                       r"\(values -1\d\d\d to -9\d\d\) reaches 5% of the model's intensity window"):
        inference.predict_scan(setup["lm"], hiss, passes=2)


def test_intensity_outliers_rule():
    cases = [{"mean": m, "sd": 0.2, "foreground_fraction": 0.5} for m in (0.20, 0.22, 0.24)]
    summary = quality.summarise_intensities(cases, level=3)
    st = summary["statistics"]["mean"]
    assert st["median"] == pytest.approx(0.22) and st["min"] == 0.20 and st["max"] == 0.24
    assert st["robust_sd"] == pytest.approx(1.4826 * 0.02)
    ok = {"mean": 0.23, "sd": 0.2, "foreground_fraction": 0.5}
    assert quality.intensity_outliers(ok, summary) == []
    # outside [min, max] but within 5 robust sds (5 x 0.0297 = 0.148) of the median: not flagged
    assert quality.intensity_outliers({**ok, "mean": 0.30}, summary) == []
    (why,) = quality.intensity_outliers({**ok, "mean": 0.40}, summary)
    assert why.startswith("mean 0.400 (training 0.200-0.240")
    # a spread of 0 (identical cases) is floored at MIN_SPREAD, never a division by zero
    assert quality.intensity_outliers({**ok, "sd": 0.2 + 4 * quality.MIN_SPREAD}, summary) == []
    assert len(quality.intensity_outliers({**ok, "sd": 0.2 + 6 * quality.MIN_SPREAD},
                                          summary)) == 1


def test_scans_far_from_the_training_intensities_are_flagged(setup, tmp_path, write_nifti):
    # the training summary from the stored pyramids of unseen phantom cases, as train writes it
    dirs = []
    train_scans, _ = write_scans(tmp_path / "train", indices=(200, 201, 202, 203))
    for path in train_scans:
        case = inference.case_id_from_path(path)
        pyramid.build_pyramid(path, GRID, GRID["window_hu"], GRID["background_hu"],
                              tmp_path / "pyr" / case, case=case, threads=1)
        dirs.append(tmp_path / "pyr" / case)
    summary = quality.intensity_summary(dirs, level=GRID["levels"] - 1)
    assert summary["n_cases"] == 4 and summary["level"] == 3
    lm = inference.load_model_dir(make_model_dir(tmp_path / "model", intensity=summary))
    assert lm.intensity == summary
    res = inference.predict_scan(lm, setup["scans"][0], passes=2, seed=0)
    assert res.intensity_outliers == [] and res.intensity_flag == "ok"
    assert {r["intensity"] for r in res.rows()} == {"ok"}
    # the same scan 700 HU brighter (a scan of another kind): answered, but flagged
    img = nib.load(str(setup["scans"][0]))
    bright = write_nifti(np.asarray(img.dataobj, np.float32) + 700.0, img.affine, "bright.nii.gz")
    res = inference.predict_scan(lm, bright, passes=2, seed=0)
    assert res.intensity_flag == inference.ATYPICAL
    assert any(o.startswith("mean ") for o in res.intensity_outliers)
    # a model without the summary (trained before it existed) works, without a flag
    old = inference.predict_scan(setup["lm"], bright, passes=2, seed=0)
    assert setup["lm"].intensity is None and old.intensity_outliers is None
    assert {r["intensity"] for r in old.rows()} == {""}
    np.testing.assert_allclose(old.world, res.world)


def test_confidence_level_follows_the_quality_file(setup, tmp_path):
    # the confidence volume is computed at the level the threshold was chosen at
    model_dir = make_model_dir(tmp_path / "model")
    (model_dir / "quality.json").write_text(json.dumps({"threshold_mm3": 50.0,
                                                        "confidence": 0.5}))
    lm = inference.load_model_dir(model_dir)
    assert lm.confidence == 0.5 and setup["lm"].confidence == inference.CONFIDENCE == 0.90
    res = inference.predict_scan(lm, setup["scans"][1], passes=5, seed=2)
    ref = inference.predict_scan(setup["lm"], setup["scans"][1], passes=5, seed=2)
    np.testing.assert_allclose(res.sd, ref.sd)
    np.testing.assert_allclose(res.conf_volume_mm3, metrics.confidence_volume(res.sd, level=0.5))
    assert np.all(res.conf_volume_mm3 < ref.conf_volume_mm3) and res.confidence == 0.5
    (model_dir / "quality.json").write_text(json.dumps({"threshold_mm3": 50.0,
                                                        "confidence": 90}))
    with pytest.raises(inference.ModelDirError, match=r"quality\.json: invalid confidence 90"):
        inference.load_model_dir(model_dir)


def test_calibrated_volume_and_flag_follow_the_conformal_scale(setup, tmp_path):
    """quality.json's sd_scale (split conformal on the validation set) gives each landmark a
    calibrated volume = raw * scale^3; the flag compares it with the calibrated threshold."""
    rng = np.random.default_rng(0)
    n = 200
    sd = rng.uniform(0.5, 2.0, (n, 3))
    err = rng.normal(size=(n, 3)) * sd * 2.0  # sds reported at half their size
    val = pd.DataFrame({"case_id": [f"c{i}" for i in range(n)], "subset": "val",
                        "landmark": "a", "x": err[:, 0], "y": err[:, 1], "z": err[:, 2],
                        "true_x": 0.0, "true_y": 0.0, "true_z": 0.0,
                        "sd_x": sd[:, 0], "sd_y": sd[:, 1], "sd_z": sd[:, 2]})
    val["error_mm"] = np.linalg.norm(err, axis=1)
    val["conf_volume_mm3"] = metrics.confidence_volume(sd)
    result = quality.add_calibration(quality.choose_threshold(val, 5.0, 0.5), val, 0.9)
    assert result["sd_scale"] == pytest.approx(2.0, rel=0.15) and result["sd_scale_n"] == n
    assert result["threshold_calibrated_mm3"] == pytest.approx(
        result["threshold_mm3"] * result["sd_scale"] ** 3)
    assert result["calibrated"] and result["calibration_reason"] == ""
    assert 0.8 < result["calibration_coverage"]["low"] < 0.9 < result["calibration_coverage"]["high"]
    assert quality.add_calibration({"threshold_mm3": 1.0}, val.head(3), 0.9)["sd_scale"] is None
    # issue 24: 20 landmarks of one validation case once gave a scale of 0.70 that shrank the
    # ellipsoids; one case must not calibrate, and quality.json says why
    one = val.head(20).assign(case_id="only_case", landmark=[f"l{j}" for j in range(20)])
    res1 = quality.add_calibration({"threshold_mm3": 1.0}, one, 0.9)
    assert res1["sd_scale"] is None and res1["threshold_calibrated_mm3"] is None
    assert res1["calibrated"] is False and res1["sd_scale_n"] == 1
    assert res1["sd_scale_n_landmarks"] == 20 and res1["calibration_min_cases"] == 10
    assert "1 validation case(s) (20 landmarks)" in res1["calibration_reason"]
    assert res1["calibration_coverage"]["low"] is None

    model_dir = make_model_dir(tmp_path / "model")
    raw = inference.predict_scan(setup["lm"], setup["scans"][1], passes=5, seed=2)
    cut = float(np.sort(raw.conf_volume_mm3)[0])  # between the two landmarks' raw volumes
    (model_dir / "quality.json").write_text(json.dumps({"threshold_mm3": cut, "sd_scale": 1.7}))
    lm = inference.load_model_dir(model_dir)
    assert lm.sd_scale == 1.7
    res = inference.predict_scan(lm, setup["scans"][1], passes=5, seed=2,
                                 threshold_mm3=lm.threshold_mm3)
    rows = res.rows()
    for k, r in enumerate(rows):
        assert r["conf_volume_calibrated_mm3"] == pytest.approx(
            res.conf_volume_mm3[k] * 1.7**3)
    # same decision as raw volume against raw threshold
    assert res.flags == [quality.flag(v, cut) for v in raw.conf_volume_mm3]
    assert np.isnan(inference.predict_scan(setup["lm"], setup["scans"][1], passes=5,
                                           seed=2).rows()[0]["conf_volume_calibrated_mm3"])


def test_the_intensity_window_warning_names_the_case(setup, tmp_path, caplog):
    """A scan that is not a CT in Hounsfield units (no air, its tissue above the window) gets
    a warning; in a batch of scans it must say which one."""
    import logging

    import nibabel as nib

    img = nib.load(str(setup["scans"][0]))
    shifted = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32) + 3000.0, img.affine),
             str(shifted))
    with caplog.at_level(logging.WARNING):
        inference.predict_scan(setup["lm"], shifted, "patient_7", passes=0)
    (msg,) = [r.getMessage() for r in caplog.records if "CT window" in r.getMessage()]
    assert msg.startswith(f"case 'patient_7' (file {shifted}): the CT window")


def test_scan_manifests_are_checked_whole(tmp_path):
    """The check rule infer and locnet predict share: every problem of a manifest at once."""
    man = tmp_path / "m.csv"
    man.write_text("case_id,image\na1,x.nii.gz\n../up,y.nii.gz\n,z.nii.gz\na1,w.nii.gz\n"
                   "/abs/id,v.nii.gz\n")
    items, problems = inference.read_scan_manifest(man)
    assert [c for c, _, _ in items] == ["a1", "../up", "a1", "/abs/id"]
    assert items[0][1] == tmp_path / "x.nii.gz"
    assert len(problems) == 4
    assert problems[0] == f"manifest file {man}, line 4: empty case_id or image"
    assert problems[1].startswith(f"manifest {man}, line 3: case id '../up' is not allowed")
    assert problems[2].startswith(f"manifest {man}, line 5: duplicate case id 'a1'")
    assert problems[3].startswith(f"manifest {man}, line 6: case id '/abs/id' is not allowed")
