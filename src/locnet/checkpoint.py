"""The resume state of a training run (:func:`locnet.train.train`), kept in its ``state_dir``.

Files
-----
* ``state.json``: the commit point. Completed epochs, history, best so far, phase, the names of
  the arrays below, the pending snapshots and a fingerprint of the run's configuration
  (:func:`fingerprint`). It is renamed into place after the arrays it names, so a kill at any
  moment leaves either the old or the new consistent state.
* ``ckpt-{epoch}.npz``: all model variables (random-seed states included) plus the optimizer
  variables, after ``epoch``.
* ``best-{epoch}.npz`` / ``snap-{epoch}.npz``: the model variables of the best epoch so far and
  of the epochs whose model-selection window is not complete yet.
* ``history.csv``: the history so far (a readable copy; ``state.json`` holds the same rows).
* ``train.lock``: the lock of the trainer using the folder (:func:`state_lock`): an exclusive
  ``flock`` held while it runs, with its process id, host and start time written inside. A
  second trainer on the same folder is refused, naming the first; the operating system drops
  the lock when its holder dies (``kill -9`` included), and the next trainer takes it over with
  a warning naming the dead one.

:func:`load_state` returns the state only when it belongs to the same configuration (same
:data:`STATE_VERSION` and fingerprint) and every array it names exists; :func:`save_state`
writes a new state and deletes the arrays the new state no longer names.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from locnet import fileio

__all__ = [
    "LOCK_FILE",
    "STATE_VERSION",
    "StateLocked",
    "Progress",
    "fingerprint",
    "history_frame",
    "load_state",
    "model_snapshot",
    "progress_from_state",
    "restore_checkpoint",
    "restore_snapshot",
    "save_snapshot",
    "save_state",
    "snapshot_name",
    "state_lock",
]

STATE_VERSION = 2  # 2: smoothed model selection (best_score, pending snapshots)
STATE_FILE = "state.json"
LEVEL_METRIC = re.compile(r"^loss_level(\d+)$")
_STATE_ARRAY = re.compile(r"^(ckpt|best|snap)-\d+\.npz$")


LOCK_FILE = "train.lock"


# --------------------------------------------------------------------------------------------
# the lock
# --------------------------------------------------------------------------------------------
class StateLocked(RuntimeError):
    """Another process holds the training state folder's lock."""


def _holder(fd: int) -> dict:
    """What the lock file names (pid, host, started, command); ``{}`` when empty/unreadable."""
    try:
        raw = os.pread(fd, 4096, 0).decode(errors="replace")
        d = json.loads(raw) if raw.strip() else {}
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _who(h: dict) -> str:
    return (f"process {h.get('pid', '?')} on host {h.get('host', '?')} (started "
            f"{h.get('started', '?')}; {h.get('command', '?')})")


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # exists (another user's) or unknown: assume alive
    return True


@contextlib.contextmanager
def state_lock(state_dir, log: logging.Logger | None = None):
    """Hold the lock of a training state folder for the ``with`` block.

    An exclusive, non-blocking ``fcntl.flock`` on ``state_dir/train.lock``: a second trainer
    on the same folder raises :class:`StateLocked` naming the first one's process id, host
    and command. The lock belongs to the open file, so the operating system releases it when
    the holder exits or is killed; the pid and host it wrote stay in the file, and the next
    trainer takes the folder over with a warning naming that (dead) process.
    """
    log = log or logging.getLogger("locnet.train")
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            raise StateLocked(
                f"the training state {state_dir} is in use by {_who(_holder(fd))}: two "
                f"trainers on one state folder would overwrite each other's checkpoints. "
                f"Wait for it to finish, or stop it; the lock ({path}) is released when that "
                "process ends") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": " ".join(sys.argv[:3])[:200]}
        before = _holder(fd)
        if before.get("pid") is not None:
            here = before.get("host") == me["host"]
            state = ("no longer running" if here and not _pid_alive(before["pid"]) else
                     "not holding the lock" + ("" if here else " (another host; not checked)"))
            log.warning("taking over the training state %s from %s, %s (it did not end "
                        "cleanly)", state_dir, _who(before), state)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # a clean end leaves no holder behind
    finally:
        os.close(fd)  # releases the flock


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def jsonable(obj):
    """``obj`` with paths, NumPy values and non-finite floats (as ``None``) made JSON-ready."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, obj) -> None:
    """Write ``obj`` (made :func:`jsonable`) to ``path`` atomically."""
    fileio.write_json_atomic(jsonable(obj), path)


def savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` to ``path`` atomically."""
    with fileio.atomic_write(path) as tmp:  # the temporary name ends in .npz, so savez keeps it
        np.savez(tmp, **arrays)


def fingerprint(**parts) -> str:
    """A short hash of the run's configuration ``parts`` and :data:`STATE_VERSION`."""
    text = json.dumps(jsonable({"version": STATE_VERSION, **parts}), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def snapshot_name(epoch: int) -> str:
    """File name of the model snapshot taken after ``epoch``."""
    return f"snap-{epoch:06d}.npz"


def history_frame(rows: list[dict]) -> pd.DataFrame:
    """History rows as a DataFrame with a stable column order."""
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    cols = list(df.columns)

    def key(c):
        if c == "epoch":
            return (0, 0, c)
        if c == "phase":
            return (1, 0, c)
        if c == "loss":
            return (2, 0, c)
        m = LEVEL_METRIC.match(c)
        if m:
            return (3, int(m.group(1)), c)
        if c.startswith("weight_"):
            m = re.match(r"^weight_level(\d+)$", c)
            return (5, int(m.group(1)) if m else 0, c)
        if c == "val_error_mm":
            return (6, 0, c)
        if c == "val_score_mm":
            return (6, 1, c)
        if c == "time":
            return (7, 0, c)
        return (4, 0, c)

    return df[sorted(cols, key=key)]


# --------------------------------------------------------------------------------------------
# model state <-> arrays
# --------------------------------------------------------------------------------------------
def var_arrays(variables, prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}{i:05d}": np.asarray(v.numpy()) for i, v in
            enumerate(variables)}


