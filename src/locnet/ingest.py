"""Ingest a user's (or the synthetic) cohort: check everything once, write the study tables.

:func:`ingest` reads

* a manifest CSV ``case_id,image`` (relative image paths are relative to the manifest's folder),
* a landmark CSV ``case_id,landmark,x,y,z`` in world mm, RAS or LPS as declared,

checks every case and every landmark, and writes

* ``data/manifest.csv``: ``case_id,image,shape,spacing`` (native shape ``512x512x400`` and voxel
  size ``0.45x0.45x0.6`` for information), cases in manifest order;
* ``data/landmarks.csv``: ``case_id,landmark,x,y,z`` in world **RAS** mm, one row per case and
  configured landmark (config order); a landmark without an annotation has empty x, y, z.

All problems are collected and raised together as one :class:`locnet.fileio.InputError`, one line
per problem, each naming the case and the file, with their count in the first line:

* manifest: empty file, case id not matching :data:`locnet.fileio.CASE_ID_PATTERN`, duplicate case
  id, too few cases for the split (or not the configured split counts);
* images (every scan is read in full, on ``threads`` threads): missing or unreadable file,
  truncated or unreadable voxel data, NaN or infinite voxels, not 3D, non-finite or singular
  affine, too thin (fewer than :data:`MIN_VOXELS_PER_AXIS` voxels, or less than
  ``min_extent_mm``, along an array axis), no intensity variation, and (unless ``window`` is
  None) nearly nothing inside the intensity window;
* landmark table: empty file, empty case id or name, non-numeric coordinate, some but not all
  of x/y/z empty, unknown landmark name, landmark of a case not in the manifest, duplicate row,
  landmark outside its scan (beyond half a voxel from the outer voxel centres), and (given
  ``grid``) landmark inside its scan but outside the pyramid's finest grid.

* the same image under two case ids: the same file (after resolving links), or two files with
  the same content digest (:func:`scan_digest`), which would let one scan land in both the
  training and the test subset;
* with ``min_annotated``: a landmark table with fewer annotated landmarks than that (a table
  with only its header trains nothing).

A row with several problems gives one line per problem. Missing landmark rows or fully empty
x/y/z cells are allowed (not annotated).

Each scan's content digest (:func:`scan_digest`, of its decoded voxel data and affine) is
written, given ``digest_dir``, to ``{digest_dir}/{case}.json`` after every check passed, and
only when it changed: the workflow's pyramid of a case depends on that file, so a scan is
rebuilt when its content changes, whatever its modification time says.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from . import geometry
from .fileio import (InputError, XYZ, case_id_problem, describe, load_volume, parse_landmark_table,
                 parse_manifest_table, read_volume_header, resolve_image, write_csv_atomic,
                 write_landmarks, write_text_atomic)

__all__ = ["ingest", "ingest_cohort", "pyramid_checks", "format_shape", "format_spacing",
           "scan_digest", "write_digest",
           "MIN_VOXELS_PER_AXIS", "MIN_IN_WINDOW_FRACTION", "MIN_WINDOW_SPREAD"]

log = logging.getLogger(__name__)

#: a scan needs at least this many voxels along every array axis (a 3D model, trilinear
#: resampling and a 2x2x2 pyramid make no sense on one or two slices)
MIN_VOXELS_PER_AXIS = 4
#: a scan with fewer of its voxels strictly inside the intensity window is refused: after
#: clipping to the window it is (almost) a binary mask, not an image
MIN_IN_WINDOW_FRACTION = 0.01
#: ... and so is one whose intensities, clipped to the window, span less than this fraction of
#: the window's width (e.g. intensities already scaled to [0, 1] under a window in HU)
MIN_WINDOW_SPREAD = 0.01
#: voxels per slab of the intensity statistics (bounds the temporaries of a large scan)
_SLAB_VOXELS = 1 << 22


def format_shape(shape: Sequence[int]) -> str:
    """``(512, 512, 400)`` -> ``"512x512x400"``."""
    return "x".join(str(int(n)) for n in shape)


def format_spacing(spacing: Sequence[float]) -> str:
    """``(0.45, 0.45, 0.6)`` -> ``"0.45x0.45x0.6"`` (4 significant digits)."""
    return "x".join(f"{float(s):.4g}" for s in spacing)


def ingest_cohort(manifest_csv: Any, landmarks_csv: Any, *, landmark_names: Sequence[str],
                  coordinate_system: str, split_cfg: Mapping[str, Any],
                  pyramid_cfg: Mapping[str, Any], out_manifest: Any, out_landmarks: Any,
                  threads: int = 1, digest_dir: Any = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The data step ``ingest`` as the workflow runs it: :func:`ingest` with the config's
    ``split`` block (its ``counts``) and ``pyramid`` block (:func:`pyramid_checks`), at least
    one case per subset and at least one annotated landmark (a table with none trains
    nothing). Rule ``ingest`` and ``benchmarks/device_cohort.py`` both call this."""
    return ingest(manifest_csv, landmarks_csv, landmark_names=list(landmark_names),
                  coordinate_system=coordinate_system, out_manifest=out_manifest,
                  out_landmarks=out_landmarks, min_cases=3,
                  split_counts=split_cfg.get("counts"), threads=threads, min_annotated=1,
                  digest_dir=digest_dir, **pyramid_checks(pyramid_cfg))


