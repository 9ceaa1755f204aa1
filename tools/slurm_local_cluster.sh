#!/usr/bin/env bash
# slurm_local_cluster.sh -- turn this machine into a one-node SLURM cluster
# (real slurmctld + slurmd + munged, no systemd needed) for tests and CI.
#
# Usage:  tools/slurm_local_cluster.sh [start|stop|restart|status]   (default: start)
#   start    install slurm/munge if missing (root only; exit 3 otherwise),
#            write /etc/slurm/slurm.conf, start munged, slurmctld,
#            slurmd and wait until the node is idle. Idempotent: if the cluster
#            is already up and the config unchanged it returns at once.
#   stop     stop slurmd, slurmctld and munged.
#   restart  stop then start.
#   status   print `scontrol ping` and `sinfo`; exit 0 if healthy, else 1.
# Cluster: ClusterName=medpretrain-ci, partition `debug` (default) = this host,
# partition `gpu` (State=DOWN) = gpunode[1-2], two fake CLOUD 8-GPU nodes that
# only exist so that `sbatch --test-only -p gpu ...` can validate GPU job
# scripts. No accounting DB: finished jobs stay in squeue/scontrol for
# MinJobAge=600 s. Env: SLURM_LOCAL_VERBOSE=1 for chatty output,
# SLURM_LOCAL_WAIT=60 seconds to wait for the node to become idle,
# SLURM_LOCAL_CRED_EXPIRE=10 (AuthInfo=cred_expire; a requeued job restarts
# after about that many seconds; Slurm's default would be 120).
set -euo pipefail

export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"

ACTION="${1:-start}"
VERBOSE="${SLURM_LOCAL_VERBOSE:-0}"
WAIT_S="${SLURM_LOCAL_WAIT:-60}"
CRED_EXPIRE="${SLURM_LOCAL_CRED_EXPIRE:-10}"

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm
CTLD_LOG="$LOG_DIR/slurmctld.log"
SLURMD_LOG="$LOG_DIR/slurmd.log"
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
STATE_DIR=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
MUNGE_PID="$MUNGE_RUN/munged.pid"
MUNGE_LOG=/var/log/munge/munged.log

NODE="$(hostname -s)"

log()  { echo "slurm_local_cluster: $*"; }
vlog() { if [ "$VERBOSE" = 1 ]; then log "$@"; fi; }
is_root() { [ "$(id -u)" -eq 0 ]; }

tail_logs() {
    local f
    for f in "$CTLD_LOG" "$SLURMD_LOG" "$MUNGE_LOG" "$LOG_DIR/slurmctld.stderr" "$LOG_DIR/slurmd.stderr"; do
        if [ -s "$f" ]; then
            echo "----- last lines of $f -----" >&2
            tail -n 25 "$f" >&2 || true
        fi
    done
}

die() {  # die CODE MESSAGE
    local code="$1"; shift
    echo "slurm_local_cluster: ERROR: $*" >&2
    tail_logs
    exit "$code"
}

on_err() {
    local rc=$? line="$1"
    trap - ERR
    echo "slurm_local_cluster: ERROR: command failed (exit $rc) at line $line" >&2
    tail_logs
    exit "$rc"
}
trap 'on_err $LINENO' ERR

have_all_binaries() {
    local b
    for b in sbatch srun squeue sinfo scontrol slurmctld slurmd munged munge unmunge; do
        command -v "$b" >/dev/null 2>&1 || return 1
    done
}

