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
import os
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Sequence

EXIT_OK, EXIT_SCAN_FAILED, EXIT_USAGE = 0, 1, 2

_EPILOG = """\
example:
  locnet predict --model results/models/multiscale_e2e_noise/seed0 --out landmarks_out \\
      scans/*.nii.gz
  locnet predict --model results/models/multiscale_e2e_noise/seed0 --out landmarks_out \\
      --manifest new_scans.csv --passes 100 --seed 1 --threshold 2000

coordinates: world RAS mm (NIfTI/nibabel convention) and LPS mm (DICOM/ITK: x and y
negated) in landmarks.csv/json; the Slicer markups files are in LPS. i,j,k are fractional
voxel indices of the original scan (voxel centres; world = affine @ [i, j, k, 1]).

intensity check: each scan's mean, sd and foreground fraction (coarsest level of the
normalised model input) are compared with the training cases' (MODEL_DIR/metadata.json);
one far outside their range (outside [min, max] and more than 5 robust sd from the median)
is answered but flagged 'atypical' (column 'intensity', a warning on stderr), and its
landmarks' quality is 'review' whatever their volumes. A scan with no content (one value
everywhere, or nothing inside the intensity window) is refused.

case ids: an ASCII letter or digit, then up to 99 letters, digits, '_', '.' or '-' (as in
the study's ingest); ids from file names are checked too. A bad or repeated id, or an empty
cell of --manifest, is a usage error: all of them are listed, nothing is computed.

--out: an existing folder that is not empty is refused, unless --overwrite is given; then
the files of the previous run there (landmarks.csv/json and the per-case files of the cases
its landmarks.json lists) are removed first, and nothing else.

exit status: 0 all scans done (also when some are flagged); 1 some scans failed (one
'case: reason' line each on stderr, the other scans are written); 2 usage error, unusable
model folder, a bad --manifest or case id, or --out not a writable folder or not empty
without --overwrite (all checked before any scan is computed).
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
                        "(e.g. results/models/multiscale_e2e_noise/seed0); quality.json is used "
                        "for the default --threshold when present")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="output folder (created if missing; an existing file, or a folder "
                        "that is not empty without --overwrite, is refused): "
                        "landmarks.csv, landmarks.json, {case}.mrk.json, {case}_overlay.png")
    p.add_argument("--overwrite", action="store_true",
                   help="reuse a non-empty --out: first remove the files of the previous run "
                        "there (landmarks.csv/json and the {case} files its landmarks.json "
                        "lists); other files are left alone")
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


def _scan_list(args) -> tuple[list[tuple[str, Path]], list[str]]:
    """The scans of ``--manifest`` and the SCAN arguments, and every problem with them, all at
    once (empty cells, bad or repeated case ids; :func:`locnet.inference.scan_problems`)."""
    from .inference import case_id_from_path, read_scan_manifest, scan_problems

    items: list[tuple[str, Path, str]] = []
    problems: list[str] = []
    if args.manifest:
        items, problems = read_scan_manifest(args.manifest, check_ids=False)
    items += [(case_id_from_path(s), Path(s), f"scan {s} (its case id is the file name; name "
               "it in a --manifest instead)") for s in args.scans]
    problems += scan_problems(items)
    if not items and not problems:
        problems.append("no scans given (SCAN arguments or --manifest)")
    return [(c, p) for c, p, _ in items], problems


def _out_problem(out: Path, overwrite: bool = False) -> str | None:
    """Why ``out`` cannot be the output folder (``None`` when it can): it is an existing file,
    cannot be created, is not writable, or is not empty and ``overwrite`` is not given.
    Creates the folder."""
    if out.exists() and not out.is_dir():
        return f"--out {out}: exists and is not a folder"
    if out.is_dir() and not overwrite:
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            return (f"--out {out}: the folder is not empty ({len(entries)} entries: {shown}); "
                    "name a new folder, or pass --overwrite to replace the previous run's "
                    "files there")
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
    from tqdm import tqdm

    from . import import_tensorflow

    import_tensorflow()  # first: its import-time log lines then obey TF_CPP_MIN_LOG_LEVEL
    from . import inference

    scans, problems = _scan_list(args)
    if problems:
        print(f"locnet: error: {len(problems)} problem(s) with the scans given; nothing was "
              "computed:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out)
    problem = _out_problem(out, args.overwrite)  # before anything is computed
    if problem:
        print(f"locnet: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.overwrite:
        removed = inference.remove_previous_outputs(out)
        if removed:
            print(f"locnet: note: --overwrite: removed {len(removed)} file(s) of the previous "
                  f"run in {out}", file=sys.stderr)
    try:
        lm = inference.load_model_dir(args.model)
    except (inference.ModelDirError, ValueError) as exc:
        print(f"locnet: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    settings, notes = inference.batch_settings(
        lm, passes=args.passes, seed=args.seed, estimator=args.estimator,
        threshold_mm3=args.threshold, min_coverage=args.min_coverage, threads=args.threads,
        overlays=not args.no_overlay, quiet=args.quiet)
    for note in notes:
        print(f"locnet: {note}", file=sys.stderr)
    try:
        doc = inference.predict_batch(lm, scans, out, settings, progress=not args.quiet,
                                      report=lambda line: tqdm.write(line, file=sys.stderr))
    except OSError as exc:
        print(f"locnet: error: cannot write the results to {out}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if doc["failed"]:
        print(f"locnet: {len(doc['failed'])} of {len(scans)} scan(s) failed", file=sys.stderr)
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
