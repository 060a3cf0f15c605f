"""Per-level predictions of the multi-scale chains (locnet.study_predict) and their table and
warnings (locnet.level_errors).

The chains are tiny and untrained (32^3 grid at 5 mm, 3 levels, 4^3 patches) on a random
pyramid written straight to disk with a non-zero origin, so the grid-mm -> world map is a
visible translation.
"""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest

from locnet import level_errors, pyramid, study_predict
from locnet.geometry import Grid
from locnet.fileio import write_json_atomic
from locnet.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

LANDMARKS = ["left", "right"]
GRID = {"finest_shape": 32, "finest_spacing_mm": 5.0, "levels": 3}
ORIGIN = (-71.5, 12.25, 230.0)
CASES = ("case_0001", "case_0002")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("levels")
    grid = Grid(ORIGIN, GRID["finest_spacing_mm"], GRID["finest_shape"], GRID["levels"])
    rng = np.random.default_rng(0)
    dirs = []
    for case in CASES:
        level = rng.uniform(0, 1, (32, 32, 32)).astype(np.float32)
        for lv in range(grid.levels):
            if lv:
                level = pyramid.downsample2(level)
            pyramid.write_level(level, grid, lv, root / case)
        write_json_atomic(grid.to_dict(), root / case / "grid.json")
        dirs.append(root / case)
    # annotations in world mm; the right landmark of the second case is missing
    table = pd.DataFrame({
        "case_id": [c for c in CASES for _ in LANDMARKS],
        "landmark": LANDMARKS * len(CASES),
        "x": [-10.0, 20.0, -12.0, np.nan], "y": [60.0, 55.0, 70.0, np.nan],
        "z": [300.0, 310.0, 295.0, np.nan],
    })
    return dirs, table


def chain(method, **cfg):
    keras.utils.set_random_seed(11)
    return build_model(method, {"patch": 4, "unet": {"filters": [4, 8]}, "landmarks": LANDMARKS,
                                **cfg}, GRID)


@pytest.mark.parametrize("method,cfg,passes", [
    ("multiscale_e2e", {}, 0),
    ("multiscale_e2e_noise", {"noise_mm": 5.0}, 3),
])
def test_level_columns_are_the_chain_outputs_in_world_mm(cases, method, cfg, passes):
    dirs, table = cases
    model = chain(method, **cfg)
    subsets = {CASES[0]: "val", CASES[1]: "test"}
    preds = study_predict.predict_cases(model, dirs, subsets, table, LANDMARKS, passes=passes, seed=4,
                                  progress=False)
    # existing columns first and unchanged, then the levels coarsest to finest
    level_cols = ["level2_x", "level2_y", "level2_z", "error_level2_mm",
                  "level1_x", "level1_y", "level1_z", "error_level1_mm",
                  "level0_x", "level0_y", "level0_z", "error_level0_mm"]
    fixed = study_predict.COLUMNS + (study_predict.NOISE_COLUMNS if passes else [])
    assert list(preds.columns) == fixed + level_cols
    assert study_predict.level_columns([0, 1, 2]) == level_cols
    truth = {(r.case_id, r.landmark): np.array([r.x, r.y, r.z]) for r in table.itertuples()}
    for d in dirs:
        case = d.name
        inputs = {f"level{l}": pyramid.load_level(d, l)[0][None, ..., None] for l in range(3)}
        out = model(inputs, training=False)  # eager, noise-free: grid mm
        for k, name in enumerate(LANDMARKS):
            row = preds[(preds.case_id == case) & (preds.landmark == name)].iloc[0]
            true = truth[(case, name)]
            for l in (2, 1, 0):
                got = np.array([row[f"level{l}_x"], row[f"level{l}_y"], row[f"level{l}_z"]])
                if l == 0 and passes:
                    # the noisy chain's level 0 is its reported prediction, the pass mean
                    want = np.array([row.x, row.y, row.z])
                    np.testing.assert_allclose([row.det_x, row.det_y, row.det_z],
                                               np.asarray(out["level0"])[0, k] + ORIGIN,
                                               atol=1e-3)
                else:
                    want = np.asarray(out[f"level{l}"], np.float64)[0, k] + ORIGIN
                np.testing.assert_allclose(got, want, atol=1e-3)
                err = row[f"error_level{l}_mm"]
                if np.isnan(true).any():
                    assert np.isnan(err)
                else:
                    assert err == pytest.approx(np.linalg.norm(got - true), abs=1e-9)
        np.testing.assert_array_equal(preds["error_level0_mm"], preds["error_mm"])
        np.testing.assert_array_equal(preds[["level0_x", "level0_y", "level0_z"]].to_numpy(),
                                      preds[["x", "y", "z"]].to_numpy())


