"""Study predictions: every case of a subset through a trained model, back to world coordinates.

For each case the model reads its pyramid levels, predicts positions in grid millimetres, and
the case's grid maps them to world RAS millimetres of the original scan (the pyramid grid is
axis-aligned RAS, so the map is a translation: ``world = origin + g``).

Noisy models (those built with ``noise_mm > 0``) are also run ``passes`` times with independent
uniform shifts of the finest crop centre. The coarse levels run once and the noisy finest
passes run in chunks, both compiled (:func:`locnet.models.predict_passes`). The prediction is the mean
over passes; the per-axis sample standard deviation gives the 90% confidence volume
(:func:`locnet.metrics.confidence_volume`). The noise-free prediction is kept beside it
(``det_*`` columns) so the effect of test-time averaging can be measured.

Multi-scale models (:class:`locnet.models.MultiScaleLocNet`) also output the prediction of
every level of the chain. They are kept, coarsest to finest, as ``level{l}_x/y/z`` (world mm)
and ``error_level{l}_mm`` (:func:`level_columns`), so the error after each level can be
followed (:mod:`locnet.level_errors`). Level 0 is the reported prediction (``x, y, z``: the
mean over the passes for a noisy model); the coarser levels are noise-free.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from keras import ops

from locnet import data, metrics, models, seeds
from locnet.pyramid import read_grid

log = logging.getLogger("locnet.study_predict")

COLUMNS = ["case_id", "subset", "landmark", "x", "y", "z", "true_x", "true_y", "true_z", "error_mm"]
NOISE_COLUMNS = ["sd_x", "sd_y", "sd_z", "conf_volume_mm3", "det_x", "det_y", "det_z", "det_error_mm"]


def level_columns(levels: Sequence[int]) -> list[str]:
    """Per-level columns of a multi-scale prediction table, coarsest level first."""
    return [c for l in sorted(levels, reverse=True)
            for c in (f"level{l}_x", f"level{l}_y", f"level{l}_z", f"error_level{l}_mm")]


def chain_levels(model) -> list[int]:
    """The levels of a multi-scale chain, coarsest first (empty for other models)."""
    if isinstance(model, models.MultiScaleLocNet):
        return list(range(model.n_levels - 1, -1, -1))
    return []


def predict_outputs(model, inputs) -> dict[str, np.ndarray]:
    """All noise-free outputs of one batch (grid mm, float64): ``position``, ``level{l}``, ...

    The same compiled call as :func:`locnet.models.predict_position`, keeping every output.
    """
    out = model.predict_on_batch(dict(inputs))
    if not isinstance(out, dict):
        out = {"position": out}
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def is_noisy(model) -> bool:
    return isinstance(model, models.MultiScaleLocNet) and float(getattr(model, "noise_mm", 0)) > 0


def predict_arrays(model, inputs, passes: int = 0, seed: int = 0,
                   chunk: int | None = models.PASS_CHUNK, estimator: str = "exact",
                   with_levels: bool = False):
    """One case from in-memory inputs ``{"level{l}": (1, n, n, n, 1)}``.

    Returns ``(position (K,3) grid mm, passes (n,K,3) grid mm or None, deterministic (K,3))``.
    With ``passes`` > 0 and a noisy model, ``position`` is the mean over the noisy passes and
    ``deterministic`` the noise-free prediction; otherwise both are the noise-free prediction.
    ``estimator``: how the passes are computed (:func:`locnet.models.predict_passes`).
    With ``with_levels`` a fourth item ``{level: (K,3) grid mm}`` holds each level of a
    multi-scale chain (empty for other models); level 0 is ``position``.
    Used by the study (:func:`case_prediction`) and by inference on new scans alike.
    """
    out = predict_outputs(model, inputs)
    det = out["position"][0]
    pos, samples = det, None
    if passes > 0 and is_noisy(model):
        shifts = models.sample_shifts(passes, model.n_landmarks, float(model.noise_mm), seed=seed)
        samples = np.asarray(models.predict_passes(model, inputs, shifts, chunk=chunk,
                                                   estimator=estimator), np.float64)
        pos = samples.mean(axis=0)
    if not with_levels:
        return pos, samples, det
    levels = {l: (pos if l == 0 else out[f"level{l}"][0]) for l in chain_levels(model)}
    return pos, samples, det, levels


def case_prediction(model, case_dir, passes: int = 0, seed: int = 0,
                    chunk: int | None = models.PASS_CHUNK, estimator: str = "exact",
                    with_levels: bool = False):
    """:func:`predict_arrays` on a case of the stored (memory-mapped) pyramid."""
    inputs = data.load_case_inputs(case_dir, data.model_levels(model))
    return predict_arrays(model, inputs, passes, seed, chunk, estimator, with_levels)


def predict_cases(
    model,
    case_dirs: Sequence[str | Path],
    subsets: Mapping[str, str],
    landmark_table,
    landmarks: Sequence[str],
    passes: int = 0,
    seed: int = 0,
    confidence: float = 0.90,
    progress: bool = True,
    estimator: str = "exact",
) -> pd.DataFrame:
    """Predict every case in ``case_dirs``; one row per case and landmark (world RAS mm).

    ``subsets`` maps case id to its subset (``val``/``test``); ``landmark_table`` holds the
    annotations (world RAS mm, NaN where missing: error is then NaN too). Each case's noise
    draws depend only on ``(seed, case_id)``, so results do not depend on the case order.
    ``estimator`` (``"exact"`` or ``"window"``): how the noisy passes are computed
    (:func:`locnet.models.predict_passes`). A multi-scale model adds :func:`level_columns`.
    """
    truth = data.landmark_index(data.read_landmark_table(landmark_table))
    noisy = passes > 0 and is_noisy(model)
    chain = chain_levels(model)
    rows = []
    iterator = case_dirs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(case_dirs, desc="predict", unit="case", mininterval=5)
    for case_dir in iterator:
        case = data.case_id_of(case_dir)
        grid = read_grid(case_dir)
        pos, samples, det, levels = case_prediction(
            model, case_dir, passes, seeds.derive(seed, case), estimator=estimator,
            with_levels=True)
        world = grid.grid_mm_to_world(pos)
        det_world = grid.grid_mm_to_world(det)
        level_world = {l: grid.grid_mm_to_world(g) for l, g in levels.items()}
        if noisy:
            sds, volumes = metrics.pass_uncertainty(samples, level=confidence)
        for k, name in enumerate(landmarks):
            true = truth.get(case, {}).get(name, np.full(3, np.nan))
            row = {
                "case_id": case,
                "subset": subsets.get(case, ""),
                "landmark": name,
                "x": world[k, 0],
                "y": world[k, 1],
                "z": world[k, 2],
                "true_x": true[0],
                "true_y": true[1],
                "true_z": true[2],
                "error_mm": float(np.linalg.norm(world[k] - true)),
            }
            if noisy:
                sd = sds[k]
                row.update(
                    sd_x=sd[0],
                    sd_y=sd[1],
                    sd_z=sd[2],
                    conf_volume_mm3=float(volumes[k]),
                    det_x=det_world[k, 0],
                    det_y=det_world[k, 1],
                    det_z=det_world[k, 2],
                    det_error_mm=float(np.linalg.norm(det_world[k] - true)),
                )
            for l in chain:
                p = level_world[l][k]
                row.update({f"level{l}_x": p[0], f"level{l}_y": p[1], f"level{l}_z": p[2],
                            f"error_level{l}_mm": float(np.linalg.norm(p - true))})
            rows.append(row)
        log.info("case %s predicted", case)
    columns = COLUMNS + (NOISE_COLUMNS if noisy else []) + level_columns(chain)
    return pd.DataFrame(rows, columns=columns)


def output_maps(model, case_dir) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A single-scale model's output maps on one case, for Fig. 3.

    Returns ``(maps (n, n, n, K), position (K, 3) grid mm, level)``: the Loc-Net's
    non-negative maps (whose centre of mass is the prediction) or the heatmap U-Net's
    heatmaps, on the grid of the level the model reads.
    """
    (level,) = data.model_levels(model)
    inputs = data.load_case_inputs(case_dir, [level])
    out = model(inputs, training=False)
    if "heatmap" in out:
        maps = out["heatmap"]
    else:
        maps = model.level_net(level).maps(inputs[f"level{level}"], training=False)
    maps = np.asarray(ops.convert_to_numpy(maps), dtype=np.float32)[0]
    pos = np.asarray(ops.convert_to_numpy(out["position"]), dtype=np.float64)[0]
    return maps, pos, level


def representative_case(predictions: pd.DataFrame, landmark: str | None = None) -> tuple[str, str]:
    """The test case (and landmark) whose error is closest to the median test error."""
    df = predictions[(predictions["subset"] == "test") & predictions["error_mm"].notna()]
    if landmark is not None:
        df = df[df["landmark"] == landmark]
    if df.empty:
        raise ValueError("no annotated test landmark to show")
    i = (df["error_mm"] - df["error_mm"].median()).abs().idxmin()
    return str(df.loc[i, "case_id"]), str(df.loc[i, "landmark"])