def pyramid_checks(pyramid: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments ``grid``, ``window`` and ``min_extent_mm`` of :func:`ingest`
    for the config's ``pyramid`` block.

    ``min_extent_mm`` is the field of view of the finest level's patch when the patch has the
    coarsest level's size, as in every shipped config and the paper (56 voxels at 0.5 mm =
    28 mm): ``finest_shape * finest_spacing_mm / 2**(levels - 1)``. ``window`` is
    ``window_hu`` in the CT-window intensity mode (``intensity.mode: ct_window``, the default
    when absent), else None: no window check for scans that are not in HU.
    """
    n0, s0, levels = int(pyramid["finest_shape"]), float(pyramid["finest_spacing_mm"]), \
        int(pyramid["levels"])
    mode = (pyramid.get("intensity") or {}).get("mode", "ct_window")
    window = pyramid.get("window_hu") if mode == "ct_window" else None
    return {"grid": {"finest_shape": n0, "finest_spacing_mm": s0, "levels": levels},
            "window": None if window is None else (float(window[0]), float(window[1])),
            "min_extent_mm": n0 * s0 / 2 ** (levels - 1)}


# --------------------------------------------------------------------------- scans

@dataclass
class _Scan:
    """What ingest learnt about one scan: header facts (None if unreadable) and problems."""
    path: Path
    shape: tuple[int, int, int] | None = None
    affine: np.ndarray | None = None
    digest: str | None = None  # of the voxel data and affine (None: not read in full)
    problems: list[str] = field(default_factory=list)


def scan_digest(data: np.ndarray, affine: np.ndarray) -> str:
    """``sha256:<hex>`` of a decoded scan: its voxel type, shape, values and affine.

    The decoded image, not the file's bytes: it is exactly what the pyramid is built from, so
    a scan that was only re-saved or re-compressed (another gzip level or time stamp, another
    header description) keeps its digest and its pyramid, while any change to a voxel or to
    the placement in the world changes it. It also finds one scan stored twice under two case
    ids in files that differ byte for byte. Costs one pass over data that ingest has already
    read (under 0.1 s for a 512x512x400 int16 scan).
    """
    data = np.asarray(data)
    h = hashlib.sha256(b"locnet scan digest v1\n")
    h.update(f"{data.dtype.str} {'x'.join(str(n) for n in data.shape)}\n".encode())
    h.update(np.ascontiguousarray(np.asarray(affine, dtype="<f8")).tobytes())
    # nibabel returns the array in Fortran order: its transpose is C-contiguous (no copy),
    # and the bytes are those of the [i, j, k] array read with i fastest, as on disk
    h.update(memoryview(np.ascontiguousarray(data.T)).cast("B"))
    return "sha256:" + h.hexdigest()


def write_digest(path: Any, case: str, digest: str) -> bool:
    """Write a case's digest file (JSON) only when its content changes; True if written.

    Unchanged content keeps the file and its modification time, so nothing that depends on
    it looks newer than it is.
    """
    path = Path(path)
    text = json.dumps({"case_id": case, "digest": digest}, indent=2) + "\n"
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(text, path)
    return True


def _extent_problem(where: str, shape: Sequence[int], affine: np.ndarray,
                    min_extent_mm: float | None) -> str | None:
    spacing = geometry.native_spacing(affine)
    extent = np.asarray(shape[:3], float) * spacing
    need_mm = 0.0 if min_extent_mm is None else float(min_extent_mm)
    bad = [a for a in range(3) if shape[a] < MIN_VOXELS_PER_AXIS or extent[a] < need_mm - 1e-6]
    if not bad:
        return None
    axes = "; ".join(f"array axis {a}: {shape[a]} voxel(s), {extent[a]:.4g} mm" for a in bad)
    need = f"at least {MIN_VOXELS_PER_AXIS} voxels"
    if min_extent_mm is not None:
        need += (f" and {need_mm:.4g} mm (the field of view of the finest patch, "
                 "pyramid.finest_shape * finest_spacing_mm / 2**(levels - 1))")
    return (f"{where}: scan too thin for the model ({axes}; shape {format_shape(shape)}); "
            f"every axis needs {need}")


def _intensity_stats(data: np.ndarray, window: tuple[float, float] | None):
    """``(min, max, voxels strictly inside the window)``, slab by slab along the last axis."""
    mn, mx, inside = np.inf, -np.inf, 0
    per_plane = max(1, int(np.prod(data.shape[:-1])))
    step = max(1, _SLAB_VOXELS // per_plane)
    for k0 in range(0, data.shape[-1], step):
        slab = data[..., k0:k0 + step]
        mn, mx = min(mn, float(slab.min())), max(mx, float(slab.max()))
        if window is not None:
            inside += int(np.count_nonzero((slab > window[0]) & (slab < window[1])))
    return mn, mx, inside


def _intensity_problem(where: str, data: np.ndarray,
                       window: tuple[float, float] | None) -> str | None:
    mn, mx, inside = _intensity_stats(data, window)
    if mn == mx:
        return f"{where}: no intensity variation (every voxel is {mn:g})"
    if window is None:
        return None
    lo, hi = window
    fraction = inside / data.size
    spread = (min(mx, hi) - max(mn, lo)) / (hi - lo)
    named = f"the intensity window [{lo:g}, {hi:g}] (pyramid.window_hu)"
    if fraction < MIN_IN_WINDOW_FRACTION:
        return (f"{where}: only {100 * fraction:.2g}% of the voxels lie inside {named}, at "
                f"least {100 * MIN_IN_WINDOW_FRACTION:g}% needed (intensities {mn:g} to {mx:g}): "
                "windowed, the scan is nearly a binary mask; are the intensities in HU?")
    if spread < MIN_WINDOW_SPREAD:
        return (f"{where}: the intensities ({mn:g} to {mx:g}) span only "
                f"{100 * max(spread, 0.0):.2g}% of {named}, at least "
                f"{100 * MIN_WINDOW_SPREAD:g}% needed: windowed, the scan is nearly flat; are "
                "the intensities in HU?")
    return None


def _check_scan(case: str, path: Path, window: tuple[float, float] | None,
                min_extent_mm: float | None) -> _Scan:
    """Check one scan: its header, its size, and all of its voxel data."""
    scan = _Scan(path)
    where = describe(case, path)
    try:
        scan.shape, scan.affine = read_volume_header(path, case)
    except InputError as exc:
        scan.problems.append(str(exc))
        return scan
    thin = _extent_problem(where, scan.shape, scan.affine, min_extent_mm)
    if thin:
        scan.problems.append(thin)
    try:
        data, _ = load_volume(path, case, dtype=None)  # truncated data, NaN and inf raise here
    except InputError as exc:
        scan.problems.append(str(exc))
        return scan
    flat = _intensity_problem(where, data, window)
    if flat:
        scan.problems.append(flat)
    scan.digest = scan_digest(data, scan.affine)
    return scan


def _check_scans(cases: Mapping[str, Path], window: tuple[float, float] | None,
                 min_extent_mm: float | None, threads: int) -> dict[str, _Scan]:
    """Check every scan (``threads`` at a time); results in the order of ``cases``."""
    def one(item: tuple[str, Path]) -> _Scan:
        return _check_scan(item[0], item[1], window, min_extent_mm)

    items = list(cases.items())
    out: dict[str, _Scan] = {}
    every = max(1, len(items) // 10)
    with ThreadPoolExecutor(max_workers=max(1, int(threads))) as pool:
        for n, ((case, _), scan) in enumerate(zip(items, pool.map(one, items)), start=1):
            out[case] = scan
            if n % every == 0 or n == len(items):
                log.info("checked %d/%d scans", n, len(items))
    return out


# --------------------------------------------------------------------------- manifest

def _output_image_path(given: str, resolved: Path, out_manifest: Path) -> str:
    """Keep the user's style: absolute stays absolute, relative is re-based on the new manifest."""
    if Path(os.path.expanduser(given)).is_absolute():
        return str(resolved)
    return os.path.relpath(resolved, out_manifest.resolve().parent)


