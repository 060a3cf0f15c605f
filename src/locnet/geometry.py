"""Coordinate conventions: the only module that knows them.

Everything else in locnet calls these functions instead of doing affine arithmetic itself.
The rules (see ``docs/architecture.md``):

* **World coordinates** are RAS millimetres (+x Right, +y Anterior, +z Superior), as in NIfTI
  and nibabel. LPS (DICOM, ITK) differs by the sign of x and y; :func:`ras_lps` converts
  either way.
* **Voxel indices** address voxel *centres*: ``world = affine @ [i, j, k, 1]``. Arrays are
  indexed ``[i, j, k]`` exactly as nibabel returns them.
* **Pyramid grids** (:class:`Grid`) are isotropic and axis-aligned RAS. Level 0 is the finest:
  ``N0`` voxels per axis at spacing ``s0``, origin ``o`` = world position of the centre of
  voxel (0, 0, 0). Level ``l`` has ``N0 / 2**l`` voxels at ``s_l = s0 * 2**l``; its voxel ``v``
  is the mean of level-0 voxels ``2**l * v ... 2**l * v + 2**l - 1``, so its centre lies at
  ``o + s0 * (2**l * v + (2**l - 1) / 2)``, i.e. ``origin_l = o + (s_l - s0) / 2``.
* **Grid placement**: :func:`grid_for_scan` centres the grid on the centre of the scan's world
  bounding box (its 8 corners), never on landmarks: ``o = c - s0 * (N0 - 1) / 2``.
* **Grid millimetres** ``g = world - o``: position relative to the centre of level-0 voxel
  (0, 0, 0). A level-``l`` voxel coordinate ``v`` maps to ``g = s_l * v + (s_l - s0) / 2``.

Point arguments accept one point ``(3,)`` or any stack ``(..., 3)`` and return float64 arrays of
the same shape; NaN (a missing landmark) propagates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import product
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "COORDINATE_SYSTEMS",
    "Grid",
    "apply_affine",
    "grid_for_scan",
    "inside_scan",
    "native_spacing",
    "ras_lps",
    "scan_centre",
    "scan_corners",
    "to_ras",
    "grid_mm_to_voxel",
    "voxel_to_grid_mm",
    "voxel_to_world",
    "world_to_voxel",
]

COORDINATE_SYSTEMS = ("RAS", "LPS")
_RAS_LPS_FLIP = np.array([-1.0, -1.0, 1.0])


def _points(pts: Any) -> np.ndarray:
    arr = np.asarray(pts, dtype=np.float64)
    if arr.shape[-1:] != (3,):
        raise ValueError(f"points must have shape (3,) or (..., 3), got {arr.shape}")
    return arr


def _affine(affine: Any) -> np.ndarray:
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {aff.shape}")
    return aff


# --------------------------------------------------------------------------- world frames

def ras_lps(points: Any) -> np.ndarray:
    """Flip the sign of x and y: RAS -> LPS and LPS -> RAS (the map is its own inverse)."""
    return _points(points) * _RAS_LPS_FLIP


def to_ras(points: Any, coordinate_system: str) -> np.ndarray:
    """Convert points given in ``coordinate_system`` ("RAS" or "LPS", any case) to RAS."""
    system = str(coordinate_system).upper()
    if system not in COORDINATE_SYSTEMS:
        raise ValueError(
            f"coordinate system must be one of {COORDINATE_SYSTEMS}, got {coordinate_system!r}")
    pts = _points(points)
    return ras_lps(pts) if system == "LPS" else pts.copy()


# --------------------------------------------------------------------------- affines

def apply_affine(affine: Any, pts: Any) -> np.ndarray:
    """Apply a 4x4 homogeneous affine to points ``(..., 3)``."""
    aff = _affine(affine)
    p = _points(pts)
    return p @ aff[:3, :3].T + aff[:3, 3]


def voxel_to_world(affine: Any, voxels: Any) -> np.ndarray:
    """Voxel-centre indices ``[i, j, k]`` (float allowed) -> world RAS mm."""
    return apply_affine(affine, voxels)


def world_to_voxel(affine: Any, pts: Any) -> np.ndarray:
    """World RAS mm -> (fractional) voxel indices ``[i, j, k]`` of the image with ``affine``."""
    return apply_affine(np.linalg.inv(_affine(affine)), pts)


def native_spacing(affine: Any) -> np.ndarray:
    """Voxel size along each array axis (mm): the column norms of the affine's 3x3 part."""
    return np.linalg.norm(_affine(affine)[:3, :3], axis=0)


