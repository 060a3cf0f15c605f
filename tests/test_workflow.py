"""The whole study on config/tiny.yaml through Snakemake, and the content of what it writes.

One session-scoped run (about 2 minutes on 2 cores, `tiny_study` in conftest.py) in a temporary working directory; the
tests then read its outputs. Dry runs check the paper config plans and bad configs stop.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import locnet.methods
import locnet.metrics

from conftest import run_snakemake

ROOT = Path(__file__).resolve().parents[1]
METHODS = list(locnet.methods.KEYS)  # Table 1's order
SEEDS = [0, 1]  # config/tiny.yaml: training.seeds 2


def test_cohort_tables(tiny_study):
    raw = pd.read_csv(tiny_study / "synthetic" / "landmarks.csv")
    lm = pd.read_csv(tiny_study / "data" / "landmarks.csv")
    assert len(lm) == 8 * 2 and set(lm["landmark"]) == {"left_bifurcation", "right_bifurcation"}
    merged = raw.merge(lm, on=["case_id", "landmark"], suffixes=("_raw", ""))
    # the synthetic table is RAS: ingest must carry it through unchanged
    for c in "xyz":
        np.testing.assert_allclose(merged[c], merged[f"{c}_raw"], atol=1e-6)
    split = pd.read_csv(tiny_study / "data" / "split.csv")
    assert split["subset"].value_counts().to_dict() == {"train": 5, "test": 2, "val": 1}


def test_pyramid_levels_and_affines(tiny_study):
    import nibabel as nib

    for level, n in enumerate([32, 16, 8, 4]):
        img = nib.load(tiny_study / "pyramid" / "case_0000" / f"level{level}.nii")
        assert img.shape == (n, n, n)
        assert img.get_data_dtype() == np.float32
        s = 5.0 * 2**level
        # stored [k, j, i] (locnet.pyramid); reoriented to RAS the axes are the grid's
        canonical = nib.as_closest_canonical(img)
        np.testing.assert_allclose(canonical.affine[:3, :3], np.diag([s, s, s]), atol=1e-5)
        data = np.asarray(img.dataobj)
        assert 0.0 <= data.min() and data.max() <= 1.0


def test_every_model_loads_and_predicts(tiny_study):
    import keras

    import locnet.models  # noqa: F401
    from locnet import data

    case = tiny_study / "pyramid" / "case_0000"
    for method in METHODS:
        first = None
        for seed in SEEDS:
            run = tiny_study / "models" / method / f"seed{seed}"
            model = keras.saving.load_model(run / "model.keras")
            out = model(data.load_case_inputs(case, data.model_levels(model)), training=False)
            pos = np.asarray(keras.ops.convert_to_numpy(out["position"]))
            assert pos.shape == (1, 2, 3) and np.isfinite(pos).all(), method
            hist = pd.read_csv(run / "history.csv")
            meta = pd.read_json(run / "metadata.json", typ="series")
            # config/tiny.yaml: 2 epochs, the patch baseline's own 3; row 0: untrained model
            epochs = 3 if method == "patch_baseline" else 2
            assert meta["epochs"] == epochs, method
            assert list(hist["epoch"]) == list(range(epochs + 1)), method
            assert hist["val_error_mm"].notna().all(), method
            # every seed is its own training run: another seed, other weights
            if first is None:
                first = (meta["seed"], [np.asarray(w) for w in model.get_weights()])
            else:
                assert meta["seed"] != first[0], method
                assert any(not np.array_equal(a, np.asarray(b))
                           for a, b in zip(first[1], model.get_weights())), method


def test_seeds_are_separate_jobs_pooled_into_one_table(tiny_study):
    for method in METHODS:
        pooled = pd.read_csv(tiny_study / "predictions" / f"{method}.csv")
        assert pooled.columns[0] == "seed" and sorted(set(pooled["seed"])) == SEEDS
        for seed in SEEDS:
            own = pd.read_csv(tiny_study / "predictions" / method / f"seed{seed}.csv")
            part = pooled[pooled["seed"] == seed].drop(columns="seed").reset_index(drop=True)
            pd.testing.assert_frame_equal(part, own, check_dtype=False)
            assert (tiny_study / "logs" / "train" / method / f"seed{seed}.log").is_file()
            assert (tiny_study / "benchmarks" / "train" / method / f"seed{seed}.tsv").is_file()


def test_predictions_are_world_coordinates_with_errors(tiny_study):
    split = pd.read_csv(tiny_study / "data" / "split.csv")
    want = set(split.loc[split["subset"].isin(["val", "test"]), "case_id"])
    for method in METHODS:
        df = pd.read_csv(tiny_study / "predictions" / f"{method}.csv")
        assert set(df["case_id"]) == want and len(df) == 2 * len(want) * len(SEEDS)
        err = np.linalg.norm(
            df[["x", "y", "z"]].to_numpy() - df[["true_x", "true_y", "true_z"]].to_numpy(), axis=1
        )
        np.testing.assert_allclose(df["error_mm"], err, rtol=1e-6)
        # predictions lie in the scanner frame of the truth, not in voxel or grid units
        assert np.all(np.abs(df[["x", "y", "z"]].to_numpy() - df[["true_x", "true_y", "true_z"]].to_numpy()) < 160)
    noisy = pd.read_csv(tiny_study / "predictions" / "multiscale_e2e_noise.csv")
    sd = noisy[["sd_x", "sd_y", "sd_z"]].to_numpy()
    assert (sd > 0).all()
    np.testing.assert_allclose(noisy["conf_volume_mm3"], 65.5 * sd.prod(axis=1), rtol=2e-3)


def test_table1_matches_predictions(tiny_study):
    t = pd.read_csv(tiny_study / "tables" / "table1.csv")
    pooled = t[t["scope"] == "all"]
    assert list(pooled["method"]) == METHODS  # the paper's order
    for method in METHODS:
        df = pd.read_csv(tiny_study / "predictions" / f"{method}.csv")
        test = df[df["subset"] == "test"]
        per_seed = test.groupby("seed")["error_mm"]
        row = pooled[pooled["method"] == method].iloc[0]
        # the mean over seeds of each seed's statistic; the between-seed sd of the means
        assert row["n_seeds"] == len(SEEDS)
        assert row["mean_mm"] == pytest.approx(per_seed.mean().mean())
        assert row["sd_mm"] == pytest.approx(per_seed.std(ddof=1).mean())
        assert row["seed_sd_mm"] == pytest.approx(per_seed.mean().std(ddof=1))
        assert row["n"] == per_seed.count().iloc[0]
    assert (pooled["paper_mean_sd"].iloc[-1]) == "2.81 ± 2.37"
    assert "\\begin{tabular}" in (tiny_study / "tables" / "table1.tex").read_text()


def test_statistics(tiny_study):
    s = pd.read_csv(tiny_study / "tables" / "statistics.csv")
    wil = s[(s["test"] == "wilcoxon_holm") & (s["quantity"] == "p_holm")]
    assert len(wil) == 5  # proposed method against each other method
    n_cases = s[(s["test"] == "wilcoxon_holm") & (s["quantity"] == "n_cases")]
    for comp, p, note in zip(wil["comparison"], wil["value"], wil["note"]):
        n = n_cases.loc[n_cases["comparison"] == comp, "value"].iloc[0]
        if n >= 6:  # the case is the unit: a test needs 6 cases
            assert 0 <= p <= 1, comp
        else:
            assert np.isnan(p) and "too few" in note, (comp, n, note)
    tests = set(s["test"])
    assert {"bootstrap_mean", "wilcoxon_holm", "confidence_vs_error", "calibration"} <= tests
    assert "Statistics" in (tiny_study / "tables" / "statistics.md").read_text()


def test_level_errors_follow_the_chains(tiny_study):
    chains = ["multiscale_multistep", "multiscale_e2e", "multiscale_e2e_noise"]
    t = pd.read_csv(tiny_study / "tables" / "level_errors.csv")
    assert list(dict.fromkeys(t["method"])) == chains
    pooled = t[t["scope"] == "all"]
    for method in chains:
        df = pd.read_csv(tiny_study / "predictions" / f"{method}.csv")
        np.testing.assert_allclose(df["error_level0_mm"], df["error_mm"])
        test = df[df["subset"] == "test"]
        rows = pooled[pooled["method"] == method]
        assert list(rows["level"]) == [3, 2, 1, 0]
        for r in rows.itertuples():  # seeds averaged (every seed has the same rows)
            assert r.mean_mm == pytest.approx(test[f"error_level{r.level}_mm"].mean())
        # each seed's predict log reports every level and warns where a finer level is worse
        for seed in SEEDS:
            log = (tiny_study / "logs" / "predict" / method / f"seed{seed}.log").read_text()
            assert f"{method}: test mean error" in log and "after level 3" in log
            own = pd.read_csv(tiny_study / "predictions" / method / f"seed{seed}.csv")
            own = own[own["subset"] == "test"]
            means = [own[f"error_level{lv}_mm"].mean() for lv in (3, 2, 1, 0)]
            worse = any(b >= a for a, b in zip(means, means[1:]))
            assert ("does not improve on level" in log) == worse, (method, seed)
    md = (tiny_study / "tables" / "level_errors.md").read_text()
    assert "## Warnings" in md and "## All landmarks (pooled)" in md
    single = pd.read_csv(tiny_study / "predictions" / "locnet_single.csv")
    assert not any(c.startswith(("level", "error_level")) for c in single.columns)


@pytest.mark.parametrize(
    "name",
    ["fig3_heatmaps", "fig4_violin_errors", "fig5_confidence_vs_error", "training_curves"],
)
def test_figures_are_drawn(tiny_study, name):
    import matplotlib.image as mpimg

    png = tiny_study / "figures" / f"{name}.png"
    img = mpimg.imread(png)
    h, w = img.shape[:2]
    assert w >= 600 and h >= 300, (name, img.shape)
    assert img[..., :3].std() > 0.05, f"{name} looks blank"
    pdf = tiny_study / "figures" / f"{name}.pdf"
    assert pdf.read_bytes()[:5] == b"%PDF-"


def test_rerun_has_nothing_to_do(tiny_study):
    run = run_snakemake(tiny_study.parent, "-n", "--cores", "2", "--configfile",
                    str(ROOT / "config" / "tiny.yaml"), "--config", "results=results")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Nothing to be done" in run.stdout + run.stderr


def test_a_re_ingest_with_identical_results_retrains_nothing(tiny_study):
    """Ingest run again (forced) writes the same tables and digests: Snakemake plans the rest
    of the study after it, so no pyramid, split, model or prediction is rebuilt."""
    files = [tiny_study / "data" / n for n in ("manifest.csv", "landmarks.csv", "split.csv")]
    for pattern in ("pyramid/*/level0.nii", "models/*/seed*/model.keras", "predictions/*.csv",
                    "tables/table1.csv"):
        files += sorted(tiny_study.glob(pattern))
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    run = run_snakemake(tiny_study.parent, "--cores", "2", "--resources", "gpu=1",
                        "--forcerun", "ingest", "--configfile",
                        str(ROOT / "config" / "tiny.yaml"), "--config", "results=results")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "0 of 8 scan(s) changed" in (tiny_study / "logs" / "ingest.log").read_text()
    ran = {l.split()[-1].rstrip(":") for l in out.splitlines()
           if l.startswith(("localrule ", "rule ", "localcheckpoint ", "checkpoint "))}
    assert ran == {"ingest"}, out[-5000:]
    assert [f for f in files if (f.stat().st_mtime_ns, f.read_bytes()) != before[f]] == []


def test_quality_threshold_and_a_change_of_estimator(tiny_study, tmp_path):
    import json

    from locnet import quality

    # the deployed model (seed 0) carries the threshold chosen on its own predictions
    q = json.loads((tiny_study / "models" / "multiscale_e2e_noise" / "seed0" / "quality.json")
                   .read_text())
    preds = pd.read_csv(tiny_study / "predictions" / "multiscale_e2e_noise" / "seed0.csv")
    assert q["estimator"] == "exact"  # the config's, for inference to use the same
    assert q["threshold_mm3"] == pytest.approx(quality.choose_threshold(preds)["threshold_mm3"])
    # another estimator re-runs the noisy method's predictions and what depends on them only
    overlay = tmp_path / "window.yaml"
    overlay.write_text("evaluation:\n  estimator: window\n")
    run = run_snakemake(tiny_study.parent, "-n", "--cores", "2", "--configfile",
                        str(ROOT / "config" / "tiny.yaml"), str(overlay), "--config",
                        "results=results")
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    counts = {l.split()[0]: int(l.split()[1]) for l in out.splitlines()
              if len(l.split()) == 2 and l.split()[1].isdigit()}
    assert counts.get("predict") == len(SEEDS), out[-3000:]  # one job per seed
    assert counts.get("quality_threshold") == 1 and counts.get("pool_predictions") == 1
    assert "train" not in counts and "pyramid" not in counts


def test_paper_config_plans(tmp_path):
    run = run_snakemake(tmp_path, "-n", "--quiet", "rules", "--cores", "8", "--resources", "gpu=1",
                    "--configfile", str(ROOT / "config" / "paper.yaml"), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    # 6 methods x 3 seeds (training.seeds' default): every training run is a job of its own
    for rule, count in [("pyramid", 263), ("train", 18), ("predict", 18), ("synthetic_case", 263),
                        ("pool_predictions", 6)]:
        line = next(l for l in out.splitlines() if l.split()[:1] == [rule])
        assert int(line.split()[1]) == count, line


def test_bad_config_key_is_named(tmp_path):
    run = run_snakemake(tmp_path, "-n", "--cores", "1", "--configfile",
                    str(ROOT / "config" / "tiny.yaml"), "--config", "pyramid={'finest_shap': 3}")
    assert run.returncode != 0
    assert "pyramid.finest_shap" in run.stdout + run.stderr


def test_config_errors_name_the_file_each_value_came_from(tmp_path):
    """An overlay that gives two of the three split counts keeps the third from the file
    below it: the error names the file of each; a YAML error in config.yaml names its line."""
    import shutil

    overlay = tmp_path / "counts.yaml"
    overlay.write_text("split:\n  counts: {train: 4, val: 2}\n")
    run = run_snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(overlay))
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert (f"train 4 (from {overlay}), val 2 (from {overlay}), test 32 (from config.yaml) "
            "sum to 38, but the cohort has 68 cases (synthetic.n_cases: 68, from "
            "config.yaml)") in out, out[-3000:]

    copy = tmp_path / "checkout"
    copy.mkdir()
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(ROOT / name, copy / name)
    for name in ("workflow", "src", "envs", "profiles", "config"):
        shutil.copytree(ROOT / name, copy / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    text = (copy / "config.yaml").read_text().replace("\nsplit:\n", "\nsplit:\n seed_x: 1\n", 1)
    (copy / "config.yaml").write_text(text)
    bad_line = text[:text.index(" seed_x")].count("\n") + 1
    run = snakemake_in(copy, tmp_path / "work", "-n", "--cores", "1")
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert f"config file {copy / 'config.yaml'}: not valid YAML" in out, out[-3000:]
    assert f"line {bad_line + 1}, column" in out, out[-3000:]  # the line after the bad one


def test_html_report_gathers_figures_and_tables(tiny_study):
    report = tiny_study / "report.html"
    run = run_snakemake(tiny_study.parent, "--report", str(report), "--configfile",
                    str(ROOT / "config" / "tiny.yaml"), "--config", "results=results")
    assert run.returncode == 0, run.stderr[-3000:]
    html = report.read_text(errors="replace")
    for name in ["fig3_heatmaps.png", "fig4_violin_errors.png", "fig5_confidence_vs_error.png",
                 "training_curves.png", "table1.csv", "statistics.csv"]:
        assert name in html, name
    assert "paper Fig. 4" in html  # a caption from workflow/report/


# ---- the workflow can be trusted: its own code, its inputs, its failures, its subsets --------

def snakemake_in(snakefile_dir, workdir, *args, env=None, timeout=600):
    """Like ``run_snakemake``, with the Snakefile of ``snakefile_dir`` (a copy of the checkout)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MPLBACKEND="Agg", **(env or {}))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(Path(snakefile_dir) / "Snakefile"),
           "--directory", str(workdir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def job_counts(out):
    """``{rule: count}`` from the job stats table that snakemake prints."""
    return {l.split()[0]: int(l.split()[1]) for l in out.splitlines()
            if len(l.split()) == 2 and l.split()[1].isdigit() and l.split()[0] not in
            ("total", "jobid:")}


def test_jobs_run_the_code_of_the_checkout_they_belong_to(tmp_path):
    """A copy of the workflow runs the locnet of its own src/, not the installed one, even
    when PYTHONPATH names another checkout first."""
    import shutil

    copy = tmp_path / "checkout"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
        ".venv", ".git", "results", ".snakemake", "__pycache__", "*.egg-info", ".pytest_cache",
        "tests", "benchmarks", "docs", "build", ".whl", ".gl"))
    init = copy / "src" / "locnet" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "0.1.0"',
                                             '__version__ = "0.1.0+planted"'))
    assert "planted" in init.read_text()
    work = tmp_path / "work"
    run = snakemake_in(copy, work, "results/synthetic/images/case_0000.nii.gz", "--cores", "1",
                       "--configfile", str(copy / "config" / "tiny.yaml"),
                       "--config", "results=results", env={"PYTHONPATH": str(ROOT / "src")})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    log = (work / "results" / "logs" / "synthetic_case" / "case_0000.log").read_text()
    assert f"locnet 0.1.0+planted from {copy.resolve() / 'src' / 'locnet'}" in log, log


