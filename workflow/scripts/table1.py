"""Table 1 from the prediction tables (thin adapter; logic in locnet.metrics)."""

import pandas as pd

from locnet import metrics
from locnet.runlog import job_logging

with job_logging(snakemake) as log:
    preds = {m: pd.read_csv(p) for m, p in zip(snakemake.params.methods, snakemake.input.predictions)}
    # labels give the spacing of the levels each method reads in this run's config
    table = metrics.table1(preds, subset="test", landmarks=snakemake.params.landmarks,
                           config=snakemake.config)
    prefix = snakemake.output.csv[: -len(".csv")]
    metrics.write_table1(table, prefix, subset="test")
    log.info("Table 1:\n%s", metrics.table1_markdown(table, subset="test"))
