"""DiT -> PixArt re-parameterization (paper §2.3) against diffusers' DiTTransformer2DModel and our own class model.

At t* = 500 every block's six modulation vectors and the final layer's two equal DiT's without the class term,
and so does the whole output (the new cross-attention projection is zero, so captions contribute nothing yet).
"""
import copy

import pytest
import torch

from pixart_ds.commands.convert import run as convert_file
from pixart_ds.model.pixart import build_model
from pixart_ds.model.reparam import dit_to_pixart
from pixart_ds.model.weights import load_model
from pixart_ds.testing import randomize, tiny_cfg

TARGET = {"preset": "tiny", "caption_channels": 32, "max_text_tokens": 8, "attention": "sdpa"}


def _diffusers_dit(seed=0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    # norm_eps 1e-6: the original DiT's LayerNorms (diffusers' default 1e-5 applies to its MLP norm only)
    dm = DiTTransformer2DModel(num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=8,
                               num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)
    return randomize(dm).eval()


def _without_class(dm):
    """The same DiT with the class term removed from its conditioning (t_emb + 0)."""
    m = copy.deepcopy(dm)
    with torch.no_grad():
        for b in m.transformer_blocks:
            b.norm1.emb.class_embedder.embedding_table.weight.zero_()
    return m


def _captions(B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(B, 8, 32, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [0] * 8])[:B]  # one caption all padding
    return y, mask


@torch.no_grad()
def test_modulations_match_diffusers_dit_at_t500():
    dm = _diffusers_dit()
    model = dit_to_pixart(dm, TARGET, reparam_t=500)
    H = 48
    t = torch.tensor([500.0])
    s = model.t_block(model.t_embedder(t))
    worst = 0.0
    for ours, theirs in zip(model.blocks, dm.transformer_blocks):
        e = theirs.norm1.emb
        ref = theirs.norm1.linear(torch.nn.functional.silu(e.timestep_embedder(e.time_proj(t)))).reshape(1, 6, H)
        worst = max(worst, (ours.modulation(s) - ref).abs().max().item())
    e = dm.transformer_blocks[0].norm1.emb
    ref_final = dm.proj_out_1(torch.nn.functional.silu(e.timestep_embedder(e.time_proj(t)))).reshape(1, 2, H)
    final = (model.final_layer.modulation(model.t_embedder(t)) - ref_final).abs().max().item()
    print(f"re-param vs diffusers DiT at t=500: block modulations max |diff| {worst:.3g}, final {final:.3g}")
    assert worst <= 1e-5 and final <= 1e-5
    # away from t* the global MLP is only an approximation of the per-block ones
    s100 = model.t_block(model.t_embedder(torch.tensor([100.0])))
    e0 = dm.transformer_blocks[0].norm1.emb
    ref100 = dm.transformer_blocks[0].norm1.linear(
        torch.nn.functional.silu(e0.timestep_embedder(e0.time_proj(torch.tensor([100.0]))))).reshape(1, 6, H)
    assert (model.blocks[0].modulation(s100) - ref100).abs().max() > 1e-3


@torch.no_grad()
def test_output_equals_dit_without_class_term_at_t500():
    dm = _diffusers_dit()
    model = dit_to_pixart(dm, TARGET, reparam_t=500).eval()
    for b in model.blocks:
        assert torch.count_nonzero(b.cross_attn.proj.weight) == 0 and torch.count_nonzero(b.cross_attn.proj.bias) == 0
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.full((2,), 500)
    ref = _without_class(dm)(x, t, class_labels=torch.tensor([3, 7])).sample
    y, mask = _captions()
    out = model(x, t, y, mask)
    diff = (out - ref).abs().max().item()
    print(f"re-param vs diffusers DiT output at t=500 (class term removed): max |diff| {diff:.3g}")
    assert diff <= 1e-5
    # the copied parts are DiT's own
    assert torch.equal(model.x_embedder.proj.weight, dm.pos_embed.proj.weight)
    assert torch.equal(model.blocks[1].attn.qkv.weight[96:], dm.transformer_blocks[1].attn1.to_v.weight)
    assert torch.equal(model.final_layer.linear.weight, dm.proj_out_2.weight)


def test_convert_cli_path_from_diffusers_dit_folder(tmp_path):
    dm = _diffusers_dit(seed=3)
    dm.save_pretrained(str(tmp_path / "dit"))
    convert_file("dit", "ours", str(tmp_path / "dit"), str(tmp_path / "pixart"), reparam_t=500,
                 model_json='{"caption_channels": 32, "max_text_tokens": 8}')
    model, res = load_model(str(tmp_path / "pixart"))
    assert res == 64 and model.cfg.adaln == "single" and model.cfg.condition == "text"
    assert model.pe_interpolation == 1.0  # DiT's grid: positions are token indices
    x = torch.randn(2, 4, 8, 8)
    t = torch.full((2,), 500)
    with torch.no_grad():
        ref = _without_class(dm)(x, t, class_labels=torch.tensor([0, 1])).sample
        torch.testing.assert_close(model(x, t, *_captions()), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("adaln", ["block", "single"])
def test_from_our_class_model_and_facebookresearch_keys(tmp_path, adaln):
    cfg = tiny_cfg(adaln=adaln, condition="class", attention="sdpa", pe_interpolation=1.0)
    stage1 = randomize(build_model(cfg)).eval()
    no_class = copy.deepcopy(stage1)
    with torch.no_grad():
        no_class.y_embedder.embedding_table.weight.zero_()
    x = torch.randn(2, 4, 8, 8)
    t = torch.full((2,), 500)
    with torch.no_grad():
        ref = no_class(x, t, torch.tensor([1, 2]))

    # library path, as the trainer's stage-2 init uses it: the stage-2 recipe's model config as target
    stage2_cfg = tiny_cfg(attention="sdpa", pe_interpolation=1.0).model
    model = dit_to_pixart(stage1, stage2_cfg, reparam_t=500).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, *_captions()), ref, rtol=0, atol=1e-5)
    if adaln == "single":  # nothing to re-parameterize: t_block and the tables carry over
        assert torch.allclose(model.blocks[0].scale_shift_table, stage1.blocks[0].scale_shift_table, atol=1e-6)
    # the same seed gives the same new (text) weights, so model and EMA convert consistently
    again = dit_to_pixart(stage1, stage2_cfg, reparam_t=500)
    assert torch.equal(again.blocks[0].cross_attn.q_linear.weight, model.blocks[0].cross_attn.q_linear.weight)

    if adaln == "block":  # facebookresearch DiT-XL-2-256x256.pt layout: a bare state dict with pos_embed
        sd = dict(stage1.state_dict())
        sd["pos_embed"] = stage1.pos_embed.clone()
        torch.save(sd, tmp_path / "DiT-tiny.pt")
        convert_file("dit", "ours", str(tmp_path / "DiT-tiny.pt"), str(tmp_path / "out"),
                     model_json={"caption_channels": 32, "max_text_tokens": 8, "num_heads": 3})
        conv, res = load_model(str(tmp_path / "out"))
        assert res == 64
        with torch.no_grad():
            torch.testing.assert_close(conv(x, t, *_captions()), ref, rtol=0, atol=1e-5)


def test_reparam_refuses_mismatched_target():
    stage1 = build_model(tiny_cfg(adaln="block", condition="class", attention="sdpa"))
    with pytest.raises(ValueError, match="depth = 3 but the DiT source has 2"):
        dit_to_pixart(stage1, {**TARGET, "depth": 3})
    with pytest.raises(ValueError, match="class-conditional"):
        dit_to_pixart(build_model(tiny_cfg(attention="sdpa")))
    with pytest.raises(ValueError, match="adaln=single, condition=text"):
        dit_to_pixart(stage1, {**TARGET, "adaln": "block"})
