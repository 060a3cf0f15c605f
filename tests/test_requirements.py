"""The pinned package lists agree with each other (they are edited by hand or by scripts/lock.sh).

A drifted pin means that the study, the conda environment, the GPU lock or the accelerator
benchmark would run other versions than the ones the tests ran with.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^\s*(?:-\s+)?([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s#]+)")


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = PIN.match(line)
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(3)
    return out


def test_cpu_gpu_and_conda_pins_agree():
    cpu = _pins(ROOT / "requirements" / "cpu.txt")
    gpu = _pins(ROOT / "requirements" / "gpu.txt")
    conda = _pins(ROOT / "envs" / "locnet.yaml")
    assert len(cpu) > 50 and cpu["keras"] and cpu["snakemake"]
    # the GPU lock swaps the CPU build of TensorFlow for the CUDA one, nothing else
    assert gpu.pop("tensorflow") == cpu["tensorflow-cpu"]
    assert {k: v for k, v in cpu.items() if k != "tensorflow-cpu"} == gpu
    assert conda == cpu


def test_accelerator_benchmark_pins_are_the_locked_versions():
    cpu = _pins(ROOT / "requirements" / "cpu.txt")
    bench = _pins(ROOT / "benchmarks" / "gpu-requirements.txt")
    assert {"keras", "nibabel"} <= set(bench)
    assert bench == {k: cpu[k] for k in bench}
