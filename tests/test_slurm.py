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


def test_common_sh_requeue_code_is_the_trainers():
    """The launcher requeues on the trainer's REQUEUE_EXIT_CODE; read from the trainer's source (no heavy import)."""
    import ast

    with open(os.path.join(REPO, "pixart_ds", "train", "trainer.py")) as f:
        tree = ast.parse(f.read())
    code = [n.value.value for n in tree.body if isinstance(n, ast.Assign)
            and any(getattr(t, "id", None) == "REQUEUE_EXIT_CODE" for t in n.targets)]
    env = {k: v for k, v in os.environ.items() if k != "REQUEUE_EXIT_CODE"}
    p = subprocess.run(["bash", "-c", f"source {COMMON}; pixart_requeue_exit_code"], env=env, capture_output=True,
                       text=True, timeout=30)
    assert code and p.stdout.strip() == str(code[0]), (code, p.stdout, p.stderr)


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


# ----------------------------------------------------------------------------------------------------------------
# End to end: the real sbatch files, the real trainer (2 ranks, DeepSpeed ZeRO-2 on CPU, Streaming)
# ----------------------------------------------------------------------------------------------------------------

TINY_TEXT = os.path.join(REPO, "tests", "recipes", "tiny_text.yaml")
TINY_CLASS = os.path.join(REPO, "tests", "recipes", "tiny_class.yaml")
STEPS = 60  # long enough (a few seconds of steps) for the signal to land mid-run
# Recipe overrides as arguments after the sbatch file (`sbatch slurm/stage2.sbatch key=value ...`).
TRAIN_ARGS = [f"train.total_steps={STEPS}", "train.global_batch_size=4", "train.micro_batch_size=2",
              "checkpoint.every_steps=25", "checkpoint.keep_last=2", "log.sample_ids=true", "log.progress_bar=false"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, cluster):
    """A working directory for the jobs (sbatch --chdir) holding the tiny recipes' shards at their relative paths
    (data/tiny_text, data/tiny_class)."""
    from train_helpers import write_class_shards, write_text_shards

    base = tmp_path_factory.mktemp("slurm")
    write_text_shards(str(base / "data" / "tiny_text"), n=64)
    write_class_shards(str(base / "data" / "tiny_class"), n=64)
    return base


def _submit_stage2(work, name: str) -> tuple[int, str, str]:
    run_dir, log = str(work / name), str(work / f"{name}.out")
    job = sbatch("stage2.sbatch", *CPU_NODE, f"--chdir={work}", f"--output={log}",
                 variables={"RECIPE": TINY_TEXT, "RUN_DIR": run_dir}, args=TRAIN_ARGS)
    return job, run_dir, log


@pytest.fixture(scope="module")
def reference(work):
    """stage2.sbatch, uninterrupted."""
    t0 = time.time()
    job, run_dir, log = _submit_stage2(work, "reference")
    info = wait_job(job, 300, log)
    return {"job": job, "info": info, "run_dir": run_dir, "log": log, "seconds": time.time() - t0}


def _export(run_dir: str, out: str, use_ema: bool) -> dict:
    from safetensors.torch import load_file

    from pixart_ds.train.checkpoint import export_weights

    assert export_weights(run_dir, out, use_ema=use_ema) == 0
    return load_file(os.path.join(out, "model.safetensors"))


@pytest.mark.slurm
def test_stage2_sbatch_trains_checkpoints_and_exits_0(reference):
    from pixart_ds.train.metrics import read_metrics

    info = reference["info"]
    log = read_log(reference["log"])
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert info["Restarts"] == "0" and info["NumTasks"] == "2" and info["NumNodes"] == "1"
    assert info["Command"] == os.path.join(REPO, "slurm", "stage2.sbatch")
    steps, events = read_metrics(os.path.join(reference["run_dir"], "metrics.jsonl"))
    assert sorted(steps) == list(range(1, STEPS + 1))
    start = [e for e in events if e["event"] == "start"][0]
    # common.sh exported the standard names (RANK, LOCAL_WORLD_SIZE, ...) in each task, so dist.py reads those.
    assert start["world_size"] == 2 and start["launcher"] in ("srun", "torchrun")
    ckpts = sorted(os.listdir(os.path.join(reference["run_dir"], "checkpoints")))
    assert "step_00000060" in ckpts and "step_00000050" in ckpts
    with open(os.path.join(reference["run_dir"], "checkpoints", "latest")) as f:
        assert f.read().strip() == "step_00000060"
    assert "pixart-ds train: done at step 60" in log and "finished" in log
    print(f"\nstage2.sbatch, {STEPS} steps, 2 tasks: {reference['seconds']:.0f} s from submit to COMPLETED")


