"""Training curves of every method (thin adapter; logic in locnet.figures)."""

import pandas as pd

from locnet import figures
from locnet.runlog import job_logging

with job_logging(snakemake):
    hist = {m: pd.read_csv(p) for m, p in zip(snakemake.params.methods, snakemake.input.histories)}
    figures.training_curves(hist, snakemake.output.png[: -len(".png")])
