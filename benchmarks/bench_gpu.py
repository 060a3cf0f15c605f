"""Benchmark: the accelerator targets at paper scale, on any Keras backend, in one run.

Written for a GPU machine, which may have JAX or PyTorch but not TensorFlow:

    KERAS_BACKEND=jax python benchmarks/bench_gpu.py --json bench_gpu.json
    KERAS_BACKEND=torch python benchmarks/bench_gpu.py
    python benchmarks/bench_gpu.py --quick          # 128^3, 16^3 patches: checks the script

Parts (``--parts``), each in a child process so that memory peaks do not mix:

* ``forward``: one forward pass of ``multiscale_e2e_noise`` (finest 448^3 at 0.5 mm, 4 levels,
  56^3 patches, filters 16/32/64/128, 2 landmarks, random weights) through ``predict_on_batch``
  (compiled by the backend): inputs already on the device, and inputs from host memory (the
  copy included); first call (compiles) and median of ``--repeat``. Then ``predict_passes``
  with 50 shifts as shipped, and its ratio to one forward (target <= 3x; the FLOP floor is
  15x, see benchmarks/README.md);
* ``memory``: the accelerator's peak memory of one training step (``train_on_batch``, batch 1,
  Adam) of ``multiscale_e2e_noise`` and of ``locnet_single`` at 224^3 and 112^3 (the two give
  the linear extrapolation to 448^3), one child per model;
* ``epoch``: ``--cases`` random cases written by ``locnet.pyramid`` to ``--tmpdir``, then
  training steps of ``multiscale_e2e_noise`` fed (a) from arrays already on the device,
  (b) from host arrays in memory, (c) by ``locnet.data.LandmarkDataset`` (memory maps,
  readahead) with a hot and, when ``/proc/sys/vm/drop_caches`` is writable, a cold page
  cache, whole levels and the chains' training boxes (``training.loader``, margin 20 mm), and
  (d) one ``model.fit`` epoch over the cases from a cold cache, whole levels and boxes. An epoch of the
  paper's 167 training cases is estimated from each per-step median (target <= 60 s; loader
  within 1.2x of in-memory).

Prints a markdown report; ``--json`` also writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_paper_scale import (  # noqa: E402  (plain helpers: no TensorFlow at import)
    build,
    drop_caches,
    input_label,
    median,
    model_counts,
    random_inputs,
    run_as_child,
    run_child,
    shapes,
    training_setup,
    write_case,
)

TRAIN_CASES = 167  # the paper's training set


def _ms(s: float) -> str:
    return f"{1e3 * s:,.1f} ms" if s < 1 else f"{s:,.2f} s"


# ---------------------------------------------------------------------------------------------
# what the backend runs on, and its memory peak
# ---------------------------------------------------------------------------------------------
def device_info() -> dict:
    import keras

    backend = keras.backend.backend()
    info = {"backend": backend, "keras": keras.__version__, "device": "cpu"}
    if backend == "jax":
        import jax

        d = jax.devices()[0]
        info.update(device=f"{d.platform}: {d.device_kind}", jax=jax.__version__)
    elif backend == "torch":
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["device"] = f"cuda: {torch.cuda.get_device_name(0)}"
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        info.update(device="GPU:0" if gpus else "CPU:0", tensorflow=tf.__version__)
    return info


def peak_device_bytes() -> float | None:
    """The accelerator allocator's peak since the process started (None where not known)."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            stats = jax.devices()[0].memory_stats() or {}
            return stats.get("peak_bytes_in_use")
        if backend == "torch":
            import torch

            return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        if backend == "tensorflow":
            import tensorflow as tf

            dev = "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"
            return tf.config.experimental.get_memory_info(dev)["peak"]
    except Exception:  # a backend or device without allocator statistics
        return None
    return None


def _on_device(x: dict) -> dict:
    from keras import ops

    return {k: ops.convert_to_tensor(v) for k, v in x.items()}


def _timed(call, repeat: int) -> dict:
    t = time.perf_counter()
    call()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return {"first_s": first, "times_s": times, "median_s": median(times)}


