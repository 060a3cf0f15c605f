"""Training of every method, with per-epoch validation, best-model keeping and exact resume.

Entry point: :func:`train`. One call trains one method and writes its declared outputs

* ``out_dir/model.keras``   the kept model (see *Model selection*),
* ``out_dir/metadata.json`` config blocks, grid, landmarks, best epoch/error, versions,
* ``out_dir/history.csv``   one row per epoch (``epoch`` 0 = the untrained model),

each written atomically (temporary name, then rename) and only when training has finished.

Model selection
---------------
The kept epoch minimises the validation error *smoothed* over a centred window of
``selection_window`` epochs (the schema's default is 1, the best single epoch; 5 means the
epoch and two on each side, clipped at the ends of training and, for
``multiscale_multistep``, at the ends of the epoch's phase). Measured on the default study
(``benchmarks/model_selection.py``), a 5-epoch window cost 0.9 mm of test error against the
best single epoch on 12 validation cases. Ties go to the earliest epoch;
a window holding a non-finite error never wins; the untrained epoch 0 is the fallback (its
raw error as score). The
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
(fingerprint) starts afresh. :mod:`locnet.checkpoint` reads and writes these files.

A resumed run equals an uninterrupted one (same seed, CPU): the case order of epoch ``e``
depends only on ``(seed, e)``, and at the start of every epoch (and before every validation)
all random-seed states of the model are set from ``(seed, e)``; so no random state carries over
from one epoch to the next other than what the checkpoint holds.

``multiscale_multistep``
------------------------
Trained in ``L`` phases, coarse to fine, one per level sub-network ``model.level_nets[l]``
(indexed by pyramid level, 0 = finest, like ``model.loss_weights``). The epochs are split evenly
as ``locnet.schedules.multistep_level`` says: phase ``p = floor(L * epoch / E)`` trains level
``l = L - 1 - p`` (:class:`locnet.schedules.Phases`). In that phase only ``level_nets[l]`` is
trainable and the loss weights are one-hot at ``l`` (schedule ``multistep``). Each phase is
compiled afresh with a new Adam optimizer (the trainable variables change); a run resumed
mid-phase restores that phase's optimizer state; one resumed at a phase boundary starts the
new phase's optimizer afresh, as an uninterrupted run does.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from locnet import checkpoint, fileio, seeds
from locnet.checkpoint import restore_snapshot
from locnet.config import defaults as schema_defaults
from locnet.data import (LandmarkDataset, case_id_of, chain_boxes, model_levels,
                         read_landmark_table)
from locnet.methods import REGISTRY
from locnet.models import predict_position
from locnet.schedules import Phases, level_weights

#: the training settings and their defaults: the config schema's ``training`` block, their one
#: source (``seeds`` is the workflow's: one job per seed)
DEFAULT_TRAIN_CFG = {k: v for k, v in schema_defaults("training").items() if k != "seeds"}
#: open memory maps kept per dataset (LRU)
CACHE_CASES = 2


# --------------------------------------------------------------------------------------------
# model selection
# --------------------------------------------------------------------------------------------
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
def _level_net_items(model) -> list[tuple[int, object]]:
    nets = getattr(model, "level_nets", None)
    if nets is None:
        return []
    if isinstance(nets, dict):
        return [(int(str(k).replace("level", "")), v) for k, v in nets.items()]
    return list(enumerate(nets))


def _set_trainable_level(model, level: int | None) -> None:
    """Only ``model.level_nets[level]`` trainable (``None``: everything trainable).

    A chain with the map prior (``model.supervised``) also trains the nets of the finer levels
    ``l < level``: their position errors weigh 0 until their own phase, so the prior alone
    moves them, and each level's maps are peaks, not silent, when its phase starts. Finished
    (coarser) levels stay frozen.
    """
    model.trainable = True
    prior = bool(getattr(model, "supervised", False))
    for l, net in _level_net_items(model):
        net.trainable = level is None or l == level or (prior and l < level)


# --------------------------------------------------------------------------------------------
# training: helpers
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


def _compile(model, learning_rate: float, decay: str = "constant", steps: int = 0) -> None:
    """Adam at ``learning_rate``; with ``decay`` ``"cosine"`` the rate falls along a half
    cosine to 0 over ``steps`` optimizer steps (the rate is a function of the optimizer's step
    count, which the resume state keeps, so a resumed run continues on the same curve)."""
    if decay == "cosine":
        if steps < 1:
            raise ValueError(f"lr_decay cosine needs the number of steps, got {steps}")
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, int(steps))
    elif decay != "constant":
        raise ValueError(f"lr_decay must be 'constant' or 'cosine', got {decay!r}")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate))


def _log_epoch(log, row: dict, total: int, best_epoch: int, best_err: float) -> None:
    parts = [f"epoch {row['epoch']}/{total}"]
    if "phase" in row:
        parts.append(f"phase {row['phase']}")
    for k, v in row.items():
        if k == "loss" or checkpoint.LEVEL_METRIC.match(k):
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


# --------------------------------------------------------------------------------------------
# training: set-up
# --------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """What one call of :func:`train` fixes before its first epoch."""

    method: str
    method_cfg: dict
    cfg: dict  # the training config, defaults filled in
    grid: dict
    landmarks: list
    case_dirs_train: Any
    case_dirs_val: Any
    out_dir: Path
    state_dir: Path
    seed: int
    log: logging.Logger
    total: int  # epochs
    lr: float
    window: int  # epochs of the model-selection window
    schedule_kind: str
    intensity: dict | None
    model: Any
    levels: list
    weight_names: list
    phases: Phases
    train_ds: LandmarkDataset
    val_ds: LandmarkDataset | None
    fingerprint: str = ""
    started: str = ""  # UTC time this call of train() began (a resumed job: its last run)


def _build_model(method, method_cfg, grid, landmarks, seed, build_fn):
    """The freshly initialised model (initialisation seeded from ``seed``)."""
    keras.utils.set_random_seed(seeds.derive(seed, "init"))
    # the model builder takes the landmark names from its config block (K = len(landmarks))
    model = build_fn(method, {**method_cfg, "landmarks": landmarks}, grid)
    if not hasattr(model, "loss_weights") or not hasattr(model.loss_weights, "assign"):
        raise TypeError(f"{method}: the model has no `loss_weights` variable")
    return model


def _training_phases(method, model, total: int, n_levels: int, log) -> Phases:
    """The phases of the run: one per level for a multi-phase method, else one."""
    multistep = method in REGISTRY and REGISTRY[method].multiphase
    if multistep and not _level_net_items(model):
        raise TypeError(f"{method}: the model exposes no `level_nets`")
    phases = Phases(total, n_levels, multistep)
    if multistep and phases.has_empty_phase():
        log.warning("%d epochs do not give every one of %d phases an epoch", total, n_levels)
    return phases


def loader_config(cfg: dict) -> dict:
    """The ``training.loader`` block of ``cfg`` with the schema's defaults filled in."""
    return {**schema_defaults("training", "loader"), **(cfg.get("loader") or {})}