SCAN_SHAPE = (24, 24, 24)


def write_scan(path, seed):
    """A small noisy scan (4 mm voxels, centred near the origin) in HU."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    data = (rng.normal(40.0, 80.0, SCAN_SHAPE)).astype(np.int16)
    aff = np.diag([4.0, 4.0, 4.0, 1.0])
    aff[:3, 3] = [-46.0, -46.0, -46.0]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, aff), str(path))


@pytest.fixture
def files_study(tmp_path):
    """A user's cohort of 4 tiny scans (cohort.source: files) and its snakemake runner."""
    cohort = tmp_path / "cohort"
    rows, lms = [], []
    for i in range(4):
        write_scan(cohort / "images" / f"p{i}.nii.gz", seed=i)
        rows.append({"case_id": f"p{i}", "image": f"images/p{i}.nii.gz"})
        lms += [{"case_id": f"p{i}", "landmark": "left_bifurcation", "x": -10, "y": 0, "z": 5},
                {"case_id": f"p{i}", "landmark": "right_bifurcation", "x": 10, "y": 0, "z": 5}]
    pd.DataFrame(rows).to_csv(cohort / "manifest.csv", index=False)
    pd.DataFrame(lms).to_csv(cohort / "landmarks.csv", index=False)
    overlay = tmp_path / "files.yaml"
    overlay.write_text(
        "results: results\n"
        f"cohort: {{source: files, manifest: {cohort / 'manifest.csv'}, "
        f"landmarks: {cohort / 'landmarks.csv'}}}\n")
    work = tmp_path / "work"
    targets = ["results/data/split.csv"] + [
        f"results/pyramid/p{i}/{name}" for i in range(4)
        for name in ("level0.nii", "level3.nii", "grid.json")]

    def snakemake(*args):
        return run_snakemake(work, *targets, *args, "--cores", "2", "--configfile",
                             str(ROOT / "config" / "tiny.yaml"), str(overlay))

    run = snakemake()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return cohort, work / "results", snakemake


