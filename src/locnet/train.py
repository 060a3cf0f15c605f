"""Training of every method, with per-epoch validation, best-model keeping and exact resume.

Entry point: :func:`train`. One call trains one method and writes its declared outputs

* ``out_dir/model.keras``   the kept model (see *Model selection*),
* ``out_dir/metadata.json`` config blocks, grid, landmarks, best epoch/error, versions,
* ``out_dir/history.csv``   one row per epoch (``epoch`` 0 = the untrained model),

each written atomically (temporary name, then rename) and only when training has finished.

Model selection
---------------
The validation error of one epoch is noisy (on a few validation cases it moves by millimetres
from one epoch to the next), so the lowest single value is an optimistic, lucky pick. The kept
epoch minimises the validation error *smoothed* over a centred window of ``selection_window``
epochs (default 5: the epoch and two on each side; clipped at the ends of training and, for
``multiscale_multistep``, at the ends of the epoch's phase). Ties go to the earliest epoch;
a window holding a non-finite error never wins; the untrained epoch 0 is the fallback (its
raw error as score). ``selection_window: 1`` is the plain "best single epoch" rule. The
history records the smoothed score (``val_score_mm``) of every epoch; the weights of the
epochs whose windows are not yet complete wait in ``state_dir`` (``snap-{epoch}.npz``).

Resume
------
Everything needed to continue lives in ``state_dir`` (outside the declared outputs, so the
workflow manager does not delete it when a job is killed): ``state.json`` (completed epochs,
history, best so far, phase, the names of the two arrays below, and a fingerprint of the run's
configuration), ``ckpt-{epoch}.npz`` (all model variables, random-seed states included, plus the
optimizer variables) and ``best-{epoch}.npz`` (the model variables of the best epoch).
``state.json`` is the commit point: it is renamed into place after the arrays it names, so a
kill at any moment leaves either the old or the new consistent state. A re-run with the same
configuration logs ``resuming from epoch N`` and continues; a different configuration
(fingerprint) starts afresh.

A resumed run equals an uninterrupted one (same seed, CPU): the case order of epoch ``e``
depends only on ``(seed, e)``, and at the start of every epoch (and before every validation)
all random-seed states of the model are set from ``(seed, e)``; so no random state carries over
from one epoch to the next other than what the checkpoint holds.

``multiscale_multistep``
------------------------
Trained in ``L`` phases, coarse to fine, one per level sub-network ``model.level_nets[l]``
(indexed by pyramid level, 0 = finest, like ``model.loss_weights``). The epochs are split evenly
as ``locnet.schedules.multistep_level`` says: phase ``p = floor(L * epoch / E)`` trains level
``l = L - 1 - p``. In that phase only ``level_nets[l]`` is trainable and the loss weights are
one-hot at ``l`` (schedule ``multistep``). Each phase is compiled afresh with a new Adam
optimizer (the trainable variables change); a run resumed mid-phase restores that phase's
optimizer state; one resumed at a phase boundary starts the new phase's optimizer afresh, as an
uninterrupted run does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import random
import re
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from locnet import io, seeds
from locnet.data import LandmarkDataset, case_id_of, model_levels, read_landmark_table
from locnet.models import predict_position

STATE_VERSION = 2  # 2: smoothed model selection (best_score, pending snapshots)
MULTISTEP = "multiscale_multistep"
_LEVEL_METRIC = re.compile(r"^loss_level(\d+)$")

DEFAULT_TRAIN_CFG = {
    "epochs": 500,  # paper
    "learning_rate": 5e-4,  # paper (Adam)
    "batch_size": 1,  # paper
    "schedule": "linear",  # per-level loss weights over the epochs (locnet.schedules)
    "cache_cases": 2,  # open memory maps kept per dataset (LRU)
    "jit_compile": "auto",  # passed to model.compile
    "deterministic": False,  # tf op determinism (GPU); CPU runs are deterministic anyway
    "selection_window": 5,  # epochs of the centred window of the model-selection score
}


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _atomic_write_json(path: Path, obj) -> None:
    io.write_json_atomic(_jsonable(obj), path)


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with io.atomic_write(path) as tmp:  # the temporary name ends in .npz, so savez keeps it
        np.savez(tmp, **arrays)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _history_frame(rows: list[dict]) -> pd.DataFrame:
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
        m = _LEVEL_METRIC.match(c)
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


def _is_better(value: float, best: float) -> bool:
    """Strictly lower validation error; NaN never wins, anything beats NaN."""
    if value is None or not np.isfinite(value):
        return False
    if best is None or not np.isfinite(best):
        return True
    return value < best


def selection_range(epoch: int, window: int, phase_range: tuple[int, int]) -> tuple[int, int]:
    """First and last epoch (1-based, inclusive) of the centred selection window of ``epoch``,
    clipped to ``phase_range`` (the first and last epoch of its phase or of the training)."""
    half = (int(window) - 1) // 2
    lo, hi = phase_range
    return max(lo, epoch - half), min(hi, epoch + half)


def selection_score(val_errors, epoch: int, window: int, phase_range: tuple[int, int]) -> float:
    """Model-selection score of ``epoch``: the mean validation error over its window
    (:func:`selection_range`); NaN when any error of the window is missing or not finite.

    ``val_errors`` maps epoch -> validation error (a dict, or a sequence indexed by epoch).
    """
    lo, hi = selection_range(epoch, window, phase_range)
    vals = []
    for e in range(lo, hi + 1):
        try:
            vals.append(float(val_errors[e]))
        except (KeyError, IndexError):
            return float("nan")
    vals = np.asarray(vals, float)
    return float(vals.mean()) if vals.size and np.all(np.isfinite(vals)) else float("nan")


def select_epoch(val_errors, window: int, phase_ranges=None) -> tuple[int, float]:
    """The epoch the selection rule keeps from a finished history: ``(epoch, score)``.

    ``val_errors``: errors of epochs 0 (untrained) .. E. ``phase_ranges``: per epoch its phase's
    ``(first, last)`` epoch (a callable ``epoch -> range``; default the whole training).
    Equals what :func:`train` keeps (it scores each epoch once its window is complete).
    """
    errs = [float(v) for v in val_errors]
    total = len(errs) - 1
    rng = phase_ranges or (lambda e: (1, total))
    best_epoch, best = 0, errs[0]
    for e in range(1, total + 1):
        sc = selection_score(errs, e, window, rng(e))
        if _is_better(sc, best):
            best_epoch, best = e, sc
    return best_epoch, best


def versions() -> dict:
    out = {
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    try:
        import locnet

        out["locnet"] = locnet.__version__
    except Exception:  # pragma: no cover
        pass
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        out["tensorflow"] = tf.__version__
    return out


# --------------------------------------------------------------------------------------------
# randomness
# --------------------------------------------------------------------------------------------
def _seed_state_variables(model) -> list:
    """The state variables of all random-seed generators of the model (stable order)."""
    return [v for v in model.variables if v.name == "seed_generator_state"]


def reseed(model, seed: int, epoch: int, purpose: str) -> None:
    """Set every random state from ``(seed, epoch, purpose)``: Python, NumPy, the model's seed
    generators and Keras's global seed generator (when one exists).

    Called at the start of every epoch ("train") and before every validation ("val"), so the
    random numbers of an epoch do not depend on anything that happened before it.
    """
    s = seeds.derive(seed, purpose, epoch)
    random.seed(s)
    np.random.seed(s)
    for i, v in enumerate(_seed_state_variables(model)):
        v.assign(np.array([seeds.derive(s, "generator", i), 0], dtype=v.dtype))
    try:  # the generator behind keras.random calls without an explicit seed
        from keras.src.backend.common import global_state
        from keras.src.random.seed_generator import GLOBAL_SEED_GENERATOR

        gen = global_state.get_global_attribute(GLOBAL_SEED_GENERATOR)
        if gen is not None:
            gen.state.assign(
                np.array([seeds.derive(s, "global-generator"), 0], dtype=gen.state.dtype)
            )
    except Exception:  # pragma: no cover - private API moved
        pass


# --------------------------------------------------------------------------------------------
# prediction and validation
# --------------------------------------------------------------------------------------------
def predict_dataset(model, dataset: LandmarkDataset):
    """Predictions of every case of ``dataset`` (one at a time, in the dataset's case order).

    Returns ``(pred, true, mask)`` with shapes (N, K, 3), (N, K, 3), (N, K).
    """
    preds, trues, masks = [], [], []
    n = len(dataset.case_dirs)
    for i in range(n):
        x, y = dataset.case_batch(i, then=i + 1 if i + 1 < n else None)
        preds.append(predict_position(model, x)[0])
        trues.append(y["position"][0])
        masks.append(y["mask"][0])
    return np.stack(preds), np.stack(trues).astype(np.float64), np.stack(masks)


def mean_error_mm(pred: np.ndarray, true: np.ndarray, mask: np.ndarray) -> float:
    """Mean Euclidean error (mm) over the present landmarks (mask 1); NaN if there are none.

    A non-finite prediction counts as a non-finite error (the mean is then NaN), so a broken
    model is never kept as "best".
    """
    err = np.linalg.norm(np.asarray(pred) - np.asarray(true), axis=-1)
    m = np.asarray(mask) > 0
    if not m.any():
        return float("nan")
    return float(np.mean(err[m]))


def validation_error(model, dataset: LandmarkDataset) -> float:
    return mean_error_mm(*predict_dataset(model, dataset))


# --------------------------------------------------------------------------------------------
# callbacks
# --------------------------------------------------------------------------------------------
class LossWeightSchedule(keras.callbacks.Callback):
    """Writes the per-level loss weights of each epoch into ``model.loss_weights`` and logs them
    as ``weight_{name}`` (``name`` = ``level{l}``)."""

    def __init__(self, weights_fn, names: list[str]):
        super().__init__()
        self.weights_fn = weights_fn
        self.names = list(names)
        self.current = None

    def on_epoch_begin(self, epoch, logs=None):
        var = self.model.loss_weights
        w = np.asarray(self.weights_fn(epoch), dtype=np.float32).reshape(tuple(var.shape))
        var.assign(w.astype(var.dtype))
        self.current = w

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.current is not None:
            for name, v in zip(self.names, self.current.reshape(-1)):
                logs[f"weight_{name}"] = float(v)


class ValidationError(keras.callbacks.Callback):
    """Adds ``val_error_mm`` (mean Euclidean error of the validation cases) to the epoch logs."""

    def __init__(self, dataset: LandmarkDataset | None, before=None):
        super().__init__()
        self.dataset = dataset
        self.before = before

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if self.dataset is None:
            logs["val_error_mm"] = float("nan")
            return
        if self.before is not None:
            self.before(epoch + 1)
        logs["val_error_mm"] = validation_error(self.model, self.dataset)


class _Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs = None

    def on_epoch_end(self, epoch, logs=None):
        self.logs = dict(logs or {})


# --------------------------------------------------------------------------------------------
# phases (multiscale_multistep)
# --------------------------------------------------------------------------------------------
def multistep_phase(epoch: int, total_epochs: int, n_levels: int) -> tuple[int, int]:
    """``(phase, level)`` of ``epoch`` in multi-step training: phase 0 trains the coarsest level
    ``n_levels - 1``, the last phase level 0 (``locnet.schedules.multistep_level``: ``n_levels``
    equal phases, phase ``floor(n_levels * epoch / total_epochs)``)."""
    from locnet.schedules import multistep_level

    level = int(multistep_level(epoch, total_epochs, n_levels))
    return n_levels - 1 - level, level


def phase_bounds(total_epochs: int, n_levels: int) -> list[tuple[int, int]]:
    """Epoch ranges ``[start, end)`` of the multi-step phases (coarse to fine)."""
    bounds = [[None, None] for _ in range(n_levels)]
    for e in range(total_epochs):
        p, _ = multistep_phase(e, total_epochs, n_levels)
        if bounds[p][0] is None:
            bounds[p][0] = e
        bounds[p][1] = e + 1
    return [(a, b) if a is not None else (total_epochs, total_epochs) for a, b in bounds]


def _level_net_items(model) -> list[tuple[int, object]]:
    nets = getattr(model, "level_nets", None)
    if nets is None:
        return []
    if isinstance(nets, dict):
        return [(int(str(k).replace("level", "")), v) for k, v in nets.items()]
    return list(enumerate(nets))


def _set_trainable_level(model, level: int | None) -> None:
    """Only ``model.level_nets[level]`` trainable (``None``: everything trainable)."""
    model.trainable = True
    for l, net in _level_net_items(model):
        net.trainable = level is None or l == level


# --------------------------------------------------------------------------------------------
# model state <-> arrays
# --------------------------------------------------------------------------------------------
def _var_arrays(variables, prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}{i:05d}": np.asarray(v.numpy()) for i, v in
            enumerate(variables)}


def _assign_arrays(variables, arrays, prefix: str, what: str) -> None:
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
    return _var_arrays(model.variables, "model/")


def restore_snapshot(model, arrays) -> None:
    _assign_arrays(model.variables, arrays, "model/", "model")


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def _default_build(method, method_cfg, grid):
    from locnet.models import build_model

    return build_model(method, method_cfg, grid)


def _weight_names(model, levels: list[int]) -> list[str]:
    """Names ``level{l}`` of the entries of ``model.loss_weights``.

    Entry ``i`` belongs to pyramid level ``i`` (``locnet.schedules``: index 0 = finest), unless
    the model has a single weight, which then belongs to the single level it reads; a model may
    also name them itself (attribute ``loss_levels``).
    """
    n = int(np.prod(model.loss_weights.shape))
    named = getattr(model, "loss_levels", None)
    if named is not None and len(named) == n:
        return [f"level{int(l)}" for l in named]
    if n == 1 and len(levels) == 1:
        return [f"level{levels[0]}"]
    return [f"level{i}" for i in range(n)]


def _compile(model, learning_rate: float, train_cfg: dict) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        jit_compile=train_cfg.get("jit_compile", "auto"),
    )


def _fingerprint(**parts) -> str:
    text = json.dumps(_jsonable(parts), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _log_epoch(log, row: dict, total: int, best_epoch: int, best_err: float) -> None:
    parts = [f"epoch {row['epoch']}/{total}"]
    if "phase" in row:
        parts.append(f"phase {row['phase']}")
    for k, v in row.items():
        if k == "loss" or _LEVEL_METRIC.match(k):
            parts.append(f"{k} {v:.4g}")
    parts.append(f"val_error_mm {row.get('val_error_mm', float('nan')):.3f}")
    parts.append(f"(kept so far: epoch {best_epoch}, score {best_err:.3f})")
    parts.append(f"{row.get('time', 0.0):.1f} s")
    log.info(" ".join(parts))


def _intensity_summary(case_dirs, grid, log) -> dict | None:
    """The training cases' intensity summary on the coarsest level (``None``, with a warning,
    when it cannot be computed: training does not fail for it)."""
    from locnet import quality

    try:
        return quality.intensity_summary(list(case_dirs), int(grid["levels"]) - 1)
    except Exception as err:  # a summary is an aid to inference, never a reason to stop
        log.warning("no intensity summary of the training cases (%s: %s)",
                    type(err).__name__, err)
        return None


def train(
    method: str,
    method_cfg: dict,
    train_cfg: dict,
    grid: dict,
    landmarks,
    case_dirs_train,
    case_dirs_val,
    landmark_table,
    out_dir,
    state_dir,
    seed: int,
    log: logging.Logger | None = None,
    *,
    callbacks=None,
    max_epochs_this_run: int | None = None,
    build_fn=None,
) -> dict:
    """Train ``method`` and write ``model.keras``, ``metadata.json``, ``history.csv`` to
    ``out_dir``; resume from ``state_dir`` when a previous run of the same configuration was
    interrupted.

    Args:
        method: method name (``locnet_single``, ``multiscale_e2e_noise``, ...).
        method_cfg: the method's config block (passed to ``build_model``; may hold
            ``schedule``, which then overrides ``train_cfg["schedule"]``).
        train_cfg: ``epochs``, ``learning_rate``, ``batch_size``, ``schedule`` and the options of
            ``DEFAULT_TRAIN_CFG``; missing keys take those defaults.
        grid: pyramid geometry block given to ``build_model`` and stored in the metadata.
        landmarks: landmark names (order of the K axis).
        case_dirs_train, case_dirs_val: pyramid folders of the training / validation cases.
        landmark_table: DataFrame or CSV path (``case_id,landmark,x,y,z``, world RAS mm).
        out_dir: folder of the declared outputs.
        state_dir: folder of the resume state (outside the declared outputs).
        seed: the rule's seed.
        log: logger (default ``logging.getLogger("locnet.train")``).
        callbacks: extra Keras callbacks, run after the built-in ones each epoch.
        max_epochs_this_run: stop (resumably) after this many epochs in this call; the outputs
            are then not written and ``completed`` is False in the result.
        build_fn: ``(method, method_cfg, grid) -> keras.Model``; default
            ``locnet.models.build_model``.

    Returns:
        dict with ``completed``, ``epochs_done``, ``best_epoch``, ``best_val_error_mm``,
        ``history`` (DataFrame) and the output paths.
    """
    log = log or logging.getLogger("locnet.train")
    cfg = {**DEFAULT_TRAIN_CFG, **(train_cfg or {})}
    method_cfg = dict(method_cfg or {})
    total = int(cfg["epochs"])
    lr = float(cfg["learning_rate"])
    schedule_kind = method_cfg.get("schedule", cfg["schedule"])
    window = int(cfg["selection_window"])
    if window < 1 or window % 2 == 0:
        raise ValueError(f"{method}: selection_window must be an odd number >= 1, got {window}")
    seed = int(seed)
    out_dir, state_dir = Path(out_dir), Path(state_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    landmarks = list(landmarks)
    build_fn = build_fn or _default_build
    io.remove_stale_temporaries(out_dir, state_dir)

    if cfg.get("deterministic") and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()

    # ---- the training cases' intensities, for inference's check of new scans --------------------
    intensity = _intensity_summary(case_dirs_train, grid, log)

    # ---- model --------------------------------------------------------------------------------
    keras.utils.set_random_seed(seeds.derive(seed, "init"))
    # the model builder takes the landmark names from its config block (K = len(landmarks))
    model = build_fn(method, {**method_cfg, "landmarks": landmarks}, grid)
    if not hasattr(model, "loss_weights") or not hasattr(model.loss_weights, "assign"):
        raise TypeError(f"{method}: the model has no `loss_weights` variable")
    levels = model_levels(model)
    weight_names = _weight_names(model, levels)
    n_weights = len(weight_names)
    multistep = method == MULTISTEP
    if multistep:
        if not _level_net_items(model):
            raise TypeError(f"{method}: the model exposes no `level_nets`")
        schedule_kind = "multistep"
        bounds = phase_bounds(total, n_weights)
        if any(a == b for a, b in bounds):
            log.warning("%d epochs do not give every one of %d phases an epoch", total, n_weights)
    else:
        bounds = [(0, total)]

    def phase_of(epoch: int) -> int:
        return multistep_phase(epoch, total, n_weights)[0] if multistep else 0

    def phase_range(epoch: int) -> tuple[int, int]:
        """First and last history epoch (1-based) of the phase of history epoch ``epoch``."""
        a, b = bounds[phase_of(epoch - 1)]
        return a + 1, b

    def loss_weights_for(epoch: int) -> np.ndarray:
        from locnet.schedules import level_weights

        return np.asarray(level_weights(schedule_kind, epoch, total, n_weights), dtype=np.float32)

    # ---- data ---------------------------------------------------------------------------------
    table = read_landmark_table(landmark_table)
    train_ds = LandmarkDataset(
        case_dirs_train, levels, table, landmarks, batch_size=int(cfg["batch_size"]),
        shuffle=True, seed=seeds.derive(seed, "data"), cache_size=int(cfg["cache_cases"]),
    )
    val_ds = None
    if case_dirs_val:
        val_ds = LandmarkDataset(
            case_dirs_val, levels, table, landmarks, batch_size=1, shuffle=False,
            cache_size=int(cfg["cache_cases"]),
        )
    else:
        log.warning("no validation cases: every epoch's model counts as best (the last is kept)")

    if not model.built:
        # one eager forward pass creates every variable of a lazily built model, so that the
        # variable list is complete and in the same order for a fresh and for a resumed run
        model(train_ds.case_batch(0)[0], training=False)

    fingerprint = _fingerprint(
        version=STATE_VERSION, method=method, method_cfg=method_cfg,
        train_cfg={k: v for k, v in cfg.items() if k not in ("cache_cases",)},
        grid=grid, landmarks=landmarks, seed=seed, levels=levels,
        variables=[[list(v.shape), str(v.dtype)] for v in model.variables],
        train=[case_id_of(d) for d in case_dirs_train],
        val=[case_id_of(d) for d in (case_dirs_val or [])],
    )

    # ---- state --------------------------------------------------------------------------------
    state_path = state_dir / "state.json"
    state = None
    if state_path.exists():
        try:
            with open(state_path) as fh:
                state = json.load(fh)
        except (OSError, json.JSONDecodeError) as err:
            log.warning("unreadable resume state %s (%s): starting afresh", state_path, err)
            state = None
        if state is not None and (
            state.get("version") != STATE_VERSION or state.get("fingerprint") != fingerprint
        ):
            log.warning("resume state in %s belongs to another configuration: starting afresh",
                        state_dir)
            state = None
        if state is not None:
            needed = [state.get("checkpoint"), state.get("best")]
            needed += [f"snap-{int(e):06d}.npz" for e in state.get("pending", [])]
            missing = [f for f in needed if not f or not (state_dir / f).exists()]
            if missing:
                log.warning("resume state in %s lacks %s: starting afresh", state_dir, missing)
                state = None

    def save_state(epoch_done: int, phase: int, history: list, best_epoch: int,
                   best_err: float, best_file: str, pending: list[int]) -> None:
        ckpt_file = f"ckpt-{epoch_done:06d}.npz"
        arrays = model_snapshot(model)
        if model.optimizer is not None and model.optimizer.built:
            arrays.update(_var_arrays(model.optimizer.variables, "optimizer/"))
        _atomic_savez(state_dir / ckpt_file, arrays)
        io.write_text_atomic(_history_frame(history).to_csv(index=False), state_dir / "history.csv")
        _atomic_write_json(state_path, {
            "version": STATE_VERSION, "fingerprint": fingerprint, "method": method,
            "epoch": epoch_done, "total_epochs": total, "phase": phase,
            "checkpoint": ckpt_file, "best": best_file, "best_epoch": best_epoch,
            "best_score": best_err, "pending": list(pending), "history": history,
        })
        keep = {ckpt_file, best_file} | {f"snap-{e:06d}.npz" for e in pending}
        for f in state_dir.glob("*.npz"):
            if f.name not in keep and re.match(r"^(ckpt|best|snap)-\d+\.npz$", f.name):
                f.unlink(missing_ok=True)

    # ---- start or resume ----------------------------------------------------------------------
    def enter_phase(phase: int) -> None:
        _set_trainable_level(model, n_weights - 1 - phase if multistep else None)
        _compile(model, lr, cfg)

    if state is not None:
        start = int(state["epoch"])
        history = [{k: (float("nan") if v is None else v) for k, v in r.items()}
                   for r in state["history"]]
        best_epoch = int(state["best_epoch"])
        best_err = state["best_score"]
        best_err = float("nan") if best_err is None else float(best_err)
        best_file = state["best"]
        pending = [int(e) for e in state.get("pending", [])]
        log.info("resuming from epoch %d of %d (state in %s)", start, total, state_dir)
        with np.load(state_dir / state["checkpoint"]) as arrays:
            restore_snapshot(model, arrays)
            current_phase = phase_of(start) if start < total else int(state["phase"])
            enter_phase(current_phase)
            has_opt = any(k.startswith("optimizer/") for k in arrays.files)
            if start < total and has_opt and int(state["phase"]) == current_phase:
                model.optimizer.build(model.trainable_variables)
                _assign_arrays(model.optimizer.variables, arrays, "optimizer/", "optimizer")
    else:
        start = 0
        current_phase = 0
        enter_phase(current_phase)
        log.info("training %s: %d epochs, %d train / %d val cases, levels %s, lr %g, seed %d",
                 method, total, len(train_ds.case_dirs),
                 0 if val_ds is None else len(val_ds.case_dirs), levels, lr, seed)
        t0 = time.perf_counter()
        reseed(model, seed, 0, "val")
        err0 = validation_error(model, val_ds) if val_ds is not None else float("nan")
        row0 = {"epoch": 0}
        if multistep:
            row0["phase"] = float("nan")
        row0.update({"loss": float("nan"), "val_error_mm": err0,
                     "time": time.perf_counter() - t0})
        history = [row0]
        best_epoch, best_err = 0, err0  # the fallback: the untrained model, its raw error
        best_file = "best-000000.npz"
        pending = []  # epochs whose selection window is not complete yet
        _atomic_savez(state_dir / best_file, model_snapshot(model))
        save_state(0, current_phase, history, best_epoch, best_err, best_file, pending)
        log.info("epoch 0 (untrained): val_error_mm %.3f", err0)

    # ---- epochs -------------------------------------------------------------------------------
    schedule_cb = LossWeightSchedule(loss_weights_for, weight_names)
    val_cb = ValidationError(val_ds, before=lambda e: reseed(model, seed, e, "val"))
    recorder = _Recorder()
    epochs_this_run = 0
    for epoch in range(start, total):
        if max_epochs_this_run is not None and epochs_this_run >= max_epochs_this_run:
            break
        phase = phase_of(epoch)
        if multistep and phase != current_phase:
            log.info("phase %d: training level_nets[%d] only (epochs %d-%d)", phase,
                     n_weights - 1 - phase, bounds[phase][0] + 1, bounds[phase][1])
            current_phase = phase
            enter_phase(phase)
        t0 = time.perf_counter()
        reseed(model, seed, epoch, "train")
        train_ds.set_epoch(epoch)
        recorder.logs = None
        model.fit(
            train_ds, initial_epoch=epoch, epochs=epoch + 1, shuffle=False, verbose=0,
            callbacks=[schedule_cb, val_cb, recorder] + list(callbacks or []),
        )
        if recorder.logs is None:
            raise RuntimeError(f"epoch {epoch + 1} did not complete")
        row = {"epoch": epoch + 1}
        if multistep:
            row["phase"] = phase
        row.update({k: float(v) for k, v in recorder.logs.items()
                    if isinstance(v, (int, float, np.number))})
        row["time"] = time.perf_counter() - t0
        history.append(row)
        done_epoch = epoch + 1
        snap = f"snap-{done_epoch:06d}.npz"
        _atomic_savez(state_dir / snap, model_snapshot(model))
        if val_ds is None:  # nothing to select on: the last epoch is kept
            best_epoch, best_err, best_file = done_epoch, float("nan"), snap
        else:
            pending.append(done_epoch)
            val = [r.get("val_error_mm", float("nan")) for r in history]
            for c in list(pending):
                if selection_range(c, window, phase_range(c))[1] > done_epoch:
                    continue  # its window reaches beyond the epochs done
                pending.remove(c)
                score = selection_score(val, c, window, phase_range(c))
                history[c]["val_score_mm"] = score
                if _is_better(score, best_err):
                    best_epoch, best_err, best_file = c, score, f"snap-{c:06d}.npz"
        save_state(done_epoch, phase, history, best_epoch, best_err, best_file, pending)
        _log_epoch(log, row, total, best_epoch, best_err)
        epochs_this_run += 1

    done = len(history) - 1
    kept_error = history[best_epoch].get("val_error_mm", float("nan"))
    result = {
        "completed": done >= total,
        "epochs_done": done,
        "best_epoch": best_epoch,
        "best_val_error_mm": kept_error,
        "selection_score_mm": best_err,
        "history": _history_frame(history),
        "model_path": out_dir / "model.keras",
        "metadata_path": out_dir / "metadata.json",
        "history_path": out_dir / "history.csv",
    }
    if done < total:
        log.info("stopped after epoch %d of %d; re-run to resume", done, total)
        return result

    # ---- outputs ------------------------------------------------------------------------------
    with np.load(state_dir / best_file) as arrays:
        restore_snapshot(model, arrays)
    _set_trainable_level(model, None)
    # The kept model is for inference: save an uncompiled copy with the best weights, not
    # the training model, whose optimizer state belongs to the last epoch (not the kept one)
    # and, for multistep, to the last phase's optimizer only.
    kept = type(model).from_config(model.get_config())
    kept.set_weights(model.get_weights())
    with io.atomic_write(out_dir / "model.keras") as tmp:  # ends in .keras, as Keras requires
        kept.save(tmp)
    metadata = {
        "method": method,
        "method_cfg": method_cfg,
        "train_cfg": cfg,
        "schedule": schedule_kind,
        "phases": [list(b) for b in bounds] if multistep else None,
        "grid": grid,
        "landmarks": landmarks,
        "levels": levels,
        "loss_weight_names": weight_names,
        "seed": seed,
        "epochs": total,
        "best_epoch": best_epoch,
        "best_val_error_mm": kept_error,
        "selection_window": window,
        "selection_score_mm": best_err,
        "train_cases": [case_id_of(d) for d in case_dirs_train],
        "val_cases": [case_id_of(d) for d in (case_dirs_val or [])],
        "intensity": intensity,
        "versions": versions(),
    }
    _atomic_write_json(out_dir / "metadata.json", metadata)
    io.write_text_atomic(result["history"].to_csv(index=False), out_dir / "history.csv")
    log.info("kept epoch %d (val_error_mm %.3f, score over a %d-epoch window %.3f); wrote %s",
             best_epoch, kept_error, window, best_err, out_dir)
    return result


def load_trained(out_dir) -> tuple[keras.Model, dict]:
    """The kept model of ``out_dir`` and its metadata."""
    out_dir = Path(out_dir)
    with open(out_dir / "metadata.json") as fh:
        meta = json.load(fh)
    # the custom layers and models are registered by the import of locnet.models above
    model = keras.models.load_model(out_dir / "model.keras", compile=False)
    return model, meta
