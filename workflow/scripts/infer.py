"""Run `locnet predict` on the scans of the inference manifest (thin adapter; logic in
locnet.cli / locnet.inference). Failed scans are logged; the rule fails only if every scan
failed, so one bad scan does not block the others' results."""

import os
from pathlib import Path

os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(snakemake.threads))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402

from locnet import cli  # noqa: E402
from locnet.runlog import job_logging  # noqa: E402

with job_logging(snakemake) as log:
    out = Path(snakemake.output.csv).parent
    argv = ["predict", "--model", str(Path(snakemake.input.model).parent), "--out", str(out),
            "--manifest", str(snakemake.input.manifest),
            "--min-coverage", str(snakemake.params.min_coverage), "--quiet",
            "--threads", str(snakemake.threads)]
    if snakemake.params.seed is not None:  # else the study's seed, from quality.json
        argv += ["--seed", str(snakemake.params.seed)]
    if snakemake.params.passes is not None:
        argv += ["--passes", str(snakemake.params.passes)]
    if not snakemake.params.overlays:
        argv.append("--no-overlay")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    for line in err.getvalue().splitlines():
        if line.strip():
            log.warning("%s", line)
    doc = json.loads((out / "landmarks.json").read_text()) if rc in (0, 1) else {}
    n_ok, n_bad = len(doc.get("cases", [])), len(doc.get("failed", []))
    log.info("%s: %d scan(s) predicted, %d failed", snakemake.wildcards.method, n_ok, n_bad)
    if rc not in (0, 1) or n_ok == 0:
        raise SystemExit(f"locnet predict failed (exit status {rc}); see the log")
