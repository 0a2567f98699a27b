"""Rank/world/master derivation for every launcher, including a 4-node x 8-GPU srun job (every rank checked)."""
import os
import subprocess
import sys

import pytest

from pixart_ds.dist import DistEnvError, dist_env, expand_hostlist, export_env, parse_tasks_per_node, port_from_job_id


def test_expand_hostlist():
    assert expand_hostlist("gpu[001-004]") == ["gpu001", "gpu002", "gpu003", "gpu004"]
    assert expand_hostlist("gpu[001-003,007],cpu01") == ["gpu001", "gpu002", "gpu003", "gpu007", "cpu01"]
    assert expand_hostlist("node[8-10]-ib") == ["node8-ib", "node9-ib", "node10-ib"]
    assert expand_hostlist("r[1-2]n[1-2]") == ["r1n1", "r1n2", "r2n1", "r2n2"]
    assert expand_hostlist("single") == ["single"]
    with pytest.raises(DistEnvError, match="SLURM_JOB_NODELIST"):
        expand_hostlist("gpu[004-001]")


def test_parse_tasks_per_node():
    assert parse_tasks_per_node("8") == [8]
    assert parse_tasks_per_node("8(x4)") == [8, 8, 8, 8]
    assert parse_tasks_per_node("2(x2),1") == [2, 2, 1]
    with pytest.raises(DistEnvError):
        parse_tasks_per_node("eight")


def _slurm_env(procid, nodes=4, gpus=8, tasks_fmt="SLURM_NTASKS_PER_NODE", tasks_val="8"):
    node = procid // gpus  # srun's default block distribution
    return {
        "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(procid),
        "SLURM_NTASKS": str(nodes * gpus), "SLURM_LOCALID": str(procid % gpus), "SLURM_NODEID": str(node),
        tasks_fmt: tasks_val, "SLURM_JOB_NODELIST": "gpu[001-004]", "SLURM_NNODES": str(nodes),
    }


@pytest.mark.parametrize("fmt,val", [("SLURM_NTASKS_PER_NODE", "8"), ("SLURM_NTASKS_PER_NODE", "8(x4)"),
                                     ("SLURM_STEP_TASKS_PER_NODE", "8(x4)"), ("SLURM_TASKS_PER_NODE", "8(x4)")])
def test_srun_4_nodes_x_8_gpus_every_rank(fmt, val):
    seen = set()
    for procid in range(32):
        env = dist_env(_slurm_env(procid, tasks_fmt=fmt, tasks_val=val))
        assert env.launcher == "srun"
        assert (env.rank, env.world_size) == (procid, 32)
        assert (env.local_rank, env.local_world_size) == (procid % 8, 8)
        assert env.master_addr == "gpu001"
        assert env.master_port == port_from_job_id(123456) == 20000 + 123456 % 20000
        seen.add((procid // 8, env.local_rank))
    assert len(seen) == 32  # every (node, local rank) slot exactly once


def test_srun_respects_explicit_master_and_uneven_nodes():
    e = _slurm_env(4, tasks_fmt="SLURM_STEP_TASKS_PER_NODE", tasks_val="2(x2),1")
    e.update(SLURM_NTASKS="5", SLURM_NODEID="2", SLURM_LOCALID="0", MASTER_ADDR="10.0.0.1", MASTER_PORT="29500")
    env = dist_env(e)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (4, 5, 0, 1)
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 29500)


def test_srun_inconsistent_fails_naming_variables():
    e = _slurm_env(3)
    e["SLURM_LOCALID"] = "9"
    with pytest.raises(DistEnvError, match="local rank 9.*SLURM_LOCALID"):
        dist_env(e)
    e = _slurm_env(40)
    with pytest.raises(DistEnvError, match="rank 40.*SLURM_PROCID"):
        dist_env(e)
    e = _slurm_env(0, tasks_fmt="SLURM_STEP_TASKS_PER_NODE", tasks_val="8(x3)")
    with pytest.raises(DistEnvError, match="SLURM_STEP_TASKS_PER_NODE=8\\(x3\\) sums to 24 tasks but SLURM_NTASKS=32"):
        dist_env(e)
    e = _slurm_env(0)
    del e["SLURM_NTASKS_PER_NODE"]
    with pytest.raises(DistEnvError, match="SLURM_NTASKS_PER_NODE"):
        dist_env(e)


def test_sbatch_script_without_srun_is_single_process():
    # The batch script has SLURM_PROCID=0 and the job's SLURM_NTASKS but no step id: it is one process.
    e = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert dist_env(e).launcher == "single"


def test_torchrun_env():
    e = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h0",
         "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}
    env = dist_env(e)
    assert env == type(env)(3, 4, 1, 2, "h0", 29400, "torchrun")


def test_deepspeed_launcher_local_size():
    e = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "0",
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29501"}
    env = dist_env(e)
    assert (env.launcher, env.local_world_size) == ("deepspeed", 2)
    out = {}
    export_env(env, out)
    assert out["LOCAL_WORLD_SIZE"] == "2" and out["RANK"] == "1" and out["MASTER_PORT"] == "29501"


def test_rank_vars_inconsistent():
    with pytest.raises(DistEnvError, match="LOCAL_RANK"):
        dist_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    with pytest.raises(DistEnvError, match="LOCAL_WORLD_SIZE nor LOCAL_SIZE"):
        dist_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    with pytest.raises(DistEnvError, match="MASTER_ADDR and MASTER_PORT"):
        dist_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"})
    with pytest.raises(DistEnvError, match="rank 2 is outside"):
        dist_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                  "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    with pytest.raises(DistEnvError, match="LOCAL_WORLD_SIZE=2 but LOCAL_SIZE=4"):
        dist_env({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "LOCAL_SIZE": "4",
                  "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    with pytest.raises(DistEnvError, match="LOCAL_RANK=1 is set but RANK and WORLD_SIZE are not"):
        dist_env({"LOCAL_RANK": "1"})


def test_single_process():
    env = dist_env({})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.launcher) == (0, 1, 0, 1, "single")
    assert 0 < env.master_port < 65536


def test_init_distributed_gloo_two_ranks(tmp_path):
    # A real 2-process gloo group from srun-style variables: all_reduce sees both ranks.
    code = (
        "import os, torch, torch.distributed as d\n"
        "from pixart_ds.dist import dist_env, init_distributed\n"
        "env = dist_env()\n"
        "init_distributed(env, timeout_s=60)\n"
        "assert os.environ['RANK'] == str(env.rank) and os.environ['LOCAL_WORLD_SIZE'] == '2'\n"
        "t = torch.tensor([env.rank + 1.0]); d.all_reduce(t)\n"
        "print('SUM', int(t.item()), env.launcher)\n"
        "d.destroy_process_group()\n"
    )
    procs = []
    for r in range(2):
        e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        e.update({"SLURM_JOB_ID": str(40000 + os.getpid() % 10000), "SLURM_STEP_ID": "0", "SLURM_PROCID": str(r),
                  "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r), "SLURM_NODEID": "0", "SLURM_NTASKS_PER_NODE": "2",
                  "SLURM_JOB_NODELIST": "localhost", "CUDA_VISIBLE_DEVICES": ""})
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (o, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "SUM 3 srun" in o
