#!/usr/bin/env bash
# One-node SLURM test cluster on this machine (Debian/Ubuntu, run as root).
#
#   .ci/slurm-setup.sh start      install (if needed), configure, start, wait until the node is idle
#   .ci/slurm-setup.sh stop       cancel jobs, stop slurmctld, slurmd and munged, verify they are gone
#   .ci/slurm-setup.sh restart    stop, then start
#   .ci/slurm-setup.sh status     print daemon PIDs and `sinfo`; exit 0 only if the node is usable
#   .ci/slurm-setup.sh install    apt-get install slurm-wlm munge (nothing else)
#   .ci/slurm-setup.sh configure  (re)write munge key, slurm.conf, gres.conf, state directories
#
# Every step is idempotent and every wait is bounded. The cluster has a single partition
# `debug` (default, no time limit) holding this host as its only node, with all its cores and
# memory and one GPU. There is no real GPU: gres.conf maps the GPU onto /dev/null, which is
# enough for SLURM to schedule and account for `--gpus=1` / `--gres=gpu:1` requests and to set
# CUDA_VISIBLE_DEVICES in the job. There is no accounting database either, so `sacct` does not
# work; finished jobs stay visible to `squeue` for MinJobAge (1 h). Snakemake's SLURM plugin must
# therefore be told `--slurm-status-command squeue` on this cluster.
#
# It refuses to overwrite an /etc/slurm/slurm.conf or gres.conf that it did not write itself
# (a real cluster's configuration), unless SLURM_SETUP_FORCE=1.
#
# Environment overrides: SLURM_SETUP_TIMEOUT (seconds to wait for the node, default 60),
# SLURM_SETUP_LOG_DIR (default /var/log/slurm).
set -euo pipefail

ACTION="${1:-start}"
TIMEOUT="${SLURM_SETUP_TIMEOUT:-60}"
CONF_DIR=/etc/slurm
LOG_DIR="${SLURM_SETUP_LOG_DIR:-/var/log/slurm}"
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_KEY=/etc/munge/munge.key
MUNGE_SOCKET_DIR=/run/munge
MUNGE_PID="$MUNGE_SOCKET_DIR/munged.pid"
PARTITION=debug
MARKER="One-node test cluster written by .ci/slurm-setup.sh"

log() { printf '[slurm-setup] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (installs packages and starts daemons)"
}

node_name() { hostname -s; }

# ---------------------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------------------
have_slurm() {
    local b
    for b in slurmctld slurmd sbatch squeue scancel scontrol sinfo srun munged munge unmunge; do
        command -v "$b" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1 || return 1
    done
}

slurm_version() { dpkg-query -W -f '${Version}' slurmctld 2>/dev/null || echo unknown; }

do_install() {
    need_root
    export PATH="$PATH:/usr/sbin:/sbin"
    if have_slurm; then
        log "slurm-wlm and munge already installed ($(slurm_version))"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install slurm-wlm and munge by hand"
    export DEBIAN_FRONTEND=noninteractive
    local pkgs=(slurm-wlm munge)
    log "installing ${pkgs[*]} with apt-get"
    # Try the existing package lists first (fast); refresh them if that fails.
    if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/tmp/slurm-setup-apt.log 2>&1; then
        log "apt-get install failed with the current lists; running apt-get update and retrying"
        apt-get update -q >>/tmp/slurm-setup-apt.log 2>&1 || { tail -n 20 /tmp/slurm-setup-apt.log >&2; die "apt-get update failed"; }
        apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>/tmp/slurm-setup-apt.log 2>&1 \
            || { tail -n 30 /tmp/slurm-setup-apt.log >&2; die "apt-get install ${pkgs[*]} failed"; }
    fi
    have_slurm || die "slurm binaries still missing after installation"
    log "installed slurm $(slurm_version)"
}

# ---------------------------------------------------------------------------------------
# configure
# ---------------------------------------------------------------------------------------

