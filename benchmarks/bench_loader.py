"""Benchmark: the training loader's host work and bytes per step at paper scale, on the CPU.

    python benchmarks/bench_loader.py --json benchmarks/runs/bench_loader_cpu.json

Writes ``--cases`` random paper-scale cases (finest 448^3 at 0.5 mm, 4 levels: 392 MiB each)
with ``locnet.pyramid`` into ``--tmpdir`` (as ``bench_gpu.py``'s epoch part does), with two
landmarks placed like the synthetic cohort's carotid bifurcations (46-58 mm apart left-right,
a few mm in the other axes, the pair rotated by up to 12 degrees and moved by up to 15 mm).
Then, for the training loader of ``multiscale_e2e_noise`` (56^3 patches, noise 5 mm) as it was
(whole levels, ``training.loader.crop: false``) and as it is (boxes of the finer levels,
``crop: true`` with ``--margin-mm``), per step (one case, batch 1):

* ``bytes``: what a batch holds (what is copied to the device);
* host work, hot page cache: ``dataset[b]`` plus making every input an array in memory (for
  whole levels the batch holds views of the maps, which the backend copies; a box is already a
  copy), and, reported on its own, then a backend tensor (``keras.ops.convert_to_tensor``,
  TensorFlow on the CPU);
* the host work the step waits for with readahead on, while a simulated device step runs
  between batches (``--device-step-ms``: the 21.3 ms a step took on an H200 on device arrays),
  hot cache;
* host work with a cold cache: the case's level files evicted from the page cache
  (``posix_fadvise(DONTNEED)``, these files only) before each step, readahead off; and cold
  with readahead and the simulated device step.

Medians over ``--repeat`` passes over the cases. The device's own step is not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_paper_scale import median, shapes, write_case  # noqa: E402

PATCH, NOISE_MM = 56, 5.0


def landmark_table(dirs, a, seed=0):
    """Two landmarks per case, placed like the synthetic cohort's bifurcations (grid origin 0)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    centre = (a["finest"] - 1) / 2 * a["spacing"]
    rows = []
    for d in dirs:
        half = np.array([rng.uniform(23, 29), rng.uniform(-3, 3), rng.uniform(-5, 5)])
        angle = np.deg2rad(rng.uniform(-12, 12))
        rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                        [0, 0, 1]])
        mid = centre + rng.uniform(-15, 15, 3)
        for name, s in (("left_bifurcation", -1), ("right_bifurcation", 1)):
            rows.append((d.name, name, *(mid + s * rot @ half)))
    return pd.DataFrame(rows, columns=["case_id", "landmark", "x", "y", "z"])


def evict(paths) -> None:
    """Drop these files' pages from the page cache (other files are left alone). Pages still
    mapped by a process stay: the benchmark's datasets keep no maps open (``cache_size=0``)."""
    import gc

    gc.collect()  # maps of batches no longer referenced
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def in_memory(v):
    """``v`` as an array in memory: a copy when it is a view of a memory map (whole levels: the
    copy the backend makes), as is otherwise (a box is already a copy)."""
    import numpy as np

    base = v
    while base is not None:
        if isinstance(base, np.memmap):
            return np.array(v, order="C")
        base = base.base
    return np.ascontiguousarray(v)


def host_step(ds, b):
    """One step's host work: the batch, its inputs as arrays in memory, then as tensors."""
    from keras import ops

    t = time.perf_counter()
    x, _ = ds[b]
    arrays = {k: in_memory(v) for k, v in x.items()}
    t_arrays = time.perf_counter() - t
    tensors = {k: ops.convert_to_tensor(v) for k, v in arrays.items()}
    total = time.perf_counter() - t
    del tensors
    return t_arrays, total, sum(v.nbytes for v in arrays.values())


