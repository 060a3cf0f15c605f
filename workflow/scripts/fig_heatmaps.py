"""Fig. 3: output maps of the single-scale models on a representative test case."""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


import locnet  # noqa: E402,F401  (first: it picks TensorFlow's CPU kernels)
import keras  # noqa: E402
import pandas as pd  # noqa: E402

import locnet.models  # noqa: E402,F401  (registers the custom layers)
from locnet import figures, metrics, study_predict  # noqa: E402
from locnet.pyramid import load_level  # noqa: E402
from locnet.runlog import job_logging  # noqa: E402

# labels give the spacing of the levels each method reads in this run's config
with job_logging(snakemake) as log, metrics.labels_from_config(snakemake.config):
    preds = pd.read_csv(snakemake.input.predictions)
    case, landmark = study_predict.representative_case(preds)
    k = list(snakemake.params.landmarks).index(landmark)
    case_dir = Path(snakemake.params.pyramid_dir) / case
    ln_maps, ln_pos, level = study_predict.output_maps(keras.saving.load_model(snakemake.input.locnet), case_dir)
    hm_maps, _, hm_level = study_predict.output_maps(keras.saving.load_model(snakemake.input.heatmap), case_dir)
    volume, grid = load_level(case_dir, level)
    row = preds[(preds["case_id"] == case) & (preds["landmark"] == landmark)].iloc[0]
    truth = grid.world_to_voxel(row[["true_x", "true_y", "true_z"]].to_numpy(float), level)
    pred = grid.grid_mm_to_voxel(ln_pos[k], level)
    log.info("case %s, %s: error %.2f mm", case, landmark, row["error_mm"])
    figures.heatmap_figure(
        volume,
        grid.level_affine(level),
        truth,
        pred,
        ln_maps[..., k],
        hm_maps[..., k],
        snakemake.output.png[: -len(".png")],
        landmark,
        case_id=case,
    )