@pytest.mark.slurm
def test_preempted_job_requeues_resumes_and_matches_uninterrupted(work, reference):
    """SIGUSR1 mid-run (what --signal=USR1@T sends before the time limit): every rank stops at the next step
    boundary and checkpoints, the job requeues itself, the requeued run (SLURM_RESTART_COUNT=1) resumes from that
    checkpoint and ends with the same weights and the same samples in the same order as the uninterrupted job."""
    from pixart_ds.train.metrics import read_metrics

    t0 = time.time()
    job, run_dir, log = _submit_stage2(work, "preempted")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 240
    while True:  # signal once a few steps are done, so the trainer's handler is installed
        if os.path.exists(metrics) and any('"step": 2,' in line or '"step": 3,' in line for line in open(metrics)):
            break
        info = job_info(job)
        assert info["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), (info, read_log(log)[-3000:])
        assert time.time() < deadline, read_log(log)[-3000:]
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", str(job)], check=True, timeout=30)
    t_signal = time.time()
    requeued = wait_job(job, 120, log, states={"PENDING", "REQUEUED"} | TERMINAL)
    assert requeued["JobState"] in ("PENDING", "REQUEUED"), (requeued, read_log(log)[-3000:])
    assert requeued["Restarts"] == "1"
    t_requeue = time.time()
    info = wait_job(job, 300, log)
    text = read_log(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    assert info["Restarts"] == "1"
    assert "restart 0;" in text and "requeueing" in text and "restart 1;" in text  # one log, both runs

    steps, events = read_metrics(metrics)
    stop = [e for e in events if e["event"] == "stop"]
    resume = [e for e in events if e["event"] == "resume"]
    assert len(stop) == 1 and stop[0]["reason"] == "signal SIGUSR1" and 2 <= stop[0]["step"] < STEPS, stop
    assert len(resume) == 1 and resume[0]["step"] == stop[0]["step"], resume
    assert resume[0]["checkpoint"].endswith(f"step_{stop[0]['step']:08d}")

    ref, _ = read_metrics(os.path.join(reference["run_dir"], "metrics.jsonl"))
    assert sorted(steps) == sorted(ref) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert steps[s]["sample_idx"] == ref[s]["sample_idx"], f"step {s}: sample order differs"
        assert steps[s]["loss"] == ref[s]["loss"], f"step {s}: loss {steps[s]['loss']} vs {ref[s]['loss']}"
    for use_ema in (True, False):
        tag = "ema" if use_ema else "raw"
        a = _export(reference["run_dir"], str(work / f"reference_{tag}"), use_ema)
        b = _export(run_dir, str(work / f"preempted_{tag}"), use_ema)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()), f"{tag} weight {k} differs"
    print(f"\npreempted at step {stop[0]['step']}: signal -> requeued {t_requeue - t_signal:.0f} s, "
          f"requeued -> COMPLETED {time.time() - t_requeue:.0f} s, total {time.time() - t0:.0f} s")


@pytest.mark.slurm
def test_pipeline_chains_stage1_into_stage2(work):
    """pipeline.sh: stage 2 waits for stage 1 (afterok) and starts from stage 1's run directory."""
    from pixart_ds.train.metrics import read_metrics

    t0 = time.time()
    runs = work / "pipeline"
    cmd = ["bash", os.path.join(REPO, "slurm", "pipeline.sh"), "--stages", "1,2", "--recipe", f"1={TINY_CLASS}",
           "--recipe", f"2={TINY_TEXT}", "--runs", str(runs), "--",
           *CPU_NODE, f"--chdir={work}", f"--output={work}/%x-%j.out"]
    # EXTRA reaches every stage through the environment (sbatch --export=ALL).
    env = dict(os.environ, EXTRA="log.progress_bar=false log.every_steps=1")
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = [dict(kv.split("=", 1) for kv in line.split()) for line in p.stdout.splitlines()]
    assert [ln["stage"] for ln in lines] == ["1", "2"]
    s1, s2 = lines
    j1, j2 = int(s1["job"]), int(s2["job"])
    assert s1["run_dir"] == str(runs / "tiny_class") and s1["init_from"] == "-"
    assert s2["run_dir"] == str(runs / "tiny_text") and s2["init_from"] == s1["run_dir"]

    info2 = job_info(j2)
    assert info2["Dependency"].startswith(f"afterok:{j1}"), info2["Dependency"]
    assert info2["JobState"] == "PENDING"
    done1 = wait_job(j1, 240)
    assert done1["JobState"] == "COMPLETED" and done1["ExitCode"] == "0:0"
    done2 = wait_job(j2, 240)
    log2 = read_log(os.path.join(work, f"pixart-tiny_text-{j2}.out"))
    assert done2["JobState"] == "COMPLETED" and done2["ExitCode"] == "0:0", log2[-3000:]
    assert f"train.init_from={s1['run_dir']}" in log2  # INIT_FROM reached the trainer
    import yaml

    with open(os.path.join(s2["run_dir"], "config.yaml")) as f:
        assert yaml.safe_load(f)["train"]["init_from"] == s1["run_dir"]
    _, events = read_metrics(os.path.join(s2["run_dir"], "metrics.jsonl"))
    start = [e for e in events if e["event"] == "start"][0]
    assert start["init"], start  # stage 2 really started from stage 1's weights
    print(f"\npipeline stage 1 -> stage 2: {time.time() - t0:.0f} s; init: {start['init']}")
