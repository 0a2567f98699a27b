"""PixArt-XL/2 at 256 px in bf16 on a GPU: forward + backward with every attention backend present (torch-flash,
flash-attn when installed, sdpa, math), compared with each other and with a float32 `math` reference, gradients
included; each torch FlashAttention kernel alone at PixArt's 1024-px shapes against float32 math. Skipped without
CUDA (conftest); run whenever a GPU is present."""
import importlib.util

import pytest
import torch

from pixart_ds import config
from pixart_ds.model.attention import attention, make_text_context, resolve_backend, torch_varlen_available
from pixart_ds.model.pixart import build_model

pytestmark = pytest.mark.gpu

BACKENDS = ["torch-flash"] + (["flash-attn"] if importlib.util.find_spec("flash_attn") else []) + ["sdpa", "math"]


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
    assert resolve_backend("auto", q) == ("flash-attn" if "flash-attn" in BACKENDS else "torch-flash")


def test_grad_checkpointing_matches_on_gpu():
    model = _model().to(torch.bfloat16)
    model.set_attention("sdpa")
    inp = _inputs(torch.bfloat16)
    out, grad = _step(model, inp)
    model.grad_checkpointing = True
    out2, grad2 = _step(model, inp)
    assert torch.equal(out, out2) and _cos(grad, grad2) > 0.9999


def _fwd_bwd(fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    g = torch.Generator(device="cuda").manual_seed(5)
    out.float().backward(torch.randn(out.shape, device="cuda", generator=g))
    return out.detach().float(), [x.grad.float() for x in xs]


def _check(got, ref, what):
    (o, gs), (ro, rgs) = got, ref
    err = ((o - ro).norm() / ro.norm()).item()
    assert err < 1e-2, f"{what} output: relative error {err:.2e} vs float32 math"
    for i, (g, rg) in enumerate(zip(gs, rgs)):
        e = ((g - rg).norm() / rg.norm()).item()
        assert e < 2e-2, f"{what} grad {i}: relative error {e:.2e} vs float32 math"


@pytest.mark.parametrize("tokens", [256, 4096])  # 256 px and 1024 px of PixArt-XL/2 (16 heads of 72)
def test_torch_flash_self_attention_matches_fp32_math_with_grads(tokens):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, tokens, 16, 72, device="cuda", generator=g) for _ in range(3))
    ref = _fwd_bwd(lambda a, b, c: attention(a, b, c, "math"), q, k, v)
    got = _fwd_bwd(lambda a, b, c: attention(a, b, c, "torch-flash"), *(x.bfloat16() for x in (q, k, v)))
    _check(got, ref, f"torch-flash self-attention, {tokens} tokens")


@pytest.mark.skipif(not torch_varlen_available(), reason="this torch has no torch.nn.attention.varlen")
@pytest.mark.parametrize("tokens", [256, 4096])
def test_torch_flash_varlen_cross_attention_matches_fp32_math_with_grads(tokens):
    """Image tokens attend to captions of 120, 37, 5 and 0 real tokens (packed through make_text_context), against
    dense masked float32 math over the padded captions; gradients reach the packed keys/values."""
    B, L, H, D = 4, 120, 16, 72
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(B, tokens, H, D, device="cuda", generator=g)
    kv = torch.randn(B, L, 2 * H * D, device="cuda", generator=g)
    lens = torch.tensor([120, 37, 5, 0], device="cuda")
    mask = torch.arange(L, device="cuda")[None] < lens[:, None]
    dense, packed = make_text_context(kv, mask, pack=False), make_text_context(kv.bfloat16(), mask, pack=True)
    keep = (~dense.empty).float()[:, None, None, None]  # the empty caption's output is zeroed by CrossAttention

    def ref_fn(qq, kvd):
        k, v = kvd.reshape(B, L, 2, H, D).unbind(2)
        return attention(qq, k, v, "math", kv_mask=dense.mask) * keep

    def got_fn(qq, kvp):
        k, v = kvp.reshape(-1, 2, H, D).unbind(1)
        return attention(qq, k, v, "torch-flash", cu_seqlens_k=packed.cu_seqlens, max_seqlen_k=packed.max_seqlen) * keep

    ro, (rgq, rgkv) = _fwd_bwd(ref_fn, q, dense.y)
    o, (gq, gkv) = _fwd_bwd(got_fn, q.bfloat16(), packed.y)
    order = torch.argsort((~dense.mask).reshape(-1).to(torch.int8), stable=True)  # packed row -> dense row
    n_real = int(packed.cu_seqlens[-1])
    rgkv_packed = rgkv.reshape(B * L, -1)[order][:n_real]
    _check((o, [gq, gkv[:n_real]]), (ro, [rgq, rgkv_packed]), f"torch-flash varlen cross-attention, {tokens} tokens")
    assert gkv[n_real:].abs().max().item() == 0.0  # padding rows get no gradient
