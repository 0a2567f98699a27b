#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for CI and for trying the sbatch files without a cluster: this machine's
# own node (partition `debug`, the default) plus PIXART_SLURM_HOSTS simulated hosts (partition `multi`, default 2:
# pixnode1, pixnode2), one slurmctld, one munged.
#
#   bash slurm/local-cluster.sh up       install slurm-wlm, munge, tini and slurmutils if missing, create the hosts,
#                                        write slurm.conf, start munged, slurmctld and every slurmd, wait until every
#                                        node is idle (idempotent: a running cluster is left alone)
#   bash slurm/local-cluster.sh down     stop every slurmd, slurmctld and munged; remove the hosts and the bridge
#   bash slurm/local-cluster.sh status   daemons, hosts, node states and queue
#   bash slurm/local-cluster.sh exec HOST -- COMMAND...   run COMMAND on a simulated host (its namespaces)
#
# The simulated hosts. Each is a set of Linux namespaces held by its own slurmd:
#   network  its own interface (eth0, a veth pair into the bridge pixds-br0), address $PIXART_SLURM_NET.1N and
#            routing; ranks on two hosts talk over the bridge, as over a cluster's network;
#   UTS      its own hostname, which is how its slurmd finds its NodeName and what `hostname` says in a job;
#   mount    its own /tmp and /dev/shm (fresh tmpfs) and an /etc/hosts naming every host; everything else is this
#            machine's root filesystem, which plays the cluster's shared filesystem (run directories, shards,
#            the checkout, the Python environment);
#   PID      its own process table (tini as PID 1 reaps orphans; stopping it ends every process of the host).
# Why namespaces and not slurmd's multiple-node mode (`slurmd -N`, --enable-multiple-slurmd): that mode runs several
# slurmds in one hostname, one network stack, one /dev/shm and one /tmp, so the node-local state that breaks real
# multi-node runs would still be shared: Streaming keeps per-node shared memory in /dev/shm and its file locks in
# /tmp (each node's ranks elect a local leader and check their own shards once), remote shards are cached per node,
# MASTER_ADDR must resolve to another host, and a host's processes must die together. Here each of those differs
# per host for real. (Debian builds Slurm without --enable-multiple-slurmd in any case.)
#
# Needs root and Debian (12: Slurm 22.05), iproute2 and util-linux (unshare). No systemd, no cgroups, no accounting
# daemon: proctrack/linuxproc, task/none, accounting_storage/none. Daemon state, spool, pid and log files live under
# $PIXART_SLURM_DIR. The config goes where Debian's Slurm looks for it, /etc/slurm/slurm.conf (the compiled-in
# default), unless SLURM_CONF names another file (then every Slurm command run later needs the same SLURM_CONF).
# It is written by slurm/local_conf.py with slurmutils' slurm.conf model.
#
# Variables: PIXART_SLURM_HOSTS (simulated hosts, default 2; 0 = this machine's node only), PIXART_SLURM_NET (the
# bridge's /24, default 10.77.0), PIXART_SLURM_DIR, PIXART_SLURM_TIMEOUT (seconds to wait for the nodes), PYTHON.
set -euo pipefail

# The daemons started here (munged, slurmctld, slurmd, the hosts) must not inherit this shell's other descriptors:
# a caller's `flock LOCKFILE bash slurm/local-cluster.sh up` would otherwise leave the lock held for as long as munged
# lives. Bash itself reads this script through fd 255.
for _fd in /proc/$$/fd/*; do
    _fd=${_fd##*/}
    if ((_fd > 2 && _fd < 255)); then eval "exec ${_fd}>&-" 2>/dev/null || true; fi
