"""Check the cohort and write the normalised tables (thin adapter; logic in locnet.ingest)."""

from pathlib import Path

from locnet import ingest
from locnet.runlog import job_logging

with job_logging(snakemake) as log:
    # the pyramid block decides the finest grid, the intensity window and the thinnest usable
    # scan; from the rule's params when it passes them, else from the validated config
    manifest, landmarks = ingest.ingest_cohort(
        snakemake.input.manifest,
        snakemake.input.landmarks,
        landmark_names=snakemake.params.landmark_names,
        coordinate_system=snakemake.params.coordinate_system,
        split_cfg=snakemake.params.split,
        pyramid_cfg=snakemake.params.get("pyramid") or snakemake.config["pyramid"],
        out_manifest=snakemake.output.manifest,
        out_landmarks=snakemake.output.landmarks,
        threads=snakemake.threads,
        # each case's content digest, rewritten only when it changed: the pyramid of a case
        # depends on it, so a scan is rebuilt when its content changes, not its time stamp
        digest_dir=Path(snakemake.output.digests[0]).parent if snakemake.output.digests else None,
    )
    n_missing = int(landmarks[["x", "y", "z"]].isna().any(axis=1).sum())
    log.info("%d cases, %d landmarks (%d not annotated)", len(manifest), len(landmarks), n_missing)
