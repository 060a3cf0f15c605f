# Data stage: synthetic cohort (optional) -> checked cohort tables -> per-case pyramid -> split.


rule synthetic_case:
    """One synthetic neck-CTA scan and its two bifurcation landmarks (world RAS mm)."""
    output:
        image=f"{RES}/synthetic/images/{{case}}.nii.gz",
    params:
        cfg=config["synthetic"],
        index=lambda wc: int(wc.case.split("_")[-1]),
    log:
        f"{RES}/logs/synthetic_case/{{case}}.log",
    benchmark:
        f"{RES}/benchmarks/synthetic_case/{{case}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        CONDA_ENV
    script:
        "../scripts/synthetic_case.py"


rule synthetic_cohort:
    """Gather the synthetic cases into a manifest and landmark table, laid out like user data."""
    input:
        images=expand(f"{RES}/synthetic/images/{{case}}.nii.gz", case=synthetic_case_ids()),
    output:
        manifest=f"{RES}/synthetic/manifest.csv",
        landmarks=f"{RES}/synthetic/landmarks.csv",
    params:
        cfg=config["synthetic"],
    log:
        f"{RES}/logs/synthetic_cohort.log",
    localrule: True
    conda:
        CONDA_ENV
    script:
        "../scripts/synthetic_cohort.py"


rule ingest:
    """Check the cohort (images, landmarks) and write the normalised tables (world RAS mm)."""
    input:
        manifest=raw_manifest_path(),
        landmarks=raw_landmarks_path(),
    output:
        manifest=f"{RES}/data/manifest.csv",
        landmarks=f"{RES}/data/landmarks.csv",
    params:
        landmark_names=config["landmarks"],
        coordinate_system=config["cohort"]["coordinate_system"],
        split=config["split"],
    log:
        f"{RES}/logs/ingest.log",
    benchmark:
        f"{RES}/benchmarks/ingest.tsv"
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        CONDA_ENV
    script:
        "../scripts/ingest.py"


rule pyramid:
    """Resample one scan to the finest isotropic RAS grid, then average down level by level."""
    input:
        manifest=f"{RES}/data/manifest.csv",
    output:
        levels=[f"{RES}/pyramid/{{case}}/level{l}.nii" for l in LEVELS],
        grid=f"{RES}/pyramid/{{case}}/grid.json",
    params:
        pyramid=config["pyramid"],
    log:
        f"{RES}/logs/pyramid/{{case}}.log",
    benchmark:
        f"{RES}/benchmarks/pyramid/{{case}}.tsv"
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 15 * attempt,
    conda:
        CONDA_ENV
    script:
        "../scripts/pyramid.py"


rule split:
    """Seeded train/val/test split, written once and read by every later rule."""
    input:
        manifest=f"{RES}/data/manifest.csv",
    output:
        split=f"{RES}/data/split.csv",
    params:
        split=config["split"],
    log:
        f"{RES}/logs/split.log",
    localrule: True
    conda:
        CONDA_ENV
    script:
        "../scripts/split.py"
