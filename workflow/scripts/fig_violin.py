"""Fig. 4: violin plots of the error per method (thin adapter; logic in locnet.figures)."""

import pandas as pd

from locnet import figures, metrics
from locnet.runlog import job_logging

# labels give the spacing of the levels each method reads in this run's config
with job_logging(snakemake), metrics.labels_from_config(snakemake.config):
    preds = {m: pd.read_csv(p) for m, p in zip(snakemake.params.methods, snakemake.input.predictions)}
    figures.violin_errors(preds, snakemake.output.png[: -len(".png")], subset="test")
