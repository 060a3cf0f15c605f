"""Landmarks on the scans of the inference manifest with a trained model (thin adapter over
locnet.inference.predict_batch, the code behind `locnet predict`). Failed scans are logged;
the rule fails only if every scan failed, so one bad scan does not block the others' results."""

from pathlib import Path

import locnet  # first, before TensorFlow: it picks TensorFlow's CPU kernels

locnet.job_threads(snakemake.threads)

from locnet import inference  # noqa: E402
from locnet.fileio import InputError  # noqa: E402
from locnet.runlog import job_logging  # noqa: E402

with job_logging(snakemake) as log:
    # the manifest's case ids name files in the output folder: every problem (an id that
    # would write outside it, a repeated id, an empty cell) stops the rule before anything
    # is loaded or written
    items, problems = inference.read_scan_manifest(snakemake.input.manifest)
    if problems:
        raise InputError(f"inference.manifest {snakemake.input.manifest}: {len(problems)} "
                         "problem(s), nothing was predicted:\n  " + "\n  ".join(problems))
    scans = [(case, path) for case, path, _ in items]
    out = Path(snakemake.output.csv).parent
    # the folder is the rule's: a previous run's per-case files go, so that landmarks.csv
    # lists every .mrk.json beside it
    for path in inference.remove_previous_outputs(out, whole_folder=True):
        log.info("removed %s (previous run)", path)
    lm = inference.load_model_dir(Path(snakemake.input.model).parent)
    # seed and passes: None takes the study's own (quality.json), as `locnet predict` does
    settings, notes = inference.batch_settings(
        lm, passes=snakemake.params.passes, seed=snakemake.params.seed,
        min_coverage=snakemake.params.min_coverage, threads=snakemake.threads,
        overlays=snakemake.params.overlays, quiet=True)
    for note in notes:
        log.warning("%s", note)
    doc = inference.predict_batch(lm, scans, out, settings,
                                  progress=False, report=lambda line: log.warning("%s", line))
    n_ok, n_bad = len(doc["cases"]), len(doc["failed"])
    log.info("%s: %d scan(s) predicted, %d failed", snakemake.wildcards.method, n_ok, n_bad)
    if n_ok == 0:
        raise SystemExit("no scan could be predicted; see the log")
