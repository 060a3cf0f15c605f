"""Landmarks on new scans: a trained model applied to NIfTI files, outside the study.

Every step reuses the study's code so a scan is treated exactly as the study treated its
test cases:

1. the preprocessing parameters (grid size and spacing, number of levels, intensity window,
   background value) are read from the model's ``metadata.json`` ("grid" block, written by
   :func:`locnet.train.train`) and checked against the model itself; they are never typed
   again, so a model cannot be applied at a grid it was not trained at;
2. :func:`preprocess` builds the pyramid in memory with :mod:`locnet.pyramid`
   (:func:`~locnet.geometry.grid_for_scan`, :func:`~locnet.pyramid.resample_to_grid`,
   :func:`~locnet.pyramid.downsample2`), exactly as :func:`~locnet.pyramid.build_pyramid` does
   on disk;
3. :func:`predict_arrays` is :func:`locnet.study_predict.case_prediction` on in-memory levels (noisy
   passes with the same per-case seed derivation, mean and sample sd over passes);
4. grid millimetres go back to world RAS through the scan's grid, and to the original scan's
   (fractional) voxel indices through its affine.

A scan is refused (:class:`ScanError`, a one-line reason) when it cannot be read, is not 3D,
has no content (one value everywhere, or nothing above the model's intensity window), covers
too little of the model's field of view, or a landmark is predicted outside it. A scan whose
intensity statistics lie far from the training cases' (:func:`locnet.quality.intensity_outliers`
against the summary in ``metadata.json``) is answered but flagged ``atypical``.

The noisy passes use, by default, the settings of the study's own predictions recorded in
``quality.json`` (noise seed, passes, confidence level), so a study scan gives the study's
numbers.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import geometry, metrics, quality, seeds, study_predict
from .fileio import (InputError, case_id_problem, inside, load_volume, parse_manifest_table,
                     read_json, resolve_image)
from .pyramid import downsample2, intensity_params, resample_to_grid, scan_window, to_c_order

__all__ = [
    "CONFIDENCE",
    "DEFAULT_MIN_COVERAGE",
    "DEFAULT_SEED",
    "ATYPICAL",
    "DEFAULT_PASSES",
    "LoadedModel",
    "ModelDirError",
    "ScanError",
    "ScanResult",
    "BATCH_COLUMNS",
    "BatchSettings",
    "batch_settings",
    "predict_batch",
    "case_id_from_path",
    "case_files",
    "read_scan_manifest",
    "remove_previous_outputs",
    "scan_problems",
    "field_of_view_coverage",
    "load_model_dir",
    "predict_arrays",
    "predict_scan",
    "preprocess",
    "preprocessing_params",
]

#: confidence level of the ellipsoid when the model records none (quality.json "confidence")
CONFIDENCE = 0.90
#: noise seed when the model records none (quality.json "seed")
DEFAULT_SEED = 0
DEFAULT_PASSES = 50
DEFAULT_MIN_COVERAGE = 0.5
_GRID_KEYS = ("finest_shape", "finest_spacing_mm", "levels", "window_hu", "background_hu")
# optional: "intensity" (absent in models trained before it existed: the CT window)


#: the ``intensity`` flag of a scan whose statistics are far from the training cohort's
ATYPICAL = "atypical"


class ModelDirError(ValueError):
    """The model folder is unusable (missing files, metadata without preprocessing)."""


class ScanError(ValueError):
    """One scan cannot be processed; the message is a one-line reason."""


# --------------------------------------------------------------------------- the model

@dataclass
class LoadedModel:
    """A trained model with everything inference needs from its folder."""

    model: Any
    metadata: dict
    model_dir: Path
    params: dict                      # preprocessing: the metadata's "grid" block
    landmarks: list[str]
    levels: list[int]                 # pyramid levels the model reads
    noisy: bool
    default_passes: int
    quality: dict | None = None       # MODEL_DIR/quality.json, if any

    @property
    def method(self) -> str:
        return str(self.metadata.get("method", self.model_dir.name))

    @property
    def estimator(self) -> str:
        """The estimator of the noisy passes the quality threshold was chosen with
        (``quality.json``'s ``estimator``; ``"exact"`` when absent)."""
        return str((self.quality or {}).get("estimator") or "exact")

    @property
    def confidence(self) -> float:
        """Confidence level of the ellipsoid the quality threshold was chosen at
        (``quality.json``'s ``confidence``, from ``evaluation.confidence``; else
        :data:`CONFIDENCE`)."""
        c = (self.quality or {}).get("confidence")
        return CONFIDENCE if c is None else float(c)

    @property
    def study_seed(self) -> int | None:
        """The noise seed of the study's own predictions of this model (``quality.json``'s
        ``seed``), or ``None`` when it is not recorded."""
        s = (self.quality or {}).get("seed")
        return None if s is None else int(s)

    @property
    def intensity(self) -> dict | None:
        """The training cases' intensity summary (``metadata.json``'s ``intensity``, written
        by :func:`locnet.train.train`), or ``None`` for models trained before it existed."""
        s = self.metadata.get("intensity")
        return s if isinstance(s, Mapping) and s.get("statistics") else None

    @property
    def sd_scale(self) -> float | None:
        """Split-conformal scale of the sds (``quality.json``'s ``sd_scale``), or ``None``."""
        s = (self.quality or {}).get("sd_scale")
        return float(s) if s is not None and math.isfinite(float(s)) and float(s) > 0 else None

    @property
    def threshold_mm3(self) -> float | None:
        if self.quality is None or self.quality.get("threshold_mm3") is None:
            return None
        return float(self.quality["threshold_mm3"])


def preprocessing_params(metadata: Mapping[str, Any]) -> dict:
    """The preprocessing block (``metadata["grid"]``), checked and normalised."""
    grid = metadata.get("grid")
    if not isinstance(grid, Mapping):
        raise ModelDirError("metadata.json has no 'grid' block")
    missing = [k for k in _GRID_KEYS if k not in grid]
    if missing:
        raise ModelDirError(
            f"metadata.json 'grid' lacks {', '.join(missing)}: the model was trained by an older "
            "version that did not store its preprocessing; re-train it (the study re-runs the "
            "train rule) so that new scans are preprocessed exactly as its training data")
    window = [float(w) for w in grid["window_hu"]]
    if len(window) != 2 or not window[1] > window[0]:
        raise ModelDirError(f"metadata.json grid.window_hu must be [lo, hi], got {window}")
    params = {"finest_shape": int(grid["finest_shape"]),
              "finest_spacing_mm": float(grid["finest_spacing_mm"]),
              "levels": int(grid["levels"]), "window_hu": window,
              "background_hu": float(grid["background_hu"])}
    if "intensity" in grid:  # absent (older models, the default study): the CT window
        try:
            params["intensity"] = intensity_params(grid["intensity"])
        except ValueError as exc:
            raise ModelDirError(f"metadata.json grid.intensity: {exc}") from None
    return params


def _default_passes(metadata: Mapping[str, Any], qual: Mapping[str, Any] | None = None) -> int:
    # the study's own passes first (quality.json, recorded from the predict rule)
    for holder in (qual or {}, metadata, metadata.get("evaluation") or {},
                   metadata.get("method_cfg") or {}):
        if isinstance(holder, Mapping) and holder.get("passes"):
            return int(holder["passes"])
    return DEFAULT_PASSES


def _load_keras(path: Path, keras) -> Any:
    """The model of a ``.keras`` file. A ``.keras`` file is a zip archive; one that is not
    (truncated by a copy, or another kind of file) is named as such, since Keras itself says
    "File not found" for a file that is there."""
    import zipfile

    if not zipfile.is_zipfile(path):
        size = path.stat().st_size
        raise ModelDirError(f"{path}: not a valid .keras file ({size} bytes, not a complete "
                            "zip archive: truncated by an interrupted copy, or not a Keras "
                            "model); copy the model folder again")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # keras raises many kinds
        detail = " ".join(str(exc).split())[:300]
        raise ModelDirError(f"{path}: not a valid .keras file, cannot be loaded "
                            f"({type(exc).__name__}: {detail})") from exc


def load_model_dir(model_dir: Any) -> LoadedModel:
    """Load ``model_dir/model.keras`` + ``metadata.json`` (+ ``quality.json`` if present).

    Raises :class:`ModelDirError` when a file is missing or the metadata does not match the
    model (grid or landmarks).
    """
    import keras

    from . import data, models, study_predict  # models also registers the custom layers

    model_dir = Path(model_dir)
    if model_dir.is_file() and model_dir.name == "model.keras":
        model_dir = model_dir.parent
    for name in ("model.keras", "metadata.json"):
        if not (model_dir / name).is_file():
            raise ModelDirError(f"model folder {model_dir}: {name} not found")
    try:
        metadata = read_json(model_dir / "metadata.json")
    except ValueError as exc:
        raise ModelDirError(f"{model_dir / 'metadata.json'}: not valid JSON ({exc})") from None
    params = preprocessing_params(metadata)
    model = _load_keras(model_dir / "model.keras", keras)
    for attr, key in (("finest_shape", "finest_shape"), ("finest_spacing_mm", "finest_spacing_mm"),
                      ("n_levels", "levels")):
        have = getattr(model, attr, None)
        if have is not None and not math.isclose(float(have), float(params[key])):
            raise ModelDirError(f"model {model_dir} was built for {key}={have} but its "
                                f"metadata.json says {params[key]}")
    try:
        qual = quality.read_quality(model_dir)
    except ValueError as exc:  # names the file
        raise ModelDirError(" ".join(str(exc).split())) from None
    estimator = (qual or {}).get("estimator")
    if estimator is not None and estimator not in models.ESTIMATORS:
        raise ModelDirError(f"{model_dir / quality.QUALITY_FILE}: unknown estimator {estimator!r} "
                            f"(one of {', '.join(models.ESTIMATORS)})")
    for key, ok in (("confidence", lambda v: 0.0 < float(v) < 1.0),
                    ("seed", lambda v: float(v) == int(v)), ("passes", lambda v: int(v) >= 0)):
        value = (qual or {}).get(key)
        try:
            good = value is None or (not isinstance(value, bool) and ok(value))
        except (TypeError, ValueError):
            good = False
        if not good:
            raise ModelDirError(f"{model_dir / quality.QUALITY_FILE}: invalid {key} {value!r}")
    landmarks = [str(n) for n in metadata.get("landmarks") or getattr(model, "landmarks", [])]
    model_landmarks = getattr(model, "landmarks", None)
    if model_landmarks is not None and list(model_landmarks) != landmarks:
        raise ModelDirError(f"model {model_dir}: landmarks {list(model_landmarks)} differ from "
                            f"metadata.json {landmarks}")
    return LoadedModel(model=model, metadata=metadata, model_dir=model_dir, params=params,
                       landmarks=landmarks, levels=data.model_levels(model),
                       noisy=study_predict.is_noisy(model),
                       default_passes=_default_passes(metadata, qual),
                       quality=qual)


# --------------------------------------------------------------------------- preprocessing

def preprocess(data: np.ndarray, affine: Any, params: Mapping[str, Any],
               levels: Sequence[int] | None = None, threads: int | None = None,
               case: str | None = None, path: Any = None,
               ) -> tuple[dict[str, np.ndarray], geometry.Grid, np.ndarray]:
    """The study's pyramid of one scan, in memory.

    Returns ``(inputs, grid, level0)``: model inputs ``{"level{l}": (1, n, n, n, 1) float32}``
    for ``levels`` (default: all), the scan's :class:`~locnet.geometry.Grid`, and the windowed
    finest level (for overlays). Identical to :func:`locnet.pyramid.build_pyramid` + reading
    the levels back. ``case`` and ``path`` name the scan in the intensity-window warning.
    """
    n0, s0, n_levels = int(params["finest_shape"]), float(params["finest_spacing_mm"]), \
        int(params["levels"])
    grid = geometry.grid_for_scan(affine, data.shape, n0, s0, n_levels)
    wanted = set(range(n_levels) if levels is None else (int(l) for l in levels))
    # the model's intensity mode (absent: the CT window), as build_pyramid applies it
    try:
        window, background = scan_window(data, params.get("intensity"), params["window_hu"],
                                         float(params["background_hu"]), case=case, path=path)
    except InputError as exc:  # percentile mode on a constant scan
        raise ScanError(_strip_where(exc)) from None
    level = resample_to_grid(data, affine, grid, background, window=window, threads=threads)
    level = level0 = to_c_order(level, threads=threads)  # the order the backends take
    inputs = {}
    for lv in range(max(wanted) + 1):
        if lv:
            level = downsample2(level)
        if lv in wanted:
            inputs[f"level{lv}"] = level[None, ..., None]
    return inputs, grid, level0


def field_of_view_coverage(grid: geometry.Grid, affine: Any, shape: Sequence[int],
                           samples: int = 16) -> float:
    """Fraction of the model's field of view (the grid's cube) that the scan covers.

    Estimated on a ``samples^3`` lattice of points spread over the grid's cube.
    """
    m = int(samples)
    ext = grid.extent_mm
    t = (np.arange(m) + 0.5) / m * ext - grid.spacing / 2.0
    pts = np.stack(np.meshgrid(t, t, t, indexing="ij"), axis=-1).reshape(-1, 3)
    pts = pts + np.asarray(grid.origin, dtype=np.float64)
    return float(np.mean(geometry.inside_scan(affine, shape, pts)))


# --------------------------------------------------------------------------- prediction

#: the study's prediction on in-memory inputs (one implementation for the study and new scans)
predict_arrays = study_predict.predict_arrays


@dataclass
class ScanResult:
    """Predictions of one scan (world RAS mm) and what the overlay needs."""

    case_id: str
    image: str
    landmarks: list[str]
    world: np.ndarray                  # (K, 3) RAS mm
    voxel: np.ndarray                  # (K, 3) float index in the original scan
    sd: np.ndarray | None              # (K, 3) mm, noisy models only
    conf_volume_mm3: np.ndarray | None  # (K,)
    flags: list[str]
    coverage: float
    grid: geometry.Grid
    level0: np.ndarray = field(repr=False)
    confidence: float = CONFIDENCE     # level of the confidence volume and ellipses
    intensity: dict | None = None      # the scan's intensity statistics
    intensity_outliers: list[str] | None = None  # None: no training summary to compare with
    sd_scale: float | None = None      # conformal scale of the sds (quality.json), if any

    @property
    def intensity_flag(self) -> str:
        """``atypical`` when a statistic is out of the training cohort's range, ``ok`` when
        none is, ``""`` when the model has no training summary."""
        if self.intensity_outliers is None:
            return ""
        return ATYPICAL if self.intensity_outliers else quality.OK

    @property
    def world_lps(self) -> np.ndarray:
        return geometry.ras_lps(self.world)

    def rows(self) -> list[dict]:
        """One flat record per landmark (the columns of ``landmarks.csv``)."""
        lps = self.world_lps
        out = []
        for k, name in enumerate(self.landmarks):
            row = {"case_id": self.case_id, "image": self.image, "landmark": name,
                   "x_ras": self.world[k, 0], "y_ras": self.world[k, 1], "z_ras": self.world[k, 2],
                   "x_lps": lps[k, 0], "y_lps": lps[k, 1], "z_lps": lps[k, 2],
                   "i": self.voxel[k, 0], "j": self.voxel[k, 1], "k": self.voxel[k, 2]}
            if self.sd is not None:
                vol = float(self.conf_volume_mm3[k])
                row.update(sd_x=self.sd[k, 0], sd_y=self.sd[k, 1], sd_z=self.sd[k, 2],
                           conf_volume_mm3=vol,
                           conf_volume_calibrated_mm3=(vol * self.sd_scale ** 3
                                                       if self.sd_scale else math.nan))
            else:
                row.update(sd_x=math.nan, sd_y=math.nan, sd_z=math.nan, conf_volume_mm3=math.nan,
                           conf_volume_calibrated_mm3=math.nan)
            row["quality"] = self.flags[k]
            row["intensity"] = self.intensity_flag
            out.append(row)
        return out


def case_id_from_path(path: Any) -> str:
    """Case id of a scan file: its name without ``.nii.gz`` / ``.nii``."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def scan_problems(items: Sequence[tuple[str, Any, str]]) -> list[str]:
    """Every problem of a list of scans ``(case id, image path, where it was given)``, all at
    once: a case id that breaks :data:`locnet.fileio.CASE_ID_PATTERN` (the rule of ingest: it
    names the files ``OUT/{case}.mrk.json`` and ``OUT/{case}_overlay.png``, so ``..``, ``/``
    or an absolute path would write outside the output folder), and a case id given twice.
    Ids taken from file names are checked the same way. Empty when there is none."""
    problems, seen = [], {}
    for case, path, where in items:
        bad = case_id_problem(case)
        if bad:
            problems.append(f"{where}: {bad}")
        elif case in seen:
            problems.append(f"{where}: duplicate case id {case!r} (also {seen[case]}; image "
                            f"{path})")
        else:
            seen[case] = where
    return problems


def read_scan_manifest(path: Any, check_ids: bool = True,
                       ) -> tuple[list[tuple[str, Path, str]], list[str]]:
    """The scans of a manifest ``case_id,image`` (``locnet predict --manifest``, rule
    ``infer``'s ``inference.manifest``) and every problem of it, all at once (an unreadable
    file, empty cells and, with ``check_ids``, :func:`scan_problems`). Returns
    ``(items, problems)`` with items ``(case id, resolved image path, "manifest FILE, line
    N")``."""
    try:
        table, empty = parse_manifest_table(path)
    except InputError as exc:
        return [], [" ".join(str(exc).split())]
    skip = {row for row, _ in empty}
    items = [(str(c), resolve_image(path, im), f"manifest {path}, line {row + 2}")
             for row, (c, im) in enumerate(zip(table["case_id"], table["image"]))
             if row not in skip]
    return items, [msg for _, msg in empty] + (scan_problems(items) if check_ids else [])


#: the files of ``OUT`` that a batch writes whatever its scans (:func:`predict_batch`)
BATCH_FILES = ("landmarks.csv", "landmarks.json")


def case_files(case: str) -> tuple[str, str]:
    """The names of the files a batch writes per scan: markups and overlay."""
    return f"{case}.mrk.json", f"{case}_overlay.png"


def remove_previous_outputs(out: Any, whole_folder: bool = False) -> list[Path]:
    """Remove the files an earlier batch wrote to ``out`` and nothing else: the
    :data:`BATCH_FILES` and, for every case its ``landmarks.json`` lists (answered or failed),
    :func:`case_files` (only where they resolve inside ``out``). Files of other origin stay.
    ``whole_folder`` (rule ``infer``, whose folder no one else writes to, and whose
    ``landmarks.json`` Snakemake has deleted before the job starts): every file named as
    :func:`case_files` names them, for any allowed case id. Returns the removed paths."""
    out = Path(out)
    cases: list[str] = []
    if whole_folder and out.is_dir():
        for p in out.iterdir():
            for suffix in (".mrk.json", "_overlay.png"):
                if p.name.endswith(suffix):
                    cases.append(p.name[: -len(suffix)])
    try:
        doc = read_json(out / "landmarks.json")
        for key in ("cases", "failed"):
            cases += [str(c.get("case_id")) for c in doc.get(key) or [] if isinstance(c, dict)]
    except (OSError, ValueError, AttributeError):
        pass  # no readable record of an earlier batch: only its fixed files are known
    removed = []
    names = list(BATCH_FILES) + [n for c in dict.fromkeys(cases) if not case_id_problem(c)
                                 for n in case_files(c)]
    for name in names:
        try:
            path = inside(out, name)
        except InputError:
            continue
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed.append(path)
    return removed


def _strip_where(msg: str) -> str:
    """One line, without the ``case 'x' (file ...)`` prefix the CLI prints itself."""
    return " ".join(str(msg).split())


def _level_of(inputs: Mapping[str, np.ndarray], level0: np.ndarray, level: int) -> np.ndarray:
    """Pyramid level ``level`` of a preprocessed scan (from the model inputs when there)."""
    if f"level{level}" in inputs:
        return np.asarray(inputs[f"level{level}"])[0, ..., 0]
    a = level0
    for _ in range(int(level)):
        a = downsample2(a)
    return a


def _no_content(value_range: tuple[float, float], level0: np.ndarray | None,
                params: Mapping[str, Any], name: str) -> str | None:
    """Why a scan (its values span ``value_range``) has no content for the model: one value
    everywhere, or no voxel of its normalised finest level ``level0`` above
    :data:`locnet.quality.FOREGROUND_LEVEL`. ``None`` when it has content."""
    lo, hi = value_range
    if lo == hi:
        return f"no content: every voxel of {name} has the value {lo:g}"
    if level0 is not None and not np.any(level0 > quality.FOREGROUND_LEVEL):
        mode = (params.get("intensity") or {}).get("mode", "ct_window")
        where = (f"the model's intensity window {params['window_hu']} HU" if mode == "ct_window"
                 else "the model's normalised intensity range")
        return (f"no content: no voxel of {name} (values {lo:g} to {hi:g}) reaches "
                f"{100 * quality.FOREGROUND_LEVEL:.0f}% of {where}")
    return None


def predict_scan(lm: LoadedModel, path: Any, case_id: str | None = None, passes: int | None = None,
                 seed: int | None = None, threshold_mm3: float | None = None,
                 min_coverage: float = DEFAULT_MIN_COVERAGE, threads: int | None = None,
                 estimator: str | None = None, confidence: float | None = None) -> ScanResult:
    """Predict the landmarks of one scan; raises :class:`ScanError` with a one-line reason.

    ``passes``: noisy passes (default: the model's); ``seed``: the run's seed, from which the
    scan's noise draws derive as ``seeds.derive(seed, case_id)`` (as in the study's
    predictions; default: the study's, :attr:`LoadedModel.study_seed`, else
    :data:`DEFAULT_SEED`); ``confidence``: level of the confidence volume (default: the one
    the quality threshold was chosen at, :attr:`LoadedModel.confidence`); ``threshold_mm3``:
    quality threshold on the confidence volume (``None``: no flag); ``min_coverage``: least
    fraction of the model's field of view the scan must cover; ``estimator``: how the noisy
    passes are computed (:func:`locnet.models.predict_passes`; default: the one the model's
    quality threshold was chosen with, :attr:`LoadedModel.estimator`).
    """
    path = Path(path)
    case = case_id or case_id_from_path(path)
    try:
        data, affine = load_volume(path, case=None, dtype=None)
    except InputError as exc:
        raise ScanError(_strip_where(exc)) from None
    shape = data.shape
    params = lm.params
    grid = geometry.grid_for_scan(affine, shape, params["finest_shape"],
                                  params["finest_spacing_mm"], params["levels"])
    coverage = field_of_view_coverage(grid, affine, shape)
    if coverage < min_coverage:
        ext = geometry.scan_corners(affine, shape)
        size = ext.max(axis=0) - ext.min(axis=0) + geometry.native_spacing(affine)
        raise ScanError(
            f"outside the trained field of view: the scan ({size[0]:.0f} x {size[1]:.0f} x "
            f"{size[2]:.0f} mm) covers {100 * coverage:.0f}% of the model's "
            f"{grid.extent_mm:.0f} mm cube (needs >= {100 * min_coverage:.0f}%)")
    value_range = (float(np.min(data)), float(np.max(data))) if data.size else (0.0, 0.0)
    reason = _no_content(value_range, None, params, path.name)
    if reason:
        raise ScanError(reason)
    inputs, grid, level0 = preprocess(data, affine, params, lm.levels, threads=threads,
                                      case=case, path=path)
    reason = _no_content(value_range, level0, params, path.name)
    if reason:
        raise ScanError(reason)
    del data
    summary = lm.intensity
    stats_level = int(summary["level"]) if summary else int(params["levels"]) - 1
    stats = quality.intensity_stats(_level_of(inputs, level0, stats_level))
    outliers = quality.intensity_outliers(stats, summary) if summary else None
    n_passes = lm.default_passes if passes is None else int(passes)
    if seed is None:
        seed = DEFAULT_SEED if lm.study_seed is None else lm.study_seed
    conf = lm.confidence if confidence is None else float(confidence)
    pos, samples, _ = predict_arrays(lm.model, inputs, n_passes if lm.noisy else 0,
                                     seeds.derive(int(seed), case),
                                     estimator=estimator or lm.estimator)
    world = grid.grid_mm_to_world(pos)
    voxel = geometry.world_to_voxel(affine, world)
    inside = np.atleast_1d(geometry.inside_scan(affine, shape, world))
    if not np.all(np.isfinite(world)):
        raise ScanError("the model returned a non-finite position")
    if not inside.all():
        k = int(np.flatnonzero(~inside)[0])
        raise ScanError(
            f"landmark {lm.landmarks[k]} predicted outside the scan (RAS "
            f"{world[k, 0]:.1f}, {world[k, 1]:.1f}, {world[k, 2]:.1f} mm; voxel "
            f"{voxel[k, 0]:.1f}, {voxel[k, 1]:.1f}, {voxel[k, 2]:.1f} of shape {tuple(shape)})")
    sd = vol = None
    flags = [""] * len(lm.landmarks)
    if samples is not None:
        sd, vol = metrics.pass_uncertainty(samples, level=conf)
        # the flag compares the calibrated volume with the calibrated threshold when the
        # model has a conformal scale (the same decision as raw volume against raw threshold:
        # both are multiplied by sd_scale^3), else the raw ones
        s = lm.sd_scale
        flags = ([quality.flag(v * s**3, None if threshold_mm3 is None else threshold_mm3 * s**3)
                  for v in vol] if s else [quality.flag(v, threshold_mm3) for v in vol])
    if outliers:
        # a scan unlike the training cohort is never 'ok', whatever its volumes say: the
        # threshold was chosen on scans like the training ones
        flags = [quality.REVIEW] * len(flags)
    return ScanResult(case_id=case, image=str(path), landmarks=list(lm.landmarks), world=world,
                      voxel=voxel, sd=sd, conf_volume_mm3=vol, flags=flags, coverage=coverage,
                      grid=grid, level0=level0, confidence=conf, intensity=stats,
                      intensity_outliers=outliers, sd_scale=lm.sd_scale)


# --------------------------------------------------------------------------- batches

#: columns of ``OUT/landmarks.csv``
BATCH_COLUMNS = ["case_id", "image", "landmark", "x_ras", "y_ras", "z_ras", "x_lps", "y_lps",
                 "z_lps", "i", "j", "k", "sd_x", "sd_y", "sd_z", "conf_volume_mm3",
                 "conf_volume_calibrated_mm3", "quality", "intensity"]


@dataclass(frozen=True)
class BatchSettings:
    """The settings of one batch of scans, resolved against the model folder."""

    passes: int
    seed: int
    seed_source: str              # "--seed" (given), "quality.json" or "default"
    estimator: str
    threshold_mm3: float | None
    min_coverage: float
    threads: int | None = None
    overlays: bool = True


def batch_settings(lm: LoadedModel, passes: int | None = None, seed: int | None = None,
                   estimator: str | None = None, threshold_mm3: float | None = None,
                   min_coverage: float | None = None, threads: int | None = None,
                   overlays: bool = True, quiet: bool = False) -> tuple[BatchSettings, list[str]]:
    """Resolve the settings of a batch (``None``: the model folder's, else the defaults).

    Returns the settings and the notes a user should read before the scans run, each a line
    starting ``warning:`` or ``note:`` (``quiet`` drops the notes that only say a column will
    stay empty)."""
    qual_dir = lm.model_dir / "quality.json"
    threshold = threshold_mm3 if threshold_mm3 is not None else lm.threshold_mm3
    passes = lm.default_passes if passes is None else int(passes)
    min_cov = DEFAULT_MIN_COVERAGE if min_coverage is None else float(min_coverage)
    seed_source = "--seed" if seed is not None else "quality.json" if lm.study_seed is not None else "default"
    seed = seed if seed is not None else lm.study_seed
    seed = DEFAULT_SEED if seed is None else int(seed)
    estimator = estimator or lm.estimator
    notes = []
    if (lm.noisy and passes > 1 and threshold_mm3 is None and threshold is not None
            and estimator != lm.estimator):
        notes.append(f"warning: the quality threshold of {qual_dir} was chosen with the "
                     f"{lm.estimator!r} estimator, these passes use {estimator!r}: their "
                     "confidence volumes differ, so the flags may not mean what the threshold "
                     "promises")
    if lm.noisy and threshold is None and passes > 1 and not quiet:
        notes.append(f"note: no --threshold and no {qual_dir}: the quality column stays empty")
    if lm.noisy and passes > 0 and seed_source == "default":
        notes.append(f"note: {qual_dir} records no noise seed of the study's predictions: "
                     f"using seed {seed}, so study scans will not get the study's numbers "
                     "exactly")
    if lm.intensity is None:
        notes.append(f"note: {lm.model_dir / 'metadata.json'} has no intensity summary of the "
                     "training cases (a model trained before it was recorded): scans are not "
                     "compared with the training cohort's intensities")
    settings = BatchSettings(passes=passes, seed=seed, seed_source=seed_source,
                             estimator=estimator, threshold_mm3=threshold, min_coverage=min_cov,
                             threads=threads, overlays=overlays)
    return settings, notes


def _json_value(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if hasattr(v, "item"):
        v = v.item()
        return None if isinstance(v, float) and math.isnan(v) else v
    return v


def _markup_descriptions(lm: LoadedModel, rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        d = f"locnet {lm.method}"
        if not math.isnan(r["conf_volume_mm3"]):
            d += (f"; sd {r['sd_x']:.2f},{r['sd_y']:.2f},{r['sd_z']:.2f} mm; 90% volume "
                  f"{r['conf_volume_mm3']:.0f} mm3")
        if r["quality"]:
            d += f"; quality {r['quality']}"
        if r["intensity"] == ATYPICAL:
            d += "; intensities atypical of the training cases"
        out.append(d)
    return out


def _case_record(res: ScanResult, path: Path, rows: list[dict]) -> dict:
    return {
        "case_id": res.case_id, "image": str(path), "field_of_view_coverage": res.coverage,
        "grid_origin_ras_mm": list(res.grid.origin),
        "intensity": {"flag": res.intensity_flag or None, "statistics": res.intensity,
                      "outside_training_range": res.intensity_outliers},
        "landmarks": {r["landmark"]: {k: _json_value(v) for k, v in r.items()
                                      if k not in ("case_id", "image", "landmark")}
                      for r in rows},
    }


def _batch_document(lm: LoadedModel, s: BatchSettings, cases: list, failed: list) -> dict:
    summary = lm.intensity
    return {
        "model": str(lm.model_dir), "method": lm.method, "landmarks": lm.landmarks,
        "preprocessing": lm.params, "noisy": lm.noisy,
        "passes": s.passes if lm.noisy else 0, "seed": s.seed, "seed_source": s.seed_source,
        "sd_scale": lm.sd_scale,
        "calibrated": (lm.quality or {}).get("calibrated", lm.sd_scale is not None),
        "calibration_reason": (lm.quality or {}).get("calibration_reason") or None,
        "estimator": s.estimator if lm.noisy and s.passes > 0 else None,
        "confidence": lm.confidence, "quality_threshold_mm3": s.threshold_mm3,
        "min_coverage": s.min_coverage,
        "intensity_check": None if summary is None else {
            "training": summary, "margin_robust_sd": quality.INTENSITY_MARGIN,
            "min_robust_sd": quality.MIN_SPREAD,
            "rule": "a statistic is atypical when it lies outside the training cases' "
                    "[min, max] and more than margin_robust_sd robust sds (at least "
                    "min_robust_sd) from their median"},
        "coordinates": {"ras": "world RAS mm (x_ras, y_ras, z_ras)",
                        "lps": "world LPS mm = RAS with x and y negated",
                        "voxel": "fractional index (i, j, k) of the original scan, "
                                 "world = affine @ [i, j, k, 1]",
                        "markups": "OUT/{case}.mrk.json, LPS mm"},
        "cases": cases, "failed": failed,
    }


def predict_batch(lm: LoadedModel, scans: Sequence[tuple[str, Any]], out: Any,
                  settings: BatchSettings, progress: bool = True,
                  report: Callable[[str], None] | None = None) -> dict:
    """Predict every scan of ``scans`` (``(case_id, path)`` pairs) and write ``out``.

    Per scan ``OUT/{case}.mrk.json`` (3D Slicer markups, LPS) and, with ``settings.overlays``,
    ``OUT/{case}_overlay.png``; then ``OUT/landmarks.csv`` (:data:`BATCH_COLUMNS`) and
    ``OUT/landmarks.json`` (settings, per-case records, failures). A scan that fails is
    recorded under ``"failed"`` with its reason and the others go on. ``report`` receives one
    line per failure or warning (``case: reason``). Returns the JSON document.

    A case id that is not allowed (:func:`scan_problems`: it would name a file outside
    ``out``) or given twice raises :class:`~locnet.fileio.InputError` before anything is
    written, and every path written is checked to lie inside ``out``
    (:func:`locnet.fileio.inside`).
    """
    import pandas as pd
    from tqdm import tqdm

    from . import slicer
    from .fileio import write_csv_atomic, write_json_atomic

    out = Path(out)
    problems = scan_problems([(str(c), p, f"scan {p}") for c, p in scans])
    if problems:  # before anything is written
        raise InputError("cannot write these scans' results:\n" + "\n".join(problems))
    say = report or (lambda line: None)
    rows, cases, failed = [], [], []
    bar = tqdm(scans, desc="scans", unit="scan", disable=not progress, file=sys.stderr)
    for case, path in bar:
        bar.set_postfix_str(case, refresh=False)
        try:
            res = predict_scan(lm, path, case, passes=settings.passes, seed=settings.seed,
                               threshold_mm3=settings.threshold_mm3,
                               min_coverage=settings.min_coverage, threads=settings.threads,
                               estimator=settings.estimator)
            if res.intensity_outliers:
                say(f"{case}: warning: intensities atypical of the training cases: "
                    f"{'; '.join(res.intensity_outliers)} ({path})")
            case_rows = res.rows()
            markups, overlay = (inside(out, n) for n in case_files(case))
            slicer.write_markups(markups, res.landmarks, res.world,
                                 _markup_descriptions(lm, case_rows))
            if settings.overlays:
                from .figures import write_overlay

                write_overlay(res, overlay)
        except ScanError as exc:
            failed.append({"case_id": case, "image": str(path), "reason": str(exc)})
            say(f"{case}: {exc}")
            continue
        except Exception as exc:  # an unexpected failure must not stop the other scans
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            failed.append({"case_id": case, "image": str(path), "reason": reason})
            say(f"{case}: {reason}")
            continue
        rows += case_rows
        cases.append(_case_record(res, Path(path), case_rows))
    bar.close()
    doc = _batch_document(lm, settings, cases, failed)
    write_csv_atomic(pd.DataFrame(rows, columns=BATCH_COLUMNS), inside(out, BATCH_FILES[0]),
                     na_rep="")
    write_json_atomic(doc, inside(out, BATCH_FILES[1]))
    return doc
