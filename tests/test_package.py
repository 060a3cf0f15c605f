"""The installed package: what it ships and what importing it sets up."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env_after_import(extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env.update(extra, PYTHONPATH=str(ROOT / "src"))
    out = subprocess.run([sys.executable, "-c", "import os, locnet; "
                          "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'))"],
                         env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_importing_locnet_asks_for_onednn_unless_the_user_chose():
    assert _env_after_import({}) == "1"
    assert _env_after_import({"TF_ENABLE_ONEDNN_OPTS": "0"}) == "0"


@pytest.mark.slow
def test_the_wheel_ships_the_config_schema(tmp_path):
    """The schema is package data: an installed locnet validates configs without the
    repository beside it."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("locnet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "locnet/config.schema.yaml" in names
    assert "locnet/models/multiscale.py" in names and "locnet/methods.py" in names
    # installed elsewhere, it finds its schema and the registry's methods
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", "import locnet.config as c; "
                          "print(c.SCHEMA_PATH); print(c.validate({})['run_methods'])"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    schema_path, methods = out.stdout.splitlines()
    assert schema_path.startswith(str(target))
    assert "multiscale_e2e_noise" in methods
