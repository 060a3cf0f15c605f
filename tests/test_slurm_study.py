"""The tiny study on a real one-node SLURM cluster through profiles/slurm (root only).

Checks that the GPU rules ran as SLURM jobs that were granted the GPU, that the light
rules stayed local, and that the results equal those of the local run of the same study.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import locnet.methods
import locnet.metrics

sys.path.insert(0, str(Path(__file__).resolve().parent / "slurm"))
import cluster as harness  # noqa: E402  (tests/slurm/cluster.py)
from cluster import slurm_cluster  # noqa: E402,F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
GPU_RULES = {"train", "predict"}
LOCAL_RULES = {"table1", "statistics", "fig_violin", "fig_confidence", "fig_training_curves",
               "split", "synthetic_cohort"}


@pytest.mark.slurm
def test_tiny_study_on_slurm(slurm_cluster, tiny_study, tmp_path):
    # one training seed: this test is about the executor (the seed wildcard's jobs are
    # tested locally), and CI's time is short; seed 0 is the same job as the local run's
    one_seed = tmp_path / "one_seed.yaml"
    one_seed.write_text("training:\n  seeds: 1\n")
    run = harness.run_snakemake_on_slurm(
        workdir=tmp_path,
        snakefile=ROOT / "Snakefile",
        configfile=[ROOT / "config" / "tiny.yaml", one_seed],
        extra_args=["--config", "results=results"],
        timeout=1500,
    )
    rules = run.submitted_rules()
    assert GPU_RULES | {"pyramid", "synthetic_case", "ingest"} <= rules, rules
    assert not rules & LOCAL_RULES, rules & LOCAL_RULES

    # Each GPU job asked SLURM for the GPU (SLURM's own record of the job) and ran with it
    # (the job's environment, logged by the job itself into its rule log).
    results = tmp_path / "results"
    for rule in GPU_RULES:
        jobs = run.jobs_of(rule)
        assert len(jobs) == 6, (rule, len(jobs))  # 6 methods x 1 seed
        # each job's rule log (logs/<rule>/<method>/seed<s>.log) names its SLURM job
        logs = {p: p.read_text() for p in (results / "logs" / rule).glob("*/seed*.log")}
        assert len(logs) == len(jobs), sorted(logs)
        for job in jobs:
            record = subprocess.run(["scontrol", "-d", "show", "job", job.slurm_jobid],
                                    capture_output=True, text=True, timeout=30).stdout
            assert "JobState=COMPLETED" in record, record
            assert re.search(r"TresPer(Job|Node)=gres[:/]gpu[:=]1", record), record
            pattern = (rf"SLURM job {job.slurm_jobid} on \S+: CUDA_VISIBLE_DEVICES=(\S+) "
                       r"SLURM_GPUS_ON_NODE=(\d+)")
            found = [m for log in logs.values() if (m := re.search(pattern, log))]
            assert len(found) == 1, (rule, job.slurm_jobid, job.wildcards)
            m = found[0]
            assert m.group(1) != "none" and int(m.group(2)) == 1, m.group(0)

    # same study, same seeds, same thread count: the results equal the local run's
    for method in locnet.methods.KEYS:
        local = pd.read_csv(tiny_study / "predictions" / method / "seed0.csv")
        slurm = pd.read_csv(results / "predictions" / method / "seed0.csv")
        assert list(local["case_id"]) == list(slurm["case_id"])
        np.testing.assert_allclose(slurm[["x", "y", "z"]], local[["x", "y", "z"]], atol=1e-3,
                                   err_msg=method)
    t_slurm = pd.read_csv(results / "tables" / "table1.csv")
    assert set(t_slurm["n_seeds"]) == {1}
    for method in locnet.methods.KEYS:
        local = pd.read_csv(tiny_study / "predictions" / method / "seed0.csv")
        row = t_slurm[(t_slurm["scope"] == "all") & (t_slurm["method"] == method)].iloc[0]
        assert row["mean_mm"] == pytest.approx(
            local.loc[local["subset"] == "test", "error_mm"].mean(), abs=1e-3)
