# Evaluation: Table 1, the statistics, and the figures built from the prediction tables.
# Quick CPU jobs, run on the submit host on a cluster (`localrule: True`), except fig_heatmaps,
# which loads two trained models and runs as a job of its own.


rule table1:
    """Table 1: error summary per method (paper order), pooled and per landmark."""
    input:
        predictions=lambda wc: prediction_tables(),
    output:
        csv=report(f"{RES}/tables/table1.csv", caption="../report/table1.rst", category="Tables"),
        md=f"{RES}/tables/table1.md",
        tex=f"{RES}/tables/table1.tex",
    params:
        methods=lambda wc: enabled_methods(),
        landmarks=config["landmarks"],
    log:
        f"{RES}/logs/table1.log",
    localrule: True
    conda:
        CONDA_ENV
    script:
        "../scripts/table1.py"


rule reference:
    """The no-image reference: each test landmark at the training cases' mean position in
    grid mm. A method near its error learned little from the images."""
    input:
        landmarks=f"{RES}/data/landmarks.csv",
        split=f"{RES}/data/split.csv",
        grids=lambda wc: [f"{RES}/pyramid/{c}/grid.json" for c in case_ids()],
    output:
        csv=f"{RES}/tables/reference.csv",
    params:
        landmarks=config["landmarks"],
    log:
        f"{RES}/logs/reference.log",
    localrule: True
    conda:
        CONDA_ENV
    script:
        "../scripts/reference.py"


rule slopes:
    """Per method, seed, landmark and axis: the slope of the predicted against the true
    position in grid mm on the test cases (1: follows the landmark; 0: one position for all)."""
    input:
        predictions=lambda wc: prediction_tables(),
        grids=lambda wc: [f"{RES}/pyramid/{c}/grid.json" for c in case_ids()],
    output:
        csv=f"{RES}/tables/slopes.csv",
    params:
        methods=lambda wc: enabled_methods(),
    log:
        f"{RES}/logs/slopes.log",
    localrule: True
    conda:
        CONDA_ENV
    script:
        "../scripts/slopes.py"


rule level_errors:
    """Error after each level of the multi-scale chains; warns where a finer level is worse."""
    input:
        predictions=lambda wc: [f"{RES}/predictions/{m}.csv" for m in multiscale_methods()],
    output:
        csv=report(
            f"{RES}/tables/level_errors.csv",
            caption="../report/level_errors.rst",
            category="Tables",
        ),
        md=f"{RES}/tables/level_errors.md",
    params:
        methods=lambda wc: multiscale_methods(),
        landmarks=config["landmarks"],
    log:
        f"{RES}/logs/level_errors.log",
    localrule: True
    conda:
        CONDA_ENV
    script:
        "../scripts/level_errors.py"


rule statistics:
    """Paired tests, uncertainty-vs-error correlation, calibration, bootstrap CIs."""
    input:
        predictions=lambda wc: prediction_tables(),
    output:
        csv=report(
            f"{RES}/tables/statistics.csv", caption="../report/statistics.rst", category="Tables"
        ),
        md=f"{RES}/tables/statistics.md",
    params:
        methods=lambda wc: enabled_methods(),
        landmarks=config["landmarks"],
        seed=rule_seed("statistics"),
        evaluation=config["evaluation"],
    log:
        f"{RES}/logs/statistics.log",
    localrule: True
    conda:
        CONDA_ENV
    script:
        "../scripts/statistics.py"


rule results_md:
    """The results page (markdown) from the run's tables, with the run's config, commit,
    machine and training time; the README's results block is a copy of it."""
    input:
        table1=f"{RES}/tables/table1.csv",
        statistics=f"{RES}/tables/statistics.csv",
        reference=f"{RES}/tables/reference.csv",
        slopes=f"{RES}/tables/slopes.csv",
        level_errors=level_errors_input,
    output:
        md=f"{RES}/tables/results.md",
    params:
        train_benchmarks=f"{RES}/benchmarks/train",
        models=f"{RES}/models",
        methods=lambda wc: enabled_methods(),
        seeds=SEEDS,
        checkout=workflow.basedir,
        configfiles=lambda wc: results_configfiles(),
        config_args=lambda wc: results_config_args(),
        study=lambda wc: study_summary(),
    log:
        f"{RES}/logs/results_md.log",
    localrule: True
    conda:
        CONDA_ENV
    script:
        "../scripts/results_md.py"


rule fig_violin:
    """Fig. 4: error distribution per method."""
    input:
        predictions=lambda wc: prediction_tables(),
    output:
        png=report(
            f"{RES}/figures/fig4_violin_errors.png",
            caption="../report/violin_errors.rst",
            category="Figures",
        ),
        pdf=f"{RES}/figures/fig4_violin_errors.pdf",
    params:
        methods=lambda wc: enabled_methods(),
    log:
        f"{RES}/logs/fig_violin.log",
    localrule: True
    conda:
        CONDA_ENV
    script:
        "../scripts/fig_violin.py"


rule fig_confidence:
    """Fig. 5: 90% confidence volume against error for the noisy model (the deployed seed)."""
    input:
        predictions=f"{RES}/predictions/{locnet.methods.PROPOSED}/seed{DEPLOYED_SEED}.csv",
    output:
        png=report(
            f"{RES}/figures/fig5_confidence_vs_error.png",
            caption="../report/confidence_vs_error.rst",
            category="Figures",
        ),
        pdf=f"{RES}/figures/fig5_confidence_vs_error.pdf",
    params:
        confidence=config["evaluation"]["confidence"],
    log:
        f"{RES}/logs/fig_confidence.log",
    localrule: True
    conda:
        CONDA_ENV
    script:
        "../scripts/fig_confidence.py"


rule fig_training_curves:
    """Training curves of every seed: per-level losses, validation error, schedule weights."""
    input:
        histories=lambda wc: [
            f"{model_dir(m, s)}/history.csv" for m in enabled_methods() for s in SEEDS
        ],
    output:
        png=report(
            f"{RES}/figures/training_curves.png",
            caption="../report/training_curves.rst",
            category="Figures",
        ),
        pdf=f"{RES}/figures/training_curves.pdf",
    params:
        runs=lambda wc: [(m, s) for m in enabled_methods() for s in SEEDS],
    log:
        f"{RES}/logs/fig_training_curves.log",
    localrule: True
    conda:
        CONDA_ENV
    script:
        "../scripts/fig_training_curves.py"


rule fig_heatmaps:
    """Fig. 3: one test case with the single-scale Loc-Net and heatmap U-Net output maps
    (the deployed seed's models)."""
    input:
        locnet=f"{deployed_model_dir(locnet.methods.HEATMAP_FIGURE[0])}/model.keras",
        heatmap=f"{deployed_model_dir(locnet.methods.HEATMAP_FIGURE[1])}/model.keras",
        predictions=f"{RES}/predictions/{locnet.methods.HEATMAP_FIGURE[0]}/seed{DEPLOYED_SEED}.csv",
        pyramids=all_pyramids,
    output:
        png=report(
            f"{RES}/figures/fig3_heatmaps.png",
            caption="../report/heatmap_figure.rst",
            category="Figures",
        ),
        pdf=f"{RES}/figures/fig3_heatmaps.pdf",
    params:
        pyramid_dir=f"{RES}/pyramid",
        landmarks=config["landmarks"],
    log:
        f"{RES}/logs/fig_heatmaps.log",
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        CONDA_ENV
    script:
        "../scripts/fig_heatmaps.py"
