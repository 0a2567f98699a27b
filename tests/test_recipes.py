"""Every recipe loads, and the stage recipes encode the paper's Table 4 and the official optimizer settings."""
import glob
import os

import pytest

from pixart_ds import config

RECIPES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "recipes", "*.yaml"))
                 + glob.glob(os.path.join(os.path.dirname(__file__), "..", "recipes", "gpu", "*.yaml")))
NAMES = {os.path.basename(p)[:-5]: p for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.basename(p))
def test_every_recipe_loads(path):
    cfg = config.load(path)
    assert cfg.name == os.path.basename(path)[:-5]


def test_the_stage_recipes_exist():
    for name in ("stage1_imagenet256", "stage2_sam256", "stage3_hq256", "stage3_hq512", "stage3_hq1024",
                 "ablation_adaln", "ablation_adaln_single", "demo"):
        assert name in NAMES, f"recipes/{name}.yaml is missing"


# Paper Table 4 (Appendix A.5): resolution, steps, global batch (per-GPU x GPUs), lr.
TABLE4 = {
    "stage1_imagenet256": (256, 300_000, 128 * 8, 2e-5),
    "stage2_sam256": (256, 150_000, 178 * 64, 2e-5),
    "stage3_hq256": (256, 90_000, 178 * 64, 2e-5),
    "stage3_hq512": (512, 100_000, 40 * 64, 2e-5),
    "stage3_hq1024": (1024, 16_000, 12 * 32, 2e-5),
}


@pytest.mark.parametrize("name", sorted(TABLE4))
def test_stage_recipes_encode_table4(name):
    cfg = config.load(NAMES[name])
    res, steps, batch, lr = TABLE4[name]
    assert (cfg.data.resolution, cfg.train.total_steps, cfg.train.global_batch_size, cfg.train.lr) == (res, steps, batch, lr)
    # The paper's per-GPU batch is the micro batch at the paper's GPU count.
    assert batch % cfg.train.micro_batch_size == 0
    # Official optimizer settings (PixArt-alpha configs): AdamW, wd 0.03, eps 1e-10, clip 0.01, 1,000 warm-up steps,
    # EMA 0.9999, caption dropout 0.1, gradient checkpointing.
    t = cfg.train
    assert (t.weight_decay, t.adam_eps, t.grad_clip, t.warmup_steps, t.ema_decay) == (0.03, 1e-10, 0.01, 1000, 0.9999)
    assert cfg.data.caption_dropout == 0.1 and cfg.model.grad_checkpointing
    assert cfg.model.preset == "PixArt-XL/2" and cfg.model.depth == 28 and cfg.model.hidden_size == 1152
    assert config.pe_interpolation(cfg) == {256: 0.5, 512: 1.0, 1024: 2.0}[res]


def test_stage_wiring():
    s1, s2 = config.load(NAMES["stage1_imagenet256"]), config.load(NAMES["stage2_sam256"])
    assert (s1.model.condition, s1.model.adaln) == ("class", "block")
    assert (s2.model.condition, s2.model.adaln) == ("text", "single")
    assert s2.train.init_from == s1.run_dir and s2.train.init_reparam_t == 500
    chain = ["stage2_sam256", "stage3_hq256", "stage3_hq512", "stage3_hq1024"]
    for prev, nxt in zip(chain, chain[1:]):
        assert config.load(NAMES[nxt]).train.init_from == config.load(NAMES[prev]).run_dir
    # Multi-aspect buckets only at 512 and 1024 (paper A.5).
    assert [config.load(NAMES[n]).model.multi_scale for n in chain] == [False, False, True, True]
    hq = config.load(NAMES["stage3_hq256"])
    assert [(s.name, s.proportion) for s in hq.data.sources] == [("journeydb", 4.0), ("internal", 10.0)]


def test_ablation_recipes_differ_only_in_adaln():
    a, b = config.load(NAMES["ablation_adaln"]), config.load(NAMES["ablation_adaln_single"])
    assert (a.model.adaln, b.model.adaln) == ("block", "single")
    assert config.diff(a, b) == ["model.adaln", "name", "run_dir"]


# Keys a GPU variant (recipes/gpu/<stage>_gpu.yaml) may change: how fast the same training runs, never what it trains.
SPEED_KEYS = {"name", "model.grad_checkpointing", "model.grad_checkpointing_every", "model.compile", "model.attention",
              "train.micro_batch_size", "train.adam", "train.overlap_comm", "train.reduce_bucket_size",
              "train.allgather_bucket_size", "data.pin_memory"}


@pytest.mark.parametrize("stage", sorted(TABLE4))
def test_gpu_variants_differ_only_in_speed_switches(stage):
    base, gpu = config.load(NAMES[stage]), config.load(NAMES[f"{stage}_gpu"])
    changed = set(config.diff(base, gpu))
    assert changed <= SPEED_KEYS and changed - {"name"}, changed
    # The paper's GPU count still gives the same global batch with a whole accumulation (no lowered micro batch).
    gpus = {"stage1_imagenet256": 8, "stage3_hq1024": 32}.get(stage, 64)
    micro, accum = config.batch_plan(gpu, gpus)
    assert micro == gpu.train.micro_batch_size and micro * accum * gpus == base.train.global_batch_size
    assert config.adam_impl(gpu) == "torch-fused"