def training_boxes(model, dataset: LandmarkDataset, cfg: dict, log=None) -> dict | None:
    """The boxes (``locnet.data.chain_boxes``) a chain's training reads its finer levels as,
    sized from ``dataset``'s landmarks; ``None`` for other models or ``loader.crop`` off."""
    from locnet.models.multiscale import MultiScaleLocNet

    loader = loader_config(cfg)
    if not (loader["crop"] and isinstance(model, MultiScaleLocNet)):
        return None
    targets = [dataset.targets(i) for i in range(len(dataset.case_dirs))]
    boxes = chain_boxes(targets, dataset.levels, model.finest_shape, model.finest_spacing_mm,
                        model.patch, model.noise_mm, float(loader["margin_mm"]))
    if log is not None:
        whole = sum(model.level_size(l) ** 3 for l in dataset.levels)
        read = sum(int(np.prod(boxes[l]["shape"])) if l in boxes else model.level_size(l) ** 3
                   for l in dataset.levels)
        log.info("training reads boxes of the finer levels (%s): %.1f%% of the voxels of whole "
                 "levels", ", ".join(f"level{l} {'x'.join(map(str, b['shape']))}"
                                     for l, b in sorted(boxes.items())), 100.0 * read / whole)
    return boxes


def _datasets(case_dirs_train, case_dirs_val, levels, landmark_table, landmarks, cfg, seed, log,
              model=None):
    """The training dataset (shuffled per epoch; a chain's reads boxes of its finer levels, see
    :func:`training_boxes`) and the validation dataset (or ``None``; whole levels)."""
    table = read_landmark_table(landmark_table)

    def training_set(boxes=None):
        return LandmarkDataset(
            case_dirs_train, levels, table, landmarks, batch_size=int(cfg["batch_size"]),
            shuffle=True, seed=seeds.derive(seed, "data"), cache_size=CACHE_CASES, boxes=boxes,
            shift_mm=float(cfg["augment_shift_mm"]),
        )

    train_ds = training_set()
    boxes = training_boxes(model, train_ds, cfg, log)
    if boxes:
        train_ds = training_set(boxes)
    val_ds = None
    if case_dirs_val:
        val_ds = LandmarkDataset(
            case_dirs_val, levels, table, landmarks, batch_size=1, shuffle=False,
            cache_size=CACHE_CASES,
        )
    else:
        log.warning("no validation cases: every epoch's model counts as best (the last is kept)")
    return train_ds, val_ds


