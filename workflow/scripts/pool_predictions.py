"""Pool the per-seed prediction tables of one method into one table with a `seed` column
(thin adapter; logic in locnet.metrics)."""

import pandas as pd

from locnet import fileio, metrics
from locnet.runlog import job_logging

with job_logging(snakemake) as log:
    tables = {int(s): pd.read_csv(p) for s, p in zip(snakemake.params.seeds,
                                                     snakemake.input.predictions)}
    pooled = metrics.pool_seeds(tables)
    fileio.write_csv_atomic(pooled, snakemake.output.predictions)
    for s, df in tables.items():
        test = metrics.select_subset(df, "test")
        log.info("%s seed %d: test mean error %.2f mm", snakemake.wildcards.method, s,
                 metrics.errors_of(test).mean())
