"""Render one synthetic neck-CTA case (thin adapter; logic in locnet.phantom)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))  # locnet from src/

from locnet import phantom
from locnet.runlog import job_logging

with job_logging(snakemake) as log:
    out_dir = Path(snakemake.output.image).parent.parent
    path = phantom.write_case(snakemake.params.index, dict(snakemake.params.cfg), out_dir)
    assert Path(path) == Path(snakemake.output.image), (path, snakemake.output.image)
    log.info("wrote %s", path)
