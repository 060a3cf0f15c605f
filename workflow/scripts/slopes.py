"""Slopes of predicted against true position per method, seed, landmark and axis (thin
adapter; logic in locnet.slopes)."""

from pathlib import Path

import pandas as pd

from locnet import fileio, slopes
from locnet.pyramid import read_grid
from locnet.runlog import job_logging

with job_logging(snakemake) as log:
    grids = {Path(p).parent.name: read_grid(Path(p).parent) for p in snakemake.input.grids}
    preds = {m: pd.read_csv(p) for m, p in zip(snakemake.params.methods, snakemake.input.predictions)}
    table = slopes.slope_table(preds, grids, subset="test")
    fileio.write_csv_atomic(table, snakemake.output.csv)
    log.info("slopes on the test cases (mean over landmarks and seeds):\n%s",
             slopes.method_slopes(table).round(2).to_string())
