"""Does the heatmap U-Net learn? Its training loss against the all-zero map's, and dead units.

Trains ``heatmap_unet`` on a study's pyramids (``--results``, after the ``pyramid`` and
``split`` rules have run) with ``locnet.train.train``, once per variant, and prints per epoch:
the training loss, the loss an all-zero map would get on the same cases with the same loss
function, the validation error, and how alive the network is on one validation case (the
heatmap's peak-to-peak range, the fraction of dead ReLU channels in the last decoder block).

Variants (``--variants``):

* ``plain``: the loss before this fix: peak-1 targets, summed squared error, He-initialised
  head (``heatmap_peak 1``, ``heatmap_foreground_weight 0`` with a sum instead of a mean
  is the same minimiser; the head is He-initialised);
* ``shipped``: the defaults (peak 100, foreground weight 10, head N(0, 1e-3^2));
* ``balanced``, ``fg100``, ``near_zero_head``: the same with the foreground weight balanced,
  100 or 0;
* ``scaled``: peak 100 alone, with a He-initialised head and no weighting;
* ``locnet_single``: the single-scale Loc-Net on the same level, for reference.

    .venv/bin/python benchmarks/heatmap_training.py --results results --epochs 25
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

VARIANTS = {
    "plain": {"heatmap_peak": 1.0, "heatmap_foreground_weight": 0.0, "head_init_std": None},
    "scaled": {"heatmap_peak": 100.0, "heatmap_foreground_weight": 0.0, "head_init_std": None},
    "near_zero_head": {"heatmap_peak": 100.0, "heatmap_foreground_weight": 0.0},
    "balanced": {"heatmap_peak": 100.0, "heatmap_foreground_weight": "balanced"},
    "fg100": {"heatmap_peak": 100.0, "heatmap_foreground_weight": 100.0},
    "shipped": {},  # the defaults: peak 100, foreground weight 10, head N(0, 1e-3^2)
    "locnet_single": None,  # the reference: the single-scale Loc-Net on the same level
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="results")
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    import keras
    import numpy as np
    import pandas as pd
    import yaml

    pd.set_option("display.width", 200)
    from keras import ops

    from locnet import split as splitmod
    from locnet import train
    from locnet.data import LandmarkDataset, read_landmark_table
    from locnet.models import HeatmapUNet, build_model

    logging.basicConfig(level=logging.WARNING)
    cfg = yaml.safe_load(open(args.config))
    res = Path(args.results)
    subsets = splitmod.read_split(res / "data" / "split.csv")
    dirs = {s: [res / "pyramid" / c for c in subsets.loc[subsets["subset"] == s, "case_id"]]
            for s in ("train", "val", "test")}
    pcfg = cfg["pyramid"]
    grid = {"finest_shape": pcfg["finest_shape"], "finest_spacing_mm": pcfg["finest_spacing_mm"],
            "levels": pcfg["levels"]}
    table = read_landmark_table(res / "data" / "landmarks.csv")
    landmarks = list(cfg["landmarks"])
    method_cfg = {**cfg["methods"]["heatmap_unet"], "unet": cfg.get("unet", {})}

    rows = []
    test_errors = {}
    for variant in args.variants:
        opts = VARIANTS[variant]
        plain = variant == "plain"
        method = "heatmap_unet" if opts is not None else variant
        mcfg = method_cfg if opts is not None else {**cfg["methods"][method],
                                                     "unet": cfg.get("unet", {})}

        def build(method, mcfg, g, opts=opts, plain=plain):
            if opts is None:
                return build_model(method, mcfg, g)
            model = build_model(method, {**mcfg, **{k: v for k, v in opts.items()
                                                   if k != "head_init_std"}}, g)
            if "head_init_std" in opts:  # rebuild the head the way the variant starts it
                model = HeatmapUNet.from_config({**model.get_config(),
                                                 "head_init_std": opts["head_init_std"]})
            if plain:  # summed, unweighted squared error: the loss before the fix
                model.heatmap_loss = lambda hm, unit, m=model: ops.sum(
                    ops.square(hm - m.heatmap_peak * unit), axis=(1, 2, 3))
            return model

        probe = {}

        class Probe(keras.callbacks.Callback):
            """Zero-map loss, output range and dead channels after each epoch."""

            def on_epoch_end(self, epoch, logs=None):
                m = self.model
                if not isinstance(m, HeatmapUNet):
                    return
                ds = LandmarkDataset(dirs["train"][:8], [m.level], table, landmarks,
                                     shuffle=False)
                zero = []
                for b in range(len(ds)):
                    x, y = ds[b]
                    unit = m.target_heatmaps(y["position"])
                    zero.append(float(ops.convert_to_numpy(
                        ops.mean(m.heatmap_loss(ops.zeros_like(unit), unit)))))
                vx, _ = LandmarkDataset(dirs["val"][:1], [m.level], table, landmarks,
                                        shuffle=False)[0]
                hm = ops.convert_to_numpy(m.net(vx[f"level{m.level}"]))
                feat_model = keras.Model(m.net.input, m.net.get_layer(
                    f"{m.net.name}_dec0_conv0").output)
                feat = ops.convert_to_numpy(feat_model(vx[f"level{m.level}"]))
                dead = float(np.mean(feat.reshape(-1, feat.shape[-1]).max(axis=0) <= 0))
                # the history counts epochs from 1
                probe[epoch + 1] = {"zero_map_loss": float(np.mean(zero)),
                                "heatmap_range": float(hm.max() - hm.min()),
                                "dead_dec0_channels": dead}

        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            out = train.train(
                method, mcfg,
                {**cfg["training"], "epochs": args.epochs}, grid, landmarks,
                dirs["train"], dirs["val"], table, Path(tmp) / "out", Path(tmp) / "state",
                seed=args.seed, callbacks=[Probe()], build_fn=build,
            )
            kept = keras.saving.load_model(Path(tmp) / "out" / "model.keras")
            test_ds = LandmarkDataset(dirs["test"], list(kept.input_levels), table, landmarks,
                                      shuffle=False)
            test_errors[variant] = train.validation_error(kept, test_ds)
        hist = out["history"]
        for _, r in hist.iterrows():
            e = int(r["epoch"])
            rows.append({"variant": variant, "epoch": e, "loss": r["loss"],
                         **probe.get(e, {}), "val_error_mm": r.get("val_error_mm")})
        mine = pd.DataFrame([r for r in rows if r["variant"] == variant])
        if "zero_map_loss" in mine:
            mine["loss / zero map"] = mine["loss"] / mine["zero_map_loss"]
        print(mine.to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
        print(f"{variant}: kept epoch {out['best_epoch']}, validation error "
              f"{out['best_val_error_mm']:.2f} mm, test error {test_errors[variant]:.2f} mm "
              f"({len(dirs['test'])} cases), {time.perf_counter() - t:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