def _check_manifest(manifest_csv: Path, errors: list[str]) -> dict[str, tuple[str, Path]] | None:
    """Read the manifest; check empty cells, case ids and duplicates.

    Returns ``{case: (image as given, resolved path)}`` for every distinct case id, or None
    when the file cannot be read as a table.
    """
    try:
        manifest, empty_rows = parse_manifest_table(manifest_csv)
    except InputError as exc:
        errors.append(str(exc))
        return None
    errors.extend(msg for _, msg in empty_rows)
    skip = {row for row, _ in empty_rows}
    seen: dict[str, int] = {}
    cases: dict[str, tuple[str, Path]] = {}
    for row, (case, image) in enumerate(zip(manifest["case_id"], manifest["image"])):
        line = row + 2
        if row in skip:
            continue
        if case in seen:
            errors.append(f"case {case!r} (file {manifest_csv}): duplicate case id on line {line} "
                          f"(first on line {seen[case]})")
            continue
        seen[case] = line
        bad_id = case_id_problem(case)
        if bad_id:
            errors.append(f"case {case!r} (file {manifest_csv}), line {line}: {bad_id}")
        cases[case] = (image, resolve_image(manifest_csv, image))
    return cases


def _check_case_count(n_cases: int, manifest_csv: Path, min_cases: int,
                      split_counts: Mapping[str, int] | Sequence[int] | None) -> list[str]:
    errors = []
    if split_counts is not None:
        counts = list(split_counts.values()) if isinstance(split_counts, Mapping) \
            else list(split_counts)
        if sum(int(c) for c in counts) != n_cases:
            errors.append(f"manifest file {manifest_csv}: {n_cases} cases, but the configured "
                          f"split counts {counts} sum to {sum(int(c) for c in counts)}")
    if n_cases < min_cases:
        errors.append(f"manifest file {manifest_csv}: {n_cases} case(s); the split needs at "
                      f"least {min_cases} (one per subset)")
    return errors


