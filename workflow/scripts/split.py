"""Seeded train/val/test split (thin adapter; logic in locnet.split)."""

from locnet import fileio, split
from locnet.runlog import job_logging

with job_logging(snakemake) as log:
    sp = snakemake.params.split
    ids = fileio.read_manifest(snakemake.input.manifest)["case_id"].tolist()
    df = split.make_split(ids, seed=sp["seed"], proportions=sp["proportions"], counts=sp.get("counts"))
    # refused before anything trains on it: a subset without annotated landmarks would
    # train with loss 0, or keep the untrained epoch 0 on a NaN validation error
    annotated = split.check_annotations(df, fileio.read_landmarks(snakemake.input.landmarks),
                                        snakemake.input.landmarks,
                                        source=snakemake.params.raw_landmarks)
    split.write_split(df, snakemake.output.split, force=True)
    log.info("split: %s; annotated landmarks: %s", df["subset"].value_counts().to_dict(),
             annotated)