def scan_corners(affine: Any, shape: Sequence[int]) -> np.ndarray:
    """World positions (8, 3) of the centres of the 8 corner voxels of a volume."""
    n = np.asarray(shape[:3], dtype=np.float64) - 1.0
    corners = np.array(list(product((0.0, 1.0), repeat=3))) * n
    return voxel_to_world(affine, corners)


def scan_centre(affine: Any, shape: Sequence[int]) -> np.ndarray:
    """Centre of the world bounding box of the volume's 8 corners (RAS mm)."""
    c = scan_corners(affine, shape)
    return (c.min(axis=0) + c.max(axis=0)) / 2.0


def inside_scan(affine: Any, shape: Sequence[int], pts: Any, tol_voxels: float = 0.5):
    """True where a world point lies within the scan's voxel extent.

    The extent runs from the first to the last voxel centre along each array axis, widened by
    ``tol_voxels`` (default half a voxel: the physical edge of the outer voxels). NaN -> False.
    Returns a bool for one point, a bool array for a stack of points.
    """
    v = world_to_voxel(affine, pts)
    hi = np.asarray(shape[:3], dtype=np.float64) - 1.0
    eps = 1e-9
    with np.errstate(invalid="ignore"):
        ok = np.all((v >= -tol_voxels - eps) & (v <= hi + tol_voxels + eps), axis=-1)
    return bool(ok) if np.ndim(ok) == 0 else ok


# --------------------------------------------------------------------------- pyramid grids

def voxel_to_grid_mm(v: Any, level: int, finest_spacing_mm: float) -> Any:
    """Level-``level`` voxel coordinate -> grid mm: ``s_l v + (s_l - s0) / 2``.

    Plain arithmetic, so ``v`` may be a NumPy array or a backend tensor (the models call it
    inside the graph); :meth:`Grid.voxel_to_grid_mm` is this rule for a grid's own spacing.
    """
    s0 = float(finest_spacing_mm)
    s = s0 * 2**level
    return v * s + (s - s0) / 2.0


def grid_mm_to_voxel(g: Any, level: int, finest_spacing_mm: float) -> Any:
    """Grid mm -> level-``level`` voxel coordinate (inverse of :func:`voxel_to_grid_mm`)."""
    s0 = float(finest_spacing_mm)
    s = s0 * 2**level
    return (g - (s - s0) / 2.0) / s


