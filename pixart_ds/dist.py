"""Rank / world / master from the launcher's environment, and process-group initialisation.

Four launchers are supported, detected in this order:

- torchrun (and any launcher that sets RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE, e.g. torchrun inside srun);
- the `deepspeed` launcher, which sets RANK/WORLD_SIZE/LOCAL_RANK and LOCAL_SIZE but not LOCAL_WORLD_SIZE. Streaming
  learns the node topology only from LOCAL_WORLD_SIZE, so a 2-rank run without it dies in shared memory
  (`FileExistsError: '/0000NN_locals'`, docs/stack.md); we derive it from LOCAL_SIZE;
- srun with one task per rank: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_NODEID and the per-node task
  counts; MASTER_ADDR is the first host of SLURM_JOB_NODELIST (hostlist syntax expanded here, no `scontrol`) and
  MASTER_PORT, when unset, is derived from SLURM_JOB_ID so every task of a job agrees on it without talking;
- a single process (none of the above).

`dist_env()` returns the derived values; `export_env()` writes them to os.environ (DeepSpeed's init_distributed and
Streaming read only the standard names); `init_distributed()` creates the process group (gloo on CPU, nccl on GPU)
with the recipe's collective timeout. `rank()`, `world_size()`, `barrier()`, `gather_objects()` and `any_rank()`
are the process-group helpers every layer uses (they work, as one process, without a process group).
"""
from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.distributed as tdist
import torch.distributed.distributed_c10d as c10d


class DistEnvError(ValueError):
    """Inconsistent launcher environment; the message names the variables involved."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "deepspeed" | "srun" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ----------------------------------------------------------------------------------------------------------------
# Slurm syntax helpers
# ----------------------------------------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...] ("a[1-2],b" -> ["a[1-2]", "b"])."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_range_list(body: str, where: str) -> list[str]:
    """"001-003,007" -> ["001", "002", "003", "007"]; zero padding follows the lower bound's width."""
    out = []
    for item in body.split(","):
        item = item.strip()
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise DistEnvError(f"SLURM_JOB_NODELIST: bad range {item!r} in {where!r}")
            width = len(lo)
            out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
        elif item:
            out.append(item)
    return out


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand Slurm's compressed hostlist: "gpu[001-004]", "a[1-2]-ib,b", "r[1-2]n[1-2]" (cartesian product)."""
    hosts: list[str] = []
    for part in _split_top_level(hostlist):
        pieces = re.split(r"(\[[^\]]*\])", part)
        expansions = [""]
        for piece in pieces:
            if not piece:
                continue
            if piece.startswith("["):
                if not piece.endswith("]"):
                    raise DistEnvError(f"SLURM_JOB_NODELIST: unbalanced brackets in {hostlist!r}")
                choices = _expand_range_list(piece[1:-1], hostlist)
            else:
                if "[" in piece or "]" in piece:
                    raise DistEnvError(f"SLURM_JOB_NODELIST: unbalanced brackets in {hostlist!r}")
                choices = [piece]
            expansions = [e + c for e in expansions for c in choices]
        hosts.extend(expansions)
    return hosts


def parse_tasks_per_node(text: str) -> list[int]:
    """Slurm's compressed counts: "8" -> [8], "8(x4)" -> [8, 8, 8, 8], "2(x2),1" -> [2, 2, 1]."""
    out = []
    for item in text.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item)
        if not m:
            raise DistEnvError(f"tasks-per-node value {text!r} is not Slurm's format (e.g. 8 or 8(x4))")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def port_from_job_id(job_id: int) -> int:
    """A port every task of a job derives alike; kept in 20000-39999 (below Linux's default ephemeral range start
    32768 for most jobs, and away from common service ports)."""
    return 20000 + job_id % 20000


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------------------------


def _int(environ: Mapping[str, str], name: str, launcher: str) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        raise DistEnvError(f"{launcher} launch: {name} is not set")
    try:
        return int(raw)
    except ValueError:
        raise DistEnvError(f"{launcher} launch: {name}={raw!r} is not an integer") from None


def _check(env: DistEnv, names: str) -> DistEnv:
    if env.world_size < 1:
        raise DistEnvError(f"{env.launcher} launch: world size {env.world_size} < 1 ({names})")
    if not 0 <= env.rank < env.world_size:
        raise DistEnvError(f"{env.launcher} launch: rank {env.rank} is outside [0, {env.world_size}) ({names})")
    if env.local_world_size < 1 or env.local_world_size > env.world_size:
        raise DistEnvError(f"{env.launcher} launch: local world size {env.local_world_size} is outside "
                           f"[1, {env.world_size}] ({names})")
    if not 0 <= env.local_rank < env.local_world_size:
        raise DistEnvError(f"{env.launcher} launch: local rank {env.local_rank} is outside "
                           f"[0, {env.local_world_size}) ({names})")
    if not 0 < env.master_port < 65536:
        raise DistEnvError(f"{env.launcher} launch: MASTER_PORT={env.master_port} is not a valid port")
    return env


