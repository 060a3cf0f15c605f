"""Build the default study's cohort without Snakemake: synthetic scans, checked tables, pyramids
and split, laid out as ``RESULTS/{data,pyramid}`` for ``benchmarks/map_prior.py``.

    python benchmarks/device_cohort.py --out /tmp/res --workers 16

For a machine that has a Keras backend but neither Snakemake nor room to carry a cohort (the
GPU machine of ``benchmarks/faithful_gpu.sh``). It calls what the data stage's rules call
(``locnet.phantom``, then ``ingest.ingest_cohort``, ``pyramid.build_case`` and
``split.split_cohort``, the functions the rules' scripts call) with the config's blocks,
so the files equal the workflow's: ``--compare RESULTS`` checks that against
a study's own ``data/`` and ``pyramid/`` (tables byte for byte, every level voxel for voxel).
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _case(job: tuple[int, dict, str]) -> str:
    from locnet import phantom

    index, cfg, out = job
    return str(phantom.write_case(index, cfg, out))


def _pyramid(job: tuple[str, str, dict, str]) -> str:
    from locnet import pyramid

    case, image, pcfg, out = job
    pyramid.build_case(image, pcfg, out_dir=Path(out) / case, case=case, threads=1)
    return case


def _map(fn, jobs: list, workers: int) -> list:
    """``fn`` over ``jobs``: in this process for one worker, else in a process pool."""
    if workers <= 1:
        return [fn(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(fn, jobs))


def build(cfg: dict, out: Path, workers: int) -> None:
    """Write ``out/synthetic``, ``out/data/{manifest,landmarks,split}.csv`` and
    ``out/pyramid/<case>/`` for the synthetic cohort of ``cfg``."""
    from locnet import fileio, ingest, phantom, split

    if cfg["cohort"]["source"] != "synthetic":
        raise SystemExit("device_cohort.py builds the synthetic cohort only")
    syn, data = out / "synthetic", out / "data"
    data.mkdir(parents=True, exist_ok=True)
    n = int(cfg["synthetic"]["n_cases"])
    _map(_case, [(i, dict(cfg["synthetic"]), str(syn)) for i in range(n)], workers)
    phantom.write_tables(n, dict(cfg["synthetic"]), syn)
    ingest.ingest_cohort(syn / "manifest.csv", syn / "landmarks.csv",
                         landmark_names=cfg["landmarks"],
                         coordinate_system=cfg["cohort"]["coordinate_system"],
                         split_cfg=cfg["split"], pyramid_cfg=cfg["pyramid"],
                         out_manifest=data / "manifest.csv", out_landmarks=data / "landmarks.csv",
                         threads=workers)
    manifest = fileio.read_manifest(data / "manifest.csv")
    jobs = [(c, img, cfg["pyramid"], str(out / "pyramid"))
            for c, img in zip(manifest["case_id"], manifest["image"])]
    _map(_pyramid, jobs, workers)
    split.split_cohort(data / "manifest.csv", data / "landmarks.csv", cfg["split"],
                       data / "split.csv", raw_landmarks=syn / "landmarks.csv")


def compare(out: Path, study: Path) -> list[str]:
    """Where ``out`` differs from a study's ``RESULTS`` (empty: the same cohort)."""
    import nibabel as nib
    import numpy as np

    diffs = [f"data/{t}" for t in ("landmarks.csv", "split.csv")
             if (out / "data" / t).read_bytes() != (study / "data" / t).read_bytes()]
    for lvl in sorted((study / "pyramid").glob("*/level*.nii")):
        mine = out / "pyramid" / lvl.parent.name / lvl.name
        a, b = nib.load(str(mine)), nib.load(str(lvl))
        if not (np.array_equal(a.affine, b.affine)
                and np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))):
            diffs.append(str(lvl.relative_to(study)))
    return diffs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", nargs="*", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--compare", default=None, metavar="RESULTS",
                    help="check the cohort against a study's RESULTS folder; exit 1 if it differs")
    args = ap.parse_args(argv)
    from bench_config import load_config

    cfg = load_config(args.config or [str(ROOT / "config.yaml")], args.set)
    out = Path(args.out)
    build(cfg, out, args.workers)
    print(f"cohort: {out}")
    if args.compare:
        diffs = compare(out, Path(args.compare))
        print("the same as the study's" if not diffs else f"differs: {diffs[:10]}")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
