"""The two estimators of the noisy passes side by side on a trained model: time and quality.

``estimator="exact"`` (the paper's, the study's default) runs the finest Loc-Net once per pass
and landmark on that pass's shifted patch; ``estimator="window"`` runs it once per landmark on a
window holding every shifted patch and cuts each pass from that one output map
(:class:`locnet.models.WindowStage`). This script predicts the validation and test cases of a
finished study with the trained ``multiscale_e2e_noise`` model both ways, with the same shifts,
and reports per estimator, over the validation and test cases together (all held out from
training): the time per case and its ratio to one noise-free forward pass, the error of the
mean prediction, the correlation of the confidence volume with the error
(Pearson as the paper, Spearman), the AUROC of the volume for errors above the threshold, and
how closely the two estimators' volumes agree (Spearman rho, median ratio).

Usage (after the default study, or any study with ``multiscale_e2e_noise``)::

    .venv/bin/python benchmarks/compare_estimators.py --results results [--json out.json]
    .venv/bin/python benchmarks/compare_estimators.py --subsets train,val,test   # all cases

The prediction tables of both estimators go to ``--out`` (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

METHOD = "multiscale_e2e_noise"


def _timed_predictions(model, cases, subsets, landmarks_csv, landmarks, passes, seed, estimator):
    from locnet import data, models, study_predict

    # one warm-up case compiles the stages; the timed run then covers every case
    inputs = data.load_case_inputs(cases[0], data.model_levels(model))
    study_predict.predict_arrays(model, inputs, passes, seed, estimator=estimator)
    t = time.perf_counter()
    table = study_predict.predict_cases(model, cases, subsets, landmarks_csv, landmarks, passes=passes,
                                  seed=seed, progress=False, estimator=estimator)
    per_case = (time.perf_counter() - t) / len(cases)
    # noise-free forward alone, for the ratio
    t = time.perf_counter()
    for case in cases:
        models.predict_position(model, data.load_case_inputs(case, data.model_levels(model)))
    forward = (time.perf_counter() - t) / len(cases)
    return table, per_case, forward


def compare(results: Path, passes: int, seed: int, threshold: float, out: Path,
            subsets_used=("val", "test")) -> dict:
    import keras
    import numpy as np
    import scipy.stats as sps

    import locnet.models  # noqa: F401  (registers the custom layers)
    from locnet import fileio, stats
    from locnet import split as splitmod

    model_path = results / "models" / METHOD / "model.keras"
    if not model_path.is_file():
        raise SystemExit(f"no trained {METHOD} model at {model_path}: run the study first")
    model = keras.saving.load_model(model_path)
    split = splitmod.read_split(results / "data" / "split.csv")
    split = split[split["subset"].isin(list(subsets_used))]
    cases = [results / "pyramid" / c for c in split["case_id"]]
    subsets = dict(zip(split["case_id"], split["subset"]))
    landmarks_csv = results / "data" / "landmarks.csv"
    landmarks = list(model.landmarks)
    res: dict = {"passes": passes, "cases": len(cases), "subsets": list(subsets_used),
                 "model": str(model_path),
                 "threshold_mm": threshold, "estimators": {}}
    tables = {}
    for estimator in ("exact", "window"):
        table, per_case, forward = _timed_predictions(
            model, cases, subsets, landmarks_csv, landmarks, passes, seed, estimator)
        fileio.write_csv_atomic(table, out / f"{METHOD}_{estimator}.csv")
        tables[estimator] = table
        # the chosen subsets together (default validation and test: both held out from
        # training; the default study has only 8 test cases)
        corr = stats.confidence_correlation(table, None)
        vol = stats.volumes_of(table).to_numpy(float)
        err = table["error_mm"].to_numpy(float)
        ok = np.isfinite(err)
        res["estimators"][estimator] = {
            "seconds_per_case": per_case, "forward_seconds_per_case": forward,
            "ratio_to_forward": per_case / forward,
            "error_mean_mm": float(np.nanmean(err)),
            "error_median_mm": float(np.nanmedian(err)),
            "median_volume_mm3": float(np.nanmedian(vol)),
            "pearson_r": corr["pearson_r"], "spearman_rho": corr["spearman_rho"],
            "spearman_p": corr["spearman_p"],
            "auroc_large_error": stats.auroc(vol[ok], err[ok] > threshold),
            "large_errors": int((err[ok] > threshold).sum()), "n": int(ok.sum()),
        }
    ve = stats.volumes_of(tables["exact"]).to_numpy(float)
    vw = stats.volumes_of(tables["window"]).to_numpy(float)
    rho = sps.spearmanr(ve, vw)
    res["agreement"] = {
        "spearman_rho_volumes": float(rho.statistic),
        "median_volume_ratio_window_to_exact": float(np.median(vw / ve)),
        "max_mean_position_difference_mm": float(np.abs(
            tables["exact"][["x", "y", "z"]].to_numpy(float)
            - tables["window"][["x", "y", "z"]].to_numpy(float)).max()),
    }
    return res


def report(res: dict) -> None:
    print(f"# noisy-pass estimators, {res['passes']} passes, {res['cases']} cases "
          f"({'+'.join(res['subsets'])})\n")
    print(f"model: {res['model']}\n")
    print("| estimator | s per case | ratio to one forward | error mean / median (mm) | "
          "median volume (mm^3) | Pearson r (volume, error) | Spearman rho | "
          f"AUROC error > {res['threshold_mm']:g} mm |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in res["estimators"].items():
        print(f"| {name} | {r['seconds_per_case']:.3f} | {r['ratio_to_forward']:.1f}x | "
              f"{r['error_mean_mm']:.2f} / {r['error_median_mm']:.2f} | "
              f"{r['median_volume_mm3']:.3g} | {r['pearson_r']:.3f} | {r['spearman_rho']:.3f} "
              f"(p {r['spearman_p']:.2g}) | {r['auroc_large_error']:.3f} "
              f"({r['large_errors']} of {r['n']}) |")
    a = res["agreement"]
    print(f"\nvolumes, window vs exact: Spearman rho {a['spearman_rho_volumes']:.3f}, "
          f"median ratio {a['median_volume_ratio_window_to_exact']:.3g}; mean positions differ "
          f"by at most {a['max_mean_position_difference_mm']:.2f} mm")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=ROOT / "results")
    p.add_argument("--passes", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=5.0, help="large error (mm) for the AUROC")
    p.add_argument("--out", type=Path, default=None, help="folder for both prediction tables")
    p.add_argument("--subsets", default="val,test",
                   help="comma-separated subsets of the split to predict (train, val, test)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="locnet-estimators-"))
    out.mkdir(parents=True, exist_ok=True)
    res = compare(args.results, args.passes, args.seed, args.threshold, out,
                  tuple(args.subsets.split(",")))
    res["tables"] = str(out)
    report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
