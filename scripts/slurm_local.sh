#!/usr/bin/env bash
# A one-machine SLURM cluster from Debian packages, to run the submitit launcher for real
# (configs/hydra/launcher/slurm_local.yaml, tests/test_slurm.py). Needs root.
#
#   scripts/slurm_local.sh start    # install if missing, configure, start, wait for idle
#   scripts/slurm_local.sh status   # daemons and sinfo
#   scripts/slurm_local.sh stop     # stop the daemons (configuration and packages stay)
#
# One node named after `hostname -s`, all its CPUs, one partition `debug`. No cgroups (a
# container has none to give): proctrack/linuxproc, task/none. No accounting database:
# AccountingStorageType=accounting_storage/none, so `sacct` has no records ("accounting
# storage is disabled"); jobcomp/filetxt writes one line per finished job to
# $STATE/jobcomp.txt, and the tests read squeue/scontrol and that file instead.
# Each step prints one line. Running `start` twice changes nothing.
set -euo pipefail

STATE=/var/lib/slurm/local          # controller and node state, logs, pid files
CONF=/etc/slurm/slurm.conf          # where the client commands look by default
KEY=/etc/munge/munge.key

step() { echo "slurm_local: $*"; }

daemon_running() { pgrep -x "$1" >/dev/null; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sinfo >/dev/null && command -v munged >/dev/null; then
        step "packages present ($(sinfo --version))"
        return
    fi
    step "installing slurmctld slurmd slurm-client munge (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge \
        >/dev/null
    step "installed $(sinfo --version)"
}

write_conf() {
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    # RealMemory a bit below what is free now, or slurmd reports less and drains the node
    mem_mb=$(awk '/MemAvailable/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p "$STATE" "$(dirname "$CONF")"
    local new
    new=$(cat <<EOF
# Written by scripts/slurm_local.sh: one node, one partition, no cgroups, no accounting.
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.txt
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
# seconds between SIGTERM and SIGKILL (scancel, scontrol requeue): time to save
KillWait=30
SlurmdTimeout=60
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
    if [[ -f $CONF ]] && [[ "$(cat "$CONF")" == "$new" ]]; then
        step "$CONF unchanged (node $host, $cpus CPUs)"
    else
        # the memory line changes with free memory; keep it when only that differs
        if [[ -f $CONF ]] && diff <(grep -v '^NodeName' "$CONF") <(grep -v '^NodeName' <<<"$new") \
            >/dev/null; then
            step "$CONF kept (only free memory differs)"
        else
            printf '%s\n' "$new" > "$CONF"
            step "wrote $CONF (node $host, $cpus CPUs, RealMemory=${mem_mb}MB, partition debug)"
        fi
    fi
    mkdir -p "$STATE/ctld" "$STATE/d"
}

start_munge() {
    if [[ ! -s $KEY ]]; then
        step "creating munge key $KEY"
        mkdir -p /etc/munge
        dd if=/dev/urandom bs=1 count=1024 of="$KEY" status=none
        chown munge:munge "$KEY" && chmod 400 "$KEY"
    fi
    if daemon_running munged; then
        step "munged already running"
    else
        mkdir -p /run/munge && chown munge:munge /run/munge
        runuser -u munge -- /usr/sbin/munged
        step "started munged"
    fi
    munge -n | unmunge >/dev/null && step "munge credentials verified"
}

start_daemons() {
    if daemon_running slurmctld; then
        step "slurmctld already running"
    else
        /usr/sbin/slurmctld
        step "started slurmctld (log $STATE/slurmctld.log)"
    fi
    if daemon_running slurmd; then
        step "slurmd already running"
    else
        /usr/sbin/slurmd
        step "started slurmd (log $STATE/slurmd.log)"
    fi
}

wait_idle() {
    local host state
    host=$(hostname -s)
    for _ in $(seq 60); do
        state=$(sinfo -h -n "$host" -o %T 2>/dev/null || true)
        if [[ $state == idle* || $state == mixed* || $state == allocated* ]]; then
            step "node $host is $state: $(sinfo -h -o '%P %a %D %T %c CPUs %m MB')"
            return
        fi
        if [[ $state == down* || $state == drain* ]]; then
            scontrol update nodename="$host" state=resume 2>/dev/null || true
        fi
        sleep 1
    done
    step "node $host not idle after 60 s (state: ${state:-no answer}); see $STATE/*.log" >&2
    exit 1
}

stop_daemons() {
    # by the pid files the daemons wrote, not by name
    local name pidfile pid
    for name in slurmd slurmctld munged; do
        case $name in
            munged) pidfile=/run/munge/munged.pid ;;
            *) pidfile=$STATE/$name.pid ;;
        esac
        pid=$(cat "$pidfile" 2>/dev/null || true)
        if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            step "stopped $name (pid $pid)"
        else
            step "$name not running"
        fi
    done
}

case "${1:-}" in
    start) install; write_conf; start_munge; start_daemons; wait_idle ;;
    status)
        for name in munged slurmctld slurmd; do
            if daemon_running "$name"; then step "$name running"; else step "$name stopped"; fi
        done
        if sinfo >/dev/null 2>&1; then sinfo; fi ;;
    stop) stop_daemons ;;
    *) echo "usage: $0 start|status|stop" >&2; exit 2 ;;
esac
