"""`pixart-ds eval` and pixart_ds.eval: FID / KID / CLIP score against their library's own computation and closed
forms, world-size independence, resume after a real kill, and one-line errors.

Everything is built here, offline: a randomly initialised Inception-v3 saved to a file (pixart_ds.eval.inception),
a tiny CLIP (tests/eval_helpers.make_tiny_clip), a tiny random PixArt "ours" folder with conftest's tiny T5 and VAE,
and embedded-dataset images as the reference.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.linalg
import torch
from eval_helpers import make_tiny_clip, shapes_uint8

from pixart_ds import config
from pixart_ds.eval import metrics as M
from pixart_ds.eval.inception import inception_features, load_inception, save_random_inception

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = 64
N_IMAGES, SHARD = 8, 2


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return save_random_inception(str(tmp_path_factory.mktemp("inc") / "inception_random.pt"), seed=0)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(str(tmp_path_factory.mktemp("clip") / "clip"))


@pytest.fixture(scope="module")
def sets(inception_file):
    """Two image sets (uint8) and their features through the random Inception."""
    real, _ = shapes_uint8(6, RES, seed=0)
    fake, caps = shapes_uint8(6, RES, seed=5)
    fake = (fake.int() * 3 // 4 + 20).to(torch.uint8)  # a darker, shifted set
    net = load_inception(inception_file)
    return real, fake, inception_features(net, real, 4), inception_features(net, fake, 5)


# ----------------------------------------------------------------------------------------------------------------
# The numbers
# ----------------------------------------------------------------------------------------------------------------


def test_fid_kid_equal_torchmetrics_on_the_same_images_and_weights(inception_file, sets):
    from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake, fr, ff = sets
    ours = M.fid(ff, M.stats(fr))
    ours_feats = M.fid(ff, {"features": fr})
    lib = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=inception_file, antialias=False)
    lib.update(real, real=True)
    lib.update(fake, real=False)
    want = float(lib.compute())
    assert want > 0
    assert ours == pytest.approx(want, rel=1e-3) and ours_feats == pytest.approx(want, rel=1e-3)

    kid = M.kid(ff, fr, subsets=20, subset_size=4, seed=7)
    # torchmetrics' KID takes no weights path: its own Inception module with the file's weights
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=inception_file, antialias=False)
    klib = KernelInceptionDistance(feature=net, subsets=20, subset_size=4)
    klib.update(real, real=True)
    klib.update(fake, real=False)
    torch.manual_seed(7)
    km, ks = klib.compute()
    assert kid["mean"] == pytest.approx(float(km), rel=1e-3) and kid["std"] == pytest.approx(float(ks), rel=1e-3)
    # KID's subsets come from a forked RNG: the caller's global state is untouched
    state = torch.get_rng_state()
    M.kid(ff, fr, subsets=3, subset_size=4)
    assert torch.equal(state, torch.get_rng_state())


def test_fid_of_a_set_against_itself_is_zero(sets):
    f = sets[2]
    st = M.stats(f)
    # ~0: with 6 images the 2048-d covariance has rank 5, and the eigenvalue form of the matrix square root
    # (torchmetrics') leaves ~1e-5 x its trace; with more images than dimensions it is ~1e-14 (next test)
    assert abs(M.fid(f, st)) < 1e-4 * float(np.trace(st["sigma"]))
    g = np.random.default_rng(0).standard_normal((600, 64))
    assert abs(M.fid(g, M.stats(g))) < 1e-10


def test_a_known_shift_moves_fid_as_the_closed_form_says():
    """FID = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), with scipy's sqrtm as the reference."""
    rng = np.random.default_rng(0)
    d, n = 32, 400
    a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3
    st = M.stats(a)
    # a pure shift: the covariances are equal, FID is the squared distance of the means
    delta = rng.standard_normal(d)
    assert M.fid(a + delta, st) == pytest.approx(float(delta @ delta), rel=1e-6)
    # shift + rescale: against scipy's closed form on the two sets' statistics
    b = 1.7 * a + delta
    sb = M.stats(b)
    covmean = scipy.linalg.sqrtm(st["sigma"] @ sb["sigma"]).real
    want = float(((st["mu"] - sb["mu"]) ** 2).sum() + np.trace(st["sigma"] + sb["sigma"] - 2 * covmean))
    assert M.fid(b, st) == pytest.approx(want, rel=1e-6)
    # and the same from cached statistics alone (mu, sigma: the .npz path, no features)
    assert M.fid(b, {"n": st["n"], "mu": st["mu"], "sigma": st["sigma"]}) == pytest.approx(want, rel=1e-6)