def _duplicate_scans(cases: Mapping[str, tuple[str, Path]], scans: Mapping[str, _Scan],
                     manifest_csv: Path) -> list[str]:
    """One line per case that repeats an earlier case's image: the same file, or a file with
    the same content digest. Such a scan could be in both the training and the test subset."""
    problems = []
    by_file: dict[str, str] = {}
    by_digest: dict[str, str] = {}
    for case, (_, path) in cases.items():
        real = os.path.realpath(path)
        first = by_file.setdefault(real, case)
        if first != case:
            problems.append(
                f"cases {first!r} and {case!r} (file {manifest_csv}): the same image file "
                f"{path} is listed under both case ids; one scan must be one case (it could "
                "land in both the training and the test subset)")
            continue
        digest = scans[case].digest
        if digest is None:
            continue
        first = by_digest.setdefault(digest, case)
        if first != case:
            problems.append(
                f"cases {first!r} (file {cases[first][1]}) and {case!r} (file {path}): the two "
                f"files hold the same image (voxel data and affine, {digest[:19]}...), listed "
                f"under two case ids in {manifest_csv}; one scan must be one case (it could "
                "land in both the training and the test subset)")
    return problems


def _annotation_problem(landmarks_csv: Path, coords: Mapping, min_annotated: int) -> list[str]:
    if len(coords) >= min_annotated:
        return []
    return [f"landmark file {landmarks_csv}: {len(coords)} annotated landmark(s) (rows with "
            f"x, y and z), at least {min_annotated} needed: a table with only its header, or "
            "with every x, y, z empty, leaves the training subset nothing to learn"]


def _write_digests(scans: Mapping[str, _Scan], digest_dir: Path) -> None:
    changed = [c for c, scan in scans.items()
               if write_digest(digest_dir / f"{c}.json", c, scan.digest)]
    log.info("content digests: %d of %d scan(s) changed%s", len(changed), len(scans),
             f" ({', '.join(changed[:20])}{', ...' if len(changed) > 20 else ''})"
             if changed else "")