def test_a_replaced_scan_rebuilds_its_pyramid_and_a_job_sweeps_its_stale_temporaries(files_study):
    cohort, res, snakemake = files_study
    run = snakemake("-n")
    assert "Nothing to be done" in run.stdout + run.stderr, run.stdout[-3000:]
    scan = cohort / "images" / "p2.nii.gz"
    before = stamps(res)
    write_scan(scan, seed=22)  # a new scan under the same name
    run = snakemake("-n")
    assert run.returncode == 0, run.stderr[-3000:]
    counts = job_counts(run.stdout + run.stderr)
    # checked again; the plan lists every pyramid, as which scans changed is known only
    # once ingest has compared their content (the real run below rebuilds p2's alone)
    assert counts.get("ingest") == 1 and counts.get("pyramid") == 4, run.stdout[-3000:]
    assert "Updated input files: " + str(scan) in run.stdout + run.stderr

    # temporaries of killed writers of this job's outputs (locnet.fileio.atomic_write names)
    stale = [res / "pyramid" / "p2" / ".tmp-0123456789ab-level0.nii",
             res / "pyramid" / "p2" / ".tmp-ba9876543210-grid.json",
             res / "data" / ".tmp-00000000beef-manifest.staged.csv"]
    # ... and ones that are not its own: another writer's in the same folder, and one of a
    # job that does not run now (either may belong to a job running in another snakemake)
    kept = [res / "pyramid" / "p2" / ".tmp-0123456789ab-notes.txt",
            res / "predictions" / ".tmp-0123456789ab-locnet_single.csv"]
    for f in stale + kept:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"half a file")
    run = snakemake()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert (res / "pyramid" / "p2" / "level0.nii").read_bytes() != before["pyramid/p2/level0.nii"][1]
    after = stamps(res)
    assert [f for f in before if after[f] != before[f] and "/p2/" not in f] == []
    assert [f for f in stale if f.exists()] == []
    assert all(f.exists() for f in kept)
    assert "left by a killed run" in (res / "logs" / "pyramid" / "p2.log").read_text()
    assert "Nothing to be done" in snakemake("-n").stdout + snakemake("-n").stderr


