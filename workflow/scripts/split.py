"""Seeded train/val/test split (thin adapter; logic in locnet.split)."""

from locnet import fileio, split
from locnet.runlog import job_logging

with job_logging(snakemake) as log:
    sp = snakemake.params.split
    ids = fileio.read_manifest(snakemake.input.manifest)["case_id"].tolist()
    df = split.make_split(ids, seed=sp["seed"], proportions=sp["proportions"], counts=sp.get("counts"))
    split.write_split(df, snakemake.output.split, force=True)
    log.info("split: %s", df["subset"].value_counts().to_dict())
