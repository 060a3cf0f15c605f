"""results/tables/results.md from the run's tables (thin adapter; logic in locnet.report)."""

import pandas as pd

from locnet import fileio, report
from locnet.runlog import job_logging

with job_logging(snakemake) as log:
    p = snakemake.params
    # an input only when this run makes it (multi-scale methods): never a stale table
    level_paths = list(snakemake.input.get("level_errors", []))
    level_errors = pd.read_csv(level_paths[0]) if level_paths else None
    if level_errors is None:
        log.info("no per-level error table in this run: the page has no per-level section")
    page = report.results_markdown(
        pd.read_csv(snakemake.input.table1),
        pd.read_csv(snakemake.input.statistics),
        level_errors,
        reference=pd.read_csv(snakemake.input.reference),
        slopes=pd.read_csv(snakemake.input.slopes),
        configfiles=p.configfiles,
        config_args=p.config_args,
        study=p.study,
        git=report.git_state(p.checkout),
        machine=report.machine_facts(),
        training=report.training_times(p.train_benchmarks, p.seeds),
        training_wall=report.training_wall(p.models, list(p.methods), p.seeds),
    )
    fileio.write_text_atomic(page, snakemake.output.md)
    log.info("wrote %s", snakemake.output.md)
