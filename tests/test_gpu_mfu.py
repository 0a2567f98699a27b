"""benchmarks/gpu_mfu.py's CPU dry run (every row of its matrix, tiny preset, 1 warm-up + 1 step each, through the
real loader, DeepSpeed engine, train_step and EMA in one process) and the GPU-days report built from its records:
one JSON line per row, the fields the report and the README rely on, the deadline's skip records, and the report's
refusals (mixed variants, a stage without a record). Never asserts timings."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, env=None, timeout=900):
    e = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=e)


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("mfu") / "records.jsonl"
    p = run("gpu_mfu.py", "--dry-run", "--out", out, "--deadline-s", 600, env={"PIXART_DS_COMMIT": "abc123"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, [json.loads(line) for line in open(out)]


def test_every_row_runs_and_records(dry):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import gpu_mfu

    _, recs = dry
    assert [r["name"] for r in recs] == [row[0] for row in gpu_mfu.MATRIX]  # one line per row, in priority order
    for r in recs:
        assert r["status"] == "ok", r
        res = r["results"]
        assert res["images_per_s_per_device"] > 0 and res["loss"]["finite"]
        assert res["mfu"] is None and res["mfu_vs_measured_matmul"] > 0  # a CPU has no vendor peak
        assert res["optimizer_step_ms"]["median"] > 0 and res["ema_ms"]["median"] > 0
        assert res["attention_ops"], r["name"]  # the attention ops that ran were recorded
        assert r["versions"]["pixart_ds_commit"] and r["hardware"]["slug"].startswith("cpu-")
        assert r["dry_run"] and "train.adam=torch-fused" in r["overrides"]
        assert r["measure"]["optimizer"] == "torch-fused" and r["config"]["model"]["preset"] == "tiny"
    by = {r["name"]: r for r in recs}
    assert by["stage2-no-recompute"]["measure"]["recompute_fraction"] == 0.0
    assert by["stage2-shipped"]["measure"]["recompute_fraction"] == 1.0
    assert by["stage3-1024-gpu"]["measure"]["recompute_fraction"] == 0.5  # every second block
    assert by["stage3-1024-attn-sdpa"]["measure"]["attention"] == "sdpa"
    assert by["stage2-gpu-compile"]["measure"]["compile"] == "blocks"
    assert by["stage2-gpu-compile"]["results"]["compile_s"] is not None
    assert by["stage2-gpu"]["recipe_name"] == "stage2_sam256" and by["stage2-gpu"]["variant"] == "gpu"
    assert by["stage3-512-shipped"]["config"]["model"]["multi_scale"] is True


def test_deadline_skips_rows_that_do_not_fit(tmp_path):
    out = tmp_path / "r.jsonl"
    p = run("gpu_mfu.py", "--dry-run", "--out", out, "--deadline-s", 1, "--only", "stage2-shipped",
            "stage2-gpu-compile")
    assert p.returncode == 0, p.stderr[-2000:]
    recs = [json.loads(line) for line in open(out)]
    assert [r["status"] for r in recs] == ["skipped", "skipped"] and "before the deadline" in recs[0]["reason"]
    p = run("gpu_mfu.py", "--dry-run", "--out", out, "--only", "nope")
    assert p.returncode == 2 and "unknown row(s) nope" in p.stderr


def test_gpu_days_report_from_records(dry, tmp_path):
    out, recs = dry
    p = run("gpu_days_report.py", out, "--out", tmp_path)
    assert p.returncode == 2 and "choose one with --variant" in p.stderr  # never mixes variants
    p = run("gpu_days_report.py", out, "--variant", "shipped", "--out", tmp_path)
    # the tiny dry-run model is not the recipes' PixArt-XL/2: every stage is missing, nothing is projected
    assert p.returncode == 2 and "every Table-4 stage must be measured" in p.stderr and "stage1_imagenet256" in p.stderr
    p = run("gpu_days_report.py", out, "--variant", "shipped", "--as-measured", "--out", tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    md = open(tmp_path / f"gpu_days_{recs[0]['hardware']['slug']}.md").read()
    assert "Variant **shipped**" in md and "753" in md and "abc123" in md and "projected" not in md
    data = json.load(open(tmp_path / f"gpu_days_{recs[0]['hardware']['slug']}.json"))
    assert [r["source"] for r in data["rows"]] == ["measured"] * 5
    two = tmp_path / "two.jsonl"
    lines = open(out).read().splitlines()
    other = json.loads(lines[0])
    other["hardware"] = dict(other["hardware"], slug="h200")
    two.write_text("\n".join(lines + [json.dumps(other)]) + "\n")
    p = run("gpu_days_report.py", two, "--variant", "shipped", "--out", tmp_path)
    assert p.returncode == 2 and "choose one with --card" in p.stderr
