"""Ingest a user's (or the synthetic) cohort: check everything once, write the study tables.

:func:`ingest` reads

* a manifest CSV ``case_id,image`` (relative image paths are relative to the manifest's folder),
* a landmark CSV ``case_id,landmark,x,y,z`` in world mm, RAS or LPS as declared,

checks every case and every landmark, and writes

* ``data/manifest.csv``: ``case_id,image,shape,spacing`` (native shape ``512x512x400`` and voxel
  size ``0.45x0.45x0.6`` for information), cases in manifest order;
* ``data/landmarks.csv``: ``case_id,landmark,x,y,z`` in world **RAS** mm, one row per case and
  configured landmark (config order); a landmark without an annotation has empty x, y, z.

All problems are collected and raised together as one :class:`locnet.io.InputError`, one line
each, naming the case and the file: missing/unreadable image, not 3D, non-finite or singular
affine, duplicate case id, unknown landmark name, landmark for an unknown case, duplicate
landmark row, partly empty coordinates, a landmark outside its scan (beyond half a voxel from
the outer voxel centres), too few cases for the split. Missing landmark rows or empty x/y/z
cells are allowed. Images are checked from their headers; voxel data are read later by the
pyramid step, which reports unreadable data the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from . import geometry
from .io import (InputError, XYZ, read_landmarks, read_manifest, read_volume_header,
                 resolve_image, write_csv_atomic, write_landmarks)

__all__ = ["ingest", "format_shape", "format_spacing"]


def format_shape(shape: Sequence[int]) -> str:
    """``(512, 512, 400)`` -> ``"512x512x400"``."""
    return "x".join(str(int(n)) for n in shape)


def format_spacing(spacing: Sequence[float]) -> str:
    """``(0.45, 0.45, 0.6)`` -> ``"0.45x0.45x0.6"`` (4 significant digits)."""
    return "x".join(f"{float(s):.4g}" for s in spacing)


def _output_image_path(given: str, resolved: Path, out_manifest: Path) -> str:
    """Keep the user's style: absolute stays absolute, relative is re-based on the new manifest."""
    if Path(os.path.expanduser(given)).is_absolute():
        return str(resolved)
    return os.path.relpath(resolved, out_manifest.resolve().parent)


