"""Reading and writing the study's files: NIfTI volumes, manifests, landmark tables, JSON.

* :func:`load_volume` / :func:`read_volume_header` read a NIfTI scan (.nii or .nii.gz, 3D or
  4D/5D with trailing singleton axes) and check it. Problems raise :class:`InputError`
  (a ``ValueError``) whose message names the case and the file.
* Every write is atomic (:func:`atomic_write`): the data goes to a hidden temporary file in the
  destination folder, which is renamed over the destination only when complete. A failed or
  killed write leaves no partial file.
* Manifest tables have columns ``case_id,image``; relative image paths are relative to the
  folder of the manifest file. Landmark tables have columns ``case_id,landmark,x,y,z``; an empty
  x/y/z cell means "not annotated" and is read as NaN (and written back as an empty cell).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

__all__ = [
    "CASE_ID_PATTERN",
    "CASE_ID_RULE",
    "InputError",
    "LANDMARK_COLUMNS",
    "MANIFEST_COLUMNS",
    "atomic_write",
    "case_id_problem",
    "describe",
    "inside",
    "load_volume",
    "parse_landmark_table",
    "parse_manifest_table",
    "read_json",
    "read_landmarks",
    "read_manifest",
    "read_volume_header",
    "resolve_image",
    "save_nifti_atomic",
    "write_csv_atomic",
    "write_json_atomic",
    "write_landmarks",
]

MANIFEST_COLUMNS = ("case_id", "image")
LANDMARK_COLUMNS = ("case_id", "landmark", "x", "y", "z")
XYZ = ("x", "y", "z")

#: allowed case ids (a regular expression, matched in full): a case id names folders and files
#: (``results/pyramid/{case}/``) and is a Snakemake wildcard, so it is plain ASCII, starts with
#: a letter or digit (never ``.``, ``..`` or a hidden name) and is at most 100 characters long
CASE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"
#: :data:`CASE_ID_PATTERN` in words, for error messages
CASE_ID_RULE = ("an ASCII letter or digit, then up to 99 letters, digits, '_', '.' or '-' "
                f"(the pattern {CASE_ID_PATTERN}; no spaces, no accents)")
_CASE_ID = re.compile(CASE_ID_PATTERN)


class InputError(ValueError):
    """Bad input data (a scan or a table); the message names the case and the file."""


def describe(case: str | None, path: Any) -> str:
    """Prefix naming a case and a file for error messages: ``case 'c01' (file /a/b.nii.gz)``."""
    parts = []
    if case is not None:
        parts.append(f"case {case!r}")
    if path is not None:
        parts.append(f"(file {os.fspath(path)})" if parts else f"file {os.fspath(path)}")
    return " ".join(parts) if parts else "input"


def case_id_problem(case: str) -> str | None:
    """Why ``case`` cannot be a case id (see :data:`CASE_ID_PATTERN`), or None if it can."""
    if _CASE_ID.fullmatch(str(case)):
        return None
    return f"case id {str(case)!r} is not allowed: a case id is {CASE_ID_RULE}"


def inside(folder: Any, name: str) -> Path:
    """``folder / name``, refused (:class:`InputError`) unless it resolves inside ``folder``.

    Every file named after a case id goes through here (``locnet predict``'s per-case files):
    a name with ``..``, a ``/`` or an absolute path cannot write beside or above the folder the
    user named, whatever the checks before it let through. Symbolic links are followed, so a
    link inside the folder that points out of it is refused too."""
    folder = Path(folder)
    path = folder / name
    root = folder.resolve()
    target = path.resolve()
    if target.parent != root and root not in target.parents:
        raise InputError(f"{name!r} would be written to {target}, outside the output folder "
                         f"{folder}: refused")
    return path


# --------------------------------------------------------------------------- volumes

def _one_line(affine: np.ndarray) -> str:
    return np.array2string(np.asarray(affine), precision=4, separator=",",
                           max_line_width=10**6).replace("\n", "")


def _open_nifti(path: Any, case: str | None, mmap: bool | str = False):
    import nibabel as nib

    path = Path(path)
    where = describe(case, path)
    name = path.name.lower()
    if not path.is_file():
        raise InputError(f"{where}: image file not found")
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise InputError(f"{where}: not a NIfTI file (expected .nii or .nii.gz)")
    try:
        img = nib.load(str(path), mmap=mmap)
        shape = tuple(int(n) for n in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many kinds for damaged files
        detail = " ".join(str(exc).split())
        raise InputError(
            f"{where}: unreadable NIfTI file ({type(exc).__name__}: {detail})") from exc
    if len(shape) < 3 or any(n != 1 for n in shape[3:]) or min(shape[:3]) < 1:
        raise InputError(f"{where}: image is not 3D (shape {shape}); expected 3 axes, or a "
                         "4th axis of length 1")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(f"{where}: affine is not finite: {_one_line(affine)}")
    lin = affine[:3, :3]
    scale = float(np.prod(np.linalg.norm(lin, axis=0)))
    if scale == 0.0 or abs(np.linalg.det(lin)) < 1e-6 * scale:
        raise InputError(f"{where}: affine is singular (zero voxel size or collapsed axes): "
                         f"{_one_line(affine)}")
    return img, shape[:3], affine


def read_volume_header(path: Any, case: str | None = None,
                       ) -> tuple[tuple[int, int, int], np.ndarray]:
    """Check a NIfTI file from its header only: returns ``(shape[:3], affine)``.

    Raises :class:`InputError` for a missing or unreadable file, a non-3D image, or a
    non-finite / singular affine. The voxel data are not read.
    """
    _, shape, affine = _open_nifti(path, case)
    return shape, affine


def load_volume(path: Any, case: str | None = None, dtype: Any = np.float32,
                ) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI scan: returns ``(data[i, j, k], affine)``.

    ``data`` is ``float32`` by default (scaling from the header applied). ``dtype=None`` keeps
    the stored type when the header applies no scaling (int16 CT stays int16: half the memory);
    scaled data come back as float32. Trailing singleton axes are dropped. Raises
    :class:`InputError` naming ``case`` and the file for every problem.
    """
    img, shape, affine = _open_nifti(path, case)
    where = describe(case, path)
    try:
        proxy = img.dataobj
        slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
        unscaled = slope == 1.0 and inter == 0.0
        raw_dtype = img.get_data_dtype()
        if dtype is None and unscaled and raw_dtype.kind in "iuf" and raw_dtype.itemsize <= 4:
            data = np.asanyarray(proxy)
            if not data.dtype.isnative:
                data = data.astype(data.dtype.newbyteorder("="))
        elif dtype is None or np.dtype(dtype).kind == "f":
            data = img.get_fdata(dtype=np.float32 if dtype is None else dtype, caching="unchanged")
        else:
            data = np.asanyarray(proxy).astype(dtype, copy=False)
    except Exception as exc:
        detail = " ".join(str(exc).split())
        raise InputError(
            f"{where}: unreadable voxel data ({type(exc).__name__}: {detail})") from exc
    data = np.asarray(data).reshape(shape)
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise InputError(f"{where}: voxel data contain NaN or infinite values")
    return data, affine


# --------------------------------------------------------------------------- atomic writes

@contextlib.contextmanager
def atomic_write(path: Any) -> Iterator[Path]:
    """Context manager yielding a temporary path to write ``path`` through.

    The temporary file lives in the destination folder (created if needed) and keeps the full
    file name as its suffix, so format detection by extension (``.nii``, ``.nii.gz``, ``.csv``)
    works. On success it is renamed over ``path`` (``os.replace``, atomic on POSIX); on any
    exception it is removed and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{uuid.uuid4().hex[:12]}-{path.name}"
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file for {path}")
        if tmp.is_file():
            # the bytes reach the disk before the rename: after a crash the file is either
            # the old one or the complete new one, never an empty or partial one
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


#: names of the temporary files of :func:`atomic_write` (left behind only by a killed process)
TEMPORARY_NAME = re.compile(r"^\.tmp-[0-9a-f]{12}-.")


def remove_stale_temporaries(*folders: Any) -> list[Path]:
    """Delete the temporary files a killed process left in ``folders``; returns them."""
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            if f.is_file() and TEMPORARY_NAME.match(f.name):
                f.unlink(missing_ok=True)
                removed.append(f)
    return removed


def remove_stale_temporaries_of(*paths: Any) -> list[Path]:
    """Delete the temporaries that a killed writer of ``paths`` left beside them; returns them.

    Only :func:`atomic_write` temporaries *named after one of ``paths``* are removed, so a
    concurrent writer of another file in the same folder keeps its temporary. A workflow job
    calls this for its own outputs when it starts (:func:`locnet.runlog.job_logging`):
    Snakemake runs at most one job per output, so a temporary named after it is stale.
    """
    names: dict[Path, set[str]] = {}
    for path in paths:
        path = Path(path)
        names.setdefault(path.parent, set()).add(path.name)
    removed = []
    for folder, wanted in names.items():
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            # .tmp-<12 hex>-<name>
            if (TEMPORARY_NAME.match(f.name) and f.name[18:] in wanted and f.is_file()):
                f.unlink(missing_ok=True)
                removed.append(f)
    return removed


def write_text_atomic(text: str, path: Any) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically; returns the path."""
    with atomic_write(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
    return Path(path)


def write_csv_atomic(df: pd.DataFrame, path: Any, **kwargs: Any) -> None:
    """Write a DataFrame as CSV (no index by default; NaN as an empty cell), atomically."""
    kwargs.setdefault("index", False)
    with atomic_write(path) as tmp:
        df.to_csv(tmp, **kwargs)


def save_nifti_atomic(img: Any, path: Any) -> None:
    """Save a nibabel image atomically (format from ``path``'s extension)."""
    import nibabel as nib

    with atomic_write(path) as tmp:
        nib.save(img, str(tmp))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def write_json_atomic(obj: Any, path: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON (numpy scalars/arrays and paths allowed), atomically."""
    text = json.dumps(obj, indent=indent, default=_json_default) + "\n"
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def read_json(path: Any) -> Any:
    """Parse a JSON file."""
    return json.loads(Path(path).read_text())


# --------------------------------------------------------------------------- tables

def _read_text_table(path: Any, required: tuple[str, ...], what: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    if path.stat().st_size == 0:
        raise InputError(f"{what} file {path} is empty (0 bytes); it needs a header line "
                         f"{','.join(required)} and one row per line")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError as exc:
        raise InputError(f"{what} file {path} is empty (no header line); it needs a header "
                         f"line {','.join(required)} and one row per line") from exc
    except Exception as exc:
        raise InputError(f"{what} file {path} is unreadable ({type(exc).__name__}: {exc})") from exc
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{what} file {path} lacks column(s) {', '.join(missing)} "
                         f"(has: {', '.join(df.columns)}; needs: {', '.join(required)})")
    for c in df.columns:
        df[c] = df[c].astype(str).str.strip()
    return df


def resolve_image(manifest_path: Any, image: Any) -> Path:
    """Image path of a manifest row: relative paths are relative to the manifest's folder."""
    p = Path(os.path.expanduser(str(image)))
    if p.is_absolute():
        return p
    return Path(os.path.normpath(Path(manifest_path).resolve().parent / p))


def parse_manifest_table(path: Any) -> tuple[pd.DataFrame, list[tuple[int, str]]]:
    """Read a manifest ``case_id,image[,...]`` (all columns as strings, stripped) and list the
    rows with an empty case id or image path, without stopping at the first.

    Returns ``(table, problems)``: every row of the file (row ``r`` is line ``r + 2``), image
    paths as given, and ``(row, message)`` per row with an empty cell. A file that cannot be
    read as a table raises :class:`InputError`.
    """
    df = _read_text_table(path, MANIFEST_COLUMNS, "manifest")
    problems = [(int(i), f"manifest file {path}, line {i + 2}: empty case_id or image")
                for i in np.flatnonzero((df["case_id"] == "") | (df["image"] == ""))]
    return df, problems


def read_manifest(path: Any, resolve: bool = True) -> pd.DataFrame:
    """Read a manifest ``case_id,image[,...]`` (all columns as strings, stripped).

    With ``resolve`` the ``image`` column holds absolute paths (relative ones are taken
    relative to the manifest's folder). Empty case ids or image paths raise
    :class:`InputError`; duplicates are left to the caller (see ``locnet.ingest``).
    """
    df, problems = parse_manifest_table(path)
    if problems:
        raise InputError(f"manifest file {path}: empty case_id or image on line(s) "
                         f"{', '.join(str(row + 2) for row, _ in problems)}")
    if resolve:
        df["image"] = [str(resolve_image(path, p)) for p in df["image"]]
    return df


def _parse_coordinate(value: str) -> float:
    if value == "" or value.lower() in ("nan", "na", "n/a", "none", "null"):
        return float("nan")
    out = float(value)
    if not np.isfinite(out):
        raise ValueError(value)
    return out


def parse_landmark_table(path: Any) -> tuple[pd.DataFrame, np.ndarray, list[tuple[int, str]]]:
    """Read a landmark table and list the problems of its cells without stopping at the first.

    Returns ``(table, invalid, problems)``: ``table`` has columns ``case_id,landmark,x,y,z``
    (extra columns dropped) with NaN for empty *and* for invalid coordinate cells; ``invalid``
    is an ``(n, 3)`` bool array marking the cells that are non-numeric or infinite (so that an
    invalid cell is not mistaken for an empty one); ``problems`` is a list of ``(row, message)``,
    one per empty case id / landmark name and one per invalid cell, each message naming the
    case, the file and the line. A file that cannot be read as a table raises
    :class:`InputError`.
    """
    df = _read_text_table(path, LANDMARK_COLUMNS, "landmark")
    problems: list[tuple[int, str]] = []
    coords = np.full((len(df), 3), np.nan)
    invalid = np.zeros((len(df), 3), dtype=bool)
    for row, rec in enumerate(df[list(LANDMARK_COLUMNS)].itertuples(index=False)):
        line = row + 2  # header is line 1
        if rec.case_id == "" or rec.landmark == "":
            problems.append((row, f"landmark file {path}, line {line}: empty case_id or "
                                  "landmark name"))
        for a, value in enumerate(rec[2:]):
            try:
                coords[row, a] = _parse_coordinate(value)
            except ValueError:
                invalid[row, a] = True
                problems.append((row, f"case {rec.case_id!r} (file {path}), line {line}: "
                                      f"landmark {rec.landmark!r} has a non-numeric "
                                      f"{XYZ[a]} value {value!r}"))
    out = df[["case_id", "landmark"]].copy()
    for a, c in enumerate(XYZ):
        out[c] = coords[:, a]
    return out.reset_index(drop=True), invalid, problems


def read_landmarks(path: Any) -> pd.DataFrame:
    """Read a landmark table ``case_id,landmark,x,y,z`` (extra columns are dropped).

    Empty (or NaN/NA) coordinate cells become NaN. A non-numeric or infinite coordinate, or an
    empty case id / landmark name, raises :class:`InputError` listing every bad line.
    Coordinates are returned as they are stored (no RAS/LPS conversion here).
    """
    out, _, problems = parse_landmark_table(path)
    if problems:
        raise InputError("\n".join(msg for _, msg in problems))
    return out


def write_landmarks(df: pd.DataFrame, path: Any) -> None:
    """Write a landmark table ``case_id,landmark,x,y,z`` atomically; NaN -> empty cell."""
    missing = [c for c in LANDMARK_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"landmark table lacks column(s) {', '.join(missing)}")
    out = df[list(LANDMARK_COLUMNS)].copy()
    for c in XYZ:
        out[c] = out[c].astype(np.float64)
    write_csv_atomic(out, path, na_rep="")
