"""The ``locnet`` command line: landmarks on new scans with a trained model.

``locnet predict --model MODEL_DIR --out OUT scans/*.nii.gz`` (or ``--manifest CSV``) writes

* ``OUT/landmarks.csv`` and ``OUT/landmarks.json``: one record per scan and landmark
  (world RAS and LPS mm, fractional voxel index in the original scan, uncertainty, quality);
* ``OUT/{case}.mrk.json``: a 3D Slicer markups point list (LPS mm) per scan;
* ``OUT/{case}_overlay.png``: orthogonal slices through each landmark with its 90% ellipse.

Exit status: 0 when every scan succeeded (a scan flagged ``atypical`` for its intensities
counts as answered), 1 when at least one scan failed (each failure is printed to stderr as
``case: reason``; the other scans are still written), 2 for a usage error, an unusable model
folder or an output folder that cannot be written (checked before any scan is computed).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Sequence

EXIT_OK, EXIT_SCAN_FAILED, EXIT_USAGE = 0, 1, 2

_EPILOG = """\
example:
  locnet predict --model results/models/multiscale_e2e_noise --out landmarks_out \\
      scans/*.nii.gz
  locnet predict --model results/models/multiscale_e2e_noise --out landmarks_out \\
      --manifest new_scans.csv --passes 100 --seed 1 --threshold 2000

coordinates: world RAS mm (NIfTI/nibabel convention) and LPS mm (DICOM/ITK: x and y
negated) in landmarks.csv/json; the Slicer markups files are in LPS. i,j,k are fractional
voxel indices of the original scan (voxel centres; world = affine @ [i, j, k, 1]).

intensity check: each scan's mean, sd and foreground fraction (coarsest level of the
normalised model input) are compared with the training cases' (MODEL_DIR/metadata.json);
one far outside their range (outside [min, max] and more than 5 robust sd from the median)
is answered but flagged 'atypical' (column 'intensity', a warning on stderr). A scan with
no content (one value everywhere, or nothing inside the intensity window) is refused.

exit status: 0 all scans done (also when some are flagged); 1 some scans failed (one
'case: reason' line each on stderr, the other scans are written); 2 usage error, unusable
model folder, or --out not a writable folder (checked before any scan is computed).
"""


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _fraction(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {v}")
    return v


def _nonneg_float(text: str) -> float:
    v = float(text)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="locnet",
        description="Multi-scale Loc-Net landmark detection: apply a trained model to new scans.",
        epilog="run 'locnet predict --help' for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "predict",
        help="predict landmarks on new NIfTI scans",
        description=textwrap.fill(
            "Predict the model's landmarks on new NIfTI scans (.nii/.nii.gz, any orientation "
            "and spacing). Each scan is preprocessed exactly as the model's training data, "
            "with the grid, intensity window and background stored in MODEL_DIR/metadata.json. "
            "For the noisy model (multiscale_e2e_noise) the prediction is the mean of --passes "
            "randomly shifted passes; their per-axis sd gives the 90% confidence volume and a "
            "quality flag ('ok' / 'review').", width=78),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scans", nargs="*", metavar="SCAN",
                   help="NIfTI scans; the case id is the file name without .nii/.nii.gz")
    p.add_argument("--model", required=True, metavar="MODEL_DIR",
                   help="trained model folder holding model.keras and metadata.json "
                        "(e.g. results/models/multiscale_e2e_noise); quality.json is used "
                        "for the default --threshold when present")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="output folder (created if missing; an existing file is refused): "
                        "landmarks.csv, landmarks.json, {case}.mrk.json, {case}_overlay.png")
    p.add_argument("--manifest", metavar="CSV",
                   help="CSV with columns case_id,image (relative image paths are relative "
                        "to the CSV's folder); may be combined with SCAN arguments")
    p.add_argument("--passes", type=_positive_int, default=None, metavar="N",
                   help="noisy test-time passes for the noisy model (default: the study's, "
                        "recorded in MODEL_DIR/quality.json, else the model metadata's value, "
                        "else 50; 0 = one noise-free pass, no uncertainty); ignored for models "
                        "without test-time noise")
    p.add_argument("--estimator", choices=("exact", "window"), default=None,
                   help="how the noisy passes are computed: 'exact' runs the finest Loc-Net on "
                        "every shifted patch (the paper's way), 'window' once per landmark on a "
                        "window holding them all, cutting each pass from its output (50 passes "
                        "in 1.8-3x one forward pass instead of 15x at the paper's scale, "
                        "measured on a 2-core CPU; a different estimator). Default: the one "
                        "MODEL_DIR/quality.json was chosen with, else 'exact'")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="seed of the test-time noise; each scan's draws derive from "
                        "(S, case id), so results do not depend on the scan order (default: "
                        "the seed of the study's own predictions, recorded in "
                        "MODEL_DIR/quality.json, so a study scan gets the study's numbers; "
                        "else 0)")
    p.add_argument("--threshold", type=_nonneg_float, default=None, metavar="MM3",
                   help="quality threshold on the 90%% confidence volume (mm^3): 'ok' when the "
                        "volume is <= MM3, else 'review'. Default: threshold_mm3 of "
                        "MODEL_DIR/quality.json (chosen on the validation set as the largest "
                        "volume below which the validation errors stay within the target error "
                        "for the target fraction of landmarks); without either, no flag")
    p.add_argument("--min-coverage", type=_fraction, default=None, metavar="F",
                   help="least fraction of the model's field of view (its grid cube, centred "
                        "on the scan) that the scan must cover; a scan covering less is "
                        "refused as outside the trained field of view (default 0.5)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads for resampling (default: all usable cores)")
    p.add_argument("--no-overlay", action="store_true",
                   help="do not write the {case}_overlay.png images")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _scan_list(args, parser) -> list[tuple[str, Path]]:
    from .inference import case_id_from_path
    from .io import InputError, read_manifest

    items: list[tuple[str, Path]] = []
    if args.manifest:
        try:
            man = read_manifest(args.manifest)
        except InputError as exc:
            parser.error(" ".join(str(exc).split()))
        items += [(str(c), Path(p)) for c, p in zip(man["case_id"], man["image"])]
    items += [(case_id_from_path(s), Path(s)) for s in args.scans]
    if not items:
        parser.error("no scans given (SCAN arguments or --manifest)")
    seen: dict[str, Path] = {}
    for case, path in items:
        if case in seen:
            parser.error(f"duplicate case id {case!r} ({seen[case]} and {path}); use a "
                         "--manifest to name the cases")
        seen[case] = path
    return items


def _json_value(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if hasattr(v, "item"):
        v = v.item()
        return None if isinstance(v, float) and math.isnan(v) else v
    return v


def _out_problem(out: Path) -> str | None:
    """Why ``out`` cannot be the output folder (``None`` when it can): it is an existing file,
    cannot be created, or is not writable. Creates the folder."""
    if out.exists() and not out.is_dir():
        return f"--out {out}: exists and is not a folder"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"--out {out}: cannot create the folder ({exc.strerror or exc})"
    try:
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"--out {out}: the folder is not writable ({exc.strerror or exc})"
    return None


def predict_command(args, parser) -> int:
    import pandas as pd
    from tqdm import tqdm

    from . import inference, quality, slicer
    from .io import write_csv_atomic, write_json_atomic

    scans = _scan_list(args, parser)
    out = Path(args.out)
    problem = _out_problem(out)  # before anything is computed
    if problem:
        print(f"locnet: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        lm = inference.load_model_dir(args.model)
    except (inference.ModelDirError, ValueError) as exc:
        print(f"locnet: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    threshold = args.threshold if args.threshold is not None else lm.threshold_mm3
    passes = lm.default_passes if args.passes is None else args.passes
    min_cov = inference.DEFAULT_MIN_COVERAGE if args.min_coverage is None else args.min_coverage
    seed = args.seed if args.seed is not None else lm.study_seed
    seed_source = ("--seed" if args.seed is not None else
                   "quality.json" if seed is not None else "default")
    seed = inference.DEFAULT_SEED if seed is None else seed
    estimator = args.estimator or lm.estimator
    if (lm.noisy and passes > 1 and args.threshold is None and threshold is not None
            and estimator != lm.estimator):
        print(f"locnet: warning: the quality threshold of {lm.model_dir / 'quality.json'} was "
              f"chosen with the {lm.estimator!r} estimator, these passes use {estimator!r}: "
              "their confidence volumes differ, so the flags may not mean what the threshold "
              "promises", file=sys.stderr)
    if lm.noisy and threshold is None and passes > 1 and not args.quiet:
        print(f"locnet: note: no --threshold and no {lm.model_dir / 'quality.json'}: "
              "the quality column stays empty", file=sys.stderr)
    if lm.noisy and passes > 0 and seed_source == "default":
        print(f"locnet: note: {lm.model_dir / 'quality.json'} records no noise seed of the "
              f"study's predictions: using seed {seed}, so study scans will not get the "
              "study's numbers exactly", file=sys.stderr)
    if lm.intensity is None:
        print(f"locnet: note: {lm.model_dir / 'metadata.json'} has no intensity summary of the "
              "training cases (a model trained before it was recorded): scans are not "
              "compared with the training cohort's intensities", file=sys.stderr)

    rows, cases, failed = [], [], []
    bar = tqdm(scans, desc="scans", unit="scan", disable=args.quiet, file=sys.stderr)
    for case, path in bar:
        bar.set_postfix_str(case, refresh=False)
        try:
            res = inference.predict_scan(lm, path, case, passes=passes, seed=seed,
                                         threshold_mm3=threshold, min_coverage=min_cov,
                                         threads=args.threads, estimator=estimator)
            if res.intensity_outliers:
                tqdm.write(f"{case}: warning: intensities atypical of the training cases: "
                           f"{'; '.join(res.intensity_outliers)} ({path})", file=sys.stderr)
            descriptions = []
            for r in res.rows():
                d = f"locnet {lm.method}"
                if not math.isnan(r["conf_volume_mm3"]):
                    d += (f"; sd {r['sd_x']:.2f},{r['sd_y']:.2f},{r['sd_z']:.2f} mm; 90% volume "
                          f"{r['conf_volume_mm3']:.0f} mm3")
                if r["quality"]:
                    d += f"; quality {r['quality']}"
                if r["intensity"] == inference.ATYPICAL:
                    d += "; intensities atypical of the training cases"
                descriptions.append(d)
            slicer.write_markups(out / f"{case}.mrk.json", res.landmarks, res.world, descriptions)
            if not args.no_overlay:
                inference.write_overlay(res, out / f"{case}_overlay.png")
        except inference.ScanError as exc:
            failed.append({"case_id": case, "image": str(path), "reason": str(exc)})
            tqdm.write(f"{case}: {exc}", file=sys.stderr)
            continue
        except Exception as exc:  # an unexpected failure must not stop the other scans
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            failed.append({"case_id": case, "image": str(path), "reason": reason})
            tqdm.write(f"{case}: {reason}", file=sys.stderr)
            continue
        case_rows = res.rows()
        rows += case_rows
        cases.append({
            "case_id": case, "image": str(path), "field_of_view_coverage": res.coverage,
            "grid_origin_ras_mm": list(res.grid.origin),
            "intensity": {"flag": res.intensity_flag or None, "statistics": res.intensity,
                          "outside_training_range": res.intensity_outliers},
            "landmarks": {r["landmark"]: {k: _json_value(v) for k, v in r.items()
                                          if k not in ("case_id", "image", "landmark")}
                          for r in case_rows},
        })
    bar.close()

    columns = ["case_id", "image", "landmark", "x_ras", "y_ras", "z_ras", "x_lps", "y_lps",
               "z_lps", "i", "j", "k", "sd_x", "sd_y", "sd_z", "conf_volume_mm3",
               "conf_volume_calibrated_mm3", "quality", "intensity"]
    summary = lm.intensity
    doc = {
        "model": str(lm.model_dir), "method": lm.method, "landmarks": lm.landmarks,
        "preprocessing": lm.params, "noisy": lm.noisy,
        "passes": passes if lm.noisy else 0, "seed": seed, "seed_source": seed_source,
        "sd_scale": lm.sd_scale,
        "estimator": estimator if lm.noisy and passes > 0 else None,
        "confidence": lm.confidence, "quality_threshold_mm3": threshold,
        "min_coverage": min_cov,
        "intensity_check": None if summary is None else {
            "training": summary, "margin_robust_sd": quality.INTENSITY_MARGIN,
            "min_robust_sd": quality.MIN_SPREAD,
            "rule": "a statistic is atypical when it lies outside the training cases' "
                    "[min, max] and more than margin_robust_sd robust sds (at least "
                    "min_robust_sd) from their median"},
        "coordinates": {"ras": "world RAS mm (x_ras, y_ras, z_ras)",
                        "lps": "world LPS mm = RAS with x and y negated",
                        "voxel": "fractional index (i, j, k) of the original scan, "
                                 "world = affine @ [i, j, k, 1]",
                        "markups": "OUT/{case}.mrk.json, LPS mm"},
        "cases": cases, "failed": failed,
    }
    try:
        write_csv_atomic(pd.DataFrame(rows, columns=columns), out / "landmarks.csv", na_rep="")
        write_json_atomic(doc, out / "landmarks.json")
    except OSError as exc:
        print(f"locnet: error: cannot write the results to {out}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if failed:
        print(f"locnet: {len(failed)} of {len(scans)} scan(s) failed", file=sys.stderr)
        return EXIT_SCAN_FAILED
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "predict":
        return predict_command(args, _subparser(parser, "predict"))
    return EXIT_USAGE  # pragma: no cover


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    return parser  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