def ingest(manifest_csv: Any, landmarks_csv: Any, landmark_names: Sequence[str],
           coordinate_system: str, out_manifest: Any, out_landmarks: Any,
           min_cases: int = 3, split_counts: Mapping[str, int] | Sequence[int] | None = None,
           ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Check a cohort and write ``out_manifest`` and ``out_landmarks`` (see module docstring).

    ``landmark_names``: the configured landmarks (their order is the output order).
    ``coordinate_system``: "RAS" or "LPS" for the input landmark table; output is RAS.
    ``min_cases``: fewest cases the split can use (at least one per subset: 3).
    ``split_counts``: explicit train/val/test counts, if configured; the cohort must then have
    exactly that many cases.
    Returns the two written tables. Raises :class:`InputError` listing every problem.
    """
    manifest_csv, landmarks_csv = Path(manifest_csv), Path(landmarks_csv)
    out_manifest, out_landmarks = Path(out_manifest), Path(out_landmarks)
    names = [str(n) for n in landmark_names]
    if not names:
        raise ValueError("no landmark names configured")
    if len(set(names)) != len(names):
        raise ValueError(f"configured landmark names are not unique: {names}")
    system = str(coordinate_system).upper()
    if system not in geometry.COORDINATE_SYSTEMS:
        raise ValueError(f"coordinate_system must be RAS or LPS, got {coordinate_system!r}")

    errors: list[str] = []
    manifest = read_manifest(manifest_csv, resolve=False)

    # ---- cases and images
    seen: dict[str, int] = {}
    scans: dict[str, tuple[tuple[int, int, int], np.ndarray]] = {}
    rows = []
    for line, (case, image) in enumerate(zip(manifest["case_id"], manifest["image"]), start=2):
        path = resolve_image(manifest_csv, image)
        if case in seen:
            errors.append(f"case {case!r} (file {manifest_csv}): duplicate case id on line {line} "
                          f"(first on line {seen[case]})")
            continue
        seen[case] = line
        try:
            shape, affine = read_volume_header(path, case)
        except InputError as exc:
            errors.append(str(exc))
            continue
        scans[case] = (shape, affine)
        rows.append({"case_id": case,
                     "image": _output_image_path(image, path, out_manifest),
                     "shape": format_shape(shape),
                     "spacing": format_spacing(geometry.native_spacing(affine))})

    n_cases = len(seen)
    if split_counts is not None:
        counts = list(split_counts.values()) if isinstance(split_counts, Mapping) \
            else list(split_counts)
        if sum(int(c) for c in counts) != n_cases:
            errors.append(f"manifest file {manifest_csv}: {n_cases} cases, but the configured "
                          f"split counts {counts} sum to {sum(int(c) for c in counts)}")
    if n_cases < min_cases:
        errors.append(f"manifest file {manifest_csv}: {n_cases} case(s); the split needs at "
                      f"least {min_cases} (one per subset)")

    # ---- landmarks
    try:
        lm = read_landmarks(landmarks_csv)
    except InputError as exc:
        errors.append(str(exc))
        lm = pd.DataFrame(columns=["case_id", "landmark", *XYZ])
    known = set(names)
    coords: dict[tuple[str, str], np.ndarray] = {}
    first_line: dict[tuple[str, str], int] = {}
    xyz = lm[list(XYZ)].to_numpy(dtype=np.float64) if len(lm) else np.zeros((0, 3))
    ras = geometry.to_ras(xyz, system) if len(lm) else xyz
    for row, (case, name) in enumerate(zip(lm["case_id"], lm["landmark"])):
        line = row + 2
        where = f"case {case!r} (file {landmarks_csv}), line {line}"
        if case not in seen:
            errors.append(f"{where}: landmark {name!r} for a case that is not in the manifest "
                          f"{manifest_csv}")
            continue
        if name not in known:
            errors.append(f"{where}: unknown landmark name {name!r} (configured: "
                          f"{', '.join(names)})")
            continue
        key = (case, name)
        if key in first_line:
            errors.append(f"{where}: landmark {name!r} given twice (first on line "
                          f"{first_line[key]})")
            continue
        first_line[key] = line
        p = ras[row]
        n_nan = int(np.isnan(p).sum())
        if n_nan == 3:
            continue  # not annotated
        if n_nan:
            errors.append(f"{where}: landmark {name!r} has some but not all of x, y, z empty")
            continue
        if case in scans:
            shape, affine = scans[case]
            if not geometry.inside_scan(affine, shape, p):
                image = manifest.loc[manifest["case_id"] == case, "image"].iloc[0]
                v = geometry.world_to_voxel(affine, p)
                given = ", ".join(f"{c:g}" for c in xyz[row])
                errors.append(
                    f"{where}: landmark {name!r} at {system} ({given})"
                    f" mm lies outside the scan {resolve_image(manifest_csv, image)} (voxel "
                    f"({', '.join(f'{c:.1f}' for c in v)}), shape {format_shape(shape)})"
                    f"; is cohort.coordinate_system ({system}) right?")
                continue
        coords[key] = p

    if errors:
        raise InputError(f"{len(errors)} problem(s) in the input cohort:\n" + "\n".join(errors))

    out_m = pd.DataFrame(rows, columns=["case_id", "image", "shape", "spacing"])
    table = []
    for case in out_m["case_id"]:
        for name in names:
            p = coords.get((case, name), np.full(3, np.nan))
            table.append({"case_id": case, "landmark": name, "x": p[0], "y": p[1], "z": p[2]})
    out_l = pd.DataFrame(table, columns=["case_id", "landmark", *XYZ])
    write_csv_atomic(out_m, out_manifest)
    write_landmarks(out_l, out_landmarks)
    return out_m, out_l