# ---------------------------------------------------------------------------------------------
# children
# ---------------------------------------------------------------------------------------------
def _stage_times(model, xd: dict, shifts, repeat: int) -> dict:
    """Where the passes' time goes: each compiled stage of ``predict_passes`` on its own, the
    window estimator's U-Net without its cuts, and all exact passes in one batch."""
    import numpy as np
    from keras import ops

    from locnet.models import coarse_stages, finest_stage, predict_passes, window_stage

    k, n = model.n_landmarks, shifts.shape[0]
    coarse = coarse_stages(model)
    levels = {key: v for key, v in xd.items() if key != "level0"}
    base = np.asarray(coarse.predict_on_batch(levels))[0]
    chunk = 8
    centres = ops.convert_to_tensor((base[None] + shifts[:chunk]).reshape(1, -1, 3))
    finest = finest_stage(model, chunk * k)
    window = window_stage(model, n)
    win_in = {"volume": xd["level0"], "centres": ops.convert_to_tensor(base[None]),
              "shifts": ops.convert_to_tensor(shifts[None])}
    w = window.window
    net_in = ops.convert_to_tensor(np.random.default_rng(0).random((k, w, w, w, 1), "float32"))
    calls = {
        "coarse stages (once per case)": lambda: coarse.predict_on_batch(levels),
        f"finest stage, one chunk of {chunk} passes": lambda: finest.predict_on_batch(
            {"volume": xd["level0"], "centres": centres}),
        "window stage (all passes)": lambda: window.predict_on_batch(win_in),
        f"window U-Net alone, {k} x {w}^3": lambda: window.window_net.predict_on_batch(net_in),
        f"exact passes, all {n} in one batch": lambda: predict_passes(model, xd, shifts, chunk=None),
    }
    return {name: _timed(call, repeat) for name, call in calls.items()}


def child_forward(a):
    import numpy as np

    from locnet.models import PASS_CHUNK, predict_passes, sample_shifts

    model = build(a)
    x = random_inputs(a, model.input_levels)
    xd = _on_device(x)
    res = {"info": device_info()}
    res["device inputs"] = _timed(lambda: model.predict_on_batch(xd)["position"], a["repeat"])
    res["host inputs"] = _timed(lambda: model.predict_on_batch(x)["position"], a["repeat"])
    shifts = sample_shifts(a["passes"], a["k"], 5.0, seed=0)
    # the passes take the device inputs, like the forward they are compared with
    ref = predict_passes(model, xd, shifts)  # compiles both stages
    res["passes"] = _timed(lambda: predict_passes(model, xd, shifts), a["repeat"])
    res["passes"]["n"], res["passes"]["chunk"] = a["passes"], PASS_CHUNK
    eager = predict_passes(model, x, shifts, compiled=False)
    res["passes"]["max_diff_eager_mm"] = float(np.abs(eager - ref).max())
    predict_passes(model, xd, shifts, estimator="window")  # compiles the window stage
    res["window"] = _timed(lambda: predict_passes(model, xd, shifts, estimator="window"),
                           a["repeat"])
    res["stages"] = _stage_times(model, xd, shifts, a["repeat"])
    res["peak_device_bytes"] = peak_device_bytes()
    # Latency probe: the same chain (same layers, same number of kernels) on the quick shapes,
    # 1/43 of the FLOPs. If it takes about as long as the full-size forward, the forward is
    # bound by per-op launches and synchronisation, not by arithmetic or memory traffic.
    small = {**a, **shapes(True)}
    small_model = build(small)
    xs = _on_device(random_inputs(small, small_model.input_levels))
    res["small chain"] = _timed(lambda: small_model.predict_on_batch(xs)["position"], a["repeat"])
    return res


def child_memory(a):
    model, levels, y, _ = training_setup(a, a["method"], a["level"])
    x = random_inputs(a, levels)
    steps = []
    for _ in range(2):
        t = time.perf_counter()
        model.train_on_batch(x, y)
        steps.append(time.perf_counter() - t)
    return {"method": a["method"], "level": a["level"], "steps_s": steps,
            "peak_device_bytes": peak_device_bytes(), "info": device_info()}


