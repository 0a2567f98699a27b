# shellcheck shell=bash
# Shared by every sbatch file in slurm/: environment, rank derivation, the training launch and requeue.
#
# Sourced by a batch script:   source "$PIXART_DS_ROOT/slurm/common.sh"; pixart_train RECIPE [key=value ...]
# Run inside each srun task:   bash slurm/common.sh task -- COMMAND ...   (exports the ranks, then execs COMMAND)
# Print one task's derivation: bash slurm/common.sh env                   (RANK=... lines; used by the tests)
#
# Variables a user may set (all optional), on the command line or with sbatch --export=ALL,NAME=value:
#   RECIPE       the recipe YAML (each sbatch file has its stage's default)
#   RUN_DIR      override the recipe's run_dir
#   INIT_FROM    override train.init_from (a previous stage's run directory)
#   EXTRA        more `key=value` overrides, shell-quoted, e.g. EXTRA="train.total_steps=10 log.every_steps=1"
#                (sbatch --export splits on commas: export EXTRA in the environment when a value has one)
#   PYTHON       the interpreter that has pixart_ds installed (default: python3), e.g. /opt/venv/bin/python
#   SETUP        a file sourced first in the batch shell (module loads, conda/venv activation)
#   SRUN_ARGS    extra srun options for the training step, e.g. "--cpu-bind=none"
#   MAX_REQUEUES stop requeueing after this many restarts (default 100)
#   CLEAN_SHM    1 (default): remove stale Streaming shared memory on each node first; 0: skip
#   REQUEUE_EXIT_CODE  the trainer's "checkpointed, please requeue" exit code (default 75, as in the trainer)
#   NET_IFNAME   the network interface for NCCL's and gloo's sockets on every node (e.g. ib0); see pixart_env
#   MASTER_ADDR  the rendezvous host (default: the first host of the job's node list, as Slurm names it; set it when
#                that name resolves to an address the other nodes cannot reach, e.g. a management network)
# Key=value arguments after the sbatch file name (`sbatch slurm/stage2.sbatch train.lr=1e-4`) are overrides too.
# Hyperparameters belong in recipes: these files only pick the recipe, the resources and the environment.

# ----------------------------------------------------------------------------------------------------------------
# Environment shared by all launchers. NCCL settings live here and nowhere else.
# ----------------------------------------------------------------------------------------------------------------
pixart_env() {
    # Collective errors and timeouts raise in Python instead of hanging the job (the recipe's
    # train.collective_timeout_s bounds every collective, NCCL and gloo alike: pixart_ds/train/dist.py).
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # InfiniBand: a longer retransmission timeout (4.096 us x 2^22, about 17 s) and the most retries survive
    # transient fabric hiccups on long runs (NCCL's environment-variable documentation).
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    export NCCL_IB_RETRY_CNT=${NCCL_IB_RETRY_CNT:-7}
    # The socket interface for NCCL's bootstrap (and its data, when there is no InfiniBand) and for gloo. Unset, NCCL
    # picks any interface but lo and docker*, and gloo the address the hostname resolves to -- on a cluster with a
    # management and a fast network that can be the slow one. NET_IFNAME=ib0 (or bond0, eth0...) names it for both;
    # a NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME set by the user wins. Site-specific, so no default:
    #   NCCL_IB_HCA=mlx5_0,mlx5_1  which HCAs (NCCL uses all it finds);  NCCL_IB_DISABLE=1  no InfiniBand (sockets).
    if [[ -n ${NET_IFNAME:-} ]]; then
        export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$NET_IFNAME}
        export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$NET_IFNAME}
    fi
    export PYTHONUNBUFFERED=1
    # One BLAS/OpenMP pool per rank sized to the rank's CPUs (torch warns and oversubscribes otherwise).
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
}

# The network settings in effect, for the job log (only those set).
pixart_net_summary() {
    local v out=()
    for v in NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_DISABLE MASTER_ADDR MASTER_PORT; do
        [[ -n ${!v:-} ]] && out+=("$v=${!v}")
    done
    echo "${out[*]:-defaults}"
}

# ----------------------------------------------------------------------------------------------------------------
# Rank / world / master from Slurm's variables (one srun task per GPU). Mirrors pixart_ds/dist.py, which
# derives the same values in Python when RANK is absent; exporting the standard names here makes every tool in the
# task (DeepSpeed, torch.distributed env://, Streaming) agree without reading SLURM_*.
# ----------------------------------------------------------------------------------------------------------------

