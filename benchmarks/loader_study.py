"""What reading boxes (``training.loader.crop``) changes in a study's chain trainings.

    python benchmarks/loader_study.py --config config.yaml config/tiny.yaml --results RESULTS

A crop counts as beyond its box when it reads a voxel outside the box and inside the level
(from the map prior's ``origin{l}`` outputs, so only with ``map_supervision`` on). ``RESULTS``
must hold the study's pyramids and split (``snakemake --until pyramid split``).
For each multi-scale chain and ``--seeds``, trains it twice as the workflow does (the config's
method and training blocks, the training and validation cases of the split), with boxes and
with whole levels, and compares the histories and the kept weights. It also counts how often
a crop reads beyond its box (where it sees ``background`` instead of the image): for every
training case, the training-mode forward (noise seeded alike) on the box batch and on the
whole-level batch, at the initial and at the kept weights; a case counts when an annotated
landmark's output differs by more than 1e-4 (mm, or map value).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

CHAINS = ("multiscale_multistep", "multiscale_e2e", "multiscale_e2e_noise")


def count_beyond(model, out: dict, boxed, i: int, valid) -> tuple[int, int]:
    """``(crops, crops beyond their box)`` of case ``i``'s annotated landmarks, from the map
    prior's ``origin{l}`` of the training outputs ``out`` on whole levels."""
    import numpy as np

    crops = beyond = 0
    for l, box in boxed.boxes.items():
        if f"origin{l}" not in out:
            continue
        origin = np.asarray(out[f"origin{l}"])[0][valid]
        first, last = np.floor(origin), np.floor(origin + model.patch - 1) + 1
        lo = boxed.box_corner(i, l)
        hi = lo + np.asarray(box["shape"])
        size = model.level_size(l)
        reach_out = ((first < lo) & (lo > 0)) | ((last >= hi) & (hi < size))
        crops += len(first)
        beyond += int(reach_out.any(axis=-1).sum())
    return crops, beyond