def stamps(res):
    """``{path: (mtime_ns, bytes)}`` of the study's tables, pyramids and split."""
    files = [res / "data" / n for n in ("manifest.csv", "landmarks.csv", "split.csv")]
    files += sorted((res / "pyramid").rglob("*.nii")) + sorted((res / "pyramid").rglob("*.json"))
    return {str(f.relative_to(res)): (f.stat().st_mtime_ns, f.read_bytes()) for f in files}


def test_a_scan_replaced_by_an_older_file_is_rebuilt_by_content_and_alone(files_study):
    """cp -p (rsync -a, tar) keeps the old modification time of the file it copies: the
    change is found by the scan's content digest, and only that case's pyramid is rebuilt."""
    import os
    import shutil
    import time

    cohort, res, snakemake = files_study
    before = stamps(res)
    other = cohort.parent / "elsewhere" / "other.nii.gz"
    write_scan(other, seed=99)
    two_days_ago = time.time() - 2 * 86400
    os.utime(other, (two_days_ago, two_days_ago))
    scan = cohort / "images" / "p2.nii.gz"
    shutil.copy2(other, scan)  # what cp -p does: the content and the old times
    assert scan.stat().st_mtime < min(m for m, _ in before.values()) / 1e9
    run = snakemake()
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-5000:]
    after = stamps(res)
    changed = sorted(f for f in before if after[f] != before[f])
    # p2's levels and grid are rebuilt; grid.json holds the same grid, so compare levels
    assert (res / "pyramid" / "p2" / "level0.nii").read_bytes() != before["pyramid/p2/level0.nii"][1]
    assert [f for f in changed if not f.startswith("pyramid/p2/")] == [], changed
    digest = json.loads((res / "data" / "digests" / "p2.json").read_text())
    from locnet.fileio import load_volume
    from locnet.ingest import scan_digest
    assert digest["digest"] == scan_digest(*load_volume(other, dtype=None))
    assert "1 of 4 scan(s) changed (p2)" in (res / "logs" / "ingest.log").read_text()
    assert "Nothing to be done" in snakemake("-n").stdout


