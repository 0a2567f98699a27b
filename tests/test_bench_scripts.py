"""Each benchmark script runs end to end in a subprocess at a tiny size and writes its reports.

These prove the scripts work (arguments, the production train_step path, report files, error messages); they
never assert timings.
"""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", "model.preset=tiny", "--set", "data.resolution=64", "--set", "model.caption_channels=32",
        "--set", "model.max_text_tokens=8", "--cpu-preset", "tiny", "--cpu-batch", "2", "--warmup", "1",
        "--steps", "2", "--no-progress"]


def run(script, *args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    return p


def _one(folder, suffix):
    files = [f for f in os.listdir(folder) if f.endswith(suffix)]
    assert len(files) == 1, files
    return os.path.join(folder, files[0])


@pytest.fixture(scope="module")
def throughput_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    # Two recipes: one process each (class-conditional stage 1 and the multi-scale 512 px stage).
    p = run("throughput.py", "recipes/stage1_imagenet256.yaml", "recipes/stage3_hq512.yaml", *TINY, "--out", out)
    assert p.returncode == 0, p.stdout + p.stderr
    return out


def test_throughput_writes_reports(throughput_out):
    names = sorted(os.listdir(throughput_out))
    assert any(n.startswith("stage1_imagenet256_cpu-") and n.endswith(".md") for n in names), names
    assert any(n.startswith("stage3_hq512_cpu-") and n.endswith(".json") for n in names), names
    for path in [os.path.join(throughput_out, n) for n in names if n.endswith(".json")]:
        rec = json.load(open(path))
        assert rec["schema"] == "pixart_ds.throughput/1"
        r = rec["results"]
        assert r["images_per_s_per_device"] > 0 and r["loss"]["finite"]
        assert r["mfu"] is None and r["mfu_vs_measured_matmul"] > 0  # no vendor peak for a CPU
        assert rec["measure"]["timed_steps"] == 2 and rec["measure"]["micro_batch_size"] == 2
        assert rec["config"]["model"]["preset"] == "tiny" and rec["config"]["train"]["global_batch_size"] == 2
        assert rec["flops_per_image"]["train"] > 0
        md = open(path[:-5] + ".md").read()
        for needle in ("images/s per device", "Synthetic random batches", "Resolved config", "No GPU: measured with model preset tiny",
                       rec["hardware"]["name"], "torch"):
            assert needle in md, needle
    ms = json.load(open(next(os.path.join(throughput_out, n) for n in names
                             if n.startswith("stage3") and n.endswith(".json"))))
    assert ms["config"]["model"]["multi_scale"] is True and ms["config"]["model"]["condition"] == "text"


def test_throughput_bad_recipe_is_one_line_error(tmp_path):
    p = run("throughput.py", "recipes/nope.yaml", "--out", tmp_path)
    assert p.returncode == 2 and "recipes/nope.yaml: recipe file not found" in p.stderr


def test_gpu_days_script(throughput_out, tmp_path):
    # The tiny CPU measurements do not stand for PixArt-XL/2: a projection onto an A100 at a given MFU.
    p = run("gpu_days.py", "--results", throughput_out, "--hardware", "a100", "--mfu", "0.4", "--out", tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    md = open(_one(tmp_path, ".md")).read()
    assert "projected at MFU 40%" in md and "| 12.0% |" in md and "6,250" in md
    assert open(_one(tmp_path, ".png"), "rb").read()[:4] == b"\x89PNG"
    assert json.load(open(_one(tmp_path, ".json")))["schema"] == "pixart_ds.gpu_days/1"
    p = run("gpu_days.py", "--mfu", "2", "--out", tmp_path)
    assert p.returncode == 2 and "--mfu 2.0: must be in (0, 1]" in p.stderr


def test_vs_reference_script(tmp_path):
    p = run("vs_reference.py", "--preset", "tiny", "--caption-channels", 32, "--text-tokens", 8, "--resolution", 64,
            "--batch", 2, "--repeats", 2, "--out", tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    rec = json.load(open(_one(tmp_path, ".json")))
    assert rec["schema"] == "pixart_ds.vs_reference/1"
    assert rec["ratio_time"] > 0 and len(rec["times_s"]["ours"]) == 2 and rec["first_in_round"] == ["ours",
                                                                                                     "diffusers"]
    assert rec["peak_step_bytes"]["ours"] > 0 and rec["peak_step_bytes"]["diffusers"] > 0
    # Same config and weights: the two models compute the same function.
    assert rec["parity"]["max_abs_diff"] <= 1e-4 * max(1.0, rec["parity"]["max_abs_ref"])
    md = open(_one(tmp_path, ".md")).read()
    assert "ours / diffusers" in md and rec["hardware"]["name"] in md


def _ablation_record(out):
    rec = json.load(open(next(out / f for f in os.listdir(out)
                              if f.startswith("ablation_adaln_cpu") and f.endswith(".json"))))
    md = next(open(out / f).read() for f in os.listdir(out) if f.startswith("ablation_adaln_cpu") and f.endswith(".md"))
    assert any(f.startswith("ablation_adaln_cpu") and f.endswith(".png") for f in os.listdir(out))
    return rec, md


def test_ablation_params_and_throughput(tmp_path):
    """Parts 1-2 (what gpu_check.sh runs): parameter counts, and throughput.py on both ablation recipes."""
    tp = ["--cpu-preset=tiny", "--cpu-batch=2", "--steps=1", "--warmup=1", "--set=data.resolution=64",
          "--set=model.caption_channels=32", "--no-ema"]
    out = tmp_path / "out"
    p = run("ablation_adaln.py", "--skip-training", *[f"--throughput-arg={x}" for x in tp], "--out", out)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rec, md = _ablation_record(out)
    assert rec["params"]["single"]["total"] == 610_856_096  # PixArt-XL/2, adaLN-single (paper: 611M)
    assert rec["params"]["block"]["total"] > rec["params"]["single"]["total"]
    for v in ("block", "single"):
        assert rec["throughput"][v]["results"]["images_per_s_per_device"] > 0
        assert rec["throughput"][v]["config"]["model"]["adaln"] == v
    assert "| ours | 828,494,240 | 610,856,096 |" in md and "833M" in md and "images/s per device" in md
    assert "Skipped (--skip-training)" in md
    # The throughput reports of both recipes are kept beside the ablation report.
    assert any(f.startswith("ablation_adaln_single-throughput_") for f in os.listdir(out))


def test_ablation_training(tmp_path):
    """Part 3: a two-step training of both variants through the trainer, loss curves, sampling and the judge."""
    from pixart_ds.testing import make_tiny_vae

    vae = make_tiny_vae(str(tmp_path / "vae"))
    out = tmp_path / "out"
    p = run("ablation_adaln.py", "--skip-throughput", "--steps", 2, "--batch", 4, "--samples", 16, "--depth", 2,
            "--hidden", 48, "--heads", 3, "--eval-prompts", 2, "--sample-steps", 1, "--resolution", 64,
            "--vae", vae, "--work", tmp_path / "work", "--out", out)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rec, md = _ablation_record(out)
    for v in ("block", "single"):
        run_ = rec["training"]["runs"][v]
        assert [s for s, _ in run_["loss"]] == [1, 2] and run_["recipe"]["model"]["adaln"] == v
        assert set(run_["alignment"]) == {"seen", "held_out"} and run_["alignment"]["seen"]["n"] == 1
    # Same seed, data and steps: the two recipes differ only in model.adaln (and their names / run folders).
    rb, rs = (dict(rec["training"]["runs"][v]["recipe"]) for v in ("block", "single"))
    for r in (rb, rs):
        r["model"] = {k: x for k, x in r["model"].items() if k != "adaln"}
        r.pop("run_dir"), r.pop("name")
    assert rb == rs
    assert "## 3. Short training" in md and "alignment, held-out prompts" in md


def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.sh as far as a CPU goes: its parts in order within the deadline (import check, the
    gpu_mfu.py dry run of two rows, pytest -m gpu, the GPU-days report of the measured configs), the summary and
    the records under $OUT; the repository's results stay untouched."""
    before = set(os.listdir(os.path.join(REPO, "benchmarks", "results")))
    p = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), "--dry-run"], capture_output=True,
                       text=True, timeout=900, cwd=REPO,
                       env=dict(os.environ, OUT=str(tmp_path), GPU_KIT=str(tmp_path / "no-kit"),
                                CUDA_VISIBLE_DEVICES=""))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = tmp_path / "benchmarks" / "results"
    names = sorted(os.listdir(res))
    assert "gpu_check.log" in names and any(n.startswith("gpu_mfu_cpu-") and n.endswith(".jsonl") for n in names)
    summary = open(res / next(n for n in names if n.startswith("gpu_check_") and n.endswith(".md"))).read()
    for part in ("import check: ok", "gpu_mfu (dry run): ok", "pytest -m gpu: ok"):
        assert part in summary, summary
    log = open(res / "gpu_check.log").read()
    assert log.index("START import check") < log.index("START gpu_mfu") < log.index("START pytest -m gpu")
    assert "done: all parts passed" in log
    assert set(os.listdir(os.path.join(REPO, "benchmarks", "results"))) == before  # a dry run writes nothing there
