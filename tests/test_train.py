"""Tests of locnet.train (and its resume state, locnet.checkpoint): learning, best-model
keeping, save/load, exact resume, multi-step.

All tests train the real models of ``locnet.models`` at toy size (a 2-level 16^3 pyramid of
10 cases with a bright blob per landmark, U-Nets of a few filters), so each run takes seconds.
"""

from __future__ import annotations

import json
import logging

import keras
import numpy as np
import pandas as pd
import pytest

from locnet import checkpoint
from locnet import train as T
from locnet.data import LandmarkDataset, load_case_inputs
from locnet.models import predict_position
from test_data import LANDMARKS, write_tiny_cohort

# Keras's TensorFlow backend converts variables with np.array(x) (NumPy 2 deprecation notice)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TINY_UNET = {"filters": [2, 4]}
E2E_NOISE = {"patch": 4, "noise_mm": 8.0, "unet": TINY_UNET}


# --------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    # one missing landmark in the training set, one in the validation set
    dirs, table = write_tiny_cohort(root, n_cases=10, n0=16, s0=8.0, levels=2, seed=3,
                                    missing=("case_001", "case_009"))
    return {"train": dirs[:8], "val": dirs[8:], "table": table,
            "grid": {"finest_shape": 16, "finest_spacing_mm": 8.0, "levels": 2}}


def run(cohort, tmp_path, method="multiscale_e2e_noise", method_cfg=E2E_NOISE, epochs=4,
        lr=0.01, seed=1, name="run", window=5, **kwargs):
    # a 5-epoch window (not the default 1) so that the window's scoring, snapshots and resume
    # are what these tests exercise
    return T.train(
        method, method_cfg, {"epochs": epochs, "learning_rate": lr, "selection_window": window},
        cohort["grid"], LANDMARKS,
        cohort["train"], cohort["val"], cohort["table"], tmp_path / name / "out",
        tmp_path / name / "state", seed, **kwargs)


def history_without_time(path):
    return pd.read_csv(path).drop(columns=["time"])


def load_kept(out_dir):
    """The kept model of ``out_dir`` and its metadata (as inference reads them)."""
    model = keras.models.load_model(out_dir / "model.keras", compile=False)
    return model, json.loads((out_dir / "metadata.json").read_text())


def saved_weights(out_dir):
    model = keras.models.load_model(out_dir / "model.keras", compile=False)
    return [v.numpy() for v in model.weights]