def test_a_failed_re_ingest_keeps_the_last_good_tables(files_study):
    """A re-ingest that fails keeps the tables; once fixed, tables that come out
    byte-identical rebuild nothing: no table, pyramid or split is rewritten (rebuilds go by
    content, not by the time stamps ingest's outputs get), and the error is printed once,
    without a traceback."""
    cohort, res, snakemake = files_study
    before = stamps(res)
    tables = {name: (res / "data" / name).read_bytes()
              for name in ("manifest.csv", "landmarks.csv", "split.csv")}
    manifest = cohort / "manifest.csv"
    manifest.write_text(manifest.read_text().replace("images/p1.nii.gz", "images/gone.nii.gz"))
    run = snakemake()
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert "Error in rule ingest" in out, out[-3000:]
    log = (res / "logs" / "ingest.log").read_text()
    assert "'p1'" in log and "gone.nii.gz" in log, log  # the case and the file
    # one clean message: the problem line once in the terminal, no Python traceback
    problem = next(l for l in log.splitlines() if "gone.nii.gz" in l)
    assert out.count(problem.split(" ERROR ")[-1].strip()) == 1, out[-5000:]
    assert "Traceback" not in out and "Traceback" not in log, out[-5000:]
    for name, content in tables.items():
        assert (res / "data" / name).read_bytes() == content, name
    # nothing downstream ran on the bad cohort; fixed, the same tables come back
    manifest.write_text(manifest.read_text().replace("images/gone.nii.gz", "images/p1.nii.gz"))
    run = snakemake()
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    after = stamps(res)
    assert [f for f in before if after[f] != before[f]] == [], out[-5000:]
    assert "0 of 4 scan(s) changed" in (res / "logs" / "ingest.log").read_text()
    counts = job_counts(out)
    assert counts.get("ingest") == 1 and "cohort_tables" not in out.split("Job stats")[0]
    assert "Finished jobid" in out and "rule pyramid" not in out and "rule split" not in out, \
        out[-5000:]
    assert "Nothing to be done" in snakemake("-n").stdout