def _from_rank_vars(environ: Mapping[str, str]) -> DistEnv:
    """torchrun or the deepspeed launcher: RANK/WORLD_SIZE/LOCAL_RANK (+ LOCAL_WORLD_SIZE or LOCAL_SIZE)."""
    launcher = "torchrun" if ("TORCHELASTIC_RUN_ID" in environ or "LOCAL_WORLD_SIZE" in environ) else "deepspeed"
    missing = [n for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if not environ.get(n)]
    if missing:
        raise DistEnvError(f"{launcher} launch: RANK is set but {', '.join(missing)} is not "
                           f"(RANK, WORLD_SIZE and LOCAL_RANK must be set together)")
    rank = _int(environ, "RANK", launcher)
    world = _int(environ, "WORLD_SIZE", launcher)
    local_rank = _int(environ, "LOCAL_RANK", launcher)
    if environ.get("LOCAL_WORLD_SIZE"):
        local_world = _int(environ, "LOCAL_WORLD_SIZE", launcher)
        if environ.get("LOCAL_SIZE") and int(environ["LOCAL_SIZE"]) != local_world:
            raise DistEnvError(f"{launcher} launch: LOCAL_WORLD_SIZE={local_world} but LOCAL_SIZE="
                               f"{environ['LOCAL_SIZE']}")
    elif environ.get("LOCAL_SIZE"):
        local_world = _int(environ, "LOCAL_SIZE", launcher)
    elif world == 1:
        local_world = 1
    else:
        raise DistEnvError(f"{launcher} launch: WORLD_SIZE={world} but neither LOCAL_WORLD_SIZE nor LOCAL_SIZE is "
                           f"set (Streaming needs the ranks per node)")
    addr = environ.get("MASTER_ADDR")
    port = environ.get("MASTER_PORT")
    if world > 1 and (not addr or not port):
        raise DistEnvError(f"{launcher} launch: WORLD_SIZE={world} needs MASTER_ADDR and MASTER_PORT "
                           f"(got MASTER_ADDR={addr!r}, MASTER_PORT={port!r})")
    addr = addr or "127.0.0.1"
    port_i = _int(environ, "MASTER_PORT", launcher) if port else _free_port()
    env = DistEnv(rank, world, local_rank, local_world, addr, port_i, launcher)
    return _check(env, "RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE/LOCAL_SIZE")


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    """srun, one task per rank."""
    launcher = "srun"
    rank = _int(environ, "SLURM_PROCID", launcher)
    world = _int(environ, "SLURM_NTASKS", launcher) if environ.get("SLURM_NTASKS") else \
        _int(environ, "SLURM_STEP_NUM_TASKS", launcher)
    local_rank = _int(environ, "SLURM_LOCALID", launcher)
    node_id = int(environ.get("SLURM_NODEID", "0") or 0)

    # Tasks on this node. SLURM_STEP_TASKS_PER_NODE lists every node of the step ("8(x4)" or "2,1"), indexed by
    # SLURM_NODEID; SLURM_NTASKS_PER_NODE is the requested (uniform) count; SLURM_TASKS_PER_NODE is the job's.
    local_world = None
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if environ.get(name):
            counts = parse_tasks_per_node(environ[name])
            if len(counts) == 1:
                local_world = counts[0]
            elif node_id < len(counts):
                local_world = counts[node_id]
                if sum(counts) != world:
                    raise DistEnvError(f"srun launch: {name}={environ[name]} sums to {sum(counts)} tasks but "
                                       f"SLURM_NTASKS={world}")
            else:
                raise DistEnvError(f"srun launch: SLURM_NODEID={node_id} but {name}={environ[name]} lists "
                                   f"{len(counts)} nodes")
            break
    if local_world is None:
        if world == 1:
            local_world = 1
        else:
            raise DistEnvError("srun launch: none of SLURM_STEP_TASKS_PER_NODE, SLURM_NTASKS_PER_NODE, "
                               "SLURM_TASKS_PER_NODE is set; cannot tell the ranks per node")

    addr = environ.get("MASTER_ADDR")
    if not addr:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or \
            environ.get("SLURM_NODELIST")
        if not nodelist:
            if world > 1:
                raise DistEnvError("srun launch: MASTER_ADDR is unset and SLURM_JOB_NODELIST is empty")
            addr = "127.0.0.1"
        else:
            addr = expand_hostlist(nodelist)[0]
    if environ.get("MASTER_PORT"):
        port = _int(environ, "MASTER_PORT", launcher)
    elif environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID"):
        job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
        if not job.isdigit():
            raise DistEnvError(f"srun launch: SLURM_JOB_ID={job!r} is not an integer")
        port = port_from_job_id(int(job))
    elif world == 1:
        port = _free_port()
    else:
        raise DistEnvError("srun launch: MASTER_PORT is unset and there is no SLURM_JOB_ID to derive it from")
    env = DistEnv(rank, world, local_rank, local_world, addr, port, launcher)
    return _check(env, "SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE")


