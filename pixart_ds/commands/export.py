"""`pixart-ds export --ckpt CKPT --to diffusers OUT`: a PixArtAlphaPipeline folder (pixart_ds.diffusion.pipeline)."""
from __future__ import annotations

from typing import Optional

from pixart_ds.diffusion.pipeline import write_pipeline
from pixart_ds.train.weights import resolve_checkpoint


def run(ckpt: str, out: str, vae: Optional[str] = None, text_encoder: Optional[str] = None,
        use_ema: bool = True) -> int:
    """vae / text_encoder default to those the checkpoint names (a run's resolved recipe, a pipeline folder)."""
    ck = resolve_checkpoint(ckpt, use_ema=use_ema)
    vae, text_encoder = vae or ck.vae, text_encoder or ck.text_encoder
    if not vae:
        raise ValueError(f"--vae is required: checkpoint {ckpt} names no VAE")
    if not text_encoder:
        raise ValueError(f"--text-encoder is required: checkpoint {ckpt} names no text encoder")
    write_pipeline(out, ckpt, ck.state_dict, ck.model_cfg, ck.resolution, ck.schedule, vae, text_encoder)
    print(f"pixart-ds export: {ck.kind} {ckpt} ({ck.weights} weights, {ck.resolution} px) -> PixArtAlphaPipeline {out}")
    return 0


def main(a) -> int:
    return run(ckpt=a.ckpt, out=a.out, vae=a.vae, text_encoder=a.text_encoder, use_ema=not a.raw)