# First host of a Slurm hostlist: "gpu[007-010,012],cpu1" -> gpu007. Pure bash (no controller needed).
pixart_first_host() {
    local list=$1 first prefix body rest
    # The first top-level element: up to the first comma outside brackets.
    first=${list%%,*}
    if [[ $first == *"["* && $first != *"]"* ]]; then
        first=${list%%]*}]
    fi
    if [[ $first != *"["* ]]; then
        echo "$first"
        return
    fi
    prefix=${first%%\[*}
    body=${first#*\[}
    rest=${body#*\]}
    body=${body%%\]*}
    body=${body%%,*}
    body=${body%%-*}
    if [[ $rest == *"["* ]]; then
        # Several bracket groups ("r[1-2]n[1-4]"): take the first value of each.
        echo "$prefix$body$(pixart_first_host "$rest")"
    else
        echo "$prefix$body$rest"
    fi
}

# Tasks on node $2 from a compressed per-node count list $1: ("8(x4)", 2) -> 8; ("2(x2),1", 2) -> 1.
pixart_tasks_on_node() {
    local list=$1 node=$2 item count reps i=0
    local IFS=,
    for item in $list; do
        if [[ $item =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
            count=${BASH_REMATCH[1]} reps=${BASH_REMATCH[2]}
        elif [[ $item =~ ^[0-9]+$ ]]; then
            count=$item reps=1
        else
            echo "pixart_tasks_on_node: '$list' is not Slurm's count format (e.g. 8 or 8(x4))" >&2
            return 1
        fi
        if ((node < i + reps)); then
            echo "$count"
            return
        fi
        i=$((i + reps))
    done
    echo "pixart_tasks_on_node: node $node is beyond '$list'" >&2
    return 1
}

# Export RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT for this srun task.
pixart_rank_env() {
    local missing=() v
    for v in SLURM_PROCID SLURM_NTASKS SLURM_LOCALID SLURM_JOB_ID; do
        [[ -n ${!v:-} ]] || missing+=("$v")
    done
    if ((${#missing[@]})); then
        echo "common.sh: ${missing[*]} unset: not inside an srun task" >&2
        return 1
    fi
    export RANK=$SLURM_PROCID
    export WORLD_SIZE=$SLURM_NTASKS
    export LOCAL_RANK=$SLURM_LOCALID
    # Streaming learns the node topology only from LOCAL_WORLD_SIZE (docs/stack.md). The step's own per-node
    # counts are exact even for uneven layouts; the requested --ntasks-per-node is the fallback.
    local per_node=${SLURM_STEP_TASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-}}}
    if [[ -z $per_node ]]; then
        echo "common.sh: cannot tell the tasks per node (SLURM_STEP_TASKS_PER_NODE/SLURM_NTASKS_PER_NODE unset)" >&2
        return 1
    fi
    LOCAL_WORLD_SIZE=$(pixart_tasks_on_node "$per_node" "${SLURM_NODEID:-0}") || return 1
    export LOCAL_WORLD_SIZE
    local nodes=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}}
    if [[ -z ${MASTER_ADDR:-} ]]; then
        [[ -n $nodes ]] || { echo "common.sh: SLURM_JOB_NODELIST unset" >&2; return 1; }
        MASTER_ADDR=$(pixart_first_host "$nodes")
    fi
    export MASTER_ADDR
    # Same rule as dist.port_from_job_id: every task of the job (and of its requeued run) agrees without talking.
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
}

# ----------------------------------------------------------------------------------------------------------------
# Batch-script side
# ----------------------------------------------------------------------------------------------------------------
pixart_log() { echo "[$(date '+%F %T')] ${SLURM_JOB_ID:+job $SLURM_JOB_ID: }$*" >&2; }

# The repository this file lives in (sbatch runs a copy of the batch script, so the script cannot find itself).
PIXART_DS_ROOT=${PIXART_DS_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export PIXART_DS_ROOT

# Remove POSIX shared memory a crashed Streaming run left behind, once per node, before any rank starts: a stale
# `/dev/shm/NNNNNN_locals` makes the next run fail or hang. pixart_ds.data.loader.clean_stale_shm removes only
# segments no live process maps (Streaming's clean_stale_shared_memory would also break a live job sharing the node).
pixart_clean_shm() {
    [[ ${CLEAN_SHM:-1} == 1 ]] || return 0
    # --overlap: its CPUs do not count against the training step that follows (no "step creation disabled" wait).
    srun --overlap --ntasks="${SLURM_JOB_NUM_NODES:-1}" --ntasks-per-node=1 --cpus-per-task=1 --kill-on-bad-exit=1 \
        bash "$PIXART_DS_ROOT/slurm/common.sh" clean-shm
}

# pixart_ds.train.trainer.REQUEUE_EXIT_CODE (75, EX_TEMPFAIL: checkpointed, run again). Written out here rather than
# asked from Python, which would cost a torch + DeepSpeed import at every stop; tests/test_slurm.py checks the two agree.
pixart_requeue_exit_code() { echo "${REQUEUE_EXIT_CODE:-75}"; }

# pixart_run_step [--requeue] COMMAND...: run COMMAND as one srun task per rank with the rank variables exported.
# With --requeue, the trainer's requeue exit code requeues this job (it restarts from the top and resumes from the
# latest checkpoint).
pixart_run_step() {
    local rc code requeue=0 restarts=${SLURM_RESTART_COUNT:-0}
    if [[ ${1:-} == --requeue ]]; then
        requeue=1
        shift
    fi
    pixart_log "restart $restarts; nodes $SLURM_JOB_NODELIST; $SLURM_NTASKS tasks; $*"
    pixart_log "network: $(pixart_net_summary)"
    pixart_clean_shm || pixart_log "warning: cleaning stale shared memory failed"
    # Tasks per node and CPUs per task are passed on explicitly: since Slurm 22.05 srun does not inherit
    # --cpus-per-task from the batch allocation.
    rc=0
    # shellcheck disable=SC2086
    srun --ntasks="$SLURM_NTASKS" ${SLURM_NTASKS_PER_NODE:+--ntasks-per-node=$SLURM_NTASKS_PER_NODE} \
        ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} ${SRUN_ARGS:-} \
        bash "$PIXART_DS_ROOT/slurm/common.sh" task -- "$@" || rc=$?
    if ((rc == 0)); then
        pixart_log "finished"
        return 0
    fi
    code=""
    ((requeue)) && { code=$(pixart_requeue_exit_code) || code=""; }
    # 128+USR1: the signal arrived before the trainer installed its handler (start-up); nothing new to save, the
    # requeued run resumes from the latest checkpoint all the same.
    if [[ -n $code ]] && ((rc == code || rc == 128 + $(kill -l USR1))); then
        if ((restarts >= ${MAX_REQUEUES:-100})); then
            pixart_log "stopped for requeue but already restarted $restarts times (MAX_REQUEUES=${MAX_REQUEUES:-100})"
            return "$rc"
        fi
        pixart_log "checkpointed and stopped (exit $rc): requeueing"
        # Slurm kills this script as part of the requeue and starts it again from the top later (after
        # AuthInfo's cred_expire, 120 s by default), with SLURM_RESTART_COUNT incremented.
        if ! scontrol requeue "$SLURM_JOB_ID"; then
            pixart_log "error: scontrol requeue failed (submitted with --no-requeue?); resubmit to resume"
            return "$rc"
        fi
        sleep 300
        pixart_log "error: still running 300 s after the requeue request"
        return "$rc"
    fi
    pixart_log "failed with exit code $rc"
    return "$rc"
}

# pixart_train RECIPE [key=value ...]: the training launch every stage uses.
pixart_train() {
    local recipe=$1
    shift
    [[ -f $recipe ]] || { pixart_log "error: recipe $recipe not found"; return 2; }
    local overrides=() extra=()
    [[ -n ${RUN_DIR:-} ]] && overrides+=("run_dir=$RUN_DIR")
    [[ -n ${INIT_FROM:-} ]] && overrides+=("train.init_from=$INIT_FROM")
    if [[ -n ${EXTRA:-} ]]; then
        eval "extra=($EXTRA)"
        overrides+=("${extra[@]}")
    fi
    overrides+=("$@")
    # shellcheck disable=SC2086
    pixart_run_step --requeue ${PYTHON:-python3} -m pixart_ds.cli train "$recipe" "${overrides[@]}"
}

# pixart_batch_init: the start of every sbatch file (after sourcing this file).
pixart_batch_init() {
    if [[ -n ${SETUP:-} ]]; then
        # shellcheck disable=SC1090
        source "$SETUP"
    fi
    pixart_env
    [[ -n ${SLURM_JOB_ID:-} ]] || { pixart_log "error: not inside a Slurm job (submit with sbatch)"; return 2; }
}

# ----------------------------------------------------------------------------------------------------------------
# Executed (not sourced): task wrapper and diagnostics.
# ----------------------------------------------------------------------------------------------------------------
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -euo pipefail
    mode=${1:-}
    shift || true
    [[ ${1:-} == -- ]] && shift
    case $mode in
        task)  # one training rank
            pixart_env
            pixart_rank_env
            exec "$@"
            ;;
        clean-shm)  # once per node, before the ranks start
            # Streaming names its segments NNNNNN_<name>; importing it costs seconds, so only when there are some.
            if compgen -G '/dev/shm/[0-9][0-9][0-9][0-9][0-9][0-9]_*' >/dev/null; then
                # shellcheck disable=SC2086
                exec ${PYTHON:-python3} -c 'from pixart_ds.data.loader import clean_stale_shm as c
n = len(c())
if n: print(f"removed {n} stale Streaming shared-memory segments / locks")'
            fi
            ;;
        env)
            pixart_rank_env
            for v in RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT; do echo "$v=${!v}"; done
            ;;
        *)
            echo "usage: bash slurm/common.sh task -- COMMAND ... | clean-shm | env" >&2
            exit 2
            ;;
    esac
fi
