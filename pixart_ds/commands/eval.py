"""`pixart-ds eval`: FID, KID, CLIP score and the embedded dataset's alignment for a checkpoint (pixart_ds.eval.run).

Run it as one process, under `torchrun --nproc_per_node N -m pixart_ds.cli eval ...`, or one task per GPU with srun
(slurm/eval.sbatch): ranks come from the launcher's environment (pixart_ds.dist.dist_env) and meet only through the
shard files, so no process group is created. The checkpoint is anything `pixart-ds sample` reads
(pixart_ds.train.weights.resolve_checkpoint); the bad-input checks (prompts, weights files) run before any work.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from pixart_ds import config
from pixart_ds.diffusion.sampling import SAMPLERS, check_text_width, image_size
from pixart_ds.dist import dist_env
from pixart_ds.eval.run import (
    Generator,
    SampleSettings,
    ScoreSettings,
    judged,
    read_prompts,
    run_eval,
    weights_signature,
)
from pixart_ds.model.encoders import load_text_encoder, load_vae
from pixart_ds.train.weights import build_sampling_model, resolve_checkpoint


def load_generator(ckpt: str, *, vae: str | None, text_encoder: str | None, resolution: int | None,
                   settings: SampleSettings, use_ema: bool, device) -> tuple[Generator, dict]:
    """A Generator for any checkpoint `pixart-ds sample` reads (run dir / ours / diffusers), + a description."""
    if settings.sampler not in SAMPLERS:
        raise ValueError(f"--sampler {settings.sampler!r}: choose from {', '.join(SAMPLERS)}")
    if settings.steps < 1:
        raise ValueError(f"--steps {settings.steps}: must be >= 1")
    ck = resolve_checkpoint(ckpt, use_ema=use_ema)
    mc = ck.model_cfg
    res = int(resolution or ck.resolution)
    h, w = image_size(res, None, mc.patch_size, mc.multi_scale)
    vae_path, te_path = vae or ck.vae, text_encoder or ck.text_encoder
    is_text = mc.condition == "text"
    if not vae_path:
        raise ValueError(f"--vae is required: checkpoint {ckpt} names no VAE")
    if is_text and not te_path:
        raise ValueError(f"--text-encoder is required: checkpoint {ckpt} names no text encoder")
    uncond = settings.uncond
    if uncond in (None, "auto"):
        uncond = "null" if (ck.has_null_caption or not is_text) else "empty"
    dev = torch.device(device)
    tok = te = None
    if is_text:
        tok, te = load_text_encoder(te_path, dtype="bf16" if dev.type == "cuda" else "fp32", device=dev)
        check_text_width(te, mc.caption_channels, te_path)
    vae_model = load_vae(vae_path, dtype="fp32", device=dev)
    with torch.random.fork_rng(devices=[]):  # building the module initialises weights from the global RNG
        model = build_sampling_model(ck, dev)
    gen = Generator(model, mc, vae_model, tok, te, ck.schedule, h, w,
                    float(getattr(vae_model.config, "scaling_factor", config.VAE_SCALE)), dev, settings, uncond)
    desc = {"checkpoint": os.path.abspath(ckpt), "kind": ck.kind, "weights": ck.weights,
            "weights_signature": weights_signature(ck.state_dict), "trained_resolution": ck.resolution,
            "height": h, "width": w, "vae": os.path.abspath(vae_path),
            "text_encoder": os.path.abspath(te_path) if te_path else None, "unconditional": uncond,
            "model": dataclasses.asdict(mc)}
    return gen, desc


def main(a) -> int:
    env = dist_env()
    if a.device:
        device = a.device
    elif torch.cuda.is_available():
        device = f"cuda:{env.local_rank % torch.cuda.device_count()}"
    else:
        device = "cpu"
    if a.batch_size < 1:
        raise ValueError(f"--batch-size {a.batch_size}: must be >= 1")
    prompts = read_prompts(a.prompts)  # before loading anything: a bad prompt file is a one-line error at once
    if not (a.reference or a.clip or judged(prompts)) and a.judge != "on":
        raise ValueError("nothing to score: give --reference (+ --inception) for FID/KID, --clip for CLIP score, or "
                         "prompts from the embedded dataset for the alignment judge")
    for flag, path in (("--inception", a.inception), ("--reference", a.reference), ("--clip", a.clip)):
        if path and not os.path.exists(path):
            what = "Inception-v3 weights file" if flag == "--inception" else "path"
            raise FileNotFoundError(f"{flag}: {what} not found: {path}")
    if a.reference and not a.inception:
        raise FileNotFoundError("--inception: a reference was given but no Inception-v3 weights file (FID and KID "
                                "need one; nothing is downloaded)")
    sample = SampleSettings(a.sampler, a.steps, a.guidance, a.seed, a.batch_size, a.uncond)
    gen, desc = load_generator(a.ckpt, vae=a.vae, text_encoder=a.text_encoder, resolution=a.resolution,
                               settings=sample, use_ema=not a.raw, device=device)
    rec = run_eval(gen, desc, prompts=prompts, prompts_path=a.prompts, out=a.out, reference=a.reference,
                   inception=a.inception, clip=a.clip, num_images=a.num_images,
                   score=ScoreSettings(a.kid_subsets, a.kid_subset_size, 0, 64, a.judge), shard_size=a.shard_size,
                   save_images=not a.no_images, grid_images=a.grid_images, cache_dir=a.cache_dir,
                   reference_images=a.reference_images, reference_resize=a.reference_resize, rank=env.rank,
                   world=env.world_size, device=device, progress=not a.no_progress)
    if rec is not None:
        m = rec["metrics"]
        parts = []
        if "fid" in m:
            parts.append(f"FID {m['fid']:.4f}")
            if m.get("kid"):
                parts.append(f"KID {m['kid']['mean']:.6f} ± {m['kid']['std']:.6f}")
        if "clip_score" in m:
            parts.append(f"CLIP score {m['clip_score']:.4f}")
        if "judge" in m:
            parts.append(f"alignment {m['judge']['alignment']:.4f}")
        print(f"pixart-ds eval: {', '.join(parts)} ({rec['prompts']['images']} images); "
              f"{os.path.join(a.out, 'eval.json')}, {os.path.join(a.out, 'eval.md')}, {rec['grid']}", flush=True)
    return 0
