"""Models of the study: one U-Net builder, Loc-Net, and one module per method of Table 1.

Contract (``docs/architecture.md``)
-----------------------------------
* Inputs: a dict ``{"level{l}": (B, n_l, n_l, n_l, 1)}`` of whole pyramid levels (windowed
  to [0, 1]); ``model.input_levels`` lists the levels a model reads, other keys are ignored.
* Outputs: a dict with ``"position"`` (B, K, 3) in *grid millimetres*; multi-scale models
  add ``"level{l}"`` for every level, the heatmap U-Net adds ``"heatmap"``, the patch
  baseline ``"logits"`` and ``"displacement"``.
* Targets: ``{"position": (B, K, 3) grid mm, "mask": (B, K)}``; mask 0 marks a missing
  landmark, which contributes nothing to any loss (its position value is ignored).
* Grid millimetres: level-``l`` voxel coordinate ``v`` <-> ``g = s_l v + (s_l - s0) / 2``
  with ``s_l = s0 2^l`` (:func:`locnet.geometry.voxel_to_grid_mm` and its inverse).
* Every model computes its own loss in ``compute_loss`` (backend-agnostic ``keras.ops``):
  compile with an optimizer only (``model.compile(optimizer=...)``). Per-level losses are
  logged as ``loss_level{l}`` (and ``val_loss_level{l}``). ``model.loss_weights`` is a
  non-trainable variable holding one weight per entry of ``model.loss_levels``; the
  training schedule assigns it each epoch (``model.loss_weights.assign(w)``).

Layout
------
* :mod:`locnet.models.unet`: :func:`build_unet` and :class:`LocNet`, shared by every method;
* :mod:`locnet.models.base`: :class:`LandmarkModel`, the base class of every method's model;
* one module per method family: :mod:`~locnet.models.heatmap`, :mod:`~locnet.models.single`,
  :mod:`~locnet.models.patch`, :mod:`~locnet.models.multiscale`;
* :mod:`locnet.models.passes`: the test-time noisy passes of the chain and their stage models.

:func:`build_model` finds a method's builder in the registry (:mod:`locnet.methods`).
"""

from __future__ import annotations

import copy
import importlib

import keras

from locnet import methods
from locnet.config import model_defaults
from locnet.models.base import LandmarkModel
from locnet.models.heatmap import HeatmapUNet
from locnet.models.multiscale import MultiScaleLocNet
from locnet.models.passes import (
    ESTIMATORS,
    PASS_CHUNK,
    coarse_stages,
    finest_stage,
    predict_passes,
    predict_position,
    sample_shifts,
    window_size,
    window_stage,
)
from locnet.models.patch import PatchBaseline
from locnet.models.single import SingleLocNet
from locnet.models.unet import LocNet, build_unet

__all__ = [
    "MODEL_DEFAULTS",
    "build_unet",
    "LocNet",
    "LandmarkModel",
    "HeatmapUNet",
    "SingleLocNet",
    "PatchBaseline",
    "MultiScaleLocNet",
    "build_model",
    "predict_passes",
    "predict_position",
    "ESTIMATORS",
    "PASS_CHUNK",
    "sample_shifts",
    "coarse_stages",
    "finest_stage",
    "window_size",
    "window_stage",
]

#: Defaults merged under every method's config block by :func:`build_model`: the config
#: schema's (``definitions.method`` and ``definitions.unet``), its one source
MODEL_DEFAULTS = model_defaults()


def _merge(defaults: dict, cfg: dict) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in (cfg or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_model(method: str, cfg: dict, grid: dict) -> keras.Model:
    """Build the model of ``method`` from its config block and the pyramid grid.

    ``cfg``: the method's block merged with shared defaults (missing keys fall back to
    :data:`MODEL_DEFAULTS`); must contain ``"landmarks"`` (list of names).
    ``grid``: ``{"finest_shape": N0, "finest_spacing_mm": s0, "levels": L}``.
    The method's builder (``build`` of its :class:`locnet.methods.Method`) reads the keys it
    needs: ``level`` (single-level methods), ``unet``, ``out_activation``, ``com_epsilon``
    (Loc-Nets), ``patch``, ``background``, ``seed``, ``noise_mm`` (multi-scale),
    ``heatmap_*`` (heatmap), ``regress_radius_mm``, ``regression_weight``, ``cls_threshold``
    (patch baseline). Other keys (``schedule``, training settings) are ignored here.
    """
    info = methods.get(method)
    c = _merge(MODEL_DEFAULTS, cfg)
    if "landmarks" not in c or not c["landmarks"]:
        raise ValueError("cfg must list the landmarks")
    common = {
        "finest_shape": int(grid["finest_shape"]),
        "finest_spacing_mm": float(grid["finest_spacing_mm"]),
        "n_levels": int(grid["levels"]),
        "landmarks": list(c["landmarks"]),
        "name": method,
    }
    if not info.multiscale and not 0 <= int(c["level"]) < common["n_levels"]:
        raise ValueError(f"level {int(c['level'])} outside the pyramid (levels: {common['n_levels']})")
    return methods.builder(method)(c, common)


# Import every registered method's module, so that importing locnet.models registers each
# model class with Keras and a saved model of any method loads (keras.saving.load_model).
for _method in methods.REGISTRY.values():
    importlib.import_module(_method.build.partition(":")[0])
del _method