def measure(make, dirs, repeat: int, device_step_s: float) -> dict:
    """Host work per step of the datasets ``make(readahead)`` makes (see the module doc)."""
    from locnet.pyramid import level_path

    files = {i: [level_path(d, l) for l in range(4)] for i, d in enumerate(dirs)}
    out = {k: [] for k in ("arrays_s", "host_s", "hot_readahead_s", "cold_s",
                           "cold_readahead_s")}

    def with_readahead(cold: bool, key: str):
        ds = make(True)
        if cold:
            for paths in files.values():
                evict(paths)
        for b in range(len(ds)):
            wait = host_step(ds, b)[0]
            if b:  # the first batch has nothing read ahead
                out[key].append(wait)
            time.sleep(device_step_s)  # the device computes; the readahead thread reads
        ds.readahead.wait()

    ds = make(False)
    host_step(ds, 0)  # warm the page cache and the maps
    for _ in range(repeat):
        for b in range(len(ds)):
            t_arrays, t_host, nbytes = host_step(ds, b)
            out["arrays_s"].append(t_arrays)
            out["host_s"].append(t_host)
        with_readahead(False, "hot_readahead_s")
    out["bytes"] = nbytes
    for _ in range(repeat):
        ds = make(False)
        for b in range(len(ds)):
            evict(files[int(ds._order[b])])
            out["cold_s"].append(host_step(ds, b)[0])
        with_readahead(True, "cold_readahead_s")
    out["median_s"] = {k: median(v) for k, v in out.items() if isinstance(v, list) and v}
    return out


def run(a: dict, tmp: Path) -> dict:
    from locnet import train as T
    from locnet.data import LandmarkDataset
    from locnet.models import build_model

    t = time.perf_counter()
    dirs = [write_case(tmp / f"case{c}", a, seed=c) for c in range(a["cases"])]
    res = {"write_s_per_case": (time.perf_counter() - t) / a["cases"]}
    table = landmark_table(dirs, a)
    names = ["left_bifurcation", "right_bifurcation"]
    grid = {"finest_shape": a["finest"], "finest_spacing_mm": a["spacing"], "levels": 4}
    model = build_model("multiscale_e2e_noise", {"landmarks": names, "patch": a["patch"],
                                                 "noise_mm": NOISE_MM}, grid)

    def dataset(boxes=None, readahead=False):
        # no open maps kept (training's LRU of 2 misses anyway in a shuffled epoch of more
        # cases), so every step opens its maps, and evicted pages are really cold
        return LandmarkDataset(dirs, [0, 1, 2, 3], table, names, shuffle=False,
                               readahead=readahead, boxes=boxes, cache_size=0)

    boxes = T.training_boxes(model, dataset(), {"loader": {"crop": True,
                                                           "margin_mm": a["margin_mm"]}})
    res["boxes"] = {str(l): b for l, b in boxes.items()}
    step = a["device_step_ms"] / 1e3
    res["whole levels"] = measure(lambda r: dataset(None, r), dirs, a["repeat"], step)
    res["boxes, margin"] = measure(lambda r: dataset(boxes, r), dirs, a["repeat"], step)
    return res


def report(a: dict, res: dict) -> None:
    print(f"\nboxes (margin {a['margin_mm']} mm): "
          + ", ".join(f"level{l} {'x'.join(map(str, b['shape']))}"
                      for l, b in res["boxes"].items()))
    before = res["whole levels"]
    step = a["device_step_ms"]
    print("\nms per step (median); host work = the batch as arrays in memory\n\n"
          "| loader | bytes per step | host work, hot cache | + CPU tensors | hot, readahead, "
          f"{step} ms device step | cold cache | cold, readahead, {step} ms device step |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for key in ("whole levels", "boxes, margin"):
        r = res[key]
        m = r["median_s"]
        print(f"| {key} | {r['bytes'] / 2**20:,.1f} MiB ({r['bytes'] / before['bytes']:.3f}) | "
              + " | ".join(f"{1e3 * m[k]:,.1f}" for k in
                           ("arrays_s", "host_s", "hot_readahead_s", "cold_s",
                            "cold_readahead_s")) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3, help="passes over the cases per variant")
    p.add_argument("--margin-mm", type=float, default=20.0, help="training.loader.margin_mm")
    p.add_argument("--device-step-ms", type=float, default=21.3)
    p.add_argument("--quick", action="store_true", help="finest 128^3, 16^3 patches")
    p.add_argument("--tmpdir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    a = {**shapes(args.quick), "cases": args.cases, "repeat": args.repeat,
         "margin_mm": args.margin_mm, "device_step_ms": args.device_step_ms}
    print(f"# locnet loader benchmark ({'quick' if args.quick else 'paper scale'}): finest "
          f"{a['finest']}^3 at {a['spacing']} mm, 4 levels, {a['patch']}^3 patches; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}")
    tmp = Path(tempfile.mkdtemp(prefix="locnet_bench_loader_", dir=args.tmpdir))
    try:
        res = {"config": a, **run(a, tmp)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    report(a, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
