"""Feature extraction: stored VAE posteriors and T5 tokens equal a direct encode (tiny VAE + tiny T5); multi-scale
bucket streams; stage-1 class features; bad raw shards counted, never fatal; resume; CLI and torchrun with 2 ranks."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms import InterpolationMode

from pixart_ds.data import buckets, convert, features, manifest
from pixart_ds.data.convert import read_summary
from pixart_ds.data.schema import CLASS_FEATURE_COLUMNS, FEATURE_COLUMNS, iter_samples
from pixart_ds.dist import launch_ranks
from pixart_ds.model import encoders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (width, height, caption): square, landscape, portrait and a very wide panorama (ratio 0.3).
IMAGES = [(96, 96, "a small red circle in the center on a blue background"),
          (128, 72, "a large green square in the top left on a white background"),
          (72, 128, "a photo of a yellow triangle"),
          (120, 36, "a very wide picture of a black cross on a gray background, detailed"),
          (80, 64, "an orange star"),
          (64, 80, "a purple diamond in the bottom right")]


def _jpeg(w, h, seed):
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (5, 5, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """A raw MDS of real JPEGs with captions and labels, written by the folder converter."""
    root = tmp_path_factory.mktemp("pics")
    for i, (w, h, cap) in enumerate(IMAGES):
        (root / f"img{i}.jpg").write_bytes(_jpeg(w, h, i))
        (root / f"img{i}.json").write_text(json.dumps({"caption": cap, "label": i % 3}))
    out = str(tmp_path_factory.mktemp("raw") / "raw")
    convert.folder(str(root), out=out, workers=1, progress=False)
    return out


def features_by_id(root):
    if os.path.isfile(os.path.join(root, "index.json")):
        return {s["id"]: s for s in iter_samples(root)}
    got = {}
    for st in buckets.list_bucket_streams(root):
        for s in iter_samples(st["path"]):
            got[s["id"]] = dict(s, _stream=st["name"])
    return got


def reference(raw_root, vae_dir, t5_dir, resolution, multi_scale):
    """Direct encode with the official transforms (torchvision Compose), one image at a time."""
    vae = encoders.load_vae(vae_dir)
    tok, t5 = encoders.load_text_encoder(t5_dir, dtype="fp32")
    ref = {}
    for s in iter_samples(raw_root):
        img = Image.open(io.BytesIO(s["image"]))
        h, w = s["height"], s["width"]
        if multi_scale:
            key, (bh, bw) = buckets.nearest_bucket(h, w, resolution)
            if bh / h > bw / w:  # official InternalData_ms resize rule
                resize = (bh, int(w * bh / h))
            else:
                resize = (int(h * bw / w), bw)
            tf = T.Compose([T.Lambda(lambda im: im.convert("RGB")),
                            T.Resize(resize, interpolation=InterpolationMode.BICUBIC), T.CenterCrop((bh, bw)),
                            T.ToTensor(), T.Normalize([.5], [.5])])
        else:
            key = "1.0"
            tf = T.Compose([T.Lambda(lambda im: im.convert("RGB")),
                            T.Resize(resolution, interpolation=InterpolationMode.BICUBIC),
                            T.CenterCrop(resolution), T.ToTensor(), T.Normalize([.5], [.5])])
        mean, std = encoders.vae_encode(vae, tf(img)[None])
        emb, mask = encoders.encode_text(tok, t5, [s["caption"]])
        n = int(mask.sum())
        ref[s["id"]] = dict(mean=mean[0].numpy(), std=std[0].numpy(), t5=emb[0, :n].numpy(), ratio=float(key))
    return ref


def assert_close_fp16(stored, ref, what):
    assert stored.dtype == np.float16, what
    assert stored.shape == ref.shape, (what, stored.shape, ref.shape)
    np.testing.assert_allclose(stored.astype(np.float32), ref, rtol=2e-3, atol=2e-3, err_msg=what)


# ------------------------------------------------------------------------------------------------------------------
# Bucket tables
# ------------------------------------------------------------------------------------------------------------------


def test_bucket_tables_match_the_papers_40_buckets():
    for res, tab in buckets.TABLES.items():
        assert len(tab) == 40
        ratios = sorted(float(k) for k in tab)
        assert ratios[0] == 0.25 and ratios[-1] == 4.0
        step = {256: 16, 512: 32, 1024: 64}[res]
        for k, (h, w) in tab.items():
            assert h % step == 0 and w % step == 0
            assert abs(h / w - float(k)) < 0.05, (res, k)  # key = rounded h / w
            assert 0.85 < h * w / res ** 2 < 1.1  # about res^2 pixels each
    # Spot checks against the official tables (diffusion/data/datasets/utils.py).
    assert buckets.ASPECT_RATIO_1024["0.57"] == (768, 1344)
    assert buckets.ASPECT_RATIO_512["0.25"] == (256, 1024) and buckets.ASPECT_RATIO_512["2.89"] == (832, 288)
    assert buckets.ASPECT_RATIO_256["0.94"] == (240, 256) and buckets.ASPECT_RATIO_256["3.62"] == (464, 128)


def test_nearest_bucket_and_cover():
    # An SA-1B photo (1500 x 2250, h/w = 0.667) goes to the 0.68 bucket.
    assert buckets.nearest_bucket(1500, 2250, 1024) == ("0.68", (832, 1216))
    assert buckets.nearest_bucket(100, 1000, 512)[0] == "0.25"  # beyond the table: the extreme bucket
    assert buckets.nearest_bucket(4000, 500, 256)[0] == "4.0"
    assert buckets.nearest_bucket(512, 512, 256) == ("1.0", (256, 256))
    for h, w in [(1500, 2250), (333, 1000), (1000, 333), (640, 641)]:
        _, (bh, bw) = buckets.nearest_bucket(h, w, 512)
        rh, rw = buckets.cover_size(h, w, bh, bw)
        assert rh >= bh and rw >= bw and (rh == bh or rw == bw)
    with pytest.raises(ValueError, match="multiple of 16"):
        buckets.table(100)


def test_bytes_per_sample_numbers():
    b = features.bytes_per_sample(256, text_tokens=120)
    assert b["vae"] == 16384 and b["t5_padded_120"] == 983040
    assert features.bytes_per_sample(1024, 30)["vae"] == 262144
    assert features.bytes_per_sample(512, 30)["total_unpadded"] == 65536 + 30 * 8192


# ------------------------------------------------------------------------------------------------------------------
# Parity with a direct encode
# ------------------------------------------------------------------------------------------------------------------


def test_features_equal_direct_encode(raw, tiny_vae_dir, tiny_t5_dir, tmp_path):
    out = str(tmp_path / "feat")
    s = features.extract_features(raw, out, tiny_vae_dir, tiny_t5_dir, resolution=64, batch_size=4,
                                  progress=False)
    assert s["written"] == len(IMAGES) and s["skipped"] == 0
    ref = reference(raw, tiny_vae_dir, tiny_t5_dir, 64, multi_scale=False)
    got = features_by_id(out)
    assert set(got) == set(ref)
    raw_by_id = {r["id"]: r for r in iter_samples(raw)}
    for k, r in ref.items():
        g = got[k]
        assert set(g) == set(FEATURE_COLUMNS)
        assert g["vae_mean"].shape == (4, 8, 8)
        assert_close_fp16(g["vae_mean"], r["mean"], f"{k} vae_mean")
        assert_close_fp16(g["vae_std"], r["std"], f"{k} vae_std")
        assert_close_fp16(g["t5"], r["t5"], f"{k} t5")  # unpadded: [n, 32], n = real tokens incl. </s>
        assert g["caption"] == raw_by_id[k]["caption"] and g["label"] == raw_by_id[k]["label"]
        assert (g["height"], g["width"]) == (raw_by_id[k]["height"], raw_by_id[k]["width"])
        assert float(g["aspect_ratio"]) == 1.0
    assert os.path.isfile(out + ".summary.json") and not os.path.exists(out + ".partial")


def test_multi_scale_writes_one_stream_per_bucket(raw, tiny_vae_dir, tiny_t5_dir, tmp_path):
    out = str(tmp_path / "ms")
    s = features.extract_features(raw, out, tiny_vae_dir, tiny_t5_dir, resolution=128, multi_scale=True,
                                  batch_size=2, progress=False)
    ref = reference(raw, tiny_vae_dir, tiny_t5_dir, 128, multi_scale=True)
    streams = buckets.list_bucket_streams(out)
    assert not os.path.exists(os.path.join(out, "index.json"))
    # The manifest a remote reader plans from: every bucket stream with its size and latent shape.
    man = manifest.read_manifest(os.path.join(out, manifest.MANIFEST_FILE))
    assert [(m["dir"], m["samples"], m["latent_shape"]) for m in man["streams"]] == \
        [(st["name"], st["num_samples"], [4, st["height"] // 8, st["width"] // 8]) for st in streams]
    assert man["multi_scale"] and man["resolution"] == 128 and man["text_dim"] == 32 and man["samples"] == 6
    assert sum(st["num_samples"] for st in streams) == len(IMAGES) == s["written"]
    got = features_by_id(out)
    shapes = {}
    for k, r in ref.items():
        g = got[k]
        assert_close_fp16(g["vae_mean"], r["mean"], f"{k} vae_mean")
        assert_close_fp16(g["t5"], r["t5"], f"{k} t5")
        assert float(g["aspect_ratio"]) == pytest.approx(r["ratio"])
        h8, w8 = g["vae_mean"].shape[1:]
        assert g["_stream"] == buckets.bucket_dirname(8 * h8, 8 * w8)  # the stream is the latent's shape
        shapes.setdefault(g["_stream"], set()).add(g["vae_mean"].shape)
    assert all(len(v) == 1 for v in shapes.values())  # a stream never mixes shapes
    assert len(streams) >= 4  # square, landscape, portrait, panorama
    wide = got["img3"]  # 120 x 36: h/w = 0.3 -> the 0.28 or 0.32 bucket, far wider than tall
    assert wide["vae_mean"].shape[2] > 2.5 * wide["vae_mean"].shape[1]


def test_class_label_features(raw, tiny_vae_dir, tmp_path):
    out = str(tmp_path / "cls")
    s = features.extract_features(raw, out, tiny_vae_dir, None, resolution=64, batch_size=3, class_labels=True,
                                  progress=False)
    got = features_by_id(out)
    assert s["written"] == len(IMAGES)
    for k, g in got.items():
        assert set(g) == set(CLASS_FEATURE_COLUMNS) and "t5" not in g
        assert g["label"] == int(k[3:]) % 3
    with pytest.raises(ValueError, match="--text-encoder is required"):
        features.extract_features(raw, str(tmp_path / "x"), tiny_vae_dir, None, resolution=64, progress=False)


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------


def _write_raw(out, samples, size_limit=1 << 26):
    from streaming import MDSWriter

    from pixart_ds.data.schema import RAW_COLUMNS

    with MDSWriter(out=out, columns=RAW_COLUMNS, size_limit=size_limit) as w:
        for s in samples:
            w.write(s)


def _raw_sample(i, data=None, w=64, h=48, label=-1, caption="a thing"):
    data = data if data is not None else _jpeg(w, h, i)
    return {"id": f"s{i}", "image": data, "caption": caption, "label": label, "width": w, "height": h,
            "source": "folder"}


def test_bad_raw_samples_are_counted_not_fatal(tiny_vae_dir, tiny_t5_dir, tmp_path):
    good = _jpeg(64, 48, 0)
    samples = [_raw_sample(0), _raw_sample(1, data=good[: len(good) // 2]),  # truncated JPEG
               _raw_sample(2, w=50, h=50),                                      # stored size != image size
               _raw_sample(3, caption=""), _raw_sample(4)]
    samples[2]["image"] = _jpeg(64, 48, 2)
    samples += [_raw_sample(i) for i in range(5, 25)]
    raw = str(tmp_path / "raw")
    _write_raw(raw, samples, size_limit=1 << 12)  # several small shards
    index = json.load(open(os.path.join(raw, "index.json")))
    assert len(index["shards"]) >= 3
    # Truncate the last shard file (a partial copy).
    last = index["shards"][-1]
    path = os.path.join(raw, last["raw_data"]["basename"])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    n_last = int(last["samples"])

    out = str(tmp_path / "feat")
    s = features.extract_features(raw, out, tiny_vae_dir, tiny_t5_dir, resolution=64, batch_size=4, progress=False)
    reasons = {x["id"]: x["reason"] for x in s["skips"]}
    assert reasons["s1"] == "corrupt image" and reasons["s2"] == "wrong shape" and reasons["s3"] == "no caption"
    truncated = [k for k, v in reasons.items() if v == "truncated shard"]
    assert len(truncated) == n_last and all(k.startswith(last["raw_data"]["basename"]) for k in truncated)
    assert s["written"] == 25 - 3 - n_last
    assert s["written"] == len(features_by_id(out))


def test_wrong_column_type_is_a_one_line_error(tiny_vae_dir, tiny_t5_dir, tmp_path, run_cli):
    from streaming import MDSWriter

    raw = str(tmp_path / "raw")
    cols = {"id": "str", "image": "bytes", "caption": "str", "label": "str", "width": "int", "height": "int"}
    with MDSWriter(out=raw, columns=cols) as w:
        w.write({"id": "a", "image": _jpeg(64, 64, 0), "caption": "x", "label": "cat", "width": 64, "height": 64})
    out = tmp_path / "feat"
    p = run_cli("features", "--in", raw, "--out", out, "--vae", tiny_vae_dir, "--text-encoder", tiny_t5_dir,
                "--resolution", "64")
    assert p.returncode == 2
    assert "column 'label' is 'str', expected int" in p.stderr and p.stderr.strip().count("\n") == 0
    assert not out.exists()  # nothing written


def test_crash_then_resume(raw, tiny_vae_dir, tiny_t5_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "feat")
    real = encoders.vae_encode
    calls = {"n": 0}

    def flaky(vae, x):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(vae, x)

    monkeypatch.setattr(encoders, "vae_encode", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        features.extract_features(raw, out, tiny_vae_dir, tiny_t5_dir, resolution=64, batch_size=2, progress=False)
    assert not os.path.exists(os.path.join(out, "index.json"))
    assert [f for f in os.listdir(out) if not f.startswith(".")] == []  # nothing half-written under OUT
    monkeypatch.setattr(encoders, "vae_encode", real)
    s = features.extract_features(raw, out, tiny_vae_dir, tiny_t5_dir, resolution=64, batch_size=2, progress=False)
    assert s["written"] == len(IMAGES)
    first = features_by_id(out)
    # A finished run: the rank's marker is trusted, nothing is recomputed, the index is rebuilt identically.
    os.remove(os.path.join(out, "index.json"))
    monkeypatch.setattr(encoders, "vae_encode", flaky)  # would crash if called
    calls["n"] = 1
    s2 = features.extract_features(raw, out, tiny_vae_dir, tiny_t5_dir, resolution=64, batch_size=2, progress=False)
    assert s2["written"] == len(IMAGES)
    assert {k: v["vae_mean"].tobytes() for k, v in features_by_id(out).items()} == \
        {k: v["vae_mean"].tobytes() for k, v in first.items()}
    with pytest.raises(ValueError, match="resolution=64"):
        features.extract_features(raw, out, tiny_vae_dir, tiny_t5_dir, resolution=128, progress=False)


# ------------------------------------------------------------------------------------------------------------------
# As a user runs it: CLI, and torchrun with 2 ranks
# ------------------------------------------------------------------------------------------------------------------


def test_features_cli(raw, tiny_vae_dir, tiny_t5_dir, tmp_path, run_cli):
    out = tmp_path / "feat"
    p = run_cli("features", "--in", raw, "--out", out, "--vae", tiny_vae_dir, "--text-encoder", tiny_t5_dir,
                "--resolution", "64", "--batch-size", "4")
    assert p.returncode == 0, p.stderr
    assert f"wrote {len(IMAGES)} samples" in p.stdout
    s = read_summary(str(out))
    assert s["written"] == len(IMAGES) and s["world_size"] == 1 and s["bytes_per_sample"] > 0
    assert len(features_by_id(str(out))) == len(IMAGES)


def test_features_torchrun_two_ranks(raw, tiny_vae_dir, tiny_t5_dir, tmp_path):
    out = str(tmp_path / "feat2")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "pixart_ds.cli", "features", "--in", raw, "--out", out, "--vae", tiny_vae_dir, "--text-encoder",
           tiny_t5_dir, "--resolution", "64", "--batch-size", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr
    s = read_summary(out)
    assert s["world_size"] == 2 and s["written"] == len(IMAGES)
    # Each rank wrote its own partition; together they cover every raw sample exactly once, in raw order.
    parts = sorted(d for d in os.listdir(out) if d.startswith("part-"))
    assert parts == ["part-00000-of-00002", "part-00001-of-00002"]
    ids = [x["id"] for x in iter_samples(out)]
    assert ids == [x["id"] for x in iter_samples(raw)]
    per_rank = [{x["id"] for x in iter_samples(os.path.join(out, p))} for p in parts]
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]
    # Same numbers as one process.
    one = str(tmp_path / "feat1")
    features.extract_features(raw, one, tiny_vae_dir, tiny_t5_dir, resolution=64, batch_size=2, progress=False)
    a, b = features_by_id(out), features_by_id(one)
    for k in a:
        np.testing.assert_allclose(a[k]["vae_mean"].astype(np.float32), b[k]["vae_mean"].astype(np.float32),
                                   atol=2e-3)
        np.testing.assert_allclose(a[k]["t5"].astype(np.float32), b[k]["t5"].astype(np.float32), atol=2e-3)
    # Resuming with another world size is refused, naming the one to use.
    with pytest.raises(ValueError, match="written by 2 ranks"):
        features.extract_features(raw, out, tiny_vae_dir, tiny_t5_dir, resolution=64, progress=False)


def test_feature_ranks_from_launchers():
    """Feature extraction needs no process group: dist.launch_ranks reads torchrun's or srun's variables."""
    assert launch_ranks({}) == (0, 1, 0)
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert launch_ranks(torchrun) == (3, 4, 1)
    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4"}
    assert launch_ranks(srun) == (5, 8, 1)
    assert launch_ranks(dict(srun, **torchrun)) == (3, 4, 1)  # torchrun inside an allocation wins
    with pytest.raises(ValueError, match="rank 4 is outside world size 4"):
        launch_ranks({"RANK": "4", "WORLD_SIZE": "4"})
