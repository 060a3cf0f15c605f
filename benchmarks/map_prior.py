"""Does a method learn at the study's own level and budget? One training run per call.

Trains one method of a config (default: ``config.yaml``) with ``locnet.train.train`` on a
finished study's cohort (its pyramid, split and landmark table under ``--results``; only the
rules up to ``split`` need to have run), then predicts the test cases with the kept model
and appends one JSON line to ``--out``: the kept epoch, the mean test error, its share of the
no-image reference, the slope of the predicted against the true position per grid axis
(grid axes x, y, z; z runs along the neck), per landmark and averaged over landmarks, and for the multi-scale chains the mean error at every level.

``--set key=value`` overrides config keys (dotted paths, YAML values), e.g.
``--set map_supervision.weight=0`` for the paper's Loc-Net or
``--set methods.locnet_single.out_activation=relu`` for its ReLU maps. ``--warm-start``,
``--head-bias`` and ``--spread-weight`` are the candidates of benchmarks/README.md ("Every
candidate, 3 seeds each") that are not config keys.

    .venv/bin/snakemake --cores 2 --config results=/tmp/cohort -- /tmp/cohort/data/split.csv
    .venv/bin/python benchmarks/map_prior.py --results /tmp/cohort --method locnet_single \\
        --seed 0 --label "map prior 300" --set map_supervision.weight=300 --out runs.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_config import load_config, set_key  # noqa: E402


def evaluate(model, dataset) -> dict:
    """Mean error (mm) of every output level and of ``position``, slopes of ``position``."""
    import numpy as np

    outs: dict[str, list] = {}
    trues, masks = [], []
    n = len(dataset.case_dirs)
    for i in range(n):
        x, y = dataset.case_batch(i, then=i + 1 if i + 1 < n else None)
        out = model.predict_on_batch(dict(x))
        for key, value in out.items():
            if key == "position" or key.startswith("level"):
                outs.setdefault(key, []).append(np.asarray(value, np.float64)[0])
        trues.append(y["position"][0])
        masks.append(y["mask"][0] > 0)
    true, mask = np.stack(trues).astype(np.float64), np.stack(masks)
    err = {k: float(np.linalg.norm(np.stack(v) - true, axis=-1)[mask].mean()) for k, v in outs.items()}
    from locnet.slopes import axis_slope

    pred = np.stack(outs["position"])
    # per landmark, then the mean over landmarks (as tables/slopes.csv and the results page)
    per = [[axis_slope(pred[mask[:, k], k, a], true[mask[:, k], k, a]) for a in range(3)]
           for k in range(true.shape[1])]
    return {"errors": err, "slopes": [float(v) for v in np.nanmean(per, axis=0)]}


def _warm_start_build(model_dir: str):
    """A ``build_fn`` for ``locnet.train.train`` that builds the method's model, then copies
    into its single U-Net every weight of the U-Net of a trained model (``model_dir``, e.g.
    the study's heatmap U-Net of the same seed): a warm start. The two U-Nets must have the
    same shapes (the same ``unet`` block and landmarks)."""
    from locnet.inference import load_model_dir
    from locnet.models import build_model

    source = load_model_dir(model_dir).model.net

    def build(method, method_cfg, grid):
        model = build_model(method, method_cfg, grid)
        if not hasattr(model, "locnet"):
            raise SystemExit(f"--warm-start: {method} is not a single Loc-Net")
        model.locnet.net.set_weights(source.get_weights())
        return model

    return build


def _screen_build(args, base=None):
    """A ``build_fn`` for ``locnet.train.train`` that applies the screens of
    ``benchmarks/locnet_learning.py`` to ``locnet_single`` at the study's level and seeds:
    ``--spread-weight`` (the maps' spatial variance added to the loss) and ``--head-bias``
    (the initial bias of the maps' head). ``base``: the build_fn to start from (e.g. the
    warm start), else :func:`locnet.models.build_model`."""
    import numpy as np
    from locnet_learning import spread_model

    from locnet.models import build_model
    from locnet.models.single import SingleLocNet

    def build(method, method_cfg, grid):
        model = (base or build_model)(method, method_cfg, grid)
        if not isinstance(model, SingleLocNet):
            raise SystemExit(f"--spread-weight/--head-bias: {method} is not a single Loc-Net")
        if args.spread_weight:
            # the spread model's loss is the position loss and the variance alone
            if model.locnet.supervised:
                raise SystemExit("--spread-weight replaces the loss and would drop the map "
                                 "prior: run it with --set map_supervision.weight=0")
            weights = model.get_weights()
            model = spread_model(SingleLocNet, args.spread_weight).from_config(model.get_config())
            model.set_weights(weights)
        if args.head_bias:  # start every map near zero: the background holds little mass
            head = model.locnet.net.layers[-1]
            head.bias.assign(np.full(head.bias.shape, args.head_bias, dtype="float32"))
        return model

    return build


def run(args) -> dict:
    import pandas as pd

    import locnet

    locnet.job_threads(args.threads)
    from locnet import config as C
    from locnet import fileio, reference, seeds, split as splitmod
    from locnet import train as T
    from locnet.data import LandmarkDataset
    from locnet.inference import load_model_dir
    from locnet.pyramid import read_grid

    cfg = load_config(args.config or [str(ROOT / "config.yaml")], args.set)
    if args.epochs:
        set_key(cfg, f"methods.{args.method}.epochs", args.epochs)
    res = Path(args.results)
    split = splitmod.read_split(res / "data" / "split.csv")
    table = res / "data" / "landmarks.csv"
    dirs = {s: [res / "pyramid" / c for c in split.loc[split["subset"] == s, "case_id"]]
            for s in ("train", "val", "test")}
    grids = {d.name: read_grid(d) for d in res.joinpath("pyramid").iterdir() if d.is_dir()}
    ref = reference.mean_position_errors(fileio.read_landmarks(table), split, grids)
    ref_mm = reference.summary(ref[ref["landmark"].isin(cfg["landmarks"])])["mean_mm"]
    grid = C.model_grid(cfg)
    mc, tc = C.method_config(cfg, args.method), C.training_config(cfg, args.method)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # the study's own seed of this method and seed index (rule train's rule_seed)
        seed = seeds.derive(cfg["seed"], f"train/{args.method}/seed{args.seed}")
        build = _warm_start_build(args.warm_start.format(seed=args.seed)) if args.warm_start else None
        if args.spread_weight or args.head_bias:
            build = _screen_build(args, build)
        result = T.train(args.method, mc, tc, grid, cfg["landmarks"], dirs["train"], dirs["val"],
                         table, out_dir=Path(tmp) / "out", state_dir=Path(tmp) / "st",
                         seed=seed, build_fn=build)
        model = load_model_dir(Path(tmp) / "out").model
        levels = [int(c) for c in pd.Index(result["history"].columns)
                  .str.extract(r"^loss_level(\d+)$")[0].dropna()]
        test = LandmarkDataset(dirs["test"], sorted(set(model.input_levels)), table,
                               cfg["landmarks"], shuffle=False)
        ev = evaluate(model, test)
        if args.keep:
            import shutil

            shutil.copytree(Path(tmp) / "out", args.keep, dirs_exist_ok=True)
    row = {"label": args.label, "method": args.method, "seed": args.seed, "set": args.set,
           "epochs": int(tc["epochs"]), "kept_epoch": int(result["best_epoch"]),
           "val_mm": float(result["best_val_error_mm"]), "test_mm": ev["errors"]["position"],
           "reference_mm": float(ref_mm), "share": ev["errors"]["position"] / float(ref_mm),
           "slopes": ev["slopes"], "level_mm": {k: v for k, v in ev["errors"].items() if k != "position"},
           "loss_levels": levels, "seconds": round(time.perf_counter() - t0, 1)}
    row.update({k: getattr(args, k) for k in ("spread_weight", "head_bias") if getattr(args, k)})
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", required=True, help="a study's results folder (pyramid, split)")
    p.add_argument("--config", action="append", help="config files (default: config.yaml)")
    p.add_argument("--method", default="locnet_single")
    p.add_argument("--seed", type=int, default=0,
                   help="seed index: the study's seed of rule train for this method and index")
    p.add_argument("--epochs", type=int, default=0, help="0: the config's")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--label", default="")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keep", default=None, help="copy the trained model folder here")
    p.add_argument("--out", default=None, help="append the result as one JSON line here")
    p.add_argument("--warm-start", default=None, metavar="MODEL_DIR",
                   help="start the U-Net from a trained model's ('{seed}' becomes --seed), "
                        "e.g. RESULTS/models/heatmap_unet/seed{seed}")
    p.add_argument("--spread-weight", type=float, default=0.0,
                   help="locnet_single: add this x the maps' spatial variance (mm^2) to the loss")
    p.add_argument("--head-bias", type=float, default=0.0,
                   help="locnet_single: initial bias of the maps' 1x1x1 head (0: as built)")
    p.add_argument("--fit", action="store_true",
                   help="train each epoch with keras.Model.fit (epoch_loop.fit_epoch), as "
                        "locnet.train did before run_epoch (benchmarks/README.md, 'Epoch time')")
    args = p.parse_args(argv)
    if args.fit:
        import epoch_loop

        import locnet

        locnet.job_threads(args.threads)  # before TensorFlow is imported
        from locnet import train as T

        T.run_epoch = epoch_loop.fit_epoch
    row = run(args)
    line = json.dumps(row)
    print(line)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
