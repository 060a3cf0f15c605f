"""Check the cohort and write the normalised tables (thin adapter; logic in locnet.ingest)."""

from pathlib import Path

from locnet import ingest
from locnet.runlog import job_logging

with job_logging(snakemake) as log:
    sp = snakemake.params.split
    # the pyramid block decides the finest grid, the intensity window and the thinnest usable
    # scan; from the rule's params when it passes them, else from the validated config
    pyramid = snakemake.params.get("pyramid") or snakemake.config["pyramid"]
    manifest, landmarks = ingest.ingest(
        snakemake.input.manifest,
        snakemake.input.landmarks,
        landmark_names=list(snakemake.params.landmark_names),
        coordinate_system=snakemake.params.coordinate_system,
        out_manifest=snakemake.output.manifest,
        out_landmarks=snakemake.output.landmarks,
        min_cases=3,
        split_counts=sp.get("counts"),
        threads=snakemake.threads,
        # a table with no annotated landmark at all trains nothing: stop here, naming it
        min_annotated=1,
        # each case's content digest, rewritten only when it changed: the pyramid of a case
        # depends on it, so a scan is rebuilt when its content changes, not its time stamp
        digest_dir=Path(snakemake.output.digests[0]).parent if snakemake.output.digests else None,
        **ingest.pyramid_checks(pyramid),
    )
    n_missing = int(landmarks[["x", "y", "z"]].isna().any(axis=1).sum())
    log.info("%d cases, %d landmarks (%d not annotated)", len(manifest), len(landmarks), n_missing)
