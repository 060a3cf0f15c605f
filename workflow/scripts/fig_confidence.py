"""Fig. 5: confidence volume against error (thin adapter; logic in locnet.figures)."""

import pandas as pd

from locnet import figures, metrics
from locnet.runlog import job_logging

# labels give the spacing of the levels each method reads in this run's config
with job_logging(snakemake), metrics.labels_from_config(snakemake.config):
    pred = pd.read_csv(snakemake.input.predictions)
    figures.confidence_vs_error(
        pred, snakemake.output.png[: -len(".png")], subset="test", level=snakemake.params.confidence
    )