class Interrupt(keras.callbacks.Callback):
    """Raises at the end of epoch index ``at`` (before that epoch is checkpointed)."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at:
            raise KeyboardInterrupt("simulated kill")


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
def test_learns_keeps_best_and_round_trips(cohort, tmp_path):
    res = run(cohort, tmp_path, method="locnet_single",
              method_cfg={"level": 0, "unet": {"filters": [4, 8]}}, epochs=5)
    out = tmp_path / "run" / "out"
    hist = pd.read_csv(out / "history.csv")
    assert list(hist.epoch) == [0, 1, 2, 3, 4, 5]
    for col in ("loss", "loss_level0", "weight_level0", "val_error_mm", "time"):
        assert col in hist.columns
    assert np.isnan(hist.loss[0]) and np.all(np.isfinite(hist.loss[1:]))
    assert np.all(hist.weight_level0[1:] == 1.0)
    # learning: the validation error falls below its value at initialisation
    assert hist.val_error_mm[1:].min() < hist.val_error_mm[0]
    meta = json.loads((out / "metadata.json").read_text())
    # the kept epoch minimises the validation error smoothed over a centred 5-epoch window
    # (clipped at the ends), and the history records that score for every epoch
    assert meta["selection_window"] == 5
    val = hist.val_error_mm.to_numpy()
    scores = [val[max(1, e - 2):min(5, e + 2) + 1].mean() for e in range(1, 6)]
    np.testing.assert_allclose(hist.val_score_mm[1:], scores, rtol=1e-12)
    expected = 1 + int(np.argmin(scores)) if min(scores) < val[0] else 0
    assert meta["best_epoch"] == expected == T.select_epoch(val, 5)[0]
    assert meta["best_val_error_mm"] == pytest.approx(val[expected], rel=1e-12)
    assert meta["method"] == "locnet_single" and meta["landmarks"] == LANDMARKS
    assert meta["levels"] == [0] and "keras" in meta["versions"]
    # when and on how many threads the job ran (the results page adds up the wall time)
    job = meta["job"]
    assert job["started_utc"] <= job["finished_utc"] and isinstance(job["threads"], int)
    assert job["threads"] >= 1
    assert res["completed"] and res["best_epoch"] == meta["best_epoch"]
    # the saved model is the best epoch: its validation error is the recorded best
    model, meta2 = load_kept(out)
    assert meta2 == meta
    val = LandmarkDataset(cohort["val"], [0], cohort["table"], LANDMARKS, shuffle=False)
    T.reseed(model, 0, 0, "val")
    assert T.validation_error(model, val) == pytest.approx(meta["best_val_error_mm"], rel=1e-5)
    # save -> load -> predict is identical
    inputs = load_case_inputs(cohort["val"][0], [0])
    p1 = predict_position(model, inputs)
    model.save(tmp_path / "again.keras")
    again = keras.models.load_model(tmp_path / "again.keras", compile=False)
    np.testing.assert_array_equal(predict_position(again, inputs), p1)
    assert p1.shape == (1, 2, 3)
    # a temporary file of a killed run is removed by the next run; none is left behind
    (out / ".tmp-0123456789ab-history.csv").write_text("partial")  # as fileio.atomic_write names it
    res = run(cohort, tmp_path, method="locnet_single",
              method_cfg={"level": 0, "unet": {"filters": [4, 8]}}, epochs=5)
    assert res["epochs_done"] == 5
    assert sorted(p.name for p in out.iterdir()) == ["history.csv", "metadata.json",
                                                     "model.keras"]


def test_resume_equals_uninterrupted(cohort, tmp_path, caplog):
    full = run(cohort, tmp_path, epochs=4, name="full")
    with pytest.raises(KeyboardInterrupt):
        run(cohort, tmp_path, epochs=4, name="cut", callbacks=[Interrupt(at=2)])
    cut = tmp_path / "cut"
    assert not (cut / "out" / "model.keras").exists()
    state = json.loads((cut / "state" / "state.json").read_text())
    assert state["epoch"] == 2
    assert len(pd.read_csv(cut / "state" / "history.csv")) == 3  # epochs 0, 1, 2
    with caplog.at_level(logging.INFO, logger="locnet.train"):
        resumed = run(cohort, tmp_path, epochs=4, name="cut")
    assert "resuming from epoch 2" in caplog.text
    assert resumed["completed"] and resumed["best_epoch"] == full["best_epoch"]
    pd.testing.assert_frame_equal(history_without_time(cut / "out" / "history.csv"),
                                  history_without_time(tmp_path / "full/out/history.csv"),
                                  rtol=1e-6)
    for a, b in zip(saved_weights(cut / "out"), saved_weights(tmp_path / "full" / "out")):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # a finished run re-run does no more training and rewrites the same outputs
    again = run(cohort, tmp_path, epochs=4, name="cut")
    assert again["epochs_done"] == 4
    # another configuration does not resume from this state
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="locnet.train"):
        run(cohort, tmp_path, epochs=1, name="cut")
    assert "another configuration" in caplog.text and "resuming" not in caplog.text


class LearningRates(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rates = []

    def on_epoch_end(self, epoch, logs=None):
        self.rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


def test_cosine_decay_falls_to_zero_and_resumes_on_its_curve(cohort, tmp_path):
    """lr_decay cosine: the rate falls from learning_rate to 0 over the run's steps, and a run
    cut after epoch 2 resumes on the same curve (the same history and weights)."""
    cfg, _, lr = TOY_METHODS["locnet_single"]

    def go(name, callbacks):
        return T.train("locnet_single", cfg, {"epochs": 4, "learning_rate": lr,
                                              "lr_decay": "cosine"},
                       cohort["grid"], LANDMARKS, cohort["train"], cohort["val"],
                       cohort["table"], tmp_path / name / "out", tmp_path / name / "state", 1,
                       callbacks=callbacks)

    rates = LearningRates()
    go("full", [rates])
    # 8 cases a epoch: after epoch e (1-based) the rate is lr * (1 + cos(pi * e / 4)) / 2
    expected = [lr * (1 + np.cos(np.pi * e / 4)) / 2 for e in range(1, 5)]
    np.testing.assert_allclose(rates.rates, expected, rtol=1e-4, atol=1e-7)
    with pytest.raises(KeyboardInterrupt):
        go("cut", [Interrupt(at=2)])
    resumed_rates = LearningRates()
    go("cut", [resumed_rates])
    np.testing.assert_allclose(resumed_rates.rates, expected[2:], rtol=1e-4, atol=1e-7)
    pd.testing.assert_frame_equal(history_without_time(tmp_path / "cut/out/history.csv"),
                                  history_without_time(tmp_path / "full/out/history.csv"),
                                  rtol=1e-6)
    for a, b in zip(saved_weights(tmp_path / "cut" / "out"), saved_weights(tmp_path / "full" / "out")):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


class Targets(keras.callbacks.Callback):
    """The training set's targets of every batch, as the model is given them."""

    def __init__(self, dataset_of):
        super().__init__()
        self.dataset_of, self.seen = dataset_of, []

    def on_train_batch_begin(self, batch, logs=None):
        ds = self.dataset_of()
        i = int(ds._order[batch])
        self.seen.append(ds.batch([i])[1]["position"][0] - ds.targets(i)[0])