def test_run_methods_selects_the_methods_and_configfiles_merge(tmp_path):
    import locnet.config

    schema = locnet.config.load_schema()  # the method list comes from the registry
    run_methods = schema["properties"]["run_methods"]
    assert run_methods["items"]["enum"] == METHODS and run_methods["default"] == METHODS

    def plan(text):
        overlay = tmp_path / "overlay.yaml"
        overlay.write_text(text)
        run = run_snakemake(tmp_path, "-n", "--cores", "2", "--configfile",
                            str(ROOT / "config" / "tiny.yaml"), str(overlay))
        return run, run.stdout + run.stderr

    run, out = plan("run_methods: [multiscale_e2e_noise, locnet_single]\n")
    assert run.returncode == 0, out[-3000:]
    counts = job_counts(out)
    assert counts["train"] == 2 * len(SEEDS) and counts["predict"] == 2 * len(SEEDS), \
        out[-3000:]
    methods = {l.split("method=")[1].split(",")[0].strip() for l in out.splitlines()
               if "method=" in l}
    assert methods == {"multiscale_e2e_noise", "locnet_single"}
    assert "fig_heatmaps" not in counts  # needs both single-scale methods

    # a configfile is merged over config.yaml: listing two method blocks keeps the other four
    run, out = plan("methods: {locnet_single: {level: 2}, multiscale_e2e: {patch: 4}}\n")
    assert run.returncode == 0, out[-3000:]
    assert job_counts(out)["train"] == 6 * len(SEEDS)

    run, out = plan("run_methods: [locnet_single, locnet_double]\n")
    assert run.returncode != 0 and "run_methods" in out and "locnet_double" in out, out[-3000:]


@pytest.mark.parametrize("manifest_text", ["bad_ids", "empty", "no_annotation"])
def test_bad_case_ids_and_an_empty_manifest_reach_ingest(tmp_path, manifest_text):
    """The DAG is built from the user's manifest before ingest runs: a case id that cannot
    name a file, or a zero-byte manifest, must still end in ingest's own error naming the
    id and the file, not in a Snakemake or pandas error that names neither. A landmark table
    with only its header stops there too, naming the table, before anything trains."""
    cohort = tmp_path / "cohort"
    ids = ["p0", "p1", "p2"] if manifest_text == "no_annotation" else ["p0", "p 1", "pé2"]
    lms = []
    for i, c in enumerate(ids):
        write_scan(cohort / "images" / f"s{i}.nii.gz", seed=i)
        lms += [{"case_id": c, "landmark": "left_bifurcation", "x": -10, "y": 0, "z": 5},
                {"case_id": c, "landmark": "right_bifurcation", "x": 10, "y": 0, "z": 5}]
    manifest = cohort / "manifest.csv"
    if manifest_text == "empty":
        manifest.write_bytes(b"")
    else:
        pd.DataFrame({"case_id": ids, "image": [f"images/s{i}.nii.gz" for i in range(3)]}
                     ).to_csv(manifest, index=False)
    pd.DataFrame(lms[:0] if manifest_text == "no_annotation" else lms,
                 columns=["case_id", "landmark", "x", "y", "z"]).to_csv(
        cohort / "landmarks.csv", index=False)
    overlay = tmp_path / "files.yaml"
    overlay.write_text(f"results: results\ncohort: {{source: files, manifest: {manifest}, "
                       f"landmarks: {cohort / 'landmarks.csv'}}}\n")
    run = run_snakemake(tmp_path / "work", "results/data/split.csv", "--cores", "1",
                        "--configfile", str(ROOT / "config" / "tiny.yaml"), str(overlay))
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert "MissingInputException" not in out and "EmptyDataError" not in out, out[-3000:]
    assert "Error in rule ingest" in out, out[-3000:]
    log = (tmp_path / "work" / "results" / "logs" / "ingest.log").read_text()
    assert manifest_text == "no_annotation" or str(manifest) in log, log
    assert "Traceback" not in out and "Traceback" not in log, out[-3000:]
    if manifest_text == "empty":
        assert "empty" in log, log
    elif manifest_text == "no_annotation":
        line = next(l for l in log.splitlines() if "annotated" in l)
        assert f"landmark file {cohort / 'landmarks.csv'}: 0 annotated landmark(s)" in line
        assert out.count(line.split(" ERROR ")[-1].split(":", 1)[-1]) == 1, out[-3000:]
    else:
        assert "'p 1'" in log and "'pé2'" in log and "not allowed" in log, log


