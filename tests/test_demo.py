"""`pixart-ds demo`: the recipes it runs, and the whole pipeline at the reduced --small size in a subprocess
(embedded data -> features -> stage 1 on 2 ZeRO-2 ranks -> stage 2 re-parameterized from it -> judged samples)."""
import json
import os

import pytest
import yaml
from PIL import Image

from pixart_ds import config
from pixart_ds.commands import demo
from pixart_ds.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_recipes_fit_the_demo():
    s1, s2 = config.load(demo.STAGE1_RECIPE), config.load(demo.STAGE2_RECIPE)
    assert (s1.model.condition, s1.model.adaln) == ("class", "block")
    assert (s2.model.condition, s2.model.adaln) == ("text", "single")
    assert s2.train.init_from == s1.run_dir
    assert s1.model.num_classes == synthetic.NUM_CLASSES
    # The re-parameterization keeps every size: the stages must agree on them.
    for k in ("depth", "hidden_size", "num_heads", "patch_size", "mlp_ratio", "in_channels", "pred_sigma"):
        assert getattr(s1.model, k) == getattr(s2.model, k), k
    assert s1.data.resolution == s2.data.resolution == 128 and config.latent_size(s2) == 16
    assert s1.encoders.vae_scale == s2.encoders.vae_scale
    assert s1.data.caption_dropout == s2.data.caption_dropout == 0.1


def test_demo_recipes_match_the_fitted_vae():
    """encoders.vae_scale is the shipped VAE's scaling_factor (1 / std of its posterior means, synthetic_vae.fit)."""
    with open(os.path.join(demo.ASSET_VAE, "config.json")) as f:
        vc = json.load(f)
    for r in (demo.STAGE1_RECIPE, demo.STAGE2_RECIPE):
        cfg = config.load(r)
        assert cfg.encoders.vae_scale == pytest.approx(vc["scaling_factor"], rel=1e-6), r
        assert cfg.model.in_channels == vc["latent_channels"]
        assert os.path.abspath(os.path.join(REPO, cfg.encoders.vae)) == os.path.abspath(demo.ASSET_VAE)


def test_demo_text_settings_fit_the_small_t5(tiny_t5_dir):
    """Stage 2's text width is the demo T5's, and every caption the demo trains or samples on fits its tokens
    (the tokenizer is make_tiny_t5's whatever the width)."""
    from pixart_ds.model.encoders import load_text_encoder

    tok, _ = load_text_encoder(tiny_t5_dir, dtype="fp32")
    s2 = config.load(demo.STAGE2_RECIPE)
    assert s2.model.caption_channels == demo.DEMO_T5["d_model"]
    caps = [synthetic.caption(synthetic.attributes(i, demo.DATA_SEED)) for i in range(demo.FULL["text_images"])]
    caps += synthetic.held_out_prompts(demo.FULL["eval_prompts"], seed=demo.DATA_SEED)
    assert max(len(tok(c)["input_ids"]) for c in caps) <= s2.model.max_text_tokens