def test_clip_score_equals_torchmetrics_clipscore(clip_dir):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    from pixart_ds.eval.clip import clip_pair_scores, load_clip

    imgs, caps = shapes_uint8(8, RES, seed=0)
    model, proc = load_clip(clip_dir)
    per_pair = clip_pair_scores(model, proc, imgs, caps, batch_size=3)
    lib = CLIPScore(model_name_or_path=lambda: (CLIPModel.from_pretrained(clip_dir),
                                               CLIPProcessor.from_pretrained(clip_dir)))
    lib.update(list(imgs), caps)
    want = float(lib.compute())
    assert want > 0  # the tiny CLIP's seed gives a positive mean: the clamp does not hide the comparison
    assert M.clip_score(per_pair) == pytest.approx(want, rel=1e-5)
    # per pair, against the metric's own (unclamped) running sum
    for i in range(3):
        one = CLIPScore(model_name_or_path=lambda: (CLIPModel.from_pretrained(clip_dir),
                                                   CLIPProcessor.from_pretrained(clip_dir)))
        one.update([imgs[i]], [caps[i]])
        assert per_pair[i] == pytest.approx(float(one.score), rel=1e-5, abs=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# `pixart-ds eval` as a user runs it
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_t5_dir, tiny_vae_dir, inception_file, clip_dir):
    """A tiny random PixArt ("ours"), embedded-dataset prompts, a raw-MDS reference, and the common arguments."""
    from pixart_ds.data import convert as dconv
    from pixart_ds.data import synthetic
    from pixart_ds.model.pixart import build_model
    from pixart_ds.model.weights import save_ours

    base = tmp_path_factory.mktemp("evaljob")
    cfg = config.from_dict({"model": {"preset": "tiny", "caption_channels": 32, "attention": "sdpa"},
                            "data": {"resolution": RES}})
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ckpt = str(base / "ours")
    save_ours(ckpt, config.to_dict(cfg)["model"], model.state_dict(), RES)
    prompts = base / "prompts.txt"
    prompts.write_text("\n".join(synthetic.caption(synthetic.attributes(i, 3)) for i in range(5)) + "\n")
    ref = str(base / "ref_raw")
    dconv.synthetic(num_samples=8, resolution=RES, seed=0, out=ref)
    args = ["--ckpt", ckpt, "--prompts", prompts, "--reference", ref, "--inception", inception_file, "--clip",
            clip_dir, "--num-images", N_IMAGES, "--shard-size", SHARD, "--batch-size", 2, "--steps", 4,
            "--vae", tiny_vae_dir, "--text-encoder", tiny_t5_dir, "--cache-dir", base / "cache",
            "--kid-subsets", 10, "--kid-subset-size", 4, "--grid-images", 4]
    return {"base": base, "args": [str(a) for a in args], "ref": ref, "prompts": str(prompts), "ckpt": ckpt}


def _env(extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                         "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def _eval_cmd(job, out, ranks=1):
    cli = ["-m", "pixart_ds.cli", "eval", *job["args"], "--out", str(out)]
    if ranks == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *cli]


