"""SLURM profile and cluster harness.

test_workflow_on_slurm (marker `slurm`) installs and starts a real one-node SLURM cluster
(.ci/slurm-setup.sh, root only; skipped otherwise), runs the small test workflow in
tests/slurm/workflow/ through profiles/slurm, checks where and how every job ran, and stops
the cluster again. The other tests need no cluster: they pin down how the local default
profile and Snakemake's global resources behave.

    pytest -m slurm tests/test_slurm.py        # the cluster test only
    pytest -m "not slurm"                      # everything but the cluster test
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "slurm"))
import cluster as harness  # noqa: E402  (tests/slurm/cluster.py)
from cluster import slurm_cluster  # noqa: E402,F401  (pytest finds fixtures among globals)

REPO_ROOT = harness.REPO_ROOT
TEST_SNAKEFILE = harness.TEST_WORKFLOW / "Snakefile"


def _read_kv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines at the top of a job's output file."""
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("---"):
            break
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


def _interval(path: Path) -> tuple[float, float]:
    kv = _read_kv(path)
    return float(kv["start"]), float(kv["end"])


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _snakemake_local(args: list[str], cwd: Path, timeout: float = 120):
    env = harness._clean_env()
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


TRAIN_TARGETS = ["results/train_a.txt", "results/train_b.txt"]


# ---------------------------------------------------------------------------------------
# local behaviour of the profiles (no cluster needed)
# ---------------------------------------------------------------------------------------
def test_default_profile_limits_gpu_jobs_to_one(tmp_path):
    """Started from the repository root, Snakemake picks up profiles/default by itself, and
    its `resources: gpu=1` lets only one gpu=1 job run at a time, with no --resources given."""
    out = _snakemake_local(
        ["-s", str(TEST_SNAKEFILE), "-d", str(tmp_path), "--cores", "2",
         "--config", "train_seconds=2", "flaky=false", "--", *TRAIN_TARGETS],
        cwd=REPO_ROOT,
    )
    assert "workflow specific profile profiles/default" in out
    assert re.search(r"Provided resources: .*gpu", out), out
    a = _interval(tmp_path / "results/train_a.txt")
    b = _interval(tmp_path / "results/train_b.txt")
    assert not _overlap(a, b), (a, b)


def test_forgotten_gpu_resource_is_unlimited(tmp_path):
    """Without the default profile and without --resources gpu=1, Snakemake does not limit
    `gpu` at all: both GPU jobs run at the same time (the reason for profiles/default)."""
    _snakemake_local(
        ["-s", str(TEST_SNAKEFILE), "-d", str(tmp_path), "--cores", "2",
         "--workflow-profile", "none",
         "--config", "train_seconds=4", "flaky=false", "--", *TRAIN_TARGETS],
        cwd=tmp_path,
    )
    a = _interval(tmp_path / "results/train_a.txt")
    b = _interval(tmp_path / "results/train_b.txt")
    assert _overlap(a, b), (a, b)


def test_cpu_profile_runs_gpu_rules_side_by_side_on_one_thread(tmp_path):
    """profiles/cpu (no GPU): no `gpu` limit, and the rules the study declares `threads: 8`
    for get one thread each, so two training jobs share two cores at the same time."""
    out = _snakemake_local(
        ["-s", str(TEST_SNAKEFILE), "-d", str(tmp_path), "--cores", "2",
         "--workflow-profile", str(REPO_ROOT / "profiles/cpu"),
         "--config", "train_seconds=4", "flaky=false", "train_threads=8", "--", *TRAIN_TARGETS],
        cwd=REPO_ROOT,
    )
    assert "workflow specific profile" in out and "profiles/cpu" in out, out
    a = _interval(tmp_path / "results/train_a.txt")
    b = _interval(tmp_path / "results/train_b.txt")
    assert _overlap(a, b), (a, b)
    for name in ("a", "b"):
        assert _read_kv(tmp_path / f"results/train_{name}.txt")["threads"] == "1"