def assign_arrays(variables, arrays, prefix: str, what: str) -> None:
    keys = sorted(k for k in arrays.files if k.startswith(prefix))
    if len(keys) != len(variables):
        raise ValueError(f"checkpoint has {len(keys)} {what} variables, the model {len(variables)}")
    for v, k in zip(variables, keys):
        a = arrays[k]
        if tuple(a.shape) != tuple(v.shape):
            raise ValueError(f"checkpoint {what} variable {v.path}: shape {a.shape} != {v.shape}")
        v.assign(a)


def model_snapshot(model) -> dict[str, np.ndarray]:
    """All model variables (weights, non-trainable state, seed states) as arrays."""
    return var_arrays(model.variables, "model/")


def restore_snapshot(model, arrays) -> None:
    assign_arrays(model.variables, arrays, "model/", "model")


def save_snapshot(model, path: Path) -> None:
    """Write :func:`model_snapshot` of ``model`` to ``path`` atomically."""
    savez(path, model_snapshot(model))


# --------------------------------------------------------------------------------------------
# the state
# --------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """What a run has done so far: everything of ``state.json`` that changes per epoch."""

    epoch: int             # epochs completed
    phase: int             # phase of the last completed epoch
    history: list          # one row (dict) per epoch, epoch 0 = the untrained model
    best_epoch: int        # the kept epoch so far
    best_score: float      # its model-selection score
    best_file: str         # the arrays of its model variables
    pending: list          # epochs whose selection window is not complete yet


def load_state(state_dir: Path, fingerprint: str, log: logging.Logger) -> dict | None:
    """The resume state of ``state_dir``, or ``None`` (with a warning saying why) when there is
    none, it is unreadable, belongs to another configuration or lacks an array it names."""
    state_path = state_dir / STATE_FILE
    if not state_path.exists():
        return None
    try:
        with open(state_path) as fh:
            state = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        log.warning("unreadable resume state %s (%s): starting afresh", state_path, err)
        return None
    if state.get("version") != STATE_VERSION or state.get("fingerprint") != fingerprint:
        log.warning("resume state in %s belongs to another configuration: starting afresh",
                    state_dir)
        return None
    needed = [state.get("checkpoint"), state.get("best")]
    needed += [f"snap-{int(e):06d}.npz" for e in state.get("pending", [])]
    missing = [f for f in needed if not f or not (state_dir / f).exists()]
    if missing:
        log.warning("resume state in %s lacks %s: starting afresh", state_dir, missing)
        return None
    return state


def progress_from_state(state: dict) -> Progress:
    """The :class:`Progress` recorded in a state of :func:`load_state`."""
    history = [{k: (float("nan") if v is None else v) for k, v in r.items()}
               for r in state["history"]]
    best_score = state["best_score"]
    best_score = float("nan") if best_score is None else float(best_score)
    return Progress(epoch=int(state["epoch"]), phase=int(state["phase"]), history=history,
                    best_epoch=int(state["best_epoch"]), best_score=best_score,
                    best_file=state["best"],
                    pending=[int(e) for e in state.get("pending", [])])


def save_state(state_dir: Path, model, progress: Progress, *, fingerprint: str, method: str,
               total_epochs: int) -> None:
    """Checkpoint ``model`` (and its optimizer) after ``progress.epoch`` and commit the state;
    then delete the arrays that the new state no longer names."""
    ckpt_file = f"ckpt-{progress.epoch:06d}.npz"
    arrays = model_snapshot(model)
    if model.optimizer is not None and model.optimizer.built:
        arrays.update(var_arrays(model.optimizer.variables, "optimizer/"))
    savez(state_dir / ckpt_file, arrays)
    fileio.write_text_atomic(history_frame(progress.history).to_csv(index=False),
                         state_dir / "history.csv")
    write_json(state_dir / STATE_FILE, {
        "version": STATE_VERSION, "fingerprint": fingerprint, "method": method,
        "epoch": progress.epoch, "total_epochs": total_epochs, "phase": progress.phase,
        "checkpoint": ckpt_file, "best": progress.best_file, "best_epoch": progress.best_epoch,
        "best_score": progress.best_score, "pending": list(progress.pending),
        "history": progress.history,
    })
    keep = {ckpt_file, progress.best_file} | {snapshot_name(e) for e in progress.pending}
    for f in state_dir.glob("*.npz"):
        if f.name not in keep and _STATE_ARRAY.match(f.name):
            f.unlink(missing_ok=True)


def restore_checkpoint(model, state_dir: Path, state: dict, enter_phase: Callable[[], None],
                       with_optimizer: bool) -> None:
    """Restore the model variables of ``state``'s checkpoint, call ``enter_phase`` (which
    compiles the model) and, when ``with_optimizer`` and the checkpoint holds them, restore
    the optimizer variables too."""
    with np.load(state_dir / state["checkpoint"]) as arrays:
        restore_snapshot(model, arrays)
        enter_phase()
        has_opt = any(k.startswith("optimizer/") for k in arrays.files)
        if with_optimizer and has_opt:
            model.optimizer.build(model.trainable_variables)
            assign_arrays(model.optimizer.variables, arrays, "optimizer/", "optimizer")
