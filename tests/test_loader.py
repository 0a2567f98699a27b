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

from pixart_ds.testing import flip_bytes, shard_files, write_bucketed_source, write_feature_shards

MICRO = 4  # per-rank micro batch in the 2-rank runs (global micro-batch 8)
K = 3  # batches consumed before the mid-epoch state_dict
TEXT_DIM = 32


def make_cfg(sources, *, multi_scale=False, workers=0, on_corrupt="stop", global_batch=8, condition="text",
             caption_dropout=0.1, seed=0, num_classes=10, **data):
    from pixart_ds import config

    model = dict(preset="tiny", caption_channels=TEXT_DIM, multi_scale=multi_scale, condition=condition,
                 num_classes=num_classes)
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
    # The table is node-wide and filled by whichever process touches a shard first: read it once every rank
    # has finished its epoch, or a shard only the other rank reads may still be unchecked.
    import torch.distributed as tdist
    if tdist.is_initialized():
        tdist.barrier()
    out["shard_checks"] = loader.dataset._shard_checks[:].tolist()
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

    out = {"data_single": spec["data"]["single"], "env_before": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}}
    micro = spec["micro"]
    if spec.get("resumes"):  # one process continuing 2-rank states: [(data key, micro batch, state)]
        from pixart_ds.data.loader import build_loader

        out["resumed"] = []
        for which, micro, state in spec["resumes"]:
            cfg = make_cfg([dict(local=spec["data"][which])], workers=spec["workers"],
                           multi_scale=which == "buckets")
            loader = build_loader(cfg, micro)
            loader.load_state_dict(state)
            out["resumed"].append(_run_epoch(loader)[0])
        rank = 0
    else:
        # Topology from the launcher's variables; the process group is created without exporting them, so the
        # loader alone must give Streaming its RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE.
        from pixart_ds.dist import dist_env

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
    """A free port in [20000, 40000), the range pixart_ds.dist.port_from_job_id maps Slurm job ids to."""
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


_ONE_RANK: dict = {}


