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

Boxes (training of the multi-scale chains, ``training.loader.crop``): a chain reads its finer
levels only through ``P^3`` crops around the coarser level's answer, so a dataset given
``boxes`` delivers each of those levels as a fixed-size box around the case's annotated
landmarks (:func:`chain_boxes`, :meth:`LandmarkDataset.box_corner`) plus its corner as the input
``offset{l}`` (float32 (B, 3), level voxels), instead of the whole level. A box is sized once
from every training case's landmarks, so its shape is the same for every case and compiled
steps are not traced again. See docs/methods.md, "Training input: boxes".
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
# boxes: the part of a level a chain's crops can reach
# --------------------------------------------------------------------------------------------
def box_reach_voxels(level: int, finest_spacing_mm: float, patch: int, shift_mm: float) -> float:
    """How far (level voxels, per axis) from a landmark a chain's ``patch^3`` crop at ``level``
    reads when its centre lies within ``shift_mm`` of the landmark: half the patch plus the
    shift (the trilinear crop reads one voxel beyond, counted by :func:`chain_boxes`)."""
    return (int(patch) - 1) / 2.0 + float(shift_mm) / (float(finest_spacing_mm) * 2**int(level))


def landmark_span_voxels(position_mm, mask, level: int, finest_spacing_mm: float):
    """``(lo (3,), hi (3,))``: the bounding box of a case's valid landmarks in level voxels;
    ``None`` when none is annotated."""
    from locnet.geometry import grid_mm_to_voxel

    valid = np.asarray(mask) > 0
    if not valid.any():
        return None
    v = grid_mm_to_voxel(np.asarray(position_mm, np.float64)[valid], level, finest_spacing_mm)
    return v.min(axis=0), v.max(axis=0)


def shift_volume(arr: np.ndarray, shift, fill: float = 0.0) -> np.ndarray:
    """``arr`` translated by ``shift`` (3,) whole voxels: ``out[v + shift] = arr[v]``; what
    comes in from beyond the edge is ``fill`` (0: the outside of the scan after windowing,
    :mod:`locnet.pyramid`)."""
    out = np.full(arr.shape, fill, dtype=arr.dtype)
    src, dst = [], []
    for n, d in zip(arr.shape, np.asarray(shift, dtype=int)):
        if abs(d) >= n:
            return out
        src.append(slice(max(0, -d), n - max(0, d)))
        dst.append(slice(max(0, d), n - max(0, -d)))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def chain_boxes(targets, levels, finest_shape: int, finest_spacing_mm: float, patch: int,
                noise_mm: float, margin_mm: float) -> dict[int, dict]:
    """The training boxes of a multi-scale chain: ``{level: {"shape": (3,) int, "reach":
    float}}`` for every level but the coarsest (whose Loc-Net reads the whole level).

    ``targets``: ``[(position (K, 3) grid mm, mask (K,)), ...]`` of the training cases. On each
    axis a box holds the largest landmark spread of any case plus ``reach`` on either side
    (:func:`box_reach_voxels` with ``margin_mm`` for the coarser level's error, plus
    ``noise_mm`` at level 0 where the noisy chain shifts its crop) plus 2 voxels (the trilinear
    neighbour and the rounding of the corner), and at most the level.
    """
    levels = sorted(int(l) for l in levels)
    out = {}
    for level in levels[:-1]:
        n = int(finest_shape) // 2**level
        shift = float(margin_mm) + (float(noise_mm) if level == 0 else 0.0)
        reach = box_reach_voxels(level, finest_spacing_mm, patch, shift)
        spread = np.zeros(3)
        for pos, mask in targets:
            span = landmark_span_voxels(pos, mask, level, finest_spacing_mm)
            if span is not None:
                spread = np.maximum(spread, span[1] - span[0])
        shape = np.minimum(np.ceil(spread + 2 * reach).astype(int) + 2, n)
        out[level] = {"shape": tuple(int(b) for b in shape), "reach": float(reach)}
    return out


