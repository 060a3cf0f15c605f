"""Synthetic neck-CTA cohort: the default data of the study (no download needed).

Each case is an analytic phantom of the neck in a *patient frame* (millimetres, RAS:
+x towards the patient's Right, +y Anterior, +z Superior, origin in the middle of the neck),
posed in the scanner by a random rotation and translation, and then sampled on a native,
anisotropic scanner grid stored in a random orientation (RAS, LPS, LAS, LPI or with permuted
array axes). The image is evaluated at the world position of every voxel centre, so the
affine is exact whatever the storage order.

Anatomy (all sizes random per case):

- body outline (elliptic cylinder with harmonics, widening towards the shoulders), skin,
  subcutaneous fat (about -100 HU) and muscle / soft tissue (30-60 HU) with a smooth texture
  and streaks of inter-muscular fat;
- trachea (air, with a soft-tissue wall) anterior, oesophagus behind it, thyroid lobes;
- cervical spine posterior: vertebral bodies with a bright cortical shell and cancellous
  interior, intervertebral discs, spinal canal, laminae, spinous and transverse processes;
  hyoid bone above the bifurcations;
- contrast-filled arteries (250-500 HU per case): left and right common carotid arteries
  ascending and each splitting into internal (postero-lateral) and external (antero-medial)
  carotid arteries at a random height (left and right 5-25 mm apart), superior thyroid and
  facial branches of the ECA, vertebral arteries beside the spine;
- internal and external jugular veins (100-200 HU, always at least 80 HU below the arteries)
  as less-enhanced distractors.

Edges are partial-volume: every structure is a signed distance turned into an occupancy
ramp one in-plane voxel wide, and thick slices are averaged from up to ``max_subslices``
thin sub-slices. Correlated Gaussian noise (``noise_hu``) is added; bone stays brighter than
any vessel, so the bifurcation is never the brightest blob.

The landmarks ``left_bifurcation`` / ``right_bifurcation`` are the points where each common
carotid centreline splits, in world RAS millimetres.

Case ``index`` depends only on ``(seed, index)`` and the config values, never on the cohort
size. Anatomy, pose, grid and noise have independent random streams, so e.g. changing the
spacing range changes neither the anatomy nor the landmarks of a case.
"""

from __future__ import annotations

import csv
import itertools
import os
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from scipy.interpolate import CubicSpline
from scipy.ndimage import gaussian_filter

from locnet.fileio import save_nifti_atomic, write_text_atomic

LANDMARK_NAMES = ("left_bifurcation", "right_bifurcation")

#: Keys of the ``synthetic:`` config block and their defaults. ``n_cases`` is not used here
#: (it is an argument of :func:`write_tables`) and is ignored if present.
DEFAULT_CONFIG: dict[str, Any] = {
    "seed": 7,
    "fov_mm": [160.0, 160.0, 160.0],
    "spacing_inplane_mm": [0.9, 1.4],
    "spacing_slice_mm": [1.0, 3.0],
    "noise_hu": 25.0,
    "max_rotation_deg": 12.0,
    "max_translation_mm": 10.0,
    # optional keys
    "max_world_offset_mm": 100.0,   # random scanner/table offset of the scan centre, per axis
    "max_subslices": 4,             # thin sub-slices averaged per thick slice (partial volume)
    "noise_correlation_voxels": 0.6,  # in-plane Gaussian sd that correlates the noise (0: white)
}

# Storage kinds, cycled over case indices (offset by the seed) so that every cohort of five
# or more cases holds each kind. Each entry: name, axis permutation, flips of stored axes.
_STORAGE = (
    ("LPS", (0, 1, 2), (True, True, False)),
    ("RAS", (0, 1, 2), (False, False, False)),
    ("permuted", None, None),
    ("LPI", (0, 1, 2), (True, True, True)),
    ("LAS", (0, 1, 2), (True, False, False)),
)

_F32 = np.float32
_Z_END = 260.0  # vessels and tubes run from -_Z_END to +_Z_END (beyond any sensible FOV)


# --------------------------------------------------------------------------- config


def resolve_config(cfg: dict | None) -> dict:
    """The ``synthetic:`` block with defaults filled in and values checked."""
    out = dict(DEFAULT_CONFIG)
    if cfg:
        out.update({k: v for k, v in cfg.items() if v is not None})
    out["seed"] = int(out["seed"])
    if out["seed"] < 0:
        raise ValueError("synthetic.seed must be >= 0")
    fov = np.asarray(out["fov_mm"], dtype=float)
    if fov.shape != (3,) or np.any(fov <= 0):
        raise ValueError(f"synthetic.fov_mm must be three positive numbers, got {out['fov_mm']!r}")
    out["fov_mm"] = [float(v) for v in fov]
    for key in ("spacing_inplane_mm", "spacing_slice_mm"):
        lo, hi = (float(v) for v in out[key])
        if not 0 < lo <= hi:
            raise ValueError(f"synthetic.{key} must be [lo, hi] with 0 < lo <= hi")
        out[key] = [lo, hi]
    for key in ("noise_hu", "max_rotation_deg", "max_translation_mm", "max_world_offset_mm",
                "noise_correlation_voxels"):
        out[key] = float(out[key])
        if out[key] < 0:
            raise ValueError(f"synthetic.{key} must be >= 0")
    out["max_subslices"] = max(1, int(out["max_subslices"]))
    return out


def case_id(index: int) -> str:
    """Case identifier of case ``index``: ``case_0000``, ``case_0001``, ..."""
    return f"case_{int(index):04d}"


def _streams(seed: int, index: int) -> dict[str, np.random.Generator]:
    children = np.random.SeedSequence([int(seed), int(index)]).spawn(4)
    return {name: np.random.default_rng(s)
            for name, s in zip(("anatomy", "pose", "grid", "noise"), children)}


# --------------------------------------------------------------------------- geometry helpers