done
unset _fd

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
REPO=$(dirname "$(dirname "$SELF")")  # the checkout this script belongs to
SCRATCH=${PIXART_SLURM_DIR:-/var/tmp/pixart-ds-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
TIMEOUT=${PIXART_SLURM_TIMEOUT:-90}      # seconds to wait for the nodes to become idle
NODE=$(hostname -s)                       # this machine's own node and the controller
HOSTS=${PIXART_SLURM_HOSTS:-2}
NET=${PIXART_SLURM_NET:-10.77.0}
BRIDGE=pixds-br0
HOST_PREFIX=pixnode
PYTHON=${PYTHON:-python3}
MUNGE_KEY=/etc/munge/munge.key

log() { echo "local-cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages, creates namespaces and starts the Slurm daemons)"
[[ $HOSTS =~ ^[0-9]$ ]] || die "PIXART_SLURM_HOSTS=$HOSTS: give 0 to 9 simulated hosts"

host_names() { local i; for ((i = 1; i <= HOSTS; i++)); do echo "$HOST_PREFIX$i"; done; }
host_addr() { echo "$NET.$((10 + ${1#"$HOST_PREFIX"}))"; }
all_nodes() { echo "$NODE"; host_names; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    command -v tini >/dev/null || missing+=(tini)
    command -v ip >/dev/null || missing+=(iproute2)
    if ((${#missing[@]})); then
        log "installing ${missing[*]} (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        local out="$SCRATCH/apt.log"
        mkdir -p "$SCRATCH"
        if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$out" 2>&1
        then
            tail -n 20 "$out" >&2
            die "apt-get install ${missing[*]} failed (full log: $out)"
        fi
    fi
    if ! "$PYTHON" -c "import slurmutils" 2>/dev/null; then
        # Also in setup.py's dev extra; here for `make slurm-up` on its own.
        log "installing slurmutils (pip)"
        "$PYTHON" -m pip install -q "slurmutils>=1.3,<2" >&2 || die "pip install slurmutils failed"
    fi
}

# ---------------------------------------------------------------------------------------------------------------
# munge: every Slurm message is signed with the shared key; munged must run as the key's owner. One munged serves
# every host: its socket is a file on the shared root filesystem.
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
# The simulated hosts' network: a bridge (this machine: $NET.1) and one veth pair per host ($NET.1N inside).
# ---------------------------------------------------------------------------------------------------------------
setup_network() {
    ((HOSTS > 0)) || return 0
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        log "creating bridge $BRIDGE ($NET.1/24)"
        ip link add "$BRIDGE" type bridge
    fi
    ip -4 addr show dev "$BRIDGE" | grep -q " $NET.1/24" || ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local name addr
    for name in $(host_names); do
        addr=$(host_addr "$name")
        [[ -e /run/netns/$name ]] || ip netns add "$name"
        if ! ip link show "veth-$name" >/dev/null 2>&1; then
            ip link add "veth-$name" type veth peer name eth0 netns "$name"
        fi
        ip link set "veth-$name" master "$BRIDGE" up
        ip -n "$name" -4 addr show dev eth0 | grep -q " $addr/24" || ip -n "$name" addr add "$addr/24" dev eth0
        ip -n "$name" link set eth0 up
        ip -n "$name" link set lo up
    done
    # Every host resolves every other and the controller by name (MASTER_ADDR is the job's first host).
    mkdir -p "$SCRATCH"
    {
        echo "127.0.0.1 localhost"
        echo "$NET.1 $NODE"
        for name in $(host_names); do echo "$(host_addr "$name") $name"; done
    } >"$SCRATCH/hosts.tmp"
    mv "$SCRATCH/hosts.tmp" "$SCRATCH/hosts"
}

teardown_network() {
    local name
    for name in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$HOST_PREFIX[0-9]$" || true); do
        ip link del "veth-$name" 2>/dev/null || true
        ip netns del "$name" 2>/dev/null || true
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        log "removing bridge $BRIDGE"
        ip link del "$BRIDGE" || true
    fi
    rm -f "$SCRATCH/hosts"
}

# ---------------------------------------------------------------------------------------------------------------
# slurm.conf
# ---------------------------------------------------------------------------------------------------------------
write_conf() {  # returns 0 when the file changed, 1 when it already held this configuration
    local cpus mem out name
    cpus=$(nproc)
    # RealMemory must not exceed what slurmd measures, or the node is drained ("Low RealMemory"). Every host
    # measures this machine's memory; they overcommit it, as they overcommit the cores.
    mem=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p "$SCRATCH/state" "$SCRATCH/spool" "$SCRATCH/log" "$(dirname "$CONF")"
    local args=(--out "$CONF" --scratch "$SCRATCH" --controller "$NODE" --cpus "$cpus" --mem "$mem"
                --host-node "$NODE")
    for name in $(host_names); do args+=(--ns-node "$name=$(host_addr "$name")"); done
    out=$("$PYTHON" "$(dirname "$SELF")/local_conf.py" "${args[@]}") || die "writing $CONF failed"
    if [[ $out == wrote* ]]; then
        log "$out"
        return 0
    fi
    return 1
}

# ---------------------------------------------------------------------------------------------------------------
# daemons
# ---------------------------------------------------------------------------------------------------------------
pid_alive() {  # pid_alive FILE COMM: the process named in FILE is running and its command starts with COMM
    local f=$1 pid
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    [[ -d /proc/$pid ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2"* ]]
}

stop_pidfile() {  # stop_pidfile FILE COMM WHAT
    local f=$1 pid
    pid_alive "$f" "$2" || { rm -f "$f"; return 0; }
    pid=$(<"$f")
    log "stopping $3 ($pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
    if [[ -d /proc/$pid ]]; then
        kill -9 "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$f"
}

ctld_pidfile() { echo "$SCRATCH/slurmctld.pid"; }
slurmd_pidfile() { echo "$SCRATCH/slurmd-$NODE.pid"; }   # SlurmdPidFile=.../slurmd-%n.pid
holder_pidfile() { echo "$SCRATCH/hosts.d/$1.pid"; }      # the `unshare` that holds host $1's namespaces

ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

# A simulated host: `unshare` (this file's pid) -> tini (PID 1 of the host) -> slurmd -D. --kill-child: when the
# unshare process dies, tini gets SIGTERM, passes it to slurmd, and when tini exits the kernel ends every other
# process of the host's PID namespace.
host_alive() { pid_alive "$(holder_pidfile "$1")" unshare; }

host_repo_file() { echo "$SCRATCH/hosts.d/$1.checkout"; }   # the checkout host $1 was started from: path and inode
repo_id() { echo "$1 $(stat -c %d:%i "$1")"; }  # a clone removed and made again at one path is another checkout

start_host() {
    local name=$1
    if host_alive "$name"; then
        # A host started from another checkout may not see this one (a clone under /tmp is bound in at start).
        [[ $(cat "$(host_repo_file "$name")" 2>/dev/null) == "$(repo_id "$REPO")" ]] && return 0
        log "host $name was started from another checkout: restarting it for $REPO"
        stop_host "$name"
    fi
    mkdir -p "$SCRATCH/hosts.d" "$SCRATCH/spool/$name" "$SCRATCH/log"
    log "starting slurmd on host $name ($(host_addr "$name"))"
    # setsid: the host outlives this script and the terminal or test that ran it.
    # nsenter --net rather than `ip netns exec`, which remounts /sys and so hides /sys/fs/cgroup from slurmd.
    setsid nsenter --net="/run/netns/$name" unshare --mount --uts --pid --fork --kill-child=SIGTERM --mount-proc \
        --propagation private bash "$SELF" _host-init "$name" </dev/null >>"$SCRATCH/log/host-$name.log" 2>&1 &
    local pid=$!
    echo $pid >"$(holder_pidfile "$name")"
    repo_id "$REPO" >"$(host_repo_file "$name")"
    # setsid and nsenter exec into unshare: wait for it (host_alive checks the command name) or for a failure.
    for _ in $(seq 100); do
        host_alive "$name" && return 0
        [[ -d /proc/$pid ]] || break
        sleep 0.05
    done
    tail -n 20 "$SCRATCH/log/host-$name.log" >&2 || true
    die "host $name did not start (log: $SCRATCH/log/host-$name.log)"
}

host_init() {  # inside the new namespaces (PID 1 is this shell until it execs tini)
    local name=$1 hold
    hostname "$name"
    # The checkout is on the shared filesystem of a real cluster: a checkout that lives under /tmp (a CI clone)
    # stays visible at its own path on the host, held aside while the host's fresh /tmp is mounted.
    hold=""
    if [[ $REPO == /tmp/* ]]; then
        hold="$SCRATCH/hosts.d/$name.repo"
        mkdir -p "$hold"
        mount --bind "$REPO" "$hold"
    fi
    mount -t tmpfs -o mode=1777 tmpfs /tmp
    if [[ -n $hold ]]; then
        mkdir -p "$REPO"
        mount --bind "$hold" "$REPO"
        umount "$hold"
    fi
    mount -t tmpfs -o mode=1777 tmpfs /dev/shm
    mount --bind "$SCRATCH/hosts" /etc/hosts
    exec tini -- slurmd -D
}

stop_host() {
    local name=$1 f pid
    f=$(holder_pidfile "$name")
    host_alive "$name" || { rm -f "$f"; return 0; }
    pid=$(<"$f")
    log "stopping host $name"
    kill -TERM "$pid" 2>/dev/null || true
    # Done when no process is left in the host's network namespace (slurmd, and any job it still ran).
    for _ in $(seq 150); do
        [[ -z $(ip netns pids "$name" 2>/dev/null) ]] && break
        sleep 0.1
    done
    local left
    left=$(ip netns pids "$name" 2>/dev/null || true)
    if [[ -n $left ]]; then
        # shellcheck disable=SC2086
        kill -9 $left 2>/dev/null || true
    fi
    rm -f "$f"
}

start_daemons() {
    if ! pid_alive "$(ctld_pidfile)" slurmctld; then
        log "starting slurmctld"
        slurmctld || die "slurmctld failed to start (see $SCRATCH/log/slurmctld.log)"
    fi
    for _ in $(seq 100); do ctld_up && break; sleep 0.2; done
    ctld_up || die "slurmctld does not answer 'scontrol ping' (see $SCRATCH/log/slurmctld.log)"
    if ! pid_alive "$(slurmd_pidfile)" slurmd; then
        log "starting slurmd"
        slurmd || die "slurmd failed to start (see $SCRATCH/log/slurmd-$NODE.log)"
    fi
    local name
    for name in $(host_names); do start_host "$name"; done
}

node_state() { sinfo -h -N -n "$1" -o '%t' 2>/dev/null | head -n1; }

wait_idle() {
    local deadline=$((SECONDS + TIMEOUT)) st node pending
    while ((SECONDS < deadline)); do
        pending=()
        for node in $(host_names); do
            if ! host_alive "$node"; then
                tail -n 20 "$SCRATCH/log/host-$node.log" >&2 || true
                die "host $node stopped (its slurmd exited; log: $SCRATCH/log/host-$node.log)"
            fi
        done
        for node in $(all_nodes); do
            st=$(node_state "$node")
            case $st in
                idle | mix | alloc | comp) ;;
                drain* | drng | down | fail*)
                    # A node left down/drained by an earlier crash: return it to service.
                    scontrol update NodeName="$node" State=RESUME 2>/dev/null || true
                    pending+=("$node:$st") ;;
                *) pending+=("$node:${st:-none}") ;;
            esac
        done
        if ((${#pending[@]} == 0)); then
            for node in $(all_nodes); do log "node $node is $(node_state "$node")"; done
            return 0
        fi
        sleep 0.5
    done
    scontrol show node >&2 || true
    tail -n 20 "$SCRATCH"/log/slurmd-*.log "$SCRATCH"/log/host-*.log "$SCRATCH/log/slurmctld.log" >&2 || true
    die "nodes not idle after ${TIMEOUT}s (${pending[*]}); logs under $SCRATCH/log"
}

stop_all_slurmd() {
    local name
    for name in $(ls "$SCRATCH/hosts.d" 2>/dev/null | sed -n 's/\.pid$//p'); do stop_host "$name"; done
    stop_pidfile "$(slurmd_pidfile)" slurmd slurmd
    stop_pidfile "$SCRATCH/slurmd.pid" slurmd slurmd  # the pid file of a single-node version of this script
}

up() {
    install_packages
    start_munge
    setup_network
    if write_conf; then
        # A changed config (first run, another machine size or host count): restart every daemon on it.
        stop_all_slurmd
        stop_pidfile "$(ctld_pidfile)" slurmctld slurmctld
    fi
    # Hosts beyond PIXART_SLURM_HOSTS (a smaller count than the last 'up'): gone from the config, so stop them.
    local f name
    for f in "$SCRATCH"/hosts.d/*.pid; do
        [[ -e $f ]] || continue
        name=$(basename "$f" .pid)
        host_names | grep -qx "$name" || stop_host "$name"
    done
    start_daemons
    wait_idle
}

down() {
    stop_all_slurmd
    stop_pidfile "$(ctld_pidfile)" slurmctld slurmctld
    teardown_network
    if command -v munged >/dev/null && munge_ok; then
        log "stopping munged"
        runuser -u munge -- munged --stop >/dev/null 2>&1 || true
    fi
}

status() {
    if pid_alive "$(ctld_pidfile)" slurmctld; then echo "slurmctld: running (pid $(<"$(ctld_pidfile)"))"
    else echo "slurmctld: stopped"; fi
    if pid_alive "$(slurmd_pidfile)" slurmd; then echo "slurmd: running (pid $(<"$(slurmd_pidfile)"))"
    else echo "slurmd: stopped"; fi
    local name
    for name in $(host_names); do
        if host_alive "$name"; then
            echo "host $name: running ($(host_addr "$name"), namespaces held by pid $(<"$(holder_pidfile "$name")"))"
        else
            echo "host $name: stopped"
        fi
    done
    if munge_ok; then echo "munged: running"; else echo "munged: stopped"; fi
    if ctld_up; then
        sinfo
        squeue
    fi
}

host_exec() {  # host_exec HOST [--] COMMAND...: run COMMAND in every namespace of a running simulated host
    local name=${1:-} pid child
    shift || true
    [[ ${1:-} == -- ]] && shift
    [[ -n $name ]] && (($#)) || die "usage: $0 exec HOST -- COMMAND..."
    host_alive "$name" || die "host $name is not running (bash $SELF up)"
    pid=$(<"$(holder_pidfile "$name")")
    # The host's PID 1 (tini) is the holder's only child; its namespaces are the host's.
    child=$(cat "/proc/$pid/task/$pid/children" 2>/dev/null | awk '{print $1}')
    [[ -n $child ]] || child=$(ps -o pid= --ppid "$pid" | awk 'NR==1 {print $1}')
    [[ -n $child ]] || die "host $name: cannot find its init process"
    exec nsenter -t "$child" -n -m -u -p -- "$@"
}

case ${1:-up} in
    up) up ;;
    down) down ;;
    status) status ;;
    exec) shift; host_exec "$@" ;;
    _host-init) host_init "$2" ;;
    *) die "usage: $0 up|down|status|exec HOST -- COMMAND" ;;
esac
