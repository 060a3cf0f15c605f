"""Training curves of every method and seed (thin adapter; logic in locnet.figures)."""

import pandas as pd

from locnet import figures, metrics
from locnet.runlog import job_logging

# labels give the spacing of the levels each method reads in this run's config
with job_logging(snakemake), metrics.labels_from_config(snakemake.config):
    runs: dict[str, list[pd.DataFrame]] = {}
    for (method, seed), path in zip(snakemake.params.runs, snakemake.input.histories):
        runs.setdefault(method, []).append(pd.read_csv(path).assign(seed=int(seed)))
    hist = {m: pd.concat(parts, ignore_index=True) for m, parts in runs.items()}
    figures.training_curves(hist, snakemake.output.png[: -len(".png")])
