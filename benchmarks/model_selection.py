"""How much does the model-selection rule change the test error? Smoothed window vs best epoch.

Re-trains runs of a finished study (``--results``: the models' ``metadata.json`` give the
method and training config, grid, landmarks, seed and case lists) with ``locnet.train.train``,
adding a callback that records the mean test error after every epoch. Training is
deterministic on the CPU, so the validation curve equals the study's own ``history.csv``
(checked and printed). From one training per run every rule can then be scored offline:

* ``window w`` (``locnet.train.select_epoch``): the epoch with the lowest validation error
  averaged over a centred window of ``w`` epochs; ``w = 1`` is "best single epoch";
* ``last``: the last epoch;
* ``oracle``: the epoch with the lowest *test* error (not a rule: the floor any rule could reach).

The test error is never used to select anything. Output: one row per run and rule (kept
epoch, validation and test error) in ``benchmarks/runs/model_selection.csv``, and a summary
per rule: mean test error over the runs and its mean difference to ``window 1``.

    .venv/bin/python benchmarks/model_selection.py --results results \
        --methods locnet_single multiscale_e2e multiscale_e2e_noise --seeds 0 1 2
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

OUT = Path(__file__).resolve().parent / "runs" / "model_selection.csv"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="results")
    p.add_argument("--methods", nargs="+",
                   default=["locnet_single", "multiscale_e2e", "multiscale_e2e_noise"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--windows", nargs="+", type=int, default=[1, 3, 5, 7])
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)

    import keras
    import numpy as np
    import pandas as pd

    from locnet import split as splitmod
    from locnet import train as T
    from locnet.data import LandmarkDataset, model_levels

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    res = Path(args.results)
    table = pd.read_csv(res / "data" / "landmarks.csv")
    split = splitmod.read_split(res / "data" / "split.csv")
    test_cases = list(split.loc[split["subset"] == "test", "case_id"])
    pyr = res / "pyramid"

    class TestError(keras.callbacks.Callback):
        """Mean test error after each epoch (recorded only; selects nothing)."""

        def __init__(self, landmarks):
            super().__init__()
            self.landmarks = landmarks
            self.errors = {}
            self.dataset = None

        def on_epoch_end(self, epoch, logs=None):
            if self.dataset is None:
                self.dataset = LandmarkDataset([pyr / c for c in test_cases],
                                               model_levels(self.model), table, self.landmarks,
                                               shuffle=False)
            self.errors[epoch + 1] = T.mean_error_mm(*T.predict_dataset(self.model,
                                                                         self.dataset))

    rows = []
    for method in args.methods:
        for seed in args.seeds:
            run_dir = res / "models" / method / f"seed{seed}"
            meta = json.loads((run_dir / "metadata.json").read_text())
            study_hist = pd.read_csv(run_dir / "history.csv")
            cb = TestError(meta["landmarks"])
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                out = T.train(method, meta["method_cfg"], meta["train_cfg"], meta["grid"],
                              meta["landmarks"], [pyr / c for c in meta["train_cases"]],
                              [pyr / c for c in meta["val_cases"]], table, Path(tmp) / "out",
                              Path(tmp) / "state", meta["seed"], callbacks=[cb])
            hist = out["history"]
            val = hist["val_error_mm"].to_numpy(float)
            same = np.allclose(val, study_hist["val_error_mm"].to_numpy(float), rtol=1e-4)
            test = np.array([np.nan] + [cb.errors[e] for e in range(1, len(val))])
            total = len(val) - 1
            bounds = meta.get("phases")

            def phase_range(e, bounds=bounds, total=total):
                if not bounds:
                    return (1, total)
                for a, b in bounds:
                    if a < e <= b:
                        return (a + 1, b)
                return (1, total)

            picks = {f"window {w}": T.select_epoch(val, w, phase_range)[0] for w in args.windows}
            picks["last"] = total
            picks["oracle"] = 1 + int(np.nanargmin(test[1:]))
            print(f"{method} seed {seed}: {time.perf_counter() - t0:.0f} s, validation curve "
                  f"{'equals' if same else 'DIFFERS FROM'} the study's; kept "
                  + ", ".join(f"{k} -> {e} ({test[e]:.2f} mm)" if e > 0 else f"{k} -> 0"
                              for k, e in picks.items()), flush=True)
            for rule, e in picks.items():
                rows.append({"method": method, "seed": seed, "rule": rule, "epoch": e,
                             "val_error_mm": val[e], "test_error_mm": test[e] if e > 0 else
                             np.nan, "same_as_study": same})
    df = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    base = df[df["rule"] == "window 1"].set_index(["method", "seed"])["test_error_mm"]
    summary = []
    for rule, g in df.groupby("rule", sort=False):
        d = g.set_index(["method", "seed"])["test_error_mm"] - base
        summary.append({"rule": rule, "runs": len(g), "mean test error (mm)": g["test_error_mm"].mean(),
                        "mean change vs window 1 (mm)": d.mean(),
                        "runs better / worse than window 1": f"{int((d < 0).sum())} / {int((d > 0).sum())}",
                        "optimism: mean test - validation error at the kept epoch (mm)":
                            (g["test_error_mm"] - g["val_error_mm"]).mean()})
    summary = pd.DataFrame(summary)
    print("| " + " | ".join(summary.columns) + " |")
    print("|" + "|".join(":---" if c == "rule" else "---:" for c in summary.columns) + "|")
    for r in summary.itertuples(index=False):
        print("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r) + " |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