# Write $2 to $1 only if the content differs; returns 0 if the file changed.
write_if_changed() {
    local path="$1" content="$2"
    if [ -f "$path" ] && [ "$(cat "$path")" == "$content" ]; then
        return 1
    fi
    printf '%s\n' "$content" >"$path"
    return 0
}

# Hardware line for this host as slurmd detects it: "CPUs=2 Boards=1 ... RealMemory=24000".
detect_hardware() {
    local line
    line="$(slurmd -C 2>/dev/null | head -n 1)" || true
    case "$line" in
        NodeName=*) printf '%s\n' "$line" | sed -E 's/^NodeName=[^ ]+ //' ;;
        *)  # fallback: CPUs and memory from the kernel
            local cpus mem
            cpus="$(nproc)"
            mem="$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)"
            printf 'CPUs=%s RealMemory=%s\n' "$cpus" "$mem" ;;
    esac
}

CONFIG_CHANGED=0

do_configure() {
    need_root
    export PATH="$PATH:/usr/sbin:/sbin"
    have_slurm || die "slurm is not installed; run '$0 install' first"

    # munge: key, directories owned by the munge user
    id munge >/dev/null 2>&1 || die "user 'munge' missing (the munge package creates it)"
    mkdir -p /etc/munge /var/lib/munge /var/log/munge "$MUNGE_SOCKET_DIR"
    if [ ! -s "$MUNGE_KEY" ]; then
        log "creating munge key $MUNGE_KEY"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge "$MUNGE_KEY" /var/lib/munge /var/log/munge "$MUNGE_SOCKET_DIR"
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0755 "$MUNGE_SOCKET_DIR"
    chmod 0400 "$MUNGE_KEY"

    # slurm: state and log directories
    mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR"
    chmod 0755 /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR"

    local node hw cluster
    node="$(node_name)"
    hw="$(detect_hardware)"
    # ClusterName must be lower case.
    cluster="$(printf '%s' "$node" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9_\n' '_')"

    local slurm_conf
    slurm_conf="$(cat <<EOF
# ${MARKER} -- do not edit, it is rewritten.
ClusterName=${cluster}
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
# No cgroups: processes are tracked through /proc, tasks are not confined.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Schedule cores, memory and GPUs.
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
GresTypes=gpu
# No accounting database: sacct does not work, squeue shows finished jobs for MinJobAge s.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
MinJobAge=3600
ReturnToService=2
InactiveLimit=0
KillWait=5
Waittime=0
SlurmctldTimeout=60
SlurmdTimeout=60
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=${node} NodeAddr=127.0.0.1 ${hw} Gres=gpu:1 State=UNKNOWN
PartitionName=${PARTITION} Nodes=${node} Default=YES MaxTime=INFINITE State=UP
EOF
)"
    local gres_conf
    gres_conf="$(cat <<EOF
# ${MARKER}. No real GPU: /dev/null stands in for the device file.
AutoDetect=off
NodeName=${node} Name=gpu File=/dev/null
EOF
)"
    # Never overwrite the configuration of a real cluster (e.g. on a login node).
    local f
    for f in "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf"; do
        if [ -s "$f" ] && ! grep -qF ".ci/slurm-setup.sh" "$f" && [ "${SLURM_SETUP_FORCE:-0}" != 1 ]; then
            die "$f exists and was not written by this script; not touching it (SLURM_SETUP_FORCE=1 overrides)"
        fi
    done
    if write_if_changed "$CONF_DIR/slurm.conf" "$slurm_conf"; then CONFIG_CHANGED=1; fi
    if write_if_changed "$CONF_DIR/gres.conf" "$gres_conf"; then CONFIG_CHANGED=1; fi
    chmod 0644 "$CONF_DIR/slurm.conf" "$CONF_DIR/gres.conf"
    log "configured node ${node} (${hw}, 1 GPU) in partition ${PARTITION}"
}

# ---------------------------------------------------------------------------------------
# daemons
# ---------------------------------------------------------------------------------------
pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

pid_from_file() { if [ -s "$1" ]; then tr -dc '0-9' <"$1"; fi; }

