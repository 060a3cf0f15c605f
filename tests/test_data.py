"""Tests of locnet.data: streaming cases from a memory-mapped pyramid.

``write_tiny_cohort`` (also used by test_train.py) writes a pyramid exactly as the contract of
docs/architecture.md says: ``{case}/level{l}.nii`` float32 uncompressed with the level affines
(through ``locnet.pyramid.write_level``, the owner of the stored layout), ``{case}/grid.json``,
and a landmark table in world RAS mm. Each landmark is a bright blob.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from locnet.geometry import Grid
from locnet.pyramid import read_grid, write_level
from locnet.data import (
    LandmarkDataset,
    case_targets,
    load_case_inputs,
    model_levels,
    read_landmark_table,
    shift_volume,
)

LANDMARKS = ["left_bifurcation", "right_bifurcation"]


def _downsample2(a):
    n = a.shape[0] // 2
    return a.reshape(n, 2, n, 2, n, 2).mean(axis=(1, 3, 5)).astype(np.float32)


def write_tiny_cohort(root, n_cases=4, n0=32, s0=4.0, levels=4, seed=0, missing=("case_001",)):
    """A tiny pyramid cohort under ``root``; returns (case_dirs, landmark table DataFrame).

    Each case has its own origin; landmark k is a Gaussian blob (amplitude 1.0 for the first,
    0.6 for the second) at a random position. The landmark ``right_bifurcation`` of the cases in
    ``missing`` is left empty in the table (still drawn in the image).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows, dirs = [], []
    ijk = np.stack(np.meshgrid(*(np.arange(n0),) * 3, indexing="ij"), -1).astype(np.float64)
    for c in range(n_cases):
        case = f"case_{c:03d}"
        d = root / case
        d.mkdir(parents=True, exist_ok=True)
        origin = rng.uniform(-100, 100, 3)
        vol = rng.normal(0.05, 0.02, (n0,) * 3)
        for k, name in enumerate(LANDMARKS):
            v = rng.uniform(0.25 * n0, 0.75 * n0, 3)  # level-0 voxel coordinate
            world = origin + s0 * v
            r2 = ((ijk - v) ** 2).sum(-1)
            vol += (1.0 if k == 0 else 0.6) * np.exp(-r2 / (2 * 1.5**2))
            if case in missing and k == 1:
                rows.append((case, name, np.nan, np.nan, np.nan))
            else:
                rows.append((case, name, *world))
        level = np.clip(vol, 0, 1).astype(np.float32)
        grid = Grid(origin=tuple(origin), spacing=s0, shape=n0, levels=levels)
        for l in range(levels):
            if l:
                level = _downsample2(level)
            sl = s0 * 2**l
            aff = np.diag([sl, sl, sl, 1.0])
            aff[:3, 3] = origin + (sl - s0) / 2
            np.testing.assert_allclose(grid.level_affine(l), aff)  # the contract's affines
            write_level(level, grid, l, d)
        (d / "grid.json").write_text(json.dumps(grid.to_dict()))
        dirs.append(d)
    table = pd.DataFrame(rows, columns=["case_id", "landmark", "x", "y", "z"])
    return dirs, table


@pytest.fixture
def cohort(tmp_path):
    dirs, table = write_tiny_cohort(tmp_path / "pyramid", n_cases=3)
    csv = tmp_path / "landmarks.csv"
    table.to_csv(csv, index=False, na_rep="")
    return dirs, table, csv


def test_shapes_masks_and_grid_mm_targets(cohort):
    dirs, table, csv = cohort
    ds = LandmarkDataset(dirs, [1, 3], csv, LANDMARKS, shuffle=False)
    assert len(ds) == 3
    for i, d in enumerate(dirs):
        x, y = ds[i]
        assert sorted(x) == ["level1", "level3"]
        assert x["level1"].shape == (1, 16, 16, 16, 1) and x["level1"].dtype == np.float32
        assert x["level3"].shape == (1, 4, 4, 4, 1)
        assert y["position"].shape == (1, 2, 3) and y["position"].dtype == np.float32
        assert y["mask"].shape == (1, 2) and y["mask"].dtype == np.float32
        # hand computation: g = world - origin (origin from grid.json)
        origin = np.array(json.loads((d / "grid.json").read_text())["origin"])
        rows = table[table.case_id == d.name].set_index("landmark")
        for k, name in enumerate(LANDMARKS):
            world = rows.loc[name, ["x", "y", "z"]].to_numpy(float)
            if np.isnan(world).any():
                assert y["mask"][0, k] == 0 and np.all(y["position"][0, k] == 0)
            else:
                assert y["mask"][0, k] == 1
                np.testing.assert_allclose(y["position"][0, k], world - origin, atol=1e-4)
    # the missing landmark of case_001 is masked
    _, y1 = ds[1]
    np.testing.assert_array_equal(y1["mask"][0], [1, 0])
    # the blob of landmark 0 is where its target says (level 0 argmax within a voxel)
    x0, y0 = LandmarkDataset(dirs[:1], [0], table, LANDMARKS, shuffle=False)[0]
    vox = np.unravel_index(np.argmax(x0["level0"][0, ..., 0]), (32,) * 3)
    assert np.all(np.abs(np.array(vox) * 4.0 - y0["position"][0, 0]) <= 4.0)


