"""Resample one case to its multi-resolution pyramid (thin adapter; logic in locnet.pyramid)."""

from pathlib import Path

from locnet import fileio, pyramid
from locnet.runlog import job_logging

with job_logging(snakemake) as log:
    case = snakemake.wildcards.case
    manifest = fileio.read_manifest(snakemake.input.manifest)
    row = manifest.loc[manifest["case_id"] == case]
    if row.empty:
        raise fileio.InputError(f"case {case}: not in {snakemake.input.manifest}")
    grid = pyramid.build_case(row["image"].iloc[0], snakemake.params.pyramid,
                              out_dir=Path(snakemake.output.grid).parent, case=case,
                              threads=snakemake.threads)
    meta = fileio.read_json(snakemake.output.grid)
    if "scan_window" in meta:
        log.info("case %s: percentile normalisation, [%g, %g] -> [0, 1]", case, *meta["scan_window"])
    log.info("case %s: %d levels, finest %s at %.3f mm", case, grid.levels, grid.shape, grid.spacing)
