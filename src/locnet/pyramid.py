"""Multi-level isotropic pyramids: one resampling per scan, then 2x2x2 averaging.

:func:`build_pyramid` turns a native scan (any orientation, anisotropic spacing) into

* ``level0.nii``: the scan resampled once, by trilinear interpolation, onto the finest grid
  (``N0^3`` voxels of ``s0`` mm, axis-aligned RAS, centred on the scan's bounding box; see
  :func:`locnet.geometry.grid_for_scan`). Intensities are normalised to [0, 1] by the
  ``intensity`` mode (:func:`scan_window`): ``ct_window`` (the default) clips to ``window_hu``
  and fills the outside of the scan with ``background_hu`` (air); ``percentile`` maps the
  scan's own low and high percentiles to 0 and 1 and fills the outside with the low one
  (0 after normalisation), for scans not in Hounsfield units (MRI);
* ``level{l}.nii``, ``l = 1 .. levels-1``: the 2x2x2 block mean of level ``l-1``, so a coarse
  voxel's centre is the centre of its block (the affines say so);
* ``grid.json``: the grid (:meth:`locnet.geometry.Grid.to_dict`) plus the window and background,
  the intensity mode and, in ``percentile`` mode, the scan's own window (``scan_window``).

Levels are float32, uncompressed, so :func:`load_level` can memory-map them. They are stored
with the grid's axes reversed: the file's array is ``[k, j, i]`` and its affine has the grid
affine's first three columns in reverse order (``level_affine[:, [2, 1, 0, 3]]``), so every
viewer and ``nibabel.as_closest_canonical`` place it exactly as before. Why: NIfTI stores the
first array axis fastest, and a file stored ``[k, j, i]`` memory-maps as ``[i, j, k]`` in C
order (:func:`load_level` returns ``data.T``, a view), which is the order the deep-learning
backends want. A file stored ``[i, j, k]`` maps in Fortran order, and every training step then
pays a strided 360 MiB transpose per paper-scale case (1.1-2.2 s on one core, measured); the
reversed layout pays one blocked transpose of level 0 per case at build time (0.2 s, see
:func:`to_c_order`). :func:`load_level` refuses a level stored ``[i, j, k]`` (pyramids written
before this layout): re-run the pyramid rule for it. The resampling pulls every level-0 voxel
through ``inv(native_affine) @ level0_affine`` with ``scipy.ndimage.affine_transform`` (order 1,
no prefilter), in slabs of level-0 planes run on a thread pool (scipy releases the GIL), writing
straight into the output array: peak memory is the native volume in its stored type plus
level 0 plus level 1.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .geometry import Grid, grid_for_scan
from .fileio import InputError, load_volume, read_json, save_nifti_atomic, write_json_atomic

__all__ = [
    "build_case",
    "build_pyramid",
    "downsample2",
    "load_level",
    "read_grid",
    "resample_to_grid",
    "apply_window",
    "INTENSITY_MODES",
    "intensity_params",
    "scan_window",
    "stored_affine",
    "to_c_order",
    "write_level",
    "level_path",
]


log = logging.getLogger(__name__)

#: how a scan's intensities become [0, 1] (config ``pyramid.intensity.mode``)
INTENSITY_MODES = ("ct_window", "percentile")
DEFAULT_PERCENTILES = (0.5, 99.5)
#: ``ct_window``: values at most this far above ``background_hu`` count as air in the clipping
#: check of :func:`scan_window` (the window maps them to 0, like the outside of the scan)
AIR_MARGIN_HU = 200.0
#: ``ct_window``: warn when more than this share of the non-air voxels is clipped
CLIPPED_WARN_FRACTION = 0.5
#: ``ct_window``: or when under this share of the voxels lies below the window (a CT in HU
#: always has air: outside the body, in the airways, or the scanner's padding value) while
#: more than :data:`HIGH_WARN_FRACTION` lies above it (an MRI: dark air inside the window,
#: tissue above it)
NO_AIR_FRACTION = 0.01
HIGH_WARN_FRACTION = 0.1


def intensity_params(block: Mapping[str, Any] | None) -> dict:
    """The ``intensity`` block (config ``pyramid.intensity``, ``grid.json``, model metadata),
    checked and normalised: ``{"mode": "ct_window"}`` or ``{"mode": "percentile",
    "percentiles": [lo, hi]}``. ``None`` or an empty block is ``ct_window`` (the default, and
    what pyramids and models written before the key existed used)."""
    block = dict(block or {})
    mode = str(block.get("mode", "ct_window"))
    if mode not in INTENSITY_MODES:
        raise ValueError(f"intensity mode must be one of {INTENSITY_MODES}, got {mode!r}")
    if mode == "ct_window":
        return {"mode": mode}
    pct = [float(p) for p in block.get("percentiles", DEFAULT_PERCENTILES)]
    if len(pct) != 2 or not 0.0 <= pct[0] < pct[1] <= 100.0:
        raise ValueError(f"intensity percentiles must be [lo, hi] with 0 <= lo < hi <= 100, "
                         f"got {pct}")
    return {"mode": mode, "percentiles": pct}


def _clip_counts(data: np.ndarray, lo: float, hi: float, air: float,
                 chunk: int = 1 << 22) -> dict[str, int]:
    """Voxel counts of the CT-window check, in chunks (bounded memory: a paper-scale scan has
    10^8 voxels): ``total``, ``not_air`` (above ``air``), ``clipped`` (not air and outside
    ``[lo, hi]``), ``below`` (below ``lo``, air included) and ``above`` (above ``hi``)."""
    flat = np.ravel(data, order="K")  # a view of a C- or Fortran-contiguous volume
    counts = dict(total=int(flat.size), not_air=0, clipped=0, below=0, above=0)
    for i0 in range(0, flat.size, chunk):
        part = flat[i0:i0 + chunk]
        not_air, below, above = part > air, part < lo, part > hi
        counts["not_air"] += int(np.count_nonzero(not_air))
        counts["clipped"] += int(np.count_nonzero(not_air & (below | above)))
        counts["below"] += int(np.count_nonzero(below))
        counts["above"] += int(np.count_nonzero(above))
    return counts


def _scan_name(case: str | None, path: Any) -> str:
    parts = [f"case {case!r}" if case else "scan"]
    if path is not None:
        parts.append(f"(file {path})")
    return " ".join(parts)


def scan_window(data: np.ndarray, intensity: Mapping[str, Any] | None,
                window_hu: Sequence[float], background_hu: float, case: str | None = None,
                path: Any = None) -> tuple[tuple[float, float], float]:
    """The ``(window, background)`` that maps this scan to [0, 1] (:func:`apply_window`).

    ``ct_window``: ``window_hu`` and ``background_hu`` as given. A warning names the case and
    file when more than half of the voxels that are not air (air: at most
    ``background_hu + 200``, which the window sends to 0 like the outside of the scan) lie
    outside the window, or when under 1% of the voxels lie below the window and over 10%
    above it (no air at all: an MRI's dark background sits inside the window, its tissue
    above). Such a scan is probably not a CT in Hounsfield units and becomes an almost binary
    image; ``percentile`` mode is the one to use.

    ``percentile``: the scan's own ``percentiles`` (e.g. 0.5 and 99.5, over all its voxels)
    are the window, and the low one is the background, so the outside of the scan is 0 after
    normalisation. A scan whose two percentiles coincide (constant) is refused
    (:class:`~locnet.fileio.InputError`).
    """
    params = intensity_params(intensity)
    if params["mode"] == "ct_window":
        lo, hi = float(window_hu[0]), float(window_hu[1])
        c = _clip_counts(data, lo, hi, float(background_hu) + AIR_MARGIN_HU)
        mostly_clipped = c["clipped"] > CLIPPED_WARN_FRACTION * c["not_air"] > 0
        no_air = (c["below"] < NO_AIR_FRACTION * c["total"]
                  and c["above"] > HIGH_WARN_FRACTION * c["total"])
        if mostly_clipped or no_air:
            log.warning(
                "%s: the CT window pyramid.window_hu [%g, %g] clips %.0f%% of its voxels that "
                "are not air (%.0f%% of all voxels lie above the window, %.0f%% below it; "
                "values %g to %g)%s: if it is not a CT in Hounsfield units, set "
                "pyramid.intensity.mode: percentile",
                _scan_name(case, path), lo, hi,
                100.0 * c["clipped"] / max(c["not_air"], 1),
                100.0 * c["above"] / c["total"], 100.0 * c["below"] / c["total"],
                float(data.min()), float(data.max()),
                ", and the scan has no air" if no_air else "")
        return (lo, hi), float(background_hu)
    lo, hi = (float(v) for v in np.percentile(data, params["percentiles"]))
    if not hi > lo:
        raise InputError(f"{_scan_name(case, path)}: its {params['percentiles'][0]:g} and "
                         f"{params['percentiles'][1]:g} percentiles are both {lo:g} "
                         "(constant scan?); percentile normalisation needs hi > lo")
    return (lo, hi), lo


def _n_threads(threads: int | None) -> int:
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            threads = os.cpu_count() or 1
    return max(1, int(threads))


def apply_window(a: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """Clip ``a`` to ``window = (lo, hi)`` and scale to [0, 1], in place (float arrays)."""
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"window must have hi > lo, got {tuple(window)}")
    np.clip(a, lo, hi, out=a)
    a -= np.asarray(lo, dtype=a.dtype)
    a /= np.asarray(hi - lo, dtype=a.dtype)
    return a


def resample_to_grid(data: np.ndarray, affine: Any, grid: Grid, background: float,
                     window: Sequence[float] | None = None, threads: int | None = None,
                     slab: int | None = None) -> np.ndarray:
    """Resample a native volume onto level 0 of ``grid`` (trilinear; outside -> ``background``).

    ``data`` may be any real dtype (int16 is fine and halves memory); the result is float32,
    optionally windowed (:func:`apply_window`) slab by slab while the slab is hot in cache.
    """
    from scipy import ndimage

    m = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ grid.level_affine(0)
    matrix, offset = m[:3, :3], m[:3, 3]
    n = grid.level_size(0)
    if data.flags.f_contiguous and not data.flags.c_contiguous:
        # NIfTI volumes come back in Fortran order (i fastest). Resample the reversed-axes
        # problem instead, so the inner loop runs along i in both arrays: input index
        # (k, j, i) = R M R (c, b, a) + R offset with R the axis reversal. The output is then
        # Fortran ordered too, which is also how NIfTI stores it.
        src = data.T
        matrix, offset = matrix[::-1, ::-1], offset[::-1]
        out_t = np.empty((n, n, n), dtype=np.float32)
        out = out_t.T
    else:
        src = np.ascontiguousarray(data)
        out_t = out = np.empty((n, n, n), dtype=np.float32)
    matrix = np.ascontiguousarray(matrix)
    offset = np.ascontiguousarray(offset)
    n_threads = _n_threads(threads)
    if slab is None:
        slab = max(1, min(16, n // (4 * n_threads)))
    starts = range(0, n, slab)

    def work(i0: int) -> None:
        part = out_t[i0:min(i0 + slab, n)]
        # output voxel (i0 + a, b, c) -> source: matrix @ (a, b, c) + (offset + matrix @ (i0,0,0))
        ndimage.affine_transform(
            src, matrix, offset=offset + matrix[:, 0] * i0, output_shape=part.shape,
            output=part, order=1, mode="constant", cval=float(background), prefilter=False)
        if window is not None:
            apply_window(part, window)

    _for_each(work, starts, n_threads)
    return out


def _for_each(work, starts, n_threads: int) -> None:
    """``work(s)`` for every ``s`` in ``starts``, on ``n_threads`` threads (1: in this one)."""
    if n_threads == 1:
        for s in starts:
            work(s)
        return
    with ThreadPoolExecutor(n_threads) as pool:
        for _ in pool.map(work, starts):
            pass


def to_c_order(a: np.ndarray, threads: int | None = None, block: int = 16) -> np.ndarray:
    """``a`` (3D) as a C-contiguous array: ``a`` itself if it already is one, else a copy.

    The copy of a Fortran-ordered array is a full axis reversal in memory. ``np.ascontiguousarray``
    walks it with one side strided by a whole plane and takes 1.1-2.2 s for 448^3 float32; the
    copy here moves ``block x n x block`` bricks (both sides stay within a few pages per inner
    run) on ``threads`` threads (numpy releases the GIL while copying): 0.16 s on 2 cores.
    """
    if a.flags.c_contiguous:
        return a
    if a.ndim != 3:
        return np.ascontiguousarray(a)
    out = np.empty(a.shape, dtype=a.dtype)
    n0, _, n2 = a.shape

    def work(i0: int) -> None:
        for k0 in range(0, n2, block):
            out[i0:i0 + block, :, k0:k0 + block] = a[i0:i0 + block, :, k0:k0 + block]

    _for_each(work, range(0, n0, block), _n_threads(threads))
    return out


def downsample2(a: np.ndarray) -> np.ndarray:
    """2x2x2 block mean of a 3D array with even sides (float32 in, float32 out).

    Pairwise sums axis by axis (no Python loop over voxels); equals
    ``a.reshape(n, 2, n, 2, n, 2).mean((1, 3, 5))`` to float32 rounding. The result has the
    memory order of ``a`` (C or Fortran).
    """
    if a.ndim != 3 or any(n % 2 for n in a.shape):
        raise ValueError(f"downsample2 needs a 3D array with even sides, got {a.shape}")
    if a.flags.f_contiguous and not a.flags.c_contiguous:
        return downsample2(a.T).T  # same operation; keeps the contiguous axis last for speed
    b = a[0::2] + a[1::2]
    b = b[:, 0::2] + b[:, 1::2]
    b = b[:, :, 0::2] + b[:, :, 1::2]
    b *= np.asarray(0.125, dtype=b.dtype)
    return b


def stored_affine(grid_affine: np.ndarray) -> np.ndarray:
    """The affine of a level file stored ``[k, j, i]`` (see the module docstring)."""
    return np.asarray(grid_affine, dtype=np.float64)[:, [2, 1, 0, 3]]


def _level_image(level: np.ndarray, grid_affine: np.ndarray):
    """The NIfTI image of one level given as ``[i, j, k]`` (C order): stored ``[k, j, i]``."""
    import nibabel as nib

    data = level.T  # Fortran-contiguous when ``level`` is C-contiguous: written without a copy
    affine = stored_affine(grid_affine)
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(np.float32)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    return img


def level_path(case_dir: Any, level: int) -> Path:
    """The file of level ``level`` in the pyramid folder ``case_dir``."""
    return Path(case_dir) / f"level{int(level)}.nii"


def write_level(level: np.ndarray, grid: Grid, lv: int, out_dir: Any) -> Path:
    """Write level ``lv`` (array ``[i, j, k]``, float32) as ``out_dir/level{lv}.nii``.

    Stored ``[k, j, i]`` (module docstring); atomic. Returns the path.
    """
    level = np.asarray(level, dtype=np.float32)
    if level.shape != grid.level_shape(lv):
        raise ValueError(f"level {lv} has shape {level.shape}, the grid says "
                         f"{grid.level_shape(lv)}")
    path = level_path(out_dir, lv)
    save_nifti_atomic(_level_image(to_c_order(level), grid.level_affine(lv)), path)
    return path


def _grid_params(grid_params: Mapping[str, Any]) -> tuple[int, float, int]:
    try:
        return (int(grid_params["finest_shape"]), float(grid_params["finest_spacing_mm"]),
                int(grid_params["levels"]))
    except KeyError as exc:
        raise ValueError(f"grid_params lacks {exc.args[0]!r} (needs finest_shape, "
                         "finest_spacing_mm, levels)") from None


def build_pyramid(image_path: Any, grid_params: Mapping[str, Any] | Grid,
                  window_hu: Sequence[float], background_hu: float, out_dir: Any,
                  case: str | None = None, threads: int | None = None,
                  intensity: Mapping[str, Any] | None = None) -> Grid:
    """Resample one scan and write its pyramid to ``out_dir`` (see module docstring).

    ``grid_params``: the config's ``pyramid`` block (``finest_shape``, ``finest_spacing_mm``,
    ``levels``; other keys ignored), or a ready :class:`~locnet.geometry.Grid`.
    ``case`` names the case in error messages; ``threads`` defaults to the usable cores.
    ``intensity``: the config's ``pyramid.intensity`` block (:func:`intensity_params`;
    ``None``: ``ct_window``, i.e. ``window_hu`` and ``background_hu``). Returns the grid (also written to ``out_dir/grid.json``).
    """
    out_dir = Path(out_dir)
    data, affine = load_volume(image_path, case=case, dtype=None)
    if isinstance(grid_params, Grid):
        g = grid_params
        grid = Grid(g.origin, g.spacing, g.shape, g.levels, source_affine=affine,
                    source_shape=data.shape)
    else:
        n0, s0, levels = _grid_params(grid_params)
        grid = grid_for_scan(affine, data.shape, n0, s0, levels)
    intensity = intensity_params(intensity)
    window, background = scan_window(data, intensity, window_hu, background_hu, case=case,
                                     path=image_path)
    level = resample_to_grid(data, affine, grid, background, window=window, threads=threads)
    del data
    level = to_c_order(level, threads=threads)  # the stored layout; see the module docstring
    for lv in range(grid.levels):
        if lv:
            level = downsample2(level)
        write_level(level, grid, lv, out_dir)
    meta = grid.to_dict()
    meta.update({"window_hu": [float(w) for w in window_hu],
                 "background_hu": float(background_hu),
                 "intensity": intensity,
                 "level_shapes": [grid.level_size(lv) for lv in range(grid.levels)],
                 "level_spacings_mm": [grid.level_spacing(lv) for lv in range(grid.levels)]})
    if intensity["mode"] != "ct_window":
        meta["scan_window"] = [float(w) for w in window]  # this scan's values mapped to 0 and 1
    write_json_atomic(meta, out_dir / "grid.json")
    return grid


def build_case(image_path: Any, pyramid_cfg: Mapping[str, Any], out_dir: Any, case: str,
               threads: int | None = None) -> Grid:
    """The data step ``pyramid`` of one case: :func:`build_pyramid` with every setting taken
    from the config's ``pyramid`` block (grid, ``window_hu``, ``background_hu`` and, where
    given, ``intensity``; absent: the CT window). Rule ``pyramid`` and
    ``benchmarks/device_cohort.py`` both call this, so their pyramids cannot differ."""
    return build_pyramid(image_path, pyramid_cfg, window_hu=pyramid_cfg["window_hu"],
                         background_hu=pyramid_cfg["background_hu"], out_dir=out_dir, case=case,
                         threads=threads, intensity=pyramid_cfg.get("intensity"))


def read_grid(case_dir: Any) -> Grid:
    """The :class:`~locnet.geometry.Grid` stored in ``case_dir/grid.json``."""
    return Grid.from_dict(read_json(Path(case_dir) / "grid.json"))


def load_level(case_dir: Any, level: int, mmap: bool = True) -> tuple[np.ndarray, Grid]:
    """Level ``level`` of a stored pyramid: ``(float32 array [i, j, k], grid)``.

    With ``mmap`` the array is a copy-on-write ``np.memmap`` of the file: nothing is read until
    used, and in-place changes never reach the file. Without it the level is read into memory.
    The file is stored ``[k, j, i]`` (this module's layout) and comes back as a C-contiguous
    view; its affine must be the grid's level affine with its axis columns reversed
    (:func:`stored_affine`). A level stored ``[i, j, k]`` with the grid's affine as is (older
    pyramids) is refused, saying to re-run the pyramid rule, and so is an affine of another
    grid (:class:`~locnet.fileio.InputError`, naming the file).
    """
    import nibabel as nib

    case_dir = Path(case_dir)
    grid = read_grid(case_dir)
    path = level_path(case_dir, level)
    try:
        img = nib.load(str(path), mmap="c" if mmap else False)
        arr = np.asanyarray(img.dataobj) if mmap else np.asarray(img.dataobj)
    except Exception as exc:
        raise InputError(f"pyramid level file {path} is unreadable "
                         f"({type(exc).__name__}: {exc})") from exc
    want = grid.level_affine(level)
    if not np.allclose(img.affine, stored_affine(want), atol=1e-3):
        if np.allclose(img.affine, want, atol=1e-3):
            raise InputError(
                f"pyramid level file {path} is stored in the older [i, j, k] layout, which is "
                f"no longer read: re-run the pyramid rule (delete {case_dir} or run snakemake "
                "with --forcerun pyramid)")
        raise InputError(f"pyramid level file {path}: its affine does not match "
                         f"{case_dir / 'grid.json'} (stale pyramid?)")
    arr = arr.T
    if arr.shape != grid.level_shape(level) or arr.dtype != np.float32:
        raise InputError(f"pyramid level file {path}: shape {arr.shape} dtype {arr.dtype}, "
                         f"expected {grid.level_shape(level)} float32 (stale pyramid?)")
    return arr, grid