def test_single_scale_tables_have_no_level_columns(cases):
    dirs, table = cases
    keras.utils.set_random_seed(11)
    model = build_model("locnet_single", {"level": 2, "unet": {"filters": [4, 8]},
                                          "landmarks": LANDMARKS}, GRID)
    preds = study_predict.predict_cases(model, dirs[:1], {}, table, LANDMARKS, progress=False)
    assert list(preds.columns) == study_predict.COLUMNS
    assert study_predict.chain_levels(model) == [] and level_errors.levels_of(preds) == []


# ------------------------------------------------------------------------- the table, by hand

def frame(errors_by_level, landmarks=("a", "b"), subset="test"):
    """A prediction table with given per-level errors: ``{level: [errors row by row]}``."""
    n = len(next(iter(errors_by_level.values())))
    df = pd.DataFrame({"case_id": [f"c{i // len(landmarks)}" for i in range(n)],
                       "subset": subset, "landmark": [landmarks[i % len(landmarks)]
                                                      for i in range(n)]})
    for level in sorted(errors_by_level, reverse=True):
        df[f"error_level{level}_mm"] = errors_by_level[level]
    df["error_mm"] = errors_by_level[0]
    return df


def test_level_table_matches_a_hand_computation():
    # rows: (c0, a), (c0, b), (c1, a), (c1, b); the last landmark is missing
    chain_a = frame({2: [8.0, 6.0, 10.0, np.nan], 1: [4.0, 2.0, 3.0, np.nan],
                     0: [1.0, 3.0, 2.0, np.nan]})
    val_rows = frame({2: [100.0, 100.0], 1: [100.0, 100.0], 0: [100.0, 100.0]}, subset="val")
    preds = {"multiscale_e2e": pd.concat([chain_a, val_rows], ignore_index=True),
             "locnet_single": pd.DataFrame({"case_id": ["c0"], "subset": ["test"],
                                            "landmark": ["a"], "error_mm": [1.0]})}
    t = level_errors.level_table(preds, subset="test")
    assert set(t["method"]) == {"multiscale_e2e"}  # single-scale tables are skipped
    assert list(t["scope"].unique()) == ["all", "a", "b"]
    pooled = t[t.scope == "all"].set_index("level")
    assert list(pooled.index) == [2, 1, 0] and list(pooled["step"]) == [1, 2, 3]
    assert list(pooled["n"]) == [3, 3, 3]
    # level 2: 8, 6, 10 -> mean 8, median 8, sd 2; level 1: 4, 2, 3 -> 3, 3, 1;
    # level 0: 1, 3, 2 -> 2, 2, 1
    np.testing.assert_allclose(pooled["mean_mm"], [8.0, 3.0, 2.0])
    np.testing.assert_allclose(pooled["median_mm"], [8.0, 3.0, 2.0])
    np.testing.assert_allclose(pooled["sd_mm"], [2.0, 1.0, 1.0])
    np.testing.assert_allclose(pooled["change_mm"], [np.nan, -5.0, -1.0])
    assert list(pooled["improves"]) == [None, True, True]
    a = t[t.scope == "a"].set_index("level")  # c0 and c1: (8, 10), (4, 3), (1, 2)
    np.testing.assert_allclose(a["mean_mm"], [9.0, 3.5, 1.5])
    np.testing.assert_allclose(a["median_mm"], [9.0, 3.5, 1.5])
    b = t[t.scope == "b"].set_index("level")  # c0 only: 6, 2, 3 -> level 0 is worse
    np.testing.assert_allclose(b["mean_mm"], [6.0, 2.0, 3.0])
    assert list(b["n"]) == [1, 1, 1] and b["sd_mm"].isna().all()
    assert list(b["improves"]) == [None, True, False]
    # the pooled means improve at every level: no warning (the per-landmark row shows it)
    assert level_errors.level_warnings(t) == []
    md = level_errors.level_markdown(t)
    assert "None: every finer level improves" in md and "| **no** |" in md


