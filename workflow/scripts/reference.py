"""The no-image reference: test landmarks at the training mean position in grid mm (thin
adapter; logic in locnet.reference)."""

from pathlib import Path

from locnet import fileio, reference, split
from locnet.pyramid import read_grid
from locnet.runlog import job_logging

with job_logging(snakemake) as log:
    grids = {Path(p).parent.name: read_grid(Path(p).parent) for p in snakemake.input.grids}
    errors = reference.mean_position_errors(
        fileio.read_landmarks(snakemake.input.landmarks),
        split.read_split(snakemake.input.split),
        grids,
    )
    errors = errors[errors["landmark"].isin(snakemake.params.landmarks)]
    fileio.write_csv_atomic(errors, snakemake.output.csv)
    s = reference.summary(errors)
    log.info("no-image reference on %d test landmarks (%d cases): mean %.2f mm, sd %.2f, "
             "median %.2f", s["n"], s["n_cases"], s["mean_mm"], s["sd_mm"], s["median_mm"])
