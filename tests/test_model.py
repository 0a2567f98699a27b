"""PixArt model: shapes, switches, conditioning semantics, gradient checkpointing, exact parameter counts."""
import pytest
import torch

from pixart_ds import config
from pixart_ds.model.pixart import PixArt, build_model, model_info
from pixart_ds.testing import inputs, randomize, tiny_cfg


@pytest.mark.parametrize("adaln", ["single", "block"])
@pytest.mark.parametrize("condition,multi_scale", [("text", False), ("text", True), ("class", False)])
def test_forward_shapes_and_backward(adaln, condition, multi_scale):
    cfg = tiny_cfg(adaln=adaln, condition=condition, multi_scale=multi_scale, attention="sdpa")
    model = randomize(build_model(cfg))
    x, t, y, mask, di = inputs(condition)
    out = model(x, t, y, mask=mask, data_info=di)
    assert out.shape == (2, 8, 8, 8)  # pred_sigma: 2 x in_channels
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    # the null caption is a buffer; every parameter except unused class rows gets a gradient
    assert missing == [], missing


def test_fresh_model_predicts_zero_and_cross_attention_starts_silent():
    model = build_model(tiny_cfg(attention="sdpa"))
    x, t, y, mask, _ = inputs("text")
    assert torch.equal(model(x, t, y, mask), torch.zeros(2, 8, 8, 8))  # final linear zero-initialised
    for block in model.blocks:
        assert torch.count_nonzero(block.cross_attn.proj.weight) == 0


def test_grad_checkpointing_is_exact():
    cfg = tiny_cfg(attention="sdpa")
    model = randomize(build_model(cfg))
    x, t, y, mask, _ = inputs("text")
    out = model(x, t, y, mask)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.grad_checkpointing = True
    out2 = model(x, t, y, mask)
    out2.sum().backward()
    assert torch.equal(out, out2)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=1e-6, msg=n)


def test_caption_dropout_uses_null_caption_with_full_mask():
    model = randomize(build_model(tiny_cfg(attention="math")))
    x, t, y, mask, _ = inputs("text")
    drop = torch.tensor([True, False])
    out = model(x, t, y, mask, drop=drop)
    null = model.y_embedder.y_embedding[None].expand(2, -1, -1)
    ref = model(x, t, torch.where(drop[:, None, None], null, y), torch.where(drop[:, None], 1, mask))
    assert torch.equal(out, ref)
    # what the caption (and its mask) was does not matter once dropped
    out_other = model(x, t, torch.randn_like(y), torch.zeros_like(mask), drop=torch.tensor([True, True]))
    out_all = model(x, t, y, mask, drop=torch.tensor([True, True]))
    assert torch.equal(out_other, out_all)


def test_class_dropout_uses_null_class():
    model = randomize(build_model(tiny_cfg(condition="class", attention="math")))
    x, t, y, _, _ = inputs("class")
    out = model(x, t, y, drop=torch.tensor([True, True]))
    assert torch.equal(out, model(x, t, torch.full_like(y, 10)))


def test_padding_tokens_are_ignored():
    model = randomize(build_model(tiny_cfg(attention="sdpa")))
    x, t, y, mask, _ = inputs("text")
    y2 = y.clone()
    y2[0, 3:] = 1e3  # change only the padded tokens of caption 0
    torch.testing.assert_close(model(x, t, y, mask), model(x, t, y2, mask), rtol=0, atol=1e-6)


def test_multi_scale_recomputes_pos_embed_and_uses_size_conditions():
    model = randomize(build_model(tiny_cfg(multi_scale=True, attention="sdpa")))
    x, t, y, mask, di = inputs("text", h=6, w=10)
    out = model(x, t, y, mask, data_info=di)
    assert out.shape == (2, 8, 6, 10)
    di2 = {"img_hw": di["img_hw"] * 2, "aspect_ratio": di["aspect_ratio"]}
    assert not torch.allclose(out, model(x, t, y, mask, data_info=di2))
    with pytest.raises(ValueError, match="data_info"):
        model(x, t, y, mask)