@dataclass(frozen=True)
class Grid:
    """An isotropic, axis-aligned RAS multi-level grid (see module docstring).

    ``origin``: world position (RAS mm) of the centre of level-0 voxel (0, 0, 0);
    ``spacing``: level-0 voxel size s0 (mm); ``shape``: level-0 voxels per axis N0;
    ``levels``: number of levels (level ``levels - 1`` is the coarsest).
    ``source_affine`` / ``source_shape`` optionally record the native scan the grid was made for.
    """

    origin: tuple[float, float, float]
    spacing: float
    shape: int
    levels: int
    source_affine: tuple[tuple[float, ...], ...] | None = field(default=None, compare=False)
    source_shape: tuple[int, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        origin = tuple(float(x) for x in np.asarray(self.origin, dtype=np.float64).ravel())
        if len(origin) != 3 or not np.all(np.isfinite(origin)):
            raise ValueError(f"grid origin must be 3 finite numbers, got {self.origin!r}")
        spacing, shape, levels = float(self.spacing), int(self.shape), int(self.levels)
        if not (np.isfinite(spacing) and spacing > 0):
            raise ValueError(f"grid spacing must be positive, got {self.spacing!r}")
        if levels < 1:
            raise ValueError(f"grid needs at least one level, got {self.levels!r}")
        if shape < 1 or shape % (2 ** (levels - 1)):
            raise ValueError(
                f"finest shape {self.shape} must be a positive multiple of 2**(levels-1) = "
                f"{2 ** (levels - 1)} so that every level halves exactly")
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "levels", levels)
        if self.source_affine is not None:
            aff = _affine(self.source_affine)
            object.__setattr__(self, "source_affine", tuple(tuple(map(float, r)) for r in aff))
        if self.source_shape is not None:
            object.__setattr__(self, "source_shape", tuple(int(n) for n in self.source_shape))

    # ---- per-level geometry
    def _check_level(self, level: int) -> int:
        level = int(level)
        if not 0 <= level < self.levels:
            raise ValueError(f"level {level} outside 0..{self.levels - 1}")
        return level

    def level_spacing(self, level: int) -> float:
        """Voxel size of ``level`` in mm: ``s0 * 2**level``."""
        return self.spacing * 2 ** self._check_level(level)

    def level_size(self, level: int) -> int:
        """Voxels per axis of ``level``: ``N0 / 2**level``."""
        return self.shape // 2 ** self._check_level(level)

    def level_shape(self, level: int) -> tuple[int, int, int]:
        """Array shape ``(n, n, n)`` of ``level``."""
        n = self.level_size(level)
        return (n, n, n)

    def level_offset_mm(self, level: int) -> float:
        """Grid-mm position of level-``level`` voxel (0,0,0)'s centre: ``(s_l - s0) / 2``."""
        return (self.level_spacing(level) - self.spacing) / 2.0

    def level_origin(self, level: int) -> np.ndarray:
        """World position of the centre of voxel (0, 0, 0) of ``level``."""
        return np.asarray(self.origin) + self.level_offset_mm(level)

    def level_affine(self, level: int) -> np.ndarray:
        """4x4 voxel -> world affine of ``level`` (diagonal, positive)."""
        aff = np.eye(4)
        aff[:3, :3] *= self.level_spacing(level)
        aff[:3, 3] = self.level_origin(level)
        return aff

    # ---- point maps
    def world_to_grid_mm(self, pts: Any) -> np.ndarray:
        """World RAS mm -> grid mm ``g = world - o``."""
        return _points(pts) - np.asarray(self.origin)

    def grid_mm_to_world(self, g: Any) -> np.ndarray:
        """Grid mm -> world RAS mm."""
        return _points(g) + np.asarray(self.origin)

    def grid_mm_to_voxel(self, g: Any, level: int) -> np.ndarray:
        """Grid mm -> fractional voxel coordinate of ``level``."""
        return grid_mm_to_voxel(_points(g), self._check_level(level), self.spacing)

    def voxel_to_grid_mm(self, v: Any, level: int) -> np.ndarray:
        """Fractional voxel coordinate of ``level`` -> grid mm ``s_l * v + (s_l - s0) / 2``."""
        return voxel_to_grid_mm(_points(v), self._check_level(level), self.spacing)

    def world_to_voxel(self, pts: Any, level: int) -> np.ndarray:
        """World RAS mm -> fractional voxel coordinate of ``level``."""
        return self.grid_mm_to_voxel(self.world_to_grid_mm(pts), level)

    def voxel_to_world(self, v: Any, level: int) -> np.ndarray:
        """Fractional voxel coordinate of ``level`` -> world RAS mm."""
        return self.grid_mm_to_world(self.voxel_to_grid_mm(v, level))

    def source_voxel_map(self, level: int = 0) -> np.ndarray:
        """4x4 map from ``level`` voxel indices to native source voxel indices.

        ``inv(source_affine) @ level_affine(level)``: what a resampler pulls values through.
        """
        if self.source_affine is None:
            raise ValueError("grid has no source_affine")
        return np.linalg.inv(np.asarray(self.source_affine)) @ self.level_affine(level)

    @property
    def extent_mm(self) -> float:
        """Physical edge length of the grid (mm): ``N0 * s0``, the same on every level."""
        return self.shape * self.spacing

    # ---- serialisation
    def to_dict(self) -> dict:
        """JSON-ready dict with the keys of ``pyramid/{case}/grid.json``."""
        d: dict[str, Any] = {
            "origin": list(self.origin),
            "finest_spacing_mm": self.spacing,
            "finest_shape": self.shape,
            "levels": self.levels,
        }
        if self.source_affine is not None:
            d["source_affine"] = [list(r) for r in self.source_affine]
        if self.source_shape is not None:
            d["source_shape"] = list(self.source_shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Grid":
        """Inverse of :meth:`to_dict`."""
        return cls(
            origin=tuple(d["origin"]),
            spacing=d["finest_spacing_mm"],
            shape=d["finest_shape"],
            levels=d["levels"],
            source_affine=d.get("source_affine"),
            source_shape=d.get("source_shape"),
        )

    def to_json(self) -> str:
        """JSON text of :meth:`to_dict` (floats written with full precision)."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str | Mapping[str, Any]) -> "Grid":
        """Grid from JSON text (or an already parsed dict)."""
        return cls.from_dict(json.loads(text) if isinstance(text, (str, bytes)) else text)


def grid_for_scan(affine: Any, shape: Sequence[int], N0: int, s0: float, levels: int) -> Grid:
    """The pyramid grid for a native scan: centred on its world bounding-box centre.

    ``o = c - s0 * (N0 - 1) / 2`` with ``c`` the centre of the bounding box of the scan's 8
    corner voxels. The native affine and shape are recorded on the grid.
    """
    aff = _affine(affine)
    c = scan_centre(aff, shape)
    origin = c - float(s0) * (int(N0) - 1) / 2.0
    return Grid(origin=tuple(origin), spacing=s0, shape=N0, levels=levels,
                source_affine=aff, source_shape=tuple(int(n) for n in shape[:3]))