def test_shift_augmentation_reaches_training_and_resumes_alike(cohort, tmp_path, monkeypatch):
    """augment_shift_mm: the training batches are shifted by whole level-0 voxels (8 mm here)
    within the limit, the run differs from an unshifted one, and a run cut after epoch 2
    resumes to the same history and weights (the shifts depend on seed, epoch and case only)."""
    cfg, _, lr = TOY_METHODS["patch_baseline"]
    made = []
    real = T.LandmarkDataset

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(T, "LandmarkDataset", spy)

    def go(name, shift, callbacks=()):
        return T.train("patch_baseline", cfg, {"epochs": 4, "learning_rate": lr,
                                               "augment_shift_mm": shift},
                       cohort["grid"], LANDMARKS, cohort["train"], cohort["val"],
                       cohort["table"], tmp_path / name / "out", tmp_path / name / "state", 1,
                       callbacks=list(callbacks))

    seen = Targets(lambda: next(d for d in made if d.shuffle))
    go("full", 16.0, [seen])
    moves = np.concatenate(seen.seen)  # targets moved, masked ones included (0 + 0)
    assert np.all(np.abs(moves) <= 16.0 + 1e-4) and np.any(np.abs(moves) > 1.0)
    np.testing.assert_allclose(moves / 8.0, np.round(moves / 8.0), atol=1e-4)
    made.clear()
    go("plain", 0.0)
    assert not np.allclose(history_without_time(tmp_path / "plain/out/history.csv")["loss"][1:],
                           history_without_time(tmp_path / "full/out/history.csv")["loss"][1:])
    made.clear()
    with pytest.raises(KeyboardInterrupt):
        go("cut", 16.0, [Interrupt(at=2)])
    go("cut", 16.0)
    pd.testing.assert_frame_equal(history_without_time(tmp_path / "cut/out/history.csv"),
                                  history_without_time(tmp_path / "full/out/history.csv"),
                                  rtol=1e-6)
    for a, b in zip(saved_weights(tmp_path / "cut" / "out"), saved_weights(tmp_path / "full" / "out")):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