# PIDs of running processes whose executable name is exactly $1.
pids_of() { pgrep -x "$1" 2>/dev/null | tr '\n' ' ' || true; }

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

ctld_ok() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

# Wait (bounded) until the command "$@" succeeds.
wait_for() {
    local what="$1" secs="$2"; shift 2
    local end=$((SECONDS + secs))
    until "$@"; do
        [ "$SECONDS" -lt "$end" ] || { log "timed out after ${secs}s waiting for ${what}"; return 1; }
        sleep 1
    done
}

slurmd_running() { pid_alive "$(pid_from_file "$SLURMD_PID")"; }

# Wait (bounded by $TIMEOUT) until "$2" succeeds; give up early when no process named $1 is
# left (the daemon forked and then died, e.g. on a configuration error).
wait_daemon() {
    local name="$1" check="$2" end=$((SECONDS + TIMEOUT)) start=$SECONDS
    until "$check"; do
        if [ $((SECONDS - start)) -ge 3 ] && [ -z "$(pids_of "$name")" ]; then
            log "$name exited during start-up"
            return 1
        fi
        [ "$SECONDS" -lt "$end" ] || { log "timed out after ${TIMEOUT}s waiting for $name"; return 1; }
        sleep 1
    done
}

node_state() { sinfo -h -N -n "$(node_name)" -o '%T' 2>/dev/null | head -n 1; }

node_idle() {
    local s
    s="$(node_state)"
    case "$s" in
        idle|mixed|allocated|completing) return 0 ;;
        *) return 1 ;;
    esac
}

dump_diagnostics() {
    log "---- diagnostics ----"
    { sinfo -N -l 2>&1 || true; scontrol show node "$(node_name)" 2>&1 || true; } >&2
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        [ -f "$f" ] && { log "tail $f"; tail -n 25 "$f" >&2; }
    done
}

start_munge() {
    if munge_ok; then
        log "munged already running"
        return 0
    fi
    local old
    old="$(pid_from_file "$MUNGE_PID")"
    if pid_alive "$old"; then kill "$old" 2>/dev/null || true; fi
    rm -f "$MUNGE_SOCKET_DIR/munge.socket.2" "$MUNGE_SOCKET_DIR/munge.socket.2.lock" "$MUNGE_PID"
    log "starting munged"
    runuser -u munge -- munged --force || die "munged failed to start (see /var/log/munge/munged.log)"
    wait_for "munged" 15 munge_ok || { dump_diagnostics; die "munge does not work"; }
}

start_slurmctld() {
    if pid_alive "$(pid_from_file "$CTLD_PID")" && ctld_ok; then
        log "slurmctld already running"
        return 0
    fi
    log "starting slurmctld"
    # -c: start from a clean state (no jobs or node states left over from an earlier run).
    slurmctld -c || { dump_diagnostics; die "slurmctld failed to start"; }
    wait_daemon slurmctld ctld_ok || { dump_diagnostics; die "slurmctld does not answer"; }
}

start_slurmd() {
    if pid_alive "$(pid_from_file "$SLURMD_PID")"; then
        log "slurmd already running"
        return 0
    fi
    log "starting slurmd"
    slurmd || { dump_diagnostics; die "slurmd failed to start"; }
    wait_daemon slurmd slurmd_running || { dump_diagnostics; die "slurmd did not stay up"; }
}

wait_node_idle() {
    local node end state
    node="$(node_name)"
    end=$((SECONDS + TIMEOUT))
    while :; do
        state="$(node_state)"
        case "$state" in
            idle|mixed|allocated|completing)
                log "node ${node} is ${state}"
                return 0 ;;
            *down*|*drain*|*fail*)
                log "node ${node} is ${state}; resuming it"
                scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;
        esac
        if [ "$SECONDS" -ge "$end" ]; then
            dump_diagnostics
            die "node ${node} not idle after ${TIMEOUT}s (state: ${state:-unknown})"
        fi
        sleep 1
    done
}

