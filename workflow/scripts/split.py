"""Seeded train/val/test split (thin adapter; logic in locnet.split)."""

from locnet import split
from locnet.runlog import job_logging

with job_logging(snakemake) as log:
    # refused before anything trains on it (split.check_annotations)
    df, annotated = split.split_cohort(snakemake.input.manifest, snakemake.input.landmarks,
                                       snakemake.params.split, snakemake.output.split,
                                       raw_landmarks=snakemake.params.raw_landmarks)
    log.info("split: %s; annotated landmarks: %s", df["subset"].value_counts().to_dict(),
             annotated)