def test_warning_when_a_finer_level_is_worse(tmp_path):
    worse = frame({2: [8.0, 6.0], 1: [2.0, 4.0], 0: [5.0, 3.0]})  # level 0: 4.0 > 3.0
    equal = frame({2: [8.0, 6.0], 1: [7.0, 7.0], 0: [4.0, 4.0]})  # level 1 = level 2: not below
    good = frame({2: [8.0, 6.0], 1: [2.0, 4.0], 0: [1.0, 2.0]})
    t = level_errors.level_table({"multiscale_e2e_noise": worse, "multiscale_multistep": equal,
                                  "multiscale_e2e": good})
    warnings = level_errors.level_warnings(t)
    assert len(warnings) == 2
    assert warnings[0].startswith("multiscale_multistep: level 1 does not improve on level 2")
    assert "7.00 mm after level 1, 7.00 mm after level 2" in warnings[0]
    assert warnings[1].startswith("multiscale_e2e_noise: level 0 does not improve on level 1")
    assert "4.00 mm after level 0, 3.00 mm after level 1" in warnings[1]
    assert not any(w.startswith("multiscale_e2e:") for w in warnings)
    paths = level_errors.write_level_table(t, tmp_path / "level_errors.csv",
                                           tmp_path / "level_errors.md")
    md = paths["md"].read_text()
    assert md.count("- WARNING: ") == 2 and warnings[1] in md
    back = pd.read_csv(paths["csv"])
    assert list(back.columns) == level_errors.COLUMNS and len(back) == 3 * 3 * 3
    # only the good chain, or a test set without annotations: no warning
    assert level_errors.level_warnings(level_errors.level_table({"multiscale_e2e": good})) == []
    blank = frame({2: [np.nan, np.nan], 1: [np.nan, np.nan], 0: [np.nan, np.nan]})
    assert level_errors.level_warnings(level_errors.level_table({"multiscale_e2e": blank})) == []


def test_a_level_that_returns_its_crop_centre_is_called_dead(tmp_path):
    # positions: level 2 moves level 3's by 3-4 mm; level 1 returns level 2's exactly (a dead
    # Loc-Net: its centre of mass is the crop centre); level 0 moves it by 0.5 mm
    df = frame({3: [9.0, 8.0], 2: [6.0, 5.0], 1: [6.0, 5.0], 0: [5.5, 4.5]})
    pos = {3: [[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]], 2: [[3.0, 0.0, 0.0], [10.0, 4.0, 0.0]]}
    pos[1] = pos[2]
    pos[0] = [[3.0, 0.0, 0.5], [10.0, 4.0, 0.5]]
    for level, xyz in pos.items():
        df[[f"level{level}_{c}" for c in "xyz"]] = np.array(xyz)
    t = level_errors.level_table({"multiscale_e2e": df})
    pooled = t[t.scope == "all"].set_index("level")
    np.testing.assert_allclose(pooled["moved_mm"], [np.nan, 3.5, 0.0, 0.5])
    assert pd.isna(pooled["dead"].iloc[0]) and list(pooled["dead"])[1:] == ["", "seed 0", ""]
    warnings = level_errors.level_warnings(t)
    assert any("level 1 returns its crop centre in seed 0" in w for w in warnings)
    assert any("level 1 does not improve on level 2" in w for w in warnings)
    assert not any("level 0 returns" in w or "level 2 returns" in w for w in warnings)
    assert "| **seed 0** |" in level_errors.level_markdown(t)
    # one dead seed of two is named, although the median move over both seeds is not small
    other = df.copy()
    other["seed"] = 1
    other[[f"level1_{c}" for c in "xyz"]] = other[[f"level1_{c}" for c in "xyz"]] + 2.0
    both = pd.concat([df.assign(seed=0), other], ignore_index=True)
    pooled = level_errors.level_table({"multiscale_e2e": both}).query("scope == 'all'")
    row = pooled.set_index("level").loc[1]
    assert row["dead"] == "seed 0" and row["moved_mm"] > 1.0
    # the CSV reads back as written, and the page's reader still sees the dead seed
    paths = level_errors.write_level_table(pooled, tmp_path / "l.csv", tmp_path / "l.md")
    back = pd.read_csv(paths["csv"]).set_index("level")
    assert back.loc[1, "dead"] == "seed 0" and not level_errors.is_dead(back.loc[0, "dead"])
