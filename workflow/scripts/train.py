"""Train one method (thin adapter; logic in locnet.train)."""

from pathlib import Path

import locnet  # first, before TensorFlow: it picks TensorFlow's CPU kernels

locnet.job_threads(snakemake.threads)

from locnet import split as splitmod  # noqa: E402
from locnet import train  # noqa: E402
from locnet.runlog import job_logging  # noqa: E402

with job_logging(snakemake) as log:
    method = snakemake.wildcards.method
    subsets = splitmod.read_split(snakemake.input.split)
    pyr = Path(snakemake.params.pyramid_dir)
    dirs = {s: [pyr / c for c in subsets.loc[subsets["subset"] == s, "case_id"]] for s in ("train", "val")}
    log.info("%s: %d training and %d validation cases", method, len(dirs["train"]), len(dirs["val"]))
    result = train.train(
        method,
        dict(snakemake.params.method_cfg),
        dict(snakemake.params.train_cfg),
        dict(snakemake.params.grid),
        list(snakemake.params.landmarks),
        dirs["train"],
        dirs["val"],
        snakemake.input.landmarks,
        out_dir=Path(snakemake.output.model).parent,
        state_dir=snakemake.params.state_dir,
        seed=snakemake.params.seed,
        log=log,
    )
    log.info(
        "%s: kept epoch %s (validation error %.2f mm)",
        method,
        result["best_epoch"],
        result["best_val_error_mm"],
    )
