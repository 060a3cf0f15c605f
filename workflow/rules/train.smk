# Training: one job per method and seed, on the GPU when there is one. The kept model is the
# epoch with the lowest validation error (averaged over training.selection_window epochs). A
# killed job resumes from its last completed epoch: the resume state lives in
# results/.state/, outside the declared outputs, so Snakemake's clean-up of a failed job's
# outputs does not delete it. Predictions are made per seed and pooled into one table per
# method (column `seed`), which every table and figure reads.


rule train:
    """Train one method of Table 1 with one seed on the training cases, validating each epoch."""
    input:
        pyramids=all_pyramids,
        landmarks=f"{RES}/data/landmarks.csv",
        split=f"{RES}/data/split.csv",
    output:
        model=f"{RES}/models/{{method}}/seed{{seed}}/model.keras",
        metadata=f"{RES}/models/{{method}}/seed{{seed}}/metadata.json",
        history=f"{RES}/models/{{method}}/seed{{seed}}/history.csv",
    params:
        method_cfg=lambda wc: method_cfg(wc.method),
        train_cfg=lambda wc: train_cfg(wc.method),
        grid=grid_cfg(),
        landmarks=config["landmarks"],
        pyramid_dir=f"{RES}/pyramid",
        state_dir=lambda wc: f"{RES}/.state/train/{wc.method}/seed{wc.seed}",
        seed=lambda wc: rule_seed(f"train/{wc.method}/seed{wc.seed}"),
    log:
        f"{RES}/logs/train/{{method}}/seed{{seed}}.log",
    benchmark:
        f"{RES}/benchmarks/train/{{method}}/seed{{seed}}.tsv"
    threads: 8
    resources:
        gpu=1,
        mem_mb=lambda wc, attempt: 12000 * attempt,
        runtime=lambda wc, attempt: 24 * 60 * attempt,
    wildcard_constraints:
        method="|".join(METHOD_ORDER),
    conda:
        CONDA_ENV
    script:
        "../scripts/train.py"


rule predict:
    """Predict every validation and test case with one trained model (world RAS mm).

    The noisy method adds the test-time passes: mean prediction, per-axis sd and the
    90% confidence volume.
    """
    input:
        model=f"{RES}/models/{{method}}/seed{{seed}}/model.keras",
        pyramids=all_pyramids,
        landmarks=f"{RES}/data/landmarks.csv",
        split=f"{RES}/data/split.csv",
    output:
        predictions=f"{RES}/predictions/{{method}}/seed{{seed}}.csv",
        # the noise settings (seed, passes, confidence, estimator) beside the table
        settings=f"{RES}/predictions/{{method}}/seed{{seed}}.json",
    params:
        pyramid_dir=f"{RES}/pyramid",
        landmarks=config["landmarks"],
        passes=lambda wc: config["evaluation"]["passes"] if wc.method in NOISY_METHODS else 0,
        confidence=config["evaluation"]["confidence"],
        estimator=lambda wc: config["evaluation"]["estimator"] if wc.method in NOISY_METHODS else "exact",
        seed=lambda wc: rule_seed(f"predict/{wc.method}/seed{wc.seed}"),
    log:
        f"{RES}/logs/predict/{{method}}/seed{{seed}}.log",
    benchmark:
        f"{RES}/benchmarks/predict/{{method}}/seed{{seed}}.tsv"
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
        "../scripts/predict.py"


rule pool_predictions:
    """One table per method with every seed's predictions (column `seed`), for the tables
    and figures."""
    input:
        predictions=lambda wc: seed_prediction_tables(wc.method),
    output:
        predictions=f"{RES}/predictions/{{method}}.csv",
    params:
        seeds=SEEDS,
    log:
        f"{RES}/logs/pool_predictions/{{method}}.log",
    localrule: True
    wildcard_constraints:
        method="|".join(METHOD_ORDER),
    conda:
        CONDA_ENV
    script:
        "../scripts/pool_predictions.py"
