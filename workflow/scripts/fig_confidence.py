"""Fig. 5: confidence volume against error (thin adapter; logic in locnet.figures)."""

import pandas as pd

from locnet import figures
from locnet.runlog import job_logging

with job_logging(snakemake):
    pred = pd.read_csv(snakemake.input.predictions)
    figures.confidence_vs_error(
        pred, snakemake.output.png[: -len(".png")], subset="test", level=snakemake.params.confidence
    )
