"""The results page (locnet.report) and the README's generated block."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from locnet import report

ROOT = Path(__file__).resolve().parents[1]


def _table1():
    rows = []
    for m, label, mean, sd, paper in [
        ("multiscale_e2e", "Multi-scale, end-to-end", 7.2213, 5.3349, "3.61 ± 3.17"),
        ("multiscale_e2e_noise", "Multi-scale, end-to-end + noise", 9.0547, 8.1239,
         "2.81 ± 2.37"),
        ("my_method", "my_method", 12.5, 1.25, ""),
    ]:
        for scope in ("all", "left"):
            rows.append({"method": m, "label": label, "scope": scope, "n_cases": 8,
                         "n": 16 if scope == "all" else 8, "mean_mm": mean, "sd_mm": sd,
                         "median_mm": mean - 1, "max_mm": mean + 9,
                         "paper_mean_sd": paper if scope == "all" else ""})
    return pd.DataFrame(rows)


def _statistics(p_holm=(1.0, 0.004)):
    rows = []

    def add(test, comp, **q):
        rows.extend({"test": test, "comparison": comp, "quantity": k, "value": v, "note": ""}
                    for k, v in q.items())

    prop = "multiscale_e2e_noise"
    for other, ph, diff, mdd in zip(("multiscale_e2e", "my_method"), p_holm, (1.83, -3.4),
                                    (4.61, 2.96)):
        add("wilcoxon_holm", f"{prop} vs {other}", n_cases=8, n_pairs=16, mean_diff_mm=diff,
            mean_diff_ci_low=diff - 2, mean_diff_ci_high=diff + 2, p=ph / 2, p_holm=ph,
            significant=float(ph < 0.05), mdd80_mm=mdd)
    add("calibration", prop, level=0.9, n=16, coverage=0.625, coverage_ci_low=0.386,
        coverage_ci_high=0.815)
    add("calibration_conformal", prop, n_calibration=12, scale=1.8, n=16, coverage=0.875,
        coverage_ci_low=0.64, coverage_ci_high=0.965)
    add("confidence_vs_error", f"{prop} [case means]", n=8, pearson_r=0.41, pearson_p=0.31)
    return pd.DataFrame(rows)


def _mean_sd_cells(page: str) -> dict[str, tuple[float, float]]:
    """Method label -> (mean, sd) read back from the page's error table."""
    out = {}
    part = page.split("### Test-set error", 1)[1].split("###", 1)[0]
    for line in part.splitlines():
        m = re.match(r"\| (.+?) \| ([\d.]+) ± ([\d.]+) \|", line)
        if m:
            out[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return out


def test_page_numbers_are_table1s_and_the_paper_is_labelled():
    t1 = _table1()
    page = report.results_markdown(t1, _statistics(), configfiles=["config.yaml"],
                                   git={"commit": "abc1234", "dirty": True, "note": ""},
                                   date="2026-12-04 16:00 UTC")
    assert page.startswith(report.HEADER_PREFIX)
    cells = _mean_sd_cells(page)
    pooled = t1[t1["scope"] == "all"]
    assert set(cells) == set(pooled["label"])
    for r in pooled.itertuples():
        assert cells[r.label] == (round(r.mean_mm, 2), round(r.sd_mm, 2))
    assert "Paper: mean ± sd" in page and "2.81 ± 2.37" in page
    assert "`abc1234` (with uncommitted changes" in page and "`config.yaml`" in page
    assert "Training time: no benchmark files" in page
    assert "### Error per pyramid level" not in page  # no level_errors table given


def test_page_conclusions_follow_the_numbers():
    page = report.results_markdown(_table1(), _statistics())
    concl = page.split("### What this run can and cannot conclude", 1)[1]
    assert "differs significantly" in concl and "my_method" in concl
    assert "Against Multi-scale, end-to-end no difference is significant" in concl
    assert "Differences below 4.6 mm cannot be detected" in concl
    assert "over-confident" in concl  # 90% is above the coverage CI's upper end
    assert "61.2%" not in page and "62.5%" in page and "87.5%" in page  # raw and conformal
    none_sig = report.results_markdown(_table1(), _statistics(p_holm=(1.0, 0.3)))
    assert "No pairwise difference is significant at this test-set size" in none_sig
    assert "Differences below 3.0 mm cannot be detected" in none_sig


def test_page_without_tests_and_with_level_errors():
    st = pd.DataFrame([{"test": "wilcoxon_holm", "comparison": "multiscale_e2e_noise",
                        "quantity": "p_holm", "value": np.nan,
                        "note": "proposed method 'multiscale_e2e_noise' not in this run"}])
    lv = pd.DataFrame({"method": ["multiscale_e2e"] * 2, "scope": ["all"] * 2,
                       "level": [3, 0], "mean_mm": [11.234, 7.2213]})
    page = report.results_markdown(_table1(), st, lv)
    assert "Not computed: proposed method 'multiscale_e2e_noise' not in this run." in page
    assert "No paired test was run, so this run ranks no methods." in page
    assert "### Error per pyramid level" in page and "| multiscale_e2e | 3 | 11.23 |" in page


def test_training_times_and_git_without_a_checkout(tmp_path):
    bench = tmp_path / "train"
    bench.mkdir()
    (bench / "multiscale_e2e.tsv").write_text("s\th:m:s\tmax_rss\n92.5\t0:01:32\t1200.0\n")
    (bench / "locnet_single.tsv").write_text("s\th:m:s\tmax_rss\n600.0\t0:10:00\t1200.0\n")
    (bench / "broken.tsv").write_text("")
    t = report.training_times(bench)
    assert list(t["method"]) == ["locnet_single", "multiscale_e2e"]
    assert t["seconds"].iloc[1] == 92.5
    assert report.training_times(tmp_path / "absent").empty
    g = report.git_state(tmp_path)
    assert g["commit"] is None and g["note"]
    page = report.results_markdown(_table1(), _statistics(), git=g, training=t)
    assert "Commit: unknown" in page
    # only the methods of this run (locnet_single is an older run's file)
    assert "1 min 32 s in all; Multi-scale, end-to-end 1 min 32 s." in page


def _job_record(tmp_path, method, seed, start, end, threads=1):
    import json

    d = tmp_path / "models" / method / f"seed{seed}"
    d.mkdir(parents=True)
    job = {"started_utc": f"2026-12-06T{start}+00:00", "finished_utc": f"2026-12-06T{end}+00:00",
           "threads": threads}
    (d / "metadata.json").write_text(json.dumps({"method": method, "job": job}))


def test_training_wall_counts_side_by_side_jobs_once(tmp_path):
    """The union of the jobs' intervals: two overlapping jobs (10:00-10:10, 10:05-10:20) and
    a job an hour later (11:00-11:02) are 22 minutes of wall time, not 37 of job time and not
    the 62 minutes from the first start to the last end; other methods and seeds are left out."""
    _job_record(tmp_path, "multiscale_e2e", 0, "10:00:00", "10:10:00")
    _job_record(tmp_path, "multiscale_e2e_noise", 0, "10:05:00", "10:20:00")
    _job_record(tmp_path, "multiscale_e2e", 1, "11:00:00", "11:02:00")
    _job_record(tmp_path, "multiscale_e2e", 5, "12:00:00", "13:00:00")  # an older run's seed
    _job_record(tmp_path, "other_method", 0, "09:00:00", "13:00:00")
    (tmp_path / "models" / "multiscale_e2e_noise" / "seed1").mkdir()
    (tmp_path / "models" / "multiscale_e2e_noise" / "seed1" / "metadata.json").write_text("{}")
    wall = report.training_wall(tmp_path / "models", ["multiscale_e2e", "multiscale_e2e_noise"],
                                seeds=[0, 1])
    assert wall == {"jobs": 3, "seconds": 22 * 60.0, "threads": [1]}
    assert report.training_wall(tmp_path / "absent") is None
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "multiscale_e2e.tsv").write_text("s\th:m:s\tmax_rss\n2220.0\t0\t10.0\n")
    page = report.results_markdown(_table1(), _statistics(),
                                   training=report.training_times(bench), training_wall=wall)
    assert ("Wall time of the training stage (the time during which at least one of the 3 "
            "training jobs ran, from their metadata): 22 min 0 s; 1 thread each.") in page