def _rotation(angles_deg: Sequence[float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _ellipse_sd(dx, dy, ax: float, ay: float):
    """Approximate signed distance to an axis-aligned ellipse (exact on the boundary to first order)."""
    rho = np.sqrt((dx / ax) ** 2 + (dy / ay) ** 2)
    grad = np.sqrt(dx * dx * (1.0 / ax ** 4) + dy * dy * (1.0 / ay ** 4)) / np.maximum(rho, 1e-6)
    return (rho - 1.0) / np.maximum(grad, 1.0 / max(ax, ay))


def _ellipsoid_sd(dx, dy, dz, ax: float, ay: float, az: float):
    rho = np.sqrt((dx / ax) ** 2 + (dy / ay) ** 2 + (dz / az) ** 2)
    grad = np.sqrt(dx * dx * (1.0 / ax ** 4) + dy * dy * (1.0 / ay ** 4)
                   + dz * dz * (1.0 / az ** 4)) / np.maximum(rho, 1e-6)
    return (rho - 1.0) / np.maximum(grad, 1.0 / max(ax, ay, az))


def _segment_sd_2d(dx, dy, x0, y0, x1, y1, r):
    """Signed distance to a 2D capsule (segment (x0,y0)-(x1,y1), radius r) in the xy plane."""
    ux, uy = x1 - x0, y1 - y0
    vx, vy = dx - x0, dy - y0
    t = np.clip((vx * ux + vy * uy) * (1.0 / (ux * ux + uy * uy)), 0.0, 1.0)
    return np.sqrt((vx - t * ux) ** 2 + (vy - t * uy) ** 2) - r


def _z_path(ctrl_z, ctrl_x, ctrl_y, z0: float, z1: float, step: float = 2.5,
            start_slope=None, end_slope=None) -> np.ndarray:
    """Nodes (N, 3) of a smooth curve x(z), y(z) from z0 to z1 (either order) through control points."""
    order = np.argsort(ctrl_z)
    cz = np.asarray(ctrl_z, float)[order]
    # slopes (dx/dz, dy/dz) are given for the ends at z0 and z1 respectively
    def bc(s0, s1, k):
        lo, hi = (s0, s1) if z0 < z1 else (s1, s0)
        return ((1, lo[k]) if lo is not None else "natural", (1, hi[k]) if hi is not None else "natural")
    xs = CubicSpline(cz, np.asarray(ctrl_x, float)[order], bc_type=bc(start_slope, end_slope, 0))
    ys = CubicSpline(cz, np.asarray(ctrl_y, float)[order], bc_type=bc(start_slope, end_slope, 1))
    n = max(2, int(np.ceil(abs(z1 - z0) / step)) + 1)
    z = np.linspace(z0, z1, n)
    return np.stack([xs(z), ys(z), z], axis=1)


def _line(p0, p1, step: float = 2.5) -> np.ndarray:
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    n = max(2, int(np.ceil(np.linalg.norm(p1 - p0) / step)) + 1)
    t = np.linspace(0.0, 1.0, n)[:, None]
    return p0 + t * (p1 - p0)


def _centre_at(nodes: np.ndarray, z: np.ndarray) -> np.ndarray:
    """x, y of a z-monotone centreline at heights z (linear interpolation between nodes)."""
    order = np.argsort(nodes[:, 2])
    n = nodes[order]
    return np.stack([np.interp(z, n[:, 2], n[:, 0]), np.interp(z, n[:, 2], n[:, 1])], axis=1)


# --------------------------------------------------------------------------- rendering engine


_CORNERS = np.array(list(itertools.product((0.0, 1.0), repeat=3)))


class _Chunk:
    """A tile of the canonical (RAS-ordered) scanner grid, possibly with thin sub-slices.

    Canonical continuous index q = (a, b, c) maps to patient coordinates p = p0 + A q.
    The tile covers a in [a_off, a_off + na), b in [b_off, b_off + nb) and the sub-slice
    positions ``qc`` along c; its array has shape (len(qc), na, nb). Boxes are local indices.
    """

    def __init__(self, A: np.ndarray, p0: np.ndarray, qc: np.ndarray, a_off: int, na: int,
                 b_off: int, nb: int, w: float):
        self.A, self.p0, self.qc, self.w = A, p0, qc, float(w)
        self.a_off, self.na, self.b_off, self.nb = a_off, na, b_off, nb
        self.Ainv = np.linalg.inv(A)
        self.values = np.full((len(qc), na, nb), -1000.0, dtype=_F32)
        lo_q = np.array([a_off, b_off, qc[0]], float)
        hi_q = np.array([a_off + na - 1, b_off + nb - 1, qc[-1]], float)
        pts = (lo_q + _CORNERS * (hi_q - lo_q)) @ A.T + p0
        self.lo, self.hi = pts.min(0), pts.max(0)

    def overlaps(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Which of the patient bboxes (..., 3) may touch this tile (margin: the ramp width)."""
        return np.all(lo - self.w <= self.hi, axis=-1) & np.all(hi + self.w >= self.lo, axis=-1)

    def box(self, lo, hi):
        """Local index box (l0, l1, a0, a1, b0, b1) covering the patient bbox, or None."""
        lo = np.asarray(lo, float) - self.w
        hi = np.asarray(hi, float) + self.w
        if np.any(lo > self.hi) or np.any(hi < self.lo):
            return None
        q = (lo + _CORNERS * (hi - lo) - self.p0) @ self.Ainv.T
        qmin, qmax = q.min(0), q.max(0)
        a0 = max(0, int(np.floor(qmin[0])) - self.a_off)
        a1 = min(self.na, int(np.floor(qmax[0])) + 1 - self.a_off)
        b0 = max(0, int(np.floor(qmin[1])) - self.b_off)
        b1 = min(self.nb, int(np.floor(qmax[1])) + 1 - self.b_off)
        l0 = int(np.searchsorted(self.qc, qmin[2], "left"))
        l1 = int(np.searchsorted(self.qc, qmax[2], "right"))
        if a0 >= a1 or b0 >= b1 or l0 >= l1:
            return None
        return (l0, l1, a0, a1, b0, b1)

    @staticmethod
    def slices(box):
        l0, l1, a0, a1, b0, b1 = box
        return (slice(l0, l1), slice(a0, a1), slice(b0, b1))

    def coords(self, box):
        """Patient coordinates (px, py, pz), float32 arrays of the box's shape."""
        l0, l1, a0, a1, b0, b1 = box
        a = np.arange(a0 + self.a_off, a1 + self.a_off, dtype=float)
        b = np.arange(b0 + self.b_off, b1 + self.b_off, dtype=float)
        c = self.qc[l0:l1]
        out = []
        for r in range(3):
            out.append((self.A[r, 2] * c + self.p0[r]).astype(_F32)[:, None, None]
                       + (self.A[r, 0] * a).astype(_F32)[None, :, None]
                       + (self.A[r, 1] * b).astype(_F32)[None, None, :])
        return out

    def occupancy(self, sd):
        occ = 0.5 - sd * _F32(1.0 / self.w)
        return np.clip(occ, 0.0, 1.0, out=occ)

    def paint(self, box, sd, hu) -> None:
        """Blend ``hu`` (scalar or array) into the box with the occupancy of signed distance ``sd``."""
        occ = self.occupancy(sd)
        view = self.values[self.slices(box)]
        view += occ * (hu - view)


class _Structure:
    lo: np.ndarray
    hi: np.ndarray

    def render(self, chunk: _Chunk) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class _Tube(_Structure):
    """A tube of varying radius around a polyline (union of truncated cones)."""

    name: str
    nodes: np.ndarray
    radii: np.ndarray
    hu: float
    piece_size: int = 6
    pieces: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        self.nodes = np.asarray(self.nodes, float)
        self.radii = np.broadcast_to(np.asarray(self.radii, float), (len(self.nodes),)).copy()
        rmax = self.radii.max()
        self.lo = self.nodes.min(0) - rmax
        self.hi = self.nodes.max(0) + rmax
        n_seg = len(self.nodes) - 1
        for s0 in range(0, n_seg, self.piece_size):
            s1 = min(n_seg, s0 + self.piece_size)
            a = self.nodes[s0:s1]
            d = self.nodes[s0 + 1:s1 + 1] - a
            r0 = self.radii[s0:s1]
            dr = self.radii[s0 + 1:s1 + 1] - r0
            pts = self.nodes[s0:s1 + 1]
            r = self.radii[s0:s1 + 1].max()
            self.pieces.append((pts.min(0) - r, pts.max(0) + r, a, d, r0, dr))
        self.piece_lo = np.array([pc[0] for pc in self.pieces])
        self.piece_hi = np.array([pc[1] for pc in self.pieces])

    def render(self, chunk: _Chunk) -> None:
        if not chunk.overlaps(self.lo, self.hi):
            return
        boxes = []
        for j in np.flatnonzero(chunk.overlaps(self.piece_lo, self.piece_hi)):
            piece = self.pieces[j]
            box = chunk.box(piece[0], piece[1])
            if box is not None:
                boxes.append((box, piece))
        if not boxes:
            return
        arr = np.array([b for b, _ in boxes])
        union = (arr[:, 0].min(), arr[:, 1].max(), arr[:, 2].min(), arr[:, 3].max(),
                 arr[:, 4].min(), arr[:, 5].max())
        sd = np.full((union[1] - union[0], union[3] - union[2], union[5] - union[4]), np.inf, _F32)
        for box, (_, _, a, d, r0, dr) in boxes:
            px, py, pz = chunk.coords(box)
            rel = (slice(box[0] - union[0], box[1] - union[0]),
                   slice(box[2] - union[2], box[3] - union[2]),
                   slice(box[4] - union[4], box[5] - union[4]))
            best = sd[rel]
            for j in range(len(a)):
                dx, dy, dz = (float(v) for v in d[j])
                vx = px - _F32(a[j, 0])
                vy = py - _F32(a[j, 1])
                vz = pz - _F32(a[j, 2])
                t = (vx * dx + vy * dy + vz * dz) * _F32(1.0 / (dx * dx + dy * dy + dz * dz))
                np.clip(t, 0.0, 1.0, out=t)
                vx -= t * dx
                vy -= t * dy
                vz -= t * dz
                dist = np.sqrt(vx * vx + vy * vy + vz * vz)
                dist -= float(r0[j]) + t * float(dr[j])
                np.minimum(best, dist, out=best)
        chunk.paint(union, sd, self.hu)


@dataclass
class _EllipticCylinder(_Structure):
    """Vertical elliptic cylinder with centre (cx0 + cx1*z, cy0 + cy1*clip(z, -zc, zc))."""

    cx0: float
    cy0: float
    cy1: float
    ax: float
    ay: float
    hu: float
    zclip: float = 80.0

    def __post_init__(self):
        shift = abs(self.cy1) * self.zclip
        self.lo = np.array([self.cx0 - self.ax, self.cy0 - shift - self.ay, -_Z_END])
        self.hi = np.array([self.cx0 + self.ax, self.cy0 + shift + self.ay, _Z_END])

    def render(self, chunk: _Chunk) -> None:
        box = chunk.box(self.lo, self.hi)
        if box is None:
            return
        px, py, pz = chunk.coords(box)
        cy = self.cy0 + self.cy1 * np.clip(pz, -self.zclip, self.zclip)
        chunk.paint(box, _ellipse_sd(px - self.cx0, py - cy, self.ax, self.ay), self.hu)


@dataclass
class _Ellipsoid(_Structure):
    centre: np.ndarray
    semi: np.ndarray
    hu: float

    def __post_init__(self):
        self.centre = np.asarray(self.centre, float)
        self.semi = np.asarray(self.semi, float)
        self.lo, self.hi = self.centre - self.semi, self.centre + self.semi

    def render(self, chunk: _Chunk) -> None:
        box = chunk.box(self.lo, self.hi)
        if box is None:
            return
        px, py, pz = chunk.coords(box)
        c, s = self.centre, self.semi
        chunk.paint(box, _ellipsoid_sd(px - c[0], py - c[1], pz - c[2], *s), self.hu)


@dataclass
class _Body(_Structure):
    """Neck outline, skin, subcutaneous fat and textured muscle."""

    a0: float
    b0: float
    yc: float
    wobble_amp: float
    wobble_period: float
    wobble_phase: float
    harmonics: np.ndarray   # (k, 3): order, amplitude, phase
    z_shoulder: float
    shoulder_rate: float
    fat_mm: float
    fat_asym: float
    skin_mm: float
    skin_hu: float
    fat_hu: float
    muscle_hu: float
    texture_hu: float
    waves: np.ndarray       # (K, 4): kx, ky, kz, phase (rad/mm)
    streak_level: float

    def __post_init__(self):
        amax = self.axes(np.array([-_Z_END]))[0].max() + 5
        bmax = self.axes(np.array([-_Z_END]))[1].max() + 5
        self.lo = np.array([-amax, self.yc - bmax, -_Z_END])
        self.hi = np.array([amax, self.yc + bmax, _Z_END])

    def axes(self, z):
        wob = 1.0 + self.wobble_amp * np.sin(2 * np.pi * z / self.wobble_period + self.wobble_phase)
        below = np.maximum(0.0, self.z_shoulder - z)
        return self.a0 * wob + self.shoulder_rate * below, self.b0 * wob + 0.3 * self.shoulder_rate * below

    def outer_sd(self, px, py, pz):
        """Signed distance to the skin surface and sin(theta) (theta: angle about the neck axis)."""
        a, b = self.axes(pz)
        inv_a, inv_b = 1.0 / a, 1.0 / b
        u = px * inv_a
        v = (py - self.yc) * inv_b
        rho = np.sqrt(u * u + v * v)
        inv_r = 1.0 / np.maximum(rho, 1e-6)
        c, s = u * inv_r, v * inv_r
        # cos/sin of k*theta by the Chebyshev recurrences
        c2, s2 = 2.0 * c * c - 1.0, 2.0 * s * c
        ck = {1: (c, s), 2: (c2, s2), 3: (c2 * c - s2 * s, s2 * c + c2 * s)}
        radius = np.ones_like(rho)
        for order, amp, phase in self.harmonics:
            cc, ss = ck[int(order)]
            radius += cc * float(amp * np.cos(phase)) - ss * float(amp * np.sin(phase))
        gu, gv = u * inv_a, v * inv_b
        grad = np.sqrt(gu * gu + gv * gv) * inv_r
        sd = (rho - radius) / np.maximum(grad, np.minimum(inv_a, inv_b))
        return sd, s

    def texture(self, px, py, pz):
        f = np.zeros_like(px)
        amp = float(np.sqrt(2.0 / len(self.waves)))
        for kx, ky, kz, ph in self.waves:
            f += np.cos(px * float(kx) + py * float(ky) + pz * float(kz) + float(ph))
        return f * amp

    def render(self, chunk: _Chunk) -> None:
        box = chunk.box(self.lo, self.hi)
        if box is None:
            return
        px, py, pz = chunk.coords(box)
        sd, sin_theta = self.outer_sd(px, py, pz)
        chunk.paint(box, sd, self.skin_hu)
        chunk.paint(box, sd + self.skin_mm, self.fat_hu)
        # fat thicker posteriorly (sin_theta < 0)
        inner = sd + self.fat_mm * (1.0 - self.fat_asym * sin_theta)
        occ = chunk.occupancy(inner)
        inside = occ > 0
        tex = self.texture(px[inside], py[inside], pz[inside])
        hu = self.muscle_hu + self.texture_hu * tex
        streak = np.clip((tex - self.streak_level) * 2.0, 0.0, 1.0)
        hu += streak * (self.fat_hu - hu)
        view = chunk.values[chunk.slices(box)]
        o = occ[inside]
        view[inside] += o * (hu - view[inside])


@dataclass
class _Spine(_Structure):
    """Cervical spine: vertebral bodies + discs, posterior arch, processes, canal."""

    y0: float
    lordosis: float
    period: float
    z0: float
    disc_mm: float
    ax: float
    ay: float
    cortex_mm: float
    canal_ax: float
    canal_ay: float
    arch_mm: float
    spinous_len: float
    spinous_r: float
    transverse_x: float
    transverse_r: float
    cortical_hu: float
    cancellous_hu: float
    posterior_hu: float
    disc_hu: float
    csf_hu: float

    def __post_init__(self):
        back = self.ay + 1.5 + 2 * self.canal_ay + self.arch_mm + self.spinous_len + self.spinous_r
        xmax = max(self.transverse_x + self.transverse_r, self.canal_ax + self.arch_mm, self.ax)
        self.lo = np.array([-xmax, self.y0 - abs(self.lordosis) - back, -_Z_END])
        self.hi = np.array([xmax, self.y0 + abs(self.lordosis) + self.ay, _Z_END])

    def centre_y(self, z):
        return self.y0 + self.lordosis * np.cos(np.pi * np.clip(z, -150.0, 150.0) / 300.0)

    def render(self, chunk: _Chunk) -> None:
        box = chunk.box(self.lo, self.hi)
        if box is None:
            return
        px, py, pz = chunk.coords(box)
        dy = py - self.centre_y(pz)
        zl = np.abs(np.mod(pz - self.z0, self.period) - 0.5 * self.period)
        half = 0.5 * (self.period - self.disc_mm)
        body_r = _ellipse_sd(px, dy, self.ax, self.ay)
        chunk.paint(box, body_r, self.disc_hu)
        vert = np.maximum(body_r, zl - half)
        chunk.paint(box, vert, self.cortical_hu)
        chunk.paint(box, vert + self.cortex_mm, self.cancellous_hu)
        # posterior elements
        cy = -self.ay - 1.5 - self.canal_ay
        canal = _ellipse_sd(px, dy - cy, self.canal_ax, self.canal_ay)
        window = zl - (half - 1.0)
        arch = np.maximum(np.maximum(canal - self.arch_mm, -canal), window)
        chunk.paint(box, arch, self.posterior_hu)
        back = cy - self.canal_ay
        spin = _segment_sd_2d(px, dy, 0.0, back - 0.5 * self.arch_mm, 0.0,
                              back - self.arch_mm - self.spinous_len, self.spinous_r)
        chunk.paint(box, np.maximum(spin, zl - 0.3 * self.period), self.posterior_hu)
        for side in (-1.0, 1.0):
            tp = _segment_sd_2d(px, dy, side * (self.ax - 3.0), -1.0,
                                side * self.transverse_x, -2.0, self.transverse_r)
            chunk.paint(box, np.maximum(tp, zl - 0.3 * self.period), self.posterior_hu)
        chunk.paint(box, canal, self.csf_hu)


# --------------------------------------------------------------------------- anatomy


@dataclass
class Anatomy:
    """A sampled phantom in the patient frame: structures in paint order plus key facts."""

    structures: list
    bifurcations: dict            # landmark name -> (3,) patient mm
    centrelines: dict             # vessel name -> (N, 3) patient mm nodes
    radii: dict                   # vessel name -> (N,) radii mm
    params: dict                  # scalar facts (HU levels, heights...)


class _Parts:
    """The structures of a phantom in paint order, with the centreline and radii of every
    tube; veins wait in :attr:`veins` until they are put before the arteries."""

    def __init__(self):
        self.structures: list = []
        self.veins: list = []
        self.centrelines: dict = {}
        self.radii: dict = {}

    def tube(self, name, nodes, r, hu) -> None:
        self.centrelines[name] = np.asarray(nodes, float)
        self.radii[name] = np.broadcast_to(np.asarray(r, float), (len(nodes),)).copy()
        self.structures.append(_Tube(name, nodes, r, hu))

    def vein(self, tube: _Tube, r: float) -> None:
        self.veins.append(tube)
        self.centrelines[tube.name], self.radii[tube.name] = tube.nodes, np.full(len(tube.nodes), r)


@dataclass
class _Airway:
    """The trachea (patient frame): centre ``(x, y + slope * clip(z, -80, 80))``, lumen
    semi-axes ``ax``, ``ay`` and wall thickness ``wall``."""

    x: float
    y: float
    slope: float
    ax: float
    ay: float
    wall: float

    def push_out(self, nodes, r):
        """Push centreline nodes radially out of the airway (wall + radius + 1.5 mm)."""
        nodes = np.array(nodes, float)
        dx = nodes[:, 0] - self.x
        dy = nodes[:, 1] - (self.y + self.slope * np.clip(nodes[:, 2], -80.0, 80.0))
        rho = np.sqrt((dx / (self.ax + self.wall + r + 1.5)) ** 2
                      + (dy / (self.ay + self.wall + r + 1.5)) ** 2)
        scale = 1.0 / np.clip(rho, 1e-6, 1.0)
        nodes[:, 0] = self.x + dx * scale
        nodes[:, 1] += dy * (scale - 1.0)
        return nodes


def _sample_intensities(U) -> dict[str, float]:
    """HU levels of contrast, veins, bone, fat and muscle (veins >= 80 HU below arteries)."""
    arterial = U(250.0, 500.0)
    jugular = U(100.0, min(200.0, arterial - 80.0))
    cortical = U(800.0, 1150.0)
    cancellous = U(250.0, 400.0)
    fat = U(-115.0, -85.0)
    muscle = U(35.0, 55.0)
    return dict(arterial_hu=arterial, jugular_hu=jugular, cortical_hu=cortical,
                cancellous_hu=cancellous, fat_hu=fat, muscle_hu=muscle)


def _sample_body(rng: np.random.Generator, fat: float, muscle: float) -> _Body:
    """Neck outline, skin, fat and textured muscle."""
    U = rng.uniform
    n_waves = 10
    dirs = rng.normal(size=(n_waves, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = 2 * np.pi / U(6.0, 30.0, n_waves)
    waves = np.column_stack([dirs * k[:, None], U(0, 2 * np.pi, n_waves)])
    return _Body(
        a0=U(58.0, 68.0), b0=U(48.0, 55.0), yc=U(-3.0, 0.0),
        wobble_amp=U(0.0, 0.05), wobble_period=U(80.0, 160.0), wobble_phase=U(0, 2 * np.pi),
        harmonics=np.array([[2, U(0.0, 0.02), U(0, 2 * np.pi)], [3, U(0.0, 0.015), U(0, 2 * np.pi)]]),
        z_shoulder=U(-80.0, -60.0), shoulder_rate=U(0.3, 0.6),
        fat_mm=U(4.0, 10.0), fat_asym=U(0.1, 0.4), skin_mm=U(1.2, 2.0), skin_hu=U(20.0, 50.0),
        fat_hu=fat, muscle_hu=muscle, texture_hu=U(4.0, 9.0), waves=waves,
        streak_level=U(1.7, 2.2))


def _sample_airway_organs(U, parts: _Parts) -> _Airway:
    """Trachea (wall and air), oesophagus behind it and the thyroid lobes and isthmus."""
    tr_x, tr_y, tr_slope = U(-2.0, 2.0), U(22.0, 27.0), U(0.0, 0.08)
    tr_ax, tr_ay, tr_wall = U(8.0, 10.0), U(6.5, 8.5), U(1.5, 2.5)
    structures = parts.structures
    structures.append(_EllipticCylinder(tr_x, tr_y, tr_slope, tr_ax + tr_wall, tr_ay + tr_wall,
                                        U(60.0, 110.0)))
    structures.append(_EllipticCylinder(tr_x, tr_y, tr_slope, tr_ax, tr_ay, U(-1000.0, -990.0)))
    oes_y = tr_y - tr_ay - tr_wall - U(4.0, 6.0)
    structures.append(_EllipticCylinder(U(-6.0, -2.0), oes_y, 0.0, U(6.0, 8.0), U(3.0, 4.0),
                                        U(30.0, 45.0)))
    th_z, th_hu = U(-62.0, -48.0), U(80.0, 140.0)
    th_x, th_ax, th_ay, th_az = U(13.0, 16.0), U(5.5, 7.5), U(7.0, 9.0), U(15.0, 20.0)
    for side in (-1.0, 1.0):
        structures.append(_Ellipsoid([tr_x + side * th_x, tr_y - U(0.0, 3.0), th_z + U(-3, 3)],
                                     [th_ax, th_ay, th_az], th_hu))
    structures.append(_Ellipsoid([tr_x, tr_y + tr_ay + tr_wall + 2.5, th_z - 5.0],
                                 [th_x, 3.0, 6.0], th_hu))
    return _Airway(tr_x, tr_y, tr_slope, tr_ax, tr_ay, tr_wall)


def _sample_spine(U, cortical: float, cancellous: float) -> _Spine:
    return _Spine(
        y0=U(-6.0, -2.0), lordosis=U(0.0, 4.0), period=U(15.0, 18.0), z0=U(0.0, 18.0),
        disc_mm=U(3.5, 5.0), ax=U(9.0, 11.0), ay=U(7.0, 8.5), cortex_mm=U(1.2, 2.0),
        canal_ax=U(10.0, 12.0), canal_ay=U(6.0, 7.0), arch_mm=U(3.0, 4.5),
        spinous_len=U(9.0, 14.0), spinous_r=U(2.5, 3.5), transverse_x=U(22.0, 25.0),
        transverse_r=U(2.8, 3.5), cortical_hu=cortical, cancellous_hu=cancellous,
        posterior_hu=cortical * U(0.75, 0.95), disc_hu=U(70.0, 100.0), csf_hu=U(15.0, 35.0))


def _sample_hyoid(U, parts: _Parts, z_top: float, airway: _Airway, cortical: float) -> None:
    """The hyoid bone, above both bifurcations (``z_top``: the higher one)."""
    z_h, y_h = z_top + U(18.0, 28.0), airway.y + U(8.0, 13.0)
    xh, dh = U(12.0, 15.0), U(12.0, 18.0)
    t = np.linspace(-1.0, 1.0, 17)
    hyoid = np.column_stack([xh * np.sin(t * np.pi / 2), y_h - dh * (1 - np.cos(t * np.pi / 2)),
                             z_h + 3.0 * t ** 2])
    parts.tube("hyoid", hyoid, 3.0 - 1.0 * np.abs(t), cortical * U(0.6, 0.85))


def _carotid_branch(U, parts: _Parts, B, zb: float, airway: _Airway, arterial: float,
                    theta_deg, direction, r0, r1, bulb_r, name, wander):
    """A branch of the carotid bifurcation ``B``: a straight diverging segment, then a smooth
    curve up to the top."""
    tan = np.tan(np.deg2rad(theta_deg))
    dz = U(13.0, 18.0)
    slope = tan * direction
    P1 = B + np.array([slope[0] * dz, slope[1] * dz, dz])
    straight = _line(B, P1, 2.0)
    z2, z3 = P1[2] + 25.0, P1[2] + 60.0
    x2 = P1[:2] + slope * 25.0 * U(0.3, 0.6)
    x3 = x2 + U(-wander, wander, 2)
    x4 = x3 + U(-wander, wander, 2)
    up = _z_path([P1[2], z2, z3, _Z_END], [P1[0], x2[0], x3[0], x4[0]],
                 [P1[1], x2[1], x3[1], x4[1]], P1[2], _Z_END, start_slope=tuple(slope))
    nodes = airway.push_out(np.vstack([straight, up[1:]]), r0)
    h = nodes[:, 2] - zb
    r = r1 + (r0 - r1) * np.clip(1.0 - h / 60.0, 0.0, 1.0)
    r = np.maximum(r, bulb_r + (r - bulb_r) * np.clip(h / 10.0, 0.0, 1.0))
    parts.tube(name, nodes, r, arterial)
    return nodes


def _sample_eca_branches(U, parts: _Parts, eca, zb: float, s: float, side_name: str,
                         airway: _Airway, arterial: float) -> None:
    """Superior thyroid (just above the split, antero-medially down) and facial (higher up,
    antero-medially up) arteries from the external carotid ``eca``."""
    gamma = np.deg2rad(U(10.0, 40.0))
    am = np.array([-s * np.sin(gamma), np.cos(gamma)])
    o = np.zeros(3)
    o[2] = zb + U(2.0, 5.0)
    o[:2] = _centre_at(eca, np.array([o[2]]))[0]
    ctrl = [o, o + np.r_[am * 10.0, -4.0], o + np.r_[am * 16.0, -18.0], o + np.r_[am * 18.0, -45.0]]
    ctrl = np.array(ctrl)
    sta = airway.push_out(_z_path(ctrl[:, 2], ctrl[:, 0], ctrl[:, 1], o[2], o[2] - 45.0, 2.0), 1.3)
    parts.tube(f"sup_thyroid_{side_name}", sta, U(0.9, 1.3), arterial)
    o = np.zeros(3)
    o[2] = zb + U(22.0, 30.0)
    o[:2] = _centre_at(eca, np.array([o[2]]))[0]
    ctrl = np.array([o, o + np.r_[am * 8.0, 4.0], o + np.r_[am * 16.0, 14.0], o + np.r_[am * 20.0, 35.0]])
    fa = airway.push_out(_z_path(ctrl[:, 2], ctrl[:, 0], ctrl[:, 1], o[2], o[2] + 35.0, 2.0), 1.5)
    parts.tube(f"facial_{side_name}", fa, U(1.1, 1.5), arterial)


def _sample_side_arteries(U, parts: _Parts, side_name: str, s: float, zb: float,
                          airway: _Airway, spine: _Spine, arterial: float, p: dict):
    """The arteries of one side (``s`` = +1 right, -1 left) with the carotid bifurcation at
    height ``zb``; returns the bifurcation and ``(cca, ica, r_cca, r_ica)`` for the veins."""
    B = np.array([s * U(23.0, 29.0), U(10.0, 16.0), zb])
    r_cca, r_ica, r_eca = U(3.2, 3.9), U(2.5, 3.0), U(2.0, 2.5)
    p[f"r_cca_{side_name}"] = r_cca
    # common carotid: from below, vertical at the bifurcation
    cca = _z_path([-_Z_END, zb - 70, zb - 35, zb],
                  [B[0] - s * U(0, 4), B[0] - s * U(0, 3) + U(-2, 2), B[0] + U(-1.5, 1.5), B[0]],
                  [B[1] + U(-4, 4), B[1] + U(-3, 3), B[1] + U(-1.5, 1.5), B[1]],
                  -_Z_END, zb, end_slope=(0.0, 0.0))
    parts.tube(f"cca_{side_name}", cca, r_cca, arterial)
    # internal carotid: postero-lateral; external carotid: antero-medial
    alpha = np.deg2rad(U(30.0, 60.0))
    beta = np.deg2rad(U(15.0, 45.0))
    ica = _carotid_branch(U, parts, B, zb, airway, arterial,
                          U(20.0, 35.0), np.array([s * np.cos(alpha), -np.sin(alpha)]),
                          r_ica, r_ica * 0.9, r_cca * U(1.0, 1.15), f"ica_{side_name}", 3.0)
    eca = _carotid_branch(U, parts, B, zb, airway, arterial,
                          U(22.0, 40.0), np.array([-s * np.sin(beta), np.cos(beta)]),
                          r_eca, r_eca * 0.7, r_eca, f"eca_{side_name}", 4.0)
    _sample_eca_branches(U, parts, eca, zb, s, side_name, airway, arterial)
    # vertebral artery, in the transverse foramina
    zc = np.linspace(-_Z_END, _Z_END, 14)
    xva = s * U(14.5, 16.5) + U(-1.0, 1.0, zc.size)
    yva = spine.centre_y(zc) + U(-1.0, 0.5) + U(-0.7, 0.7, zc.size)
    va = _z_path(zc, xva, yva, -_Z_END, _Z_END, 4.0)
    parts.tube(f"vertebral_{side_name}", va, U(1.6, 2.3), arterial * U(0.93, 1.0))
    return B, (cca, ica, r_cca, r_ica)


def _sample_side_veins(U, parts: _Parts, side_name: str, s: float, zb: float, arteries,
                       body: _Body, jugular: float) -> None:
    """Internal jugular (beside the carotids ``arteries`` = ``(cca, ica, r_cca, r_ica)``) and
    external jugular (in the subcutaneous fat, crossing obliquely) veins of one side."""
    cca, ica, r_cca, r_ica = arteries
    r_j = U(5.5, 8.0) if s > 0 else U(4.5, 7.0)
    zc = np.arange(-_Z_END, _Z_END + 1e-6, 20.0)
    below = zc <= zb
    centre = np.where(below[:, None], _centre_at(cca, zc), _centre_at(ica, zc))
    r_art = np.where(below, r_cca, r_ica * 1.15)
    psi = np.deg2rad(U(0.0, 40.0) + U(-8.0, 8.0, zc.size))
    dist = r_art + r_j + U(1.5, 4.0) + U(0.0, 1.5, zc.size)
    xj = centre[:, 0] + s * np.cos(psi) * dist
    yj = centre[:, 1] + np.sin(psi) * dist
    ijv = _z_path(zc, xj, yj, -_Z_END, _Z_END, 4.0)
    parts.vein(_Tube(f"ijv_{side_name}", ijv, r_j, jugular * U(0.93, 1.07)), r_j)
    r_e = min(U(1.5, 2.5), 0.5 * (body.fat_mm - 1.0))
    zc = np.linspace(-_Z_END, _Z_END, 12)
    th = np.deg2rad(np.interp(zc, [-150, 150], [-U(10, 30), U(10, 30)]))
    a, b = body.axes(zc)
    depth = body.skin_mm + 0.5 * body.fat_mm
    xe = s * (a * np.cos(th) - depth)
    ye = body.yc + (b - depth) * np.sin(th)
    ejv = _z_path(zc, xe, ye, -_Z_END, _Z_END, 5.0)
    parts.vein(_Tube(f"ejv_{side_name}", ejv, r_e, jugular * U(0.6, 0.9)), r_e)


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw a random neck phantom (patient frame) from ``rng``."""
    U = rng.uniform
    parts = _Parts()
    p: dict[str, float] = _sample_intensities(U)
    body = _sample_body(rng, p["fat_hu"], p["muscle_hu"])
    parts.structures.append(body)
    airway = _sample_airway_organs(U, parts)
    spine = _sample_spine(U, p["cortical_hu"], p["cancellous_hu"])
    parts.structures.append(spine)
    # bifurcation heights: left and right 5-25 mm apart
    mid, diff = U(-12.0, 12.0), U(5.0, 25.0) * rng.choice([-1.0, 1.0])
    z_bif = {"right": mid + diff / 2, "left": mid - diff / 2}
    p.update(z_bifurcation_right=z_bif["right"], z_bifurcation_left=z_bif["left"])
    _sample_hyoid(U, parts, max(z_bif.values()), airway, p["cortical_hu"])
    bifurcations, arteries = {}, {}
    for side_name, s in (("right", 1.0), ("left", -1.0)):
        bifurcations[f"{side_name}_bifurcation"], arteries[side_name] = _sample_side_arteries(
            U, parts, side_name, s, z_bif[side_name], airway, spine, p["arterial_hu"], p)
    # veins, painted before the arteries so that arteries win where they touch
    for side_name, s in (("right", 1.0), ("left", -1.0)):
        _sample_side_veins(U, parts, side_name, s, z_bif[side_name], arteries[side_name], body,
                           p["jugular_hu"])
    # paint order: tissues, bones, veins, arteries
    structures = parts.structures
    first_artery = next(i for i, st in enumerate(structures)
                        if isinstance(st, _Tube) and st.name != "hyoid")
    structures[first_artery:first_artery] = parts.veins
    return Anatomy(structures, {k: bifurcations[k] for k in LANDMARK_NAMES}, parts.centrelines,
                   parts.radii, p)


# --------------------------------------------------------------------------- cases


@dataclass
class PhantomCase:
    """One rendered case and everything known about it."""

    index: int
    case_id: str
    image: nib.Nifti1Image
    landmarks: dict            # name -> (3,) world RAS mm
    landmarks_patient: dict    # name -> (3,) patient frame mm
    rotation: np.ndarray       # (3, 3) patient -> world rotation; column 2 is the patient's superior axis
    translation: np.ndarray    # (3,) world position of the patient-frame origin
    storage: str               # storage kind (LPS, RAS, permuted, LPI, LAS)
    axcodes: str               # nibabel axis codes of the stored array
    spacing: tuple             # native (x, y, z) spacing in the scanner frame, mm
    anatomy: Anatomy

    def patient_to_world(self, pts) -> np.ndarray:
        return np.asarray(pts, float) @ self.rotation.T + self.translation

    def world_to_patient(self, pts) -> np.ndarray:
        return (np.asarray(pts, float) - self.translation) @ self.rotation


@dataclass
class _Pose:
    rotation: np.ndarray
    translation: np.ndarray
    scan_centre: np.ndarray


def _sample_pose(rng: np.random.Generator, cfg: dict) -> _Pose:
    angles = rng.uniform(-1.0, 1.0, 3) * cfg["max_rotation_deg"]
    shift = rng.uniform(-1.0, 1.0, 3) * cfg["max_translation_mm"]
    centre = rng.uniform(-1.0, 1.0, 3) * cfg["max_world_offset_mm"]
    return _Pose(_rotation(angles), centre + shift, centre)


def _sample_grid(rng: np.random.Generator, cfg: dict, index: int, storage: str | None):
    s_xy = rng.uniform(*cfg["spacing_inplane_mm"])
    s_z = rng.uniform(*cfg["spacing_slice_mm"])
    perm_choice = rng.permutation(3)
    while tuple(perm_choice) == (0, 1, 2):
        perm_choice = rng.permutation(3)
    flip_choice = rng.random(3) < 0.5
    if storage is None:
        offset = cfg["seed"] % len(_STORAGE)
        storage = _STORAGE[(index + offset) % len(_STORAGE)][0]
    table = {name: (perm, flips) for name, perm, flips in _STORAGE}
    if storage not in table:
        raise ValueError(f"unknown storage {storage!r}; choose from {sorted(table)}")
    perm, flips = table[storage]
    if perm is None:
        perm, flips = tuple(int(v) for v in perm_choice), tuple(bool(v) for v in flip_choice)
    spacing = _dyadic(np.array([s_xy, s_xy, s_z]))
    return storage, spacing, perm, flips


def _dyadic(x):
    """Round to a multiple of 1/1024 mm: spacings, origins and every product and sum of them
    in an affine are then exact in float32 (the NIfTI header) and in float64, so all storage
    orders of a case describe bit-identical voxel centres."""
    return np.round(np.asarray(x, float) * 1024.0) / 1024.0


def _grid_affine(spacing, shape_can, centre, perm, flips) -> np.ndarray:
    """Stored-array affine (float32-exact) of the canonical grid centred on ``centre``."""
    n = np.asarray(shape_can)
    c0 = _dyadic(np.asarray(centre, float) - spacing * (n - 1) / 2.0)
    aff = np.eye(4)
    for k in range(3):
        ax = perm[k]
        col = np.zeros(3)
        col[ax] = spacing[ax]
        if flips[k]:
            col = -col
            c0 = c0 + np.eye(3)[ax] * spacing[ax] * (n[ax] - 1)
        aff[:3, k] = col
    aff[:3, 3] = c0
    if not np.array_equal(aff.astype(np.float32).astype(float), aff):
        raise ValueError("scan too large for an exact float32 affine")
    return aff


def _canonical_map(aff: np.ndarray, shape_can, perm, flips):
    """World = M q + w0 for canonical index q, derived from the stored affine itself."""
    M = np.zeros((3, 3))
    w0 = aff[:3, 3].copy()
    for k in range(3):
        ax = perm[k]
        if flips[k]:
            M[:, ax] = -aff[:3, k]
            w0 = w0 + aff[:3, k] * (shape_can[ax] - 1)
        else:
            M[:, ax] = aff[:3, k]
    return M, w0


def render_canonical(anatomy: Anatomy, pose_R: np.ndarray, pose_t: np.ndarray, M: np.ndarray,
                     w0: np.ndarray, shape_can, n_sub: int, ramp_mm: float,
                     tile_points: int = 32768) -> np.ndarray:
    """Noise-free HU volume on the canonical grid, shape ``shape_can`` = (nx, ny, nz), float32.

    ``M``, ``w0``: world = M q + w0 for canonical voxel index q; ``pose_R``, ``pose_t``:
    world = R p + t for patient coordinates p. Each slice is the mean of ``n_sub`` thin
    sub-slices; edges ramp over ``ramp_mm``. Work proceeds in cache-sized tiles.
    """
    nx, ny, nz = (int(v) for v in shape_can)
    A = pose_R.T @ M
    p0 = pose_R.T @ (w0 - pose_t)
    offsets = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    out = np.empty((nz, nx, ny), dtype=_F32)
    per_slice = nx * ny * n_sub
    if per_slice <= tile_points:
        n_slices, ta, tb = max(1, tile_points // per_slice), nx, ny
    else:
        n_slices = 1
        side = max(16, int(np.sqrt(tile_points / n_sub)))
        ta, tb = min(nx, side), min(ny, side)
    for c0 in range(0, nz, n_slices):
        c1 = min(nz, c0 + n_slices)
        qc = (np.arange(c0, c1)[:, None] + offsets[None, :]).ravel()
        for a0 in range(0, nx, ta):
            a1 = min(nx, a0 + ta)
            for b0 in range(0, ny, tb):
                b1 = min(ny, b0 + tb)
                chunk = _Chunk(A, p0, qc, a0, a1 - a0, b0, b1 - b0, ramp_mm)
                for st in anatomy.structures:
                    st.render(chunk)
                out[c0:c1, a0:a1, b0:b1] = chunk.values.reshape(
                    c1 - c0, n_sub, a1 - a0, b1 - b0).mean(axis=1)
    return out.transpose(1, 2, 0)


def _noise(rng: np.random.Generator, shape, sd: float, corr: float) -> np.ndarray:
    if sd <= 0:
        return np.zeros(shape, _F32)
    n = rng.standard_normal(shape, dtype=_F32)
    if corr > 0:
        n = gaussian_filter(n, sigma=(corr, corr, 0.0), mode="wrap")
        n *= _F32(1.0 / max(float(n.std()), 1e-6))
    return n * _F32(sd)


def build_case(index: int, cfg: dict | None, storage: str | None = None) -> PhantomCase:
    """Render case ``index`` and return it with its pose, anatomy and storage facts.

    ``storage`` forces a storage kind ("LPS", "RAS", "permuted", "LPI", "LAS"); by default
    the kind cycles with the case index. The canonical (RAS-ordered) volume, including the
    noise, does not depend on the storage kind: only the array order and the affine do.
    """
    cfg = resolve_config(cfg)
    rngs = _streams(cfg["seed"], index)
    anatomy = sample_anatomy(rngs["anatomy"])
    pose = _sample_pose(rngs["pose"], cfg)
    kind, spacing, perm, flips = _sample_grid(rngs["grid"], cfg, index, storage)
    fov = np.asarray(cfg["fov_mm"], float)
    shape_can = tuple(int(v) for v in np.maximum(1, np.round(fov / spacing)))
    aff = _grid_affine(spacing, shape_can, pose.scan_centre, perm, flips)
    M, w0 = _canonical_map(aff, shape_can, perm, flips)
    n_sub = int(min(cfg["max_subslices"], max(1, round(spacing[2] / spacing[0]))))
    vol = render_canonical(anatomy, pose.rotation, pose.translation, M, w0, shape_can,
                           n_sub, float(spacing[0]))
    vol += _noise(rngs["noise"], vol.shape, cfg["noise_hu"], cfg["noise_correlation_voxels"])
    data = np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
    data = data.transpose(perm)
    for k in range(3):
        if flips[k]:
            data = np.flip(data, axis=k)
    data = np.ascontiguousarray(data)
    img = nib.Nifti1Image(data, aff)
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_data_dtype(np.int16)
    lm_patient = {k: v.copy() for k, v in anatomy.bifurcations.items()}
    lm_world = {k: pose.rotation @ v + pose.translation for k, v in lm_patient.items()}
    return PhantomCase(index=int(index), case_id=case_id(index), image=img, landmarks=lm_world,
                       landmarks_patient=lm_patient, rotation=pose.rotation,
                       translation=pose.translation, storage=kind,
                       axcodes="".join(nib.aff2axcodes(aff)), spacing=tuple(spacing),
                       anatomy=anatomy)


def make_case(index: int, cfg: dict | None) -> tuple[nib.Nifti1Image, dict[str, np.ndarray]]:
    """Case ``index``: an int16 NIfTI in HU and its landmarks {name: (x, y, z)} in world RAS mm."""
    case = build_case(index, cfg)
    return case.image, case.landmarks


def case_landmarks(index: int, cfg: dict | None) -> dict[str, np.ndarray]:
    """The landmarks of case ``index`` (world RAS mm) without rendering the image (fast)."""
    cfg = resolve_config(cfg)
    rngs = _streams(cfg["seed"], index)
    anatomy = sample_anatomy(rngs["anatomy"])
    pose = _sample_pose(rngs["pose"], cfg)
    return {k: pose.rotation @ v + pose.translation for k, v in anatomy.bifurcations.items()}


# --------------------------------------------------------------------------- files


def image_relpath(index: int) -> str:
    """Image path of case ``index`` relative to the cohort folder (the manifest's folder)."""
    return f"images/{case_id(index)}.nii.gz"


def write_case(index: int, cfg: dict | None, out_dir: str | os.PathLike) -> Path:
    """Render case ``index`` and write ``out_dir/images/case_XXXX.nii.gz`` atomically."""
    path = Path(out_dir) / image_relpath(index)
    img, _ = make_case(index, cfg)
    save_nifti_atomic(img, path)
    return path


def write_tables(n_cases: int, cfg: dict | None, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``manifest.csv`` (case_id,image; image relative to the manifest's folder) and
    ``landmarks.csv`` (case_id,landmark,x,y,z in world RAS mm) for cases 0..n_cases-1."""
    out = Path(out_dir)
    man, lms = StringIO(), StringIO()
    wm, wl = csv.writer(man, lineterminator="\n"), csv.writer(lms, lineterminator="\n")
    wm.writerow(["case_id", "image"])
    wl.writerow(["case_id", "landmark", "x", "y", "z"])
    for i in range(int(n_cases)):
        wm.writerow([case_id(i), image_relpath(i)])
        for name, xyz in case_landmarks(i, cfg).items():
            wl.writerow([case_id(i), name] + [f"{v:.6f}" for v in xyz])
    write_text_atomic(man.getvalue(), out / "manifest.csv")
    write_text_atomic(lms.getvalue(), out / "landmarks.csv")
    return out / "manifest.csv", out / "landmarks.csv"


__all__ = [
    "LANDMARK_NAMES", "DEFAULT_CONFIG", "Anatomy", "PhantomCase", "resolve_config", "case_id",
    "image_relpath", "sample_anatomy", "build_case", "make_case", "case_landmarks",
    "render_canonical", "write_case", "write_tables",
]
