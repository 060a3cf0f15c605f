"""Where the patch baseline's error comes from: the cell it picks, or the displacement it reads.

    python benchmarks/patch_decoding.py --results RESULTS [--seeds 0 1 2]

``RESULTS`` is a finished study's results folder (its pyramids, split and
``models/patch_baseline/seed{s}``). For every kept patch model and for the validation and test
cases, prints the mean error of several ways to turn the cells' probabilities and
displacements into one position, and two diagnostics:

- ``shipped``: the model's own decoding (cells above ``cls_threshold``, else the most probable);
- ``argmax``: the most probable cell's estimate (cell centre + its displacement);
- ``near_p``: the estimates of the 3x3x3 cells around the most probable one, weighted by
  probability; ``near_mean``: the same unweighted;
- ``all_p``: every cell's estimate weighted by probability;
- ``true_cell``: the estimate of the cell that holds the landmark (an oracle: the error left
  if the classification were always right);
- ``hit_rate``: how often the most probable cell holds the landmark.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def outputs(model, dataset):
    """Logits, displacements, true positions and masks of every case of ``dataset``."""
    import numpy as np

    logits, disp, true, mask = [], [], [], []
    for i in range(len(dataset.case_dirs)):
        x, y = dataset.case_batch(i)
        out = model.predict_on_batch(dict(x))
        logits.append(np.asarray(out["logits"])[0])
        disp.append(np.asarray(out["displacement"])[0])
        true.append(y["position"][0])
        mask.append(y["mask"][0] > 0)
    return (np.stack(logits), np.stack(disp), np.stack(true).astype(np.float64),
            np.stack(mask))


def decodings(model, logits, disp, true) -> dict:
    """Positions (N, K, 3) of every decoding, keyed by name (module docstring)."""
    import numpy as np

    n, k = logits.shape[0], logits.shape[-1]
    prob = 1.0 / (1.0 + np.exp(-logits.reshape(n, -1, k)))  # (N, C, K)
    cand = model._cell_centres_mm[None, :, None, :] + disp.reshape(n, -1, k, 3)
    best = prob.argmax(1)  # (N, K)

    def weighted(w):
        return (w[..., None] * cand).sum(1) / w.sum(1)[..., None]

    grid = model._cell_index  # (C, 3)
    near = (np.abs(grid[None, :, None, :] - grid[best][:, None]).max(-1) <= 1).astype(float)
    holder = np.abs(model._cell_centres_mm[None, :, None, :] - true[:, None]).max(-1).argmin(1)
    return {
        "shipped": np.asarray(model.decode(logits, disp)),
        "argmax": np.take_along_axis(cand, best[:, None, :, None], 1)[:, 0],
        "near_p": weighted(near * prob),
        "near_mean": weighted(near),
        "all_p": weighted(prob),
        "true_cell": np.take_along_axis(cand, holder[:, None, :, None], 1)[:, 0],
    }, (best == holder)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import locnet

    locnet.job_threads(args.threads)
    import json

    import numpy as np

    from locnet import split as splitmod
    from locnet.data import LandmarkDataset
    from locnet.inference import load_model_dir

    res = Path(args.results)
    split = splitmod.read_split(res / "data" / "split.csv")
    rows: dict = {}
    for s in args.seeds:
        loaded = load_model_dir(res / "models" / "patch_baseline" / f"seed{s}")
        model, landmarks = loaded.model, loaded.metadata["landmarks"]
        for subset in ("val", "test"):
            dirs = [res / "pyramid" / c for c in split.loc[split["subset"] == subset, "case_id"]]
            ds = LandmarkDataset(dirs, sorted(set(model.input_levels)),
                                 res / "data" / "landmarks.csv", landmarks, shuffle=False)
            logits, disp, true, mask = outputs(model, ds)
            decoded, hit = decodings(model, logits, disp, true)
            for name, pos in decoded.items():
                err = np.linalg.norm(pos - true, axis=-1)[mask].mean()
                rows.setdefault(subset, {}).setdefault(name, []).append(float(err))
            rows[subset].setdefault("hit_rate", []).append(float(hit[mask].mean()))
    for subset, table in rows.items():
        for name, values in table.items():
            print(f"{subset:5s} {name:10s} " + " ".join(f"{v:7.3f}" for v in values)
                  + f"   mean {np.mean(values):.3f}")
    print(json.dumps({"seeds": args.seeds, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