# ---------------------------------------------------------------- install
ensure_installed() {
    have_all_binaries && return 0
    if ! is_root; then
        echo "slurm_local_cluster: SLURM/munge are not installed (need sbatch, slurmctld, slurmd, munged)." >&2
        echo "  Run this script as root, or: sudo apt-get install slurmctld slurmd slurm-client munge" >&2
        exit 3
    fi
    command -v apt-get >/dev/null 2>&1 || die 3 "SLURM missing and apt-get not available; install slurmctld slurmd slurm-client munge by hand"
    log "installing slurmctld slurmd slurm-client munge (apt-get) ..."
    local t0=$SECONDS
    # Debian 12: slurm-wlm 22.05; --no-install-recommends keeps it to 8 packages.
    # policy-rc.d / missing systemd make the postinst "start" a harmless no-op.
    apt-get update -qq >/dev/null || die 4 "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/tmp/slurm_local_cluster.apt.log 2>&1 \
        || { tail -n 30 /tmp/slurm_local_cluster.apt.log >&2; die 4 "apt-get install failed"; }
    have_all_binaries || die 4 "packages installed but SLURM/munge binaries still missing"
    log "installed in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------- hostname
ensure_hostname_resolves() {
    if getent hosts "$NODE" >/dev/null 2>&1; then return 0; fi
    is_root || die 3 "hostname '$NODE' does not resolve and we are not root to fix /etc/hosts"
    log "hostname '$NODE' does not resolve; adding it to /etc/hosts as 127.0.0.1"
    # /etc/hosts may be a bind mount: append in place, never replace the file.
    printf '127.0.0.1\t%s\n' "$NODE" >>/etc/hosts || die 5 "cannot write /etc/hosts"
    getent hosts "$NODE" >/dev/null 2>&1 || die 5 "hostname '$NODE' still does not resolve"
}

# ---------------------------------------------------------------- munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

ensure_munge() {
    if munge_ok; then vlog "munged already running"; return 0; fi
    is_root || exit_not_root "munged is not running"
    if [ ! -s "$MUNGE_KEY" ]; then
        log "creating munge key $MUNGE_KEY"
        mkdir -p "$(dirname "$MUNGE_KEY")"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$MUNGE_KEY" --force >/dev/null
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY" "$(dirname "$MUNGE_KEY")"
    chmod 0400 "$MUNGE_KEY"
    chmod 0700 "$(dirname "$MUNGE_KEY")"
    mkdir -p "$MUNGE_RUN" /var/lib/munge /var/log/munge
    chown munge:munge "$MUNGE_RUN" /var/lib/munge /var/log/munge
    chmod 0755 "$MUNGE_RUN"
    if [ -n "$(daemon_pid munged "$MUNGE_PID")" ]; then
        log "munged is running but 'munge -n | unmunge' fails; restarting it"
        stop_daemon munged "$MUNGE_PID"
    fi
    # A stale socket/pid from a killed munged makes a new one refuse to start.
    rm -f "$MUNGE_PID" "$MUNGE_RUN"/munge.socket.2 "$MUNGE_RUN"/munge.socket.2.lock 2>/dev/null || true
    local started=0
    if id munge >/dev/null 2>&1 && command -v runuser >/dev/null 2>&1 \
        && runuser -u munge -- munged >/dev/null 2>&1 9>&-; then
        started=1; vlog "munged started as user munge"
    elif munged --force >/dev/null 2>&1 9>&-; then
        started=1; log "munged started as root with --force (could not start as user munge)"
    fi
    [ "$started" = 1 ] || die 6 "could not start munged"
    local i
    for i in $(seq 1 20); do munge_ok && return 0; sleep 0.25; done
    die 6 "munged started but 'munge -n | unmunge' fails"
}

# ---------------------------------------------------------------- config
node_line() {
    # CPUs = nproc; the socket/core/thread layout from `slurmd -C` when it
    # agrees with nproc; RealMemory a bit (5%, >= 512 MB) under the total.
    local ncpu hw mem sockets cores threads boards hwcpus reserve
    ncpu="$(nproc)"
    hw="$(slurmd -C 2>/dev/null | head -n 1 || true)"
    mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
    if [ -z "$mem" ]; then mem=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 )); fi
    reserve=$(( mem / 20 )); [ "$reserve" -ge 512 ] || reserve=512
    mem=$(( mem > reserve + 256 ? mem - reserve : 256 ))
    hwcpus="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")"
    boards="$(sed -n 's/.*Boards=\([0-9]*\).*/\1/p' <<<"$hw")"
    sockets="$(sed -n 's/.*SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$hw")"
    cores="$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$hw")"
    threads="$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$hw")"
    if [ -n "$hwcpus" ] && [ "$hwcpus" = "$ncpu" ] && [ -n "$sockets" ] && [ -n "$cores" ] && [ -n "$threads" ] \
        && [ "$(( ${boards:-1} * sockets * cores * threads ))" = "$ncpu" ]; then
        echo "NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$ncpu Boards=${boards:-1} SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem State=UNKNOWN"
    else
        echo "NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$ncpu RealMemory=$mem State=UNKNOWN"
    fi
}

render_conf() {
    cat <<EOF
# Written by tools/slurm_local_cluster.sh -- one-node SLURM cluster for tests/CI.
# Do not edit by hand: the script rewrites it when it differs.
ClusterName=medpretrain-ci
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire (default 120 s) is also how long a requeued job waits before it
# may start again (its BeginTime = requeue time + cred_expire + 1): keep short.
AuthInfo=cred_expire=$CRED_EXPIRE
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
# containers have no usable (delegated) cgroups: track by process tree, no binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
# Power saving exists only to keep the fake CLOUD nodes powered down (= never
# contacted) across slurmctld restarts/reconfigures: without it slurmctld
# clears their POWER_SAVE flag from the saved state, they turn "idle", get
# pinged (unresolvable names) and end up DOWN, which breaks --test-only.
SuspendProgram=/bin/true
ResumeProgram=/bin/true
SuspendTime=600
SuspendExcNodes=$NODE
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2,sched_min_interval=0,batch_sched_delay=0
# no accounting DB: keep finished jobs visible to squeue/scontrol for 10 min
MinJobAge=600
JobRequeue=1
ReturnToService=2
KillWait=30
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=10
# never drain the node because the container reports less than configured
SlurmdParameters=config_overrides
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info
# the real, local node
$(node_line)
# Fake GPU nodes, only for 'sbatch --test-only -p gpu ...' (validates e.g.
# --nodes=2 --gpus-per-node=8). State=CLOUD (powered down, never contacted) is
# what --test-only accepts; FUTURE and DOWN nodes are rejected ("Requested node
# configuration is not available"). The partition is DOWN so that a real
# submission just pends (Reason=PartitionDown) instead of "powering up" nodes
# that do not exist. Count-only GPUs: no gres.conf needed.
NodeName=gpunode[1-2] CPUs=64 RealMemory=500000 Gres=gpu:8 State=CLOUD
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=gpunode[1-2] Default=NO MaxTime=INFINITE State=DOWN
EOF
}

