"""The training loader (pixart_ds.data.dataset / loader) on real MDS shards, real Streaming, real process groups.

Two-rank runs start this file as a script (`python tests/test_loader.py worker SPEC`) under three launch styles:
torchrun; the deepspeed launcher's environment (LOCAL_SIZE, no LOCAL_WORLD_SIZE); srun's (SLURM_* only). Each rank
runs every scenario below and writes what it saw to JSON; the tests compare ranks, runs and resumes.
Streaming uses machine-wide shared memory: never run these tests in parallel with each other (no xdist).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from data_helpers import flip_bytes, shard_files, write_bucketed_source, write_feature_shards  # noqa: E402

MICRO = 4  # per-rank micro batch in the 2-rank runs (global micro-batch 8)
K = 3  # batches consumed before the mid-epoch state_dict
TEXT_DIM = 32


def make_cfg(sources, *, multi_scale=False, workers=0, on_corrupt="stop", global_batch=8, condition="text",
             caption_dropout=0.1, seed=0, **data):
    from pixart_ds import config

    model = dict(preset="tiny", caption_channels=TEXT_DIM, multi_scale=multi_scale, condition=condition,
                 num_classes=10)
    return config.from_dict(dict(
        model=model,
        data=dict(resolution=64, sources=sources, multi_scale=multi_scale, num_workers=workers,
                  on_corrupt=on_corrupt, caption_dropout=caption_dropout, **data),
        train=dict(global_batch_size=global_batch, micro_batch_size=min(4, global_batch), seed=seed),
    ))


# ----------------------------------------------------------------------------------------------------------------
# The per-rank scenarios (run inside the launched processes)
# ----------------------------------------------------------------------------------------------------------------


def _run_epoch(loader, *, state_after=None, limit=None):
    """Iterate one epoch: [(sample_idx list, per-sample latent sums, latent shape)], state after `state_after`."""
    batches, state = [], None
    for i, b in enumerate(loader):
        batches.append(dict(idx=b["sample_idx"].tolist(), lat=b["latent"].flatten(1).sum(1).tolist(),
                            shape=list(b["latent"].shape[1:]), skipped=b["skipped"].tolist()))
        if state_after is not None and i + 1 == state_after:
            state = loader.state_dict()
        if limit is not None and i + 1 == limit:
            break
    return batches, state


def _scenarios(spec, micro, out):
    from pixart_ds.data.dataset import CorruptSampleError
    from pixart_ds.data.loader import build_loader, epoch_size

    d = spec["data"]
    w = spec["workers"]

    # 1. one source: coverage, mid-epoch state -> new loader -> the next batches.
    cfg = make_cfg([dict(local=d["single"])], workers=w)
    loader = build_loader(cfg, micro)
    out["epoch_size"] = epoch_size(loader).__dict__
    out["epoch"], state = _run_epoch(loader, state_after=K)
    out["state"] = state
    resumed = build_loader(cfg, micro)
    resumed.load_state_dict(state)
    out["resumed"], _ = _run_epoch(resumed)
    out["second_epoch"], _ = _run_epoch(resumed)  # the loader moves on to epoch 1 after the resumed epoch 0

    # 2. two sources mixed 3:1.
    cfg = make_cfg([dict(local=d["mix_a"], proportion=3.0), dict(local=d["mix_b"], proportion=1.0)], workers=w)
    loader = build_loader(cfg, micro)
    out["mix"], _ = _run_epoch(loader)
    out["mix_offsets"] = [int(x) for x in loader.dataset.sample_offset_per_stream]

    # 3. aspect-ratio buckets, one stream each.
    cfg = make_cfg([dict(local=d["buckets"])], multi_scale=True, workers=w)
    loader = build_loader(cfg, micro)
    out["bucket_epoch_size"] = epoch_size(loader).__dict__
    out["buckets"], out["bucket_state"] = _run_epoch(loader, state_after=2)
    out["bucket_streams"] = [s.local for s in loader.dataset.streams]
    resumed = build_loader(cfg, micro)
    resumed.load_state_dict(out["bucket_state"])
    out["bucket_resumed"], _ = _run_epoch(resumed)

    # 4. a shard with flipped bytes: skipped and counted, then a stop naming the shard.
    cfg = make_cfg([dict(local=d["corrupt"])], workers=w, on_corrupt="skip")
    loader = build_loader(cfg, micro)
    out["corrupt_skip"], _ = _run_epoch(loader)
    out["num_skipped"] = loader.num_skipped
    cfg = make_cfg([dict(local=d["corrupt"])], workers=w, on_corrupt="stop")
    loader = build_loader(cfg, micro)
    seen = []
    try:
        for b in loader:
            seen.append(b["sample_idx"].tolist())
        out["corrupt_stop"] = None
    except CorruptSampleError as e:
        out["corrupt_stop"] = str(e)
    out["corrupt_stop_seen"] = seen


def _worker_main(spec_path):
    import torch.distributed as tdist

    with open(spec_path) as f:
        spec = json.load(f)
    from pixart_ds.data.loader import resolve_topology

    out = {"env_before": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}}
    micro = spec["micro"]
    if spec.get("resume_state"):  # single process continuing a 2-rank state
        from pixart_ds.data.loader import build_loader

        ms = spec["resume_data"] == "buckets"
        cfg = make_cfg([dict(local=spec["data"][spec["resume_data"]])], workers=spec["workers"], multi_scale=ms)
        loader = build_loader(cfg, micro)
        loader.load_state_dict(spec["resume_state"])
        out["resumed"], _ = _run_epoch(loader)
        rank = 0
    else:
        # Topology from the launcher's variables; the process group is created without exporting them, so the
        # loader alone must give Streaming its RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE.
        from pixart_ds.train.dist import dist_env

        env = dist_env()
        tdist.init_process_group("gloo", init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                 rank=env.rank, world_size=env.world_size)
        topo = resolve_topology(None)
        out["topology"] = topo.__dict__
        rank = topo.rank
        _scenarios(spec, micro, out)
        out["env_after"] = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
        tdist.barrier()
        tdist.destroy_process_group()
    with open(os.path.join(spec["out"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "worker":
    _worker_main(sys.argv[2])
    sys.exit(0)


# ----------------------------------------------------------------------------------------------------------------
# Launching
# ----------------------------------------------------------------------------------------------------------------


def _clean_env():
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                    "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                                                    "TORCHELASTIC_RUN_ID"))}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _free_port():
    """A free port in [20000, 40000), the range pixart_ds.train.dist.port_from_job_id maps Slurm job ids to."""
    import socket

    for _ in range(200):
        port = random.randrange(20000, 40000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def _launch(style, spec, tmp, timeout=300):
    """Start 2 ranks of the worker under `style`; returns [rank0 result, rank1 result]."""
    out = os.path.join(tmp, f"out_{style}")
    os.makedirs(out, exist_ok=True)
    spec = dict(spec, out=out)
    spec_path = os.path.join(out, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    script = [os.path.abspath(__file__), "worker", spec_path]
    base = _clean_env()
    port = _free_port()
    if style == "torchrun":
        procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                   "--master_addr", "127.0.0.1", "--master_port", str(port), *script],
                                  env=base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    else:
        procs = []
        for r in range(2):
            e = dict(base)
            if style == "deepspeed":  # what `deepspeed --num_gpus 2` exports: LOCAL_SIZE, not LOCAL_WORLD_SIZE
                e.update(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_SIZE="2", CROSS_RANK="0",
                         CROSS_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            elif style == "srun":  # one srun task per rank: SLURM_* only
                e.update(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), SLURM_NTASKS_PER_NODE="2",
                         SLURM_NODEID="0", SLURM_STEP_ID="0", SLURM_JOB_ID=str(port - 20000 + 40000),
                         SLURM_JOB_NODELIST="localhost")
            procs.append(subprocess.Popen([sys.executable, *script], env=e, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"{style} launch timed out:\n" + "\n".join(q.communicate()[0] or "" for q in procs))
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"{style} launch failed ({p.returncode}):\n{log[-6000:]}"
    res = []
    for r in range(2):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            res.append(json.load(f))
    return res


# ----------------------------------------------------------------------------------------------------------------
# Data and runs shared by the tests of this module
# ----------------------------------------------------------------------------------------------------------------

N_SINGLE = 48
N_MIX_A, N_MIX_B = 30, 50
BUCKETS = {(8, 8): 24, (4, 16): 16, (16, 4): 8, (6, 10): 3}  # latent (h, w): samples; the last cannot fill a batch
N_CORRUPT = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader_data")
    d = {k: str(root / k) for k in ("single", "mix_a", "mix_b", "buckets", "corrupt")}
    write_feature_shards(d["single"], N_SINGLE, text_dim=TEXT_DIM, samples_per_shard=10, seed=1)
    write_feature_shards(d["mix_a"], N_MIX_A, text_dim=TEXT_DIM, seed=2, id_prefix="a")
    write_feature_shards(d["mix_b"], N_MIX_B, text_dim=TEXT_DIM, seed=3, id_prefix="b")
    write_bucketed_source(d["buckets"], BUCKETS, text_dim=TEXT_DIM, seed=4)
    write_feature_shards(d["corrupt"], N_CORRUPT, text_dim=TEXT_DIM, samples_per_shard=12, seed=5)
    bad = shard_files(d["corrupt"])[-1]
    flip_bytes(bad)
    with open(os.path.join(d["corrupt"], "index.json")) as f:
        counts = [s["samples"] for s in json.load(f)["shards"]]
    d["bad_shard"] = bad
    d["bad_range"] = (sum(counts[:-1]), sum(counts))
    d["root"] = str(root)
    return d


_RUNS: dict = {}


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Lazily launch each style once per module: runs(style) -> [rank0, rank1]."""
    tmp = str(tmp_path_factory.mktemp("loader_runs"))
    workers = {"torchrun": 2, "deepspeed": 0, "srun": 1}

    def get(style):
        key = (data["root"], style)
        if key not in _RUNS:
            spec = dict(data={k: v for k, v in data.items() if k in ("single", "mix_a", "mix_b", "buckets",
                                                                         "corrupt")},
                        micro=MICRO, workers=workers[style])
            _RUNS[key] = _launch(style, spec, tmp)
        return _RUNS[key]

    return get