def child_epoch(a):
    import keras
    import pandas as pd

    from locnet.data import LandmarkDataset
    from locnet.train import training_boxes

    class EpochTimer(keras.callbacks.Callback):
        """Seconds per epoch; drops the page cache before each when ``drop``."""

        def __init__(self, drop: bool):
            super().__init__()
            self.drop, self.seconds, self._t = drop, [], 0.0

        def on_epoch_begin(self, epoch, logs=None):
            if self.drop:
                drop_caches()
            self._t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._t)

    model, levels, y, names = training_setup(a)
    tmp = Path(tempfile.mkdtemp(prefix="locnet_bench_gpu_", dir=a["tmpdir"]))
    res = {"info": device_info(), "cases": a["cases"]}
    try:
        t = time.perf_counter()
        dirs = [write_case(tmp / f"case{c}", a, seed=c) for c in range(a["cases"])]
        res["write_s_per_case"] = (time.perf_counter() - t) / a["cases"]
        table = pd.DataFrame([(d.name, n, *y["position"][0, k]) for d in dirs
                              for k, n in enumerate(names)],
                             columns=["case_id", "landmark", "x", "y", "z"])

        def dataset(readahead=True, boxes=None):
            return LandmarkDataset(dirs, levels, table, names, shuffle=False,
                                   readahead=readahead, boxes=boxes)

        # the boxes training reads (training.loader, margin 20 mm as in config/paper.yaml)
        boxes = training_boxes(model, dataset(), {"loader": {"crop": True, "margin_mm": 20.0}})
        res["boxes"] = {str(l): b for l, b in boxes.items()}

        host = dataset().case_batch(0)[0]
        host = {k: v.copy() for k, v in host.items()}
        dev = _on_device(host)
        for _ in range(2):  # compile, settle
            model.train_on_batch(dev, y)
        steps = {"device arrays": [], "host arrays": []}
        for _ in range(a["steps"]):
            for key, x in (("device arrays", dev), ("host arrays", host)):
                t = time.perf_counter()
                model.train_on_batch(x, y)
                steps[key].append(time.perf_counter() - t)

        def over_dataset(ds):
            times = []
            for b in range(len(ds)):
                t = time.perf_counter()
                x, _ = ds[b]
                model.train_on_batch(x, y)
                times.append(time.perf_counter() - t)
            return times

        steps["dataset, hot cache"] = over_dataset(dataset())
        # boxes: the first step traces the step for the boxes' shapes
        steps["dataset, boxes, hot cache"] = over_dataset(dataset(boxes=boxes))[1:]
        res["cold_ok"] = drop_caches()
        if res["cold_ok"]:
            steps["dataset, cold cache, no readahead"] = over_dataset(dataset(readahead=False))[1:]
            drop_caches()
            steps["dataset, cold cache, readahead"] = over_dataset(dataset())[1:]
            drop_caches()
            steps["dataset, boxes, cold cache, readahead"] = over_dataset(
                dataset(boxes=boxes))[1:]
            drop_caches()
        # model.fit as training runs it: the second epoch (the first sets fit up), cold cache
        epochs = EpochTimer(drop=res["cold_ok"])
        model.fit(dataset(), epochs=2, verbose=0, shuffle=False, callbacks=[epochs])
        res["fit_epoch_s"] = epochs.seconds
        res["fit_s_per_case"] = epochs.seconds[-1] / a["cases"]
        epochs = EpochTimer(drop=res["cold_ok"])
        model.fit(dataset(boxes=boxes), epochs=2, verbose=0, shuffle=False, callbacks=[epochs])
        res["fit_boxes_epoch_s"] = epochs.seconds
        res["fit_boxes_s_per_case"] = epochs.seconds[-1] / a["cases"]
        res["steps_s"] = steps
        res["median_s"] = {k: median(v) for k, v in steps.items() if v}
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return res


