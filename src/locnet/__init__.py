"""locnet: multi-scale shift-equivariant landmark detection in 3D CT, as a reproducible study."""

import os

__version__ = "0.1.0"

# TensorFlow turns its oneDNN kernels on by default only on CPUs with AVX-512 (and a few
# others); on an AVX2-only CPU (AMD EPYC Zen 2 here) the 3D convolutions then fall back to
# Eigen and a U-Net training step is 5-8x slower (benchmarks/README.md, "oneDNN"). Every
# entry point imports locnet before TensorFlow, so asking for oneDNN here makes every machine
# run the same kernels. A value the user set wins (TF_ENABLE_ONEDNN_OPTS=0 turns it off).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