class LevelNetSnapshots(keras.callbacks.Callback):
    """The weights of every level net at the end of every epoch."""

    def __init__(self):
        super().__init__()
        self.weights = {}

    def on_epoch_end(self, epoch, logs=None):
        self.weights[epoch] = [[v.numpy() for v in net.weights]
                               for net in self.model.level_nets]


def test_multistep_phases_freeze_and_resume_mid_phase(cohort, tmp_path):
    snap = LevelNetSnapshots()
    cfg = {"patch": 4, "unet": TINY_UNET}
    full = run(cohort, tmp_path, method="multiscale_multistep", method_cfg=cfg, epochs=4,
               name="full", callbacks=[snap])
    hist = full["history"]
    # 2 levels, 4 epochs: phase 0 (level 1, coarse) = epochs 1-2, phase 1 (level 0) = 3-4
    assert list(hist.phase[1:]) == [0, 0, 1, 1]
    np.testing.assert_array_equal(hist.weight_level1[1:], [1, 1, 0, 0])
    np.testing.assert_array_equal(hist.weight_level0[1:], [0, 0, 1, 1])
    # phase 0 trains level_nets[1] only; phase 1 level_nets[0] only
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(a, b))  # noqa: E731
    assert same(snap.weights[0][0], snap.weights[1][0])
    assert not same(snap.weights[0][1], snap.weights[1][1])
    assert same(snap.weights[1][1], snap.weights[3][1])
    assert not same(snap.weights[2][0], snap.weights[3][0])
    meta = json.loads((tmp_path / "full" / "out" / "metadata.json").read_text())
    assert meta["phases"] == [[0, 2], [2, 4]]
    # stop at the phase boundary (after epoch 2), then mid-phase 1 (after epoch 3), then finish
    r = run(cohort, tmp_path, method="multiscale_multistep", method_cfg=cfg, epochs=4,
            name="cut", max_epochs_this_run=2)
    assert not r["completed"] and r["epochs_done"] == 2
    assert not (tmp_path / "cut" / "out" / "model.keras").exists()
    r = run(cohort, tmp_path, method="multiscale_multistep", method_cfg=cfg, epochs=4,
            name="cut", max_epochs_this_run=1)
    assert r["epochs_done"] == 3
    r = run(cohort, tmp_path, method="multiscale_multistep", method_cfg=cfg, epochs=4,
            name="cut")
    assert r["completed"]
    pd.testing.assert_frame_equal(history_without_time(tmp_path / "cut/out/history.csv"),
                                  history_without_time(tmp_path / "full/out/history.csv"),
                                  rtol=1e-6)
    for a, b in zip(saved_weights(tmp_path / "cut/out"), saved_weights(tmp_path / "full/out")):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_multistep_with_map_prior_trains_finer_nets_on_the_prior_early(cohort, tmp_path):
    """With the map prior, phase 0 (the coarse level's position error) also moves the finer
    net (its prior alone: its position error weighs 0); phase 1 leaves the coarse net frozen."""
    snap = LevelNetSnapshots()
    cfg = {"patch": 4, "unet": TINY_UNET, "map_supervision": {"weight": 1.0}}
    r = run(cohort, tmp_path, method="multiscale_multistep", method_cfg=cfg, epochs=4,
            callbacks=[snap])
    np.testing.assert_array_equal(r["history"].weight_level0[1:], [0, 0, 1, 1])
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(a, b))  # noqa: E731
    assert not same(snap.weights[0][0], snap.weights[1][0])  # finer net: prior in phase 0
    assert not same(snap.weights[0][1], snap.weights[1][1])  # coarse net: its own phase
    assert same(snap.weights[1][1], snap.weights[3][1])  # coarse net frozen in phase 1
    assert not same(snap.weights[2][0], snap.weights[3][0])