def _set_up(method, method_cfg, train_cfg, grid, landmarks, case_dirs_train, case_dirs_val,
            landmark_table, out_dir, state_dir, seed, log, build_fn) -> _Run:
    """Check the arguments, prepare the folders, build the model and the datasets."""
    log = log or logging.getLogger("locnet.train")
    cfg = {**DEFAULT_TRAIN_CFG, **(train_cfg or {})}
    method_cfg = dict(method_cfg or {})
    total = int(cfg["epochs"])
    lr = float(cfg["learning_rate"])
    window = int(cfg["selection_window"])
    if window < 1 or window % 2 == 0:
        raise ValueError(f"{method}: selection_window must be an odd number >= 1, got {window}")
    seed = int(seed)
    out_dir, state_dir = Path(out_dir), Path(state_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    landmarks = list(landmarks)
    fileio.remove_stale_temporaries(out_dir, state_dir)

    # the training cases' intensities, for inference's check of new scans
    intensity = _intensity_summary(case_dirs_train, grid, log)
    model = _build_model(method, method_cfg, grid, landmarks, seed, build_fn or _default_build)
    levels = model_levels(model)
    weight_names = _weight_names(model, levels)
    phases = _training_phases(method, model, total, len(weight_names), log)
    schedule_kind = "multistep" if phases.multistep else method_cfg.get("schedule",
                                                                         cfg["schedule"])
    train_ds, val_ds = _datasets(case_dirs_train, case_dirs_val, levels, landmark_table,
                                 landmarks, cfg, seed, log, model=model)
    if not model.built:
        # one eager forward pass creates every variable of a lazily built model, so that the
        # variable list is complete and in the same order for a fresh and for a resumed run
        model(train_ds.case_batch(0)[0], training=False)
    run = _Run(method=method, method_cfg=method_cfg, cfg=cfg, grid=grid, landmarks=landmarks,
               case_dirs_train=case_dirs_train, case_dirs_val=case_dirs_val, out_dir=out_dir,
               state_dir=state_dir, seed=seed, log=log, total=total,
               lr=lr, window=window, schedule_kind=schedule_kind,
               intensity=intensity, model=model, levels=levels, weight_names=weight_names,
               phases=phases, train_ds=train_ds, val_ds=val_ds)
    run.fingerprint = checkpoint.fingerprint(
        method=method, method_cfg=method_cfg,
        train_cfg=cfg,
        grid=grid, landmarks=landmarks, seed=seed, levels=levels,
        variables=[[list(v.shape), str(v.dtype)] for v in model.variables],
        train=[case_id_of(d) for d in case_dirs_train],
        val=[case_id_of(d) for d in (case_dirs_val or [])],
    )
    return run


# --------------------------------------------------------------------------------------------
# training: start or resume
# --------------------------------------------------------------------------------------------
def _enter_phase(run: _Run, phase: int) -> None:
    """Make only the level sub-network of ``phase`` trainable and compile afresh."""
    _set_trainable_level(run.model, run.phases.trained_level(phase))
    # a new optimizer per phase: its decay runs over the phase's own epochs
    first, end = run.phases.bounds[phase] if run.phases.multistep else (0, run.total)
    _compile(run.model, run.lr, run.cfg["lr_decay"],
             (end - first) * len(run.train_ds))


def _save_state(run: _Run, progress: checkpoint.Progress) -> None:
    checkpoint.save_state(run.state_dir, run.model, progress, fingerprint=run.fingerprint,
                          method=run.method, total_epochs=run.total)


def _start_afresh(run: _Run) -> checkpoint.Progress:
    """Epoch 0: validate the untrained model, keep it as the fallback, commit the state."""
    _enter_phase(run, 0)
    run.log.info("training %s: %d epochs, %d train / %d val cases, levels %s, lr %g, seed %d",
                 run.method, run.total, len(run.train_ds.case_dirs),
                 0 if run.val_ds is None else len(run.val_ds.case_dirs), run.levels, run.lr,
                 run.seed)
    t0 = time.perf_counter()
    reseed(run.model, run.seed, 0, "val")
    err0 = validation_error(run.model, run.val_ds) if run.val_ds is not None else float("nan")
    row0 = {"epoch": 0}
    if run.phases.multistep:
        row0["phase"] = float("nan")
    row0.update({"loss": float("nan"), "val_error_mm": err0,
                 "time": time.perf_counter() - t0})
    # the fallback: the untrained model, its raw error; pending: epochs whose selection
    # window is not complete yet
    progress = checkpoint.Progress(epoch=0, phase=0, history=[row0], best_epoch=0,
                                   best_score=err0, best_file="best-000000.npz", pending=[])
    checkpoint.save_snapshot(run.model, run.state_dir / progress.best_file)
    _save_state(run, progress)
    run.log.info("epoch 0 (untrained): val_error_mm %.3f", err0)
    return progress


def _start_or_resume(run: _Run) -> tuple[checkpoint.Progress, int]:
    """The progress to continue from and the phase the model is compiled for."""
    state = checkpoint.load_state(run.state_dir, run.fingerprint, run.log)
    if state is None:
        return _start_afresh(run), 0
    progress = checkpoint.progress_from_state(state)
    start = progress.epoch
    run.log.info("resuming from epoch %d of %d (state in %s)", start, run.total, run.state_dir)
    phase = run.phases.phase_of(start) if start < run.total else progress.phase
    # a run resumed at a phase boundary starts the new phase's optimizer afresh
    checkpoint.restore_checkpoint(run.model, run.state_dir, state,
                                  lambda: _enter_phase(run, phase),
                                  with_optimizer=start < run.total and progress.phase == phase)
    return progress, phase


# --------------------------------------------------------------------------------------------
# training: epochs
# --------------------------------------------------------------------------------------------
def _builtin_callbacks(run: _Run) -> list:
    """Loss-weight schedule, validation error and the recorder of the logs (last)."""
    kind, total, n_levels = run.schedule_kind, run.total, len(run.weight_names)

    def loss_weights_for(epoch: int) -> np.ndarray:
        return np.asarray(level_weights(kind, epoch, total, n_levels), dtype=np.float32)

    model, seed = run.model, run.seed
    return [LossWeightSchedule(loss_weights_for, run.weight_names),
            ValidationError(run.val_ds, before=lambda e: reseed(model, seed, e, "val")),
            _Recorder()]


def run_epoch(model, dataset, epoch: int, callbacks) -> dict:
    """Train ``model`` one epoch over ``dataset`` (a ``keras.utils.PyDataset``), batch by batch
    with ``train_on_batch``, calling ``callbacks`` as ``fit`` would; returns the epoch logs.

    Why not ``model.fit``: on TensorFlow, every ``fit`` call wraps the dataset in a fresh
    ``tf.data`` pipeline, reads two extra batches to learn its signature, and on leaving ``fit``
    tearing that pipeline down stalled for about 5 s in a third to a half of the epochs of
    the default study (epochs of 10.3 s instead of 5.5 s; benchmarks/README.md, "Epoch time").
    The same ``train_step`` runs here on the same batches. The epoch logs are the means of the
    batch logs weighted by batch size, which is what ``fit`` reports for batches of one.
    Weights match ``fit``'s to rounding, not bit for bit. With ReLU U-Nets that rounding once
    decided whether the multi-step chain's finest level died; with ``unet.activation:
    leaky_relu`` (config.yaml) no unit can die, and the same case learns (benchmarks/README.md).
    """
    cbs = keras.callbacks.CallbackList(list(callbacks), model=model, add_history=False,
                                       add_progbar=False, verbose=0, epochs=epoch + 1,
                                       steps=len(dataset))
    model.stop_training = False
    cbs.on_train_begin()
    cbs.on_epoch_begin(epoch)
    sums: dict[str, float] = {}
    seen = 0
    for step in range(len(dataset)):
        cbs.on_train_batch_begin(step)
        batch = dataset[step]
        x, y = batch[0], batch[1] if len(batch) > 1 else None
        n = int(np.shape(keras.tree.flatten(x)[0])[0])
        logs = model.train_on_batch(x, y, return_dict=True)
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + n * float(v)
        seen += n
        cbs.on_train_batch_end(step, logs)
        if model.stop_training:
            break
    logs = {k: v / max(seen, 1) for k, v in sums.items()}
    cbs.on_epoch_end(epoch, logs)
    cbs.on_train_end(logs)
    return logs


def _fit_epoch(run: _Run, epoch: int, phase: int, builtin: list, callbacks) -> dict:
    """Train epoch ``epoch`` (0-based); returns its history row."""
    recorder = builtin[-1]
    t0 = time.perf_counter()
    reseed(run.model, run.seed, epoch, "train")
    run.train_ds.set_epoch(epoch)
    recorder.logs = None
    run_epoch(run.model, run.train_ds, epoch, builtin + list(callbacks or []))
    if recorder.logs is None:
        raise RuntimeError(f"epoch {epoch + 1} did not complete")
    row = {"epoch": epoch + 1}
    if run.phases.multistep:
        row["phase"] = phase
    row.update({k: float(v) for k, v in recorder.logs.items()
                if isinstance(v, (int, float, np.number))})
    row["time"] = time.perf_counter() - t0
    return row


def _update_selection(run: _Run, progress: checkpoint.Progress, done_epoch: int) -> None:
    """Score every pending epoch whose selection window is now complete; keep the best."""
    progress.pending.append(done_epoch)
    val = [r.get("val_error_mm", float("nan")) for r in progress.history]
    for c in list(progress.pending):
        phase_range = run.phases.history_range(c)
        if selection_range(c, run.window, phase_range)[1] > done_epoch:
            continue  # its window reaches beyond the epochs done
        progress.pending.remove(c)
        score = selection_score(val, c, run.window, phase_range)
        progress.history[c]["val_score_mm"] = score
        if _is_better(score, progress.best_score):
            progress.best_epoch, progress.best_score = c, score
            progress.best_file = checkpoint.snapshot_name(c)


def _record_epoch(run: _Run, progress: checkpoint.Progress, done_epoch: int, phase: int,
                  row: dict) -> None:
    """Add the row of ``done_epoch``, snapshot the model, update the selection, commit."""
    progress.history.append(row)
    snap = checkpoint.snapshot_name(done_epoch)
    checkpoint.save_snapshot(run.model, run.state_dir / snap)
    if run.val_ds is None:  # nothing to select on: the last epoch is kept
        progress.best_epoch, progress.best_score, progress.best_file = (
            done_epoch, float("nan"), snap)
    else:
        _update_selection(run, progress, done_epoch)
    progress.epoch, progress.phase = done_epoch, phase
    _save_state(run, progress)
    _log_epoch(run.log, row, run.total, progress.best_epoch, progress.best_score)


def _train_epoch(run: _Run, progress: checkpoint.Progress, epoch: int, entered: int,
                 builtin: list, callbacks) -> int:
    """Train, record and commit epoch ``epoch`` (0-based), entering its phase first when it
    starts a new one; returns the phase the model is now compiled for."""
    phase = run.phases.phase_of(epoch)
    if run.phases.multistep and phase != entered:
        first, end = run.phases.bounds[phase]
        run.log.info("phase %d: training level_nets[%d] only (epochs %d-%d)", phase,
                     run.phases.trained_level(phase), first + 1, end)
        entered = phase
        _enter_phase(run, phase)
    row = _fit_epoch(run, epoch, phase, builtin, callbacks)
    _record_epoch(run, progress, epoch + 1, phase, row)
    return entered


# --------------------------------------------------------------------------------------------
# training: outputs
# --------------------------------------------------------------------------------------------
def _result(run: _Run, progress: checkpoint.Progress) -> dict:
    done = len(progress.history) - 1
    return {
        "completed": done >= run.total,
        "epochs_done": done,
        "best_epoch": progress.best_epoch,
        "best_val_error_mm": progress.history[progress.best_epoch].get("val_error_mm",
                                                                       float("nan")),
        "selection_score_mm": progress.best_score,
        "history": checkpoint.history_frame(progress.history),
        "model_path": run.out_dir / "model.keras",
        "metadata_path": run.out_dir / "metadata.json",
        "history_path": run.out_dir / "history.csv",
    }


def _metadata(run: _Run, progress: checkpoint.Progress, kept_error: float) -> dict:
    return {
        "method": run.method,
        "method_cfg": run.method_cfg,
        "train_cfg": run.cfg,
        "schedule": run.schedule_kind,
        "phases": [list(b) for b in run.phases.bounds] if run.phases.multistep else None,
        "grid": run.grid,
        "landmarks": run.landmarks,
        "levels": run.levels,
        "loss_weight_names": run.weight_names,
        "seed": run.seed,
        "epochs": run.total,
        "best_epoch": progress.best_epoch,
        "best_val_error_mm": kept_error,
        "selection_window": run.window,
        "selection_score_mm": progress.best_score,
        "train_cases": [case_id_of(d) for d in run.case_dirs_train],
        "val_cases": [case_id_of(d) for d in (run.case_dirs_val or [])],
        "intensity": run.intensity,
        "versions": versions(),
        "job": job_facts(run.started),
    }


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def compute_threads() -> int | None:
    """Threads the backend computes an op on: TensorFlow's intra-op pool (the workflow sets
    it from the rule's ``threads``), else the usable cores; None where unknown."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        n = tf.config.threading.get_intra_op_parallelism_threads()
        if n:
            return int(n)
        env = os.environ.get("TF_NUM_INTRAOP_THREADS", "")
        if env.strip().isdigit() and int(env) > 0:
            return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count()


def job_facts(started: str) -> dict:
    """When this training job ran (UTC, ISO 8601) and on how many threads: the results page
    adds up the jobs' wall span from these, which the summed job times overstate when jobs
    run side by side (profiles/cpu)."""
    return {"started_utc": started or None, "finished_utc": _utc_now(),
            "threads": compute_threads()}


def _write_outputs(run: _Run, progress: checkpoint.Progress, result: dict) -> None:
    """Write the kept model, its metadata and the history to ``run.out_dir``."""
    model = run.model
    with np.load(run.state_dir / progress.best_file) as arrays:
        restore_snapshot(model, arrays)
    _set_trainable_level(model, None)
    # The kept model is for inference: save an uncompiled copy with the best weights, not
    # the training model, whose optimizer state belongs to the last epoch (not the kept one)
    # and, for multistep, to the last phase's optimizer only.
    kept = type(model).from_config(model.get_config())
    kept.set_weights(model.get_weights())
    with fileio.atomic_write(run.out_dir / "model.keras") as tmp:  # ends in .keras, as Keras requires
        kept.save(tmp)
    kept_error = result["best_val_error_mm"]
    checkpoint.write_json(run.out_dir / "metadata.json", _metadata(run, progress, kept_error))
    fileio.write_text_atomic(result["history"].to_csv(index=False), run.out_dir / "history.csv")
    run.log.info("kept epoch %d (val_error_mm %.3f, score over a %d-epoch window %.3f); "
                 "wrote %s", progress.best_epoch, kept_error, run.window, progress.best_score,
                 run.out_dir)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
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
        train_cfg: ``epochs``, ``learning_rate``, ``batch_size``, ``schedule``,
            ``selection_window``; missing keys take ``DEFAULT_TRAIN_CFG`` (the schema's).
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

    Raises :class:`locnet.checkpoint.StateLocked` (naming the other process) when another
    trainer holds ``state_dir``'s lock (:func:`locnet.checkpoint.state_lock`).

    Returns:
        dict with ``completed``, ``epochs_done``, ``best_epoch``, ``best_val_error_mm``,
        ``history`` (DataFrame) and the output paths.
    """
    # one trainer per state folder: a second one (a re-run after --unlock, a job left running
    # after its snakemake was killed) is refused, naming the first (checkpoint.state_lock)
    with checkpoint.state_lock(state_dir, log):
        return _train_locked(method, method_cfg, train_cfg, grid, landmarks, case_dirs_train,
                             case_dirs_val, landmark_table, out_dir, state_dir, seed, log,
                             callbacks, max_epochs_this_run, build_fn)


def _train_locked(method, method_cfg, train_cfg, grid, landmarks, case_dirs_train,
                  case_dirs_val, landmark_table, out_dir, state_dir, seed, log, callbacks,
                  max_epochs_this_run, build_fn) -> dict:
    """:func:`train`, with the state folder's lock held."""
    started = _utc_now()
    run = _set_up(method, method_cfg, train_cfg, grid, landmarks, case_dirs_train,
                  case_dirs_val, landmark_table, out_dir, state_dir, seed, log, build_fn)
    run.started = started
    progress, entered = _start_or_resume(run)
    builtin = _builtin_callbacks(run)
    epochs_this_run = 0
    for epoch in range(progress.epoch, run.total):
        if max_epochs_this_run is not None and epochs_this_run >= max_epochs_this_run:
            break
        entered = _train_epoch(run, progress, epoch, entered, builtin, callbacks)
        epochs_this_run += 1

    result = _result(run, progress)
    if not result["completed"]:
        run.log.info("stopped after epoch %d of %d; re-run to resume", result["epochs_done"],
                     run.total)
        return result
    _write_outputs(run, progress, result)
    return result
