"""Publish the cohort tables that ingest checked and staged (byte copies, written atomically)."""

import shutil

from locnet import fileio
from locnet.runlog import job_logging

with job_logging(snakemake) as log:
    for key in ("manifest", "landmarks"):
        src, dst = snakemake.input[key], snakemake.output[key]
        with fileio.atomic_write(dst) as tmp:
            shutil.copyfile(src, tmp)
        log.info("%s -> %s", src, dst)
