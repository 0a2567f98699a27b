"""Helpers for the evaluation tests: a tiny CLIP built offline (random weights, a character-level BPE vocabulary),
saved as a transformers `from_pretrained` folder; embedded-dataset images."""
from __future__ import annotations

import json
import os

import numpy as np
import torch


def _bytes_to_unicode() -> dict:
    """GPT-2 / CLIP's reversible byte -> printable character table (the alphabet of their BPE vocabularies)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def make_tiny_clip(path: str, seed: int = 2, image_size: int = 32) -> str:
    """A random CLIPModel (2 layers, width 32, patch 8 on 32 px images) + CLIPProcessor whose tokenizer spells words
    out in characters (no merges), saved with save_pretrained."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    os.makedirs(path, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tok = CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"), model_max_length=77)
    improc = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size,
                                                                               "width": image_size})
    sot, eot = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    text = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, bos_token_id=sot, eos_token_id=eot,
                          pad_token_id=eot)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=8)
    cfg = CLIPConfig.from_text_vision_configs(text, vision, projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(cfg).eval().save_pretrained(path)
    CLIPProcessor(image_processor=improc, tokenizer=tok).save_pretrained(path)
    return path


def shapes_uint8(n: int, resolution: int = 64, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """n embedded-dataset images as uint8 [n, 3, R, R] and their captions."""
    from pixart_ds.data import synthetic

    attrs = [synthetic.attributes(i, seed) for i in range(n)]
    imgs = np.stack([np.asarray(synthetic.render(a, resolution)) for a in attrs])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), [synthetic.caption(a) for a in attrs]


def eval_overrides(tmp, t5, vae, every=2, images=4, reference=True):
    """eval.* (+ encoders) overrides for tests/recipes/tiny_text.yaml: embedded-dataset prompts (judged), a random
    Inception with a 4-image reference folder, a tiny CLIP; built once under `tmp`."""
    from pixart_ds.data import synthetic
    from pixart_ds.eval.inception import save_random_inception

    inc = os.path.join(tmp, "inception_random.pt")
    if not os.path.isfile(inc):
        save_random_inception(inc, seed=0)
    ref = os.path.join(tmp, "ref")
    if not os.path.isdir(ref):
        os.makedirs(ref)
        for i in range(4):
            synthetic.render(synthetic.attributes(i, 0), 64).save(os.path.join(ref, f"{i}.png"))
    clip = os.path.join(tmp, "clip")
    if not os.path.isdir(clip):
        make_tiny_clip(clip)
    prompts = [synthetic.caption(synthetic.attributes(i, 7)) for i in range(3)]
    o = [f"encoders.text_encoder={t5}", f"encoders.vae={vae}", f"eval.every_steps={every}",
         f"eval.num_images={images}", f"eval.prompts={json.dumps(prompts)}", "eval.steps=3", "eval.batch_size=2",
         "eval.grid_images=4", "eval.kid_subsets=5", f"eval.cache_dir={os.path.join(tmp, 'cache')}"]
    if reference:
        o += [f"eval.reference={ref}", f"eval.inception={inc}", f"eval.clip={clip}"]
    return o
