"""`train.init_from` for the paper's per-block adaLN arm (§2.3): a class-conditional DiT-style stage-1 model
initialises a text-conditional per-block adaLN model by copying every tensor that exists in both (same name and
shape); the caption projection and cross-attention keep the fresh official init (cross-attention output zero)."""
import torch

from pixart_ds import config as C
from pixart_ds.model.pixart import build_model
from pixart_ds.model.weights import save_ours
from pixart_ds.train.weights import init_weights

MODEL = {"preset": "tiny", "depth": 2, "hidden_size": 64, "num_heads": 2, "patch_size": 2, "attention": "math"}


def _stage1(tmp_path):
    cfg1 = C.from_dict({"model": {**MODEL, "condition": "class", "adaln": "block", "num_classes": 10},
                        "data": {"resolution": 64}})
    torch.manual_seed(3)
    m1 = build_model(cfg1)
    with torch.no_grad():  # a trained-looking model: nothing zero, so copies are visible
        for p in m1.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = str(tmp_path / "stage1")
    save_ours(d, C.to_dict(cfg1)["model"], m1.state_dict(), 64)
    return d, m1


def test_block_text_model_starts_from_the_class_model(tmp_path):
    src, m1 = _stage1(tmp_path)
    cfg2 = C.from_dict({"model": {**MODEL, "condition": "text", "adaln": "block", "caption_channels": 32,
                                  "max_text_tokens": 8},
                        "data": {"resolution": 64}, "train": {"init_from": src, "seed": 5}})
    torch.manual_seed(cfg2.train.seed)
    model = build_model(cfg2)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    raw, ema, note = init_weights(cfg2, model)
    assert "per-block adaLN" in note and "y_embedder" in note and "blocks.N.cross_attn" in note
    sd1 = m1.state_dict()
    assert set(raw) == set(fresh) == set(ema)
    for k in raw:
        if k.startswith("y_embedder") or ".cross_attn." in k:
            assert torch.equal(raw[k], fresh[k]), k  # fresh official init
        else:
            assert torch.equal(raw[k], sd1[k]), k  # stage 1's (attention, MLP, per-block adaLN, final layer, ...)
    assert "y_embedder.embedding_table.weight" not in raw
    assert all(not raw[k].any() for k in raw if k.endswith("cross_attn.proj.weight"))

    # Hence the new model is stage 1's network without its class term: zero the class table and compare.
    model.load_state_dict(raw)
    with torch.no_grad():
        m1.y_embedder.embedding_table.weight.zero_()
    model.eval(), m1.eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    y, mask = torch.randn(2, 8, 32), torch.ones(2, 8, dtype=torch.long)
    keep = torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        a = model(x, t, y, mask=mask, drop=keep)
        b = m1(x, t, torch.tensor([1, 2]), drop=keep)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_block_text_model_refuses_an_adaln_single_source(tmp_path):
    import pytest

    cfg1 = C.from_dict({"model": {**MODEL, "condition": "class", "adaln": "single", "num_classes": 10},
                        "data": {"resolution": 64}})
    d = str(tmp_path / "s")
    save_ours(d, C.to_dict(cfg1)["model"], build_model(cfg1).state_dict(), 64)
    cfg2 = C.from_dict({"model": {**MODEL, "condition": "text", "adaln": "block", "caption_channels": 32},
                        "data": {"resolution": 64}, "train": {"init_from": d}})
    with pytest.raises(C.ConfigError, match="starts from a per-block"):
        init_weights(cfg2, build_model(cfg2))