def _resume_one_rank(data, tmp, state, which, micro):
    out = os.path.join(tmp, f"one_{which}_{micro}")
    os.makedirs(out, exist_ok=True)
    spec = dict(data={which: data[which]}, micro=micro, workers=0, resume_state=state, resume_data=which, out=out)
    path = os.path.join(out, "spec.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "worker", path], env=_clean_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(os.path.join(out, "rank0.json")) as f:
        return json.load(f)["resumed"]


def _global_order(ranks, key):
    """The global sample sequence of a 2-rank run: Streaming deals global position p to rank p % 2, so step k of
    the global order is rank 0's and rank 1's batch interleaved. Returns [(idx, latent sum)]."""
    seq = []
    for b0, b1 in zip(ranks[0][key], ranks[1][key]):
        for a, b in zip(zip(b0["idx"], b0["lat"]), zip(b1["idx"], b1["lat"])):
            seq += [a, b]
    return seq


# ----------------------------------------------------------------------------------------------------------------
# Two ranks, three launch styles
# ----------------------------------------------------------------------------------------------------------------

STYLES = ["torchrun", "deepspeed", "srun"]


@pytest.mark.parametrize("style", STYLES)
def test_topology_from_launcher(runs, style):
    r0, r1 = runs(style)
    for r, res in enumerate((r0, r1)):
        assert res["topology"] == dict(rank=r, world_size=2, local_rank=r, local_world_size=2)
        assert res["env_after"] == dict(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2")
        if style != "torchrun":  # the loader had to derive LOCAL_WORLD_SIZE (deepspeed: LOCAL_SIZE; srun: SLURM_*)
            assert res["env_before"]["LOCAL_WORLD_SIZE"] is None
        if style == "srun":
            assert res["env_before"]["RANK"] is None


@pytest.mark.parametrize("style", STYLES)
def test_ranks_disjoint_and_cover_epoch(runs, style):
    r0, r1 = runs(style)
    ids = [[i for b in r["epoch"] for i in b["idx"]] for r in (r0, r1)]
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == list(range(N_SINGLE))
    assert len(r0["epoch"]) == len(r1["epoch"]) == N_SINGLE // (2 * MICRO)
    assert all(len(b["idx"]) == MICRO for r in (r0, r1) for b in r["epoch"])
    assert r0["epoch_size"] == dict(samples=N_SINGLE, batches_per_rank=N_SINGLE // (2 * MICRO), drawn=N_SINGLE)
    # The next epoch is another order of the same samples.
    ids2 = [i for r in (r0, r1) for b in r["second_epoch"] for i in b["idx"]]
    assert sorted(ids2) == list(range(N_SINGLE))
    assert ids2 != ids[0] + ids[1]


@pytest.mark.parametrize("style", STYLES)
def test_mid_epoch_state_resumes_with_next_batches(runs, style):
    for r in runs(style):
        assert r["state"]["sample_in_epoch"] == K * MICRO * 2
        assert r["state"]["num_canonical_nodes"] == 1
        assert r["resumed"] == r["epoch"][K:]  # same samples, same order, same latent noise
        assert r["bucket_resumed"] == r["buckets"][2:]


@pytest.mark.parametrize("style", STYLES)
def test_two_sources_mixed_three_to_one(runs, style):
    r0, r1 = runs(style)
    off = r0["mix_offsets"]
    ids = [i for r in (r0, r1) for b in r["mix"] for i in b["idx"]]
    n_a = sum(1 for i in ids if off[0] <= i < off[1])
    n_b = sum(1 for i in ids if i >= off[1])
    assert n_a + n_b == N_MIX_A + N_MIX_B
    assert abs(n_a / n_b - 3.0) <= 0.02 * 3.0, (n_a, n_b)
    # A (30 samples) is up-sampled to 60 draws, every sample at least once; B (50) down-sampled to 20.
    assert set(range(N_MIX_A)) <= set(ids)


@pytest.mark.parametrize("style", STYLES)
def test_buckets_never_mix_shapes(runs, style):
    r0, r1 = runs(style)
    assert len(r0["buckets"]) == len(r1["buckets"]) == (24 + 16 + 8) // (2 * MICRO)
    for b0, b1 in zip(r0["buckets"], r1["buckets"]):
        assert b0["shape"] == b1["shape"]  # one bucket per global micro-batch, across ranks too
        assert b0["shape"][0] == 4 and tuple(b0["shape"][1:]) in BUCKETS
    shapes = [tuple(b["shape"][1:]) for b in r0["buckets"]]
    assert {s: shapes.count(s) for s in set(shapes)} == {(8, 8): 3, (4, 16): 2, (16, 4): 1}
    ids = [i for r in (r0, r1) for b in r["buckets"] for i in b["idx"]]
    assert sorted(ids) == list(range(24 + 16 + 8))
    assert not any(s.endswith("h48_w80") for s in r0["bucket_streams"])  # 3 samples cannot fill a batch of 8
    assert r0["bucket_epoch_size"]["samples"] == 48


@pytest.mark.parametrize("style", STYLES)
def test_corrupt_shard_skipped_and_counted(runs, data, style):
    lo, hi = data["bad_range"]
    res = runs(style)
    assert sum(r["num_skipped"] for r in res) == hi - lo  # every sample of the bad shard, once
    for r in res:
        assert r["num_skipped"] == sum(f for b in r["corrupt_skip"] for f in b["skipped"])
        assert all(len(b["idx"]) == MICRO for b in r["corrupt_skip"])
        assert not any(lo <= i < hi for b in r["corrupt_skip"] for i in b["idx"])


@pytest.mark.parametrize("style", STYLES)
def test_corrupt_shard_stops_with_its_name(runs, data, style):
    lo, hi = data["bad_range"]
    res = runs(style)
    errors = [r["corrupt_stop"] for r in res if r["corrupt_stop"]]
    assert errors, "a shard with flipped bytes was read without error"
    for e in errors:
        assert os.path.basename(data["bad_shard"]) in e and "checksum" in e and "\n" not in e, e
    for r in res:
        assert not any(lo <= i < hi for b in r["corrupt_stop_seen"] for i in b)


def test_same_noise_whatever_the_launch(runs):
    """eps is a function of (seed, epoch, sample): 0, 1 and 2 workers per rank give identical latents."""
    per_style = []
    for style in STYLES:
        lat = {}
        for r in runs(style):
            for b in r["epoch"]:
                lat.update(zip(b["idx"], b["lat"]))
        per_style.append(lat)
    assert per_style[0] == per_style[1] == per_style[2]


@pytest.mark.parametrize("micro", [MICRO, 2 * MICRO])
def test_two_rank_state_resumes_on_one_rank(runs, data, tmp_path, micro):
    res = runs("torchrun")
    order = _global_order(res, "epoch")
    got = _resume_one_rank(data, str(tmp_path), res[0]["state"], "single", micro)
    seq = [(i, v) for b in got for i, v in zip(b["idx"], b["lat"])]
    assert seq == [tuple(x) for x in order[K * MICRO * 2:]]


def test_two_rank_bucket_state_resumes_on_one_rank(runs, data, tmp_path):
    """per_stream batches are global micro-batches: keep micro x world fixed (here 4 x 2 -> 8 x 1)."""
    res = runs("torchrun")
    order = _global_order(res, "buckets")
    got = _resume_one_rank(data, str(tmp_path), res[0]["bucket_state"], "buckets", 2 * MICRO)
    seq = [(i, v) for b in got for i, v in zip(b["idx"], b["lat"])]
    assert seq == [tuple(x) for x in order[2 * MICRO * 2:]]
    assert all(len({tuple(s) for s in [b["shape"]]}) == 1 for b in got)