do_start() {
    need_root
    export PATH="$PATH:/usr/sbin:/sbin"
    do_install
    do_configure
    if [ "$CONFIG_CHANGED" -eq 1 ] && { pid_alive "$(pid_from_file "$CTLD_PID")" || pid_alive "$(pid_from_file "$SLURMD_PID")"; }; then
        log "configuration changed; restarting the SLURM daemons"
        stop_slurm_daemons
    fi
    start_munge
    start_slurmctld
    start_slurmd
    wait_node_idle
    log "cluster up: $(sinfo -h -o '%P %a %D %T %N')"
}

# Send TERM to the given PIDs, wait (bounded), then KILL what is left.
terminate_pids() {
    local what="$1"; shift
    local pids=() p left end
    [ "$#" -gt 0 ] || return 0
    mapfile -t pids < <(printf '%s\n' "$@" | sort -un)
    kill -TERM "${pids[@]}" 2>/dev/null || true
    end=$((SECONDS + 15))
    while :; do
        left=()
        for p in "${pids[@]}"; do pid_alive "$p" && left+=("$p"); done
        [ "${#left[@]}" -eq 0 ] && return 0
        if [ "$SECONDS" -ge "$end" ]; then
            log "$what did not stop on TERM; killing ${left[*]}"
            kill -KILL "${left[@]}" 2>/dev/null || true
            sleep 1
            return 0
        fi
        sleep 0.5
    done
}

stop_slurm_daemons() {
    local pids=() p
    # Cancel whatever is still queued or running, so no job steps outlive slurmd.
    if command -v squeue >/dev/null 2>&1 && ctld_ok; then
        local jobs
        jobs="$(squeue -h -t PENDING,RUNNING,SUSPENDED,CONFIGURING,COMPLETING -o '%i' 2>/dev/null | tr '\n' ' ' || true)"
        if [ -n "${jobs// /}" ]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            sleep 2
        fi
    fi
    for p in "$(pid_from_file "$SLURMD_PID")" $(pids_of slurmd); do pid_alive "$p" && pids+=("$p"); done
    terminate_pids slurmd "${pids[@]+"${pids[@]}"}"
    pids=()
    for p in $(pids_of slurmstepd); do pid_alive "$p" && pids+=("$p"); done
    terminate_pids slurmstepd "${pids[@]+"${pids[@]}"}"
    pids=()
    for p in "$(pid_from_file "$CTLD_PID")" $(pids_of slurmctld); do pid_alive "$p" && pids+=("$p"); done
    terminate_pids slurmctld "${pids[@]+"${pids[@]}"}"
    rm -f "$CTLD_PID" "$SLURMD_PID"
}

do_stop() {
    need_root
    export PATH="$PATH:/usr/sbin:/sbin"
    local pids=() p
    stop_slurm_daemons
    for p in "$(pid_from_file "$MUNGE_PID")" $(pids_of munged); do pid_alive "$p" && pids+=("$p"); done
    terminate_pids munged "${pids[@]+"${pids[@]}"}"
    local left
    left="$(pids_of slurmctld)$(pids_of slurmd)$(pids_of slurmstepd)$(pids_of munged)"
    if [ -n "${left// /}" ]; then
        die "still running after stop: $left"
    fi
    log "cluster stopped (no slurmctld, slurmd, slurmstepd or munged left)"
}

do_status() {
    export PATH="$PATH:/usr/sbin:/sbin"
    local rc=0
    printf 'slurmctld: %s\nslurmd:    %s\nmunged:    %s\n' \
        "$(pids_of slurmctld)" "$(pids_of slurmd)" "$(pids_of munged)"
    if command -v sinfo >/dev/null 2>&1 && ctld_ok; then
        sinfo -N -o '%N %P %T %c %m %G'
        node_idle || rc=1
    else
        echo "slurmctld not reachable"
        rc=1
    fi
    return "$rc"
}

case "$ACTION" in
    install) do_install ;;
    configure) do_configure ;;
    start) do_start ;;
    stop) do_stop ;;
    restart) do_stop; do_start ;;
    status) do_status ;;
    *) die "unknown action '$ACTION' (use start, stop, restart, status, install or configure)" ;;
esac
