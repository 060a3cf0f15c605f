"""Backend neutrality: the layer and model tests also pass under the PyTorch backend.

The models use ``keras.ops`` only, so the same tests must pass with ``KERAS_BACKEND=torch``.
Keras fixes its backend at import time, so the tests run in a child interpreter with the
environment variable set. Tests that need TensorFlow itself (gradient checks with
``tf.GradientTape``) skip themselves there; everything else must pass.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITES = ["tests/test_layers.py", "tests/test_models.py"]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason="torch is not installed: the PyTorch-backend run needs `pip install torch==2.13.0`",
)


def _run_under(backend: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend
    # the child must import the same locnet sources as this process
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )


def _count(summary: str, word: str) -> int:
    m = re.search(rf"(\d+) {word}", summary)
    return int(m.group(1)) if m else 0


def test_layers_and_models_under_torch_backend():
    proc = _run_under("torch")
    out = proc.stdout + proc.stderr
    tail = "\n".join(out.strip().splitlines()[-40:])
    assert proc.returncode == 0, f"tests failed under KERAS_BACKEND=torch:\n{tail}"
    passed = _count(out, "passed")
    assert passed > 0, f"no test ran under KERAS_BACKEND=torch:\n{tail}"
    assert _count(out, "failed") == 0 and _count(out, "error") == 0, tail
