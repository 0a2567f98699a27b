"""PixArt-XL/2 at 256 px in bf16 on a GPU: forward + backward with every attention backend present, compared with
each other and with a float32 `math` reference. Skipped without CUDA (conftest); run whenever a GPU is present."""
import importlib.util

import pytest
import torch

from pixart_ds import config
from pixart_ds.model.attention import attention, resolve_backend
from pixart_ds.model.pixart import build_model

pytestmark = pytest.mark.gpu

BACKENDS = (["flash"] if importlib.util.find_spec("flash_attn") else []) + ["sdpa", "math"]


def _model():
    cfg = config.from_dict({"model": {"preset": "PixArt-XL/2", "attention": "math"}, "data": {"resolution": 256}})
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # make the zero-initialised text path and output non-trivial
        for b in model.blocks:
            b.cross_attn.proj.weight.normal_(0, 0.02)
        model.final_layer.linear.weight.normal_(0, 0.02)
    return model.cuda()


def _inputs(dtype, B=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 4, 32, 32, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randn(B, 120, 4096, generator=g)
    lens = torch.tensor([120, 37, 5, 0])[:B]  # the last caption is all padding
    mask = (torch.arange(120)[None] < lens[:, None]).long()
    return x.cuda().to(dtype), t.cuda(), y.cuda().to(dtype), mask.cuda()


def _step(model, inp):
    model.zero_grad(set_to_none=True)
    out = model(*inp)
    out.float().square().mean().backward()
    grad = torch.cat([p.grad.float().reshape(-1) for p in model.parameters() if p.grad is not None])
    return out.detach().float(), grad


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.reshape(-1), b.reshape(-1), dim=0).item()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_xl_bf16_forward_backward_every_backend_agrees():
    model = _model().float()
    ref_out, ref_grad = _step(model, _inputs(torch.float32))
    model = model.to(torch.bfloat16)
    inp = _inputs(torch.bfloat16)
    results = {}
    for be in BACKENDS:
        model.set_attention(be)
        out, grad = _step(model, inp)
        assert out.shape == (4, 8, 32, 32)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all(), be
        rel, cos, gcos = _rel(out, ref_out), _cos(out, ref_out), _cos(grad, ref_grad)
        print(f"{be}: out rel max err vs fp32 {rel:.3e}, cosine {cos:.6f}; grad cosine {gcos:.6f}")
        assert rel < 5e-2 and cos > 0.999 and gcos > 0.99, be
        results[be] = (out, grad)
    for i, b1 in enumerate(BACKENDS):
        for b2 in BACKENDS[i + 1:]:
            (o1, g1), (o2, g2) = results[b1], results[b2]
            assert _rel(o1, o2) < 5e-2 and _cos(o1, o2) > 0.999 and _cos(g1, g2) > 0.99, (b1, b2)


def test_sdpa_self_attention_is_eligible_for_torch_flash_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(4, 256, 16, 72, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if the call is not eligible for FlashAttention
        out = attention(q, k, v, "sdpa")
    torch.testing.assert_close(out.float(), attention(q, k, v, "math").float(), rtol=0, atol=2e-2)
    assert resolve_backend("auto", q) == ("flash" if "flash" in BACKENDS else "sdpa")


def test_grad_checkpointing_matches_on_gpu():
    model = _model().to(torch.bfloat16)
    model.set_attention("sdpa")
    inp = _inputs(torch.bfloat16)
    out, grad = _step(model, inp)
    model.grad_checkpointing = True
    out2, grad2 = _step(model, inp)
    assert torch.equal(out, out2) and _cos(grad, grad2) > 0.9999
