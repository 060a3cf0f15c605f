"""Statistics of the study (thin adapter; logic in locnet.stats)."""

import pandas as pd

from locnet import io, stats
from locnet.runlog import job_logging

with job_logging(snakemake) as log:
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
    io.write_text_atomic(summary, snakemake.output.md)
    log.info("\n%s", summary)