def test_case_targets_by_hand():
    pos, mask = case_targets({"a": np.array([10.0, 20.0, 30.0]), "b": np.array([1.0, np.nan, 2])},
                             ["a", "b", "c"], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(pos, [[9, 18, 27], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(mask, [1, 0, 0])


def test_landmark_table_from_csv_has_string_ids(tmp_path):
    csv = tmp_path / "l.csv"
    csv.write_text("case_id,landmark,x,y,z\n007,a,1,2,3\n007,b,,,\n")
    t = read_landmark_table(csv)
    assert list(t.case_id) == ["007", "007"] and np.isnan(t.x[1])


def test_memmaps_not_copies(cohort):
    dirs, table, _ = cohort
    ds = LandmarkDataset(dirs, [0, 2], table, LANDMARKS, shuffle=False, cache_size=1)
    arrays = ds.case_arrays(0)
    assert all(isinstance(a, np.memmap) for a in arrays.values())
    x, _ = ds[0]

    def backed_by_memmap(a):
        while a is not None:
            if isinstance(a, np.memmap):
                return True
            a = a.base
        return False

    assert backed_by_memmap(x["level0"]) and backed_by_memmap(x["level2"])
    assert np.shares_memory(x["level0"], arrays[0])
    # the LRU holds at most cache_size cases
    ds[1], ds[2]
    assert len(ds._cache) == 1
    inp = load_case_inputs(dirs[0], [0, 2])
    assert backed_by_memmap(inp["level0"]) and inp["level2"].shape == (1, 8, 8, 8, 1)
    np.testing.assert_array_equal(inp["level0"], x["level0"])


def test_order_depends_only_on_seed_and_epoch(cohort):
    dirs, table, _ = cohort
    dirs = dirs * 3  # 9 "cases" for a less trivial permutation
    a = LandmarkDataset(dirs, [3], table, LANDMARKS, seed=5)
    b = LandmarkDataset(dirs, [3], table, LANDMARKS, seed=5)
    orders = []
    for e in range(4):
        a.set_epoch(e)
        orders.append(a._order.copy())
    b.set_epoch(3)  # jump straight to epoch 3 (as a resumed run does)
    np.testing.assert_array_equal(b._order, orders[3])
    assert sorted(orders[0]) == list(range(9))
    assert any(not np.array_equal(orders[0], o) for o in orders[1:])
    c = LandmarkDataset(dirs, [3], table, LANDMARKS, seed=6)
    assert not all(np.array_equal(c.order_for_epoch(e), orders[e]) for e in range(4))


def test_batches_larger_than_one_stack_cases(cohort):
    dirs, table, _ = cohort
    ds = LandmarkDataset(dirs, [2], table, LANDMARKS, batch_size=2, shuffle=False)
    assert len(ds) == 2
    x, y = ds[0]
    assert x["level2"].shape == (2, 8, 8, 8, 1) and y["position"].shape == (2, 2, 3)
    x, y = ds[1]  # the remainder
    assert x["level2"].shape == (1, 8, 8, 8, 1) and y["mask"].shape == (1, 2)
    single = LandmarkDataset(dirs, [2], table, LANDMARKS, shuffle=False)
    np.testing.assert_array_equal(ds[0][0]["level2"][1], single[1][0]["level2"][0])


def test_model_levels_from_input_names():
    import keras

    inp = {f"level{l}": keras.Input((4, 4, 4, 1), name=f"level{l}") for l in (3, 1)}
    out = keras.layers.Add()([keras.layers.Flatten()(inp["level3"]),
                              keras.layers.Flatten()(inp["level1"])[:, :64]])
    model = keras.Model(inp, out)
    assert model_levels(model) == [1, 3]


def test_read_grid(cohort):
    dirs, _, _ = cohort
    g = read_grid(dirs[0])  # the cohort writer's grid.json is one the pyramid module reads
    assert g.shape == 32 and len(g.origin) == 3


def test_readahead_requests_the_next_batch_and_changes_no_value(cohort, monkeypatch):
    from locnet import data

    dirs, _, csv = cohort
    asked = []
    real = data.read_into_page_cache
    monkeypatch.setattr(data, "read_into_page_cache", lambda paths: (asked.append(paths),
                                                                     real(paths)))
    on = LandmarkDataset(dirs, [0, 2], csv, LANDMARKS, shuffle=True, seed=3)
    off = LandmarkDataset(dirs, [0, 2], csv, LANDMARKS, shuffle=True, seed=3, readahead=False)
    on.set_epoch(1)
    off.set_epoch(1)
    order = on.order_for_epoch(1)
    for b in range(len(on)):
        (xa, ya), (xb, yb) = on[b], off[b]
        on.readahead.wait(10)
        for k in xa:
            np.testing.assert_array_equal(xa[k], xb[k])
        np.testing.assert_array_equal(ya["position"], yb["position"])
    # after batch b, the files of batch b + 1 of this epoch's order were read; none after the last
    want = [[d / f"level{l}.nii" for l in (0, 2)] for d in (dirs[i] for i in order[1:])]
    assert asked == want
    assert off.readahead is None
    # one case at a time (validation): the case named as the next one is read ahead
    asked.clear()
    on.readahead.wait(10)
    on.case_batch(2, then=0)
    on.readahead.wait(10)
    on.case_batch(0)
    assert asked == [[dirs[0] / f"level{l}.nii" for l in (0, 2)]]
    # a file that vanished is skipped: the batch that needs it reports the error, not the thread
    data.read_into_page_cache([dirs[0] / "nope.nii", dirs[0] / "level0.nii"])


def test_shift_volume_moves_content_and_fills_the_edge():
    a = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6) + 1.0
    b = shift_volume(a, [1, -2, 0])
    np.testing.assert_array_equal(b[1:, :3, :], a[:-1, 2:, :])  # out[v + s] = in[v]
    assert np.all(b[0] == 0) and np.all(b[:, 3:, :] == 0)
    assert np.all(shift_volume(a, [4, 0, 0]) == 0)  # moved out entirely
    np.testing.assert_array_equal(shift_volume(a, [0, 0, 0]), a)


def test_augmentation_moves_image_and_targets_together(cohort):
    """With ``shift_mm`` every level and every annotated target move by the same whole number
    of coarsest-level voxels; the draw depends only on (seed, epoch, case); the landmarks stay
    inside; a missing landmark stays masked at 0; shift_mm 0 changes nothing."""
    dirs, table, _ = cohort
    plain = LandmarkDataset(dirs, [0, 2], table, LANDMARKS, shuffle=False)
    aug = LandmarkDataset(dirs, [0, 2], table, LANDMARKS, shuffle=False, seed=3, shift_mm=40.0)
    step = 4.0 * 2**2  # level-2 voxel (mm)
    seen = set()
    for epoch in range(4):
        aug.set_epoch(epoch)
        for i in range(len(dirs)):
            s = aug.case_shift(i)
            assert np.all(np.abs(s) <= 2)  # 40 mm // 16 mm
            seen.add(tuple(s))
            x, y = aug.case_batch(i)
            x0, y0 = plain.case_batch(i)
            for l in (0, 2):
                np.testing.assert_array_equal(
                    x[f"level{l}"][0, ..., 0], shift_volume(x0[f"level{l}"][0, ..., 0],
                                                            s * 2 ** (2 - l)))
            m = y0["mask"][0] > 0
            np.testing.assert_array_equal(y["mask"], y0["mask"])
            np.testing.assert_allclose(y["position"][0][m], y0["position"][0][m] + s * step)
            assert np.all(y["position"][0][~m] == 0)
            assert np.all(y["position"][0][m] >= 0) and np.all(y["position"][0][m] <= 31 * 4.0)
            # the blob of landmark 0 is still where its target says
            vox = np.unravel_index(np.argmax(x["level0"][0, ..., 0]), (32,) * 3)
            assert np.all(np.abs(np.array(vox) * 4.0 - y["position"][0, 0]) <= 4.0)
    assert len(seen) > 3  # the shifts vary between cases and epochs
    again = LandmarkDataset(dirs, [0, 2], table, LANDMARKS, shuffle=False, seed=3, shift_mm=40.0)
    again.set_epoch(2)
    aug.set_epoch(2)
    assert [tuple(again.case_shift(i)) for i in range(3)] == [tuple(aug.case_shift(i))
                                                              for i in range(3)]
    # below one coarsest voxel: no shift at all
    small = LandmarkDataset(dirs, [0, 2], table, LANDMARKS, shuffle=False, shift_mm=15.0)
    assert not small.case_shift(0).any()
    with pytest.raises(ValueError, match="shift_mm"):
        LandmarkDataset(dirs, [0], table, LANDMARKS, shift_mm=-1.0)
