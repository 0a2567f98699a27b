#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for CI and for trying the sbatch files without a cluster.
#
#   bash slurm/local-cluster.sh up       install slurm-wlm + munge if missing, write slurm.conf, start munged,
#                                        slurmctld and slurmd, wait until the node is idle (idempotent)
#   bash slurm/local-cluster.sh down     stop slurmd, slurmctld and munged
#   bash slurm/local-cluster.sh status   daemons, node state and queue
#
# Needs root and Debian (12: Slurm 22.05). No systemd, no cgroups, no accounting daemon: proctrack/linuxproc,
# task/none, accounting_storage/none. Daemon state, spool, pid and log files live under $PIXART_SLURM_DIR.
# The config goes where Debian's Slurm looks for it, /etc/slurm/slurm.conf (the compiled-in default), unless
# SLURM_CONF names another file (then every Slurm command run later needs the same SLURM_CONF).
set -euo pipefail

SCRATCH=${PIXART_SLURM_DIR:-/var/tmp/pixart-ds-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
TIMEOUT=${PIXART_SLURM_TIMEOUT:-90}      # seconds to wait for the node to become idle
NODE=$(hostname -s)
MUNGE_KEY=/etc/munge/munge.key

log() { echo "local-cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts the Slurm daemons)"

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    local out="$SCRATCH/apt.log"
    mkdir -p "$SCRATCH"
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } >"$out" 2>&1; then
        tail -n 20 "$out" >&2
        die "apt-get install slurm-wlm munge failed (full log: $out)"
    fi
}

# ---------------------------------------------------------------------------------------------------------------
# munge: every Slurm message is signed with the shared key; munged must run as the key's owner.
# ---------------------------------------------------------------------------------------------------------------
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    install -d -o munge -g munge -m 0700 /etc/munge
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating $MUNGE_KEY"
        dd if=/dev/urandom of="$MUNGE_KEY.tmp" bs=1024 count=1 status=none
        mv "$MUNGE_KEY.tmp" "$MUNGE_KEY"
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0600 "$MUNGE_KEY"
    if munge_ok; then
        return
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    log "starting munged"
    # --force: take over a socket/pid file left behind by a munged that died (a live one answered above).
    runuser -u munge -- munged --force
    for _ in $(seq 50); do munge_ok && return; sleep 0.1; done
    die "munged did not answer (see /var/log/munge/munged.log)"
}

# ---------------------------------------------------------------------------------------------------------------
# slurm.conf
# ---------------------------------------------------------------------------------------------------------------
write_conf() {
    local cpus mem
    cpus=$(nproc)
    # RealMemory must not exceed what slurmd measures, or the node is drained ("Low RealMemory").
    mem=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p "$SCRATCH/state" "$SCRATCH/spool" "$SCRATCH/log" "$(dirname "$CONF")"
    local tmp
    tmp=$(mktemp "$CONF.XXXXXX")
    cat >"$tmp" <<EOF
# Written by slurm/local-cluster.sh: a single-node cluster for CI. Rewritten on every 'up'.
ClusterName=local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds before it may start again (slurm.conf(5), AuthInfo); the default
# 120 s would dominate the preemption test.
AuthInfo=cred_expire=10
StateSaveLocation=$SCRATCH/state
SlurmdSpoolDir=$SCRATCH/spool
SlurmctldPidFile=$SCRATCH/slurmctld.pid
SlurmdPidFile=$SCRATCH/slurmd.pid
SlurmctldLogFile=$SCRATCH/log/slurmctld.log
SlurmdLogFile=$SCRATCH/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
# Start pending jobs (a requeued one whose begin time has come, a dependency just satisfied) within seconds.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
# No accounting daemon: finished jobs are visible only through scontrol/squeue, for MinJobAge seconds.
MinJobAge=3600
KillWait=10
InactiveLimit=0
NodeName=$NODE CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
    chmod 0644 "$tmp"
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 1  # unchanged
    fi
    mv "$tmp" "$CONF"
    log "wrote $CONF"
    return 0
}

# ---------------------------------------------------------------------------------------------------------------
# daemons
# ---------------------------------------------------------------------------------------------------------------
pid_alive() {  # pid_alive NAME: the daemon named in $SCRATCH/NAME.pid is running
    local f="$SCRATCH/$1.pid" pid
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    [[ -d /proc/$pid ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1"* ]]
}

stop_daemon() {
    local name=$1 pid
    pid_alive "$name" || { rm -f "$SCRATCH/$name.pid"; return 0; }
    pid=$(<"$SCRATCH/$name.pid")
    log "stopping $name ($pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
    if [[ -d /proc/$pid ]]; then
        kill -9 "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$SCRATCH/$name.pid"
}

ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

node_state() { sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | head -n1; }

start_daemons() {
    if ! pid_alive slurmctld; then
        log "starting slurmctld"
        slurmctld || die "slurmctld failed to start (see $SCRATCH/log/slurmctld.log)"
    fi
    for _ in $(seq 100); do ctld_up && break; sleep 0.2; done
    ctld_up || die "slurmctld does not answer 'scontrol ping' (see $SCRATCH/log/slurmctld.log)"
    if ! pid_alive slurmd; then
        log "starting slurmd"
        slurmd || die "slurmd failed to start (see $SCRATCH/log/slurmd.log)"
    fi
}

wait_idle() {
    local deadline=$((SECONDS + TIMEOUT)) st
    while ((SECONDS < deadline)); do
        st=$(node_state)
        case $st in
            idle | mix | alloc | comp) log "node $NODE is $st"; return 0 ;;
            drain* | drng | down | fail*)
                # A node left down/drained by an earlier crash: return it to service once.
                scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    scontrol show node "$NODE" >&2 || true
    tail -n 20 "$SCRATCH/log/slurmd.log" "$SCRATCH/log/slurmctld.log" >&2 || true
    die "node $NODE not idle after ${TIMEOUT}s (state: '${st:-none}'); logs under $SCRATCH/log"
}

up() {
    install_packages
    start_munge
    if write_conf; then
        # A changed config (first run, another machine size): restart both daemons on it.
        stop_daemon slurmd
        stop_daemon slurmctld
    fi
    start_daemons
    wait_idle
}

down() {
    stop_daemon slurmd
    stop_daemon slurmctld
    if command -v munged >/dev/null && munge_ok; then
        log "stopping munged"
        runuser -u munge -- munged --stop >/dev/null 2>&1 || true
    fi
}

status() {
    local d
    for d in slurmctld slurmd; do
        if pid_alive "$d"; then echo "$d: running (pid $(<"$SCRATCH/$d.pid"))"; else echo "$d: stopped"; fi
    done
    if munge_ok; then echo "munged: running"; else echo "munged: stopped"; fi
    if ctld_up; then
        sinfo
        squeue
    fi
}

case ${1:-up} in
    up) up ;;
    down) down ;;
    status) status ;;
    *) die "usage: $0 up|down|status" ;;
esac
