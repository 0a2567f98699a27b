"""Analytic FLOPs (pixart_ds.model.flops) against torch's FlopCounterMode on the real model.

The model is built on the meta device: no memory, no initialisation, and the matrix products still dispatch through
aten (SDPA decomposes into counted bmm's there), so counting PixArt-XL/2 costs seconds.
"""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import pixart_ds.model.pixart as pixart_mod
from pixart_ds import config
from pixart_ds.model.attention import TextContext
from pixart_ds.model.flops import format_flops, image_flops, train_flops_per_image

B = 2  # count a batch of two and divide: the formula is per image


@pytest.fixture(autouse=True)
def _meta_text_context(monkeypatch):
    """make_text_context asks the data whether a caption is empty (bool(mask.any())), which meta tensors cannot
    answer. With every token real (the masks fed below) it returns TextContext(y, all-true mask); do exactly that on
    meta, and call the real function otherwise. Masking is element-wise, so FLOPs are unchanged."""
    real = pixart_mod.make_text_context

    def ctx(y, mask, pack):
        if y.is_meta:
            return TextContext(y=y, mask=torch.ones(y.shape[:2], dtype=torch.bool, device=y.device))
        return real(y, mask, pack)

    monkeypatch.setattr(pixart_mod, "make_text_context", ctx)


def _cfg(**over):
    base = {"model.preset": "PixArt-XL/2", "model.attention": "sdpa"}
    base.update(over)
    cfg = config.load(None, [f"{k}={v}" for k, v in base.items()])
    return cfg


def _inputs(cfg, latent_hw, text_len=None):
    m = cfg.model
    h, w = latent_hw
    with torch.device("meta"):
        x = torch.randn(B, m.in_channels, h, w)
        t = torch.randint(0, 1000, (B,))
        if m.condition == "text":
            L = text_len or m.max_text_tokens
            y = torch.randn(B, L, m.caption_channels)
            mask = torch.ones(B, L, dtype=torch.long)
        else:
            y, mask = torch.randint(0, m.num_classes, (B,)), None
        # (a caption shorter than max_text_tokens cannot be swapped for the [max_text_tokens, C] null caption)
        drop = torch.zeros(B, dtype=torch.bool) if text_len is None else None
        info = ({"img_hw": torch.tensor([[h * 8.0, w * 8.0]] * B), "aspect_ratio": torch.full((B, 1), h / w)}
                if m.multi_scale else None)
    return x, t, y, mask, drop, info


def _count(model, inputs, train):
    x, t, y, mask, drop, info = inputs
    with FlopCounterMode(display=False) as fc:
        if train:
            out = model(x, t, y, mask=mask, drop=drop, data_info=info)
            out.float().square().mean().backward()
        else:
            with torch.no_grad():
                model(x, t, y, mask=mask, drop=drop, data_info=info)
    return fc.get_total_flops() / B


def _build(cfg):
    with torch.device("meta"):
        return pixart_mod.build_model(cfg)


@pytest.fixture(scope="module")
def xl():
    cfg = _cfg(**{"data.resolution": 256})
    with torch.device("meta"):
        return cfg, pixart_mod.PixArt(cfg.model, 32, 0.5)


@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_xl_forward_within_2_percent(xl, resolution):
    cfg, model = xl
    lat = resolution // 8
    counted = _count(model, _inputs(cfg, (lat, lat)), train=False)
    analytic = image_flops(cfg.model, resolution).forward
    assert analytic == pytest.approx(counted, rel=0.02), (format_flops(analytic), format_flops(counted))
    # The formula counts exactly the products torch runs (no element-wise work on either side).
    assert analytic == pytest.approx(counted, rel=1e-9)


def test_xl_training_step_with_recompute(xl):
    cfg, model = xl
    f = image_flops(cfg.model, 256)
    inputs = _inputs(cfg, (32, 32))
    model.grad_checkpointing = True  # each block re-runs its forward in backward (the recipes' setting)
    try:
        counted = _count(model, inputs, train=True)
    finally:
        model.grad_checkpointing = False
    assert f.train_recompute == pytest.approx(counted, rel=0.02)
    assert f.train_recompute == pytest.approx(counted, rel=1e-9)
    assert f.train == pytest.approx(3 * f.forward, rel=0.002) and f.train_recompute == f.train + f.blocks_forward
    # The recipe helper picks the recomputation setting from model.grad_checkpointing.
    rc = config.replace(cfg, **{"model.grad_checkpointing": True})
    assert train_flops_per_image(rc, hardware=True) == f.train_recompute
    assert train_flops_per_image(rc, hardware=False) == f.train


@pytest.mark.parametrize("over, latent_hw, text_len", [
    ({"model.condition": "class", "model.adaln": "block"}, (16, 16), None),  # stage 1: DiT-style
    ({"model.adaln": "block"}, (16, 16), None),  # the adaLN ablation
    ({"model.multi_scale": True, "data.multi_scale": True}, (12, 20), None),  # an aspect-ratio bucket
    ({}, (16, 16), 77),  # a shorter caption
    ({"model.pred_sigma": False}, (8, 8), None),
])
def test_variants_small_preset(over, latent_hw, text_len):
    cfg = _cfg(**{"model.preset": "PixArt-S/2", "model.depth": 12, "model.hidden_size": 384, "model.num_heads": 6,
                  "data.resolution": 128, **over})
    model = _build(cfg)
    inputs = _inputs(cfg, latent_hw, text_len)
    f = image_flops(cfg.model, latent_hw=latent_hw, text_len=text_len)
    assert f.forward == pytest.approx(_count(model, inputs, train=False), rel=1e-9)
    assert f.train == pytest.approx(_count(model, inputs, train=True), rel=1e-9)


def test_arguments():
    cfg = _cfg()
    assert image_flops(cfg).forward == image_flops(cfg.model, 256).forward
    assert image_flops(cfg.model, latent_hw=(32, 32)).forward == image_flops(cfg.model, 256).forward
    assert sum(image_flops(cfg).components.values()) == image_flops(cfg).forward
    with pytest.raises(ValueError, match="resolution"):
        image_flops(cfg.model)
    with pytest.raises(ValueError, match="patch size"):
        image_flops(cfg.model, latent_hw=(31, 32))
    # The paper's model at 256 px: ~0.3 TFLOP per image forward, ~4x more at 512, ~22x at 1024.
    f256, f1024 = image_flops(cfg.model, 256).forward, image_flops(cfg.model, 1024).forward
    assert 2.5e11 < f256 < 3.5e11 and 15 < f1024 / f256 < 30
    assert format_flops(1.5e12) == "1.5 TFLOP"
