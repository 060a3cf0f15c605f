"""The tiny study on a real one-node SLURM cluster through profiles/slurm (root only).

Checks that the GPU rules ran as SLURM jobs that were granted the GPU, that the light
rules stayed local, and that the results equal those of the local run of the same study.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

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
    run = harness.run_snakemake_on_slurm(
        workdir=tmp_path,
        snakefile=ROOT / "Snakefile",
        configfile=ROOT / "config" / "tiny.yaml",
        extra_args=["--config", "results=results"],
        timeout=1500,
    )
    rules = run.submitted_rules()
    assert GPU_RULES | {"pyramid", "synthetic_case", "ingest"} <= rules, rules
    assert not rules & LOCAL_RULES, rules & LOCAL_RULES

    # SLURM's own record of each GPU job: it asked for, and was granted, the gpu resource
    queue = run.squeue()
    for rule in GPU_RULES:
        jobs = run.jobs_of(rule)
        assert len(jobs) == 6, (rule, len(jobs))
        for job in jobs:
            rec = queue[job.slurm_jobid]
            assert "gpu" in rec["tres_per_node"], (rule, rec)
            assert rec["state"] == "COMPLETED", (rule, rec)

    # same study, same seeds, same thread count: the results equal the local run's
    results = tmp_path / "results"
    for method in locnet.metrics.METHODS:
        local = pd.read_csv(tiny_study / "predictions" / f"{method}.csv")
        slurm = pd.read_csv(results / "predictions" / f"{method}.csv")
        assert list(local["case_id"]) == list(slurm["case_id"])
        np.testing.assert_allclose(slurm[["x", "y", "z"]], local[["x", "y", "z"]], atol=1e-3,
                                   err_msg=method)
    t_local = pd.read_csv(tiny_study / "tables" / "table1.csv")
    t_slurm = pd.read_csv(results / "tables" / "table1.csv")
    np.testing.assert_allclose(t_slurm["mean_mm"], t_local["mean_mm"], atol=1e-3)