def test_mean_error_masks_missing_landmarks():
    pred = np.array([[[0, 0, 0], [9, 9, 9]]], float)
    true = np.array([[[3, 4, 0], [0, 0, 0]]], float)
    assert T.mean_error_mm(pred, true, np.array([[1, 0]])) == pytest.approx(5.0)
    assert np.isnan(T.mean_error_mm(pred, true, np.array([[0, 0]])))
    assert not T._is_better(float("nan"), 3.0) and T._is_better(2.0, float("nan"))


# every method of Table 1, at toy size: (config block, epochs, learning rate). The heatmap
# U-Net uses the paper's 5e-4: at 0.01 its map collapses to a constant after one epoch.
TOY_METHODS = {
    "heatmap_unet": ({"level": 0, "heatmap_sigma_mm": 12.0, "unet": {"filters": [4, 8]}}, 8, 5e-4),
    "locnet_single": ({"level": 0, "unet": {"filters": [4, 8]}}, 5, 0.01),
    "patch_baseline": ({"level": 0, "regress_radius_mm": 24.0, "unet": {"filters": [4, 8]}}, 8, 0.01),
    "multiscale_multistep": ({"patch": 4, "unet": TINY_UNET}, 6, 0.01),
    "multiscale_e2e": ({"patch": 4, "unet": TINY_UNET}, 5, 0.01),
    "multiscale_e2e_noise": (E2E_NOISE, 5, 0.01),
}


@pytest.mark.parametrize("method", list(TOY_METHODS))
def test_every_method_learns(cohort, tmp_path, method):
    """A few epochs lower each method's validation error below its value at initialisation."""
    cfg, epochs, lr = TOY_METHODS[method]
    run(cohort, tmp_path, method=method, method_cfg=cfg, epochs=epochs, lr=lr)
    hist = pd.read_csv(tmp_path / "run" / "out" / "history.csv")
    start, best = hist.val_error_mm[0], hist.val_error_mm[1:].min()
    assert best < 0.9 * start, (method, list(hist.val_error_mm))


