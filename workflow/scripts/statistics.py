"""Statistics of the study (thin adapter; logic in locnet.stats)."""

import pandas as pd

from locnet import fileio, metrics, stats
from locnet.runlog import job_logging

# labels give the spacing of the levels each method reads in this run's config
with job_logging(snakemake) as log, metrics.labels_from_config(snakemake.config):
    ev = snakemake.params.evaluation
    preds = {m: pd.read_csv(p) for m, p in zip(snakemake.params.methods, snakemake.input.predictions)}
    table = stats.statistics_table(
        preds,
        subset="test",
        level=ev["confidence"],
        error_threshold_mm=ev["error_threshold_mm"],
        n_boot=ev["bootstrap"],
        seed=snakemake.params.seed,
        landmarks=snakemake.params.landmarks,
    )
    stats.write_statistics(table, snakemake.output.csv)
    summary = stats.statistics_summary(table)
    fileio.write_text_atomic(summary, snakemake.output.md)
    log.info("\n%s", summary)