def test_demo_bad_input_is_one_line(run_cli, tmp_path):
    p = run_cli("demo", "--out", tmp_path / "d", "--ranks", "0", timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == "pixart-ds demo: error: --ranks must be >= 1, got 0"
    p = run_cli("demo", "--out", tmp_path / "d", "--vae", tmp_path / "nope", timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("pixart-ds demo: error: --vae ") and "nope" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "d" / "stage1")


def test_demo_small_end_to_end(run_cli, tmp_path):
    out = tmp_path / "demo"
    p = run_cli("demo", "--small", "--out", out, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    with open(out / "demo_summary.json") as f:
        s = json.load(f)
    assert s["mode"] == "small" and s["world_size"] == 2

    # Features were extracted by `pixart-ds features` on the same 2 ranks, each writing its own partition.
    for key in ("features_class", "features_text"):
        with open(out / "data" / f"{key}.summary.json") as f:
            fs = json.load(f)
        assert fs["world_size"] == 2 and fs["written"] == s["images"]["stage1" if key == "features_class" else "stage2"]
        assert sorted(n for n in os.listdir(out / "data" / key) if not n.startswith(".")) == [
            "index.json", "manifest.jsonl", "part-00000-of-00002", "part-00001-of-00002"]

    # Both stages trained to their last step and left a complete checkpoint, written by 2 ZeRO-2 ranks.
    small = {k: dict(o.split("=", 1) for o in v) for k, v in demo.SMALL_OVERRIDES.items()}
    for stage, condition, adaln in (("stage1", "class", "block"), ("stage2", "text", "single")):
        rec = s[stage]
        steps = int(small[stage]["train.total_steps"])
        assert rec["steps"] == steps and rec["world_size"] == 2
        assert rec["images_seen"] == steps * int(small[stage]["train.global_batch_size"])
        ck = rec["checkpoint"]
        assert os.path.basename(ck) == f"step_{steps:08d}" and os.path.isfile(os.path.join(ck, "pixart_ds.json"))
        parts = sorted(f for f in os.listdir(ck) if f.endswith("_optim_states.pt"))
        assert len(parts) == 2 and "zero_pp_rank_0_" in parts[0] and "zero_pp_rank_1_" in parts[1]
        with open(out / stage / "config.yaml") as f:  # the resolved recipe, kept in the run directory
            cfg = config.from_dict(yaml.safe_load(f))
        assert (cfg.model.condition, cfg.model.adaln, cfg.train.zero_stage) == (condition, adaln, 2)
        assert cfg.encoders.vae_scale == pytest.approx(s["vae"]["scaling_factor"])
        assert rec["first_loss"] > 0 and rec["last_loss_avg"] > 0

    # Stage 2 started from stage 1 through the DiT -> PixArt re-parameterization (the trainer's own record).
    with open(out / "stage2" / "config.yaml") as f:
        assert os.path.abspath(yaml.safe_load(f)["train"]["init_from"]) == str(out / "stage1")
    with open(out / "stage2" / "metrics.jsonl") as f:
        start = [json.loads(ln) for ln in f if '"event": "start"' in ln][0]
    assert start["init"].startswith("re-parameterized from class-conditional") and "t=500" in start["init"]
    assert s["stage2"]["init"] == start["init"]

    # The judged sample grids and the alignment score: printed, recorded, a fraction of the judged images.
    n = demo.SMALL["eval_prompts"]
    for name in ("heldout", "indist"):
        grid = Image.open(s["scores"][name]["grid"])
        assert grid.size[0] > 128 * min(n, 8) and grid.size[1] >= 128
    with open(out / "samples" / "alignment.json") as f:
        detail = json.load(f)
    held = detail["sets"]["heldout"]["images"]
    assert [im["prompt"] for im in held] == synthetic.held_out_prompts(n, seed=demo.DATA_SEED)
    assert all(tuple(synthetic.parse_prompt(im["prompt"])[k] for k in ("shape", "color", "background"))
               in synthetic.HELD_OUT for im in held)
    a = s["alignment"]
    assert isinstance(a, float) and 0.0 <= a <= 1.0
    assert a == pytest.approx(sum(im["ok"] for im in held) / n)
    indist = detail["sets"]["indist"]["images"]
    assert len(indist) == n and s["alignment_in_distribution"] == pytest.approx(sum(im["ok"] for im in indist) / n)
    assert f"alignment score (held-out prompts, shape + colour + background): {a:.3f}" in p.stdout
    for phase in ("data", "encoders", "features", "stage1", "stage2", "sample"):
        assert s["seconds"][phase] > 0 and f"== {phase} done in" in p.stdout
    assert s["seconds"]["total"] == pytest.approx(sum(s["seconds"][k] for k in s["seconds"] if k != "total"), abs=1.0)


def test_small_t5_tokenizer_keeps_words_whole_and_spells_out_the_rest(tiny_t5_dir):
    """Every word of a demo caption is one token (as a real T5 keeps common words whole); unknown words are spelt
    out in characters, never <unk>."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_t5_dir)
    cap = synthetic.caption(synthetic.attributes(0, demo.DATA_SEED))
    assert tok.tokenize(cap) == ["\u2581" + w for w in cap.split()]
    assert tok(cap)["input_ids"][-1] == tok.eos_token_id
    assert tok.tokenize("a zebra") == ["\u2581a", "\u2581z", "e", "b", "r", "a"]
    assert tok.unk_token_id not in tok("Zebra, 42 cats!")["input_ids"]


def _role_probe_score(t5_dir: str, steps: int = 200) -> float:
    """Train a one-layer cross-attention read-out (learned queries over projected T5 tokens, as the model's cross
    attention reads them) on training captions to name the object's colour, the background's colour and the shape;
    return the fraction of held-out captions ((shape, colour, background) triples never in training) it gets
    entirely right."""
    import torch

    from pixart_ds.model.encoders import encode_text, load_text_encoder

    tok, te = load_text_encoder(t5_dir, dtype="fp32")

    def feats(attrs):
        with torch.no_grad():
            e, m = encode_text(tok, te, [synthetic.caption(a) for a in attrs], 16)
        y = torch.tensor([[synthetic.COLORS.index(a["color"]), synthetic.COLORS.index(a["background"]),
                           synthetic.SHAPES.index(a["shape"])] for a in attrs])
        return e, m, y

    train = [synthetic.attributes(i, demo.DATA_SEED) for i in range(1024)]
    held = []
    for i, triple in enumerate(sorted(synthetic.HELD_OUT) * 8):
        a = synthetic.attributes(i, 7)
        a["shape"], a["color"], a["background"] = triple
        held.append(a)
    (e, m, y), (he, hm, hy) = feats(train), feats(held)
    torch.manual_seed(0)
    w = 64
    proj = torch.nn.Sequential(torch.nn.Linear(e.shape[-1], w), torch.nn.GELU(), torch.nn.Linear(w, w))
    queries = torch.nn.Parameter(torch.randn(3, w) * 0.02)
    attn = torch.nn.MultiheadAttention(w, 4, batch_first=True)
    heads = torch.nn.ModuleList([torch.nn.Linear(w, 6), torch.nn.Linear(w, 6), torch.nn.Linear(w, 4)])
    params = [queries, *proj.parameters(), *attn.parameters(), *heads.parameters()]

    def logits(e, m):
        k = proj(e)
        o, _ = attn(queries[None].expand(len(e), -1, -1), k, k, key_padding_mask=m == 0)
        return [h(o[:, i]) for i, h in enumerate(heads)]

    opt = torch.optim.Adam(params, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(train), (64,), generator=g)
        loss = sum(torch.nn.functional.cross_entropy(o, y[idx, i]) for i, o in enumerate(logits(e[idx], m[idx])))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        right = torch.stack([o.argmax(1) == hy[:, i] for i, o in enumerate(logits(he, hm))]).all(0)
    return right.float().mean().item()


def test_demo_t5_features_bind_each_colour_to_its_noun(tmp_path):
    """The demo's T5 (DEMO_T5: a random T5 whose relative-attention bias is a neighbour prior) gives each word its
    neighbours' features, so a model reading it can tell whose colour is whose: a small cross-attention read-out
    trained briefly on training captions names shape, colour and background of held-out combinations. A T5 of the
    same size with its random bias cannot yet (its words carry the caption's average, not their neighbours)."""
    import torch

    from pixart_ds.model.encoders import load_text_encoder, make_tiny_t5

    demo_t5 = make_tiny_t5(str(tmp_path / "demo_t5"), **demo.DEMO_T5)
    plain = make_tiny_t5(str(tmp_path / "plain"), **{**demo.DEMO_T5, "neighbour_bias": 0.0})

    # The prior survives save/load: in block 0, head 0 looks mostly at the next word, head 1 at the previous one.
    tok, te = load_text_encoder(demo_t5, dtype="fp32")
    ids = tok([synthetic.caption(synthetic.attributes(0, demo.DATA_SEED))], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        att = te(input_ids=ids, output_attentions=True).attentions[0][0]  # [heads, query, key]
    n = ids.shape[1]
    assert att[0, :-1].argmax(-1).tolist() == list(range(1, n))
    assert att[1, 1:].argmax(-1).tolist() == list(range(0, n - 1))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread is fastest, and the result does not depend on it
    try:
        assert _role_probe_score(demo_t5) >= 0.95
        assert _role_probe_score(plain) < 0.5
    finally:
        torch.set_num_threads(threads)


def test_fit_vae_verb_writes_a_loadable_vae(run_cli, tmp_path):
    """`pixart-ds fit-vae` (how the shipped pixart_ds/data/assets/synthetic_vae was made), at a tiny size: an
    AutoencoderKL folder from_pretrained reads, its scaling_factor = 1 / std of the posterior means, fit.json beside."""
    from diffusers import AutoencoderKL

    out = tmp_path / "vae"
    p = run_cli("fit-vae", "--out", out, "--steps", 2, "--batch-size", 4, "--num-images", 16, "--workers", 1,
                timeout=900, check=True)
    stats = json.loads(p.stdout.strip().splitlines()[-1])
    assert stats["steps"] == 2 and stats["num_images"] == 16 and stats["scaling_factor"] > 0
    assert json.loads((out / "fit.json").read_text()) == stats
    vae = AutoencoderKL.from_pretrained(str(out), local_files_only=True)
    assert vae.config.scaling_factor == pytest.approx(stats["scaling_factor"])
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary folder left beside it
    p = run_cli("fit-vae", "--out", out, "--steps", 0)
    assert p.returncode == 2 and p.stderr.startswith("pixart-ds fit-vae: error:")