def box_corner(span, shape, reach: float, n: int) -> np.ndarray:
    """The first voxel (3,) int of a box of ``shape`` at a level of ``n`` voxels per axis: the
    voxels a crop within ``reach`` of the landmarks' span ``(lo, hi)`` can read, centred in the
    box, and the box moved to lie inside the level. No landmark (``span`` None): the level's
    centre."""
    shape = np.asarray(shape, int)
    if span is None:
        return (n - shape) // 2
    first = np.floor(span[0] - reach).astype(int)
    need = np.floor(span[1] + reach).astype(int) + 2 - first  # voxels the crops can read
    corner = first - np.maximum(shape - need, 0) // 2
    return np.clip(corner, 0, n - shape).astype(int)


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


def advise_box(arr: np.ndarray, slices) -> None:
    """Ask the kernel to read the file ranges a box of the memory-mapped C-order 3D ``arr``
    lies in (one range per slab of the first axis) into the page cache, asynchronously
    (``posix_fadvise(WILLNEED)``). A hint: nothing happens for an array that is not a map."""
    filename, offset = getattr(arr, "filename", None), getattr(arr, "offset", None)
    if filename is None or offset is None or not hasattr(os, "posix_fadvise") or arr.ndim != 3:
        return
    base = arr.__array_interface__["data"][0] - _map_start(arr)
    si, sj, sk = arr.strides
    if min(si, sj, sk) <= 0:
        return
    length = (slices[1].stop - slices[1].start) * sj
    fd = os.open(filename, os.O_RDONLY)
    try:
        for i in range(slices[0].start, slices[0].stop):
            start = offset + base + i * si + slices[1].start * sj
            os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def _map_start(arr: np.ndarray) -> int:
    """The address of the first byte of the mapping ``arr`` views."""
    b = arr
    while isinstance(getattr(b, "base", None), np.ndarray):
        b = b.base
    return b.__array_interface__["data"][0]


