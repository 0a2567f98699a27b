"""Slurm launchers on a real single-node Slurm cluster (`make slurm-up` / `bash slurm/local-cluster.sh up`).

The sbatch files are submitted unmodified; only sbatch's own command-line options turn the GPU-cluster defaults
(8 nodes x 8 GPUs) into one CPU node with 2 tasks, and variables (RECIPE, RUN_DIR, EXTRA, ...) pick the tiny
recipe. Job state is read from Slurm itself (`scontrol show job`); there is no accounting daemon, so the cluster
keeps finished jobs visible for MinJobAge seconds (slurm/local-cluster.sh).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest
from slurm_helpers import TERMINAL, job_info, read_log, sbatch, wait_job
from slurm_helpers import steps_done as _steps_done

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
    agrees with pixart_ds.dist (the Python side, used when RANK is absent)."""
    from pixart_ds.dist import dist_env

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


@pytest.fixture(scope="module")
def cluster():
    """The single-node cluster of slurm/local-cluster.sh; started here when `make slurm-up` was not run."""
    p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True) if shutil.which("scontrol") else None
    if p is None or "UP" not in p.stdout:
        if os.geteuid() != 0:
            pytest.fail("no local Slurm cluster: run `make slurm-up` as root (slurm/local-cluster.sh up)")
        subprocess.run(["bash", os.path.join(REPO, "slurm", "local-cluster.sh"), "up"], check=True, timeout=600)
    return True


def _scontrol_config() -> dict:
    """The configuration slurmctld runs with (`scontrol show config`: defaults included), as a dict."""
    p = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return {k.strip(): v.strip() for k, _, v in (ln.partition("=") for ln in p.stdout.splitlines()) if v}


