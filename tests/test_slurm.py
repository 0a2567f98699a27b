"""Slurm launchers on a real single-node Slurm cluster (`make slurm-up` / `bash slurm/local-cluster.sh up`).

The sbatch files are submitted unmodified; only sbatch's own command-line options turn the GPU-cluster defaults
(8 nodes x 8 GPUs) into one CPU node with 2 tasks, and variables (RECIPE, RUN_DIR, EXTRA, ...) pick the tiny
recipe. Job state is read from Slurm itself (`scontrol show job`); there is no accounting daemon, so the cluster
keeps finished jobs visible for MinJobAge seconds (slurm/local-cluster.sh).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = os.path.join(REPO, "slurm", "common.sh")


# ----------------------------------------------------------------------------------------------------------------
# Rank / world / master derivation in common.sh (no cluster needed)
# ----------------------------------------------------------------------------------------------------------------

def _bash_env(slurm_vars: dict) -> dict:
    """Run `bash slurm/common.sh env` with exactly these SLURM_* variables; returns the exported values."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                         "MASTER_ADDR", "MASTER_PORT")}
    env.update(slurm_vars)
    p = subprocess.run(["bash", COMMON, "env"], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return dict(line.split("=", 1) for line in p.stdout.split())


def _task_vars(job_id, nodelist, tasks_per_node, node_id, local_id, ntasks):
    return {
        "SLURM_JOB_ID": str(job_id),
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_JOB_NUM_NODES": str(len(tasks_per_node)),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_NTASKS_PER_NODE": str(tasks_per_node[0]),
        "SLURM_STEP_TASKS_PER_NODE": ",".join(str(n) for n in tasks_per_node),
        "SLURM_NODEID": str(node_id),
        "SLURM_LOCALID": str(local_id),
        "SLURM_PROCID": str(sum(tasks_per_node[:node_id]) + local_id),
        "SLURM_STEP_ID": "0",
    }


def test_common_sh_ranks_4_nodes_x_8_gpus():
    """Every one of the 32 tasks of a 4-node x 8-GPU job derives its own rank, the same world and master, and
    agrees with pixart_ds.train.dist (the Python side, used when RANK is absent)."""
    from pixart_ds.train.dist import dist_env

    nodelist = "gpu[007-009,012]"
    seen = set()
    for node in range(4):
        for local in range(8):
            slurm = _task_vars(123456, nodelist, [8, 8, 8, 8], node, local, 32)
            # Slurm compresses equal counts: "8(x4)".
            slurm["SLURM_STEP_TASKS_PER_NODE"] = "8(x4)"
            got = _bash_env(slurm)
            assert got == {
                "RANK": str(node * 8 + local), "WORLD_SIZE": "32", "LOCAL_RANK": str(local),
                "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "gpu007", "MASTER_PORT": str(20000 + 123456 % 20000),
            }, (node, local, got)
            py = dist_env(slurm)
            assert (py.rank, py.world_size, py.local_rank, py.local_world_size, py.master_addr, py.master_port) == (
                int(got["RANK"]), 32, local, 8, "gpu007", int(got["MASTER_PORT"]))
            seen.add(got["RANK"])
    assert len(seen) == 32


@pytest.mark.parametrize("nodelist,first", [
    ("vm", "vm"),
    ("node1,node2", "node1"),
    ("gpu[001-004]", "gpu001"),
    ("gpu[12,3-5],cpu1", "gpu12"),
    ("gpu-a[08-10]", "gpu-a08"),
    ("r[1-2]n[3-4]", "r1n3"),
])
def test_common_sh_master_is_first_host(nodelist, first):
    got = _bash_env(_task_vars(7, nodelist, [1], 0, 0, 1))
    assert got["MASTER_ADDR"] == first
    if shutil.which("scontrol"):  # Slurm's own expansion agrees
        p = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        assert p.stdout.split()[0] == first


def test_common_sh_uneven_layout_and_errors():
    # 3 tasks on 2 nodes (2 + 1): the second node's only task has LOCAL_WORLD_SIZE 1.
    got = _bash_env(_task_vars(5, "n[1-2]", [2, 1], 1, 0, 3))
    assert (got["RANK"], got["LOCAL_WORLD_SIZE"], got["WORLD_SIZE"]) == ("2", "1", "3")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.run(["bash", COMMON, "env"], env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "not inside an srun task" in p.stderr


# ----------------------------------------------------------------------------------------------------------------
# The local cluster and job helpers
# ----------------------------------------------------------------------------------------------------------------

# sbatch options that turn the GPU defaults into this machine: one node, 2 CPU tasks, no GPUs.
CPU_NODE = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=20"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


@pytest.fixture(scope="module")
def cluster():
    """The single-node cluster of slurm/local-cluster.sh; started here when `make slurm-up` was not run."""
    p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True) if shutil.which("scontrol") else None
    if p is None or "UP" not in p.stdout:
        if os.geteuid() != 0:
            pytest.fail("no local Slurm cluster: run `make slurm-up` as root (slurm/local-cluster.sh up)")
        subprocess.run(["bash", os.path.join(REPO, "slurm", "local-cluster.sh"), "up"], check=True, timeout=600)
    return True


def sbatch(script: str, *options: str, variables: dict | None = None, args=(), cwd=REPO) -> int:
    """Submit slurm/SCRIPT unmodified with command-line options; returns the job id."""
    export = "ALL" + "".join(f",{k}={v}" for k, v in (variables or {}).items())
    cmd = ["sbatch", "--parsable", f"--export={export}", *options, os.path.join(REPO, "slurm", script), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=60)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stderr}"
    return int(p.stdout.strip().split(";")[0])


def job_info(job_id: int) -> dict:
    """`scontrol show job -o ID` as a dict (JobState, ExitCode, Restarts, Dependency, Command, ...)."""
    p = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, f"job {job_id} unknown to Slurm: {p.stderr}"
    info = {}
    for tok in p.stdout.split():
        k, _, v = tok.partition("=")
        if v or k not in info:
            info[k] = v
    return info


def wait_job(job_id: int, timeout: float, log: str | None = None, states=TERMINAL) -> dict:
    deadline = time.time() + timeout
    while True:
        info = job_info(job_id)
        if info["JobState"] in states:
            return info
        if time.time() > deadline:
            subprocess.run(["scancel", str(job_id)])
            tail = open(log).read()[-3000:] if log and os.path.exists(log) else ""
            pytest.fail(f"job {job_id} still {info['JobState']} after {timeout:.0f}s\n{tail}")
        time.sleep(0.5)


def read_log(path: str) -> str:
    with open(path) as f:
        return f.read()
