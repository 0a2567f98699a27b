"""`pixart-ds sample`: images from any checkpoint (pixart_ds.train.weights.resolve_checkpoint) with
classifier-free guidance (pixart_ds.diffusion.sampling).

Output: 0000.png, 0001.png, ... (image i is seeded with --seed + i, whatever the batch), grid.png for several
prompts, and samples.json recording every setting, the scheduler config and the versions.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import diffusers
import torch
import transformers

from pixart_ds import config
from pixart_ds.config import VAE_SCALE
from pixart_ds.diffusion.sampling import (SAMPLERS, check_text_width, generate, image_size, make_grid, make_scheduler,
                                          to_pil)
from pixart_ds.fsutil import atomic_write, atomic_write_json
from pixart_ds.model.encoders import load_text_encoder, load_vae
from pixart_ds.train.weights import build_sampling_model, resolve_checkpoint


def read_prompts(prompts, prompts_file) -> list[str]:
    out = list(prompts or [])
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise FileNotFoundError(f"--prompts-file not found: {prompts_file}")
        with open(prompts_file, encoding="utf-8") as f:
            out += [ln.rstrip("\n") for ln in f if ln.strip()]
    if not out:
        raise ValueError("no prompt given: use --prompt TEXT (repeatable) or --prompts-file FILE")
    return out


def _versions() -> dict:
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def run(ckpt, prompts=None, prompts_file=None, sampler="dpm-solver", steps=20, guidance=4.5, seed=0,
    resolution=None, aspect_ratio=None, out="samples", vae=None, text_encoder=None, use_ema=True,
    device=None, uncond: Optional[str] = None, batch_size: int = 8) -> int:
    """`pixart-ds sample`: PNGs (one per prompt, image i seeded with seed + i), grid.png for several prompts and
    samples.json recording every setting. Bad input raises a one-line ValueError/FileNotFoundError."""
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler {sampler!r}: choose from {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"--steps {steps}: must be >= 1")
    prompt_list = read_prompts(prompts, prompts_file)
    ck = resolve_checkpoint(ckpt, use_ema=use_ema)
    mc = ck.model_cfg
    res = int(resolution or ck.resolution)
    height, width = image_size(res, aspect_ratio, mc.patch_size, mc.multi_scale)
    vae_path = vae or ck.vae
    te_path = text_encoder or ck.text_encoder
    if not vae_path:
        raise ValueError(f"--vae is required: checkpoint {ckpt} names no VAE")
    is_text = mc.condition == "text"
    if is_text and not te_path:
        raise ValueError(f"--text-encoder is required: checkpoint {ckpt} names no text encoder")
    if uncond in (None, "auto"):
        uncond = "null" if (ck.has_null_caption or not is_text) else "empty"
    if uncond not in ("null", "empty") or (uncond == "empty" and not is_text):
        raise ValueError(f"--uncond {uncond!r}: choose auto, null or (text models) empty")

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    tokenizer = te = None
    if is_text:
        tokenizer, te = load_text_encoder(te_path, dtype="bf16" if on_gpu else "fp32", device=device)
        check_text_width(te, mc.caption_channels, te_path)
    vae_model = load_vae(vae_path, dtype="fp32", device=device)
    if int(vae_model.config.latent_channels) != mc.in_channels:
        raise ValueError(f"VAE {vae_path}: latent_channels={vae_model.config.latent_channels} does not match the "
                         f"model's in_channels={mc.in_channels}")
    model = build_sampling_model(ck, device)
    schedule = ck.schedule

    t0 = time.time()
    result = generate(model, mc, prompt_list, vae=vae_model, tokenizer=tokenizer, text_encoder=te, schedule=schedule,
                      sampler=sampler, steps=steps, guidance=guidance,
                      seeds=[seed + i for i in range(len(prompt_list))], height=height, width=width, uncond=uncond,
                      device=device, batch_size=batch_size, autocast_dtype=torch.bfloat16 if on_gpu else None,
                      progress=True, vae_scale=float(getattr(vae_model.config, "scaling_factor", VAE_SCALE)))
    seconds = time.time() - t0

    os.makedirs(out, exist_ok=True)
    pils = to_pil(result.images)
    files = []
    for i, im in enumerate(pils):
        name = f"{i:04d}.png"
        atomic_write(os.path.join(out, name), im.save)
        files.append(name)
    if len(pils) > 1:
        atomic_write(os.path.join(out, "grid.png"), make_grid(pils).save)
    record = {
        "checkpoint": os.path.abspath(ckpt), "checkpoint_kind": ck.kind, "weights": ck.weights,
        "use_ema": use_ema, "model": config.to_dict(mc), "trained_resolution": ck.resolution,
        "sampler": sampler, "steps": steps, "guidance": guidance, "seed": seed, "resolution": res,
        "aspect_ratio": aspect_ratio, "height": height, "width": width,
        "unconditional": {"null": "null caption y_embedding (drop=True)" if is_text else "null class (drop=True)",
                          "empty": 'T5 features of ""'}[uncond],
        "vae": os.path.abspath(vae_path), "text_encoder": os.path.abspath(te_path) if te_path else None,
        "device": str(device), "precision": "bf16 autocast" if on_gpu else "fp32",
        "scheduler": dict(make_scheduler(sampler, schedule, mc.pred_sigma).config),
        "images": [{"file": f, "prompt": p, "seed": s} for f, p, s in zip(files, prompt_list, result.seeds)],
        "grid": "grid.png" if len(pils) > 1 else None, "seconds": round(seconds, 3), "versions": _versions(),
    }
    atomic_write_json(os.path.join(out, "samples.json"), record)
    print(f"wrote {len(files)} image(s) to {out} ({sampler}, {steps} steps, guidance {guidance}, "
          f"{height}x{width}, {seconds:.1f}s)")
    return 0


def main(a) -> int:
    return run(ckpt=a.ckpt, prompts=a.prompt, prompts_file=a.prompts_file, sampler=a.sampler, steps=a.steps,
               guidance=a.guidance, seed=a.seed, resolution=a.resolution, aspect_ratio=a.aspect_ratio, out=a.out,
               vae=a.vae, text_encoder=a.text_encoder, use_ema=not a.raw, device=a.device, uncond=a.uncond)
