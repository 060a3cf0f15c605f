"""Manifest and landmark table of the synthetic cohort, laid out like a user's raw data."""

from pathlib import Path


from locnet import phantom
from locnet.runlog import job_logging

with job_logging(snakemake) as log:
    cfg = dict(snakemake.params.cfg)
    out_dir = Path(snakemake.output.manifest).parent
    manifest, landmarks = phantom.write_tables(cfg["n_cases"], cfg, out_dir)
    log.info("wrote %s and %s (%d cases)", manifest, landmarks, cfg["n_cases"])