def dist_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Derive rank/world/master from the launcher's environment (see the module docstring for the order)."""
    environ = os.environ if environ is None else environ
    if environ.get("RANK") or environ.get("WORLD_SIZE"):
        return _from_rank_vars(environ)
    # An srun task has a step id; the batch script itself (sbatch, no srun) has SLURM_PROCID=0 but is one process.
    if environ.get("SLURM_PROCID") and (environ.get("SLURM_STEP_ID") or environ.get("SLURM_STEPID")):
        return _from_slurm(environ)
    # A half-set environment (a launcher wrapper that lost RANK) must not silently become N copies of rank 0.
    if environ.get("LOCAL_RANK", "0") not in ("", "0"):
        raise DistEnvError(f"LOCAL_RANK={environ['LOCAL_RANK']} is set but RANK and WORLD_SIZE are not")
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if environ.get(name, "1") not in ("", "1"):
            raise DistEnvError(f"{name}={environ[name]} is set but RANK and WORLD_SIZE are not")
    addr = environ.get("MASTER_ADDR") or "127.0.0.1"
    port = int(environ["MASTER_PORT"]) if environ.get("MASTER_PORT") else _free_port()
    return _check(DistEnv(0, 1, 0, 1, addr, port, "single"), "single process")


def launch_ranks(environ: Optional[Mapping[str, str]] = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) for jobs that need no process group (feature extraction, captioning): every
    rank reads its own slice and writes its own part. torchrun / deepspeed (RANK, WORLD_SIZE, LOCAL_RANK) win over
    srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID); (0, 1, 0) for a single process. Unlike `dist_env` it needs
    neither the ranks per node nor a master address."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        r, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        r, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    else:
        r, world, local = 0, 1, 0
    if world < 1 or not 0 <= r < world:
        raise ValueError(f"inconsistent rank environment: rank {r} is outside world size {world} (RANK/WORLD_SIZE "
                         f"or SLURM_PROCID/SLURM_NTASKS)")
    return r, world, local


def export_env(env: DistEnv, environ=None) -> None:
    """Write the standard names (read by torch.distributed env://, DeepSpeed and Streaming) to the environment."""
    environ = os.environ if environ is None else environ
    environ.update({
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.local_world_size),
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    })


def init_distributed(env: DistEnv, timeout_s: float = 600, device: Optional[str] = None):
    """Create the default process group; returns the torch.device this rank computes on.

    gloo on CPU, nccl on GPU. The timeout bounds every collective, so a dead rank ends the job with an error
    instead of a hang (the recipe's train.collective_timeout_s).
    """
    export_env(env)
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        n = torch.cuda.device_count()
        if env.local_rank >= n:
            raise DistEnvError(f"LOCAL_RANK={env.local_rank} but only {n} CUDA devices are visible "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        torch.cuda.set_device(env.local_rank)
        dev = torch.device("cuda", env.local_rank)
    else:
        dev = torch.device("cpu")
    timeout = datetime.timedelta(seconds=timeout_s)
    # Groups created later without a timeout -- DeepSpeed's clone of the world group, in which ZeRO reduces the
    # gradients (deepspeed/utils/groups.py _clone_world_group: new_group(ranks)) -- get torch's module default
    # (30 min for gloo, 10 min for NCCL), not the one given to init_process_group: a hung rank then stalled the job
    # for 30 min whatever the recipe said. Make the recipe's timeout that default, before any group exists.
    c10d.default_pg_timeout = timeout
    if getattr(c10d, "default_pg_nccl_timeout", None) is not None:
        c10d.default_pg_nccl_timeout = timeout
    if not tdist.is_initialized():
        tdist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method="env://",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
        )
    return dev


# ----------------------------------------------------------------------------------------------------------------
# Process-group helpers (one process without a group behaves as world size 1)
# ----------------------------------------------------------------------------------------------------------------


def is_multi() -> bool:
    """Whether a process group of more than one rank is up."""
    return tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else 1


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def gather_objects(obj: Any) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not is_multi():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def gather_tensor(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every rank's 1-D tensor `t` (same length on every rank), concatenated in rank order ([world * n])."""
    t = t.to(device)
    if not is_multi():
        return t.cpu()
    out = [torch.empty_like(t) for _ in range(tdist.get_world_size())]
    tdist.all_gather(out, t)
    return torch.cat(out).cpu()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is true on any rank (one small all_reduce)."""
    if not is_multi():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def destroy() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()
