"""Epoch time of a method's training: ``keras.Model.fit`` per epoch against ``train.run_epoch``.

    python benchmarks/epoch_loop.py --results RESULTS --method heatmap_unet --epochs 20 \
        --threads 1 --out benchmarks/runs/epoch_loop_cpu_DATE.json

``RESULTS`` must hold a study's pyramids and split (``snakemake --until pyramid split``).
Trains the method twice as the workflow does (the config's blocks, the study's seed 0, the
split's training and validation cases), once with each epoch run by ``model.fit`` (what
``locnet.train`` did before) and once by ``locnet.train.run_epoch``, and records every
epoch's time (training and validation, as ``history.csv``'s ``time``) and whether the two
histories agree. Start two copies side by side to see the study's setting (two one-thread
jobs on a 2-core machine); times are only comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def fit_epoch(model, dataset, epoch: int, callbacks) -> None:
    """One epoch the way ``locnet.train`` ran it before ``run_epoch``."""
    model.fit(dataset, initial_epoch=epoch, epochs=epoch + 1, shuffle=False, verbose=0,
              callbacks=list(callbacks))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True)
    ap.add_argument("--config", nargs="*", default=None)
    ap.add_argument("--method", default="heatmap_unet")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import locnet

    locnet.job_threads(args.threads)
    import numpy as np

    from bench_config import load_config
    from locnet import config as C
    from locnet import seeds, split as splitmod
    from locnet import train as T

    cfg = load_config(args.config or [str(ROOT / "config.yaml")], [])
    res = Path(args.results)
    split = splitmod.read_split(res / "data" / "split.csv")
    dirs = {s: [res / "pyramid" / c for c in split.loc[split["subset"] == s, "case_id"]]
            for s in ("train", "val")}
    mc, tc = C.method_config(cfg, args.method), C.training_config(cfg, args.method)
    tc["epochs"] = args.epochs
    seed = seeds.derive(cfg["seed"], f"train/{args.method}/seed0")
    loop = T.run_epoch
    runs = {}
    for how, fn in (("fit", fit_epoch), ("run_epoch", loop)):
        T.run_epoch = fn
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            r = T.train(args.method, mc, tc, C.model_grid(cfg), cfg["landmarks"], dirs["train"],
                        dirs["val"], res / "data" / "landmarks.csv", out_dir=Path(tmp) / "o",
                        state_dir=Path(tmp) / "s", seed=seed)
        hist = r["history"]
        runs[how] = {"seconds": round(time.perf_counter() - t0, 1),
                     "epoch_s": [round(float(v), 3) for v in hist["time"][1:]],
                     "val_error_mm": [float(v) for v in hist["val_error_mm"]]}
    T.run_epoch = loop
    f, l = runs["fit"], runs["run_epoch"]
    summary = {
        "method": args.method, "epochs": args.epochs, "threads": args.threads,
        "train_cases": len(dirs["train"]), "val_cases": len(dirs["val"]),
        "median_epoch_s": {k: float(np.median(v["epoch_s"])) for k, v in runs.items()},
        "mean_epoch_s": {k: float(np.mean(v["epoch_s"])) for k, v in runs.items()},
        "epochs_over_9s": {k: int(np.sum(np.asarray(v["epoch_s"]) > 9.0)) for k, v in runs.items()},
        "ratio_mean_run_epoch_to_fit": float(np.mean(l["epoch_s"]) / np.mean(f["epoch_s"])),
        "same_validation_errors": bool(np.allclose(f["val_error_mm"], l["val_error_mm"],
                                                   rtol=1e-6, atol=1e-6, equal_nan=True)),
        "runs": runs,
    }
    text = json.dumps(summary, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