def test_results_page_numbers_are_table1s(tiny_study):
    """results.md (rule results_md) carries table1.csv's numbers, none typed by hand."""
    import re

    from locnet import report

    page = (tiny_study / "tables" / "results.md").read_text(encoding="utf-8")
    first, _, body = page.partition("\n")
    assert first.startswith(report.HEADER_PREFIX) and report.header(body) == first
    t = pd.read_csv(tiny_study / "tables" / "table1.csv")
    pooled = t[t["scope"] == "all"]
    part = page.split("### Test-set error", 1)[1].split("\n### ", 1)[0]
    cells = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in
             re.finditer(r"^\| (.+?) \| (-?[\d.]+) ± ([\d.]+) \|", part, re.M)}
    assert cells == {r.label: (round(r.mean_mm, 2), round(r.sd_mm, 2))
                     for r in pooled.itertuples()}
    for r in pooled.itertuples():
        if isinstance(r.paper_mean_sd, str) and r.paper_mean_sd:
            assert f"| {r.paper_mean_sd} |" in part  # the paper's, in its labelled column
    assert "`config/tiny.yaml`" in page and "### What this run can and cannot conclude" in page
    # the patch baseline's own budget (config/tiny.yaml: 3 epochs) is named beside the shared
    # 2, and so are config.yaml's shifts (the chains' own: none) and leaky units (patch: relu)
    study = next(line for line in page.splitlines() if line.startswith("- Study:"))
    assert "epochs 2, augmentation random shifts up to 10 mm, " in study
    assert "a method's own training settings Patch-based CNN, Noothout 2018: epochs 3" in study
    assert "Loc-Net multi-scale, end to end + noise: no augmentation" in study
    assert "U-Net activation leaky_relu (Patch-based CNN, Noothout 2018: relu)" in study


def test_reference_is_the_training_mean_of_the_study(tiny_study):
    """tables/reference.csv (rule reference): recomputed here from the study's own tables and
    grids, and quoted on the results page."""
    from locnet import reference
    from locnet.pyramid import read_grid

    lm = pd.read_csv(tiny_study / "data" / "landmarks.csv")
    split = pd.read_csv(tiny_study / "data" / "split.csv")
    grids = {c: read_grid(tiny_study / "pyramid" / c) for c in split["case_id"]}
    ref = pd.read_csv(tiny_study / "tables" / "reference.csv")
    test = split.loc[split["subset"] == "test", "case_id"]
    annotated = lm[lm["case_id"].isin(test)].dropna(subset=["x", "y", "z"])
    assert len(ref) == len(annotated) and set(ref["case_id"]) == set(test)
    # the error of landmark l in test case c: | (truth - origin_c) - mean over training cases |
    train = split.loc[split["subset"] == "train", "case_id"]
    for r in ref.itertuples():
        g = [grids[c].world_to_grid_mm(lm.loc[(lm["case_id"] == c) & (lm["landmark"] ==
             r.landmark), ["x", "y", "z"]].to_numpy(float))[0] for c in train]
        g = np.array([v for v in g if np.all(np.isfinite(v))])
        truth = grids[r.case_id].world_to_grid_mm([[r.true_x, r.true_y, r.true_z]])[0]
        assert r.error_mm == pytest.approx(np.linalg.norm(truth - g.mean(axis=0)), abs=1e-6)
    mean = reference.summary(ref)["mean_mm"]
    page = (tiny_study / "tables" / "results.md").read_text(encoding="utf-8")
    assert f"No-image reference (`tables/reference.csv`)" in page
    assert f"is off by {mean:.2f} ± " in page


def test_snakemake_lint_is_clean(tmp_path):
    """`snakemake --lint` finds nothing to complain about (log and benchmark files, script
    paths, no absolute paths, mixed rules and functions...)."""
    run = snakemake_in(ROOT, tmp_path, "--lint", timeout=300)
    text = run.stdout + run.stderr
    assert run.returncode == 0, text[-4000:]
    assert "Congratulations, your workflow is in a good condition!" in text, text[-4000:]


def test_rule_infer_refuses_case_ids_that_leave_its_folder(tiny_study, tmp_path):
    """A row '../../../../infer_escaped' of inference.manifest once wrote
    infer_escaped.mrk.json four levels above results/. The rule checks the manifest's ids
    before it loads the model or writes anything, and names every bad row."""
    import shutil

    work = tmp_path / "deep" / "er" / "still" / "work"
    shutil.copytree(tiny_study.parent, work, symlinks=True)
    res = work / "results"
    method = locnet.methods.PROPOSED
    image = res / "synthetic" / "images" / "case_0000.nii.gz"
    if not image.exists():
        image = sorted((res / "synthetic" / "images").glob("*.nii.gz"))[0]
    manifest = tmp_path / "new_scans.csv"
    manifest.write_text(f"case_id,image\nfine_1,{image}\n../../../../infer_escaped,{image}\n"
                        f"{tmp_path / 'abs_escaped'},{image}\n")
    overlay = tmp_path / "infer.yaml"
    overlay.write_text(f"results: results\ninference: {{manifest: {manifest}}}\n")
    run = run_snakemake(work, f"results/inference/{method}/landmarks.csv", "--cores", "2",
                        "--resources", "gpu=1", "--configfile",
                        str(ROOT / "config" / "tiny.yaml"), str(overlay))
    text = run.stdout + run.stderr
    log = res / "logs" / "infer" / f"{method}.log"
    text += log.read_text() if log.exists() else ""
    assert run.returncode != 0, text[-3000:]
    assert "2 problem(s)" in text and "case id '../../../../infer_escaped' is not allowed" in text
    assert f"line 4: case id '{tmp_path / 'abs_escaped'}' is not allowed" in text
    assert not list(tmp_path.rglob("*escaped*.mrk.json"))
    out = res / "inference" / method
    assert not out.exists() or not list(out.glob("*.mrk.json"))


