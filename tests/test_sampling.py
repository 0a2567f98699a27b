"""Guidance and samplers on a tiny random PixArt with the tiny T5 and VAE (2-core CPU: a few seconds)."""
import warnings

import pytest
import torch

from pixart_ds import config
from pixart_ds.diffusion import sampling as S
from pixart_ds.diffusion.schedule import Schedule
from pixart_ds.model.encoders import load_text_encoder, load_vae


def tiny_model(condition="text", multi_scale=False, seed=0):
    from pixart_ds.model.pixart import build_model

    cfg = config.from_dict({"model": {"preset": "tiny", "caption_channels": 32, "num_classes": 10,
                                      "condition": condition, "multi_scale": multi_scale, "attention": "math"},
                            "data": {"resolution": 64, "multi_scale": multi_scale}})
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a fresh model predicts exactly 0 (zero final layer); give every weight some signal
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model, cfg.model


@pytest.fixture(scope="module")
def enc(tiny_t5_dir, tiny_vae_dir):
    tok, te = load_text_encoder(tiny_t5_dir, dtype="fp32")
    return tok, te, load_vae(tiny_vae_dir)


PROMPTS = ["a red circle", "a small blue square in the center"]


def test_guidance_one_equals_unguided_model(enc):
    tok, te, _ = enc
    model, mc = tiny_model()
    cond, unc = S.build_conditions(mc, PROMPTS, tokenizer=tok, text_encoder=te)
    noise, _ = S.initial_noise((4, 8, 8), [0, 1], "cpu")
    x, t = noise, torch.tensor([999, 999])
    # the guidance formula at w = 1 through both branches is the conditional output (to fp32 rounding) ...
    u, c = S.GuidedDenoiser(model, cond, unc, 4.5, 4).both(x, t)
    assert (u - c).abs().max() > 1e-3  # the null caption does change the output
    torch.testing.assert_close(S.cfg_combine(u, c, 1.0, 4), c, rtol=0, atol=1e-6)
    # ... so the sampler skips the unconditional branch at 1.0: bit-identical to sampling the bare model
    den = S.GuidedDenoiser(model, cond, unc, 1.0, 4)
    a = S.sample_latents(den, S.make_scheduler("dpm-solver", Schedule.linear()), noise, 5)
    b = S.sample_latents(lambda x_, t_: model(x_, t_, **cond), S.make_scheduler("dpm-solver", Schedule.linear()),
                         noise, 5)
    assert torch.equal(a, b)
    g = S.sample_latents(S.GuidedDenoiser(model, cond, unc, 4.5, 4),
                         S.make_scheduler("dpm-solver", Schedule.linear()), noise, 5)
    assert (g - a).abs().max() > 1e-2


def test_guidance_touches_epsilon_half_only():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 8, 3, 3, generator=g), torch.randn(2, 8, 3, 3, generator=g)
    out = S.cfg_combine(u, c, 4.5, 4)
    torch.testing.assert_close(out[:, :4], u[:, :4] + 4.5 * (c[:, :4] - u[:, :4]))
    assert torch.equal(out[:, 4:], c[:, 4:])  # variance from the conditional branch


@pytest.mark.parametrize("sampler", ["dpm-solver", "ddim", "ddpm"])
def test_samplers_are_seeded_per_image(enc, sampler):
    tok, te, vae = enc
    model, mc = tiny_model()
    kw = dict(vae=vae, tokenizer=tok, text_encoder=te, sampler=sampler, steps=4, guidance=4.5, height=64, width=64)
    r2 = S.generate(model, mc, PROMPTS, seeds=[7, 8], **kw)
    r1 = S.generate(model, mc, PROMPTS[1:], seeds=[8], **kw)
    assert r2.images.shape == (2, 3, 64, 64) and r2.latents.shape == (2, 4, 8, 8)
    assert torch.isfinite(r2.latents).all() and r2.images.abs().max() <= 1
    # image i depends on its own prompt and seed only, not on the rest of the batch (DDPM's step noise included)
    torch.testing.assert_close(r1.latents[0], r2.latents[1], rtol=1e-4, atol=1e-4)
    r3 = S.generate(model, mc, PROMPTS[1:], seeds=[9], **kw)
    assert (r3.latents - r1.latents).abs().max() > 1e-2


