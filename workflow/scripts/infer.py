"""Landmarks on the scans of the inference manifest with a trained model (thin adapter over
locnet.inference.predict_batch, the code behind `locnet predict`). Failed scans are logged;
the rule fails only if every scan failed, so one bad scan does not block the others' results."""

from pathlib import Path

import locnet  # first, before TensorFlow: it picks TensorFlow's CPU kernels

locnet.job_threads(snakemake.threads)

from locnet import inference  # noqa: E402
from locnet.fileio import read_manifest  # noqa: E402
from locnet.runlog import job_logging  # noqa: E402

with job_logging(snakemake) as log:
    lm = inference.load_model_dir(Path(snakemake.input.model).parent)
    manifest = read_manifest(snakemake.input.manifest)
    scans = [(str(c), Path(p)) for c, p in zip(manifest["case_id"], manifest["image"])]
    # seed and passes: None takes the study's own (quality.json), as `locnet predict` does
    settings, notes = inference.batch_settings(
        lm, passes=snakemake.params.passes, seed=snakemake.params.seed,
        min_coverage=snakemake.params.min_coverage, threads=snakemake.threads,
        overlays=snakemake.params.overlays, quiet=True)
    for note in notes:
        log.warning("%s", note)
    doc = inference.predict_batch(lm, scans, Path(snakemake.output.csv).parent, settings,
                                  progress=False, report=lambda line: log.warning("%s", line))
    n_ok, n_bad = len(doc["cases"]), len(doc["failed"])
    log.info("%s: %d scan(s) predicted, %d failed", snakemake.wildcards.method, n_ok, n_bad)
    if n_ok == 0:
        raise SystemExit("no scan could be predicted; see the log")