def test_run_epoch_equals_fit_and_calls_the_callbacks(cohort):
    """An epoch of T.run_epoch (train_on_batch, batch by batch) gives fit's weights and epoch
    logs, and calls the callbacks' epoch and batch hooks in fit's order."""
    from locnet.models import build_model

    cfg = {**TOY_METHODS["locnet_single"][0], "landmarks": LANDMARKS}
    results = []
    for how in ("fit", "loop"):
        keras.utils.set_random_seed(5)
        model = build_model("locnet_single", cfg, cohort["grid"])
        T._compile(model, 0.01)
        ds = LandmarkDataset(cohort["train"], [0], cohort["table"], LANDMARKS, shuffle=False)
        seen = []

        class Hooks(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                seen.append(("begin", epoch))

            def on_train_batch_end(self, batch, logs=None):
                seen.append(("batch", batch))

            def on_epoch_end(self, epoch, logs=None):
                seen.append(("end", epoch, dict(logs)))

        if how == "fit":
            model.fit(ds, initial_epoch=2, epochs=3, shuffle=False, verbose=0, callbacks=[Hooks()])
        else:
            T.run_epoch(model, ds, 2, [Hooks()])
        results.append(([np.asarray(w) for w in model.get_weights()], seen))
    (w_fit, seen_fit), (w_loop, seen_loop) = results
    assert [e[:2] for e in seen_loop] == [e[:2] for e in seen_fit]
    assert seen_loop[0] == ("begin", 2) and len(seen_loop) == len(cohort["train"]) + 2
    logs_fit, logs_loop = seen_fit[-1][2], seen_loop[-1][2]
    assert set(logs_loop) == set(logs_fit) and "loss" in logs_loop
    for k in logs_fit:
        assert logs_loop[k] == pytest.approx(logs_fit[k], rel=1e-5), k
    for a, b in zip(w_fit, w_loop):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# model selection
# --------------------------------------------------------------------------------------------
def test_selection_rule_smooths_and_clips():
    # a lucky dip at epoch 3 inside a bad stretch loses to a stable good stretch at 6-8
    val = [30.0, 12.0, 11.0, 5.0, 11.0, 12.0, 7.0, 7.0, 7.0, 7.5]
    assert T.select_epoch(val, 1) == (3, 5.0)  # best single epoch
    epoch, score = T.select_epoch(val, 5)
    assert epoch == 8 and score == pytest.approx(np.mean(val[6:10]))  # clipped at the end
    assert T.select_epoch(val, 3)[0] == 7
    # windows are clipped at the ends of training and at phase boundaries
    assert T.selection_range(1, 5, (1, 9)) == (1, 3)
    assert T.selection_range(9, 5, (1, 9)) == (7, 9)
    assert T.selection_range(5, 5, (4, 6)) == (4, 6)
    # a window holding a non-finite error never wins; the untrained model is the fallback
    assert T.select_epoch([20.0, np.nan, 1.0, 1.0], 3) == (3, 1.0)
    assert T.select_epoch([20.0, np.nan, np.nan], 3) == (0, 20.0)
    assert np.isnan(T.selection_score({1: 1.0}, 2, 3, (1, 3)))  # epoch 3 not known yet
    # ties go to the earliest epoch
    assert T.select_epoch([9.0, 4.0, 4.0, 4.0], 1)[0] == 1


def test_smoothed_selection_keeps_the_weights_of_its_epoch(cohort, tmp_path):
    """The kept model is the selected epoch's (not the last, not the best single one), also
    when the run is resumed while that epoch's window is still open."""
    cfg = {"epochs": 6, "learning_rate": 0.01, "selection_window": 3}
    args = ("locnet_single", {"level": 0, "unet": {"filters": [4, 8]}}, cfg, cohort["grid"],
            LANDMARKS, cohort["train"], cohort["val"], cohort["table"])
    res = T.train(*args, tmp_path / "a" / "out", tmp_path / "a" / "state", 2)
    hist = res["history"]
    assert res["best_epoch"] == T.select_epoch(hist.val_error_mm.to_numpy(), 3)[0]
    model, meta = load_kept(tmp_path / "a" / "out")
    val = LandmarkDataset(cohort["val"], [0], cohort["table"], LANDMARKS, shuffle=False)
    T.reseed(model, 0, 0, "val")
    assert T.validation_error(model, val) == pytest.approx(meta["best_val_error_mm"], rel=1e-5)
    # interrupted after epoch 3 (epoch 3's window is open: its snapshot waits), then resumed
    with pytest.raises(KeyboardInterrupt):
        T.train(*args, tmp_path / "b" / "out", tmp_path / "b" / "state", 2,
                callbacks=[Interrupt(at=3)])
    state = json.loads((tmp_path / "b" / "state" / "state.json").read_text())
    assert state["pending"] == [3]
    assert (tmp_path / "b" / "state" / "snap-000003.npz").exists()
    resumed = T.train(*args, tmp_path / "b" / "out", tmp_path / "b" / "state", 2)
    assert resumed["best_epoch"] == res["best_epoch"]
    for a, b in zip(saved_weights(tmp_path / "a" / "out"), saved_weights(tmp_path / "b" / "out")):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_selection_window_must_be_odd(cohort, tmp_path):
    with pytest.raises(ValueError, match="selection_window"):
        T.train("locnet_single", {"level": 0, "unet": TINY_UNET},
                {"epochs": 1, "selection_window": 4}, cohort["grid"], LANDMARKS,
                cohort["train"], cohort["val"], cohort["table"], tmp_path / "o", tmp_path / "s", 1)


# --------------------------------------------------------------------------------------------
# resume state (locnet.checkpoint)
# --------------------------------------------------------------------------------------------
def test_resume_state_round_trip_and_refusals(tmp_path, caplog):
    log = logging.getLogger("locnet.train")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(np.ones((2, 2)), np.ones((2, 1)), verbose=0)  # builds the optimizer
    fp = checkpoint.fingerprint(method="m", seed=1)
    assert fp == checkpoint.fingerprint(seed=1, method="m") != checkpoint.fingerprint(seed=2)
    assert checkpoint.load_state(tmp_path, fp, log) is None  # nothing saved yet
    (tmp_path / "best-000000.npz").write_bytes(b"")
    (tmp_path / "snap-000001.npz").write_bytes(b"")  # stale: the new state does not name it
    (tmp_path / "snap-000002.npz").write_bytes(b"")
    progress = checkpoint.Progress(epoch=2, phase=0, history=[{"epoch": 0, "loss": np.nan}],
                                   best_epoch=0, best_score=np.nan, best_file="best-000000.npz",
                                   pending=[2])
    checkpoint.save_state(tmp_path, model, progress, fingerprint=fp, method="m", total_epochs=3)
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == [
        "best-000000.npz", "ckpt-000002.npz", "snap-000002.npz"]
    state = checkpoint.load_state(tmp_path, fp, log)
    again = checkpoint.progress_from_state(state)
    assert np.isnan(again.best_score) and np.isnan(again.history[0]["loss"])
    assert (again.epoch, again.pending, again.best_file) == (2, [2], "best-000000.npz")
    with np.load(tmp_path / state["checkpoint"]) as arrays:
        assert any(k.startswith("optimizer/") for k in arrays.files)
    # another configuration, a missing array, an unreadable file: start afresh, saying why
    with caplog.at_level(logging.WARNING, logger="locnet.train"):
        assert checkpoint.load_state(tmp_path, checkpoint.fingerprint(seed=2), log) is None
        (tmp_path / "snap-000002.npz").unlink()
        assert checkpoint.load_state(tmp_path, fp, log) is None
        (tmp_path / "state.json").write_text("{")
        assert checkpoint.load_state(tmp_path, fp, log) is None
    assert ["another configuration" in caplog.text, "lacks ['snap-000002.npz']" in caplog.text,
            "unreadable resume state" in caplog.text] == [True, True, True]


def _artery_cohort(root, n_cases=24, n=24, s=4.0, seed=0):
    """Toy scans of the default study's difficulty: a tube runs along z (the artery) and
    divides at the landmark's height ``h`` into two branches that diverge in x, so the tube is
    visible over the whole height and only its branching marks the landmark. ``x0, y0, h``
    vary per case."""
    from locnet.fileio import write_json_atomic
    from locnet.geometry import Grid
    from locnet.pyramid import write_level

    rng = np.random.default_rng(seed)
    ijk = np.stack(np.meshgrid(*(np.arange(n),) * 3, indexing="ij"), -1).astype(np.float64)
    rows, dirs = [], []
    for c in range(n_cases):
        d = root / f"case_{c:03d}"
        origin = rng.uniform(-50, 50, 3)
        x0, y0, h = rng.uniform(0.35 * n, 0.65 * n, 3)
        i, j, k = ijk[..., 0], ijk[..., 1], ijk[..., 2]
        tube = lambda dx: np.exp(-((i - x0 - dx) ** 2 + (j - y0) ** 2) / 2.0)  # noqa: E731
        vol = rng.normal(0.05, 0.02, (n,) * 3) + (k <= h) * tube(0.0)
        vol += sum((k > h) * tube(side * 0.6 * (k - h)) for side in (-1, 1))
        grid = Grid(origin=tuple(origin), spacing=s, shape=n, levels=1)
        write_level(np.clip(vol, 0, 1).astype(np.float32), grid, 0, d)
        write_json_atomic(grid.to_dict(), d / "grid.json")
        rows.append((d.name, "a", *(origin + s * np.array([x0, y0, h]))))
        dirs.append(d)
    return dirs, pd.DataFrame(rows, columns=["case_id", "landmark", "x", "y", "z"])


def test_map_prior_makes_the_locnet_find_the_height_of_a_branching(tmp_path):
    """The default study's failure in miniature: along the artery the centre of mass alone
    learns little in a few epochs, with the map prior the height error falls well below the
    no-image reference's."""
    dirs, table = _artery_cohort(tmp_path)
    grid = {"finest_shape": 24, "finest_spacing_mm": 4.0, "levels": 1}
    val = LandmarkDataset(dirs[16:], [0], table, ["a"], shuffle=False)
    z_err = {}
    for weight in (0.0, 30.0):
        cfg = {"level": 0, "unet": {"filters": [4, 8]},
               "map_supervision": {"weight": weight, "sigma_voxels": 1.5}}
        T.train("locnet_single", cfg, {"epochs": 8, "learning_rate": 0.005, "selection_window": 1},
                grid, ["a"], dirs[:16], dirs[16:], table, tmp_path / f"out{weight}",
                tmp_path / f"state{weight}", 1)
        model, _ = load_kept(tmp_path / f"out{weight}")
        pred, true, _ = T.predict_dataset(model, val)
        z_err[weight] = float(np.abs(pred[:, 0, 2] - true[:, 0, 2]).mean())
    reference = float(np.abs(true[:, 0, 2] - true[:, 0, 2].mean()).mean())  # one height for all
    assert z_err[30.0] < 0.5 * reference
    assert z_err[30.0] < 0.5 * z_err[0.0]


# --------------------------------------------------------------------------------------------
# one trainer per state folder (issue 24, item 10)
# --------------------------------------------------------------------------------------------
_HOLDER = """
import sys, time
from pathlib import Path
from locnet import checkpoint
with checkpoint.state_lock(sys.argv[1]):
    Path(sys.argv[2]).write_text("locked")
    time.sleep(120)
"""


def test_a_second_trainer_on_one_state_folder_is_refused_naming_the_first(tmp_path, caplog):
    """Two trainers once shared one .state folder for 70 s. The second is refused, naming the
    first one's process; when the first dies (kill -9), the lock is taken over with a warning."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    state = tmp_path / ".state" / "train" / "m" / "seed0"
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(checkpoint.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen([sys.executable, "-c", _HOLDER, str(state), str(ready)], env=env)
    try:
        for _ in range(600):
            if ready.exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert ready.exists(), "the first trainer did not take the lock"
        with pytest.raises(checkpoint.StateLocked) as exc:
            with checkpoint.state_lock(state):
                pytest.fail("a second holder got the lock")
        msg = str(exc.value)
        assert f"in use by process {first.pid} on host {socket.gethostname()}" in msg
        assert str(state) in msg
        # train() itself takes the lock first: it stops before touching the folder
        with pytest.raises(checkpoint.StateLocked, match=f"process {first.pid}"):
            T.train("m", {}, {}, {}, [], [], [], None, tmp_path / "out", state, seed=0)
        assert not (tmp_path / "out").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the dead holder's pid stays in the file; the lock itself went with the process
    with caplog.at_level(logging.WARNING, logger="locnet.train"):
        with checkpoint.state_lock(state) as lock:
            assert json.loads(lock.read_text())["pid"] == os.getpid()
    (warning,) = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    assert f"process {first.pid} on host {socket.gethostname()}" in warning
    assert "no longer running" in warning
    # a clean end leaves no holder: the next one takes the lock silently
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="locnet.train"):
        with checkpoint.state_lock(state):
            # two handles in one process conflict as well (the lock is the open file's)
            with pytest.raises(checkpoint.StateLocked, match=f"process {os.getpid()}"):
                with checkpoint.state_lock(state):
                    pass
    assert not caplog.records
