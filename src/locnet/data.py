"""Streaming of training cases from the memory-mapped pyramid.

A case is one folder ``results/pyramid/{case}/`` holding ``level{l}.nii`` (float32, uncompressed,
intensities already windowed to [0, 1]) and ``grid.json``. The model contract
(docs/architecture.md) wants, per batch:

* inputs  ``{"level{l}": float32 (B, n_l, n_l, n_l, 1)}`` for the levels the model uses only;
* targets ``{"position": float32 (B, K, 3)`` in grid millimetres, ``"mask": float32 (B, K)}``
  where grid mm are ``g = world - origin`` with ``origin`` from the case's ``grid.json`` and
  ``world`` the RAS landmark position of ``data/landmarks.csv``. A missing landmark (empty
  x/y/z or no row) has mask 0 and position 0.

Nothing is cached beyond a small LRU of *open memory maps* (file mappings, not copies), so memory
does not grow with the cohort: the operating system pages in what a step reads. The levels map
in C order (``locnet.pyramid`` stores them ``[k, j, i]``), so what the backend copies per step is
a plain memory copy out of the page cache, and while a batch trains, a background thread reads
the next batch's files into the page cache (``readahead``): the disk is read in parallel with the
step instead of page by page inside it. Neither changes a value: a batch is the same arrays
with or without them. The order of the
cases in an epoch depends only on ``(seed, epoch)``, never on how many epochs ran in this process,
so a resumed training run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import collections
import math
import os
import re
import threading
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from locnet import pyramid as _pyramid
from locnet import seeds

LEVEL_KEY = re.compile(r"^level(\d+)$")


# --------------------------------------------------------------------------------------------
# single cases
# --------------------------------------------------------------------------------------------
def case_id_of(case_dir: str | os.PathLike) -> str:
    """The case id of a pyramid folder (its name)."""
    return Path(case_dir).name


def open_level(case_dir: str | os.PathLike, level: int, mmap: bool = True) -> np.ndarray:
    """Level ``level`` of a case as a 3D float32 array, memory-mapped when ``mmap``.

    The pyramid module owns the file format (``locnet.pyramid.load_level``); this only checks
    the contract (3D, float32) that the models rely on.
    """
    arr = np.asanyarray(_pyramid.load_level(case_dir, level, mmap=mmap)[0])
    if arr.ndim != 3:
        raise ValueError(f"{case_dir}: level{level} has shape {arr.shape}, expected 3D")
    if arr.dtype != np.float32:
        # a copy, but only if a pyramid file is not float32 as the contract says
        arr = arr.astype(np.float32)
    return arr


def load_case_inputs(
    case_dir: str | os.PathLike, levels, mmap: bool = True
) -> dict[str, np.ndarray]:
    """A case's model inputs for inference: ``{"level{l}": (1, n, n, n, 1) float32}``.

    With ``mmap`` the arrays are views of the memory-mapped files (no copy is made here).
    """
    return {f"level{l}": open_level(case_dir, l, mmap=mmap)[None, ..., None] for l in levels}


def read_landmark_table(table) -> pd.DataFrame:
    """A landmark table (DataFrame or CSV path) with ``case_id`` as string."""
    if not isinstance(table, pd.DataFrame):
        from locnet.fileio import read_landmarks

        table = read_landmarks(table)
    table = table.copy()
    table["case_id"] = table["case_id"].astype(str)
    table["landmark"] = table["landmark"].astype(str)
    for c in ("x", "y", "z"):
        table[c] = pd.to_numeric(table[c], errors="coerce").astype(float)
    return table


def landmark_index(table: pd.DataFrame) -> dict[str, dict[str, np.ndarray]]:
    """``{case_id: {landmark: world xyz (3,) float64 (NaN when missing)}}``."""
    out: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    for row in table.itertuples(index=False):
        out[row.case_id][row.landmark] = np.array([row.x, row.y, row.z], dtype=np.float64)
    return dict(out)


def case_targets(
    world_by_landmark: dict[str, np.ndarray] | None, landmarks, origin
) -> tuple[np.ndarray, np.ndarray]:
    """Targets of one case: ``position (K, 3)`` grid mm (float32) and ``mask (K,)`` (float32).

    ``position = world - origin``; a landmark that is absent or has any NaN coordinate gets
    mask 0 and position 0.
    """
    origin = np.asarray(origin, dtype=np.float64).reshape(3)
    world_by_landmark = world_by_landmark or {}
    pos = np.zeros((len(landmarks), 3), dtype=np.float32)
    mask = np.zeros((len(landmarks),), dtype=np.float32)
    for k, name in enumerate(landmarks):
        w = world_by_landmark.get(name)
        if w is None or not np.all(np.isfinite(w)):
            continue
        pos[k] = (np.asarray(w, dtype=np.float64) - origin).astype(np.float32)
        mask[k] = 1.0
    return pos, mask


def model_levels(model) -> list[int]:
    """The pyramid levels a model reads, from its input names ``level{l}`` (sorted)."""
    levels = getattr(model, "input_levels", None)
    if levels is not None:
        return sorted(int(l) for l in levels)
    names = []
    for t in getattr(model, "inputs", None) or []:
        names.append(getattr(t, "name", ""))
    names += list(getattr(model, "input_names", None) or [])
    found = sorted({int(m.group(1)) for n in names if (m := LEVEL_KEY.match(str(n).split(":")[0]))})
    if not found:
        raise ValueError("cannot tell which pyramid levels the model reads (no 'level{l}' inputs)")
    return found


# --------------------------------------------------------------------------------------------
# page-cache readahead
# --------------------------------------------------------------------------------------------
def read_into_page_cache(paths, chunk_mib: int = 8) -> None:
    """Read ``paths`` start to end and drop the bytes: the OS keeps them in its page cache.

    Unreadable files are skipped (the batch that needs them reports the error itself).
    """
    buf = bytearray(chunk_mib << 20)
    for p in paths:
        try:
            with open(p, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
        except OSError:
            continue


class PageCacheReadahead:
    """Reads files into the page cache on one background thread, one request at a time.

    ``request(paths)`` starts reading unless the previous request is still running (it is then
    dropped: readahead is a hint, and a batch it misses is read on demand as without it).
    ``posix_fadvise(WILLNEED)`` would be the thread-free way, but on this project's machine it
    left the page cache cold (a read after it took as long as a cold read); a plain read does not
    depend on the kernel honouring a hint.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None

    def request(self, paths) -> bool:
        if self._thread is not None and self._thread.is_alive():
            return False
        self._thread = threading.Thread(
            target=read_into_page_cache, args=(list(paths),), name="locnet-readahead", daemon=True
        )
        self._thread.start()
        return True

    def wait(self, timeout: float | None = None) -> None:
        """Block until the current request is read (tests and benchmarks)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def __getstate__(self):  # a dataset copied to another process starts without a thread
        return {"_thread": None}


# --------------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------------
class LandmarkDataset(keras.utils.PyDataset):
    """Batches of whole pyramid levels and landmark targets, streamed from memory maps.

    Args:
        case_dirs: pyramid folders ``results/pyramid/{case}`` (the folder name is the case id).
        levels: the pyramid levels to read (``model_levels(model)``).
        landmark_table: DataFrame or CSV path with ``case_id,landmark,x,y,z`` (world RAS mm).
        landmarks: the configured landmark names; their order is the ``K`` axis.
        batch_size: cases per batch (the paper uses 1); larger batches stack cases.
        shuffle: shuffle the case order every epoch (training); off for evaluation.
        seed: the permutation of epoch ``e`` is drawn from ``derive(seed, "epoch-order", e)``.
        cache_size: how many cases keep their memory maps open (LRU). 0 reopens every time.
        mmap: memory-map the level files (default); False reads them into memory per batch.
        readahead: with ``mmap``, read the next batch's level files into the page cache on a
            background thread while the current batch trains (default on).

    Call :meth:`set_epoch` before each epoch; the order then depends only on ``(seed, epoch)``.
    ``fit`` must be called with ``shuffle=False`` (this class shuffles itself).
    """

    def __init__(
        self,
        case_dirs,
        levels,
        landmark_table,
        landmarks,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        cache_size: int = 2,
        mmap: bool = True,
        readahead: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.case_dirs = [Path(d) for d in case_dirs]
        if not self.case_dirs:
            raise ValueError("no cases given")
        self.case_ids = [case_id_of(d) for d in self.case_dirs]
        self.levels = sorted(int(l) for l in levels)
        self.landmarks = list(landmarks)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.cache_size = int(cache_size)
        self.mmap = bool(mmap)
        self.readahead = PageCacheReadahead() if (readahead and self.mmap) else None
        table = read_landmark_table(landmark_table)
        index = landmark_index(table)
        # targets are tiny (K x 3 per case): computed once, grid.json read once per case
        self._targets = []
        for d, cid in zip(self.case_dirs, self.case_ids):
            origin = _pyramid.read_grid(d).origin
            self._targets.append(case_targets(index.get(cid), self.landmarks, origin))
        self._cache: collections.OrderedDict[int, dict[int, np.ndarray]] = (
            collections.OrderedDict()
        )
        self.epoch = 0
        self._order = self.order_for_epoch(0)

    # ---- order -------------------------------------------------------------------------------
    def order_for_epoch(self, epoch: int) -> np.ndarray:
        """The case order of epoch ``epoch`` (a function of ``(seed, epoch)`` only)."""
        n = len(self.case_dirs)
        if not self.shuffle:
            return np.arange(n)
        rng = np.random.default_rng(seeds.derive(self.seed, "epoch-order", int(epoch)))
        return rng.permutation(n)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._order = self.order_for_epoch(self.epoch)

    # ---- PyDataset API -----------------------------------------------------------------------
    def __len__(self) -> int:
        return math.ceil(len(self.case_dirs) / self.batch_size)

    @property
    def num_batches(self) -> int:
        return len(self)

    def __getitem__(self, index: int):
        if index < 0 or index >= len(self):
            raise IndexError(index)
        idx = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        out = self.batch(idx)
        if index + 1 < len(self):
            self._read_ahead(self._order[(index + 1) * self.batch_size :
                                         (index + 2) * self.batch_size])
        return out

    def level_files(self, idx) -> list[Path]:
        """The level files the cases with indices ``idx`` are read from."""
        return [_pyramid.level_path(self.case_dirs[int(i)], l) for i in idx for l in self.levels]

    def _read_ahead(self, idx) -> None:
        """Ask the readahead thread (if any) for the files of the cases ``idx``."""
        if self.readahead is not None:
            self.readahead.request(self.level_files(idx))

    # ---- batches -----------------------------------------------------------------------------
    def case_arrays(self, i: int) -> dict[int, np.ndarray]:
        """The level arrays (3D memory maps) of case ``i``, through the LRU of open maps."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        arrays = {l: open_level(self.case_dirs[i], l, mmap=self.mmap) for l in self.levels}
        if self.cache_size > 0:
            self._cache[i] = arrays
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return arrays

    def targets(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(position (K, 3), mask (K,))`` of case ``i`` in grid mm."""
        return self._targets[i]

    def batch(self, idx):
        """Inputs and targets of the cases with indices ``idx`` (stacked along axis 0).

        For one case the level arrays are views of the memory maps (no copy here; the backend
        copies what it feeds to the device, straight from the page cache since the maps are in
        C order). Several cases are stacked (one batch-sized copy).
        """
        idx = [int(i) for i in idx]
        per_case = [self.case_arrays(i) for i in idx]
        if len(idx) == 1:
            x = {f"level{l}": per_case[0][l][None, ..., None] for l in self.levels}
        else:
            x = {
                f"level{l}": np.stack([a[l] for a in per_case])[..., None] for l in self.levels
            }
        pos = np.stack([self._targets[i][0] for i in idx])
        mask = np.stack([self._targets[i][1] for i in idx])
        return x, {"position": pos, "mask": mask}

    def case_batch(self, case_index: int, then: int | None = None):
        """Inputs and targets of one case (batch of 1), regardless of the epoch order.

        ``then``: the case index to be asked for next, whose files are then read ahead (as
        ``__getitem__`` does for the next batch of the epoch).
        """
        out = self.batch([case_index])
        if then is not None:
            self._read_ahead([then])
        return out
