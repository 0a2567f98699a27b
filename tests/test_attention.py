"""The attention seam: sdpa and math agree in fp32 (also for an all-padding caption, without NaN); flash refusal."""
import importlib.util

import pytest
import torch

from pixart_ds.model.attention import attention, check_backend, make_text_context, resolve_backend
from pixart_ds.model.pixart import build_model
from pixart_ds.testing import inputs, randomize, tiny_cfg


def qkv(B=3, Lq=10, Lk=7, H=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Lq, H, D, generator=g), torch.randn(B, Lk, H, D, generator=g),
            torch.randn(B, Lk, H, D, generator=g))


def test_self_attention_sdpa_equals_math():
    q, k, v = qkv(Lk=10)
    torch.testing.assert_close(attention(q, k, v, "sdpa"), attention(q, k, v, "math"), rtol=0, atol=1e-5)


def test_masked_cross_attention_sdpa_equals_math_and_ignores_padding():
    q, k, v = qkv()
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 1, 0, 1], [1] * 7]).bool()
    a, b = attention(q, k, v, "sdpa", kv_mask=mask), attention(q, k, v, "math", kv_mask=mask)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # reference: caption 0 truncated to its 3 real tokens
    torch.testing.assert_close(a[:1], attention(q[:1], k[:1, :3], v[:1, :3], "math"), rtol=0, atol=1e-5)


def test_all_padding_caption_gives_zero_not_nan_on_both_backends():
    model = randomize(build_model(tiny_cfg(attention="sdpa")))
    x, t, y, mask, _ = inputs("text")
    mask[1] = 0  # caption 1 is all padding
    outs = {}
    for backend in ("sdpa", "math"):
        model.set_attention(backend)
        model.zero_grad()
        out = model(x, t, y, mask)
        out.square().sum().backward()
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        outs[backend] = out
    torch.testing.assert_close(outs["sdpa"], outs["math"], rtol=0, atol=1e-5)
    # an empty caption contributes the empty sum: its caption features do not matter at all
    y2 = y.clone()
    y2[1] = torch.randn_like(y2[1]) * 10
    torch.testing.assert_close(model(x, t, y2, mask)[1], outs["math"][1], rtol=0, atol=1e-6)


def test_text_context_marks_empty_rows_and_packs():
    y = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 0, 1]])
    ctx = make_text_context(y, mask, pack=True)
    # max_seqlen is the static bound L (the exact maximum would need a host sync); the packed rows keep the static
    # shape [B*L, C]: the real tokens first (caption 1 keeps one placeholder key), padding after cu_seqlens[-1]
    assert ctx.cu_seqlens.tolist() == [0, 2, 3, 6] and ctx.max_seqlen == 5 and ctx.y.shape == (15, 4)
    assert ctx.empty.tolist() == [False, True, False]
    torch.testing.assert_close(ctx.y[:2], y[0, :2])
    torch.testing.assert_close(ctx.y[2], y[1, 0])
    torch.testing.assert_close(ctx.y[3:6], y[2, [0, 2, 4]])
    dense = make_text_context(y, mask, pack=False)
    assert dense.mask[1].tolist() == [True, False, False, False, False]  # one placeholder key, output zeroed


@pytest.mark.parametrize("adaln,multi_scale", [("single", False), ("block", False), ("single", True)])
def test_model_sdpa_equals_math(adaln, multi_scale):
    model = randomize(build_model(tiny_cfg(adaln=adaln, multi_scale=multi_scale, attention="sdpa")))
    x, t, y, mask, di = inputs("text")
    a = model(x, t, y, mask, data_info=di)
    model.set_attention("math")
    torch.testing.assert_close(a, model(x, t, y, mask, data_info=di), rtol=0, atol=1e-5)


def test_backend_resolution_and_errors():
    x = torch.zeros(1)
    assert resolve_backend("auto", x) == "sdpa"  # CPU: flash-attn kernels need CUDA fp16/bf16
    with pytest.raises(ValueError, match="not one of"):
        check_backend("xformers")
    with pytest.raises(ValueError, match="packed"):
        q, k, v = qkv()
        attention(q, k.reshape(-1, 2, 8), v.reshape(-1, 2, 8), "sdpa", cu_seqlens_k=torch.tensor([0, 7, 14, 21]))
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ValueError, match="flash-attn package"):
            check_backend("flash")
    else:
        with pytest.raises(ValueError, match="fp16/bf16 CUDA"):
            resolve_backend("flash", x)