def test_pe_interpolation_changes_positions():
    a = build_model(tiny_cfg())
    b = PixArt(tiny_cfg().model, 8, 1.0)
    assert a.pe_interpolation == 0.125 and not torch.allclose(a.pos_embed, b.pos_embed)  # 64 px / 512


def test_flash_refused_without_flash_attn():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here; the refusal is for machines without it")
    with pytest.raises(ValueError, match="flash-attn"):
        build_model(tiny_cfg(attention="flash"))


def test_exact_parameter_counts():
    assert model_info("PixArt-XL/2")["total"] == 610_856_096
    assert model_info("PixArt-XL/2", multi_scale=True)["total"] == 611_349_152
    info = model_info("PixArt-XL/2", adaln="block")
    assert info["total"] == 828_494_240 and "833M" in info["note"]
    assert sum(info["components"].values()) == info["total"]


def test_model_info_matches_a_real_model():
    # model_info counts on the meta device; the tiny preset (4096-d captions) built for real must agree
    full = PixArt(config.from_dict({"model": {"preset": "tiny"}}).model, 32, 0.5)
    assert model_info("tiny")["total"] == sum(p.numel() for p in full.parameters())


def test_class_embedding_init_is_dit_by_default_and_set_by_label_init_std():
    """DiT's N(0, 0.02) class-embedding table unless model.label_init_std says otherwise (the demo's short stage 1);
    a non-positive std is refused by name."""
    torch.manual_seed(0)
    dit = build_model(tiny_cfg(condition="class", adaln="block", num_classes=200))
    assert dit.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.05)
    wide = build_model(tiny_cfg(condition="class", adaln="block", num_classes=200, label_init_std=1.0))
    assert wide.y_embedder.embedding_table.weight.std().item() == pytest.approx(1.0, rel=0.05)
    with pytest.raises(config.ConfigError, match=r"model\.label_init_std: must be > 0, got 0"):
        config.from_dict({"model": {"preset": "tiny", "condition": "class", "label_init_std": 0.0}})


def test_caption_projection_init_is_official_at_t5_xxl_width_and_scaled_below():
    """N(0, 0.02) for T5-XXL (4096) into hidden 1152, as the official code; a narrower encoder / model scales the
    std by sqrt(reference fan-in / fan-in), so the projected caption keeps the official scale."""
    torch.manual_seed(0)
    xl = build_model(config.from_dict({"model": {"preset": "PixArt-XL/2", "depth": 1}, "data": {"resolution": 256}}))
    fc1, fc2 = xl.y_embedder.y_proj.fc1, xl.y_embedder.y_proj.fc2
    assert (fc1.in_features, fc2.in_features) == (4096, 1152)
    assert fc1.weight.std().item() == pytest.approx(0.02, rel=0.01)
    assert fc2.weight.std().item() == pytest.approx(0.02, rel=0.01)

    narrow = build_model(tiny_cfg(hidden_size=192, num_heads=6, caption_channels=32))
    fc1, fc2 = narrow.y_embedder.y_proj.fc1, narrow.y_embedder.y_proj.fc2
    assert fc1.weight.std().item() == pytest.approx(0.02 * (4096 / 32) ** 0.5, rel=0.05)
    assert fc2.weight.std().item() == pytest.approx(0.02 * (1152 / 192) ** 0.5, rel=0.05)
    # Same output scale for unit-RMS encoder features: within a factor 1.5 of the XL/T5-XXL projection's.
    with torch.no_grad():
        rms = lambda m, c: m.y_embedder.y_proj(torch.randn(256, c)).pow(2).mean().sqrt().item()  # noqa: E731
        assert 1 / 1.5 < rms(narrow, 32) / rms(xl, 4096) < 1.5