@pytest.mark.parametrize("profile", ["profiles/default", "profiles/cpu"])
def test_local_profiles_do_not_poll_the_scheduler_every_second(tmp_path, profile):
    """Snakemake's default `--max-jobs-per-timespan 100/1s` re-runs the job selection every
    second while jobs run; each round re-checks every waiting job's inputs (for the study's
    training jobs: every pyramid file). The local profiles stretch that to 10 s. Counted on
    two 6-second jobs in a row (one core): the rounds Snakemake logs with --verbose."""
    def rounds(extra, workdir):
        out = _snakemake_local(
            ["-s", str(TEST_SNAKEFILE), "-d", str(workdir), "--cores", "1", "--verbose",
             "--workflow-profile", str(REPO_ROOT / profile), *extra,
             "--config", "train_seconds=6", "flaky=false", "--", *TRAIN_TARGETS],
            cwd=REPO_ROOT,
        )
        return len(re.findall(r"^Ready jobs: \d+", out, flags=re.M))

    ours = rounds([], tmp_path / "profile")
    every_second = rounds(["--max-jobs-per-timespan", "100/1s"], tmp_path / "default")
    assert every_second >= 10, every_second
    assert ours <= every_second / 2, (ours, every_second)


@pytest.mark.parametrize("gpu_env, fake_smi, expected", [
    ({}, None, "--workflow-profile profiles/cpu"),
    ({}, "exit 0", "--workflow-profile profiles/default --resources gpu=1"),
    ({}, "exit 9", "--workflow-profile profiles/cpu"),
    ({"LOCNET_GPU": "1"}, None, "--workflow-profile profiles/default --resources gpu=1"),
    ({"LOCNET_GPU": "0"}, "exit 0", "--workflow-profile profiles/cpu"),
])
def test_local_profile_follows_the_machine(tmp_path, gpu_env, fake_smi, expected):
    """scripts/local-profile.sh: profiles/default with gpu=1 where nvidia-smi works (or
    LOCNET_GPU=1), profiles/cpu otherwise (or LOCNET_GPU=0); nvidia-smi is faked on PATH."""
    env = harness._clean_env()
    env.pop("LOCNET_GPU", None)
    env.update(gpu_env)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if fake_smi is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{fake_smi}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    out = subprocess.run(["bash", str(REPO_ROOT / "scripts/local-profile.sh")], env=env,
                         stdout=subprocess.PIPE, text=True, check=True).stdout.strip()
    assert out == expected


def test_study_script_uses_the_cpu_profile_without_a_gpu(tmp_path):
    """scripts/study.sh on this (GPU-less) machine: Snakemake runs with profiles/cpu, so the
    training jobs are planned with one thread each (a dry run of the default study)."""
    if not (REPO_ROOT / ".venv" / ".locnet-installed").exists():
        pytest.skip("scripts/study.sh would install the venv first")
    env = harness._clean_env()
    env["LOCNET_GPU"] = "0"
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts/study.sh"), "-n", "--cores", "2",
         "--config", f"results={tmp_path}/results"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "workflow specific profile profiles/cpu" in proc.stdout, proc.stdout[:2000]
    assert not re.search(r"Provided resources: .*gpu", proc.stdout), proc.stdout[:2000]


def test_slurm_profile_dry_run(tmp_path):
    """profiles/slurm parses, and the rule's own resources (gpu=1, mem_mb) reach the jobs."""
    out = _snakemake_local(
        ["-s", str(TEST_SNAKEFILE), "-d", str(tmp_path), "-n",
         "--profile", str(harness.SLURM_PROFILE), "--workflow-profile", "none"],
        cwd=REPO_ROOT,
    )
    assert "Using profile" in out and "workflow specific profile" not in out
    train = [b for b in out.split("\nrule ") if b.startswith("train:")]
    assert len(train) == 2, out
    for block in train:
        assert re.search(r"resources: .*mem_mb=300\b.*gpu=1", block), block
    prepare = next(b for b in out.split("\nrule ") if b.startswith("prepare:"))
    assert "gpu" not in prepare.split("resources:")[1].splitlines()[0]