def test_backend_names_and_auto_rule():
    from pixart_ds.model.attention import BACKENDS, packs_captions, torch_varlen_available

    assert {"auto", "torch-flash", "flash-attn", "flash", "sdpa", "math"} == set(BACKENDS)
    x = torch.zeros(1)
    assert resolve_backend("auto", x) == "sdpa" and resolve_backend("auto", x.bfloat16()) == "sdpa"  # CPU
    assert resolve_backend("sdpa", x) == "sdpa" and resolve_backend("math", x) == "math"
    assert check_backend("torch-flash") == "torch-flash"  # needs nothing beyond torch
    # torch's varlen kernel packs captions; the dense backends never do
    assert packs_captions("torch-flash") == torch_varlen_available() and not packs_captions("sdpa")
    assert packs_captions("flash-attn")


@pytest.mark.parametrize("name", ["torch-flash", "flash-attn", "flash"])
def test_flash_kernels_on_cpu_tensors_are_a_clear_error(name):
    if name != "torch-flash" and importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ValueError, match="needs the flash-attn package"):
            check_backend(name)
        return
    want = "flash-attn" if name == "flash" else name
    with pytest.raises(ValueError, match=f"attention={want} needs fp16/bf16 CUDA tensors, got torch.float32 on cpu"):
        resolve_backend(name, torch.zeros(1))
    q, k, v = qkv()
    with pytest.raises(ValueError, match="fp16/bf16 CUDA"):
        attention(q, k, v, name)
    model = build_model(tiny_cfg(attention=name))  # selectable by recipe; refuses only when called on CPU
    x, t, y, mask, _ = inputs("text")
    with pytest.raises(ValueError, match="fp16/bf16 CUDA"):
        model(x, t, y, mask)


def test_recipe_selects_backend_and_auto_runs_sdpa_on_cpu():
    from pixart_ds import config

    cfg = config.load(None, ["model.preset=tiny", "model.attention=torch-flash", "data.resolution=64"])
    assert build_model(cfg).attention_backend == "torch-flash"
    with pytest.raises(config.ConfigError, match="model.attention: 'xformers' is not one of auto, torch-flash"):
        config.load(None, ["model.attention=xformers"])
    model = randomize(build_model(tiny_cfg(attention="auto")))
    x, t, y, mask, _ = inputs("text")
    a = model(x, t, y, mask)
    model.set_attention("math")
    torch.testing.assert_close(a, model(x, t, y, mask), rtol=0, atol=1e-5)


def test_packed_context_reproduces_dense_masked_attention():
    """The packing the varlen kernels read (rows cu_seqlens[b]:cu_seqlens[b+1]) attends to exactly the real tokens:
    per-caption math attention over the packed rows equals dense masked attention (empty caption -> placeholder)."""
    g = torch.Generator().manual_seed(3)
    B, L, H, D, N = 4, 6, 2, 8, 5
    y = torch.randn(B, L, H * D, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 0, 1], [0] * 6, [0, 0, 0, 0, 1, 1]])
    q = torch.randn(B, N, H, D, generator=g)
    dense, packed = make_text_context(y, mask, pack=False), make_text_context(y, mask, pack=True)
    kd = dense.y.reshape(B, L, H, D)
    ref = attention(q, kd, kd, "math", kv_mask=dense.mask)
    cu = packed.cu_seqlens.tolist()
    kp = packed.y.reshape(-1, H, D)
    for b in range(B):
        kb = kp[cu[b]:cu[b + 1]][None]
        torch.testing.assert_close(attention(q[b:b + 1], kb, kb, "math"), ref[b:b + 1], rtol=0, atol=1e-6)
    assert cu == [0, 6, 9, 10, 12] and packed.empty.tolist() == [False, False, True, False]


def test_forward_has_no_host_sync():
    """Packing captions, empty-caption handling and the loss read nothing back to the host: no aten op that copies
    a value to Python (_local_scalar_dense: .item(), bool(t)) or has a data-dependent shape (nonzero, masked_select)
    runs in a forward + loss + backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pixart_ds.diffusion.losses import training_losses
    from pixart_ds.diffusion.schedule import Schedule

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    model = randomize(build_model(tiny_cfg(attention="sdpa")))
    x, t, y, mask, _ = inputs("text")
    mask[1] = 0
    sched = Schedule.from_config(tiny_cfg().diffusion)
    for pack in (False, True):
        with Record() as rec:
            make_text_context(y, mask, pack=pack)
            out = model(x, t, y, mask, drop=torch.tensor([True, False]))
            loss = training_losses(out, x, x, t, torch.randn_like(x), sched, pred_sigma=True)["loss"].mean()
            loss.backward()
        bad = {op for op in rec.ops if op in ("_local_scalar_dense", "nonzero", "masked_select", "item")}
        assert not bad, bad
        assert "argsort" in rec.ops or "sort" in rec.ops or not pack
