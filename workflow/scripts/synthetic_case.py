"""Render one synthetic neck-CTA case (thin adapter; logic in locnet.phantom)."""

from pathlib import Path


from locnet import phantom
from locnet.runlog import job_logging

with job_logging(snakemake) as log:
    out_dir = Path(snakemake.output.image).parent.parent
    path = phantom.write_case(snakemake.params.index, dict(snakemake.params.cfg), out_dir)
    assert Path(path) == Path(snakemake.output.image), (path, snakemake.output.image)
    log.info("wrote %s", path)
