"""Fig. 4: violin plots of the error per method (thin adapter; logic in locnet.figures)."""

import pandas as pd

from locnet import figures
from locnet.runlog import job_logging

with job_logging(snakemake):
    preds = {m: pd.read_csv(p) for m, p in zip(snakemake.params.methods, snakemake.input.predictions)}
    figures.violin_errors(preds, snakemake.output.png[: -len(".png")], subset="test")
