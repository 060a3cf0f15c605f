"""Benchmark: time per training step and peak memory of every method.

Each method runs in a *child process* (so peak memories do not mix): it builds the model with
``locnet.models.build_model`` for the given grid, compiles it with Adam as ``locnet.train``
does, makes one random batch (batch 1: the paper's), runs ``--warmup`` training steps (the
first one traces the step function) and then times ``--steps`` steps with
``model.train_on_batch``. Memory, two ways:

* ``tensor peak``: the TensorFlow allocator's peak during the timed steps
  (``tf.config.experimental.get_memory_info``, reset after the warm-up; CPU or GPU): weights,
  optimizer state, the batch, activations, gradients and workspaces of a training step, without
  the one-off cost of tracing and without the runtime; ``resident`` is what the allocator held
  when the timed steps began (weights, optimizer state, batch, cached buffers);
* ``process peak RSS``: the child's ``ru_maxrss`` over its whole life (runtime, imports,
  tracing, everything), an upper bound.

    .venv/bin/python benchmarks/bench_train.py                       # default config shapes
    .venv/bin/python benchmarks/bench_train.py --methods locnet_single multiscale_e2e_noise
    .venv/bin/python benchmarks/bench_train.py --paper               # 448^3 memory comparison
    .venv/bin/python benchmarks/bench_train.py --append              # add the table to README

Default shapes (config.yaml): finest grid 128^3 at 1.25 mm, 4 levels, 16^3 patches, two
landmarks; single-scale methods at level 1 (64^3). ``--paper``: 448^3 at 0.5 mm, 4 levels,
56^3 patches; ``multiscale_e2e_noise`` against ``locnet_single`` at level 1 (224^3), whose peak
memory ratio the paper's design targets at <= 0.25.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from locnet.methods import KEYS as METHODS  # every registered method, Table 1's order

README = Path(__file__).resolve().parent / "README.md"
SECTION = "## Training step time and memory"


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def child(args: dict) -> dict:
    """Runs in the child process: build, warm up, time; returns the measurements."""
    import resource

    t0 = time.perf_counter()
    import keras
    import numpy as np

    from locnet.models import build_model

    keras.utils.set_random_seed(0)
    grid = args["grid"]
    cfg = dict(args["cfg"])
    cfg["landmarks"] = [f"landmark{k}" for k in range(args["landmarks"])]
    model = build_model(args["method"], cfg, grid)
    model.compile(optimizer=keras.optimizers.Adam(5e-4))
    n_params = int(sum(np.prod(v.shape) for v in model.trainable_weights))
    rng = np.random.default_rng(0)
    levels = list(getattr(model, "input_levels"))
    x = {f"level{l}": rng.random((1,) + (grid["finest_shape"] // 2**l,) * 3 + (1,),
                                 dtype=np.float32) for l in levels}
    extent = grid["finest_shape"] * grid["finest_spacing_mm"]
    pos = rng.uniform(0.3 * extent, 0.7 * extent, (1, args["landmarks"], 3)).astype(np.float32)
    y = {"position": pos, "mask": np.ones((1, args["landmarks"]), np.float32)}
    build_s = time.perf_counter() - t0
    base = _rss_mib()
    import tensorflow as tf

    device = "GPU:0" if tf.config.list_physical_devices("GPU") else "CPU:0"
    warm = []
    for _ in range(args["warmup"]):
        t = time.perf_counter()
        model.train_on_batch(x, y)
        warm.append(time.perf_counter() - t)
    try:  # tensor memory of the timed steps only (tracing and runtime excluded)
        tf.config.experimental.reset_memory_stats(device)
        resident = tf.config.experimental.get_memory_info(device)["current"] / 2**20
    except Exception:
        device, resident = None, float("nan")
    times = []
    for _ in range(args["steps"]):
        t = time.perf_counter()
        logs = model.train_on_batch(x, y, return_dict=True)
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out = {"method": args["method"], "levels": levels, "params": n_params, "build_s": build_s,
           "warmup_s": warm, "step_s": times, "base_mib": base, "peak_mib": peak,
           "loss": float(logs["loss"])}
    out["device"] = device or "n/a"
    out["resident_mib"] = resident
    out["tensor_peak_mib"] = (tf.config.experimental.get_memory_info(device)["peak"] / 2**20
                              if device else float("nan"))
    return out


def _mem_available_mib() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0
    return float("inf")


def _rss_of(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def run_child(method: str, cfg: dict, grid: dict, landmarks: int, warmup: int, steps: int,
              timeout: float, min_free_mib: float) -> dict:
    """One method in a child process. The child is stopped (and the row says so) when it runs
    past ``timeout`` or when the machine's available memory falls below ``min_free_mib``, so a
    model too large for the machine does not take the machine down with it."""
    import tempfile

    payload = json.dumps({"method": method, "cfg": cfg, "grid": grid, "landmarks": landmarks,
                          "warmup": warmup, "steps": steps})
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--child", payload], env=env,
                                stdout=out, stderr=err, text=True)
        t0, max_rss, why = time.time(), 0.0, None
        while proc.poll() is None:
            rss = _rss_of(proc.pid)
            max_rss = max(max_rss, rss) if rss == rss else max_rss
            if time.time() - t0 > timeout:
                why = f"timed out after {timeout:.0f} s"
            elif _mem_available_mib() < min_free_mib:
                why = (f"stopped: machine memory nearly exhausted "
                       f"(child RSS {max_rss / 1024:.1f} GiB and growing)")
            if why:
                proc.kill()
                proc.wait()
                return {"method": method, "error": why}
            time.sleep(0.2)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        tail = (stderr or "").strip().splitlines()[-3:]
        why = "killed (out of memory?)" if proc.returncode < 0 else " | ".join(tail)
        return {"method": method, "error": f"exit {proc.returncode}: {why}"}
    return json.loads(stdout.strip().splitlines()[-1])


def _median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def table(results: list[dict]) -> str:
    head = ["method", "levels read", "trainable params", "first step (s)", "step (s), median",
            "tensor peak (MiB)", "resident (MiB)", "process peak RSS (MiB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['error']} |" + " |" * (len(head) - 2))
            continue
        row = [r["method"], ",".join(map(str, r["levels"])), f"{r['params']:,}",
               f"{r['warmup_s'][0]:.2f}" if r["warmup_s"] else "n/a",
               f"{_median(r['step_s']):.3f}", f"{r['tensor_peak_mib']:.0f}",
               f"{r['resident_mib']:.0f}", f"{r['peak_mib']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def machine() -> str:
    import keras
    import numpy as np

    try:
        import tensorflow as tf

        tfv = tf.__version__
    except Exception:  # pragma: no cover
        tfv = "n/a"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with open("/proc/meminfo") as fh:
        mem = int(fh.readline().split()[1]) / 2**20
    return (f"{cores} cores, {mem:.0f} GiB RAM; Python {platform.python_version()}, "
            f"keras {keras.__version__} ({keras.backend.backend()}), tensorflow {tfv}, "
            f"numpy {np.__version__}; {time.strftime('%Y-%m-%d')}")


def append_readme(text: str) -> None:
    """Append ``text`` under this benchmark's own section of benchmarks/README.md."""
    old = README.read_text() if README.exists() else "# Benchmarks\n"
    if SECTION not in old:
        old = old.rstrip("\n") + f"\n\n{SECTION}\n"
    # the section runs to the next "## " heading (or the end); new text goes at its end
    start = old.index(SECTION)
    nxt = old.find("\n## ", start + len(SECTION))
    end = len(old) if nxt < 0 else nxt + 1
    body = old[start:end].rstrip("\n") + "\n\n" + text.strip("\n") + "\n"
    new = old[:start] + body + ("\n" + old[end:] if nxt >= 0 else "")
    tmp = README.with_name(f".{README.name}.tmp")
    tmp.write_text(new)
    os.replace(tmp, README)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--finest-shape", type=int, default=128)
    p.add_argument("--spacing", type=float, default=1.25)
    p.add_argument("--levels", type=int, default=4)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--level", type=int, default=1, help="level of single-scale methods")
    p.add_argument("--landmarks", type=int, default=2)
    p.add_argument("--filters", type=int, nargs="+", default=[16, 32, 64, 128],
                   help="U-Net filters per level (the default study: 8 16 32 64)")
    p.add_argument("--activation", default="relu", choices=["relu", "leaky_relu"],
                   help="U-Net activation (unet.activation; the default study: leaky_relu)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--timeout", type=float, default=1800.0, help="per method (s)")
    p.add_argument("--min-free-mib", type=float, default=1536.0,
                   help="stop a child when the machine's available memory falls below this")
    p.add_argument("--paper", action="store_true",
                   help="448^3 / 0.5 mm / 56^3 patches: multiscale_e2e_noise vs locnet_single")
    p.add_argument("--append", action="store_true", help="append the table to README.md")
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    if a.paper:
        a.finest_shape, a.spacing, a.levels, a.patch, a.level = 448, 0.5, 4, 56, 1
        if a.methods == list(METHODS):
            a.methods = ["multiscale_e2e_noise", "locnet_single"]
    grid = {"finest_shape": a.finest_shape, "finest_spacing_mm": a.spacing, "levels": a.levels}
    cfg = {"patch": a.patch, "level": a.level,
           "unet": {"filters": list(a.filters), "activation": a.activation}}
    results = []
    for m in a.methods:
        r = run_child(m, cfg, grid, a.landmarks, a.warmup, a.steps, a.timeout, a.min_free_mib)
        results.append(r)
        brief = r.get("error") or (f"step {_median(r['step_s']):.3f} s, "
                                   f"peak {r['peak_mib']:.0f} MiB")
        print(f"{m}: {brief}", file=sys.stderr, flush=True)
    text = table(results)
    ok = {r["method"]: r for r in results if "error" not in r}
    notes = []
    if "multiscale_e2e_noise" in ok and "locnet_single" in ok:
        e, s = ok["multiscale_e2e_noise"], ok["locnet_single"]
        notes.append(
            f"Peak memory multiscale_e2e_noise / locnet_single (level {a.level}): "
            f"{e['tensor_peak_mib'] / s['tensor_peak_mib']:.3f} (tensor peak of a training "
            f"step on {e['device']}), {e['peak_mib'] / s['peak_mib']:.3f} (process peak RSS)."
        )
    n0 = a.finest_shape
    header = (f"Grid {n0}^3 at {a.spacing} mm, {a.levels} levels, {a.patch}^3 patches, "
              f"{a.landmarks} landmarks, single-scale methods at level {a.level} "
              f"({n0 // 2**a.level}^3); batch 1, U-Net filters {'/'.join(map(str, a.filters))}; "
              f"{a.warmup} warm-up + {a.steps} timed steps. Machine: {machine()}.")
    report = header + "\n\n" + text + ("\n\n" + "\n".join(notes) if notes else "")
    print(report)
    if a.append:
        append_readme(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
