"""Run a Snakemake workflow on a real one-node SLURM cluster on this machine.

The cluster is installed, configured, started and stopped by ``.ci/slurm-setup.sh`` (root
only). This module wraps that script for tests and runs Snakemake against the cluster with
the repository's SLURM profile (``profiles/slurm``):

    import sys
    sys.path.insert(0, str(Path(__file__).parent / "slurm"))    # from a module in tests/
    from cluster import REPO_ROOT, run_snakemake_on_slurm, slurm_cluster  # fixture + helper

    def test_tiny_study(slurm_cluster, tmp_path):
        run = run_snakemake_on_slurm(
            workdir=tmp_path,
            snakefile=REPO_ROOT / "workflow" / "Snakefile",
            configfile=REPO_ROOT / "config" / "tiny.yaml",
            timeout=1800,
        )
        assert run.submitted_rules() >= {"train", "predict"}

The test cluster has no accounting database, so Snakemake is told to check job status with
``squeue`` (finished jobs stay visible for MinJobAge = 1 h), and to poll every second instead
of every 40 s (``SLURM_TEST_ARGS``).
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = REPO_ROOT / ".ci" / "slurm-setup.sh"
SLURM_PROFILE = REPO_ROOT / "profiles" / "slurm"
TEST_WORKFLOW = Path(__file__).resolve().parent / "workflow"
SLURM_LOG_DIR = Path(os.environ.get("SLURM_SETUP_LOG_DIR", "/var/log/slurm"))
LOCK_FILE = Path(os.environ.get("LOCNET_SLURM_LOCK", "/tmp/locnet-slurm-cluster.lock"))

#: Daemons of the test cluster (process names as in /proc/PID/comm).
DAEMONS = ("slurmctld", "slurmd", "slurmstepd", "munged")

#: Options every run on the test cluster needs on top of the profile: no sacct here, so
#: status via squeue; poll quickly; keep the SLURM logs of successful jobs for inspection.
SLURM_TEST_ARGS = (
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "1",
    "--slurm-keep-successful-logs",
)

_SUBMITTED_RE = re.compile(
    r"Job (?P<jobid>\d+) has been submitted with SLURM jobid (?P<slurm_id>\d+) "
    r"\(log: (?P<log>[^)]*)\)"
)
_RUN_ID_RE = re.compile(r"SLURM run ID: (?P<run_id>\S+)")


class SlurmRunError(AssertionError):
    """Snakemake failed or timed out on the cluster; the message carries diagnostics."""


# ---------------------------------------------------------------------------------------
# cluster control
# ---------------------------------------------------------------------------------------
def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    # Never let the caller's SLURM job context or GPU selection leak into the test cluster.
    for key in list(env):
        if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SNAKEMAKE_PROFILE")):
            env.pop(key)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
    return env


def slurm_installed() -> bool:
    env = _clean_env()
    return all(
        shutil.which(b, path=env["PATH"]) for b in ("slurmctld", "slurmd", "sbatch", "munged")
    )


def unavailable_reason() -> str | None:
    """Why a test cluster cannot be set up here, or None if it can."""
    if os.environ.get("LOCNET_SKIP_SLURM", "") not in ("", "0"):
        return "LOCNET_SKIP_SLURM is set"
    if platform.system() != "Linux":
        return "the SLURM test cluster needs Linux"
    if os.geteuid() != 0:
        return "the SLURM test cluster needs root (it installs packages and starts daemons)"
    if not SETUP_SCRIPT.exists():
        return f"{SETUP_SCRIPT} is missing"
    for conf in (Path("/etc/slurm/slurm.conf"), Path("/etc/slurm/gres.conf")):
        try:
            text = conf.read_text(errors="replace")
        except OSError:
            continue
        if text.strip() and ".ci/slurm-setup.sh" not in text:
            return f"{conf} belongs to another SLURM installation; not replacing it"
    if not slurm_installed() and shutil.which("apt-get") is None:
        return "SLURM is not installed and apt-get is not available to install it"
    return None


def _setup(action: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SETUP_SCRIPT), action],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        env=_clean_env(),
        cwd=REPO_ROOT,
    )


def install_cluster(timeout: float = 900) -> subprocess.CompletedProcess:
    """apt-get install slurm-wlm munge (no-op when installed)."""
    return _setup("install", timeout)


def start_cluster(timeout: float = 300) -> None:
    """Configure and start the cluster; wait until the node is idle."""
    proc = _setup("start", timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{SETUP_SCRIPT} start failed:\n{proc.stdout}")


def stop_cluster(timeout: float = 120) -> None:
    """Stop every daemon of the cluster and check that none is left."""
    proc = _setup("stop", timeout)
    left = cluster_processes()
    if proc.returncode != 0 or left:
        raise RuntimeError(
            f"{SETUP_SCRIPT} stop failed (rc={proc.returncode}, left: {left}):\n{proc.stdout}"
        )


def cluster_processes() -> dict[str, list[int]]:
    """Running cluster daemons: name -> PIDs (read from /proc, no external tools)."""
    found: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if name in DAEMONS:
            found.setdefault(name, []).append(int(entry.name))
    return found


@contextlib.contextmanager
def cluster_lock(timeout: float = 1800):
    """Hold an exclusive lock on the test cluster, so that test sessions running at the same
    time on one machine take turns instead of stopping the cluster under each other."""
    import fcntl

    with open(LOCK_FILE, "a+") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                fh.seek(0)
                if fh.read().strip() == str(os.getpid()):
                    yield  # this process holds it already
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"SLURM test cluster still busy after {timeout:.0f} s")
                time.sleep(1)
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cmd_output(cmd: Sequence[str], timeout: float = 20) -> str:
    try:
        proc = subprocess.run(
            list(cmd),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            env=_clean_env(),
        )
        return proc.stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"<{' '.join(cmd)} failed: {exc}>"


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


def diagnostics() -> str:
    """squeue, scontrol show jobs/nodes and the daemon log tails, for failure messages."""
    parts = [
        ("sinfo", _cmd_output(["sinfo", "-N", "-l"])),
        ("squeue --states=all", _cmd_output(
            ["squeue", "--states=all", "-o", "%i %j %T %r %b %m %l %M %N %k"])),
        ("scontrol -d show jobs", _cmd_output(["scontrol", "-d", "show", "jobs"])),
        ("scontrol show nodes", _cmd_output(["scontrol", "show", "nodes"])),
        ("slurmctld.log", _tail(SLURM_LOG_DIR / "slurmctld.log")),
        ("slurmd.log", _tail(SLURM_LOG_DIR / "slurmd.log")),
    ]
    return "\n".join(f"===== {title}\n{text}" for title, text in parts)


# ---------------------------------------------------------------------------------------
# running Snakemake
# ---------------------------------------------------------------------------------------
@dataclass
class SubmittedJob:
    snakemake_jobid: int
    slurm_jobid: str
    rule: str
    wildcards: str
    log: Path


@dataclass
class SlurmRun:
    """Outcome of ``run_snakemake_on_slurm``."""

    command: list[str]
    returncode: int
    output: str
    workdir: Path
    seconds: float
    run_id: str | None = None
    jobs: list[SubmittedJob] = field(default_factory=list)

    def submitted_rules(self) -> set[str]:
        return {j.rule for j in self.jobs}

    def jobs_of(self, rule: str) -> list[SubmittedJob]:
        return [j for j in self.jobs if j.rule == rule]

    def squeue(self) -> dict[str, dict[str, str]]:
        """State, memory, GRES/TRES request and time limit of this run's SLURM jobs
        (finished jobs included, for MinJobAge)."""
        if not self.run_id:
            return {}
        out = _cmd_output(
            ["squeue", "--states=all", "--noheader", "--name", self.run_id,
             "--format=%i|%T|%m|%b|%l|%C"]
        )
        result = {}
        for line in out.splitlines():
            fields = line.strip().split("|")
            if len(fields) == 6:
                jobid, state, mem, tres, limit, cpus = fields
                result[jobid] = {"state": state, "mem": mem, "tres_per_node": tres,
                                 "time_limit": limit, "cpus": cpus}
        return result


def _parse_jobs(output: str) -> list[SubmittedJob]:
    jobs = []
    for m in _SUBMITTED_RE.finditer(output):
        log = Path(m["log"])
        # .snakemake/slurm_logs/rule_<rule>[/<wildcards>]/<jobid>.log
        parts = log.parts
        try:
            idx = max(i for i, p in enumerate(parts) if p == "slurm_logs")
        except ValueError:
            idx = None
        rule, wildcards = "?", ""
        if idx is not None and len(parts) > idx + 1:
            rule = parts[idx + 1].removeprefix("rule_").removeprefix("group_")
            if len(parts) > idx + 3:
                wildcards = "/".join(parts[idx + 2:-1])
        jobs.append(SubmittedJob(int(m["jobid"]), m["slurm_id"], rule, wildcards, log))
    return jobs


def _kill_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """Interrupt Snakemake (it scancels its jobs), then kill it if it does not exit."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def run_snakemake_on_slurm(
    workdir: str | os.PathLike,
    snakefile: str | os.PathLike,
    configfile: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    extra_args: Iterable[str] = (),
    timeout: float = 300,
    *,
    profile: str | os.PathLike = SLURM_PROFILE,
    check: bool = True,
    targets: Iterable[str] = (),
) -> SlurmRun:
    """Run Snakemake with the SLURM profile in ``workdir`` and wait (bounded) for it.

    The default workflow profile (profiles/default) is switched off with
    ``--workflow-profile none``; threads are capped at this machine's cores
    (``--max-threads``). ``extra_args`` go last, so they win over the profile and these
    defaults; use them to shrink memory requests above this machine's memory, e.g.
    ``["--set-resources", "train:mem_mb=4000"]``.
    On timeout the run is interrupted (Snakemake cancels its SLURM jobs), leftover jobs of
    the run are cancelled, and ``SlurmRunError`` is raised with squeue/scontrol output and
    the daemon log tails. With ``check`` (default) a non-zero exit raises it too.
    The whole Snakemake output is also written to ``workdir/snakemake-slurm.log``.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(Path(snakefile).resolve()),
        "--directory", str(workdir),
        "--profile", str(Path(profile).resolve()),
        "--workflow-profile", "none",
        *SLURM_TEST_ARGS,
        # The one node has only this machine's cores: cap every rule's threads (and so its
        # --cpus-per-task), or sbatch rejects jobs that ask for more.
        "--max-threads", str(os.cpu_count() or 1),
    ]
    if configfile is not None:
        files = [configfile] if isinstance(configfile, (str, os.PathLike)) else list(configfile)
        cmd += ["--configfile", *[str(Path(f).resolve()) for f in files]]
    cmd += list(extra_args)
    targets = list(targets)
    if targets:
        cmd += ["--", *targets]

    log_path = workdir / "snakemake-slurm.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            snapshot = diagnostics()
            _kill_group(proc)
    seconds = time.monotonic() - start
    output = log_path.read_text(errors="replace")
    m = _RUN_ID_RE.search(output)
    run = SlurmRun(
        command=cmd,
        returncode=proc.returncode if proc.returncode is not None else -9,
        output=output,
        workdir=workdir,
        seconds=seconds,
        run_id=m["run_id"] if m else None,
        jobs=_parse_jobs(output),
    )
    if timed_out:
        if run.run_id:
            _cmd_output(["scancel", "--name", run.run_id])
        raise SlurmRunError(
            f"snakemake did not finish within {timeout:.0f} s on the SLURM test cluster\n"
            f"command: {' '.join(cmd)}\n"
            f"----- snakemake output (tail)\n{_tail(log_path, 80)}\n{snapshot}"
        )
    if check and run.returncode != 0:
        raise SlurmRunError(
            f"snakemake failed (exit {run.returncode}) on the SLURM test cluster\n"
            f"command: {' '.join(cmd)}\n"
            f"----- snakemake output (tail)\n{_tail(log_path, 120)}\n{diagnostics()}"
        )
    return run


def copy_test_workflow(dest: str | os.PathLike) -> Path:
    """Copy the harness's test workflow into ``dest``; returns the copied Snakefile."""
    dest = Path(dest)
    shutil.copytree(TEST_WORKFLOW, dest, dirs_exist_ok=True)
    return dest / "Snakefile"


# ---------------------------------------------------------------------------------------
# pytest fixture
# ---------------------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # the helpers above work without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def slurm_cluster():
        """A running one-node SLURM cluster for the tests of one module.

        Skips when the cluster cannot be set up here (not root, no apt-get and no SLURM, or
        installing the packages fails). Stops the cluster afterwards and checks that no
        daemon is left.
        """
        reason = unavailable_reason()
        if reason:
            pytest.skip(reason)
        if not slurm_installed():
            proc = install_cluster()
            if proc.returncode != 0:
                pytest.skip(f"could not install SLURM with apt-get:\n{proc.stdout[-2000:]}")
        with cluster_lock():
            started = time.monotonic()
            try:
                start_cluster()
            except BaseException:
                with contextlib.suppress(Exception):
                    stop_cluster()
                raise
            info = {
                "node": platform.node().split(".")[0],
                "partition": "debug",
                "start_seconds": time.monotonic() - started,
            }
            try:
                yield info
            finally:
                stop_cluster()
                left = cluster_processes()
                assert not left, f"cluster still running: {left}"
