"""Choose the quality threshold of a noisy method on its validation predictions (thin adapter)."""

import pandas as pd

from locnet import quality
from locnet.runlog import job_logging

with job_logging(snakemake) as log:
    preds = pd.read_csv(snakemake.input.predictions)
    result = quality.choose_threshold(
        preds,
        target_error_mm=snakemake.params.target_error_mm,
        target_fraction=snakemake.params.target_fraction,
        subset="val",
    )
    result["method"] = snakemake.wildcards.method
    # inference computes its passes the same way as the study (estimator, confidence level,
    # passes, noise seed: the predictions' sidecar), so that its volumes match the threshold
    # and a study scan gets the study's numbers
    settings = quality.study_settings(snakemake.input.predictions,
                                      confidence=snakemake.config["evaluation"]["confidence"],
                                      estimator=snakemake.params.estimator)
    if "seed" not in settings:
        log.warning("%s has no sidecar with the noise seed: locnet predict will not reproduce "
                    "the study's noisy predictions by default", snakemake.input.predictions)
    result.update(settings)
    # the calibrated volumes of locnet predict: sds scaled so that the ellipsoids hold the
    # truth at the stated level on the validation cases (split conformal)
    quality.add_calibration(result, preds, result.get("confidence", 0.9))
    if not result["calibrated"]:
        log.warning("no calibrated volume at %.0f%%: %s", 100 * result.get("confidence", 0.9),
                    result["calibration_reason"])
    else:
        cov = result["calibration_coverage"]
        log.info("sd scale %.2f (split conformal on %d validation cases; coverage of new "
                 "cases %.0f-%.0f%%, central 95%%)", result["sd_scale"], result["sd_scale_n"],
                 100 * cov["low"], 100 * cov["high"])
    quality.write_quality(result, snakemake.output.quality)
    log.info("%s: threshold %.1f mm^3 (%d of %d validation landmarks accepted)",
             snakemake.wildcards.method, result["threshold_mm3"], result["n_accepted"],
             result["n_landmarks"])
    if result["n_accepted"] == 0:
        log.warning("no confidence volume meets the target (%.1f mm for %.0f%% of landmarks): "
                    "every prediction will be flagged 'review'", result["target_error_mm"],
                    100 * result["target_fraction"])
