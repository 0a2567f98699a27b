"""Tiny PixArt configs, random weights and inputs for the model / attention / convert tests."""
from __future__ import annotations

import torch

from pixart_ds import config


def tiny_cfg(**model):
    """A full Config around the `tiny` preset (depth 2, hidden 48, 3 heads) with 32-d, 8-token captions at 64 px."""
    ms = model.get("multi_scale", False)
    m = {"preset": "tiny", "caption_channels": 32, "max_text_tokens": 8, "num_classes": 10, **model}
    return config.from_dict({"model": m, "data": {"resolution": 64, "multi_scale": ms}})


def randomize(model, seed=0, std=0.1):
    """Every parameter random (the official init zeroes the outputs, which would hide mapping errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(cond, B=2, h=8, w=8, L=8, C=32, seed=0):
    """x [B,4,h,w], t [B], y (features or labels), mask [B,L] (caption 0 has 3 real tokens), data_info."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, h, w, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randn(B, L, C, generator=g) if cond == "text" else torch.randint(0, 10, (B,), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 3:] = 0
    data_info = {"img_hw": torch.tensor([[h * 8.0, w * 8.0]] * B), "aspect_ratio": torch.tensor([[h / w]] * B)}
    return x, t, y, mask, data_info
