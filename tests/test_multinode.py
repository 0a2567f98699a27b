"""Multi-node Slurm runs on the local cluster's simulated hosts (slurm/local-cluster.sh: pixnode1 and pixnode2 in
partition `multi`, each with its own hostname, address, /tmp, /dev/shm and slurmd; this machine's own node `debug`).

The sbatch files are submitted unmodified; sbatch's own options turn the GPU defaults into CPU tasks, and the tiny
text recipe trains with DeepSpeed ZeRO-2 over gloo, across the hosts' bridge. Everything the jobs share (shards, run
directories, tiny encoders) lives on the shared root filesystem under PIXART_DS_SHARED_TMP (default
/var/tmp/pixart-ds-tests), never under pytest's tmp_path: /tmp is node-local on the simulated hosts, as on a real
cluster. Job state is read from Slurm itself (`scontrol show job`).
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time

import numpy as np
import pytest
from slurm_helpers import TERMINAL, job_info, read_log, sbatch, steps_done, wait_job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_CLUSTER = os.path.join(REPO, "slurm", "local-cluster.sh")
COMMON = os.path.join(REPO, "slurm", "common.sh")
TINY_TEXT = os.path.join(REPO, "tests", "recipes", "tiny_text.yaml")
SHARED_ROOT = os.environ.get("PIXART_DS_SHARED_TMP", "/var/tmp/pixart-ds-tests")
HOSTS = ("pixnode1", "pixnode2")

# CPU tasks instead of the files' 8 GPUs per node; --nodes / --ntasks-per-node per test.
CPU = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=20"]
MULTI = ["--partition=multi", *CPU]
ONE_NODE = ["--partition=debug", "--nodes=1", "--ntasks-per-node=2", *CPU]
STEPS = 20
GLOBAL_BATCH = 4
OVERRIDES = [f"train.total_steps={STEPS}", f"train.global_batch_size={GLOBAL_BATCH}", "checkpoint.every_steps=5",
             "checkpoint.keep_last=2", "log.sample_ids=true", "log.progress_bar=false"]


def _sources(local: str | None = None, remote: str | None = None) -> str:
    """A `data.sources=[...]` override (a list: one `key=value` word, passed after the sbatch file)."""
    src = {k: v for k, v in (("local", local), ("remote", remote)) if v}
    return "data.sources=[{" + ", ".join(f"{k}: {v}" for k, v in src.items()) + "}]"


def _tail(text: str, n: int = 4000) -> str:
    """The end of a job log without torch's and DeepSpeed's warning lines (for assertion messages)."""
    keep = [ln for ln in text.splitlines()
            if not any(w in ln for w in ("Warning", "[WARNING]", "return func", "client socket cannot"))]
    return "\n".join(keep)[-n:]


def _read_metrics(run_dir: str) -> tuple[dict, list]:
    from pixart_ds.train.metrics import read_metrics

    return read_metrics(os.path.join(run_dir, "metrics.jsonl"))


def _host_exec(host: str, *cmd: str) -> str:
    """Run a command on a simulated host (its namespaces: its /tmp, its /dev/shm)."""
    p = subprocess.run(["bash", LOCAL_CLUSTER, "exec", host, "--", *cmd], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _job_pids(job: int, host: str) -> list[int]:
    """Every process of `job` on a simulated host: those in the host's network namespace whose environment names the
    job (the ranks, their data workers, the task wrappers; not the host's slurmd or slurmstepd)."""
    ns = os.stat(f"/run/netns/{host}").st_ino
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino != ns:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"SLURM_JOB_ID={job}".encode() in env:
            out.append(int(pid))
    return out


def _wait_steps(job: int, run_dir: str, at_least: int, log: str, timeout: float = 240) -> int:
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while (n := steps_done(metrics)) < at_least:
        info = job_info(job)
        assert info["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), (info["JobState"], _tail(read_log(log)))
        assert time.time() < deadline, _tail(read_log(log))
        time.sleep(0.2)
    return n


def _export(run_dir: str, out: str, use_ema: bool) -> dict:
    from safetensors.torch import load_file

    from pixart_ds.train.weights import export_weights

    assert export_weights(run_dir, out, use_ema=use_ema).startswith(f"wrote {out} ")
    return load_file(os.path.join(out, "model.safetensors"))


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: the cluster's hosts, a shared directory, the two runs compared by several tests
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hosts():
    """The simulated hosts, started (or left running) by `local-cluster.sh up`."""
    if os.geteuid() != 0:
        pytest.fail("the multi-host cluster needs root: run `make slurm-up` (slurm/local-cluster.sh up) as root")
    p = subprocess.run(["bash", LOCAL_CLUSTER, "up"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    p = subprocess.run(["sinfo", "-h", "-N", "-p", "multi", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
    states = dict(line.split() for line in p.stdout.splitlines())
    assert set(HOSTS) <= set(states) and all(states[h] in ("idle", "mix", "alloc") for h in HOSTS), p.stdout
    return HOSTS


@pytest.fixture(scope="module")
def shared(hosts):
    """A fresh directory on the filesystem every host shares, with the tiny recipe's shards (64 samples)."""
    from pixart_ds.testing import write_text_shards

    os.makedirs(SHARED_ROOT, exist_ok=True)
    base = tempfile.mkdtemp(prefix="multinode-", dir=SHARED_ROOT)
    write_text_shards(os.path.join(base, "shards"), n=64)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def runs(shared):
    """Two runs of the same recipe and global batch, submitted together (they use different partitions): the
    reference on this machine's node (1 node x 2 ranks, micro-batch 2, shards read in place) and the run on both
    hosts (2 nodes x 2 ranks, micro-batch 1, shards streamed from `remote` into each host's own cache)."""
    t0 = time.time()
    out = {}
    common = {"RECIPE": TINY_TEXT}
    out["ref"] = dict(run_dir=os.path.join(shared, "ref"), log=os.path.join(shared, "ref.out"))
    out["ref"]["job"] = sbatch("stage2.sbatch", *ONE_NODE, f"--output={out['ref']['log']}",
                               variables={**common, "RUN_DIR": out["ref"]["run_dir"]},
                               args=[*OVERRIDES, "train.micro_batch_size=2",
                                     _sources(local=os.path.join(shared, "shards"))])
    remote = os.path.join(shared, "shards")
    out["mn"] = dict(run_dir=os.path.join(shared, "two_hosts"), log=os.path.join(shared, "two_hosts.out"),
                     remote=remote)
    # NET_IFNAME: the hosts' interface for gloo/NCCL sockets (slurm/common.sh), as a cluster's launcher would set.
    out["mn"]["job"] = sbatch("stage2.sbatch", *MULTI, "--nodes=2", "--ntasks-per-node=2",
                              f"--output={out['mn']['log']}",
                              variables={**common, "RUN_DIR": out["mn"]["run_dir"], "NET_IFNAME": "eth0"},
                              args=[*OVERRIDES, "train.micro_batch_size=1", _sources(remote=remote)])
    for r in out.values():
        r["info"] = wait_job(r["job"], 400, r["log"])
    out["seconds"] = time.time() - t0
    return out


# ----------------------------------------------------------------------------------------------------------------
# Training across hosts
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slurm
def test_stage2_on_two_hosts_zero2_same_samples_as_one_node(runs):
    """`sbatch --nodes=2 --ntasks-per-node=2 slurm/stage2.sbatch`: 4 ranks on two hosts train with ZeRO-2 (one
    optimizer partition per rank), rendezvous at the first host, and see exactly the samples of a 1-node run of the
    same global batch, step by step, in the same order. The shards come from `remote` and each host caches them in
    its own /tmp (Streaming's local cache is per node; each node's ranks elect their own local leader in their own
    /dev/shm -- with one /dev/shm for both hosts the two leaders would collide)."""
    ref, mn = runs["ref"], runs["mn"]
    log = read_log(mn["log"])
    assert ref["info"]["JobState"] == "COMPLETED", _tail(read_log(ref["log"]))
    assert mn["info"]["JobState"] == "COMPLETED" and mn["info"]["ExitCode"] == "0:0", _tail(log)
    assert mn["info"]["NumNodes"] == "2" and mn["info"]["NodeList"] == "pixnode[1-2]", mn["info"]
    assert "nodes pixnode[1-2]; 4 tasks" in log and f"pixart-ds train: done at step {STEPS}" in log
    assert "NCCL_SOCKET_IFNAME=eth0 GLOO_SOCKET_IFNAME=eth0" in log  # common.sh's network settings, logged

    steps, events = _read_metrics(mn["run_dir"])
    ref_steps, ref_events = _read_metrics(ref["run_dir"])
    start = next(e for e in events if e["event"] == "start")
    assert start["world_size"] == 4 and start["micro_batch"] == 1 and start["grad_accum"] == 1, start
    assert next(e for e in ref_events if e["event"] == "start")["world_size"] == 2
    # ZeRO-2 across the hosts: the optimizer state is split into one partition per rank.
    final = os.path.join(mn["run_dir"], "checkpoints", f"step_{STEPS:08d}")
    parts = sorted(glob.glob(os.path.join(final, "*zero_pp_rank_*_optim_states.pt")))
    assert [re.search(r"zero_pp_rank_(\d+)_", p).group(1) for p in parts] == ["0", "1", "2", "3"], parts

    assert sorted(steps) == sorted(ref_steps) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert len(steps[s]["sample_idx"]) == GLOBAL_BATCH
        assert steps[s]["sample_idx"] == ref_steps[s]["sample_idx"], f"step {s}: sample order differs"

    # The per-node cache: Streaming's default local directory for a remote source, in each host's own /tmp.
    cache = "/tmp/" + hashlib.blake2s(mn["remote"].encode(), digest_size=16).hexdigest()
    for host in HOSTS:
        files = _host_exec(host, "ls", "-1", cache).split()
        assert "index.json" in files and any(f.startswith("shard.") for f in files), (host, files)
    assert not os.path.exists(cache), "the shards were cached on this machine's /tmp, not the hosts' own"
    print(f"\nreference (1 node) and two-host runs, submitted together: {runs['seconds']:.0f} s")


@pytest.mark.slurm
def test_preempted_on_two_hosts_requeued_onto_one_node_continues_exactly(runs, shared):
    """USR1 to a job running one rank on each host: every rank checkpoints and the job requeues itself; while it
    waits, its allocation is changed to ONE node (`scontrol update NumNodes=1`), so the requeued run resumes the
    two-host checkpoint on a different node count. Samples, order and losses equal the uninterrupted 1-node
    reference at every step (none lost, none repeated), and so do the final weights."""
    ref = runs["ref"]
    assert ref["info"]["JobState"] == "COMPLETED"
    t0 = time.time()
    run_dir, log = os.path.join(shared, "preempted"), os.path.join(shared, "preempted.out")
    # --ntasks=2 with --ntasks-per-node=2 as the per-node maximum: one rank per host now, two on one node later.
    job = sbatch("stage2.sbatch", *MULTI, "--nodes=2", "--ntasks=2", "--ntasks-per-node=2", f"--output={log}",
                 variables={"RECIPE": TINY_TEXT, "RUN_DIR": run_dir},
                 args=[*OVERRIDES, "train.micro_batch_size=2", _sources(local=os.path.join(shared, "shards"))])
    _wait_steps(job, run_dir, 2, log)
    subprocess.run(["scancel", "--signal=USR1", str(job)], check=True, timeout=30)
    requeued = wait_job(job, 120, log, states={"PENDING", "REQUEUED"} | TERMINAL)
    assert requeued["JobState"] in ("PENDING", "REQUEUED") and requeued["Restarts"] == "1", (
        requeued, _tail(read_log(log)))
    subprocess.run(["scontrol", "update", f"JobId={job}", "NumNodes=1", "NumTasks=2"], check=True, timeout=30)
    info = wait_job(job, 300, log)
    text = read_log(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _tail(text)
    assert info["NumNodes"] == "1" and info["Restarts"] == "1", info
    assert "restart 0; nodes pixnode[1-2]; 2 tasks" in text and "requeueing" in text, _tail(text)
    assert re.search(r"restart 1; nodes pixnode[12]; 2 tasks", text), _tail(text)

    steps, events = _read_metrics(run_dir)
    stop = [e for e in events if e["event"] == "stop"]
    resume = [e for e in events if e["event"] == "resume"]
    assert len(stop) == 1 and stop[0]["reason"] == "signal SIGUSR1" and 2 <= stop[0]["step"] < STEPS, stop
    assert len(resume) == 1 and resume[0]["step"] == stop[0]["step"] and resume[0]["saved_world_size"] == 2, resume
    ref_steps, _ = _read_metrics(ref["run_dir"])
    assert sorted(steps) == sorted(ref_steps) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert steps[s]["sample_idx"] == ref_steps[s]["sample_idx"], f"step {s}: sample order differs"
        assert steps[s]["loss"] == ref_steps[s]["loss"], f"step {s}: loss {steps[s]['loss']} vs {ref_steps[s]['loss']}"
    for use_ema in (True, False):
        tag = "ema" if use_ema else "raw"
        a = _export(ref["run_dir"], os.path.join(shared, f"ref_{tag}"), use_ema)
        b = _export(run_dir, os.path.join(shared, f"preempted_{tag}"), use_ema)
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a), f"{tag} weights differ"
    print(f"\npreempted at step {stop[0]['step']} on two hosts, resumed on one node: {time.time() - t0:.0f} s")


@pytest.mark.slurm
def test_host_killed_survivors_name_host_and_ranks(shared, hosts):
    """SIGKILL of every process of the job on pixnode2 (what a node failure leaves behind): the ranks on pixnode1
    stop at once, each saying which host and which ranks are gone, and exit with the lost-rank code; the latest
    checkpoint stays complete and loadable (every rank's ZeRO partition, the model states, the EMA)."""
    import torch

    from pixart_ds.train import checkpoint as ckpt
    from pixart_ds.train.resilience import LOST_RANK_EXIT_CODE

    t0 = time.time()
    run_dir, log = os.path.join(shared, "killed"), os.path.join(shared, "killed.out")
    overrides = [o for o in OVERRIDES if not o.startswith("train.total_steps")] + ["train.total_steps=100000"]
    job = sbatch("stage2.sbatch", *MULTI, "--nodes=2", "--ntasks-per-node=2", f"--output={log}",
                 variables={"RECIPE": TINY_TEXT, "RUN_DIR": run_dir},
                 args=[*overrides, "train.micro_batch_size=1", _sources(local=os.path.join(shared, "shards"))])
    _wait_steps(job, run_dir, 7, log)  # past the first checkpoint (step 5)
    victims = _job_pids(job, "pixnode2")
    assert len(victims) >= 2, victims  # at least the two ranks
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    info = wait_job(job, 180, log)
    text = read_log(log)
    assert info["JobState"] == "FAILED", _tail(text)
    # srun's own account: the survivors (tasks 0 and 1 on pixnode1) exited with the lost-rank code; it groups tasks
    # that end together ("tasks 0-1") and lists the others one by one.
    codes = {}
    for tasks, code in re.findall(r"srun: error: pixnode1: tasks? ([\d,-]+): Exited with exit code (\d+)", text):
        for part in tasks.split(","):
            lo, _, hi = part.partition("-")
            codes.update({t: int(code) for t in range(int(lo), int(hi or lo) + 1)})
    assert codes == {0: LOST_RANK_EXIT_CODE, 1: LOST_RANK_EXIT_CODE}, _tail(text)
    for rank in (0, 1):
        # (A survivor may also find the other survivor gone: it exits as soon as it has said so.)
        m = re.search(rf"pixart-ds train: error: rank {rank} lost contact with the other ranks after step (\d+) "
                      rf"\(.*\): [^\n]*ranks 2-3 on host pixnode2 have exited; [^\n]*latest checkpoint: (step_\d+); ",
                      text)
        assert m, _tail(text)
    _, events = _read_metrics(run_dir)
    lost = [e for e in events if e["event"] == "rank_lost"]
    assert len(lost) == 1 and {2, 3} <= set(lost[0]["lost_ranks"]), lost
    assert "ranks 2-3 on host pixnode2 have exited" in lost[0]["message"], lost

    root = ckpt.ckpt_root(run_dir)
    tag = ckpt.read_latest(root)
    assert tag == m.group(2) and ckpt.read_meta(os.path.join(root, tag))["world_size"] == 4
    weights = _export(run_dir, os.path.join(shared, "killed_ema"), use_ema=True)
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    parts = sorted(glob.glob(os.path.join(root, tag, "*zero_pp_rank_*_optim_states.pt")))
    assert len(parts) == 4
    for p in parts:
        assert "optimizer_state_dict" in torch.load(p, map_location="cpu", weights_only=False), p
    print(f"\nhost killed after step {m.group(1)}: {time.time() - t0:.0f} s; victims {len(victims)} processes")


@pytest.mark.slurm
def test_run_dir_on_node_local_tmp_is_refused(shared, hosts):
    """A run directory that is not on the shared filesystem (here /tmp, node-local on each host): every rank stops
    before training with one line naming the hosts and ranks that cannot see rank 0's files, exit code 2."""
    run_dir, log = f"/tmp/pixart-ds-nodelocal-{os.getpid()}", os.path.join(shared, "nodelocal.out")
    job = sbatch("stage2.sbatch", *MULTI, "--nodes=2", "--ntasks-per-node=1", f"--output={log}",
                 variables={"RECIPE": TINY_TEXT, "RUN_DIR": run_dir},
                 args=[*OVERRIDES, "train.micro_batch_size=2", _sources(local=os.path.join(shared, "shards"))])
    info = wait_job(job, 180, log)
    text = read_log(log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", _tail(text)
    assert re.search(rf"pixart-ds train: error: run_dir: {run_dir} is not on a filesystem shared by every node: "
                     rf"rank 0 \(host pixnode1\) wrote {run_dir}/\.shared-check-\w+ and rank 1 on host pixnode2 "
                     rf"cannot see it", text), _tail(text)
    assert not os.path.exists(run_dir)  # nothing appeared on this machine's /tmp either


# ----------------------------------------------------------------------------------------------------------------
# Data jobs across hosts
# ----------------------------------------------------------------------------------------------------------------


def _write_raw(out: str, n: int) -> list[str]:
    """A raw MDS (RAW_COLUMNS) of n small PNGs with captions, several shards."""
    from PIL import Image
    from streaming import MDSWriter

    from pixart_ds.data.schema import RAW_COLUMNS

    ids = []
    with MDSWriter(out=out, columns=RAW_COLUMNS, size_limit=1 << 12) as w:
        for i in range(n):
            arr = np.random.RandomState(i).randint(0, 256, (20 + i, 24 + 2 * i, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            ids.append(f"img_{i:04d}")
            w.write({"id": ids[-1], "image": buf.getvalue(), "caption": f"a picture number {i}", "label": -1,
                     "width": arr.shape[1], "height": arr.shape[0], "source": "synthetic"})
    return ids


@pytest.mark.slurm
def test_features_and_caption_jobs_across_two_hosts(shared, hosts):
    """slurm/features.sbatch and slurm/caption.sbatch with one rank on each host: each rank writes its own slice,
    the merged index (features) and the merged captions.jsonl hold every raw sample exactly once, in raw order, and
    the features equal a single-process extraction."""
    from pixart_ds.data import features
    from pixart_ds.data.convert import read_summary
    from pixart_ds.data.schema import iter_samples
    from pixart_ds.model.encoders import make_tiny_t5
    from pixart_ds.testing import make_tiny_llava, make_tiny_vae

    t0 = time.time()
    raw = os.path.join(shared, "raw")
    ids = _write_raw(raw, 12)
    vae, t5 = make_tiny_vae(os.path.join(shared, "vae")), make_tiny_t5(os.path.join(shared, "t5"))
    llava = make_tiny_llava(os.path.join(shared, "llava"))
    feat, cap = os.path.join(shared, "feat"), os.path.join(shared, "cap")
    logs = {k: os.path.join(shared, f"{k}.out") for k in ("feat", "cap")}
    jobs = {
        "feat": sbatch("features.sbatch", *MULTI, "--nodes=2", "--ntasks-per-node=1", f"--output={logs['feat']}",
                       variables={"IN": raw, "OUT": feat, "VAE": vae, "TEXT_ENCODER": t5},
                       args=["--resolution", "64", "--batch-size", "2"]),
        "cap": sbatch("caption.sbatch", *MULTI, "--nodes=2", "--ntasks-per-node=1", f"--output={logs['cap']}",
                      variables={"IN": raw, "OUT": cap, "MODEL": llava}, args=["--batch-size", "2",
                                                                              "--max-new-tokens", "8"]),
    }
    for k, job in jobs.items():
        info = wait_job(job, 300, logs[k])
        assert info["JobState"] == "COMPLETED" and info["NodeList"] == "pixnode[1-2]", _tail(read_log(logs[k]))
        assert "nodes pixnode[1-2]; 2 tasks" in read_log(logs[k])

    s = read_summary(feat)
    assert s["world_size"] == 2 and s["written"] == len(ids), s
    parts = sorted(d for d in os.listdir(feat) if d.startswith("part-"))
    assert parts == ["part-00000-of-00002", "part-00001-of-00002"]
    per_rank = [[x["id"] for x in iter_samples(os.path.join(feat, p))] for p in parts]
    assert per_rank[0] and per_rank[1] and per_rank[0] + per_rank[1] == ids  # each host its own slice
    merged = {x["id"]: x for x in iter_samples(feat)}
    assert list(merged) == ids
    one = os.path.join(shared, "feat_one")
    features.extract_features(raw, one, vae, t5, resolution=64, batch_size=2, progress=False)
    for x in iter_samples(one):
        np.testing.assert_allclose(merged[x["id"]]["vae_mean"].astype(np.float32),
                                   x["vae_mean"].astype(np.float32), atol=2e-3)
        np.testing.assert_allclose(merged[x["id"]]["t5"].astype(np.float32), x["t5"].astype(np.float32), atol=2e-3)

    with open(os.path.join(cap, "captions.jsonl")) as f:
        caps = [json.loads(line) for line in f]
    assert [c["id"] for c in caps] == ids and all(c["caption"] for c in caps)
    assert sorted(os.listdir(os.path.join(cap, "done"))) == ["000000000000-000000000006.json",
                                                               "000000000006-000000000012.json"]
    print(f"\nfeatures + caption across two hosts: {time.time() - t0:.0f} s")


@pytest.mark.slurm
def test_scaling_comm_measures_the_network_between_the_two_hosts(shared, hosts):
    """`benchmarks/scaling.py comm` as benchmarks/README.md runs it: one rank per host under srun, the link between
    them and gloo's collectives timed (a short run: one repeat, small link rounds)."""
    out = os.path.join(shared, "comm.json")
    p = subprocess.run(["srun", "--partition=multi", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                        "--time=10", "bash", COMMON, "task", "--", "python3", os.path.join(REPO, "benchmarks",
                                                                                          "scaling.py"),
                        "comm", "--out", out, "--repeats", "1", "--link-mib", "8", "--local-mib", "8"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, _tail(p.stdout + p.stderr)
    with open(out) as f:
        rec = json.load(f)
    assert rec["hosts"] == list(HOSTS) and rec["world_size"] == 2 and rec["backend"] == "gloo"
    assert rec["link"]["bandwidth_both_ways"] > 0 and rec["link"]["latency_s"] > 0
    assert {(c["op"], c["dtype"]) for c in rec["collectives"]} == {
        ("all_reduce", "float32"), ("all_reduce", "bfloat16"), ("all_gather", "bfloat16"),
        ("reduce_scatter", "bfloat16")}
    assert all(c.get("median_s", 0) > 0 for c in rec["collectives"]), rec["collectives"]


# ----------------------------------------------------------------------------------------------------------------
# common.sh: what a real cluster's network needs (no cluster needed)
# ----------------------------------------------------------------------------------------------------------------


def test_common_sh_network_defaults_and_interface():
    """NCCL/gloo settings: the collective timeout raises instead of hanging, InfiniBand retries are long, and
    NET_IFNAME picks the socket interface of both NCCL and gloo; a value the user set is kept."""
    show = ("pixart_env; for v in TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_IB_TIMEOUT NCCL_IB_RETRY_CNT "
            "NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_DISABLE; do echo \"$v=${!v-unset}\"; done")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "GLOO_", "TORCH_NCCL_", "NET_"))}

    def run(**extra):
        p = subprocess.run(["bash", "-c", f"source {COMMON}; {show}"], env={**base, **extra}, capture_output=True,
                           text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        return dict(line.split("=", 1) for line in p.stdout.split())

    got = run()
    assert got["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and got["NCCL_IB_TIMEOUT"] == "22"
    assert got["NCCL_IB_RETRY_CNT"] == "7"
    # No interface named: NCCL's own choice (every interface but lo and docker*), gloo's: the hostname's address.
    assert got["NCCL_SOCKET_IFNAME"] == got["GLOO_SOCKET_IFNAME"] == got["NCCL_IB_HCA"] == "unset"
    got = run(NET_IFNAME="ib0", NCCL_IB_HCA="mlx5_0,mlx5_1", NCCL_IB_TIMEOUT="20")
    assert got["NCCL_SOCKET_IFNAME"] == got["GLOO_SOCKET_IFNAME"] == "ib0"
    assert got["NCCL_IB_HCA"] == "mlx5_0,mlx5_1" and got["NCCL_IB_TIMEOUT"] == "20"
    assert run(NET_IFNAME="eth0", GLOO_SOCKET_IFNAME="eth1")["GLOO_SOCKET_IFNAME"] == "eth1"