README_TEXT = """# Title

Intro.

## Results

{begin}
old hand-typed table
| a | 1.00 |
{end}

## Next section

Unchanged text.
"""


def test_splice_replaces_only_the_block_and_is_idempotent(tmp_path):
    text = README_TEXT.format(begin=report.BEGIN, end=report.END)
    page = report.results_markdown(_table1(), _statistics(), date="2026-12-04 16:00 UTC")
    new = report.splice(text, page)
    before, after = text.split(report.BEGIN)[0], text.split(report.END)[1]
    assert new.startswith(before + report.BEGIN) and new.endswith(report.END + after)
    assert "old hand-typed" not in new
    assert report.readme_block(new) == page.strip("\n")
    assert report.splice(new, page) == new
    assert report.check_block(new) == []
    # the command does the same on a file, and a second run changes nothing
    readme, page_file = tmp_path / "README.md", tmp_path / "results.md"
    readme.write_text(text)
    page_file.write_text(page)
    assert report.main(["--readme", str(readme), str(page_file)]) == 0
    once = readme.read_text()
    assert once == new
    assert report.main(["--readme", str(readme), str(page_file)]) == 0
    assert readme.read_text() == once
    assert report.main(["--check", "--readme", str(readme)]) == 0
    with pytest.raises(ValueError, match="one"):
        report.splice(text.replace(report.END, ""), page)