# --------------------------------------------------------------------------- landmarks

def _where_problem(where: str, name: str, p_ras: np.ndarray, given: np.ndarray, system: str,
                   scan: _Scan, grid: Mapping[str, Any] | None) -> str | None:
    """A landmark outside its scan, or inside it but outside the pyramid's finest grid."""
    at = f"landmark {name!r} at {system} ({', '.join(f'{c:g}' for c in given)}) mm"
    if not geometry.inside_scan(scan.affine, scan.shape, p_ras):
        v = geometry.world_to_voxel(scan.affine, p_ras)
        return (f"{where}: {at} lies outside the scan {scan.path} (voxel "
                f"({', '.join(f'{c:.1f}' for c in v)}), shape {format_shape(scan.shape)})"
                f"; is cohort.coordinate_system ({system}) right?")
    if grid is None:
        return None
    n0, s0 = int(grid["finest_shape"]), float(grid["finest_spacing_mm"])
    g = geometry.grid_for_scan(scan.affine, scan.shape, n0, s0, int(grid["levels"]))
    v = g.world_to_voxel(p_ras, 0)
    if np.all((v >= -0.5 - 1e-9) & (v <= n0 - 0.5 + 1e-9)):
        return None
    return (f"{where}: {at} lies inside the scan {scan.path} but outside the pyramid's finest "
            f"grid ({n0}^3 voxels of {s0:g} mm centred on the scan, {n0 * s0:g} mm wide; "
            f"grid voxel ({', '.join(f'{c:.1f}' for c in v)})), so no model can find it; "
            "crop the scan around the region of interest or enlarge "
            "pyramid.finest_shape / finest_spacing_mm")


def _check_landmarks(landmarks_csv: Path, manifest_csv: Path, names: Sequence[str], system: str,
                     scans: Mapping[str, _Scan] | None, grid: Mapping[str, Any] | None,
                     errors: list[str]) -> dict[tuple[str, str], np.ndarray]:
    """Check every landmark row; every problem of every row is one line in ``errors``.

    ``scans``: the manifest's cases (None: the manifest was unreadable, so a row's case is not
    checked against it). Returns the usable annotations ``{(case, name): RAS point}``.
    """
    try:
        lm, invalid, cell_problems = parse_landmark_table(landmarks_csv)
    except InputError as exc:
        errors.append(str(exc))
        return {}
    by_row: dict[int, list[str]] = {}
    for row, msg in cell_problems:
        by_row.setdefault(row, []).append(msg)
    known = set(names)
    coords: dict[tuple[str, str], np.ndarray] = {}
    first_line: dict[tuple[str, str], int] = {}
    given = lm[list(XYZ)].to_numpy(dtype=np.float64)
    ras = geometry.to_ras(given, system)
    for row, (case, name) in enumerate(zip(lm["case_id"], lm["landmark"])):
        line = row + 2
        where = f"case {case!r} (file {landmarks_csv}), line {line}"
        problems = by_row.get(row, [])
        named = case != "" and name != ""
        if named and scans is not None and case not in scans:
            problems.append(f"{where}: landmark {name!r} for a case that is not in the "
                            f"manifest {manifest_csv}")
        if named and name not in known:
            problems.append(f"{where}: unknown landmark name {name!r} (configured: "
                            f"{', '.join(names)})")
        if named and (case, name) in first_line:
            problems.append(f"{where}: landmark {name!r} given twice (first on line "
                            f"{first_line[(case, name)]})")
        first_line.setdefault((case, name), line)
        empty = np.isnan(given[row]) & ~invalid[row]
        if 0 < empty.sum() < 3:
            problems.append(f"{where}: landmark {name!r} has some but not all of x, y, z empty")
        complete = not np.isnan(given[row]).any()
        scan = None if scans is None else scans.get(case)
        if complete and scan is not None and scan.affine is not None:
            outside = _where_problem(where, name, ras[row], given[row], system, scan, grid)
            if outside:
                problems.append(outside)
        errors.extend(problems)
        if complete and not problems:
            coords[(case, name)] = ras[row]
    return coords


# --------------------------------------------------------------------------- ingest

def _check_arguments(landmark_names: Sequence[str], coordinate_system: str) -> tuple[list, str]:
    names = [str(n) for n in landmark_names]
    if not names:
        raise ValueError("no landmark names configured")
    if len(set(names)) != len(names):
        raise ValueError(f"configured landmark names are not unique: {names}")
    system = str(coordinate_system).upper()
    if system not in geometry.COORDINATE_SYSTEMS:
        raise ValueError(f"coordinate_system must be RAS or LPS, got {coordinate_system!r}")
    return names, system


