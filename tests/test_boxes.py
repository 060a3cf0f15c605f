"""Tests of the chains' training input read as boxes (``training.loader.crop``): the loader's box
is the memory map's slice, a chain's training forward on boxes equals the one on whole levels
when the crops stay inside the boxes, and training on boxes is deterministic."""

from __future__ import annotations

import json
import logging

import keras
import numpy as np
import pandas as pd
import pytest

from locnet import train as T
from locnet.data import LandmarkDataset, advise_box, chain_boxes, open_level, shift_volume
from locnet.models import build_model
from locnet.geometry import Grid
from locnet.pyramid import write_level
from test_data import LANDMARKS

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

N0, S0, LEVELS, PATCH = 32, 4.0, 3, 4
GRID = {"finest_shape": N0, "finest_spacing_mm": S0, "levels": LEVELS}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Four cases of random levels (structure everywhere, so that a chain with random weights
    answers differently for different images); the second landmark of case_002 is missing."""
    root = tmp_path_factory.mktemp("boxes")
    rng = np.random.default_rng(5)
    dirs, rows = [], []
    for c in range(4):
        d = root / f"case_{c:03d}"
        grid = Grid(origin=tuple(rng.uniform(-50, 50, 3)), spacing=S0, shape=N0, levels=LEVELS)
        for l in range(LEVELS):
            write_level(rng.random((N0 // 2**l,) * 3, dtype=np.float32), grid, l, d)
        (d / "grid.json").write_text(json.dumps(grid.to_dict()))
        dirs.append(d)
        for k, name in enumerate(LANDMARKS):
            world = np.asarray(grid.origin) + S0 * rng.uniform(0.3 * N0, 0.7 * N0, 3)
            rows.append((d.name, name, *(world if (c, k) != (2, 1) else [np.nan] * 3)))
    return dirs, pd.DataFrame(rows, columns=["case_id", "landmark", "x", "y", "z"])


def dataset(cohort, boxes=None, n=None):
    dirs, table = cohort
    dirs = dirs[:n]
    return LandmarkDataset(dirs, list(range(LEVELS)), table, LANDMARKS, shuffle=False,
                           boxes=boxes)


def test_chain_boxes_size_and_placement():
    # one case, landmarks 10 voxels apart on axis 0 at level 0 (grid mm = 4 v at level 0)
    pos = np.array([[40.0, 60.0, 60.0], [80.0, 60.0, 60.0]], np.float32)
    boxes = chain_boxes([(pos, np.ones(2))], [0, 1, 2], 64, 4.0, patch=4, noise_mm=4.0,
                        margin_mm=8.0)
    assert sorted(boxes) == [0, 1]  # the coarsest level stays whole
    # level 0: spread 10 + 2 * (1.5 + (8 + 4) / 4) + 2 = 21 on axis 0, 11 on the others
    assert boxes[0]["shape"] == (21, 11, 11) and boxes[0]["reach"] == pytest.approx(4.5)
    # level 1 (no noise): spread 5 + 2 * (1.5 + 1) + 2 = 12
    assert boxes[1]["shape"] == (12, 7, 7)
    # a margin beyond the level: the whole level
    big = chain_boxes([(pos, np.ones(2))], [0, 1, 2], 64, 4.0, 4, 0.0, 400.0)
    assert big[0]["shape"] == (64, 64, 64) and big[1]["shape"] == (32, 32, 32)


def test_box_is_the_memory_maps_slice(cohort):
    dirs, _ = cohort
    whole = dataset(cohort)
    boxes = T.training_boxes(build_model("multiscale_e2e_noise", {
        "landmarks": LANDMARKS, "patch": PATCH, "noise_mm": 4.0, "unet": {"filters": [2]}},
        GRID), whole, {"loader": {"crop": True, "margin_mm": 4.0}})
    assert sorted(boxes) == [0, 1] and all(b < N0 for b in boxes[0]["shape"])
    boxed = dataset(cohort, boxes)
    shapes = set()
    for i, d in enumerate(dirs):
        x, y = boxed.case_batch(i)
        xw, yw = whole.case_batch(i)
        np.testing.assert_array_equal(y["position"], yw["position"])
        np.testing.assert_array_equal(x[f"level{LEVELS - 1}"], xw[f"level{LEVELS - 1}"])
        assert "offset2" not in x and "offset0" not in xw
        for l in boxes:
            corner = boxed.box_corner(i, l)
            np.testing.assert_array_equal(x[f"offset{l}"], corner[None].astype(np.float32))
            n = N0 // 2**l
            assert np.all(corner >= 0) and np.all(corner + boxes[l]["shape"] <= n)
            sl = tuple(slice(c, c + b) for c, b in zip(corner, boxes[l]["shape"]))
            np.testing.assert_array_equal(x[f"level{l}"][0, ..., 0], open_level(d, l)[sl])
            shapes.add((l, x[f"level{l}"].shape))
            # the box holds every voxel a crop within `reach` of a landmark reads
            v = (y["position"][0] - (S0 * 2**l - S0) / 2) / (S0 * 2**l)
            valid = y["mask"][0] > 0
            if valid.any():
                lo = np.floor(v[valid].min(0) - boxes[l]["reach"])
                hi = np.floor(v[valid].max(0) + boxes[l]["reach"]) + 1
                assert np.all((lo >= corner) | (lo < 0))
                assert np.all((hi < corner + boxes[l]["shape"]) | (hi >= n))
    assert len(shapes) == len(boxes)  # one shape per level for every case: no retracing
    # an epoch with readahead (which cuts the next case's boxes on its thread) gives the same
    for b in range(len(boxed)):
        x, _ = boxed[b]
        direct = dataset(cohort, boxes).case_batch(b)[0]
        assert sorted(x) == sorted(direct)
        for key in x:
            np.testing.assert_array_equal(x[key], direct[key])
    boxed.readahead.wait()
    assert list(boxed._ready) == []  # every box cut ahead was used
    # a batch of several cases stacks the boxes and their corners
    x, _ = dataset(cohort, boxes).batch([0, 3])
    assert x["offset0"].shape == (2, 3) and x["level0"].shape == (2, *boxes[0]["shape"], 1)


def test_crop_of_a_box_is_the_crop_of_the_volume():
    from locnet.layers import crop_resample

    rng = np.random.default_rng(0)
    vol = rng.random((2, 20, 18, 16, 1), dtype=np.float32)
    centres = rng.uniform(6, 10, (2, 3, 3)).astype("float32")
    corner = np.array([[3, 2, 1], [4, 3, 2]])
    box = np.stack([vol[b, c[0]:c[0] + 12, c[1]:c[1] + 12, c[2]:c[2] + 12]
                    for b, c in enumerate(corner)])
    whole = keras.ops.convert_to_numpy(crop_resample(vol, centres, 4))
    boxed = keras.ops.convert_to_numpy(crop_resample(box, centres, 4,
                                                     offset=corner.astype("float32")))
    np.testing.assert_array_equal(boxed, whole)  # bit for bit, inside the box
    # a crop reaching beyond the box reads the background there
    far = centres.copy()
    far[0, 0] = [15.0, 8.0, 8.0]  # reads voxels 13..17 on axis 0; the box ends at 14
    cut = keras.ops.convert_to_numpy(crop_resample(box, far, 4, background=-1.0,
                                                   offset=corner.astype("float32")))
    assert np.all(cut[0, 0, -1] == -1.0) and np.all(cut[0, 0, 0] >= 0.0)


def test_advise_box_is_a_hint_on_maps_only(cohort):
    arr = open_level(cohort[0][0], 0)
    before = np.array(arr)
    sl = (slice(3, 20), slice(5, 9), slice(0, 32))
    advise_box(arr, sl)  # the box's file ranges, asked for; nothing changes
    advise_box(before, sl)  # not a map: nothing to ask for
    np.testing.assert_array_equal(np.asarray(arr), before)


def forward(model, x, seed=3):
    T.reseed(model, seed, 0, "train")
    out = model(x, training=True)
    return {k: keras.ops.convert_to_numpy(v) for k, v in out.items()}


def lively_chain(method):
    """A chain with random weights large enough that its maps, and so its answers, follow the
    image (freshly built maps are flat)."""
    keras.utils.set_random_seed(0)
    model = build_model(method, {"landmarks": LANDMARKS, "patch": PATCH, "noise_mm": 4.0,
                                 "unet": {"filters": [2, 4]}, "map_supervision": {"weight": 1.0}},
                        GRID)
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:
        v.assign(rng.normal(0.0, 0.5, v.shape).astype("float32"))
    return model


@pytest.mark.parametrize("method", ["multiscale_e2e_noise", "multiscale_multistep"])
def test_chain_forward_on_boxes_equals_whole_levels(cohort, method):
    model = lively_chain(method)
    dirs, table = original = cohort
    whole = dataset(cohort)
    ref = [forward(model, whole.case_batch(i)[0]) for i in range(len(dirs))]
    assert not np.allclose(ref[0]["position"], ref[1]["position"])  # answers follow the image
    # landmarks where the chain's level-1 answers are (its whole-level outputs do not depend
    # on the landmarks), 1 mm off: the crops then stay near them, and boxes whose margin covers
    # the coarse errors are smaller than the finest level
    table = table.copy()
    for i, d in enumerate(dirs):
        origin = np.asarray(json.loads((d / "grid.json").read_text())["origin"])
        for k, name in enumerate(LANDMARKS):
            row = (table.case_id == d.name) & (table.landmark == name)
            if np.isfinite(table.loc[row, "x"]).all():
                table.loc[row, ["x", "y", "z"]] = origin + ref[i]["level1"][0, k] + 1.0
    cohort = (dirs, table)
    whole = dataset(cohort)
    err = 0.0  # the largest distance of a crop's centre (before the noise) from its landmark
    for i in range(len(dirs)):
        y = whole.case_batch(i)[1]
        m = y["mask"][0] > 0
        for l in range(1, LEVELS):
            err = max(err, float(np.abs(ref[i][f"level{l}"][0] - y["position"][0])[m].max()))
    boxes = T.training_boxes(model, whole, {"loader": {"margin_mm": err + 0.5}})
    assert all(b < N0 for b in boxes[0]["shape"])  # a real box, not the whole level
    boxed = dataset(cohort, boxes)
    for i in range(len(dirs)):
        got = forward(model, boxed.case_batch(i)[0])
        assert sorted(got) == sorted(ref[i]) and "origin0" in got
        # the annotated landmarks' outputs (an unannotated one has no box, and no loss term)
        valid = whole.case_batch(i)[1]["mask"][0] > 0
        assert valid.sum() == (1 if i == 2 else 2)
        for key, (a, b) in annotated(got, ref[i], valid).items():
            np.testing.assert_array_equal(a, b, err_msg=key)  # bit for bit
    # the fixture's landmarks, far from where this chain crops, and a margin of 0: the crops
    # reach beyond the boxes and read `background` there (the documented difference)
    far = dataset(original)
    tight = dataset(original, T.training_boxes(model, far, {"loader": {"margin_mm": 0.0}}))
    differs = 0
    for i in range(len(dirs)):
        got = forward(model, tight.case_batch(i)[0])
        valid = far.case_batch(i)[1]["mask"][0] > 0
        differs += any(not np.allclose(a, b, atol=1e-4)
                       for a, b in annotated(got, ref[i], valid).values())
    assert differs > 0


def annotated(got, ref, valid) -> dict:
    """``{key: (got, ref)}`` of every output, for the annotated landmarks only."""
    out = {}
    for key in ref:
        a, b = got[key], ref[key]
        if key.startswith("logits"):  # (B, n, n, n, K)
            out[key] = a[..., valid], b[..., valid]
        else:  # (B, K, 3)
            out[key] = a[:, valid], b[:, valid]
    return out


def test_training_on_boxes_is_deterministic(cohort, tmp_path, caplog):
    dirs, table = cohort
    runs = []
    for name in ("a", "b"):
        with caplog.at_level(logging.INFO, logger="locnet.train"):
            res = T.train("multiscale_e2e_noise",
                          {"patch": PATCH, "noise_mm": 4.0, "unet": {"filters": [2, 4]}},
                          {"epochs": 2, "learning_rate": 0.01, "loader": {"margin_mm": 4.0}},
                          GRID, LANDMARKS, dirs[:3], dirs[3:], table, tmp_path / name / "out",
                          tmp_path / name / "state", seed=1)
        model = keras.models.load_model(tmp_path / name / "out" / "model.keras", compile=False)
        runs.append((res["history"].drop(columns=["time"]), [v.numpy() for v in model.weights]))
    # the chain's training read boxes (the default loader), the same both times
    said = [r.getMessage() for r in caplog.records if "reads boxes" in r.getMessage()]
    assert len(said) == 2 and said[0] == said[1]
    pd.testing.assert_frame_equal(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_array_equal(a, b)
    # the run did read boxes: the loader's boxes are smaller than the finest level
    boxes = T.training_boxes(build_model("multiscale_e2e_noise", {
        "landmarks": LANDMARKS, "patch": PATCH, "noise_mm": 4.0, "unet": {"filters": [2]}},
        GRID),
        dataset(cohort, n=3), {"loader": {"margin_mm": 4.0}})
    assert np.prod(boxes[0]["shape"]) < N0**3


def test_shifted_box_is_the_shifted_levels_slice(cohort):
    """Augmentation of a chain reading boxes: the box keeps its content and its corner moves
    by the level's shift, so the box is the slice of the shifted whole level at the new
    corner, and it stays inside the level."""
    dirs, table = cohort
    whole = dataset(cohort)
    boxes = T.training_boxes(build_model("multiscale_e2e_noise", {
        "landmarks": LANDMARKS, "patch": PATCH, "noise_mm": 4.0, "unet": {"filters": [2]}},
        GRID), whole, {"loader": {"crop": True, "margin_mm": 4.0}})
    aug = LandmarkDataset(dirs, list(range(LEVELS)), table, LANDMARKS, shuffle=False,
                          boxes=boxes, shift_mm=40.0, seed=1)
    moved = 0
    for epoch in range(3):
        aug.set_epoch(epoch)
        for i in range(len(dirs)):
            s = aug.case_shift(i)
            moved += bool(s.any())
            x, y = aug.case_batch(i)
            xw, yw = whole.case_batch(i)
            top = LEVELS - 1
            np.testing.assert_array_equal(x[f"level{top}"][0, ..., 0],
                                          shift_volume(xw[f"level{top}"][0, ..., 0], s))
            for l in boxes:
                v = s * 2 ** (top - l)
                corner = aug.box_corner(i, l) + v
                np.testing.assert_array_equal(x[f"offset{l}"][0], corner.astype(np.float32))
                assert np.all(corner >= 0) and np.all(corner + boxes[l]["shape"] <= N0 // 2**l)
                sl = tuple(slice(c, c + b) for c, b in zip(corner, boxes[l]["shape"]))
                shifted = shift_volume(open_level(dirs[i], l), v)
                np.testing.assert_array_equal(x[f"level{l}"][0, ..., 0], shifted[sl])
    assert moved > 0
