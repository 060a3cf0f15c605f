"""Does the Loc-Net learn on a CPU budget? Training cases against steps, and where it fails.

Three modes, all on a finished study's results folder (``--results``):

``axes``: for each method's seed-0 test predictions, the slope of the predicted against the
true position along each axis of the pyramid's voxel grid (1 = follows the truth, 0 = one
position for every scan), next to the no-image reference of ``tables/reference.csv``.

``train``: one single-scale Loc-Net (``locnet_single``'s config from the study's seed-0
metadata, at ``--level``) trained with ``locnet.train.train`` on the first ``--n-train``
training cases for ``--epochs`` epochs, recording the mean test error after every epoch
(recorded only; selection uses the validation set as in the study). ``--spread-weight w``
adds ``w`` x the spatial variance (mm^2) of each normalised output map to the loss, a
concentration penalty of the kind used for centre-of-mass coordinate regression.

``maps``: how concentrated ``locnet_single``'s seed-0 output maps are on the test cases: the
share of each map's mass within ``--radius-mm`` of its centre of mass and of its peak, and the
distance from peak to centre of mass. A map whose mass is spread over the volume gives a
centre of mass pulled towards the middle of the grid, whatever the image shows.

    .venv/bin/python benchmarks/locnet_learning.py axes --results results
    .venv/bin/python benchmarks/locnet_learning.py maps --results results
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


def maps(res: Path, radius_mm: float, method: str = "locnet_single") -> None:
    import numpy as np
    import pandas as pd

    from locnet import split as splitmod
    from locnet.data import load_case_inputs
    from locnet.inference import load_model_dir

    lm = load_model_dir(res / "models" / method / "seed0")
    model = lm.model
    net = model.level_net(model.level)
    spacing = float(model.level_spacing(model.level))
    split = splitmod.read_split(res / "data" / "split.csv")
    n = model.level_size(model.level)
    grid = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1)  # (n, n, n, 3)
    rows = []
    for case in split.loc[split["subset"] == "test", "case_id"]:
        x = load_case_inputs(res / "pyramid" / case, [model.level])[f"level{model.level}"]
        maps_k = net.maps(x)
        coms = np.asarray(net.com(maps_k))[0]  # (K, 3): the model's own centre of mass
        m = np.asarray(maps_k)[0].astype(np.float64)  # (n, n, n, K)
        for k in range(m.shape[-1]):
            mk = m[..., k]
            total = mk.sum()
            com = coms[k]
            peak = np.array(np.unravel_index(np.argmax(mk), mk.shape), dtype=float)
            d_com = np.linalg.norm(grid - com, axis=-1) * spacing
            d_peak = np.linalg.norm(grid - peak, axis=-1) * spacing
            rows.append({"case": case, "landmark": k,
                         "near_com": mk[d_com <= radius_mm].sum() / total,
                         "near_peak": mk[d_peak <= radius_mm].sum() / total,
                         "peak_to_com_mm": np.linalg.norm(peak - com) * spacing,
                         "max_over_median": mk.max() / max(np.median(mk), 1e-30)})
    t = pd.DataFrame(rows)
    print(f"{method} seed 0, level {model.level} ({spacing:g} mm), {len(t)} test maps: "
          f"mass within {radius_mm:g} mm of the centre of mass median "
          f"{t['near_com'].median():.1%} (10-90%: {t['near_com'].quantile(0.1):.1%}-"
          f"{t['near_com'].quantile(0.9):.1%}); of the peak median {t['near_peak'].median():.1%}; "
          f"peak to centre of mass median {t['peak_to_com_mm'].median():.1f} mm; "
          f"max / median voxel median {t['max_over_median'].median():.3g}")


def spread_model(base_cls, weight: float):
    """``base_cls`` (SingleLocNet) whose loss adds ``weight`` x the maps' spatial variance."""
    import keras
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

    # registered, so that a saved model of it loads again in this process (map_prior.py)
    @keras.saving.register_keras_serializable(package="locnet_benchmarks")
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
        model = cls(finest_shape=grid["finest_shape"], finest_spacing_mm=grid["finest_spacing_mm"],
                   n_levels=grid["levels"], landmarks=c["landmarks"], level=args.level,
                   unet=unet_kwargs(c["unet"]),
                   out_activation=args.activation or c["out_activation"])
        if args.head_bias:  # start every map near zero: the background holds little mass
            head = model.locnet.net.layers[-1]
            head.bias.assign(np.full(head.bias.shape, args.head_bias, dtype="float32"))
        return model

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = T.train("locnet_single", mc, tc, meta["grid"], meta["landmarks"], dirs["train"],
                         dirs["val"], table, out_dir=Path(tmp) / "out", state_dir=Path(tmp) / "st",
                         seed=args.seed, callbacks=[TestError()], build_fn=build)
    kept = int(result["best_epoch"])
    print(f"level {args.level}, {len(dirs['train'])} training cases x {args.epochs} epochs, "
          f"spread weight {args.spread_weight:g}, activation {args.activation or 'study'}, "
          f"head bias {args.head_bias:g}: kept epoch {kept}, test error "
          f"{errors[kept - 1] if kept else float('nan'):.2f} mm (per epoch: "
          f"{', '.join(f'{e:.1f}' for e in errors)}), {time.perf_counter() - t0:.0f} s")
    print(f"training loss (mm^2) first/last epoch: see the log above; test errors min "
          f"{np.min(errors):.2f} mm")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["axes", "train", "maps"])
    p.add_argument("--results", default="results")
    p.add_argument("--level", type=int, default=2)
    p.add_argument("--n-train", type=int, default=0, help="first N training cases (0: all)")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--window", type=int, default=5, help="selection window (epochs)")
    p.add_argument("--spread-weight", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--activation", default=None,
                   help="train: output activation of the maps, any Keras name (default: the study's); "
                        "exponential makes the centre of mass a soft-argmax")
    p.add_argument("--head-bias", type=float, default=0.0,
                   help="train: initial bias of the maps' 1x1x1 head (0: the study's)")
    p.add_argument("--radius-mm", type=float, default=10.0, help="maps: radius of the share")
    p.add_argument("--method", default="locnet_single", help="maps: a single-level method")
    args = p.parse_args(argv)
    if args.mode == "axes":
        axes(Path(args.results))
    elif args.mode == "maps":
        maps(Path(args.results), args.radius_mm, args.method)
    else:
        train_one(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
