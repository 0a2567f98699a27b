"""Multi-scale feature shards read from a Streaming remote through their manifest (FEAT/manifest.jsonl): the same
batches as the local directory, through the loader and through `pixart-ds train`; a manifest that disagrees with
the shards, or a recipe that disagrees with the manifest, stops before training with a message naming both.

The remote is a second local directory (Streaming copies from it as from s3:// or gs://) and the local cache starts
empty, so every index.json and shard the run reads was fetched from the remote."""
import json
import os
import shutil

import pytest
from test_loader import TEXT_DIM, make_cfg

from pixart_ds.testing import TINY_TEXT, describe, read_metrics, run_train, write_bucketed_source, write_feature_shards

BUCKETS = {(8, 8): 20, (4, 16): 12, (16, 4): 8, (6, 10): 1}  # latent (h, w): samples; the last is too small


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(local multi-scale source, its copy as the remote)."""
    root = tmp_path_factory.mktemp("remote_src")
    local = str(root / "feat")
    write_bucketed_source(local, BUCKETS, text_dim=TEXT_DIM, max_tokens=16, samples_per_shard=5, seed=3)
    remote = str(root / "bucket")
    shutil.copytree(local, remote)
    return local, remote


def _epoch(loader):
    return [(b["sample_idx"].tolist(), [round(x, 6) for x in b["latent"].flatten(1).sum(1).tolist()],
             list(b["latent"].shape[1:])) for b in loader]


def test_manifest_lists_the_bucket_streams(source):
    from pixart_ds.data.manifest import MANIFEST_FILE, read_manifest

    local, _ = source
    man = read_manifest(os.path.join(local, MANIFEST_FILE))
    assert man["multi_scale"] and man["condition"] == "text" and man["text_dim"] == TEXT_DIM
    assert {s["dir"]: (s["samples"], s["latent_shape"]) for s in man["streams"]} == {
        f"h{8 * h}_w{8 * w}": (n, [4, h, w]) for (h, w), n in BUCKETS.items()}
    assert man["samples"] == sum(BUCKETS.values())


def test_remote_multi_scale_same_batches_as_local(source, tmp_path):
    from pixart_ds.data.loader import build_loader

    local, remote = source
    cache = str(tmp_path / "cache")
    ref = _epoch(build_loader(make_cfg([dict(local=local)], multi_scale=True, global_batch=4), 2))
    loader = build_loader(make_cfg([dict(local=cache, remote=remote)], multi_scale=True, global_batch=4), 2)
    assert _epoch(loader) == ref
    assert [os.path.relpath(s.remote, remote) for s in loader.dataset.streams] == \
        ["h128_w32", "h32_w128", "h64_w64"]  # name order; h48_w80 (1 sample) cannot fill a global micro-batch
    fetched = sorted(f for d in os.listdir(cache) if os.path.isdir(os.path.join(cache, d))
                     for f in os.listdir(os.path.join(cache, d)) if f.endswith(".mds"))
    assert fetched and os.path.isfile(os.path.join(cache, "manifest.jsonl"))
    # A second run reads the cache it left behind: the same batches again.
    again = build_loader(make_cfg([dict(local=cache, remote=remote)], multi_scale=True, global_batch=4), 2)
    assert _epoch(again) == ref
    # A remote without a local cache dir gets one per node in the temporary directory.
    from pixart_ds.data.loader import default_cache

    loader = build_loader(make_cfg([dict(remote=remote)], multi_scale=True, global_batch=4), 2)
    assert loader.dataset.streams[0].local.startswith(default_cache(remote))
    shutil.rmtree(default_cache(remote), ignore_errors=True)


def test_single_scale_remote(tmp_path):
    from pixart_ds.data.loader import build_loader

    local = str(tmp_path / "s")
    write_feature_shards(local, 16, text_dim=TEXT_DIM, samples_per_shard=4, seed=9)
    remote = str(tmp_path / "r")
    shutil.copytree(local, remote)
    ref = _epoch(build_loader(make_cfg([dict(local=local)]), 4))
    cache = str(tmp_path / "c")
    assert _epoch(build_loader(make_cfg([dict(local=cache, remote=remote)]), 4)) == ref
    # A cache holding the index but not the first shard (evicted, or never read): fetched again on demand.
    os.remove(os.path.join(cache, "shard.00000.mds"))
    assert _epoch(build_loader(make_cfg([dict(local=cache, remote=remote)]), 4)) == ref


def _edit_manifest(root, **per_dir):
    path = os.path.join(root, "manifest.jsonl")
    with open(path) as f:
        man = json.loads(f.readline())
    for s in man["streams"]:
        s.update(per_dir.get(s["dir"], {}))
    with open(path, "w") as f:
        f.write(json.dumps(man) + "\n")


def test_manifest_and_shards_disagree(source, tmp_path):
    from pixart_ds.config import ConfigError
    from pixart_ds.data.loader import build_loader

    local, remote = source

    def fails(sources, *parts, **kw):
        with pytest.raises(ConfigError) as e:
            build_loader(make_cfg(sources, multi_scale=True, global_batch=4, **kw), 2)
        msg = str(e.value)
        assert "\n" not in msg and all(p in msg for p in parts), msg

    # Local: a stream's count differs, a listed stream is missing, a stream is not listed.
    bad = str(tmp_path / "bad")
    shutil.copytree(local, bad)
    _edit_manifest(bad, h64_w64={"samples": 21})
    fails([dict(local=bad)], "data.sources[0]", "manifest.jsonl", "disagree", "h64_w64 holds 20 samples",
          "says 21")
    _edit_manifest(bad, h64_w64={"samples": 20})
    shutil.copytree(os.path.join(bad, "h64_w64"), os.path.join(bad, "h80_w48"))
    fails([dict(local=bad)], "disagree", "h80_w48 hold a stream the manifest does not list")
    shutil.rmtree(os.path.join(bad, "h80_w48"))
    shutil.rmtree(os.path.join(bad, "h32_w128"))
    fails([dict(local=bad)], "disagree", "lists h32_w128, which has no index.json")

    # Remote: the counts are checked once Streaming has fetched each index.json.
    rbad = str(tmp_path / "rbad")
    shutil.copytree(remote, rbad)
    _edit_manifest(rbad, h32_w128={"samples": 11})
    fails([dict(local=str(tmp_path / "c1"), remote=rbad)], "data.sources[0]", "disagree",
          os.path.join(rbad, "h32_w128"), "holds 12 samples", "says 11")
    # A stale cache: the remote was rewritten after the cache was filled.
    cache = str(tmp_path / "c2")
    build_loader(make_cfg([dict(local=cache, remote=remote)], multi_scale=True, global_batch=4), 2)
    stale = str(tmp_path / "stale")
    shutil.copytree(remote, stale)
    shutil.copytree(cache, str(tmp_path / "c3"))
    _edit_manifest(stale, h64_w64={"samples": 19})
    fails([dict(local=str(tmp_path / "c3"), remote=stale)], "stale local cache", "holds 20 samples")

    # A remote without a manifest (shards made before manifests), and a recipe the manifest contradicts.
    nomani = str(tmp_path / "nomani")
    shutil.copytree(remote, nomani)
    os.remove(os.path.join(nomani, "manifest.jsonl"))
    fails([dict(local=str(tmp_path / "c4"), remote=nomani)], "data.sources[0].remote", "no stream manifest",
          "run the same features command again")
    with pytest.raises(ConfigError) as e:
        from pixart_ds import config

        cfg = config.replace(make_cfg([dict(local=str(tmp_path / "c5"), remote=remote)], multi_scale=True,
                                      global_batch=4), **{"model.caption_channels": 64})
        build_loader(cfg, 2)
    assert "model.caption_channels: 64" in str(e.value) and "T5 width 32" in str(e.value)


def test_legacy_local_buckets_without_manifest(tmp_path):
    """Directories written before manifests are still listed (local sources only), in the same order."""
    from pixart_ds.data.loader import build_loader

    with_m, without = str(tmp_path / "m"), str(tmp_path / "n")
    write_bucketed_source(with_m, {(8, 8): 8, (4, 16): 8}, text_dim=TEXT_DIM, seed=4)
    write_bucketed_source(without, {(8, 8): 8, (4, 16): 8}, text_dim=TEXT_DIM, seed=4, manifest=False)
    a = _epoch(build_loader(make_cfg([dict(local=with_m)], multi_scale=True, global_batch=4), 2))
    assert _epoch(build_loader(make_cfg([dict(local=without)], multi_scale=True, global_batch=4), 2)) == a


def test_stage_trains_from_remote_like_local(source, tmp_path):
    """`pixart-ds train` on a multi-scale recipe: the remote source (empty cache) trains on the same samples in the
    same order as the local directory, and to the same losses."""
    local, remote = source
    common = ["model.multi_scale=true", "data.multi_scale=true", "log.sample_ids=true", "train.total_steps=4",
              "checkpoint.every_steps=4"]
    runs = {}
    for name, src in [("local", f"{{local: {local}}}"),
                      ("remote", f"{{local: {tmp_path / 'cache'}, remote: {remote}}}")]:
        run = str(tmp_path / name)
        p = run_train(TINY_TEXT, [f"run_dir={run}", f"data.sources=[{src}]", *common])
        assert p.returncode == 0, describe(p)
        runs[name], _ = read_metrics(run)
    assert sorted(runs["local"]) == sorted(runs["remote"]) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert runs["remote"][step]["sample_idx"] == runs["local"][step]["sample_idx"]
        assert runs["remote"][step]["loss"] == runs["local"][step]["loss"]
    ids = [i for s in range(1, 5) for i in runs["local"][s]["sample_idx"]]
    assert len(ids) == 32 and len(set(ids)) == 32