def _resume_one_rank(runs, data, tmp):
    """One single-process run resuming the torchrun run's states: [single @ micro 4, single @ micro 8,
    buckets @ micro 8] -> the batches each resumed loader yields."""
    key = data["root"]
    if key not in _ONE_RANK:
        res = runs("torchrun")
        out = os.path.join(tmp, "one_rank")
        os.makedirs(out, exist_ok=True)
        resumes = [("single", MICRO, res[0]["state"]), ("single", 2 * MICRO, res[0]["state"]),
                   ("buckets", 2 * MICRO, res[0]["bucket_state"])]
        spec = dict(data=data, micro=MICRO, workers=0, resumes=resumes, out=out)
        path = os.path.join(out, "spec.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "worker", path], env=_clean_env(),
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        with open(os.path.join(out, "rank0.json")) as f:
            _ONE_RANK[key] = json.load(f)["resumed"]
    return _ONE_RANK[key]


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
    # Every shard was hash-checked once for the node, and both ranks see the verdicts (2 = ok).
    from pixart_ds.data.dataset import _CHECK_OK

    assert r0["shard_checks"] == r1["shard_checks"] == [_CHECK_OK] * len(shard_files(r0["data_single"]))
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


@pytest.mark.parametrize("which", [0, 1], ids=["same_micro", "double_micro"])
def test_two_rank_state_resumes_on_one_rank(runs, data, tmp_path, which):
    """A state saved by 2 ranks continues the same global order on 1 rank, with the same micro batch (the order
    does not depend on it for random batching) or with micro x world kept fixed."""
    res = runs("torchrun")
    order = _global_order(res, "epoch")
    got = _resume_one_rank(runs, data, str(tmp_path))[which]
    seq = [(i, v) for b in got for i, v in zip(b["idx"], b["lat"])]
    assert seq == [tuple(x) for x in order[K * MICRO * 2:]]


def test_two_rank_bucket_state_resumes_on_one_rank(runs, data, tmp_path):
    """per_stream batches are global micro-batches: keep micro x world fixed (here 4 x 2 -> 8 x 1)."""
    res = runs("torchrun")
    order = _global_order(res, "buckets")
    got = _resume_one_rank(runs, data, str(tmp_path))[2]
    seq = [(i, v) for b in got for i, v in zip(b["idx"], b["lat"])]
    assert seq == [tuple(x) for x in order[2 * MICRO * 2:]]
    assert all(len(b["idx"]) == 2 * MICRO for b in got)


# ----------------------------------------------------------------------------------------------------------------
# One process: tensor contents, validation, corrupt samples, shared memory, topology
# ----------------------------------------------------------------------------------------------------------------


def _batches(loader):
    return [b for b in loader]


def test_sample_tensors_match_the_shards(tmp_path):
    from pixart_ds.data.dataset import caption_drop, latent_noise
    from pixart_ds.data.loader import build_loader

    written = write_feature_shards(str(tmp_path / "s"), 16, text_dim=TEXT_DIM, seed=7)
    cfg = make_cfg([dict(local=str(tmp_path / "s"))], caption_dropout=0.5, seed=3)
    seen = set()
    for b in _batches(build_loader(cfg, 4)):
        assert set(b) == {"latent", "text_emb", "text_mask", "drop", "img_hw", "aspect_ratio", "sample_idx",
                          "skipped"}
        assert b["latent"].dtype == b["text_emb"].dtype == b["img_hw"].dtype == b["aspect_ratio"].dtype == \
            __import__("torch").float32
        assert b["text_mask"].dtype == b["sample_idx"].dtype == __import__("torch").int64
        for j, idx in enumerate(b["sample_idx"].tolist()):
            s = written[idx]
            seen.add(idx)
            eps = latent_noise(3, 0, idx, (4, 8, 8))
            want = (s["vae_mean"].astype(np.float32) + s["vae_std"].astype(np.float32) * eps) * 0.18215
            np.testing.assert_allclose(b["latent"][j].numpy(), want, rtol=1e-6, atol=1e-7)
            n = s["t5"].shape[0]
            np.testing.assert_array_equal(b["text_emb"][j, :n].numpy(), s["t5"].astype(np.float32))
            assert b["text_emb"].shape[1:] == (120, TEXT_DIM) and not b["text_emb"][j, n:].any()
            assert b["text_mask"][j].tolist() == [1] * n + [0] * (120 - n)
            assert b["drop"][j].item() == caption_drop(3, 0, idx, 0.5)
            assert b["img_hw"][j].tolist() == [s["height"], s["width"]]
            assert b["aspect_ratio"][j].tolist() == [1.0]
            assert not b["skipped"][j]
    assert seen == set(range(16))


def test_noise_and_dropout_are_deterministic(tmp_path):
    from pixart_ds.data.dataset import caption_drop, latent_noise
    from pixart_ds.data.loader import build_loader

    drops = np.array([caption_drop(0, 0, i, 0.1) for i in range(20000)])
    assert abs(drops.mean() - 0.1) < 0.01
    assert not any(caption_drop(0, 0, i, 0.0) for i in range(100))
    assert np.array_equal(latent_noise(0, 0, 5, (4, 8, 8)), latent_noise(0, 0, 5, (4, 8, 8)))
    assert not np.array_equal(latent_noise(0, 0, 5, (4, 8, 8)), latent_noise(0, 1, 5, (4, 8, 8)))  # new epoch
    assert not np.array_equal(latent_noise(0, 0, 5, (4, 8, 8)), latent_noise(1, 0, 5, (4, 8, 8)))  # new seed

    write_feature_shards(str(tmp_path / "s"), 16, text_dim=TEXT_DIM, seed=8)

    def latents(workers):
        loader = build_loader(make_cfg([dict(local=str(tmp_path / "s"))], workers=workers), 4)
        out = []
        for _ in range(2):  # two epochs
            lat = {}
            for b in loader:
                lat.update({i: b["latent"][j] for j, i in enumerate(b["sample_idx"].tolist())})
            out.append(lat)
        return out

    w0, w2 = latents(0), latents(2)
    # With 2 workers the main process reads nothing itself, yet sees every shard verified: the verdicts are shared.
    from pixart_ds.data.dataset import _CHECK_OK

    loader = build_loader(make_cfg([dict(local=str(tmp_path / "s"))], workers=2), 4)
    assert not loader.dataset._shard_checks[:].any()
    _batches(loader)
    assert (loader.dataset._shard_checks[:] == _CHECK_OK).all()
    for e in range(2):
        assert sorted(w0[e]) == sorted(w2[e]) == list(range(16))
        assert all(np.array_equal(w0[e][i], w2[e][i]) for i in range(16))
    assert not any(np.array_equal(w0[0][i], w0[1][i]) for i in range(16))


def test_class_data(tmp_path):
    from pixart_ds.data.loader import build_loader

    written = write_feature_shards(str(tmp_path / "c"), 12, condition="class", num_classes=10, seed=9)
    cfg = make_cfg([dict(local=str(tmp_path / "c"))], condition="class")
    for b in build_loader(cfg, 4):
        assert "text_emb" not in b and "text_mask" not in b
        assert b["label"].dtype == __import__("torch").int64
        assert b["label"].tolist() == [written[i]["label"] for i in b["sample_idx"].tolist()]


def test_build_time_errors_name_key_and_shard(tmp_path):
    from pixart_ds.config import ConfigError
    from pixart_ds.data.loader import build_loader

    text = str(tmp_path / "t")
    write_feature_shards(text, 16, text_dim=TEXT_DIM, seed=10)
    shard = os.path.join(text, "shard.00000.mds")
    cls = str(tmp_path / "c")
    write_feature_shards(cls, 16, condition="class", seed=11)
    big = str(tmp_path / "big")
    write_feature_shards(big, 8, latent_hw=(16, 16), text_dim=TEXT_DIM, seed=12)
    ch3 = str(tmp_path / "ch3")
    write_feature_shards(ch3, 8, channels=3, text_dim=TEXT_DIM, seed=13)

    from pixart_ds import config

    cases = [
        (config.replace(make_cfg([dict(local=text)]), **{"model.caption_channels": 64}), "model.caption_channels",
         shard),
        (make_cfg([dict(local=ch3)]), "model.in_channels", os.path.join(ch3, "shard.00000.mds")),
        (make_cfg([dict(local=big)]), "data.resolution", os.path.join(big, "shard.00000.mds")),
        (make_cfg([dict(local=cls)]), "model.condition", os.path.join(cls, "shard.00000.mds")),
        (make_cfg([dict(local=text)], condition="class"), "model.condition", shard),
        (make_cfg([dict(local=text)], global_batch=32), "train.global_batch_size", text),
        (make_cfg([dict(local=text)], num_canonical_nodes=64), "data.num_canonical_nodes", text),
    ]
    tiny_buckets = str(tmp_path / "tb")
    write_bucketed_source(tiny_buckets, {(8, 8): 3, (4, 16): 2}, text_dim=TEXT_DIM, seed=16)
    cases.append((make_cfg([dict(local=tiny_buckets)], multi_scale=True, global_batch=4), "data.sources[0].local",
                  tiny_buckets))
    for cfg, key, path in cases:
        with pytest.raises(ConfigError) as e:
            build_loader(cfg, 4)
        msg = str(e.value)
        assert key in msg and path in msg and "\n" not in msg, msg
    with pytest.raises(FileNotFoundError, match="no index.json"):
        build_loader(make_cfg([dict(local=str(tmp_path))]), 4)


def test_wrong_shape_sample_stops_or_is_skipped(tmp_path):
    from pixart_ds.data.dataset import CorruptSampleError
    from pixart_ds.data.loader import build_loader

    d = str(tmp_path / "s")
    # No hashes: the structural checks alone must catch a column of the wrong shape.
    write_feature_shards(d, 16, text_dim=TEXT_DIM, seed=14, hashes=(),
                         overrides={5: {"vae_std": np.ones((4, 8, 7), np.float16)}})
    with pytest.raises(CorruptSampleError) as e:
        _batches(build_loader(make_cfg([dict(local=d)]), 4))
    msg = str(e.value)
    assert "sample 5" in msg and os.path.join(d, "shard.00000.mds") in msg and "vae_std" in msg, msg

    loader = build_loader(make_cfg([dict(local=d)], on_corrupt="skip"), 4)
    batches = _batches(loader)
    assert loader.num_skipped == 1
    assert all(len(b["sample_idx"]) == 4 for b in batches)
    ids = [i for b in batches for i in b["sample_idx"].tolist()]
    assert 5 not in ids and len(ids) == 16


@pytest.mark.parametrize("where", [0.0, 0.5], ids=["zstd_header", "zstd_payload"])
def test_compressed_shard_with_flipped_bytes(tmp_path, where):
    """zstd shards are decompressed by Streaming's download thread. A broken frame (header) fails there, which
    must still stop the run with the shard's name, not end the epoch early; a broken payload may decompress to
    garbage, which the raw shard's hash catches. Or either is skipped and counted."""
    from pixart_ds.data.dataset import CorruptSampleError
    from pixart_ds.data.loader import build_loader

    d = str(tmp_path / "z")
    write_feature_shards(d, 24, text_dim=TEXT_DIM, seed=15, compression="zstd", samples_per_shard=8)
    with open(os.path.join(d, "index.json")) as f:
        shards = json.load(f)["shards"]
    bad = shards[-1]["zip_data"]["basename"]
    flip_bytes(os.path.join(d, bad), count=8 if where == 0.0 else 64, where=where)
    lo = sum(s["samples"] for s in shards[:-1])
    for workers in (0, 2):
        with pytest.raises(CorruptSampleError) as e:
            _batches(build_loader(make_cfg([dict(local=d)], workers=workers), 4))
        assert bad.rsplit(".", 1)[0] in str(e.value) and "\n" not in str(e.value), str(e.value)

    loader = build_loader(make_cfg([dict(local=d)], on_corrupt="skip", workers=2), 4)
    ids = [i for b in _batches(loader) for i in b["sample_idx"].tolist()]
    assert loader.num_skipped == 24 - lo and len(ids) == 24 and max(ids) < lo


def test_clean_stale_shm_removes_only_unmapped(tmp_path):
    from multiprocessing import shared_memory

    from pixart_ds.data.loader import clean_stale_shm

    prefix = random.randrange(900000, 999999)
    stale = f"/dev/shm/{prefix:06d}_locals"
    with open(stale, "wb") as f:  # what a killed run leaves: a segment nobody maps
        f.write(b"\0" * 64)
    live = shared_memory.SharedMemory(name=f"{prefix:06d}_barrier", create=True, size=64)
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    (lock_dir / f"{prefix:06d}_cache_filelock").write_text("")  # prefix still has a live segment: kept
    (lock_dir / f"{prefix + 1:06d}_cache_filelock").write_text("")  # no segment left: removed
    try:
        removed = clean_stale_shm(lock_dir=str(lock_dir))
        assert stale in removed and not os.path.exists(stale)
        assert os.path.exists(f"/dev/shm/{prefix:06d}_barrier")
        assert (lock_dir / f"{prefix:06d}_cache_filelock").exists()
        assert not (lock_dir / f"{prefix + 1:06d}_cache_filelock").exists()
    finally:
        live.close()
        live.unlink()
        if os.path.exists(stale):
            os.unlink(stale)


def test_topology_from_environments():
    from pixart_ds.data.loader import Topology, export_topology, resolve_topology

    ds = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    assert resolve_topology(None, ds) == Topology(1, 2, 1, 2)
    srun = dict(SLURM_PROCID="3", SLURM_NTASKS="4", SLURM_LOCALID="1", SLURM_NTASKS_PER_NODE="2", SLURM_NODEID="1",
                SLURM_STEP_ID="0", SLURM_JOB_ID="123", SLURM_JOB_NODELIST="n[1-2]")
    assert resolve_topology(None, srun) == Topology(3, 4, 1, 2)
    env = {}
    export_topology(Topology(3, 4, 1, 2), env)
    assert env == dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE=8"):
        export_topology(Topology(3, 4, 1, 2), dict(LOCAL_WORLD_SIZE="8"))

    class Env:  # any object with the four attributes
        rank, world_size, local_rank, local_world_size = 0, 2, 0, 2

    assert resolve_topology(Env()) == Topology(0, 2, 0, 2)


def test_loader_benchmark_script(tmp_path):
    """benchmarks/loader.py end to end at a tiny size: the report names the machine and has one row per worker
    count beside the train_step rate (timings are not asserted)."""
    out = tmp_path / "res"
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "loader.py"), "--set", "model.preset=tiny",
                        "--set", "data.resolution=64", "--set", "model.caption_channels=32", "--set",
                        "model.max_text_tokens=8", "--set", "data.num_canonical_nodes=1", "--cpu-preset", "tiny",
                        "--cpu-batch", "2", "--samples", "24", "--workers", "0,1", "--warmup", "1", "--steps", "1",
                        "--no-progress", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=REPO, env=_clean_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    js = [f for f in os.listdir(out) if f.endswith(".json")]
    assert len(js) == 1 and js[0].startswith("loader_stage2_sam256_cpu-"), js
    with open(out / js[0]) as f:
        rec = json.load(f)
    assert rec["schema"] == "pixart_ds.loader/1" and rec["hardware"]["type"] == "cpu"
    assert [r["workers"] for r in rec["loader"]] == [0, 1]
    assert all(r["samples_per_s"] > 0 and r["batches_timed"] == 11 for r in rec["loader"])
    assert rec["step"]["images_per_s"] > 0 and rec["measure"]["samples"] == 24
    md = (out / js[0].replace(".json", ".md")).read_text()
    assert "| DataLoader workers | samples/s | headroom vs step |" in md and rec["hardware"]["name"] in md
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "loader.py"), "nope.yaml"],
                       capture_output=True, text=True, timeout=120, cwd=REPO, env=_clean_env())
    assert p.returncode == 2 and "nope.yaml: recipe file not found" in p.stderr


