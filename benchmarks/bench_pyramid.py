"""Benchmark: build one paper-scale pyramid and report wall time and peak memory.

A synthetic int16 CT of 512 x 512 x 400 voxels at 0.45 x 0.45 x 0.6 mm, slightly oblique
(a few degrees about each axis), is written to a temporary folder; then a *child process*
runs ``locnet.pyramid.build_pyramid`` to the paper's grid (448^3 at 0.5 mm, 4 levels). The
child's peak resident memory is read from ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` after it
exits, so it includes everything numpy, scipy and nibabel allocate (tracemalloc would not).

    .venv/bin/python benchmarks/bench_pyramid.py                 # .nii.gz source, all cores
    .venv/bin/python benchmarks/bench_pyramid.py --threads 1 --format nii --repeat 3

Targets (docs: benchmarks/README.md): < 15 s wall and < 3 GB peak on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SOURCE_SHAPE = (512, 512, 400)
SOURCE_SPACING = (0.45, 0.45, 0.6)
TARGET = {"finest_shape": 448, "finest_spacing_mm": 0.5, "levels": 4}
WINDOW_HU = (-200.0, 800.0)
BACKGROUND_HU = -1000.0

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from locnet.pyramid import build_pyramid
t1 = time.perf_counter()
args = json.loads(sys.argv[1])
build_pyramid(args["image"], args["grid"], args["window"], args["background"], args["out"],
              case="bench", threads=args["threads"])
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "build_s": t2 - t1}))
"""


def rotation(deg):
    ax, ay, az = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_scan(path: Path, fmt: str, seed: int = 0) -> None:
    """A neck-like phantom: air, an elliptic body of soft tissue, two bright vessels, noise."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    nx, ny, nz = SOURCE_SHAPE
    x = (np.arange(nx) - nx / 2)[:, None] / (nx * 0.42)
    y = (np.arange(ny) - ny / 2)[None, :] / (ny * 0.35)
    body = (x**2 + y**2) < 1.0
    vessels = (((x - 0.3) ** 2 + y**2) < 0.004) | (((x + 0.3) ** 2 + y**2) < 0.004)
    plane = np.where(body, 40, -1000).astype(np.int16)
    plane[vessels] = 350
    data = np.empty(SOURCE_SHAPE, dtype=np.int16)
    for k in range(nz):
        data[:, :, k] = plane
    data += rng.integers(-30, 31, size=SOURCE_SHAPE, dtype=np.int16)
    aff = np.eye(4)
    aff[:3, :3] = rotation(rng.uniform(-4, 4, size=3)) @ np.diag(SOURCE_SPACING)
    aff[:3, 3] = -aff[:3, :3] @ (np.array(SOURCE_SHAPE) - 1) / 2 + rng.uniform(-10, 10, size=3)
    img = nib.Nifti1Image(data, aff)
    img.set_data_dtype(np.int16)
    nib.save(img, str(path))


def run_child(image: Path, out: Path, threads: int | None) -> dict:
    args = {"image": str(image), "grid": TARGET, "window": WINDOW_HU,
            "background": BACKGROUND_HU, "out": str(out), "threads": threads}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], check=True,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["child_wall_s"] = wall
    res["child_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", choices=["nii.gz", "nii"], default="nii.gz",
                    help="how the source scan is stored (default: nii.gz, like real data)")
    ap.add_argument("--threads", type=int, default=None, help="default: all usable cores")
    ap.add_argument("--repeat", type=int, default=1, help="builds (one child each)")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        image = tmp / f"source.{args.format}"
        t0 = time.perf_counter()
        make_scan(image, args.format)
        print(f"source {SOURCE_SHAPE} int16 at {SOURCE_SPACING} mm written in "
              f"{time.perf_counter() - t0:.1f} s ({image.stat().st_size / 2**20:.0f} MiB)")
        runs = []
        for r in range(args.repeat):
            res = run_child(image, tmp / f"pyr{r}", args.threads)
            runs.append(res)
            print(f"run {r}: build_pyramid {res['build_s']:.2f} s (child: wall "
                  f"{res['child_wall_s']:.2f} s, CPU {res['child_cpu_s']:.2f} s, imports "
                  f"{res['import_s']:.2f} s; load average {os.getloadavg()[0]:.1f})")
        sizes = {p.name: p.stat().st_size for p in sorted((tmp / "pyr0").iterdir())}
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    builds = [r["build_s"] for r in runs]
    result = {
        "source": {"shape": SOURCE_SHAPE, "spacing_mm": SOURCE_SPACING, "format": args.format},
        "target": TARGET,
        "threads": args.threads or len(os.sched_getaffinity(0)),
        "build_s": builds,
        "build_s_median": float(np.median(builds)),
        "child_cpu_s": [r["child_cpu_s"] for r in runs],
        "peak_rss_mib": peak_kib / 1024,
        "output_bytes": sizes,
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, "
                   f"python {platform.python_version()}",
    }
    print(f"median build {result['build_s_median']:.2f} s, peak RSS "
          f"{result['peak_rss_mib']:.0f} MiB (targets: < 15 s, < 3072 MiB); wall time is "
          "inflated when other jobs share the cores (compare CPU s / threads)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