def test_rule_infer_gives_the_study_its_own_predictions(tiny_study, tmp_path):
    """Rule infer (locnet.inference.predict_batch) on study scans named by their case ids
    reproduces the study's predictions of those cases, writes markups and overlays, and
    takes the noise seed and passes of the study (quality.json)."""
    import json
    import shutil

    work = tmp_path / "work"
    shutil.copytree(tiny_study.parent, work, symlinks=True)
    res = work / "results"
    method = locnet.methods.PROPOSED
    split = pd.read_csv(res / "data" / "split.csv")
    cases = sorted(split.loc[split["subset"] == "test", "case_id"])
    images = {c: res / "synthetic" / "images" / f"{c}.nii.gz" for c in cases}
    manifest = tmp_path / "new_scans.csv"
    manifest.write_text("case_id,image\n" + "".join(f"{c},{p}\n" for c, p in images.items()))
    overlay = tmp_path / "infer.yaml"
    overlay.write_text(f"results: results\ninference: {{manifest: {manifest}}}\n")
    run = run_snakemake(work, f"results/inference/{method}/landmarks.csv", "--cores", "2",
                        "--resources", "gpu=1", "--configfile",
                        str(ROOT / "config" / "tiny.yaml"), str(overlay))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    out = res / "inference" / method
    table = pd.read_csv(out / "landmarks.csv")
    assert sorted(set(table["case_id"])) == cases and len(table) == 2 * len(cases)
    doc = json.loads((out / "landmarks.json").read_text())
    assert doc["seed_source"] == "quality.json" and not doc["failed"]
    for c in cases:
        assert json.loads((out / f"{c}.mrk.json").read_text())["markups"][0]["controlPoints"]
        assert (out / f"{c}_overlay.png").stat().st_size > 1000
    study = pd.read_csv(res / "predictions" / method / "seed0.csv")
    merged = table.merge(study, on=["case_id", "landmark"])
    assert len(merged) == len(table)
    for a in "xyz":
        np.testing.assert_allclose(merged[f"{a}_ras"], merged[a], atol=1e-3)
    np.testing.assert_allclose(merged["conf_volume_mm3_x"], merged["conf_volume_mm3_y"],
                               rtol=1e-3)


def test_a_dead_level_of_a_trained_chain_is_detected_and_reported(tiny_study):
    """A finer Loc-Net whose map holds no mass (its head's bias far below zero) returns its
    crop centre: the per-level table calls it dead and the results page says so."""
    from locnet import level_errors, report, study_predict
    from locnet.inference import load_model_dir

    model = load_model_dir(tiny_study / "models" / "multiscale_e2e" / "seed0").model
    head = model.level_nets[1].net.layers[-1]
    head.bias.assign(np.full(tuple(head.bias.shape), -1.0e4, "float32"))
    split = pd.read_csv(tiny_study / "data" / "split.csv")
    test = split[split["subset"] == "test"]["case_id"].tolist()
    preds = study_predict.predict_cases(
        model, [tiny_study / "pyramid" / c for c in test], dict.fromkeys(test, "test"),
        tiny_study / "data" / "landmarks.csv", model.landmarks, progress=False)
    table = level_errors.level_table({"multiscale_e2e": preds})
    pooled = table[table.scope == "all"].set_index("level")
    assert pooled.loc[1, "dead"] == "seed 0" and pooled.loc[1, "moved_mm"] < 1e-3
    assert any("level 1 returns its crop centre in seed 0" in w
               for w in level_errors.level_warnings(table))
    page = report.results_markdown(pd.read_csv(tiny_study / "tables" / "table1.csv"),
                                   pd.read_csv(tiny_study / "tables" / "statistics.csv"), table)
    assert "level 1 returns its crop centre" in page and "that Loc-Net is dead" in page


def test_the_cohort_built_without_snakemake_is_the_workflows(tiny_study, tmp_path, monkeypatch):
    """benchmarks/device_cohort.py (for a GPU machine without Snakemake) writes the same tables
    and pyramids as the workflow, and its check notices a single changed voxel."""
    import nibabel as nib

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import device_cohort as dc

    out = tmp_path / "res"
    assert dc.main(["--config", str(ROOT / "config.yaml"), str(ROOT / "config" / "tiny.yaml"),
                    "--out", str(out), "--workers", "2", "--compare", str(tiny_study)]) == 0
    level = out / "pyramid" / "case_0003" / "level1.nii"
    img = nib.load(level)
    data = np.asarray(img.dataobj).copy()
    data[2, 3, 4] += 0.5
    nib.save(nib.Nifti1Image(data, img.affine, img.header), level)
    assert dc.compare(out, tiny_study) == ["pyramid/case_0003/level1.nii"]