def test_reads_what_the_feature_extractor_writes(tmp_path, tiny_vae_dir, tiny_t5_dir):
    """The real write path (embedded dataset -> raw MDS -> `features` with the tiny VAE/T5) read back by the loader:
    plain, per-bucket (multi-scale) and class-label feature layouts."""
    from pixart_ds.data import convert, features
    from pixart_ds.data.loader import build_loader
    from pixart_ds.data.schema import iter_samples

    raw = str(tmp_path / "raw")
    convert.synthetic(num_samples=12, resolution=64, seed=0, out=raw, workers=1, progress=False)
    ids = {s["id"]: s for s in iter_samples(raw)}
    runs = [("plain", dict(resolution=64), {}), ("ms", dict(resolution=64, multi_scale=True), {"multi_scale": True}),
            ("cls", dict(resolution=64, class_labels=True), {"condition": "class", "num_classes": 1000})]
    for name, kw, cfg_kw in runs:
        out = str(tmp_path / name)
        features.extract_features(raw, out, tiny_vae_dir, None if kw.get("class_labels") else tiny_t5_dir,
                                  batch_size=4, progress=False, **kw)
        cfg = make_cfg([dict(local=out)], global_batch=2, **cfg_kw)
        loader = build_loader(cfg, 2)
        seen = []
        for b in loader:
            seen += b["sample_idx"].tolist()
            assert b["latent"].shape[:2] == (2, 4) and not b["skipped"].any()
            assert b["img_hw"].tolist() == [[64.0, 64.0]] * 2
            if name == "cls":
                assert set(b["label"].tolist()) <= {s["label"] for s in ids.values()}
            else:
                assert b["text_emb"].shape == (2, 120, 32)
                n = b["text_mask"].sum(1)
                assert (n >= 1).all() and all(not b["text_emb"][j, int(n[j]):].any() for j in range(2))
        assert sorted(seen) == list(range(len(ids))), name
