"""Error after each level of the multi-scale chains (thin adapter; logic in locnet.level_errors)."""

import pandas as pd

from locnet import level_errors, metrics
from locnet.runlog import job_logging

# labels give the spacing of the levels each method reads in this run's config
with job_logging(snakemake) as log, metrics.labels_from_config(snakemake.config):
    preds = {m: pd.read_csv(p) for m, p in zip(snakemake.params.methods, snakemake.input.predictions)}
    table = level_errors.level_table(preds, subset="test", landmarks=snakemake.params.landmarks)
    level_errors.write_level_table(table, snakemake.output.csv, snakemake.output.md, subset="test")
    for line in level_errors.level_warnings(table):
        log.warning(line)
    log.info("\n%s", level_errors.level_markdown(table, subset="test"))