def test_ddpm_uses_the_learned_variance(enc):
    tok, te, _ = enc
    model, mc = tiny_model()
    cond, unc = S.build_conditions(mc, PROMPTS[:1], tokenizer=tok, text_encoder=te)
    den = S.GuidedDenoiser(model, cond, unc, 4.5, 4)
    sch = S.make_scheduler("ddpm", Schedule.linear())
    assert sch.config.variance_type == "learned_range" and not sch.config.clip_sample
    def run(fn, scheduler):
        noise, gens = S.initial_noise((4, 8, 8), [0], "cpu")
        return S.sample_latents(fn, scheduler, noise, 3, generators=gens)

    a = run(den, sch)
    # v = -1 selects the lower end of the learned range, beta~_t: the same chain as a fixed-small DDPM
    low = run(lambda x, t: torch.cat([den(x, t)[:, :4], -torch.ones_like(x)], 1), S.make_scheduler("ddpm", Schedule.linear()))
    fixed = run(lambda x, t: den(x, t)[:, :4], S.make_scheduler("ddpm", Schedule.linear(), pred_sigma=False))
    torch.testing.assert_close(low, fixed, rtol=1e-5, atol=1e-5)
    assert (a - fixed).abs().max() > 1e-3  # the network's own variance changes the chain


def test_unconditional_inputs(enc):
    tok, te, _ = enc
    model, mc = tiny_model()
    cond, null = S.build_conditions(mc, PROMPTS, tokenizer=tok, text_encoder=te, uncond="null")
    _, empty = S.build_conditions(mc, PROMPTS, tokenizer=tok, text_encoder=te, uncond="empty")
    assert null["drop"].all() and not cond["drop"].any() and not empty["drop"].any()
    e, m = S.encode_prompts(tok, te, [""], 120, "cpu")
    torch.testing.assert_close(empty["y"][1], e[0])
    assert int(empty["mask"][0].sum()) == 1  # "" is one real token (</s>)
    # class-conditional: prompts are class ids, the null class is drop=True
    cmodel, cmc = tiny_model("class")
    c, u = S.build_conditions(cmc, ["3", "7"])
    assert c["y"].tolist() == [3, 7] and u["drop"].all()
    with pytest.raises(ValueError, match="'cat'.*class ids 0..9"):
        S.build_conditions(cmc, ["cat"])


def test_long_prompt_is_truncated_with_a_warning(enc):
    tok, te, _ = enc
    long = " ".join(["red circle"] * 100)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        emb, mask = S.encode_prompts(tok, te, [long], 120, "cpu")
    assert emb.shape == (1, 120, 32) and int(mask.sum()) == 120
    assert any("truncated" in str(x.message) and "120 tokens" in str(x.message) for x in w)


def test_sizes_and_aspect_ratios():
    assert S.image_size(256, None, 2, False) == (256, 256)
    with pytest.raises(ValueError, match="resolution 100 is not a multiple of 8 x patch size = 16"):
        S.image_size(100, None, 2, False)
    with pytest.raises(ValueError, match="16:9.*not multi-scale"):
        S.image_size(512, "16:9", 2, False)
    with pytest.raises(ValueError, match="--aspect-ratio 'wide'"):
        S.image_size(512, "wide", 2, True)
    h, w = S.image_size(1024, "16:9", 2, True)  # the paper's 1024 bucket nearest to 9/16
    assert (h, w) == (768, 1344)
    h, w = S.image_size(64, "2:1", 2, True)  # no bucket table at 64 px: about 64^2 pixels on the 16-px grid
    assert h % 16 == 0 and w % 16 == 0 and w == 2 * h


def test_multi_scale_model_samples_non_square(enc):
    tok, te, vae = enc
    model, mc = tiny_model(multi_scale=True)
    h, w = S.image_size(64, "2:1", 2, True)
    r = S.generate(model, mc, PROMPTS[:1], vae=vae, tokenizer=tok, text_encoder=te, steps=2, height=h, width=w)
    assert r.images.shape == (1, 3, h, w)