# Writes the config files if they differ; sets CONF_CHANGED=1 when they did.
CONF_CHANGED=0
write_file_if_changed() {  # write_file_if_changed PATH CONTENT
    local path="$1" content="$2"
    if [ -f "$path" ] && [ "$(cat "$path")" = "$content" ]; then return 0; fi
    is_root || exit_not_root "$path needs to be (re)written"
    mkdir -p "$(dirname "$path")"
    printf '%s\n' "$content" >"$path.tmp.$$"
    chmod 0644 "$path.tmp.$$"
    mv -f "$path.tmp.$$" "$path"
    CONF_CHANGED=1
    vlog "wrote $path"
}

ensure_conf() {
    local conf
    conf="$(render_conf)"
    write_file_if_changed "$CONF" "$conf"
}

# ---------------------------------------------------------------- daemons
_is_live_proc() {  # _is_live_proc /proc/PID NAME: that process exists, is called NAME, is no zombie
    local comm="" _p _c st=""
    { read -r comm <"$1/comm"; } 2>/dev/null || return 1
    [ "$comm" = "$2" ] || return 1
    { read -r _p _c st _ <"$1/stat"; } 2>/dev/null || return 1
    [ "$st" != Z ]
}

daemon_pid() {  # daemon_pid NAME PIDFILE -> pid of the running daemon, or nothing
    # The pid file first; else any process with exactly that name (a daemon
    # started by someone else, or whose pid file was lost).
    local name="$1" pidfile="$2" pid="" d
    if [ -s "$pidfile" ]; then { read -r pid <"$pidfile"; } 2>/dev/null || true; fi
    if [ -n "$pid" ] && _is_live_proc "/proc/$pid" "$name"; then echo "$pid"; return 0; fi
    for d in /proc/[0-9]*; do
        if _is_live_proc "$d" "$name"; then echo "${d#/proc/}"; return 0; fi
    done
    return 0
}

stop_daemon() {  # stop_daemon NAME PIDFILE: SIGTERM (SIGKILL after 15 s) until none is left
    local name="$1" pidfile="$2" pid i
    for _ in 1 2 3; do
        pid="$(daemon_pid "$name" "$pidfile")"
        [ -n "$pid" ] || break
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 60); do
            [ -d "/proc/$pid" ] || break
            sleep 0.25
        done
        if [ -d "/proc/$pid" ]; then
            log "$name (pid $pid) did not exit after SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
        fi
        # only remove the pid file if it is still ours (not a new daemon's)
        if [ "$(cat "$pidfile" 2>/dev/null || true)" = "$pid" ]; then rm -f "$pidfile"; fi
    done
}

daemon_running() { [ -n "$(daemon_pid "$1" "$2")" ]; }

ctld_ping_ok() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n 1 || true; }

node_healthy() {
    case "$(node_state)" in
        idle|mixed|allocated|completing) return 0 ;;
        *) return 1 ;;
    esac
}

cluster_healthy() {
    munge_ok && daemon_running slurmctld "$CTLD_PID" && daemon_running slurmd "$SLURMD_PID" \
        && ctld_ping_ok && node_healthy
}

exit_not_root() {
    echo "slurm_local_cluster: $* -- run this script as root." >&2
    exit 3
}

take_lock() {
    # serialise concurrent start/stop (parallel test workers, CI + a developer)
    command -v flock >/dev/null 2>&1 || return 0
    exec 9>/run/slurm_local_cluster.lock
    flock -w 120 9 || die 10 "waited 120 s for another slurm_local_cluster.sh (lock /run/slurm_local_cluster.lock)"
}

prepare_dirs() {
    mkdir -p "$LOG_DIR" "$STATE_DIR" "$SLURMD_SPOOL"
    chmod 0755 "$LOG_DIR" "$STATE_DIR" "$SLURMD_SPOOL"
}