def _record(out):
    with open(os.path.join(out, "eval.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def one_rank(job):
    out = job["base"] / "one"
    p = subprocess.run(_eval_cmd(job, out), capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "pixart-ds eval: FID " in p.stdout and "images/s" in p.stderr
    return str(out)


def test_eval_writes_its_record_and_equals_the_library_on_the_saved_images(one_rank, job, inception_file, clip_dir):
    from PIL import Image
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    from pixart_ds.data import synthetic

    rec = _record(one_rank)
    m = rec["metrics"]
    assert set(m) >= {"fid", "kid", "clip_score", "judge"} and m["num_images"] == N_IMAGES
    assert rec["sampling"]["sampler"] == "dpm-solver" and rec["sampling"]["steps"] == 4
    assert rec["fid_kid"]["reference"]["n"] == 8 and rec["prompts"]["judged"] is True
    for f in ("eval.md", "grid.png"):
        assert os.path.isfile(os.path.join(one_rank, f))
    assert "| FID |" in open(os.path.join(one_rank, "eval.md")).read()
    pngs = sorted(os.listdir(os.path.join(one_rank, "images")))
    assert pngs == [f"{i:06d}.png" for i in range(N_IMAGES)]

    # the library's own computation on the same PNGs, the same reference images and the same weights
    fake = torch.stack([torch.from_numpy(np.array(Image.open(os.path.join(one_rank, "images", p)).convert("RGB")))
                        .permute(2, 0, 1) for p in pngs])
    real = torch.stack([torch.from_numpy(np.asarray(synthetic.render(synthetic.attributes(i, 0), RES)))
                        .permute(2, 0, 1) for i in range(8)])
    lib = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=inception_file, antialias=False)
    lib.update(real, real=True)
    lib.update(fake, real=False)
    assert m["fid"] == pytest.approx(float(lib.compute()), rel=1e-3)
    prompts = open(job["prompts"]).read().splitlines()
    caps = [prompts[i % len(prompts)] for i in range(N_IMAGES)]
    cs = CLIPScore(model_name_or_path=lambda: (CLIPModel.from_pretrained(clip_dir),
                                              CLIPProcessor.from_pretrained(clip_dir)))
    cs.update(list(fake), caps)
    assert m["clip_score"] == pytest.approx(float(cs.compute()), rel=1e-5, abs=1e-6)
    judged = [synthetic.judge(Image.open(os.path.join(one_rank, "images", p)), c)["ok"] for p, c in zip(pngs, caps)]
    assert m["judge"]["alignment"] == sum(judged) / N_IMAGES


def test_two_ranks_give_the_same_numbers_as_one(one_rank, job):
    out = job["base"] / "two"
    p = subprocess.run(_eval_cmd(job, out, ranks=2), capture_output=True, text=True, env=_env(), cwd=REPO,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    one, two = _record(one_rank), _record(out)
    assert two["sharding"]["world_size"] == 2
    by = two["sharding"]["by_rank"]
    assert sorted(by["0"]["computed"] + by["1"]["computed"]) == list(range(N_IMAGES // SHARD))
    assert by["0"]["computed"] and by["1"]["computed"]  # both ranks worked
    assert two["metrics"] == one["metrics"]
    for k in range(N_IMAGES // SHARD):
        a = np.load(os.path.join(one_rank, "features", f"shard_{k:05d}.npz"))
        b = np.load(os.path.join(out, "features", f"shard_{k:05d}.npz"))
        for key in a.files:
            assert np.array_equal(a[key], b[key]), (k, key)


def _shard_files(d):
    """Finished shards (not the hidden temporary files of a shard being written)."""
    return sorted(f for f in os.listdir(d) if f.startswith("shard_") and f.endswith(".npz"))


def test_killed_halfway_and_rerun_it_finishes_without_redoing_finished_shards(one_rank, job):
    out = job["base"] / "killed"
    shard_dir = out / "features"
    proc = subprocess.Popen(_eval_cmd(job, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                            cwd=REPO, start_new_session=True)
    t0 = time.time()
    done = []
    while time.time() - t0 < 300 and proc.poll() is None:
        done = _shard_files(shard_dir) if shard_dir.is_dir() else []
        if len(done) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _shard_files(shard_dir)
    assert 2 <= len(done) < N_IMAGES // SHARD, f"killed too late or too early: {done}"
    assert not os.path.exists(out / "eval.json")
    mtimes = {f: os.stat(shard_dir / f).st_mtime_ns for f in done}
    p = subprocess.run(_eval_cmd(job, out), capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    rec = _record(out)
    by = rec["sharding"]["by_rank"]["0"]
    assert by["reused"] == [int(f[6:11]) for f in done]
    assert sorted(by["reused"] + by["computed"]) == list(range(N_IMAGES // SHARD))
    assert {f: os.stat(shard_dir / f).st_mtime_ns for f in done} == mtimes  # not rewritten
    assert rec["metrics"] == _record(one_rank)["metrics"]


def test_reference_statistics_are_cached_and_reused(one_rank, job):
    cache = job["base"] / "cache"
    files = [f for f in os.listdir(cache) if f.startswith("ref-") and f.endswith(".npz")]
    assert len(files) == 1  # one reference, computed by the first run and reused by the others
    z = np.load(cache / files[0])
    assert int(z["n"]) == 8 and int(z["resolution"]) == RES and z["features"].shape == (8, 2048)
    rec = _record(one_rank)
    assert rec["fid_kid"]["reference"]["path"] == str(cache / files[0])


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2
# ----------------------------------------------------------------------------------------------------------------


def test_bad_input_is_one_line(job, tmp_path, capsys):
    from pixart_ds import cli

    def err(*extra, args=None):
        a = list(args if args is not None else job["args"]) + ["--out", str(tmp_path / "o"), "--no-progress",
                                                                 *map(str, extra)]
        rc = cli.main(["eval", *a])
        e = capsys.readouterr().err.strip()
        assert rc == 2 and len(e.splitlines()) == 1, e
        assert e.startswith("pixart-ds eval: error: ")
        return e

    def replace(flag, value):
        a = list(job["args"])
        a[a.index(flag) + 1] = str(value)
        return a

    e = err(args=replace("--inception", tmp_path / "missing.pth"))
    assert "Inception-v3 weights file not found" in e and "missing.pth" in e
    ref256 = str(tmp_path / "ref256")
    from pixart_ds.data import convert as dconv

    dconv.synthetic(num_samples=2, resolution=128, seed=0, out=ref256)
    capsys.readouterr()
    e = err(args=replace("--reference", ref256))
    assert "is 128x128 but the evaluation generates 64x64" in e and "ref256" in e
    bad = tmp_path / "prompts.txt"
    bad.write_text("a red circle\n\na blue square\n")
    e = err(args=replace("--prompts", bad))
    assert f"{bad}:2: empty line" in e
    assert not os.path.exists(tmp_path / "o" / "eval.json")