def test_check_block_catches_hand_edits():
    text = README_TEXT.format(begin=report.BEGIN, end=report.END)
    assert "generated header" in report.check_block(text)[0]
    done = report.splice(text, report.results_markdown(_table1(), _statistics()))
    assert report.check_block(done) == []
    edited = done.replace("7.22 ± 5.33", "4.92 ± 5.33")
    assert edited != done
    assert "edited by hand" in report.check_block(edited)[0]
    assert report.check_block(done.replace(report.HEADER_PREFIX, "<!-- typed"))


def test_readme_results_block_is_generated():
    """The README's results block is a generated page (or the no-results-yet text), unedited:
    refresh it with `bash scripts/update-readme-results.sh results` after the study."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert report.check_block(text) == []


def test_page_with_seeds_reports_the_between_seed_spread(tmp_path):
    t1 = _table1().assign(n_seeds=3, seed_sd_mm=[0.5, 0.5, 1.25, 1.25, 0.1, 0.1],
                          seed_means_mm=["6.80, 7.22, 7.64"] * 2 + ["8.0, 9.05, 10.1"] * 2
                          + ["12.4, 12.5, 12.6"] * 2)
    # nested benchmark files, one per seed; seed 3 is an older run's and is not counted
    for m in ("multiscale_e2e", "multiscale_e2e_noise"):
        for s, sec in ((0, 60.0), (1, 62.0), (3, 999.0)):
            (tmp_path / m).mkdir(exist_ok=True)
            (tmp_path / m / f"seed{s}.tsv").write_text(f"s\th:m:s\tmax_rss\n{sec}\t0\t10.0\n")
    t = report.training_times(tmp_path, seeds=[0, 1, 2])
    assert list(t["runs"]) == [2, 2] and list(t["seconds"]) == [122.0, 122.0]
    page = report.results_markdown(t1, _statistics(), training=t)
    assert "Every method was trained 3 times" in page
    assert "| Multi-scale, end-to-end | 7.22 ± 5.33 | 0.50 | 6.80, 7.22, 7.64 |" in page
    # the widest seed spread is named with its measured span, against the gaps of the means
    assert "the widest spread is Multi-scale, end-to-end + noise's, whose seeds' means span " \
           "2.10 mm" in page
    assert "1.83 to 3.45 mm apart" in page
    assert "Multi-scale, end-to-end 2 min 2 s (2 seeds)" in page


def test_page_gives_the_slopes_and_names_low_ones_and_levels_that_do_not_refine():
    sl = pd.DataFrame([{"method": m, "seed": s, "landmark": lm, "axis": a, "slope": v, "n": 8}
                       for m, vals in (("multiscale_e2e", (0.9, 0.8, 0.02)),
                                       ("multiscale_e2e_noise", (0.95, 0.9, 0.7)))
                       for s in (0, 1) for lm in ("l", "r") for a, v in zip("xyz", vals)])
    lv = pd.DataFrame({"method": ["multiscale_e2e"] * 3, "label": ["Multi-scale, end-to-end"] * 3,
                       "scope": ["all"] * 3, "level": [2, 1, 0], "change_mm": [np.nan, 0.0, -1.0],
                       "improves": [None, False, True], "moved_mm": [np.nan, 0.0, 2.0],
                       "dead": [None, "seed 1", ""], "mean_mm": [9.0, 9.0, 8.0]})
    page = report.results_markdown(_table1(), _statistics(), lv, slopes=sl)
    assert "### Does each method follow the landmark?" in page
    assert "| Multi-scale, end-to-end | 0.90 | 0.80 | 0.02 |" in page
    assert "| Multi-scale, end-to-end + noise | 0.95 | 0.90 | 0.70 |" in page
    concl = page.split("### What this run can and cannot conclude", 1)[1]
    assert "Multi-scale, end-to-end: slope below 0.5 along z (0.02)" in concl
    assert "end-to-end + noise: slope below" not in concl
    assert "Multi-scale, end-to-end: level 1 returns its crop centre in training seed 1" in concl
    lv.loc[1, "dead"] = ""
    page = report.results_markdown(_table1(), _statistics(), lv, slopes=sl)
    assert "level 1 does not refine the prediction (mean error change +0.00 mm)" in page


def test_page_says_when_the_ellipsoids_are_not_calibrated_and_how_sure_a_calibration_is():
    """Issue 24: with one validation case the page called a 'calibrated' coverage the one to
    use. Not calibrated: say why, in words, and point at the raw ellipsoids. Calibrated: give
    the range of coverage that a calibration on n cases allows."""
    st = _statistics()
    q = st["quantity"]
    conf = st["test"] == "calibration_conformal"
    st = st[~conf | q.isin(["n_calibration"])].copy()
    st.loc[st["test"] == "calibration_conformal", "value"] = 1
    reason = ("1 validation case(s) (20 landmarks): a conformal scale needs at least 10 cases, "
              "as the landmarks of one case share its errors, so the raw ellipsoids are kept")
    st.loc[st["test"] == "calibration_conformal", "note"] = "split-conformal ...; " + reason
    extra = [{"test": "calibration_conformal", "comparison": "multiscale_e2e_noise",
              "quantity": k, "value": v, "note": "split-conformal ...; " + reason}
             for k, v in (("calibrated", 0.0), ("scale", np.nan), ("coverage", np.nan))]
    st = pd.concat([st, pd.DataFrame(extra)], ignore_index=True)
    page = report.results_markdown(_table1(), st)
    assert f"- Not calibrated: {reason}. The raw ellipsoids above are the ones to use" in page
    assert "Calibrated (split-conformal" not in page
    st2 = _statistics()
    extra = [{"test": "calibration_conformal", "comparison": "multiscale_e2e_noise",
              "quantity": k, "value": v, "note": ""}
             for k, v in (("calibrated", 1.0), ("coverage_guarantee_low", 0.7164),
                          ("coverage_guarantee_high", 0.9868))]
    page = report.results_markdown(_table1(), pd.concat([st2, pd.DataFrame(extra)],
                                                        ignore_index=True))
    assert "fitted on 12 validation cases" in page
    assert "ranges from 71.6% to 98.7% (central 95%)" in page
