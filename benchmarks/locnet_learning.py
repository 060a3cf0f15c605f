"""Does the Loc-Net learn on a CPU budget? Training cases against steps, and where it fails.

Two modes, both on a finished study's results folder (``--results``):

``axes``: for each method's seed-0 test predictions, the slope of the predicted against the
true position along each axis of the pyramid's voxel grid (1 = follows the truth, 0 = one
position for every scan), next to the no-image reference of ``tables/reference.csv``.

``train``: one single-scale Loc-Net (``locnet_single``'s config from the study's seed-0
metadata, at ``--level``) trained with ``locnet.train.train`` on the first ``--n-train``
training cases for ``--epochs`` epochs, recording the mean test error after every epoch
(recorded only; selection uses the validation set as in the study). ``--spread-weight w``
adds ``w`` x the spatial variance (mm^2) of each normalised output map to the loss, a
concentration penalty of the kind used for centre-of-mass coordinate regression.

    .venv/bin/python benchmarks/locnet_learning.py axes --results results
    .venv/bin/python benchmarks/locnet_learning.py train --results results --level 2 \\
        --n-train 24 --epochs 25
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def axes(res: Path) -> None:
    import nibabel as nib
    import numpy as np
    import pandas as pd

    from locnet import reference

    ref = pd.read_csv(res / "tables" / "reference.csv")
    print(f"no-image reference: {reference.summary(ref)['mean_mm']:.2f} mm")
    for path in sorted((res / "predictions").glob("*.csv")):
        p = pd.read_csv(path)
        p = p[(p["seed"] == 0) & (p["subset"] == "test")].dropna(subset=["true_x"])
        pred, true = [], []
        for r in p.itertuples(index=False):
            inv = np.linalg.inv(nib.load(res / "pyramid" / r.case_id / "level0.nii").affine)
            pred.append((inv @ [r.x, r.y, r.z, 1.0])[:3])
            true.append((inv @ [r.true_x, r.true_y, r.true_z, 1.0])[:3])
        pred, true = np.array(pred), np.array(true)
        slopes = [np.polyfit(true[:, a], pred[:, a], 1)[0] for a in range(3)]
        print(f"{path.stem}: mean error {p['error_mm'].mean():.2f} mm; slope predicted vs true "
              f"per voxel axis {', '.join(f'{s:.2f}' for s in slopes)}")


def spread_model(base_cls, weight: float):
    """``base_cls`` (SingleLocNet) whose loss adds ``weight`` x the maps' spatial variance."""
    from keras import ops

    from locnet.models.base import masked_mean

    def variance(m):  # (B, n, n, n, K) -> (B, K): sum over axes of the map's variance, voxel^2
        total = ops.sum(m, axis=(1, 2, 3)) + 1e-6
        out = 0.0
        for other in ((2, 3), (1, 3), (1, 2)):
            marg = ops.sum(m, axis=other)
            idx = ops.reshape(ops.arange(marg.shape[1], dtype=m.dtype), (1, -1, 1))
            e1 = ops.sum(idx * marg, axis=1) / total
            out = out + ops.sum(idx * idx * marg, axis=1) / total - e1 * e1
        return out

    class Spread(base_cls):
        def call(self, inputs, training=None):
            maps = self.locnet.maps(inputs[f"level{self.level}"], training=training)
            g = self.to_mm(self.locnet.com(maps), self.level)
            return {"position": g, f"level{self.level}": g,
                    "spread": variance(maps) * self.level_spacing(self.level) ** 2}

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            loss = self.position_loss(y_pred["position"], y)
            self.level_trackers[0].update_state(loss)
            total = loss + weight * masked_mean(y_pred["spread"], y["mask"])
            return self._finish_loss(self.loss_weights[0] * total)

    return Spread


def train_one(args) -> None:
    import keras
    import numpy as np

    from locnet import split as splitmod
    from locnet import train as T
    from locnet.data import LandmarkDataset
    from locnet.models.single import SingleLocNet
    from locnet.models.unet import unet_kwargs

    res = Path(args.results)
    meta = json.loads((res / "models" / "locnet_single" / "seed0" / "metadata.json").read_text())
    mc = {k: v for k, v in meta["method_cfg"].items() if k != "landmarks"}
    mc["level"] = args.level
    tc = {**meta["train_cfg"], "epochs": args.epochs, "selection_window": args.window}
    split = splitmod.read_split(res / "data" / "split.csv")
    dirs = {s: [res / "pyramid" / c for c in split.loc[split["subset"] == s, "case_id"]]
            for s in ("train", "val", "test")}
    dirs["train"] = dirs["train"][: args.n_train or None]
    table = res / "data" / "landmarks.csv"
    test = LandmarkDataset(dirs["test"], [args.level], table, meta["landmarks"], shuffle=False)
    errors = []

    class TestError(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            errors.append(T.mean_error_mm(*T.predict_dataset(self.model, test)))

    def build(method, c, grid):
        cls = spread_model(SingleLocNet, args.spread_weight) if args.spread_weight else SingleLocNet
        return cls(finest_shape=grid["finest_shape"], finest_spacing_mm=grid["finest_spacing_mm"],
                   n_levels=grid["levels"], landmarks=c["landmarks"], level=args.level,
                   unet=unet_kwargs(c["unet"]), out_activation=c["out_activation"])

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = T.train("locnet_single", mc, tc, meta["grid"], meta["landmarks"], dirs["train"],
                         dirs["val"], table, out_dir=Path(tmp) / "out", state_dir=Path(tmp) / "st",
                         seed=args.seed, callbacks=[TestError()], build_fn=build)
    kept = int(result["best_epoch"])
    print(f"level {args.level}, {len(dirs['train'])} training cases x {args.epochs} epochs, "
          f"spread weight {args.spread_weight:g}: kept epoch {kept}, test error "
          f"{errors[kept - 1] if kept else float('nan'):.2f} mm (per epoch: "
          f"{', '.join(f'{e:.1f}' for e in errors)}), {time.perf_counter() - t0:.0f} s")
    print(f"training loss (mm^2) first/last epoch: see the log above; test errors min "
          f"{np.min(errors):.2f} mm")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["axes", "train"])
    p.add_argument("--results", default="results")
    p.add_argument("--level", type=int, default=2)
    p.add_argument("--n-train", type=int, default=0, help="first N training cases (0: all)")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--window", type=int, default=5, help="selection window (epochs)")
    p.add_argument("--spread-weight", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=123)
    args = p.parse_args(argv)
    if args.mode == "axes":
        axes(Path(args.results))
    else:
        train_one(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
