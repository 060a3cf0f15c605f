"""Shared pytest fixtures and hooks: synthetic NIfTI helpers, backend-dependent skips."""

from __future__ import annotations

from pathlib import Path

import locnet  # noqa: F401  (before TensorFlow: it asks for the oneDNN kernels)
import nibabel as nib
import numpy as np
import pytest


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``tensorflow_only`` when Keras runs another backend (tests/test_backends.py
    reruns the layer and model tests under ``KERAS_BACKEND=torch`` and ``jax``)."""
    import keras

    if keras.backend.backend() == "tensorflow":
        return
    skip = pytest.mark.skip(reason=f"uses TensorFlow itself; Keras backend is "
                                   f"{keras.backend.backend()}")
    for item in items:
        if "tensorflow_only" in item.keywords:
            item.add_marker(skip)


def oblique_affine(angles_deg=(5.0, -7.0, 3.0), spacing=(0.9, 1.1, 1.6), origin=(-20.0, 13.0, 7.5)):
    """A voxel -> RAS affine with a small rotation about each axis and anisotropic voxels."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


@pytest.fixture(name="oblique_affine")
def oblique_affine_fixture():
    """The :func:`oblique_affine` factory."""
    return oblique_affine


@pytest.fixture
def write_nifti(tmp_path: Path):
    """Factory ``write_nifti(data, affine, name="scan.nii.gz") -> Path`` in ``tmp_path``."""

    def _write(data, affine, name="scan.nii.gz"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=float)), str(path))
        return path

    return _write


# ---- the whole tiny study, run once per test session ------------------------------------
REPO_ROOT = Path(__file__).resolve().parents[1]


def run_snakemake(workdir, *args, timeout=900):
    """``snakemake -s Snakefile --directory workdir ARGS`` in a subprocess (captured)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MPLBACKEND="Agg")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile"),
           "--directory", str(workdir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    """Results folder of the whole study on config/tiny.yaml, run locally (about 2 min)."""
    work = tmp_path_factory.mktemp("tiny_study")
    run = run_snakemake(work, "--cores", "2", "--resources", "gpu=1", "--configfile",
                        str(REPO_ROOT / "config" / "tiny.yaml"), "--config", "results=results")
    if run.returncode != 0:
        pytest.fail(f"tiny study failed:\n{run.stdout[-5000:]}\n{run.stderr[-8000:]}")
    return work / "results"
