"""Gaussian target maps and their loss: the heatmap U-Net's loss and the Loc-Nets' map prior.

Two methods supervise output maps with Gaussians at the target positions: ``heatmap_unet``
(the maps are its whole output) and, when ``map_supervision.weight > 0``, the Loc-Nets (the
loss is added to the centre-of-mass error so that each map stays a peak at its landmark while
the centre of mass is trained; see :class:`locnet.models.unet.LocNet`). Both build their
targets and losses here.
"""

from __future__ import annotations

import numpy as np
from keras import ops

__all__ = ["gaussian_maps", "weighted_map_error", "map_prior_loss"]


def gaussian_maps(centres_vox, n: int, sigma_vox: float):
    """(B, M, 3) voxel positions -> (B, n, n, n, M) Gaussians of peak 1 on an ``n^3`` grid.

    Positions may lie outside the grid (the visible part of the Gaussian, possibly nothing).
    """
    v = ops.cast(centres_vox, "float32")
    r = ops.reshape(ops.arange(n, dtype="float32"), (1, 1, n))
    s2 = 2.0 * float(sigma_vox) ** 2
    g = [ops.exp(-ops.square(r - v[..., a : a + 1]) / s2) for a in range(3)]
    h = g[0][:, :, :, None, None] * g[1][:, :, None, :, None] * g[2][:, :, None, None, :]
    return ops.transpose(h, (0, 2, 3, 4, 1))


def _foreground_lambda(unit, foreground_weight):
    if foreground_weight == "balanced":
        n_vox = float(np.prod([int(d) for d in unit.shape[1:4]]))
        return n_vox / ops.maximum(ops.sum(unit, axis=(1, 2, 3), keepdims=True), 1e-6)
    return float(foreground_weight)


def weighted_map_error(pred, unit, peak: float, foreground_weight=10.0):
    """Per case and map (B, M): the foreground-weighted mean squared error of ``pred`` against
    ``peak * unit`` (``unit``: Gaussians of peak 1), each voxel weighted ``1 + lam * unit``.

    ``foreground_weight`` is ``lam``; ``"balanced"`` sets it so that the foreground's total
    weight equals the background's. This is the heatmap U-Net's loss
    (:class:`locnet.models.heatmap.HeatmapUNet` says why the weights are needed).
    """
    weight = 1.0 + ops.stop_gradient(_foreground_lambda(unit, foreground_weight) * unit)
    err = ops.square(pred - peak * unit)
    return ops.sum(weight * err, axis=(1, 2, 3)) / ops.sum(weight, axis=(1, 2, 3))


def map_prior_loss(logits, unit, peak: float, foreground_weight=10.0):
    """Per case and map (B, M): the map prior of a Loc-Net, in units of the Gaussian's mass.

    ``logits``: the Loc-Net's linear output (B, n, n, n, M), trained towards ``peak * unit``
    with the heatmap loss's weights, divided by ``peak^2`` and by the target's mass
    ``sum(unit)`` (at least 1) instead of the voxel count: the same map error then costs the
    same on a ``64^3`` level as on a ``16^3`` patch, and a map that is all zero costs about
    2.3 at every size (for the default widths of 2 voxels). A target outside the patch asks
    for the all-zero map.
    """
    weight = 1.0 + ops.stop_gradient(_foreground_lambda(unit, foreground_weight) * unit)
    err = ops.square(logits / peak - unit)
    mass = ops.maximum(ops.sum(unit, axis=(1, 2, 3)), 1.0)
    return ops.sum(weight * err, axis=(1, 2, 3)) / mass
