"""The attention seam: sdpa and math agree in fp32 (also for an all-padding caption, without NaN); flash refusal."""
import importlib.util

import pytest
import torch

from pixart_ds.model.attention import attention, check_backend, make_text_context, resolve_backend
from pixart_ds.model.pixart import build_model

from model_helpers import inputs, randomize, tiny_cfg  # noqa: E402


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
