"""Benchmark: the paper-scale performance targets of multiscale_e2e_noise.

Parts (each runs in its own child process, so memory and threads do not mix; pick with
``--parts``):

* ``flops``: analytic FLOPs and bytes of one forward pass (2 k^3 Cin Cout per output voxel
  per convolution, per level net x (1 coarsest + K crops per finer level), plus the trilinear
  crops), the 50-pass FLOP ratio, the H100 floors, and the achieved GFLOP/s of one large
  3x3x3 convolution on this CPU (reference for what the CPU can do);
* ``inference``: one forward pass (eager ``model(x)``, a ``tf.function`` of it, and
  ``model.predict_on_batch``), then ``predict_passes`` with 50 shifts, in one process;
* ``memory``: peak memory of one training step (batch 1, Adam) of ``multiscale_e2e_noise`` and
  of ``locnet_single`` at level 1 and level 2 (extrapolated to level 0, which does not fit),
  one child per model: ``VmHWM`` minus ``VmRSS`` after imports, and the TensorFlow allocator
  peak of the step;
* ``loader``: random pyramid cases written by ``locnet.pyramid.write_level``; seconds to deliver one case's levels as tensors (hot and, if
  ``drop_caches`` is writable, cold page cache) and training step time with the inputs from
  ``locnet.data.LandmarkDataset`` vs arrays already in memory, with and without readahead.

    .venv/bin/python benchmarks/bench_paper_scale.py                 # paper scale, all parts
    .venv/bin/python benchmarks/bench_paper_scale.py --quick         # 128^3, 16^3 patches
    .venv/bin/python benchmarks/bench_paper_scale.py --parts flops inference

Paper scale: finest 448^3 at 0.5 mm, 4 levels, 56^3 patches, filters 16/32/64/128, 2
landmarks, random weights. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

H100 = {"fp32": 60e12, "tf32": 400e12, "hbm": 3.35e12}
#: the paper's GPU (615 ms per forward there): 12.1 TFLOP/s fp32, 547.6 GB/s GDDR5X
TITAN_XP = {"fp32": 12.1e12, "mem": 547.6e9}
FILTERS = (16, 32, 64, 128)


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


# ---------------------------------------------------------------------------------------
# analytic counts
# ---------------------------------------------------------------------------------------
def unet_counts(n: int, cin: int, cout: int, filters=FILTERS) -> tuple[float, float]:
    """(FLOPs, bytes) of one U-Net pass on an n^3 input, batch 1, float32.

    FLOPs: 2 k^3 Cin Cout per output voxel per convolution (bias and activations ignored).
    Bytes: each convolution reads its input and writes its output once, pooling, upsampling
    and concatenation read and write their tensors once (no fusion): a floor for an
    unfused implementation, weights excluded (they are small and cached).
    """
    flops = 0.0
    byts = 0.0
    vox = [(n // 2**d) ** 3 for d in range(len(filters))]
    c = cin
    for d, f in enumerate(filters):
        if d > 0:
            byts += 4 * c * (vox[d - 1] + vox[d])  # max-pool
        flops += 2 * 27 * c * f * vox[d]
        byts += 4 * (c + f) * vox[d]
        c = f
    for d in range(len(filters) - 2, -1, -1):
        byts += 4 * c * (vox[d + 1] + vox[d])  # upsample
        cat = filters[d] + c
        byts += 4 * 2 * cat * vox[d]  # concat: read both, write
        flops += 2 * 27 * cat * filters[d] * vox[d]
        byts += 4 * (cat + filters[d]) * vox[d]
        c = filters[d]
    flops += 2 * c * cout * vox[0]
    byts += 4 * (c + cout) * vox[0]
    return flops, byts


def window_side(patch: int, spacing_mm: float, noise_mm: float = 5.0, stride: int = 8) -> int:
    """The window of ``estimator="window"`` (as :func:`locnet.models.window_size` sizes it)."""
    reach = math.ceil(noise_mm / spacing_mm - 1e-6)
    return -(-(patch + 2 * reach) // stride) * stride


def model_counts(finest: int, levels: int, patch: int, k: int, passes: int = 1,
                 spacing_mm: float = 0.5) -> dict:
    """FLOPs and bytes of one forward pass of the multi-scale chain and of ``passes`` passes
    run as :func:`locnet.models.predict_passes` does (coarse levels once), for both estimators
    (the window estimator's window from the finest spacing ``spacing_mm``: :func:`window_side`)."""
    window = window_side(patch, spacing_mm)
    top = levels - 1
    net_f, net_b = unet_counts(patch, 1, k)
    coarse_f, coarse_b = unet_counts(finest // 2**top, 1, k)
    # crop: 8 corner gathers + ~30 flops per patch voxel; reads ~8 values, writes 1
    crop_f = 30.0 * patch**3
    crop_b = 4.0 * 9 * patch**3
    # CoM of one selected map per patch: ~ 10 flops per voxel
    com_f = 10.0 * patch**3 * (k + 1)
    per_patch_f = net_f + crop_f + com_f
    per_patch_b = net_b + crop_b
    inputs_b = 4.0 * sum((finest // 2**l) ** 3 for l in range(levels))
    fwd_f = coarse_f + top * k * per_patch_f
    fwd_b = coarse_b + top * k * per_patch_b
    multi_f = coarse_f + (top - 1) * k * per_patch_f + passes * k * per_patch_f
    multi_b = coarse_b + (top - 1) * k * per_patch_b + passes * k * per_patch_b
    # estimator="window": one finest net per landmark over its window (cropped like a patch),
    # the box sums of the map and its 3 moments (~3 flops per value and axis), then 8 lookups
    # of 4 values per pass and landmark (negligible)
    win_f = coarse_f + (top - 1) * k * per_patch_f + k * (
        unet_counts(window, 1, k)[0] + crop_f * window**3 / patch**3 + 4 * 3 * 3 * window**3
    ) + passes * k * 8 * 4 * 4
    return {
        "net_patch_flops": net_f, "net_coarse_flops": coarse_f, "crop_flops": crop_f,
        "forward_flops": fwd_f, "forward_bytes": fwd_b, "inputs_bytes": inputs_b,
        "passes_flops": multi_f, "passes_bytes": multi_b,
        "flop_ratio_passes": multi_f / fwd_f, "naive_ratio": float(passes),
        "window": window, "window_flops": win_f, "flop_ratio_window": win_f / fwd_f,
    }


# ---------------------------------------------------------------------------------------
# children
# ---------------------------------------------------------------------------------------
def _setup(threads: int):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    return keras, tf


def _grid(a):
    return {"finest_shape": a["finest"], "finest_spacing_mm": a["spacing"], "levels": a["levels"]}


def build(a, method="multiscale_e2e_noise", level=1):
    import keras

    from locnet.models import build_model

    keras.utils.set_random_seed(0)
    cfg = {"landmarks": [f"lm{k}" for k in range(a["k"])], "patch": a["patch"],
           "noise_mm": 5.0, "level": level, "unet": {"filters": list(FILTERS)}}
    return build_model(method, cfg, _grid(a))


def training_setup(a, method="multiscale_e2e_noise", level=1):
    """A compiled model (Adam, as training uses it), its pyramid levels, random targets and the
    landmark names: ``(model, levels, y, names)``."""
    import keras

    model = build(a, method, level)
    model.compile(optimizer=keras.optimizers.Adam(5e-4))
    return model, list(model.input_levels), random_targets(a), [f"lm{k}" for k in range(a["k"])]


def input_label(a, method: str, level: int) -> str:
    """What a model of the memory part reads, for the report."""
    if method.startswith("multi"):
        return "pyramid + patches"
    return f"level {level} ({a['finest'] // 2 ** level}^3)"


def random_inputs(a, levels):
    import numpy as np

    rng = np.random.default_rng(0)
    return {f"level{l}": rng.random((1,) + (a["finest"] // 2**l,) * 3 + (1,), dtype=np.float32)
            for l in levels}


def random_targets(a):
    import numpy as np

    ext = a["finest"] * a["spacing"]
    rng = np.random.default_rng(1)
    return {"position": rng.uniform(0.35 * ext, 0.65 * ext, (1, a["k"], 3)).astype("float32"),
            "mask": np.ones((1, a["k"]), "float32")}


def child_flops(a):
    keras, tf = _setup(a["threads"])

    out = model_counts(a["finest"], a["levels"], a["patch"], a["k"], a["passes"], a["spacing"])
    # reference: one large 3x3x3 convolution, the decoder's 48 -> 16 at the patch size,
    # batch = 2 K (what the finest level of the 50 passes runs in chunks)
    n, b = a["patch"], max(4, 2 * a["k"])
    x = tf.random.uniform((b, n, n, n, 48))
    w = tf.random.uniform((3, 3, 3, 48, 16))
    f = tf.function(lambda x: tf.nn.conv3d(x, w, [1] * 5, "SAME"))
    f(x).numpy()
    ts = []
    for _ in range(a["repeat"]):
        t = time.perf_counter()
        f(x).numpy()
        ts.append(time.perf_counter() - t)
    conv_flops = 2 * 27 * 48 * 16 * b * n**3
    out["cpu_conv_shape"] = f"{b}x{n}^3, 48->16, 3x3x3"
    out["cpu_conv_s"] = median(ts)
    out["cpu_conv_gflops"] = conv_flops / median(ts) / 1e9
    return out


def child_inference(a):
    keras, tf = _setup(a["threads"])

    from locnet.models import PASS_CHUNK, predict_passes, sample_shifts

    model = build(a)
    x = random_inputs(a, model.input_levels)
    xt = {k: tf.convert_to_tensor(v) for k, v in x.items()}
    res = {}
    fn = tf.function(lambda inp: model(inp, training=False)["position"])
    modes = {
        "eager model(x)": lambda: model(xt, training=False)["position"].numpy(),
        "tf.function": lambda: fn(xt).numpy(),
        "predict_on_batch": lambda: model.predict_on_batch(x)["position"],
    }
    for name, call in modes.items():
        t = time.perf_counter()
        call()
        first = time.perf_counter() - t
        ts = []
        for _ in range(a["repeat"]):
            t = time.perf_counter()
            call()
            ts.append(time.perf_counter() - t)
        res[name] = {"first_s": first, "times_s": ts, "median_s": median(ts)}
    shifts = sample_shifts(a["passes"], a["k"], 5.0, seed=0)
    kw = {"chunk": a["chunk"]} if a["chunk"] else {}
    t = time.perf_counter()
    predict_passes(model, x, shifts, **kw)  # traces the compiled stages
    first = time.perf_counter() - t
    ts = []
    for _ in range(a["pass_repeat"]):
        t = time.perf_counter()
        predict_passes(model, x, shifts, **kw)
        ts.append(time.perf_counter() - t)
    res["passes"] = {"first_s": first, "times_s": ts, "median_s": median(ts), "n": a["passes"],
                     "chunk": a["chunk"] or PASS_CHUNK, "peak_rss_mib": _status_mib("VmHWM")}
    return res


def child_passes(a):
    """``predict_passes`` as shipped (its stages compiled by Keras), its eager variant, and a
    hand-written ``tf.function`` of the whole pass pipeline (coarse levels too), in one process.
    """
    keras, tf = _setup(a["threads"])
    import numpy as np

    from locnet.models import PASS_CHUNK, predict_passes, sample_shifts

    model = build(a)
    x = random_inputs(a, model.input_levels)
    shifts = sample_shifts(a["passes"], a["k"], 5.0, seed=0)
    fn = tf.function(lambda inp: model(inp, training=False)["position"])
    xt = {k: tf.convert_to_tensor(v) for k, v in x.items()}
    fn(xt)
    ts = []
    for _ in range(a["repeat"]):
        t = time.perf_counter()
        fn(xt).numpy()
        ts.append(time.perf_counter() - t)
    res = {"forward_tf_function_s": median(ts)}
    chunk = a["chunk"] or PASS_CHUNK

    t = time.perf_counter()
    ref = predict_passes(model, x, shifts, chunk=chunk)
    res[f"compiled stages, chunk {chunk}, first call (traces)"] = time.perf_counter() - t
    t = time.perf_counter()
    ref = predict_passes(model, x, shifts, chunk=chunk)
    res[f"compiled stages, chunk {chunk} (as shipped)"] = time.perf_counter() - t
    t = time.perf_counter()
    eager = predict_passes(model, x, shifts, chunk=chunk, compiled=False)
    res[f"eager, chunk {chunk}"] = time.perf_counter() - t
    coarse = tf.function(lambda inp: model.refine(
        1, inp["level1"], model.refine(2, inp["level2"], model.coarsest(inp))))
    fine = tf.function(lambda vol, c: model.refine(0, vol, c))

    def by_hand():
        base = coarse(xt).numpy()[0]
        out = []
        for s in range(0, len(shifts), chunk):
            c = (base[None] + shifts[s:s + chunk]).reshape(1, -1, 3)
            out.append(fine(xt["level0"], tf.constant(c)).numpy().reshape(-1, a["k"], 3))
        return np.concatenate(out)

    assert model.n_levels == 4
    by_hand()
    t = time.perf_counter()
    got = by_hand()
    res[f"tf.function of every stage, chunk {chunk}"] = time.perf_counter() - t
    res["max_abs_diff_mm"] = float(max(np.abs(got - ref).max(), np.abs(eager - ref).max()))
    # the window estimator (a different estimator: see locnet.models.WindowStage)
    t = time.perf_counter()
    predict_passes(model, x, shifts, estimator="window")
    res["window estimator, first call (traces)"] = time.perf_counter() - t
    ts = []
    for _ in range(a["repeat"]):
        t = time.perf_counter()
        predict_passes(model, x, shifts, estimator="window")
        ts.append(time.perf_counter() - t)
    res["window estimator"] = median(ts)
    res["peak_rss_mib"] = _status_mib("VmHWM")
    return res


def child_memory(a):
    base = None
    keras, tf = _setup(a["threads"])
    import numpy as np  # noqa: F401

    import locnet.models  # noqa: F401

    base = _status_mib("VmRSS")
    model = build(a, a["method"], a["level"])
    model.compile(optimizer=keras.optimizers.Adam(5e-4))
    x = random_inputs(a, model.input_levels)
    y = random_targets(a)
    built = _status_mib("VmRSS")
    dev = "CPU:0"
    try:
        tf.config.experimental.reset_memory_stats(dev)
        tf.config.experimental.get_memory_info(dev)
        have_info = True
    except Exception:
        have_info = False
    ts = []
    for _ in range(a["steps"]):
        t = time.perf_counter()
        model.train_on_batch(x, y)
        ts.append(time.perf_counter() - t)
    out = {"method": a["method"], "level": a["level"], "base_mib": base, "built_mib": built,
           "hwm_mib": _status_mib("VmHWM"), "step_s": ts,
           "tensor_peak_mib": (tf.config.experimental.get_memory_info(dev)["peak"] / 2**20
                               if have_info else float("nan"))}
    out["step_peak_mib"] = out["hwm_mib"] - base
    return out


def write_case(root: Path, a, seed=0):
    """One random case through ``locnet.pyramid.write_level`` (stored ``[k, j, i]``, maps in
    C order)."""
    import numpy as np

    from locnet.geometry import Grid
    from locnet.fileio import write_json_atomic
    from locnet.pyramid import write_level

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    grid = Grid(origin=(0.0, 0.0, 0.0), spacing=a["spacing"], shape=a["finest"],
                levels=a["levels"])
    for l in range(a["levels"]):
        n = a["finest"] // 2**l
        arr = rng.random((n, n, n), dtype=np.float32)
        write_level(arr, grid, l, root)
    write_json_atomic(grid.to_dict(), root / "grid.json")
    return root


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def child_loader(a):
    """Training steps fed by ``locnet.data.LandmarkDataset`` (the training code's loader) vs
    the same step on arrays already in memory, in one process."""
    keras, tf = _setup(a["threads"])
    import numpy as np
    import pandas as pd

    from locnet.data import LandmarkDataset

    model, levels, y, names = training_setup(a)
    tmp = Path(tempfile.mkdtemp(prefix="locnet_bench_", dir=a["tmpdir"]))
    res = {}
    try:
        t = time.perf_counter()
        dirs = [write_case(tmp / f"case{c}", a, seed=c) for c in range(3)]
        res["write_s"] = (time.perf_counter() - t) / 3
        res["case_mib"] = sum((dirs[0] / f"level{l}.nii").stat().st_size
                              for l in levels) / 2**20
        table = pd.DataFrame([(d.name, n, *y["position"][0, k]) for d in dirs
                              for k, n in enumerate(names)],
                             columns=["case_id", "landmark", "x", "y", "z"])

        def dataset(case_dirs, readahead=True):
            return LandmarkDataset(case_dirs, levels, table, names, shuffle=False,
                                   readahead=readahead)

        def deliver(ds, i=0):
            x, _ = ds.case_batch(i)
            return {k: tf.convert_to_tensor(v) for k, v in x.items()}

        new_ds = dataset(dirs)
        res["cold_ok"] = drop_caches()
        t = time.perf_counter()
        deliver(new_ds)
        res["deliver_cold_s" if res["cold_ok"] else "deliver_first_s"] = time.perf_counter() - t
        for key, ds in (("deliver_hot_s", new_ds),):
            hot = []
            for _ in range(a["repeat"]):
                t = time.perf_counter()
                deliver(ds)
                hot.append(time.perf_counter() - t)
            res[key] = median(hot)

        # hot page cache: arrays in memory (C order) vs the dataset's memory-mapped views
        x_mem = {k: np.array(v) for k, v in new_ds.case_batch(0)[0].items()}
        model.train_on_batch(x_mem, y)  # trace
        model.train_on_batch(x_mem, y)
        times = {"mem": [], "mmap": []}
        for _ in range(a["steps"]):
            for key, x in (("mem", lambda: x_mem), ("mmap", lambda: new_ds.case_batch(0)[0])):
                t = time.perf_counter()
                model.train_on_batch(x(), y)
                times[key].append(time.perf_counter() - t)
        # cold page cache: an epoch over the 3 cases as fit runs it (ds[b] in order), with and
        # without the readahead of the next batch; the first batch has nothing read ahead
        for key, ra in (("cold_no_readahead", False), ("cold_readahead", True)):
            ds = dataset(dirs, readahead=ra)
            if not drop_caches():
                break
            times[key] = []
            for b in range(len(ds)):
                t = time.perf_counter()
                x, _ = ds[b]
                model.train_on_batch(x, y)
                times[key].append(time.perf_counter() - t)
        res.update({f"step_{k}_s": median(v[1:] if k.startswith("cold") else v)
                    for k, v in times.items() if v})
        res["steps_all"] = times
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return res


CHILDREN = {"flops": child_flops, "inference": child_inference, "passes": child_passes,
            "memory": child_memory, "loader": child_loader}


def run_child(part: str, a: dict, timeout: float, script: str = __file__) -> dict:
    """Run ``script --child part a`` in a fresh interpreter; its last stdout line (JSON)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, script, "--child", part, json.dumps(a)],
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"rc {proc.returncode}"]
        return {"error": lines[-1], "stderr_tail": lines[-40:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - t
    return out


def shapes(quick: bool) -> dict:
    """The benchmark's model shapes: the paper's, or 128^3 with 16^3 patches (``quick``)."""
    return {"finest": 128 if quick else 448, "spacing": 1.75 if quick else 0.5, "levels": 4,
            "patch": 16 if quick else 56, "k": 2}


def run_as_child(argv, children: dict) -> bool:
    """If ``argv`` holds ``--child part payload``, run that child, print its JSON, say True."""
    if "--child" not in argv:
        return False
    i = argv.index("--child")
    part, payload = argv[i + 1], argv[i + 2]
    print(json.dumps(children[part](json.loads(payload))))
    return True


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------
def _ms(s):
    return f"{1e3 * s:,.1f} ms" if s < 1 else f"{s:,.2f} s"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="finest 128^3, 16^3 patches")
    p.add_argument("--parts", nargs="+", default=list(CHILDREN), choices=list(CHILDREN))
    p.add_argument("--repeat", type=int, default=None, help="timed repeats (after warm-up)")
    p.add_argument("--passes", type=int, default=50)
    p.add_argument("--chunk", type=int, default=None,
                   help="predict_passes chunk (passes); default: the library's PASS_CHUNK")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: TF default)")
    p.add_argument("--tmpdir", default=None, help="where the loader writes its level files")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    if run_as_child(sys.argv[1:] if argv is None else list(argv), CHILDREN):
        return 0
    args = p.parse_args(argv)
    a = {**shapes(args.quick), "passes": args.passes, "chunk": args.chunk, "threads": args.threads, "tmpdir": args.tmpdir,
         "repeat": args.repeat or (3 if args.quick else 2),
         "pass_repeat": 2 if args.quick else 1, "steps": 3 if args.quick else 2}

    with open("/proc/loadavg") as fh:
        load0 = fh.read().split()[:3]
    print(f"# locnet paper-scale benchmark ({'quick' if args.quick else 'paper scale'})\n")
    print(f"finest {a['finest']}^3 at {a['spacing']} mm, {a['levels']} levels, "
          f"{a['patch']}^3 patches, filters {'/'.join(map(str, FILTERS))}, K = {a['k']}, "
          f"{a['passes']} passes; {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"load average at start {' '.join(load0)}\n")
    res = {}
    for part in args.parts:
        if part == "memory":
            res[part] = []
            for method, level in (("multiscale_e2e_noise", 1), ("locnet_single", 1),
                                  ("locnet_single", 2)):
                res[part].append(run_child(part, dict(a, method=method, level=level,
                                                      steps=2), args.timeout))
        else:
            res[part] = run_child(part, a, args.timeout)
        print(f"<!-- {part}: {json.dumps(res[part])} -->", flush=True)
    with open("/proc/loadavg") as fh:
        load1 = fh.read().split()[:3]
    report(a, res)
    print(f"\nload average at end {' '.join(load1)}")
    return 0


def report(a, res):
    c = model_counts(a["finest"], a["levels"], a["patch"], a["k"], a["passes"], a["spacing"])
    fwd_f, fwd_b = c["forward_flops"], c["forward_bytes"] + c["inputs_bytes"]
    h_fp32 = max(fwd_f / H100["fp32"], fwd_b / H100["hbm"])
    h_tf32 = max(fwd_f / H100["tf32"], fwd_b / H100["hbm"])
    print("\n| quantity | value |\n| --- | --- |")
    print(f"| forward FLOPs (analytic) | {fwd_f / 1e9:,.1f} GFLOP (coarsest net "
          f"{c['net_coarse_flops'] / 1e9:.1f}, each patch net {c['net_patch_flops'] / 1e9:.1f} "
          f"x {(a['levels'] - 1) * a['k']}) |")
    print(f"| forward bytes (unfused activations + input levels) | "
          f"{c['forward_bytes'] / 2**30:.2f} GiB + {c['inputs_bytes'] / 2**20:.0f} MiB |")
    print(f"| H100 floor, fp32 60 TFLOP/s / TF32 400 TFLOP/s / HBM 3.35 TB/s | "
          f"{_ms(fwd_f / H100['fp32'])} / {_ms(fwd_f / H100['tf32'])} / {_ms(fwd_b / H100['hbm'])}"
          f" -> floor {_ms(h_fp32)} (fp32), {_ms(h_tf32)} (TF32) |")
    t_xp = max(fwd_f / TITAN_XP["fp32"], fwd_b / TITAN_XP["mem"])
    print(f"| Titan Xp floor (the paper's GPU), fp32 12.1 TFLOP/s / 547.6 GB/s | "
          f"{_ms(fwd_f / TITAN_XP['fp32'])} / {_ms(fwd_b / TITAN_XP['mem'])} -> floor "
          f"{_ms(t_xp)}; the paper's 615 ms is {0.615 / t_xp:.0f}x that |")
    print(f"| {a['passes']}-pass FLOPs, ratio to one forward | {c['passes_flops'] / 1e9:,.0f} "
          f"GFLOP, {c['flop_ratio_passes']:.2f}x (naive {a['passes']} full passes: "
          f"{a['passes']}x) |")
    print(f"| {a['passes']}-pass FLOPs, window estimator ({c['window']}^3 window), ratio | "
          f"{c['window_flops'] / 1e9:,.0f} GFLOP, {c['flop_ratio_window']:.2f}x |")
    if "flops" in res and "cpu_conv_gflops" in res["flops"]:
        f = res["flops"]
        print(f"| CPU reference conv ({f['cpu_conv_shape']}) | {_ms(f['cpu_conv_s'])}, "
              f"{f['cpu_conv_gflops']:.1f} GFLOP/s -> forward floor on this CPU "
              f"{_ms(fwd_f / f['cpu_conv_gflops'] / 1e9)} |")
    inf = res.get("inference")
    if inf and "error" not in inf:
        print("\n| forward mode | first call | timed | median | achieved GFLOP/s |")
        print("| --- | --- | --- | --- | --- |")
        best = None
        for name in ("eager model(x)", "tf.function", "predict_on_batch"):
            r = inf[name]
            best = r["median_s"] if best is None else min(best, r["median_s"])
            print(f"| {name} | {_ms(r['first_s'])} | "
                  f"{', '.join(_ms(t) for t in r['times_s'])} | {_ms(r['median_s'])} | "
                  f"{fwd_f / r['median_s'] / 1e9:.1f} |")
        ps = inf["passes"]
        eager = inf["eager model(x)"]["median_s"]
        print(f"\n| {ps['n']}-pass uncertainty | value |\n| --- | --- |")
        print(f"| predict_passes ({ps['n']} shifts, chunk {ps['chunk']}), first call (traces) | "
              f"{_ms(ps['first_s'])} |")
        print(f"| predict_passes ({ps['n']} shifts, chunk {ps['chunk']}) | "
              f"{', '.join(_ms(t) for t in ps['times_s'])} (median {_ms(ps['median_s'])}) |")
        print(f"| ratio to one forward (eager / best mode) | {ps['median_s'] / eager:.2f}x / "
              f"{ps['median_s'] / best:.2f}x (target <= 3x) |")
        print(f"| naive {ps['n']} full passes (estimate {ps['n']} x best forward) | "
              f"{_ms(ps['n'] * best)} ({ps['n']}x) |")
        print(f"| FLOP-based ratio (compute-bound accelerator) | {c['flop_ratio_passes']:.2f}x |")
        print(f"| process peak RSS (VmHWM) | {ps['peak_rss_mib']:,.0f} MiB |")
    elif inf:
        print(f"\ninference failed: {inf['error']}")
    mem = res.get("memory")
    if mem:
        print("\n| training step (batch 1) | input | step peak: VmHWM - RSS after imports |"
              " TF allocator peak | steps (s) |")
        print("| --- | --- | --- | --- | --- |")
        got = {}
        for r in mem:
            if "error" in r:
                print(f"| failed | | {r['error']} | | |")
                continue
            what = input_label(a, r["method"], r["level"])
            got[(r["method"], r["level"])] = r
            print(f"| {r['method']} | {what} | {r['step_peak_mib']:,.0f} MiB | "
                  f"{r['tensor_peak_mib']:,.0f} MiB | "
                  f"{', '.join(f'{t:.2f}' for t in r['step_s'])} |")
        ms, s1, s2 = (got.get(("multiscale_e2e_noise", 1)), got.get(("locnet_single", 1)),
                      got.get(("locnet_single", 2)))
        if ms and s1:
            print(f"\nratio multiscale_e2e_noise / locnet_single@level1: "
                  f"{ms['step_peak_mib'] / s1['step_peak_mib']:.3f} (VmHWM - baseline), "
                  f"{ms['tensor_peak_mib'] / s1['tensor_peak_mib']:.3f} (TF allocator); "
                  "target <= 0.25")
        if s1 and s2:
            n1, n2, n0 = (a["finest"] // 2) ** 3, (a["finest"] // 4) ** 3, a["finest"] ** 3
            for key, label in (("step_peak_mib", "VmHWM - baseline"),
                               ("tensor_peak_mib", "TF allocator")):
                slope = (s1[key] - s2[key]) / (n1 - n2)
                est = s1[key] + slope * (n0 - n1)
                print(f"locnet_single at level 0 ({a['finest']}^3), linear in voxels from "
                      f"levels 1 and 2 ({label}): {est / 1024:,.1f} GiB (extrapolated)")
    pv = res.get("passes")
    if pv and "error" not in pv:
        fwd = pv["forward_tf_function_s"]
        print(f"\n| {a['passes']}-pass variant (same process) | time | ratio to one forward "
              f"(tf.function, {_ms(fwd)}) |\n| --- | --- | --- |")
        for key, v in pv.items():
            if key.startswith(("eager", "tf.function", "compiled", "window estimator")):
                print(f"| {key} | {_ms(v)} | {v / fwd:.1f}x |")
        print(f"| max difference between the variants (mm) | {pv['max_abs_diff_mm']:.2g} | |")
        print(f"| process peak RSS at the end | {pv['peak_rss_mib']:,.0f} MiB | |")
    elif pv:
        print(f"\npasses failed: {pv['error']}")
    ld = res.get("loader")
    if ld and "error" not in ld:
        cold = ld.get("deliver_cold_s", ld.get("deliver_first_s"))
        mem = ld["step_mem_s"]
        print("\n| loader / step (LandmarkDataset) | value |\n| --- | --- |")
        print(f"| one case, {a['levels']} levels, on disk | {ld['case_mib']:,.0f} MiB "
              f"(written in {_ms(ld['write_s'])}) |")
        print(f"| deliver one case as tensors, {'cold' if ld['cold_ok'] else 'first'} cache "
              f"(drop_caches {'ok' if ld['cold_ok'] else 'not writable'}) | {_ms(cold)} "
              f"({ld['case_mib'] / cold:,.0f} MiB/s) |")
        print(f"| deliver one case as tensors, hot cache | {_ms(ld['deliver_hot_s'])} |")
        print(f"| training step, arrays in memory | {_ms(mem)} |")
        for key, label in (("step_mmap_s", "memory-mapped, hot cache, stored [k, j, i]"),
                           ("step_cold_no_readahead_s", "memory-mapped, cold cache, no readahead"),
                           ("step_cold_readahead_s", "memory-mapped, cold cache, readahead")):
            if key in ld:
                print(f"| training step, {label} | {_ms(ld[key])} (ratio {ld[key] / mem:.2f}, "
                      "target <= 1.2) |")
        step_h100 = 3 * fwd_f / H100["fp32"]
        step_h100_t = 3 * fwd_f / H100["tf32"]
        print(f"| H100 training step floor (3 x forward FLOPs; fp32 / TF32) | "
              f"{_ms(step_h100)} / {_ms(step_h100_t)} |")
        print(f"| H100 epoch (167 cases) floor, compute only (fp32) | {167 * step_h100:.1f} s |")
        print(f"| epoch (167 cases) loader, cold reads at the rate above | {167 * cold:.1f} s |")
    elif ld:
        print(f"\nloader failed: {ld['error']}")


if __name__ == "__main__":
    sys.exit(main())