start_slurmctld() {
    if daemon_running slurmctld "$CTLD_PID" && ctld_ping_ok; then vlog "slurmctld already running"; return 0; fi
    stop_daemon slurmctld "$CTLD_PID"
    vlog "starting slurmctld"
    # -i: ignore (do not die on) unreadable/incompatible old state files
    slurmctld -i >"$LOG_DIR/slurmctld.stderr" 2>&1 9>&- || die 7 "slurmctld failed to start"
    local i
    for i in $(seq 1 $((WAIT_S * 2))); do
        ctld_ping_ok && return 0
        if ! daemon_running slurmctld "$CTLD_PID" && [ "$i" -gt 6 ]; then die 7 "slurmctld exited"; fi
        sleep 0.5
    done
    die 7 "slurmctld did not answer 'scontrol ping' within ${WAIT_S}s"
}

start_slurmd() {
    if daemon_running slurmd "$SLURMD_PID"; then vlog "slurmd already running"; return 0; fi
    rm -f "$SLURMD_PID"
    vlog "starting slurmd"
    slurmd >"$LOG_DIR/slurmd.stderr" 2>&1 9>&- || die 8 "slurmd failed to start"
}

wait_node_idle() {
    local i st resumed=0
    for i in $(seq 1 $((WAIT_S * 2))); do
        st="$(node_state)"
        case "$st" in
            idle|mixed|allocated|completing) vlog "node $NODE is $st"; return 0 ;;
            down*|drain*|fail*)
                if [ "$resumed" = 0 ] && [ "$i" -gt 4 ]; then
                    log "node $NODE is '$st'; setting State=RESUME"
                    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
                    resumed=1
                fi ;;
        esac
        if ! daemon_running slurmd "$SLURMD_PID" && [ "$i" -gt 6 ]; then die 8 "slurmd is not running"; fi
        sleep 0.5
    done
    scontrol show node "$NODE" >&2 || true
    die 9 "node $NODE did not become idle within ${WAIT_S}s (state: '$(node_state)')"
}

# ---------------------------------------------------------------- actions
do_start() {
    # fast path, also for non-root callers: already up with this config
    if have_all_binaries && munge_ok && [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$(render_conf)" ] \
        && cluster_healthy; then
        log "already running: node $NODE $(node_state) (cluster medpretrain-ci)"
        return 0
    fi
    ensure_installed
    is_root || exit_not_root "the local SLURM cluster is not running"
    take_lock
    ensure_hostname_resolves
    ensure_munge
    ensure_conf
    if [ "$CONF_CHANGED" = 0 ] && cluster_healthy; then  # started meanwhile by another caller
        log "already running: node $NODE $(node_state) (cluster medpretrain-ci)"
        return 0
    fi
    if [ "$CONF_CHANGED" = 1 ]; then
        # node/partition changes need a restart, not just `scontrol reconfigure`
        stop_daemon slurmd "$SLURMD_PID"
        stop_daemon slurmctld "$CTLD_PID"
        # saved node state (e.g. gpunode* DOWN) would override the new config
        rm -f "$STATE_DIR"/node_state "$STATE_DIR"/node_state.old
    fi
    prepare_dirs
    start_slurmctld
    start_slurmd
    wait_node_idle
    log "started: cluster medpretrain-ci, node $NODE $(node_state), partitions debug (default), gpu (fake, --test-only)"
}

do_stop() {
    is_root || exit_not_root "stopping needs root"
    take_lock
    stop_daemon slurmd "$SLURMD_PID"
    stop_daemon slurmctld "$CTLD_PID"
    if daemon_running munged "$MUNGE_PID"; then
        munged --stop >/dev/null 2>&1 || true
        stop_daemon munged "$MUNGE_PID"
    fi
    log "stopped slurmd, slurmctld, munged"
}

do_status() {
    local rc=0
    if ! have_all_binaries; then echo "SLURM/munge not installed"; return 1; fi
    if ! daemon_running slurmctld "$CTLD_PID"; then
        # `scontrol ping` would spend ~20 s in retries: answer at once
        echo "slurmctld: not running"; rc=1
    else
        scontrol ping || rc=1
        sinfo || rc=1
    fi
    if ! munge_ok; then echo "munged: not working"; rc=1; fi
    if ! daemon_running slurmd "$SLURMD_PID"; then echo "slurmd: not running"; rc=1; fi
    if [ "$rc" = 0 ] && ! node_healthy; then echo "node $NODE: not healthy (state '$(node_state)')"; rc=1; fi
    return "$rc"
}

case "$ACTION" in
    start) do_start ;;
    stop) do_stop ;;
    restart) do_stop; exec 9>&-; do_start ;;
    status) trap - ERR; do_status ;;
    -h|--help|help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) echo "usage: $0 [start|stop|restart|status]" >&2; exit 2 ;;
esac
