"""The registry of the study's methods: one record per row of Table 1.

Everything that differs between methods and is not a model weight lives here, once: the
key used in configs, file names and Snakemake wildcards; the label of tables and figures;
the paper's Table 1 numbers; the figure colour; where the model is built; and the facts the
workflow and the training loop branch on (one level or the multi-scale chain, noisy test
passes, one training phase per level). The config schema's method list, the workflow's
jobs, Table 1's rows, the figures and the benchmarks all read :data:`REGISTRY`, so a new
method is one model module plus one :class:`Method` entry below (docs/adding-a-method.md).

This module imports neither Keras nor TensorFlow: the workflow and the table/figure code
read it without loading a deep-learning backend. :func:`builder` imports the model module
on demand.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

__all__ = [
    "Method",
    "REGISTRY",
    "KEYS",
    "PROPOSED",
    "HEATMAP_FIGURE",
    "get",
    "builder",
    "single_level",
    "multiscale",
    "noisy",
    "multiphase",
]


@dataclass(frozen=True)
class Method:
    """One method of the study.

    ``build``: ``"module:function"``; the function takes the method's config block merged
    over :data:`locnet.models.MODEL_DEFAULTS` and the grid keywords every model takes
    (``finest_shape``, ``finest_spacing_mm``, ``n_levels``, ``landmarks``, ``name``) and
    returns a :class:`locnet.models.LandmarkModel`.
    """

    key: str
    label: str  # the method's name; locnet.metrics.method_label adds the spacing of its level(s)
    paper_mean_mm: float  # the paper's Table 1 (neck CTA, 54 test scans); nan if not in the paper
    paper_sd_mm: float
    color: str  # fixed per method, so every figure shows it in the same colour
    build: str
    multiscale: bool = False  # reads every pyramid level as a chain (else: one level, ``level``)
    noisy: bool = False  # test-time noisy passes: sd, confidence volume, quality flag, inference
    multiphase: bool = False  # trained one level at a time, coarse to fine (locnet.train)
    map_prior: bool = False  # its Loc-Nets take the shared map_supervision block (the map prior)


# Table 1 of the paper, in its row order. Colours: the colour-blind-safe Okabe-Ito palette;
# the proposed method gets the strongest colour.
REGISTRY: dict[str, Method] = {
    m.key: m
    for m in (
        Method("heatmap_unet", "U-Net heatmap", 6.45, 9.18, "#999999",
               build="locnet.models.heatmap:build"),
        Method("locnet_single", "Loc-Net single scale", 5.52, 5.69, "#E69F00",
               build="locnet.models.single:build", map_prior=True),
        Method("patch_baseline", "Patch-based CNN, Noothout 2018", 4.35, 4.33, "#56B4E9",
               build="locnet.models.patch:build"),
        Method("multiscale_multistep", "Loc-Net multi-scale, multi-step", 3.72, 4.20, "#009E73",
               build="locnet.models.multiscale:build_multistep", multiscale=True,
               multiphase=True, map_prior=True),
        Method("multiscale_e2e", "Loc-Net multi-scale, end to end", 3.61, 3.17, "#0072B2",
               build="locnet.models.multiscale:build_e2e", multiscale=True, map_prior=True),
        Method("multiscale_e2e_noise", "Loc-Net multi-scale, end to end + noise", 2.81, 2.37,
               "#D55E00", build="locnet.models.multiscale:build_e2e_noise", multiscale=True,
               noisy=True, map_prior=True),
    )
}

#: method keys in Table 1's order
KEYS: tuple[str, ...] = tuple(REGISTRY)
#: the paper's proposed method (Fig. 5, the paired tests' reference)
PROPOSED = "multiscale_e2e_noise"
#: the methods whose output maps the paper's Fig. 3 shows side by side: (Loc-Net, heatmap)
HEATMAP_FIGURE = ("locnet_single", "heatmap_unet")


def get(key: str) -> Method:
    """The record of ``key``; a clear error naming the known methods otherwise."""
    try:
        return REGISTRY[key]
    except KeyError:
        raise ValueError(f"unknown method {key!r}; choose one of {list(KEYS)}") from None


def builder(key: str) -> Callable:
    """The model-building function of ``key`` (imports its module)."""
    module, _, func = get(key).build.partition(":")
    return getattr(importlib.import_module(module), func)


def single_level() -> tuple[str, ...]:
    """Keys of the methods that read one whole pyramid level."""
    return tuple(k for k, m in REGISTRY.items() if not m.multiscale)


def multiscale() -> tuple[str, ...]:
    """Keys of the multi-scale chains (every level, coarsest to finest)."""
    return tuple(k for k, m in REGISTRY.items() if m.multiscale)


def noisy() -> tuple[str, ...]:
    """Keys of the methods with noisy test-time passes."""
    return tuple(k for k, m in REGISTRY.items() if m.noisy)


def multiphase() -> tuple[str, ...]:
    """Keys of the methods trained one level at a time."""
    return tuple(k for k, m in REGISTRY.items() if m.multiphase)
