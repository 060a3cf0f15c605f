"""docs/adding-a-method.md holds: its example, one module and one registry entry, applied to a
copy of the repository, gives a seventh method that validates, trains, reloads and runs
through the study."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "adding-a-method.md"
KEY = "mean_position"


def _code_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the workflow's files (src/, workflow/, config/, profiles/, envs/, Snakefile) with
    the page's method added."""
    copy = tmp_path_factory.mktemp("seventh") / "checkout"
    for name in ("src", "workflow", "config", "profiles", "envs"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns(
            "__pycache__", "*.egg-info"))
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(ROOT / name, copy / name)
    module, entry = _code_blocks()[:2]
    (copy / "src" / "locnet" / "models" / f"{KEY}.py").write_text(module)
    registry = copy / "src" / "locnet" / "methods.py"
    text = registry.read_text()
    end = "    )\n}\n"  # the close of REGISTRY's tuple and dict
    assert text.count(end) == 1, "REGISTRY no longer ends as the page assumes"
    registry.write_text(text.replace(end, entry + end))
    return copy


def _python(checkout: Path, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(checkout / "src"), TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_page_has_the_module_and_the_entry():
    module, entry = _code_blocks()[:2]
    assert f"def build(" in module and "register_keras_serializable" in module
    assert f'Method("{KEY}"' in entry and f"locnet.models.{KEY}:build" in entry


def test_the_new_method_validates_trains_and_reloads(checkout, tmp_path):
    run = _python(checkout, f"""
        import numpy as np, keras
        from locnet import config, methods
        from locnet.models import build_model
        assert methods.KEYS[-1] == "{KEY}", methods.KEYS
        cfg = config.validate({{"run_methods": ["{KEY}"], "methods": {{"{KEY}": {{"level": 2}}}}}})
        assert cfg["methods"]["{KEY}"]["level"] == 2
        grid = {{"finest_shape": 32, "finest_spacing_mm": 5.0, "levels": 3}}
        model = build_model("{KEY}", {{"landmarks": ["a", "b"], "level": 2}}, grid)
        model.compile(optimizer=keras.optimizers.Adam(0.05))
        rng = np.random.default_rng(0)
        x = {{"level2": rng.random((4, 8, 8, 8, 1), dtype=np.float32)}}
        target = np.array([[40.0, 60.0, 90.0], [110.0, 60.0, 90.0]], np.float32)
        y = {{"position": np.repeat(target[None], 4, 0), "mask": np.ones((4, 2), np.float32)}}
        before = np.abs(model.predict_on_batch(x)["position"][0] - target).max()
        for _ in range(300):
            model.train_on_batch(x, y)
        after = np.abs(model.predict_on_batch(x)["position"][0] - target).max()
        assert after < 0.1 * before, (before, after)
        model.save(r"{tmp_path / 'm.keras'}")
        back = keras.saving.load_model(r"{tmp_path / 'm.keras'}", compile=False)
        np.testing.assert_allclose(back.predict_on_batch(x)["position"],
                                   model.predict_on_batch(x)["position"], rtol=1e-6)
        print("ok", before, after)
    """)
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout + run.stderr[-4000:]


@pytest.mark.slow
def test_the_new_method_runs_through_the_study(checkout, tmp_path):
    work = tmp_path / "work"
    overlay = tmp_path / "seventh.yaml"
    overlay.write_text(f"results: results\nrun_methods: [{KEY}]\ntraining: {{seeds: 1, epochs: 2}}\n")
    env = dict(os.environ, MPLBACKEND="Agg", TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(checkout / "Snakefile"), "--directory",
         str(work), "--cores", "2", "--resources", "gpu=1", "--configfile",
         str(checkout / "config" / "tiny.yaml"), str(overlay)],
        env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    res = work / "results"
    assert (res / "models" / KEY / "seed0" / "model.keras").is_file()
    table = pd.read_csv(res / "tables" / "table1.csv")
    pooled = table[table["scope"] == "all"]
    row = pooled[pooled["method"] == KEY]
    assert len(row) == 1, table
    assert row["label"].iloc[0].startswith("Mean training position")
    assert pd.notna(row["mean_mm"].iloc[0]) and row["mean_mm"].iloc[0] > 0
    preds = pd.read_csv(res / "predictions" / f"{KEY}.csv")
    assert set(preds["seed"]) == {0} and preds["error_mm"].notna().all()