@pytest.mark.slurm
def test_local_cluster_up_is_idempotent(cluster):
    """`up` on a running cluster: no restart, no rewrite, every node stays usable; the configuration Slurm runs with
    is the minimal one docs/stack.md describes (linuxproc, no task plugin, no accounting), this machine's node in the
    default partition."""
    from slurmutils import SlurmConfig

    script = os.path.join(REPO, "slurm", "local-cluster.sh")
    conf = "/etc/slurm/slurm.conf"
    before = os.stat(conf).st_mtime_ns
    for _ in range(2):
        p = subprocess.run(["bash", script, "up"], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert re.search(r"node \S+ is (idle|mix|alloc)", p.stderr), p.stderr
        assert "starting" not in p.stderr and "wrote" not in p.stderr, p.stderr
    assert os.stat(conf).st_mtime_ns == before
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    effective = _scontrol_config()
    for key, value in (("ClusterName", "local"), ("SlurmctldHost[0]", host), ("ProctrackType", "proctrack/linuxproc"),
                       ("TaskPlugin", "task/none"), ("SelectType", "select/cons_tres"),
                       ("SelectTypeParameters", "CR_CORE"), ("AccountingStorageType", "accounting_storage/none"),
                       ("SwitchType", "switch/none"), ("AuthInfo", "cred_expire=10")):
        assert effective.get(key) == value, (key, effective.get(key))
    # The file itself, read back with slurmutils (it wrote it): this machine's node sized to the machine.
    written = SlurmConfig.from_str(open(conf).read())
    node = written.nodes[host]
    assert node.cpus == os.cpu_count()
    total_mb = int(open("/proc/meminfo").readline().split()[1]) // 1024
    assert 0 < node.real_memory < total_mb
    debug = written.partitions["debug"]
    assert debug.nodes == [host] and debug.default and debug.over_subscribe == "yes"
    p = subprocess.run(["bash", script, "status"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "slurmctld: running" in p.stdout and "slurmd: running" in p.stdout, p.stdout


SBATCH_FILES = ["stage1.sbatch", "stage2.sbatch", "stage3.sbatch", "ablation.sbatch", "features.sbatch",
                "caption.sbatch", "eval.sbatch"]
TRAINING = SBATCH_FILES[:4]


def _directives(name: str) -> dict:
    out = {}
    with open(os.path.join(REPO, "slurm", name)) as f:
        for line in f:
            m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
            if m:
                out[m.group(1)] = m.group(2)
    return out


@pytest.mark.parametrize("name", SBATCH_FILES)
def test_sbatch_defaults_are_a_gpu_cluster_and_no_hyperparameters(name):
    d = _directives(name)
    assert d["gpus-per-node"] == "8" and d["ntasks-per-node"] == "8" and "nodes" in d and "time" in d
    if name in TRAINING:
        # USR1 to every rank (no "B:" = not only the batch shell) some minutes before the limit; requeue allowed;
        # the requeued run appends to the same log.
        assert re.fullmatch(r"USR1@\d+", d["signal"]) and "requeue" in d and d["open-mode"] == "append"
    body = [ln for ln in open(os.path.join(REPO, "slurm", name)) if not ln.lstrip().startswith("#")]
    keys = re.compile(r"\b(train|model|data|diffusion|checkpoint|log|sample)\.\w+=|--(lr|steps|batch)")
    assert not [ln for ln in body if keys.search(ln)], "hyperparameters belong in recipes"
    p = subprocess.run(["bash", "-n", os.path.join(REPO, "slurm", name)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.slurm
def test_sbatch_files_pick_their_recipe_and_reject_bad_variables(cluster, tmp_path):
    """Every launcher under Slurm with PYTHON=echo (a dry run: each rank prints the command it would run):
    stage 1/2/3 and ablation choose their recipe by RES / VARIANT, features/caption pass their inputs; bad or
    missing variables fail the job with a message naming the variable."""
    cases = {
        "s1": ("stage1.sbatch", {}, "recipes/stage1_imagenet256.yaml"),
        "s3": ("stage3.sbatch", {"RES": "1024"}, "recipes/stage3_hq1024.yaml"),
        "ab": ("ablation.sbatch", {"VARIANT": "adaln"}, "recipes/ablation_adaln.yaml"),
        "ft": ("features.sbatch", {"IN": "raw", "OUT": "feat", "VAE": "vae"}, "features --in raw --out feat --vae vae"),
        "cp": ("caption.sbatch", {"IN": "raw", "OUT": "cap", "MODEL": "llava"}, "caption --in raw --out cap --model llava"),
        "ev": ("eval.sbatch", {"CKPT": "run", "PROMPTS": "p.txt", "OUT": "ev", "REFERENCE": "ref", "INCEPTION": "inc.pt"},
               "eval --ckpt run --prompts p.txt --out ev --reference ref --inception inc.pt"),
        "no_ckpt": ("eval.sbatch", {"PROMPTS": "p.txt", "OUT": "ev"}, "set CKPT to a run directory"),
        "bad_res": ("stage3.sbatch", {"RES": "300"}, "RES=300"),
        "no_variant": ("ablation.sbatch", {}, "set VARIANT=adaln or VARIANT=adaln_single"),
        "no_in": ("features.sbatch", {"OUT": "feat", "VAE": "vae"}, "set IN to the raw MDS directory"),
    }
    jobs = {}
    for key, (name, variables, _) in cases.items():
        log = str(tmp_path / f"{key}.out")
        jobs[key] = (sbatch(name, *CPU_NODE, f"--output={log}", variables={"PYTHON": "echo", **variables}), log)
    for key, (name, _, expect) in cases.items():
        job, log = jobs[key]
        info = wait_job(job, 120, log)
        text = read_log(log)
        assert expect in text, text
        if key in ("bad_res", "no_variant", "no_in", "no_ckpt"):
            assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", (key, info["JobState"])
        else:
            assert info["JobState"] == "COMPLETED", (key, text)
            assert text.count("-m pixart_ds.cli") >= 3, text  # the batch log line + one line per rank


# ----------------------------------------------------------------------------------------------------------------
# End to end: the real sbatch files, the real trainer (2 ranks, DeepSpeed ZeRO-2 on CPU, Streaming)
#
# Four trainer launches in all (each costs process start-up + DeepSpeed set-up, far more than the tiny steps):
# pipeline.sh submits stage1.sbatch -> stage2.sbatch (tiny recipes); that stage-2 job is the uninterrupted
# reference; then stage2.sbatch is submitted directly with the same recipe and INIT_FROM, signalled mid-run,
# requeued and resumed, and compared with the reference.
# ----------------------------------------------------------------------------------------------------------------

TINY_TEXT = os.path.join(REPO, "tests", "recipes", "tiny_text.yaml")
TINY_CLASS = os.path.join(REPO, "tests", "recipes", "tiny_class.yaml")
STEPS = 60  # long enough (a few seconds of steps) for the signal to land mid-run
OVERRIDES = [f"train.total_steps={STEPS}", "train.global_batch_size=4", "train.micro_batch_size=2",
             "checkpoint.every_steps=25", "checkpoint.keep_last=2", "log.sample_ids=true", "log.progress_bar=false"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, cluster):
    """A working directory for the jobs (sbatch --chdir) holding the tiny recipes' shards at their relative paths
    (data/tiny_text, data/tiny_class)."""
    from pixart_ds.testing import write_class_shards, write_text_shards

    base = tmp_path_factory.mktemp("slurm")
    write_text_shards(str(base / "data" / "tiny_text"), n=64)
    write_class_shards(str(base / "data" / "tiny_class"), n=64)
    return base


@pytest.fixture(scope="module")
def chain(work):
    """`slurm/pipeline.sh --stages 1,2` with the tiny recipes; returns what it printed and what Slurm said."""
    t0 = time.time()
    runs = work / "pipeline"
    cmd = ["bash", os.path.join(REPO, "slurm", "pipeline.sh"), "--stages", "1,2", "--recipe", f"1={TINY_CLASS}",
           "--recipe", f"2={TINY_TEXT}", "--runs", str(runs), "--",
           *CPU_NODE, f"--chdir={work}", f"--output={work}/%x-%j.out"]
    # EXTRA reaches every stage through the environment (sbatch --export=ALL), shell-quoted words.
    env = dict(os.environ, EXTRA=" ".join(OVERRIDES))
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = [dict(kv.split("=", 1) for kv in line.split()) for line in p.stdout.splitlines()]
    assert [ln["stage"] for ln in lines] == ["1", "2"], p.stdout
    s1, s2 = lines
    j1, j2 = int(s1["job"]), int(s2["job"])
    pending2 = job_info(j2)  # while stage 1 still runs
    done1 = wait_job(j1, 300, os.path.join(work, f"pixart-tiny_class-{j1}.out"))
    log2 = os.path.join(work, f"pixart-tiny_text-{j2}.out")
    done2 = wait_job(j2, 300, log2) if done1["JobState"] == "COMPLETED" else job_info(j2)
    return {"lines": lines, "j1": j1, "j2": j2, "pending2": pending2, "done1": done1, "done2": done2,
            "log2": log2, "run1": s1["run_dir"], "run2": s2["run_dir"], "seconds": time.time() - t0}


@pytest.mark.slurm
def test_pipeline_chains_stage1_into_stage2(work, chain):
    """pipeline.sh: stage 2 waits for stage 1 (afterok) and starts from stage 1's run directory."""
    from pixart_ds.train.metrics import read_metrics

    s1, s2 = chain["lines"]
    runs = work / "pipeline"
    assert s1["run_dir"] == str(runs / "tiny_class") and s1["init_from"] == "-"
    assert s2["run_dir"] == str(runs / "tiny_text") and s2["init_from"] == s1["run_dir"]
    assert chain["pending2"]["Dependency"].startswith(f"afterok:{chain['j1']}"), chain["pending2"]["Dependency"]
    assert chain["pending2"]["JobState"] == "PENDING"
    assert chain["done1"]["JobState"] == "COMPLETED" and chain["done1"]["ExitCode"] == "0:0", chain["done1"]
    log2 = read_log(chain["log2"])
    assert chain["done2"]["JobState"] == "COMPLETED" and chain["done2"]["ExitCode"] == "0:0", log2[-3000:]
    assert f"train.init_from={s1['run_dir']}" in log2  # INIT_FROM reached the trainer's command line
    import yaml

    with open(os.path.join(chain["run2"], "config.yaml")) as f:
        assert yaml.safe_load(f)["train"]["init_from"] == s1["run_dir"]
    _, events = read_metrics(os.path.join(chain["run2"], "metrics.jsonl"))
    start = [e for e in events if e["event"] == "start"][0]
    assert s1["run_dir"] in (start["init"] or ""), start  # stage 2 really started from stage 1's weights
    print(f"\npipeline stage 1 -> stage 2: {chain['seconds']:.0f} s; init: {start['init']}")


@pytest.mark.slurm
def test_stage2_sbatch_trains_checkpoints_and_exits_0(chain):
    """The stage-2 job of the chain is `sbatch [CPU options] slurm/stage2.sbatch`; its state is read from Slurm."""
    from pixart_ds.train.metrics import read_metrics

    info = chain["done2"]
    log = read_log(chain["log2"])
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert info["Restarts"] == "0" and info["NumTasks"] == "2" and info["NumNodes"] == "1"
    assert info["Command"] == os.path.join(REPO, "slurm", "stage2.sbatch")
    steps, events = read_metrics(os.path.join(chain["run2"], "metrics.jsonl"))
    assert sorted(steps) == list(range(1, STEPS + 1))
    start = [e for e in events if e["event"] == "start"][0]
    # common.sh exported the standard names (RANK, LOCAL_WORLD_SIZE, ...) in each task, so dist.py reads those.
    assert start["world_size"] == 2 and start["launcher"] in ("srun", "torchrun")
    ckpts = sorted(os.listdir(os.path.join(chain["run2"], "checkpoints")))
    assert "step_00000060" in ckpts and "step_00000050" in ckpts
    with open(os.path.join(chain["run2"], "checkpoints", "latest")) as f:
        assert f.read().strip() == "step_00000060"
    assert "pixart-ds train: done at step 60" in log and "finished" in log


def _export(run_dir: str, out: str, use_ema: bool) -> dict:
    from safetensors.torch import load_file

    from pixart_ds.train.weights import export_weights

    assert export_weights(run_dir, out, use_ema=use_ema).startswith(f"wrote {out} (")
    return load_file(os.path.join(out, "model.safetensors"))


@pytest.mark.slurm
def test_preempted_job_requeues_resumes_and_matches_uninterrupted(work, chain):
    """SIGUSR1 mid-run (what --signal=USR1@T sends before the time limit): every rank stops at the next step
    boundary and checkpoints, the job requeues itself, the requeued run (SLURM_RESTART_COUNT=1) resumes from that
    checkpoint and ends with the same weights and the same samples in the same order as the uninterrupted job."""
    from pixart_ds.train.metrics import read_metrics

    assert chain["done2"]["JobState"] == "COMPLETED", "the reference (the chain's stage 2) did not complete"
    t0 = time.time()
    run_dir, log = str(work / "preempted"), str(work / "preempted.out")
    # Same recipe and init as the chain's stage 2; the overrides as arguments after the sbatch file this time.
    job = sbatch("stage2.sbatch", *CPU_NODE, f"--chdir={work}", f"--output={log}",
                 variables={"RECIPE": TINY_TEXT, "RUN_DIR": run_dir, "INIT_FROM": chain["run1"]}, args=OVERRIDES)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 240
    while True:  # signal once a few steps are done, so the trainer's handler is installed
        if _steps_done(metrics) >= 2:
            break
        info = job_info(job)
        assert info["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), (info, read_log(log)[-3000:])
        assert time.time() < deadline, read_log(log)[-3000:]
        time.sleep(0.2)
    # Signals the job's steps (all ranks), not the batch shell: what --signal=USR1@T without B: does.
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
    assert "pixart-ds train: done at step 60" in text

    steps, events = read_metrics(metrics)
    stop = [e for e in events if e["event"] == "stop"]
    resume = [e for e in events if e["event"] == "resume"]
    assert len(stop) == 1 and stop[0]["reason"] == "signal SIGUSR1" and 2 <= stop[0]["step"] < STEPS, stop
    assert len(resume) == 1 and resume[0]["step"] == stop[0]["step"], resume
    assert resume[0]["checkpoint"].endswith(f"step_{stop[0]['step']:08d}")

    ref, _ = read_metrics(os.path.join(chain["run2"], "metrics.jsonl"))
    assert sorted(steps) == sorted(ref) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert steps[s]["sample_idx"] == ref[s]["sample_idx"], f"step {s}: sample order differs"
        assert steps[s]["loss"] == ref[s]["loss"], f"step {s}: loss {steps[s]['loss']} vs {ref[s]['loss']}"
    for use_ema in (True, False):
        tag = "ema" if use_ema else "raw"
        a = _export(chain["run2"], str(work / f"reference_{tag}"), use_ema)
        b = _export(run_dir, str(work / f"preempted_{tag}"), use_ema)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()), f"{tag} weight {k} differs"
    print(f"\npreempted at step {stop[0]['step']}: signal -> requeued {t_requeue - t_signal:.0f} s, "
          f"requeued -> COMPLETED {time.time() - t_requeue:.0f} s, total {time.time() - t0:.0f} s")
