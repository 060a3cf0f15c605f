# Data stage: synthetic cohort (optional) -> checked cohort tables -> per-case pyramid -> split.

check_split_counts()


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


checkpoint ingest:
    """Check the cohort (images, landmarks) and write the normalised tables (world RAS mm).

    They are written beside the study's tables, which rule cohort_tables then replaces with
    them. Snakemake deletes a job's outputs when the job starts, so a re-ingest that fails its
    checks deletes only these staged copies: the tables of the last good ingest stay, and
    nothing downstream runs.

    It also writes each case's content digest (data/digests/{case}.json, of the decoded scan),
    which the case's pyramid depends on: a scan is rebuilt when its content changes, not when
    its time stamp does. It runs whenever an input may have changed: newer inputs, and any
    change to their file status (params inputs_stat), which a copy with old times (cp -p,
    rsync -a, tar) cannot hide.

    A checkpoint, and every later rule waits for it (gate_on_ingest in common.smk): once it
    has run, Snakemake plans every later job afresh, and a job whose inputs came out
    byte-identical (tables and digests are compared by checksum) is not rerun. The digests are
    update() outputs: Snakemake keeps them while ingest runs (and restores them if it fails),
    and ingest rewrites only those whose content changed.
    """
    input:
        manifest=raw_manifest_path(),
        landmarks=raw_landmarks_path(),
        # every scan it reads: a scan replaced under the same name triggers a rebuild
        scans=existing_scans(),
    output:
        # same folder as the final tables: relative image paths stay valid in the copy
        manifest=f"{RES}/data/manifest.staged.csv",
        landmarks=f"{RES}/data/landmarks.staged.csv",
        digests=[update(digest_file(c)) for c in case_ids()],
    params:
        landmark_names=config["landmarks"],
        coordinate_system=config["cohort"]["coordinate_system"],
        split=config["split"],
        # the scan checks depend on the grid and the intensity window (locnet.ingest)
        pyramid=config["pyramid"],
        # size, times and inode of the user's tables and scans: any change re-runs the checks
        inputs_stat=inputs_stat(),
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


rule cohort_tables:
    """The study's cohort tables: byte copies of the checked tables that ingest staged.

    Not rerun when the staged tables are byte-identical to the ones it copied last (Snakemake
    compares the checksums of inputs under 1 MB), so nothing after it reruns either.
    """
    input:
        manifest=f"{RES}/data/manifest.staged.csv",
        landmarks=f"{RES}/data/landmarks.staged.csv",
    output:
        manifest=f"{RES}/data/manifest.csv",
        landmarks=f"{RES}/data/landmarks.csv",
    log:
        f"{RES}/logs/cohort_tables.log",
    localrule: True
    conda:
        CONDA_ENV
    script:
        "../scripts/cohort_tables.py"


rule pyramid:
    """Resample one scan to the finest isotropic RAS grid, then average down level by level.

    Rebuilt when the scan's content digest changes (ingest rewrites it then), not when the
    scan's or the table's time stamp does: the checked table (where the job finds the scan)
    and the scan itself are ancient(), read but not compared by time.
    """
    input:
        digest=f"{RES}/data/digests/{{case}}.json",
        manifest=ancient(f"{RES}/data/manifest.csv"),
        scan=lambda wc: [ancient(f) for f in case_scan(wc)],
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
    """Seeded train/val/test split, written once and read by every later rule.

    Refuses a subset with too few annotated landmarks (locnet.split.MIN_ANNOTATED), before
    any model trains on it.
    """
    input:
        manifest=f"{RES}/data/manifest.csv",
        landmarks=f"{RES}/data/landmarks.csv",
    output:
        split=f"{RES}/data/split.csv",
    params:
        split=config["split"],
        raw_landmarks=raw_landmarks_path(),
    log:
        f"{RES}/logs/split.log",
    localrule: True
    conda:
        CONDA_ENV
    script:
        "../scripts/split.py"
