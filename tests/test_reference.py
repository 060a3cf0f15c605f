"""The no-image reference (locnet.reference) and its place on the results page."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from locnet import reference, report
from locnet.geometry import Grid

from test_report import _statistics, _table1


def _grid(origin):
    return Grid(origin=origin, spacing=1.25, shape=128, levels=4)


def _cohort():
    """Three training cases whose landmark `a` lies at grid mm x = 10, 20, 30 (mean 20) in
    grids with different origins, and two test cases."""
    origins = {"tr0": (0, 0, 0), "tr1": (-50, 7, 3), "tr2": (100, -20, 5),
               "te0": (-10, -10, -10), "te1": (40, 0, 0)}
    grid_mm = {"tr0": (10, 5, 5), "tr1": (20, 5, 5), "tr2": (30, 5, 5),
               "te0": (25, 5, 5), "te1": (20, 8, 9)}
    rows = []
    for case, g in grid_mm.items():
        w = np.add(g, origins[case])
        rows.append({"case_id": case, "landmark": "a", "x": w[0], "y": w[1], "z": w[2]})
    # `b`: annotated in one training case only (at grid mm 0, 0, 0) and missing in te1
    rows.append({"case_id": "tr0", "landmark": "b", "x": 0.0, "y": 0.0, "z": 0.0})
    rows.append({"case_id": "te0", "landmark": "b", "x": -10 + 3.0, "y": -10 + 4.0, "z": -10.0})
    rows.append({"case_id": "te1", "landmark": "b", "x": np.nan, "y": np.nan, "z": np.nan})
    # `c`: annotated only in a test case: no reference for it
    rows.append({"case_id": "te1", "landmark": "c", "x": 1.0, "y": 1.0, "z": 1.0})
    split = pd.DataFrame({"case_id": list(origins),
                          "subset": ["train", "train", "train", "test", "test"]})
    return pd.DataFrame(rows), split, {c: _grid(o) for c, o in origins.items()}


def test_reference_is_the_training_mean_in_grid_mm():
    lm, split, grids = _cohort()
    e = reference.mean_position_errors(lm, split, grids).set_index(["case_id", "landmark"])
    # a: mean grid position (20, 5, 5); te0 truth at (25, 5, 5), te1 at (20, 8, 9)
    assert e.loc[("te0", "a"), "error_mm"] == pytest.approx(5.0)
    assert e.loc[("te1", "a"), "error_mm"] == pytest.approx(5.0)
    # the prediction is in te1's world coordinates: grid mm (20, 5, 5) + origin (40, 0, 0)
    assert e.loc[("te1", "a"), ["x", "y", "z"]].tolist() == pytest.approx([60.0, 5.0, 5.0])
    # b: one training annotation at the origin; te0's b at grid mm (3, 4, 0); te1's missing
    assert e.loc[("te0", "b"), "error_mm"] == pytest.approx(5.0)
    assert ("te1", "b") not in e.index and ("te1", "c") not in e.index
    s = reference.summary(e.reset_index())
    assert (s["n"], s["n_cases"]) == (3, 2)
    assert s["mean_mm"] == pytest.approx(5.0) and s["sd_mm"] == pytest.approx(0.0)


def test_reference_names_a_case_without_a_grid():
    lm, split, grids = _cohort()
    del grids["tr1"]
    with pytest.raises(KeyError, match="tr1"):
        reference.mean_position_errors(lm, split, grids)


def _reference_rows(mean_mm: float) -> pd.DataFrame:
    return pd.DataFrame({"case_id": [f"c{i}" for i in range(4)], "landmark": "a",
                         "error_mm": [mean_mm - 1, mean_mm + 1, mean_mm - 2, mean_mm + 2]})


def test_page_reports_the_reference_and_who_learned_little():
    # table 1: 7.22, 9.05 and 12.5 mm; a 14 mm reference puts only 12.5 above 75% (10.5 mm)
    page = report.results_markdown(_table1(), _statistics(), reference=_reference_rows(14.0))
    assert "No-image reference" in page and "is off by 14.00 ± 1.83 mm" in page
    assert "Multi-scale, end-to-end 52%" in page and "my_method 89%" in page
    concl = page.split("### What this run can and cannot conclude", 1)[1]
    assert "- my_method: mean error above 75% of the no-image reference's (14.00 mm)" in concl
    # a 30 mm reference: every method learned (no line); no reference: no section at all
    assert "learned little" not in report.results_markdown(
        _table1(), _statistics(), reference=_reference_rows(30.0))
    assert "No-image reference" not in report.results_markdown(_table1(), _statistics())


# ---- slopes of predicted against true position (locnet.slopes) ----------------------------
def test_slopes_per_landmark_and_axis_in_grid_mm():
    from locnet import slopes
    from locnet.geometry import Grid

    rng = np.random.default_rng(0)
    cases = [f"c{i}" for i in range(8)]
    # every case's grid is shifted in the world: a method that answers one grid position
    # moves with the scan in world mm, and only grid mm show that it reads nothing
    grids = {c: Grid((float(20 * i), -float(7 * i), 3.0 * i), 2.0, 16, 2) for i, c in enumerate(cases)}
    rows = []
    for seed in (0, 1):
        for c in cases:
            o = np.asarray(grids[c].origin)
            for k, name in enumerate(("left", "right")):
                true = np.array([10.0 + 40 * k, 0.0, 0.0]) + rng.uniform(-8, 8, 3)
                # x follows exactly, y half, z is always the same grid height
                pred = np.array([true[0], 0.5 * true[1] + 1.0, 5.0])
                rows.append({"case_id": c, "subset": "test", "landmark": name, "seed": seed,
                             **dict(zip(("x", "y", "z"), o + pred)),
                             **dict(zip(("true_x", "true_y", "true_z"), o + true))})
    rows.append({**rows[0], "subset": "val", "x": 1e6})  # not a test row: ignored
    table = slopes.slope_table({"m": pd.DataFrame(rows)}, grids)
    assert len(table) == 2 * 2 * 3 and set(table["n"]) == {8}
    per = slopes.method_slopes(table)
    np.testing.assert_allclose(per.loc["m"].to_numpy(), [1.0, 0.5, 0.0], atol=1e-12)
    assert slopes.axis_slope([1.0, 2.0], [1.0, 2.0]) != slopes.axis_slope([1.0, 2.0], [1.0, 2.0])