class PageCacheReadahead:
    """Reads files into the page cache on one background thread, one request at a time.

    ``request(paths)`` starts reading unless the previous request is still running (it is then
    dropped: readahead is a hint, and a batch it misses is read on demand as without it).
    ``posix_fadvise(WILLNEED)`` would be the thread-free way, but on this project's machine it
    left the page cache cold (a read after it took as long as a cold read); a plain read does not
    depend on the kernel honouring a hint.
    """

    def __init__(self, reader=read_into_page_cache):
        self._thread: threading.Thread | None = None
        self.reader = reader  # reads what a request names (default: whole files)
        self.pending: list = []  # what the current request names

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def request(self, paths) -> bool:
        if self.busy():
            return False
        self.pending = list(paths)
        self._thread = threading.Thread(
            target=self.reader, args=(list(paths),), name="locnet-readahead", daemon=True
        )
        self._thread.start()
        return True

    def wait(self, timeout: float | None = None) -> None:
        """Block until the current request is read (tests and benchmarks)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def __getstate__(self):  # a dataset copied to another process starts without a thread
        return {"_thread": None, "reader": self.reader, "pending": []}


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
            background thread while the current batch trains (default on); with ``boxes``, the
            thread cuts the next batch's boxes (the same arrays the batch would cut).
        boxes: ``{level: {"shape": (3,), "reach": r}}`` (:func:`chain_boxes`): deliver these
            levels as boxes of that shape around each case's landmarks, with their corners as
            inputs ``offset{level}``; the other levels whole. ``None`` (default): all whole.
        shift_mm: augmentation (training): every case of every epoch is translated by a random
            whole number of voxels of the coarsest level read, up to ``shift_mm`` per axis
            (:meth:`case_shift`); 0 (default): none. See :func:`shift_volume`.

    Call :meth:`set_epoch` before each epoch; the order (and each case's shift) then depends only
    on ``(seed, epoch)``.
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
        boxes: dict | None = None,
        shift_mm: float = 0.0,
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
        self.boxes = {int(l): dict(b) for l, b in (boxes or {}).items()}
        if set(self.boxes) - set(self.levels):
            raise ValueError(f"boxes for levels {sorted(self.boxes)} not all read ({self.levels})")
        self.shift_mm = float(shift_mm)
        if self.shift_mm < 0:
            raise ValueError(f"shift_mm must be >= 0, got {shift_mm}")
        reader = self._read_boxes if self.boxes else read_into_page_cache
        self.readahead = PageCacheReadahead(reader) if (readahead and self.mmap) else None
        table = read_landmark_table(landmark_table)
        index = landmark_index(table)
        # targets are tiny (K x 3 per case): computed once, grid.json read once per case
        self._targets = []
        self._corners = []  # the box corners of each case (boxed levels only)
        self._grids = []
        self._ready: dict[int, dict[int, np.ndarray]] = {}  # boxes cut ahead, by case
        for d, cid in zip(self.case_dirs, self.case_ids):
            grid = _pyramid.read_grid(d)
            self._grids.append(grid)
            self._targets.append(case_targets(index.get(cid), self.landmarks, grid.origin))
            self._corners.append(self._case_corners(*self._targets[-1], grid))
        self._cache: collections.OrderedDict[int, dict[int, np.ndarray]] = (
            collections.OrderedDict()
        )
        self.epoch = 0
        self._order = self.order_for_epoch(0)

    def _case_corners(self, pos, mask, grid) -> dict[int, np.ndarray]:
        out = {}
        for l, box in self.boxes.items():
            span = landmark_span_voxels(pos, mask, l, grid.spacing)
            out[l] = box_corner(span, box["shape"], box["reach"], grid.shape // 2**l)
        return out

    def box_corner(self, i: int, level: int) -> np.ndarray:
        """The first voxel (3,) int of case ``i``'s box at ``level`` (a boxed level)."""
        return self._corners[int(i)][int(level)]

    def box_slices(self, i: int, level: int) -> tuple[slice, slice, slice]:
        """The part of the level array that is case ``i``'s box."""
        c, shape = self.box_corner(i, level), self.boxes[int(level)]["shape"]
        return tuple(slice(int(a), int(a) + int(b)) for a, b in zip(c, shape))

    def case_levels(self, i: int) -> dict[int, np.ndarray]:
        """What a batch holds of case ``i``: ``{level: array}``, whole levels as views of their
        maps, boxes as copies of the maps' slices (cut ahead by the readahead thread, if any)."""
        i = int(i)
        arrays = dict(self.case_arrays(i))
        if not self.boxes:
            return arrays
        if self.readahead is not None and self.readahead.busy() and i in self.readahead.pending:
            self.readahead.wait()  # it is cutting this case's boxes
        ready = self._ready.pop(i, None) or {}
        for l in self.boxes:
            arrays[l] = ready[l] if l in ready else self.cut_box(arrays[l], i, l)
        return arrays

    def cut_box(self, level_array: np.ndarray, i: int, level: int) -> np.ndarray:
        """Case ``i``'s box of ``level`` from its level array: a copy of the slice, the only
        part of the level read from disk."""
        return np.ascontiguousarray(level_array[self.box_slices(i, level)])

    def _read_boxes(self, idx) -> None:
        """Readahead of boxed cases: cut the boxes, read the other levels' files."""
        for i in idx:
            try:
                maps = {l: open_level(self.case_dirs[i], l) for l in self.boxes}
                for l, arr in maps.items():  # the kernel reads while the box is cut
                    advise_box(arr, self.box_slices(i, l))
                boxes = {l: self.cut_box(arr, i, l) for l, arr in maps.items()}
                read_into_page_cache([_pyramid.level_path(self.case_dirs[i], l)
                                      for l in self.levels if l not in self.boxes])
            except (OSError, ValueError):
                continue
            self._ready[i] = boxes  # one assignment: a batch sees all the boxes or none

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
        """Ask the readahead thread (if any) for the files (or boxes) of the cases ``idx``."""
        if self.readahead is None:
            return
        if self.boxes and not self.readahead.busy():
            self._ready = {i: b for i, b in self._ready.items() if i in set(map(int, idx))}
        self.readahead.request([int(i) for i in idx] if self.boxes else self.level_files(idx))

    # ---- augmentation --------------------------------------------------------------------------
    def _shift_step_mm(self, i: int) -> float:
        """One voxel of the coarsest level read, for case ``i``: the unit of its shift (mm)."""
        return float(self._grids[int(i)].spacing) * 2 ** self.levels[-1]

    def case_shift(self, i: int) -> np.ndarray:
        """Case ``i``'s translation (3,) int in this epoch, in voxels of the coarsest level
        read (level ``L``): drawn uniformly per axis from ``derive(seed, "shift", epoch, case)``
        within ``shift_mm``, and narrowed so that every annotated landmark and every box stays
        inside its level. Level ``l`` moves by ``shift * 2**(L - l)`` voxels, the targets by
        ``shift`` x the level-``L`` spacing, so image and targets move together exactly."""
        i = int(i)
        grid, top = self._grids[i], self.levels[-1]
        reach = int(self.shift_mm // self._shift_step_mm(i))
        if reach == 0:
            return np.zeros(3, dtype=np.int64)
        lo, hi = np.full(3, -reach), np.full(3, reach)
        pos, mask = self._targets[i]
        n_top = int(grid.shape) // 2**top
        span = landmark_span_voxels(pos, mask, top, grid.spacing)
        if span is not None:  # the landmarks stay inside the coarsest level
            lo = np.maximum(lo, np.ceil(-span[0]).astype(int))
            hi = np.minimum(hi, np.floor(n_top - 1 - span[1]).astype(int))
        for l, box in self.boxes.items():  # a box stays inside its level
            k, c = 2 ** (top - l), self.box_corner(i, l)
            room = int(grid.shape) // 2**l - np.asarray(box["shape"]) - c
            lo = np.maximum(lo, -(c // k))
            hi = np.minimum(hi, room // k)
        rng = np.random.default_rng(seeds.derive(self.seed, "shift", self.epoch, self.case_ids[i]))
        return np.array([rng.integers(a, b + 1) if a <= b else 0 for a, b in zip(lo, hi)])

    def _shifted(self, i: int, arrays: dict[int, np.ndarray]):
        """Case ``i``'s level arrays, box corners and targets after its shift."""
        pos, mask = self._targets[i]
        corners = {l: self.box_corner(i, l) for l in self.boxes}
        if not self.shift_mm:
            return arrays, corners, pos
        s, top = self.case_shift(i), self.levels[-1]
        if not s.any():
            return arrays, corners, pos
        out = {}
        for l, a in arrays.items():
            v = s * 2 ** (top - l)
            if l in self.boxes:  # the box's content is the shifted level's at corner + v
                corners[l] = corners[l] + v
                out[l] = a
            else:
                out[l] = shift_volume(a, v)
        moved = pos + s * self._shift_step_mm(i)
        return out, corners, np.where(mask[:, None] > 0, moved, pos).astype(np.float32)

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

        For one case the whole level arrays are views of the memory maps (no copy here; the
        backend copies what it feeds to the device, straight from the page cache since the maps
        are in C order). Several cases are stacked (one batch-sized copy). A boxed level is a
        copy of the box, and ``offset{l}`` (B, 3) float32 holds the boxes' corners.
        """
        idx = [int(i) for i in idx]
        cases = [self._shifted(i, self.case_levels(i)) for i in idx]
        arrays = [c[0] for c in cases]
        if len(idx) == 1:
            x = {f"level{l}": arrays[0][l][None, ..., None] for l in self.levels}
        else:
            x = {f"level{l}": np.stack([a[l] for a in arrays])[..., None] for l in self.levels}
        for l in sorted(self.boxes):
            x[f"offset{l}"] = np.stack([c[1][l] for c in cases]).astype(np.float32)
        pos = np.stack([c[2] for c in cases])
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
