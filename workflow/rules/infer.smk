# Inference on new scans with a trained model, and the quality threshold it uses.
# Needs: RES, NOISY_METHODS, METHOD_ORDER (common.smk); config["inference"] (schema block
# `inference:`). The lead includes this file from the Snakefile after train.smk.


rule quality_threshold:
    """Confidence-volume threshold for the quality flag (ok or review), chosen on the validation set.

    The largest 90% confidence volume such that, among validation landmarks with a volume
    at or below it, at least `target_fraction` have an error of at most `target_error_mm`.
    """
    input:
        predictions=f"{RES}/predictions/{{method}}/seed{{seed}}.csv",
        settings=f"{RES}/predictions/{{method}}/seed{{seed}}.json",
    output:
        quality=f"{RES}/models/{{method}}/seed{{seed}}/quality.json",
    params:
        target_error_mm=config["inference"]["target_error_mm"],
        target_fraction=config["inference"]["target_fraction"],
        estimator=config["evaluation"]["estimator"],
    log:
        f"{RES}/logs/quality_threshold/{{method}}/seed{{seed}}.log",
    localrule: True
    wildcard_constraints:
        method="|".join(sorted(NOISY_METHODS)),
    conda:
        CONDA_ENV
    script:
        "../scripts/quality_threshold.py"


rule infer:
    """Landmarks on the scans of `inference.manifest` with one trained method's deployed
    model (seed 0), through `locnet predict`."""
    input:
        model=lambda wc: f"{deployed_model_dir(wc.method)}/model.keras",
        quality=lambda wc: (
            [f"{deployed_model_dir(wc.method)}/quality.json"] if wc.method in NOISY_METHODS else []
        ),
        manifest=config["inference"].get("manifest") or [],
    output:
        csv=f"{RES}/inference/{{method}}/landmarks.csv",
        json=f"{RES}/inference/{{method}}/landmarks.json",
    params:
        passes=config["inference"].get("passes"),
        seed=config["inference"]["seed"],
        min_coverage=config["inference"]["min_coverage"],
        overlays=config["inference"]["overlays"],
    log:
        f"{RES}/logs/infer/{{method}}.log",
    threads: 8
    resources:
        gpu=1,
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    wildcard_constraints:
        method="|".join(METHOD_ORDER),
    conda:
        CONDA_ENV
    script:
        "../scripts/infer.py"