def _write_tables(cases: Mapping[str, tuple[str, Path]], scans: Mapping[str, _Scan],
                  coords: Mapping[tuple[str, str], np.ndarray], names: Sequence[str],
                  out_manifest: Path, out_landmarks: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, table = [], []
    for case, (image, path) in cases.items():
        scan = scans[case]
        rows.append({"case_id": case,
                     "image": _output_image_path(image, path, out_manifest),
                     "shape": format_shape(scan.shape),
                     "spacing": format_spacing(geometry.native_spacing(scan.affine))})
        for name in names:
            p = coords.get((case, name), np.full(3, np.nan))
            table.append({"case_id": case, "landmark": name, "x": p[0], "y": p[1], "z": p[2]})
    out_m = pd.DataFrame(rows, columns=["case_id", "image", "shape", "spacing"])
    out_l = pd.DataFrame(table, columns=["case_id", "landmark", *XYZ])
    write_csv_atomic(out_m, out_manifest)
    write_landmarks(out_l, out_landmarks)
    return out_m, out_l


def ingest(manifest_csv: Any, landmarks_csv: Any, landmark_names: Sequence[str],
           coordinate_system: str, out_manifest: Any, out_landmarks: Any,
           min_cases: int = 3, split_counts: Mapping[str, int] | Sequence[int] | None = None,
           *, grid: Mapping[str, Any] | None = None,
           window: Sequence[float] | None = None, min_extent_mm: float | None = None,
           threads: int = 1, min_annotated: int = 0,
           digest_dir: Any = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Check a cohort and write ``out_manifest`` and ``out_landmarks`` (see module docstring).

    ``landmark_names``: the configured landmarks (their order is the output order).
    ``coordinate_system``: "RAS" or "LPS" for the input landmark table; output is RAS.
    ``min_cases``: fewest cases the split can use (at least one per subset: 3).
    ``split_counts``: explicit train/val/test counts, if configured; the cohort must then have
    exactly that many cases.
    ``grid`` (``finest_shape``, ``finest_spacing_mm``, ``levels``): refuse landmarks outside
    the pyramid's finest grid; ``window`` ``(lo, hi)``: refuse scans with (nearly) nothing
    inside the intensity window (None: no window check, for intensities not windowed in HU);
    ``min_extent_mm``: refuse scans thinner than this along an array axis. All three are
    :func:`pyramid_checks` of the config; None skips the check.
    ``threads``: scans read at once.
    ``min_annotated``: fewest annotated landmarks the table must hold (the workflow: 1).
    ``digest_dir``: where each case's content digest is written (``{case}.json``, only when
    it changed), after every check passed; None writes none.
    Returns the two written tables. Raises :class:`InputError` listing every problem.
    """
    manifest_csv, landmarks_csv = Path(manifest_csv), Path(landmarks_csv)
    out_manifest, out_landmarks = Path(out_manifest), Path(out_landmarks)
    names, system = _check_arguments(landmark_names, coordinate_system)
    window = None if window is None else (float(window[0]), float(window[1]))

    errors: list[str] = []
    cases = _check_manifest(manifest_csv, errors)
    scans = _check_scans({c: p for c, (_, p) in (cases or {}).items()}, window, min_extent_mm,
                         threads)
    for scan in scans.values():
        errors.extend(scan.problems)
    if cases is not None:
        errors.extend(_duplicate_scans(cases, scans, manifest_csv))
        errors.extend(_check_case_count(len(cases), manifest_csv, min_cases, split_counts))
    n_errors = len(errors)
    coords = _check_landmarks(landmarks_csv, manifest_csv, names, system,
                              None if cases is None else scans, grid, errors)
    if len(errors) == n_errors or coords:  # a table that could be read, or some annotation
        errors.extend(_annotation_problem(landmarks_csv, coords, min_annotated))

    if errors:
        raise InputError(f"{len(errors)} problem(s) in the input cohort:\n" + "\n".join(errors))
    tables = _write_tables(cases or {}, scans, coords, names, out_manifest, out_landmarks)
    if digest_dir is not None:
        _write_digests(scans, Path(digest_dir))
    return tables
