"""The speed switches of a recipe, each against the plain path on CPU.

Through the real `train_step` on a one-rank DeepSpeed ZeRO-2 engine (fp32, gloo; a subprocess, so the process group
and torch.compile's state stay out of the test process), 3 optimizer steps of 2 micro-batches each:
- model.grad_checkpointing with grad_checkpointing_every 1 and 2: the same losses as no recomputation (<= 1e-6
  relative: recomputation reruns the same float32 ops);
- model.compile=blocks (regional torch.compile, inductor with the machine's C++ compiler): the same losses to 1e-4
  relative (inductor fuses and reorders float32 arithmetic), and DeepSpeed sees the plain model's parameter names;
- train.adam=torch-fused (torch's fused AdamW kernel) against train.adam=torch (foreach): the same losses to 1e-5;
- no host sync between micro-batches: train_step with 2 micro-batches reads values back to the host
  (aten._local_scalar_dense: .item(), bool(t), .tolist()) exactly as often as with 1.
In the test process: the EMA's multi-tensor update is bit-equal to a per-tensor lerp (fp32 and bf16 modules), the
derived DeepSpeed dict carries the optimizer choice, overlap_comm and bucket sizes, and data.pin_memory reaches the
loader. FusedAdam itself is not run here (its JIT build takes ~100 s on this CPU); its selection is checked.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def _cfg(**over):
    from pixart_ds import config as C

    base = {"model": {"preset": "tiny", "caption_channels": 32, "max_text_tokens": 8, "attention": "sdpa"},
            "data": {"resolution": 64, "caption_dropout": 0.0},
            "train": {"global_batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 1,
                      "adam_eps": 1e-8, "grad_clip": 1.0, "precision": "fp32", "torch_adam": True, "seed": 0}}
    cfg = C.from_dict(base, "test_speed")
    return C.replace(cfg, **over) if over else cfg


def _batches(step, cfg, n_micro=2):
    g = torch.Generator().manual_seed(100 + step)
    m, L, D = cfg.train.micro_batch_size, cfg.model.max_text_tokens, cfg.model.caption_channels
    out = []
    for _ in range(n_micro):
        lens = torch.randint(0, L + 1, (m,), generator=g)
        out.append({"latent": torch.randn(m, 4, 8, 8, generator=g), "text_emb": torch.randn(m, L, D, generator=g),
                    "text_mask": (torch.arange(L)[None] < lens[:, None]).long(),
                    "drop": torch.zeros(m, dtype=torch.bool)})
    return out


def _run(cfg, count_syncs=False):
    from torch.utils._python_dispatch import TorchDispatchMode

    from pixart_ds.diffusion.schedule import Schedule
    from pixart_ds.model.pixart import build_model
    from pixart_ds.train import zero
    from pixart_ds.train.step import train_step

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "_local_scalar_dense":
                Count.n += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # the zero-initialised output and text paths would hide differences
        for b in model.blocks:
            b.cross_attn.proj.weight.normal_(0, 0.05)
        model.final_layer.linear.weight.normal_(0, 0.05)
    names = [n for n, _ in model.named_parameters()]
    engine = zero.initialize(model, cfg, 1)
    sched = Schedule.from_config(cfg.diffusion)
    gen = torch.Generator().manual_seed(7)
    losses, syncs = [], {}
    for s in range(STEPS):
        losses.append(train_step(engine, _batches(s, cfg), sched, cfg, gen)["loss"])
    if count_syncs:
        for n_micro in (1, 2):
            c = zero.C.replace(cfg, **{"train.global_batch_size": 2 * n_micro})
            eng = zero.initialize(build_model(c), c, 1)
            train_step(eng, _batches(0, c, n_micro), sched, c, gen)  # warm: lazy allocations
            Count.n = 0
            with Count():
                train_step(eng, _batches(1, c, n_micro), sched, c, gen)
            syncs[n_micro] = Count.n
    return {"losses": losses, "names_plain": names, "names_engine": [n for n, _ in engine.module.named_parameters()],
            "syncs": syncs}


def worker(out_path):
    from pixart_ds.dist import destroy, dist_env, init_distributed

    init_distributed(dist_env(), timeout_s=120)
    res = {
        "plain": _run(_cfg(), count_syncs=True),
        "ckpt1": _run(_cfg(**{"model.grad_checkpointing": True})),
        "ckpt2": _run(_cfg(**{"model.grad_checkpointing": True, "model.grad_checkpointing_every": 2})),
        "compile": _run(_cfg(**{"model.compile": "blocks"})),
        "torch_fused": _run(_cfg(**{"train.adam": "torch-fused"})),
    }
    destroy()
    with open(out_path, "w") as f:
        json.dump(res, f)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed") / "out.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(out)], capture_output=True,
                       text=True, timeout=600, env=env, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return json.load(open(out))


def _rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def test_grad_checkpointing_every_k_blocks_same_losses(results):
    plain = results["plain"]["losses"]
    assert len(plain) == STEPS and len(set(plain)) == STEPS  # the model learns: losses move
    for k in ("ckpt1", "ckpt2"):
        assert _rel(results[k]["losses"], plain) <= 1e-6, (k, results[k]["losses"], plain)


def test_compiled_blocks_same_losses_and_plain_parameters(results):
    r = results["compile"]
    assert _rel(r["losses"], results["plain"]["losses"]) <= 1e-4, (r["losses"], results["plain"]["losses"])
    assert r["names_engine"] == r["names_plain"] == results["plain"]["names_plain"]  # no _orig_mod. prefixes


def test_torch_fused_adamw_same_losses(results):
    assert _rel(results["torch_fused"]["losses"], results["plain"]["losses"]) <= 1e-5


def test_no_host_sync_between_micro_batches(results):
    s = results["plain"]["syncs"]
    assert s["1"] == s["2"], s  # a sync inside the micro-batch loop would add one per micro-batch


def test_checkpointed_blocks_and_hfu_flops():
    from pixart_ds import config as C
    from pixart_ds.model.flops import image_flops, recompute_fraction, train_flops_per_image

    cfg = C.load(os.path.join(REPO, "recipes", "stage2_sam256.yaml"))
    assert C.checkpointed_blocks(cfg.model) == list(range(28))
    half = C.replace(cfg, **{"model.grad_checkpointing_every": 2})
    assert C.checkpointed_blocks(half.model) == list(range(0, 28, 2)) and recompute_fraction(half.model) == 0.5
    off = C.replace(cfg, **{"model.grad_checkpointing": False})
    f = image_flops(cfg)
    assert train_flops_per_image(cfg, hardware=True) == f.train_recompute
    assert train_flops_per_image(half, hardware=True) == f.train + f.blocks_forward // 2
    assert train_flops_per_image(off, hardware=True) == f.train == train_flops_per_image(cfg)
    with pytest.raises(C.ConfigError, match="model.grad_checkpointing_every: must be >= 1, got 0"):
        C.replace(cfg, **{"model.grad_checkpointing_every": 0})


def test_ds_config_optimizer_overlap_and_buckets():
    from pixart_ds import config as C
    from pixart_ds.train.zero import ds_config

    cfg = _cfg()
    d = ds_config(cfg, 1)
    assert d["optimizer"]["params"]["torch_adam"] is True and "fused" not in d["optimizer"]["params"]
    assert d["zero_optimization"] == {"stage": 2, "contiguous_gradients": True, "overlap_comm": False}
    fused = ds_config(C.replace(cfg, **{"train.adam": "torch-fused"}), 1)["optimizer"]["params"]
    assert fused["torch_adam"] is True and fused["fused"] is True
    ds_fused = C.replace(cfg, **{"train.torch_adam": False})
    assert C.adam_impl(ds_fused) == "fused-adam"
    assert ds_config(ds_fused, 1)["optimizer"]["params"]["torch_adam"] is False
    multi = C.replace(cfg, **{"train.overlap_comm": True, "train.reduce_bucket_size": 200_000_000,
                              "train.allgather_bucket_size": 100_000_000})
    assert ds_config(multi, 4)["zero_optimization"] == {
        "stage": 2, "contiguous_gradients": True, "overlap_comm": True, "reduce_bucket_size": 200_000_000,
        "allgather_bucket_size": 100_000_000}
    with pytest.raises(C.ConfigError, match="train.adam: fused-adam contradicts train.torch_adam=true"):
        C.replace(cfg, **{"train.adam": "fused-adam"})
    with pytest.raises(C.ConfigError, match="train.reduce_bucket_size: must be >= 1"):
        C.replace(cfg, **{"train.reduce_bucket_size": 0})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_tensor_ema_is_bit_equal_to_per_tensor_lerp(dtype):
    from pixart_ds.model.pixart import build_model
    from pixart_ds.train.ema import EMA

    model = build_model(_cfg()).to(dtype)
    ema = EMA(model, 0.999)
    ref = {n: t.clone() for n, t in ema.params.items()}
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(dtype) * 0.1)
        ema.update(model)
        for n, p in model.named_parameters():
            ref[n].lerp_(p.detach().float(), 1.0 - 0.999)
    assert all(torch.equal(ema.params[n], ref[n]) for n in ref)
    assert ema.num_updates == 3


def test_pin_memory_flag_reaches_the_loader(tmp_path):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from pixart_ds.testing import write_feature_shards

    from pixart_ds import config as C
    from pixart_ds.data.loader import build_loader

    write_feature_shards(str(tmp_path / "shards"), 8, max_tokens=8, text_dim=32)
    cfg = C.replace(_cfg(), **{"data.sources": [{"local": str(tmp_path / "shards")}], "data.num_workers": 0})
    env = type("Env", (), dict(rank=0, world_size=1, local_rank=0, local_world_size=1))
    assert build_loader(cfg, 2, env).pin_memory is False  # default: on only when CUDA is present
    assert build_loader(C.replace(cfg, **{"data.pin_memory": True}), 2, env).pin_memory is True


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    worker(sys.argv[2])
