"""ZeRO-2 correctness: 2 DeepSpeed ranks (fp32, ZeRO stage 2, gradient accumulation 2) against one plain-PyTorch
process with torch.optim.AdamW on the same global batches, same noise and timesteps: per-step losses agree to
1e-5 over 20 steps. Also the DeepSpeed config derivation and the weight-decay parameter groups.

Run as a script (`python -m torch.distributed.run --nproc_per_node 2 tests/test_zero.py --worker OUT.json`) it is
the DeepSpeed side of the parity check.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20
WORLD = 2


def parity_cfg():
    from pixart_ds import config as C

    return C.from_dict({
        "model": {"preset": "tiny", "caption_channels": 32, "max_text_tokens": 8, "attention": "math"},
        "data": {"resolution": 64, "caption_dropout": 0.0},
        "train": {"global_batch_size": 8, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 5,
                  "weight_decay": 0.03, "adam_eps": 1e-8, "grad_clip": 0.05, "precision": "fp32", "zero_stage": 2,
                  "torch_adam": True, "seed": 0},
    }, "test_zero")


def global_batch(step: int, cfg) -> dict:
    """Deterministic global batch [8, ...] for `step`: latents, T5-like features, masks, a few dropped captions."""
    g = torch.Generator().manual_seed(1000 + step)
    n, L, D = cfg.train.global_batch_size, cfg.model.max_text_tokens, cfg.model.caption_channels
    lengths = torch.randint(1, L + 1, (n,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    return {
        "latent": torch.randn(n, 4, 8, 8, generator=g) * 0.8,
        "text_emb": torch.randn(n, L, D, generator=g) * mask[..., None],
        "text_mask": mask,
        "drop": torch.rand(n, generator=g) < 0.25,  # exercises the null-caption path deterministically
        "sample_idx": torch.arange(step * n, (step + 1) * n),
    }


def rank_micro_batches(gb: dict, rank: int, world: int, micro: int) -> list[dict]:
    """Rank r gets the contiguous slice r of the global batch, cut into micro-batches."""
    per_rank = gb["latent"].shape[0] // world
    sl = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in gb.items()}
    return [{k: v[i:i + micro] for k, v in sl.items()} for i in range(0, per_rank, micro)]


def noise_generator(rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(12345 + rank)


def build(cfg):
    from pixart_ds.model.pixart import build_model

    torch.manual_seed(cfg.train.seed)
    return build_model(cfg)


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed side (runs under torch.distributed.run)
# ----------------------------------------------------------------------------------------------------------------


def _worker(out_path: str) -> None:
    from pixart_ds import config as C
    from pixart_ds.diffusion.schedule import Schedule
    from pixart_ds.dist import destroy, dist_env, init_distributed
    from pixart_ds.train import zero
    from pixart_ds.train.step import train_step

    cfg = parity_cfg()
    env = dist_env()
    init_distributed(env, timeout_s=120)
    engine = zero.initialize(build(cfg), cfg, env.world_size)
    micro, accum = C.batch_plan(cfg, env.world_size)
    assert (engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()) == (micro, accum) == (2, 2)
    sched = Schedule.from_config(cfg.diffusion)
    gen = noise_generator(env.rank)
    rows = []
    for step in range(STEPS):
        mbs = rank_micro_batches(global_batch(step, cfg), env.rank, env.world_size, micro)
        rows.append(train_step(engine, mbs, sched, cfg, gen))
    if env.rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    torch.distributed.barrier()
    # Tear gloo down before the interpreter does: left to exit-time destructors, its threads can abort the process
    # ("terminate called without an active exception") after the work is done.
    destroy()


# ----------------------------------------------------------------------------------------------------------------
# Plain PyTorch reference (this process)
# ----------------------------------------------------------------------------------------------------------------


def reference_losses(cfg) -> list[dict]:
    from pixart_ds.diffusion.losses import training_losses
    from pixart_ds.diffusion.schedule import Schedule
    from pixart_ds.train.step import model_inputs
    from pixart_ds.train.zero import param_groups, warmup_factor

    model = build(cfg)
    t = cfg.train
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=t.adam_betas, eps=t.adam_eps)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_factor(s, t.warmup_steps))
    sched = Schedule.from_config(cfg.diffusion)
    gens = [noise_generator(r) for r in range(WORLD)]
    micro = t.micro_batch_size
    rows = []
    for step in range(STEPS):
        gb = global_batch(step, cfg)
        opt.zero_grad(set_to_none=True)
        total, n = 0.0, 0
        for r in range(WORLD):
            for mb in rank_micro_batches(gb, r, WORLD, micro):
                x0 = mb["latent"]
                B = x0.shape[0]
                tt = sched.sample_timesteps(B, generator=gens[r])
                noise = torch.randn(x0.shape, generator=gens[r])
                x_t = sched.q_sample(x0, tt, noise)
                out = model(x_t, tt, **model_inputs(mb, cfg, torch.device("cpu"), torch.float32))
                loss = training_losses(out, x0, x_t, tt, noise, sched, cfg.model.pred_sigma)["loss"]
                # mean over the global batch = mean of its equal-size micro-batch means
                (loss.mean() / (t.global_batch_size // micro)).backward()
                total += loss.sum().item()
                n += B
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sch.step()
        rows.append({"loss": total / n, "grad_norm": float(gn), "lr": lr})
    return rows


def test_zero2_two_ranks_match_plain_pytorch(tmp_path):
    out = tmp_path / "ds.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
                        "--standalone", os.path.abspath(__file__), "--worker", str(out)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    ds = json.loads(out.read_text())
    torch.set_num_threads(1)
    ref = reference_losses(parity_cfg())
    assert len(ds) == len(ref) == STEPS
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(ds, ref)]
    print("max |loss diff| over %d steps: %.3g; losses %.5f -> %.5f" % (STEPS, max(diffs), ref[0]["loss"],
                                                                           ref[-1]["loss"]))
    assert max(diffs) < 1e-5, list(zip([r["loss"] for r in ds], [r["loss"] for r in ref]))
    for a, b in zip(ds, ref):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
        assert a["skipped"] == 0.0 and a["images"] == 8.0
    # the run really trains (the check is not vacuous) and clipping was active at least once
    assert ref[-1]["loss"] < ref[0]["loss"]
    assert any(r["grad_norm"] > parity_cfg().train.grad_clip for r in ref)


# ----------------------------------------------------------------------------------------------------------------
# Config derivation and parameter groups (no processes)
# ----------------------------------------------------------------------------------------------------------------


def test_ds_config_from_recipe():
    from pixart_ds import config as C
    from pixart_ds.train.zero import ds_config

    cfg = C.load(os.path.join(REPO, "recipes", "stage2_sam256.yaml"))
    d = ds_config(cfg, world_size=64)
    assert d["train_batch_size"] == 11392
    assert d["train_micro_batch_size_per_gpu"] * d["gradient_accumulation_steps"] * 64 == 11392
    assert d["gradient_clipping"] == 0.01  # explicit (DeepSpeed's default would be 1.0)
    assert d["bf16"] == {"enabled": True, "check_grad_overflow": True} and "fp16" not in d
    assert d["zero_optimization"]["stage"] == 2
    o = d["optimizer"]
    assert o["type"] == "AdamW" and o["params"]["lr"] == 2e-5 and o["params"]["eps"] == 1e-10
    assert o["params"]["weight_decay"] == 0.03 and o["params"]["torch_adam"] is False
    assert d["checkpoint"]["load_universal"] is False
    assert d["log_level"] == "warning" and d["steps_per_print"] >= 1
    d8 = ds_config(cfg, world_size=8)  # same global batch at another world size: more accumulation
    assert d8["train_batch_size"] == 11392
    assert d8["train_micro_batch_size_per_gpu"] * d8["gradient_accumulation_steps"] * 8 == 11392
    fp16 = ds_config(C.replace(cfg, **{"train.precision": "fp16"}), 64)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0 and "bf16" not in fp16
    fp32 = ds_config(C.replace(cfg, **{"train.precision": "fp32"}), 64)
    assert "fp16" not in fp32 and "bf16" not in fp32
    assert ds_config(cfg, 64, load_universal=True)["checkpoint"]["load_universal"] is True


@pytest.mark.parametrize("condition,adaln", [("text", "single"), ("class", "block")])
def test_param_groups_no_decay_on_bias_norm_embedding_tables(condition, adaln):
    from pixart_ds import config as C
    from pixart_ds.model.pixart import build_model
    from pixart_ds.train.zero import param_group_names

    cfg = C.from_dict({"model": {"preset": "tiny", "condition": condition, "adaln": adaln, "caption_channels": 32,
                                 "num_classes": 10}, "data": {"resolution": 64}})
    model = build_model(cfg)
    groups = param_group_names(model, 0.03)
    decay, no_decay = set(groups["decay"]), set(groups["no_decay"])
    assert decay.isdisjoint(no_decay)
    assert decay | no_decay == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(".weight") for n in decay)
    assert all(model.get_parameter(n).ndim >= 2 for n in decay)
    assert any(n.endswith(".bias") for n in no_decay)
    if adaln == "single":
        assert {"blocks.0.scale_shift_table", "final_layer.scale_shift_table"} <= no_decay
    if condition == "class":
        assert "y_embedder.embedding_table.weight" in no_decay
    else:
        assert "y_embedder.y_proj.fc1.weight" in decay
    assert "blocks.0.attn.qkv.weight" in decay and "x_embedder.proj.weight" in decay


def test_warmup_factor():
    from pixart_ds.train.zero import warmup_factor

    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit("usage: test_zero.py --worker OUT.json (under torch.distributed.run)")
