"""The training core on a CUDA GPU (marked `gpu`: skipped without one): nccl init, bf16 and fp16 (dynamic loss
scaling) ZeRO-2 engines, the CUDA noise generator, EMA on the device, an injected NaN skipped, and an exact
save -> load -> continue round trip through checkpoint.save / zero.load."""
import os

import pytest
import torch

pytestmark = pytest.mark.gpu


def _cfg(precision, run_dir):
    from pixart_ds import config as C

    return C.from_dict({
        "run_dir": str(run_dir),
        "model": {"preset": "tiny", "caption_channels": 32, "max_text_tokens": 8},
        "data": {"resolution": 64, "caption_dropout": 0.0},
        "train": {"global_batch_size": 8, "micro_batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "grad_clip": 0.01,
                  "precision": precision, "torch_adam": True, "ema_decay": 0.9},
    }, "test_gpu_train")


def _batches(step, cfg):
    g = torch.Generator().manual_seed(step)
    n, L, D = cfg.train.micro_batch_size, cfg.model.max_text_tokens, cfg.model.caption_channels
    return [{"latent": torch.randn(n, 4, 8, 8, generator=g), "text_emb": torch.randn(n, L, D, generator=g),
             "text_mask": torch.ones(n, L, dtype=torch.long), "drop": torch.zeros(n, dtype=torch.bool)}
            for _ in range(2)]


class _NoLoader:
    """These steps take hand-made batches: the loader position a checkpoint holds is empty."""

    def state_dict(self):
        return {}

    def load_state_dict(self, d):
        pass


@pytest.fixture(scope="module")
def device():
    from pixart_ds.dist import destroy, dist_env, init_distributed

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(k, None)
    dev = init_distributed(dist_env(), timeout_s=120)
    assert dev.type == "cuda" and torch.distributed.get_backend() == "nccl"
    yield dev
    destroy()


def _engine(cfg, device):
    from pixart_ds.model.pixart import build_model
    from pixart_ds.train import zero
    from pixart_ds.train.ema import EMA

    torch.manual_seed(0)
    model = build_model(cfg)
    ema = EMA(model, cfg.train.ema_decay)
    model.to(device)
    ema.params = {k: v.to(device) for k, v in ema.params.items()}
    ema.buffers = {k: v.to(device) for k, v in ema.buffers.items()}
    return zero.initialize(model, cfg, 1), ema


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_steps_nan_skip_and_exact_resume(device, tmp_path, precision):
    from pixart_ds.diffusion.schedule import Schedule
    from pixart_ds.train import checkpoint as ck
    from pixart_ds.train import zero
    from pixart_ds.train.state import RunState, TrainState, set_rng_state
    from pixart_ds.train.step import train_step

    cfg = _cfg(precision, tmp_path / "run")
    engine, ema = _engine(cfg, device)
    assert zero.engine_dtype(engine) == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    sched = Schedule.from_config(cfg.diffusion)
    gen = torch.Generator(device=device).manual_seed(1)
    outs = []
    for s in range(1, 9):
        out = train_step(engine, _batches(s, cfg), sched, cfg, gen)
        if not out["skipped"]:
            ema.update(engine.module)
        outs.append(out)
    applied = [o for o in outs if not o["skipped"]]
    assert len(applied) >= 5 and all(torch.isfinite(torch.tensor(o["loss"])) for o in outs)
    assert all(o["nonfinite"] == 0.0 for o in outs)  # fp16 loss-scale search skips are not "non-finite"
    if precision == "fp16":
        assert "loss_scale" in outs[-1]
    assert next(iter(ema.params.values())).device.type == "cuda"

    # injected NaN: skipped, counted as non-finite, weights untouched
    before = {k: v.detach().clone() for k, v in engine.module.named_parameters()}
    bad = train_step(engine, _batches(99, cfg), sched, cfg, gen, poison_loss=True)
    assert bad["skipped"] == 1.0 and bad["nonfinite"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in engine.module.named_parameters())

    # save -> two more steps -> fresh engine loads the save -> the same two steps give the same losses
    step = int(engine.global_steps)
    state = RunState(cfg, 0, 1, TrainState(step=step), ema, engine.module, _NoLoader(), gen)
    ck.save(engine, cfg.run_dir, state, keep_last=2)
    want = [train_step(engine, _batches(100 + i, cfg), sched, cfg, gen)["loss"] for i in range(2)]
    engine2, ema2 = _engine(cfg, device)
    gen2 = torch.Generator(device=device)
    client2 = zero.load(engine2, ck.ckpt_root(cfg.run_dir), ck.tag_for(step))
    set_rng_state(client2["rng"][0], gen2)
    ema2.load_checkpoint_state(engine2.module, client2["ema"])
    assert int(engine2.global_steps) == step
    got = [train_step(engine2, _batches(100 + i, cfg), sched, cfg, gen2)["loss"] for i in range(2)]
    assert got == want