CHILDREN = {"forward": child_forward, "memory": child_memory, "epoch": child_epoch}


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def report(a: dict, res: dict) -> None:
    c = model_counts(a["finest"], a["levels"], a["patch"], a["k"], a["passes"], a["spacing"])
    info = next((r["info"] for r in [res.get("forward"), res.get("epoch")]
                 if r and "info" in r), {})
    print(f"backend {info.get('backend', '?')} on {info.get('device', '?')}; "
          + ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("backend", "device")))
    fw = res.get("forward")
    if fw and "error" not in fw:
        one = fw["device inputs"]["median_s"]
        print("\n| forward pass (predict_on_batch) | first call | median | GFLOP/s |")
        print("| --- | --- | --- | --- |")
        for key in ("device inputs", "host inputs"):
            r = fw[key]
            print(f"| {key} | {_ms(r['first_s'])} | {_ms(r['median_s'])} | "
                  f"{c['forward_flops'] / r['median_s'] / 1e9:,.0f} |")
        ps = fw["passes"]
        print(f"\n{ps['n']} passes (chunk {ps['chunk']}): {_ms(ps['median_s'])} = "
              f"{ps['median_s'] / one:.1f}x one forward (target <= 3x; FLOP ratio "
              f"{c['flop_ratio_passes']:.1f}x); compiled vs eager {ps['max_diff_eager_mm']:.1g} mm")
        if "window" in fw:
            w = fw["window"]["median_s"]
            print(f"{ps['n']} passes, window estimator ({c['window']}^3): {_ms(w)} = {w / one:.1f}x "
                  f"one forward (FLOP ratio {c['flop_ratio_window']:.1f}x)")
        for name, r in (fw.get("stages") or {}).items():
            print(f"- {name}: {_ms(r['median_s'])} = {r['median_s'] / one:.2f}x one forward")
        if "small chain" in fw:
            q = shapes(True)
            cq = model_counts(q["finest"], q["levels"], q["patch"], q["k"], 1, q["spacing"])
            s = fw["small chain"]["median_s"]
            print(f"same chain at {q['finest']}^3 / {q['patch']}^3 patches "
                  f"({cq['forward_flops'] / c['forward_flops']:.4f} of the FLOPs): {_ms(s)} = "
                  f"{s / one:.2f} of the full forward (near 1: bound by launches, not FLOPs)")
    elif fw:
        print(f"\nforward failed: {fw['error']}")
    mem = res.get("memory") or []
    if mem:
        print("\n| training step | input | peak device memory | steps |\n| --- | --- | --- | --- |")
        got = {}
        for r in mem:
            if "error" in r:
                print(f"| failed | | {r['error']} | |")
                continue
            got[(r["method"], r["level"])] = r
            peak = r["peak_device_bytes"]
            print(f"| {r['method']} | {input_label(a, r['method'], r['level'])} | "
                  f"{'n/a' if peak is None else f'{peak / 2**20:,.0f} MiB'} | "
                  f"{', '.join(_ms(t) for t in r['steps_s'])} |")
        ms, s1, s2 = (got.get(("multiscale_e2e_noise", 1)), got.get(("locnet_single", 1)),
                      got.get(("locnet_single", 2)))
        if ms and s1 and ms["peak_device_bytes"] and s1["peak_device_bytes"]:
            print(f"\nratio multiscale_e2e_noise / locnet_single at level 1: "
                  f"{ms['peak_device_bytes'] / s1['peak_device_bytes']:.3f} (target <= 0.25)")
        if s1 and s2 and s1["peak_device_bytes"] and s2["peak_device_bytes"]:
            n1, n2, n0 = (a["finest"] // 2) ** 3, (a["finest"] // 4) ** 3, a["finest"] ** 3
            b1, b2 = s1["peak_device_bytes"], s2["peak_device_bytes"]
            est = b1 + (b1 - b2) / (n1 - n2) * (n0 - n1)
            print(f"locnet_single at {a['finest']}^3, linear in voxels: {est / 2**30:,.1f} GiB "
                  "(extrapolated)")
    ep = res.get("epoch")
    if ep and "error" not in ep:
        med = ep["median_s"]
        base = med["host arrays"]
        print(f"\n| training step, {ep['cases']} cases | median | ratio to host arrays | "
              f"epoch of {TRAIN_CASES} cases |\n| --- | --- | --- | --- |")
        for key, v in med.items():
            print(f"| {key} | {_ms(v)} | {v / base:.2f} | {TRAIN_CASES * v:,.1f} s |")
        print(f"| model.fit, second epoch over the cases, cold cache | "
              f"{_ms(ep['fit_s_per_case'])}"
              f" per case | {ep['fit_s_per_case'] / base:.2f} | "
              f"{TRAIN_CASES * ep['fit_s_per_case']:,.1f} s |")
        if "fit_boxes_s_per_case" in ep:
            v = ep["fit_boxes_s_per_case"]
            print(f"| model.fit with boxes, second epoch, cold cache | {_ms(v)} per case | "
                  f"{v / base:.2f} | {TRAIN_CASES * v:,.1f} s |")
    elif ep:
        print(f"\nepoch failed: {ep['error']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="finest 128^3, 16^3 patches")
    p.add_argument("--parts", nargs="+", default=list(CHILDREN), choices=list(CHILDREN))
    p.add_argument("--repeat", type=int, default=5, help="timed repeats after the first call")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per variant")
    p.add_argument("--cases", type=int, default=6, help="cases written for the epoch part")
    p.add_argument("--passes", type=int, default=50)
    p.add_argument("--tmpdir", default=None, help="where the epoch part writes its cases")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--json", default=None, help="also write every number here")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    if run_as_child(sys.argv[1:] if argv is None else list(argv), CHILDREN):
        return 0
    args = p.parse_args(argv)
    a = {**shapes(args.quick), "passes": args.passes, "repeat": args.repeat, "steps": args.steps, "cases": args.cases,
         "tmpdir": args.tmpdir, "threads": 0, "chunk": None}
    print(f"# locnet accelerator benchmark ({'quick' if args.quick else 'paper scale'})\n")
    print(f"finest {a['finest']}^3 at {a['spacing']} mm, {a['levels']} levels, {a['patch']}^3 "
          f"patches, K = {a['k']}; KERAS_BACKEND={os.environ.get('KERAS_BACKEND', '(default)')},"
          f" Python {platform.python_version()}, {os.cpu_count()} CPUs\n", flush=True)
    res: dict = {"config": a}
    for part in args.parts:
        if part == "memory":
            res[part] = [run_child(part, dict(a, method=m, level=l), args.timeout, __file__)
                         for m, l in (("multiscale_e2e_noise", 1), ("locnet_single", 1),
                                      ("locnet_single", 2))]
        else:
            res[part] = run_child(part, a, args.timeout, __file__)
        print(f"<!-- {part}: {json.dumps(res[part])} -->", flush=True)
        if args.json:  # after every part, so a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(res, indent=1))
    report(a, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
