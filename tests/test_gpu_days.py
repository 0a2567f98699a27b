"""GPU-days: fed the throughput that the paper's own V100-days imply, the report reproduces Table 4 and 753 A100-days."""
import json
import os

import pytest

from pixart_ds import config
from pixart_ds.bench import gpu_days as gd
from pixart_ds.model.flops import image_flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = [p.recipe for p in gd.PAPER_TABLE4]


def _recipes():
    return [(name, config.load(os.path.join(REPO, "recipes", f"{name}.yaml"))) for name in STAGES]


def _record(name, cfg, ips, slug="v100", peak=125.0, hw_name="Tesla V100-SXM2-32GB"):
    """A throughput JSON as benchmarks/throughput.py writes it (only the fields gpu_days reads)."""
    f = image_flops(cfg)
    return {
        "schema": "pixart_ds.throughput/1", "recipe_name": name, "stage": cfg.stage, "timestamp": "2026-11-26T00:00:00",
        "hardware": {"slug": slug, "name": hw_name, "peak_tflops": peak},
        "config": config.to_dict(cfg), "report": f"benchmarks/results/{name}_{slug}.md",
        "results": {"images_per_s_per_device": ips, "mfu": ips * f.train / (peak * 1e12) if peak else None},
    }


def test_recipes_encode_table4():
    for (name, cfg), paper in zip(_recipes(), gd.PAPER_TABLE4):
        assert cfg.train.total_steps == paper.steps, name
        assert cfg.train.global_batch_size == paper.global_batch, name
        assert cfg.data.resolution == paper.resolution, name
        assert gd.stage_images(cfg) == paper.images


def test_paper_throughput_reproduces_table4_and_753():
    recipes = _recipes()
    records = [_record(n, c, p.implied_images_per_s_per_gpu) for (n, c), p in zip(recipes, gd.PAPER_TABLE4)]
    plan = gd.plan(recipes, records)
    assert plan["hardware"] == "v100"
    for row, paper in zip(plan["rows"], gd.PAPER_TABLE4):
        assert row["source"] == "measured"
        assert row["gpu_days"] == pytest.approx(paper.v100_days, rel=1e-9)  # Table 4, V100-days
        # On a V100 the paper rule is exactly V100-days / 2.2.
        assert row["a100_days_paper_rule"] == pytest.approx(paper.v100_days / 2.2, rel=1e-9)
        # The FLOP rule converts at the peak ratio instead (125 vs 312 TFLOP/s).
        assert row["a100_days"] == pytest.approx(paper.v100_days * 125 / 312, rel=1e-9)
    t = plan["totals"]
    assert t["gpu_days"] == pytest.approx(1656)
    assert round(t["a100_days_paper_rule"]) == 753
    assert round(t["paper_a100_days"]) == 753
    assert t["a100_days_paper_rule_percent_of_sd15"] == pytest.approx(12.05, abs=0.01)
    md = gd.render_markdown(plan)
    assert "| **total** |" in md and "**1,656**" in md and "752.7" in md and "| 12.0% |" in md and "| 10.8% |" in md


def test_missing_stage_is_projected_and_labelled(tmp_path):
    recipes = _recipes()
    # Only stage 2 measured, on an H100 at an MFU of 40%.
    cfg2 = dict(recipes)["stage2_sam256"]
    ips = 0.40 * 989e12 / image_flops(cfg2).train
    plan = gd.plan(recipes, [_record("stage2_sam256", cfg2, ips, slug="h100", peak=989.0, hw_name="NVIDIA H100")])
    rows = {r["recipe"]: r for r in plan["rows"]}
    assert rows["stage2_sam256"]["source"] == "measured"
    assert rows["stage1_imagenet256"]["source"] == "projected"
    assert plan["projection_mfu"] == pytest.approx(0.40)
    # Projected throughput follows the FLOPs: 1024 px costs ~22x a 256 px text image per image.
    r1024 = rows["stage3_hq1024"]
    assert r1024["images_per_s_per_gpu"] == pytest.approx(0.40 * 989e12 / image_flops(dict(recipes)["stage3_hq1024"]).train)
    md = gd.render_markdown(plan)
    assert "projected at MFU 40%" in md
    # A measured row carries no projection label.
    s2_line = next(line for line in md.splitlines() if "stage2_sam256" in line)
    assert "projected" not in s2_line
    png = tmp_path / "chart.png"
    gd.plot(plan, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_measurement_of_another_model_size_does_not_count_for_the_stage():
    recipes = _recipes()
    name, cfg = recipes[1]
    small = config.replace(cfg, **{"model.preset": "PixArt-S/2", "model.depth": 12, "model.hidden_size": 384,
                                   "model.num_heads": 6})
    rec = _record(name, small, 50.0, slug="cpu-2core", peak=None, hw_name="2-core CPU")
    plan = gd.plan(recipes, [rec])
    assert all(r["source"] == "missing" for r in plan["rows"])
    assert "no measurement" in gd.render_markdown(plan)


def test_load_records_skips_other_json(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"schema": "pixart_ds.throughput/1", "x": 1}))
    (tmp_path / "b.json").write_text(json.dumps({"schema": "pixart_ds.vs_reference/1"}))
    assert gd.load_records([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == [
        {"schema": "pixart_ds.throughput/1", "x": 1}]