def crop_watch(dirs, levels, table, landmarks, boxes, seed: int):
    """A callback that counts, before every training step, the step's crops that reach beyond
    their boxes: a training forward on the step's case with whole levels, the random states
    put back afterwards so the step draws the same noise."""
    import keras

    from locnet import seeds
    from locnet import train as T
    from locnet.data import LandmarkDataset

    class CropWatch(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.crops = self.beyond = 0
            kw = dict(shuffle=True, seed=seeds.derive(seed, "data"), readahead=False)
            self.whole = LandmarkDataset(dirs, levels, table, landmarks, **kw)
            self.boxed = LandmarkDataset(dirs, levels, table, landmarks, boxes=boxes, **kw)

        def on_epoch_begin(self, epoch, logs=None):
            self.whole.set_epoch(epoch)
            self.boxed.set_epoch(epoch)

        def on_train_batch_begin(self, batch, logs=None):
            states = [(v, v.numpy()) for v in T._seed_state_variables(self.model)]
            x, y = self.whole[batch]
            out = self.model(x, training=True)
            for v, value in states:
                v.assign(value)
            i = int(self.whole._order[batch])
            c, b = count_beyond(self.model, out, self.boxed, i, y["mask"][0] > 0)
            self.crops, self.beyond = self.crops + c, self.beyond + b

    return CropWatch()


def beyond_box(model, whole, boxed, seed: int) -> dict:
    """Training cases whose training forward differs between boxes and whole levels."""
    import keras
    import numpy as np

    from locnet import train as T

    def forward(x):
        T.reseed(model, seed, 0, "train")
        return {k: keras.ops.convert_to_numpy(v) for k, v in model(x, training=True).items()}

    n, differ, worst, crops, beyond = len(whole.case_dirs), 0, 0.0, 0, 0
    for i in range(n):
        (xw, y), (xb, _) = whole.case_batch(i), boxed.case_batch(i)
        a, b, valid = forward(xw), forward(xb), y["mask"][0] > 0
        c, o = count_beyond(model, a, boxed, i, valid)
        crops, beyond = crops + c, beyond + o
        diff = 0.0
        for key in a:
            sel = (slice(None),) * 4 + (valid,) if key.startswith("logits") else (slice(None), valid)
            diff = max(diff, float(np.abs(a[key][sel] - b[key][sel]).max()))
        differ += diff > 1e-4
        worst = max(worst, float(np.abs(a["position"] - b["position"])[0][valid].max()))
    return {"cases": n, "cases_differing": int(differ), "max_position_diff_mm": worst,
            "crops": crops, "crops_beyond_box": beyond}


def compare(config: dict, results: Path, method: str, seed: int, work: Path,
            epochs: int | None = None) -> dict:
    import keras
    import numpy as np
    import pandas as pd

    from locnet import config as C
    from locnet import split as S
    from locnet import train as T
    from locnet.data import LandmarkDataset

    subsets = S.read_split(results / "data" / "split.csv")
    dirs = {s: [results / "pyramid" / c for c in subsets.loc[subsets.subset == s, "case_id"]]
            for s in ("train", "val")}
    mcfg, tcfg = C.method_config(config, method), C.training_config(config, method)
    if epochs:
        tcfg["epochs"] = int(epochs)
    grid, landmarks = C.model_grid(config), list(config["landmarks"])
    table = results / "data" / "landmarks.csv"
    out = {}
    for crop in (True, False):
        cfg = {**tcfg, "loader": {**T.loader_config(tcfg), "crop": crop}}
        name = f"{method}-{seed}-{'boxes' if crop else 'whole'}"
        watch = []
        if crop:
            model = T._build_model(method, mcfg, grid, landmarks, seed, T._default_build)
            probe = LandmarkDataset(dirs["train"], model.input_levels, table, landmarks,
                                    shuffle=False)
            boxes = T.training_boxes(model, probe, cfg)
            watch = [crop_watch(dirs["train"], model.input_levels, table, landmarks, boxes,
                                seed)]
        res = T.train(method, mcfg, cfg, grid, landmarks, dirs["train"], dirs["val"], table,
                      work / name / "out", work / name / "state", seed, callbacks=watch)
        if watch:
            res["crops during training"] = {"crops": watch[0].crops,
                                            "beyond_box": watch[0].beyond}
        model = keras.models.load_model(work / name / "out" / "model.keras", compile=False)
        out[crop] = (res, model, cfg)
    (res_b, model_b, cfg_b), (res_w, model_w, _) = out[True], out[False]
    hist_b, hist_w = (r["history"].drop(columns=["time"]) for r in (res_b, res_w))
    diff = {c: float(np.nanmax(np.abs(hist_b[c] - hist_w[c]))) for c in hist_b.columns
            if c in hist_w.columns and pd.api.types.is_numeric_dtype(hist_b[c])}
    weights = max(float(np.abs(a.numpy() - b.numpy()).max())
                  for a, b in zip(model_b.weights, model_w.weights))
    whole = LandmarkDataset(dirs["train"], model_b.input_levels, table, landmarks, shuffle=False)
    boxes = T.training_boxes(model_b, whole, cfg_b)
    boxed = LandmarkDataset(dirs["train"], model_b.input_levels, table, landmarks,
                            shuffle=False, boxes=boxes)
    fresh = T._build_model(method, mcfg, grid, landmarks, seed, T._default_build)
    return {
        "boxes": {str(l): b for l, b in (boxes or {}).items()},
        "val_error_mm": {"boxes": hist_b.val_error_mm.tolist(),
                         "whole": hist_w.val_error_mm.tolist()},
        "best_epoch": {"boxes": res_b["best_epoch"], "whole": res_w["best_epoch"]},
        "max_history_diff": diff,
        "max_weight_diff": weights,
        "crops_during_training": res_b.get("crops during training"),
        "beyond_box_initial": beyond_box(fresh, whole, boxed, seed),
        "beyond_box_kept": beyond_box(model_b, whole, boxed, seed),
    }


def merged_config(paths) -> dict:
    """The config files layered as Snakemake's ``--configfile`` does (dicts merged key by key,
    later files win), validated."""
    from locnet import config as C

    def update(into: dict, new: dict) -> dict:
        for k, v in new.items():
            into[k] = update(dict(into.get(k) or {}), v) if isinstance(v, dict) else v
        return into

    out: dict = {}
    for path in paths:
        update(out, C.load_yaml(path))
    return C.validate(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", nargs="+", required=True, help="config files, layered")
    p.add_argument("--results", required=True)
    p.add_argument("--methods", nargs="+", default=list(CHAINS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=None, help="instead of the config's")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    config = merged_config(args.config)
    res = {}
    with tempfile.TemporaryDirectory(prefix="locnet_loader_study_") as work:
        for method in args.methods:
            for seed in args.seeds:
                r = compare(config, Path(args.results), method, seed, Path(work), args.epochs)
                res[f"{method} seed {seed}"] = r
                print(f"{method} seed {seed}: boxes {r['boxes']}\n  val error (boxes) "
                      f"{r['val_error_mm']['boxes']}\n  val error (whole) "
                      f"{r['val_error_mm']['whole']}\n  max weight diff {r['max_weight_diff']:.3g}"
                      f", during training {r['crops_during_training']}"
                      f", beyond box: initial {r['beyond_box_initial']}, kept "
                      f"{r['beyond_box_kept']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
