"""Logging for Snakemake script jobs: everything a job says goes to its ``log:`` file.

Usage in a workflow script::

    from locnet.runlog import job_logging
    with job_logging(snakemake) as log:
        log.info("...")

Python warnings, ``logging`` records and an uncaught exception (with traceback) all land in
the rule's log file as well as on stderr, so a failed job explains itself in one place.

A user error (:data:`USER_ERRORS`: bad input data, :class:`locnet.fileio.InputError`, or a bad
config, :class:`locnet.config.ConfigError`) is a message for the user, not a bug: it is
written once, to the log and to stderr, without a traceback, and the job exits with status 1
(:class:`SystemExit`), so Snakemake reports the failed rule without a second copy of it.

At its start a job also logs where its ``locnet`` was imported from (the workflow puts the
checkout's ``src/`` first on every job's path) and deletes the temporaries that a killed
earlier run of the same job left beside its outputs
(:func:`locnet.fileio.remove_stale_temporaries_of`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

import locnet

from . import config as _config
from . import fileio

#: exceptions whose message is the whole story (it names the case, the file and the reason)
USER_ERRORS = (fileio.InputError, _config.ConfigError)


@contextlib.contextmanager
def job_logging(smk=None, log_path: str | None = None, name: str = "locnet"):
    if log_path is None and smk is not None and len(smk.log) > 0:
        log_path = str(smk.log[0])
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers = []
    if log_path:
        fh = logging.FileHandler(log_path, mode="a")
        fh.setFormatter(fmt)
        handlers.append(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    handlers.append(sh)
    for h in handlers:
        root.addHandler(h)
    logging.captureWarnings(True)
    log = logging.getLogger(name)
    rule = getattr(smk, "rule", None)
    t0 = time.perf_counter()
    if rule:
        log.info("rule %s started (wildcards: %s)", rule, dict(getattr(smk, "wildcards", {})))
        log.info("locnet %s from %s", locnet.__version__, os.path.dirname(locnet.__file__))
    outputs = [str(f) for f in getattr(smk, "output", [])]
    for f in fileio.remove_stale_temporaries_of(*outputs):
        log.info("removed %s, left by a killed run of this job", f)
    if os.environ.get("SLURM_JOB_ID"):
        # where a cluster job ran and which GPU SLURM gave it: the first thing to look at
        # when a job is slow or cannot see its GPU
        log.info(
            "SLURM job %s on %s: CUDA_VISIBLE_DEVICES=%s SLURM_GPUS_ON_NODE=%s",
            os.environ["SLURM_JOB_ID"],
            os.environ.get("SLURMD_NODENAME", "?"),
            os.environ.get("CUDA_VISIBLE_DEVICES", "none"),
            os.environ.get("SLURM_GPUS_ON_NODE", "0"),
        )
    try:
        yield log
    except USER_ERRORS as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
    except BaseException:
        log.exception("job failed")
        raise
    else:
        if rule:
            log.info("rule %s done in %.1f s", rule, time.perf_counter() - t0)
    finally:
        for h in handlers:
            root.removeHandler(h)
            h.close()
