"""Predict the validation and test cases with one trained method (thin adapter)."""

from pathlib import Path

import locnet  # first, before TensorFlow: it picks TensorFlow's CPU kernels

locnet.job_threads(snakemake.threads)

import keras  # noqa: E402

import locnet.models  # noqa: E402,F401  (registers the custom layers)
from locnet import fileio, level_errors, quality, study_predict  # noqa: E402
from locnet import split as splitmod  # noqa: E402
from locnet.runlog import job_logging  # noqa: E402

with job_logging(snakemake) as log:
    model = keras.saving.load_model(snakemake.input.model)
    subsets = splitmod.read_split(snakemake.input.split)
    subsets = subsets[subsets["subset"].isin(["val", "test"])]
    pyr = Path(snakemake.params.pyramid_dir)
    table = study_predict.predict_cases(
        model,
        [pyr / c for c in subsets["case_id"]],
        dict(zip(subsets["case_id"], subsets["subset"])),
        snakemake.input.landmarks,
        snakemake.params.landmarks,
        passes=snakemake.params.passes,
        seed=snakemake.params.seed,
        confidence=snakemake.params.confidence,
        estimator=snakemake.params.estimator,
    )
    # the noise settings beside the table (its sidecar, {method}.json), before the table
    # itself, so a finished table always has them; quality_threshold copies them to the model
    quality.write_prediction_settings(
        snakemake.output.predictions, method=snakemake.wildcards.method,
        seed=snakemake.params.seed, passes=snakemake.params.passes,
        confidence=snakemake.params.confidence, estimator=snakemake.params.estimator)
    fileio.write_csv_atomic(table, snakemake.output.predictions)
    test = table[table["subset"] == "test"]
    log.info("%s: test mean error %.2f mm over %d landmarks", snakemake.wildcards.method,
             test["error_mm"].mean(), test["error_mm"].notna().sum())
    # multi-scale chains: the error after each level, and a warning where a finer level
    # does not improve on the coarser one
    levels = level_errors.level_table({snakemake.wildcards.method: table}, subset="test")
    for r in levels[levels["scope"] == "all"].itertuples():
        log.info("%s: test mean error %.2f mm after level %d", r.method, r.mean_mm, r.level)
    for line in level_errors.level_warnings(levels):
        log.warning(line)
