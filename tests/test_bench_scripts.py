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
