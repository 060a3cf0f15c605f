"""Backend neutrality: the layer and model tests also pass under the PyTorch and JAX backends.

The models use ``keras.ops`` only, so the same tests must pass with ``KERAS_BACKEND=torch`` and
``KERAS_BACKEND=jax`` (the backend of the GPU benchmark where TensorFlow is absent). Keras fixes
its backend at import time, so the tests run in a child interpreter with the environment
variable set. Tests marked ``tensorflow_only`` (gradient checks with ``tf.GradientTape``) skip
themselves there; everything else must pass. A backend whose package is not installed is
skipped here, unless ``LOCNET_TEST_BACKENDS=1`` or ``CI=true`` asked for the backend runs
(``scripts/test.sh`` then installs both): there a missing backend fails, so that CI cannot pass
without having run them.
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

INSTALL = {"torch": "torch==2.13.0", "jax": "jax==0.10.2"}


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


def _backends_required() -> bool:
    """The same condition under which ``scripts/test.sh`` installs the backends."""
    env = os.environ
    return env.get("CI") == "true" or (env.get("LOCNET_TEST_BACKENDS") or env.get("LOCNET_TEST_TORCH")) == "1"


def _count(summary: str, word: str) -> int:
    m = re.search(rf"(\d+) {word}", summary)
    return int(m.group(1)) if m else 0


@pytest.mark.parametrize("backend", sorted(INSTALL))
def test_layers_and_models_under_other_backends(backend):
    if importlib.util.find_spec(backend) is None:
        message = f"{backend} is not installed: `pip install {INSTALL[backend]}`"
        if _backends_required():
            pytest.fail(f"{message} (LOCNET_TEST_BACKENDS=1 or CI=true asks for this run)")
        pytest.skip(message)
    proc = _run_under(backend)
    out = proc.stdout + proc.stderr
    tail = "\n".join(out.strip().splitlines()[-40:])
    assert proc.returncode == 0, f"tests failed under KERAS_BACKEND={backend}:\n{tail}"
    passed = _count(out, "passed")
    assert passed > 0, f"no test ran under KERAS_BACKEND={backend}:\n{tail}"
    assert _count(out, "failed") == 0 and _count(out, "error") == 0, tail
    # exactly the TensorFlow-only tests skip, and under torch (which runs eagerly by design)
    # the tests that a compiled call does not run the model in Python; nothing else
    tf_only = sum((ROOT / f).read_text().count("@pytest.mark.tensorflow_only") for f in SUITES)
    skips = re.findall(r"SKIPPED \[(\d+)\] \S+: (.*)", out)
    tf_skips = sum(int(n) for n, why in skips if why.startswith("uses TensorFlow itself"))
    eager_skips = sum(int(n) for n, why in skips
                      if why.startswith("the torch backend runs the model in Python"))
    assert tf_skips == tf_only, tail
    assert eager_skips == 0 or backend == "torch", tail
    assert _count(out, "skipped") == tf_skips + eager_skips, tail
