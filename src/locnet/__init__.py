"""locnet: multi-scale shift-equivariant landmark detection in 3D CT, as a reproducible study."""

import os

__version__ = "0.1.0"

# TensorFlow turns its oneDNN kernels on by default only on CPUs with AVX-512 (and a few
# others); on an AVX2-only CPU (AMD EPYC Zen 2 here) the 3D convolutions then fall back to
# Eigen and a U-Net training step is 5-8x slower (benchmarks/README.md, "oneDNN"). Every
# entry point imports locnet before TensorFlow, so asking for oneDNN here makes every machine
# run the same kernels. A value the user set wins (TF_ENABLE_ONEDNN_OPTS=0 turns it off).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def job_threads(threads: int) -> None:
    """TensorFlow's settings for a workflow job on ``threads`` cores; call it before
    TensorFlow is imported (importing locnet does not import it). The intra-op pool gets
    ``threads``; the inter-op pool at most 2, so that one-thread jobs side by side
    (profiles/cpu) do not each start a pool as wide as the machine; TensorFlow's C++ log
    shows warnings and errors only. Values the user set win."""
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", str(min(2, threads)))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
