"""locnet: multi-scale shift-equivariant landmark detection in 3D CT, as a reproducible study."""

import os
import re

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


# TensorFlow 2.21 prints, while it is imported, absl's "All log messages before
# absl::InitializeLog() ..." preamble and glog-style lines ("I0000 ... port.cc:153] oneDNN custom
# operations are on ...") before its own logging reads TF_CPP_MIN_LOG_LEVEL, so that setting
# does not hide them. import_tensorflow() imports it with the process's stderr (file
# descriptor 2) caught in a temporary file and writes back what the level lets through.
_GLOG_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ [^\]]+\] ")
_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called"


def _shown(line: str, level: int) -> bool:
    """Whether a line TensorFlow printed while imported passes ``TF_CPP_MIN_LOG_LEVEL``
    ``level`` (0 all, 1 no info, 2 no warnings, 3 no errors); other lines always do."""
    if line.startswith(_ABSL_PREAMBLE):
        return level < 1
    m = _GLOG_LINE.match(line)
    return m is None or "IWEF".index(m.group(1)) >= level


def import_tensorflow():
    """Import TensorFlow (and return it) so that its import-time log lines obey
    ``TF_CPP_MIN_LOG_LEVEL`` (default here: 2, warnings and errors hidden as in
    :func:`job_threads`); everything else it prints is kept. A no-op after the first import."""
    import sys
    import tempfile

    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        level = int(os.environ["TF_CPP_MIN_LOG_LEVEL"])
    except ValueError:
        level = 0
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import tensorflow
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            text = caught.read().decode(errors="replace")
            kept = "".join(l for l in text.splitlines(keepends=True) if _shown(l, level))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()
    return tensorflow