# ---------------------------------------------------------------------------------------
# the real cluster
# ---------------------------------------------------------------------------------------
@pytest.mark.slurm
def test_workflow_on_slurm(slurm_cluster, tmp_path):
    snakefile = harness.copy_test_workflow(tmp_path / "wf")
    workdir = tmp_path / "wf"
    run = harness.run_snakemake_on_slurm(workdir, snakefile, timeout=300)
    print(f"snakemake on SLURM took {run.seconds:.1f} s "
          f"(cluster start {slurm_cluster['start_seconds']:.1f} s)")
    results = workdir / "results"
    squeue = run.squeue()

    # Every non-local job went through sbatch; the local rule did not.
    by_rule = {r: run.jobs_of(r) for r in ("prepare", "train", "flaky", "report", "all")}
    assert len(by_rule["prepare"]) == 1, run.jobs
    assert sorted(j.wildcards for j in by_rule["train"]) == ["a", "b"], run.jobs
    assert by_rule["report"] == [] and by_rule["all"] == [], run.jobs

    # The CPU job ran inside its SLURM job, without a GPU.
    prepare = _read_kv(results / "prepare.txt")
    assert prepare["SLURM_JOB_ID"] == by_rule["prepare"][0].slurm_jobid
    assert prepare["SLURM_JOB_PARTITION"] == slurm_cluster["partition"]
    assert prepare["CUDA_VISIBLE_DEVICES"] == "none"

    # The GPU jobs were granted the GPU: gres in scontrol, GPU variables in the environment.
    train_ids = {}
    for job in by_rule["train"]:
        path = results / f"train_{job.wildcards}.txt"
        text = path.read_text()
        kv = _read_kv(path)
        assert kv["SLURM_JOB_ID"] == job.slurm_jobid, text
        train_ids[job.wildcards] = job.slurm_jobid
        assert kv["CUDA_VISIBLE_DEVICES"] == "0", text
        assert kv["SLURM_GPUS_ON_NODE"] == "1", text
        assert re.search(r"^\s*JOB_GRES=gpu:1\s*$", text, re.M), text
        assert re.search(r"GRES=gpu:1\(IDX:0\)", text), text
        assert re.search(r"TresPer(Job|Node)=gres:gpu:1", text), text
        assert "Partition=debug" in text
        assert job.log.exists(), job.log  # SLURM log kept under .snakemake/slurm_logs
    # ... and as there is one GPU, SLURM ran them one after the other.
    assert not _overlap(_interval(results / "train_a.txt"),
                        _interval(results / "train_b.txt"))

    # Retry with more memory: attempt 1 failed as a SLURM job, attempt 2 got twice the memory.
    flaky_jobs = by_rule["flaky"]
    assert len(flaky_jobs) == 2, run.jobs
    first, second = (squeue.get(j.slurm_jobid, {}) for j in flaky_jobs)
    assert first.get("state") == "FAILED" and first.get("mem") == "200M", squeue
    assert second.get("state") == "COMPLETED" and second.get("mem") == "400M", squeue
    assert _read_kv(results / "flaky.txt")["mem_mb"] == "400"

    # Time limits come from the rules' runtime (minutes).
    assert squeue[by_rule["prepare"][0].slurm_jobid]["time_limit"] == "5:00", squeue
    assert squeue[train_ids["a"]]["time_limit"] == "10:00", squeue

    # The local rule ran on the submit host, outside SLURM, and saw every job's output.
    report = (results / "report.txt").read_text()
    assert _read_kv(results / "report.txt")["SLURM_JOB_ID"] == "none", report
    for slurm_id in [by_rule["prepare"][0].slurm_jobid, *train_ids.values()]:
        assert f"SLURM_JOB_ID={slurm_id}" in report

    assert run.seconds < 240, f"too slow: {run.seconds:.0f} s"
