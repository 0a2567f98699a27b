"""A diffusers PixArtAlphaPipeline folder from our weights (`pixart-ds export --to diffusers`).

`write_pipeline` writes a complete PixArtAlphaPipeline folder (transformer, vae, text_encoder, tokenizer,
scheduler, model_index.json) into a temporary directory and renames it into place, so a failed export leaves
nothing behind. The scheduler is the DPM-Solver++ configuration `pixart-ds sample` uses (sampling.dpm_solver_config).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import sys

import diffusers
from diffusers import DPMSolverMultistepScheduler
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from pixart_ds.config import ModelConfig
from pixart_ds.diffusion.sampling import dpm_solver_config
from pixart_ds.diffusion.schedule import Schedule
from pixart_ds.fsutil import write_dir_atomic
from pixart_ds.model.convert import write_diffusers

_MODEL_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")


def _copy_model_files(src: str, dst: str) -> list[str]:
    """Copy a from_pretrained folder's config and weight files (no re-serialisation: bytes stay identical)."""
    os.makedirs(dst, exist_ok=True)
    names = sorted({os.path.basename(p) for pat in _MODEL_FILES for p in glob.glob(os.path.join(src, pat))})
    for n in names:
        shutil.copy2(os.path.join(src, n), os.path.join(dst, n))
    return names


def _encoder_dirs(text_encoder: str, vae: str) -> tuple[str, str, str]:
    """(tokenizer dir, T5 dir, VAE dir), accepting pipeline-style roots with tokenizer/, text_encoder/, vae/."""
    for p, what in ((text_encoder, "text encoder"), (vae, "VAE")):
        if not p or not os.path.isdir(p):
            raise FileNotFoundError(f"{what} folder not found: {p}")
    te_dir, tok_dir = text_encoder, text_encoder
    if os.path.isdir(os.path.join(text_encoder, "text_encoder")):
        te_dir = os.path.join(text_encoder, "text_encoder")
        tok_dir = os.path.join(text_encoder, "tokenizer")
    vae_dir = os.path.join(vae, "vae") if os.path.isfile(os.path.join(vae, "vae", "config.json")) else vae
    for d, what in ((te_dir, "text encoder"), (vae_dir, "VAE")):
        if not os.path.isfile(os.path.join(d, "config.json")):
            raise FileNotFoundError(f"{what} folder {d}: no config.json")
    return tok_dir, te_dir, vae_dir


def write_pipeline(out: str, ckpt: str, state_dict: dict, mc: ModelConfig, resolution: int, schedule: Schedule,
                   vae: str, text_encoder: str) -> None:
    """A folder `PixArtAlphaPipeline.from_pretrained(out)` loads and runs, from the weights `state_dict` of the
    checkpoint `ckpt` (named in errors), the VAE and T5 folders `vae` and `text_encoder`.

    Notes: diffusers' pipeline uses T5("") as its unconditional input (it has no null caption); our exported
    transformer folder keeps the null caption in y_embedding.safetensors for `pixart-ds sample --ckpt OUT`.
    The pipeline passes size / aspect-ratio conditions only to 1024-px (sample_size 128) transformers, and its
    default resolution binning knows 256 / 512 / 1024 px only (use_resolution_binning=False otherwise).
    """
    if mc.adaln != "single" or mc.condition != "text":
        raise ValueError(f"checkpoint {ckpt}: diffusers' PixArtAlphaPipeline needs an adaLN-single text-conditional "
                         f"model; this one is adaln={mc.adaln}, condition={mc.condition}")
    tok_dir, te_dir, vae_dir = _encoder_dirs(text_encoder, vae)
    with open(os.path.join(te_dir, "config.json")) as f:
        d_model = json.load(f).get("d_model")
    if d_model != mc.caption_channels:
        raise ValueError(f"text encoder {text_encoder}: width d_model={d_model} does not match the model's "
                         f"caption_channels={mc.caption_channels}")
    with open(os.path.join(vae_dir, "config.json")) as f:
        latent_ch = json.load(f).get("latent_channels")
    if latent_ch != mc.in_channels:
        raise ValueError(f"VAE {vae}: latent_channels={latent_ch} does not match the model's "
                         f"in_channels={mc.in_channels}")
    if mc.multi_scale and resolution != 1024:
        print(f"pixart-ds export: warning: diffusers' PixArtAlphaPipeline passes size/aspect-ratio conditions only "
              f"to 1024-px transformers; this multi-scale {resolution}-px model needs them passed to the "
              f"transformer by hand (added_cond_kwargs)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)

    def write(tmp: str) -> None:
        steps = ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"]
        with tqdm(total=len(steps), desc="export", leave=False) as bar:
            write_diffusers(os.path.join(tmp, "transformer"), state_dict, mc, resolution)
            bar.update()
            _copy_model_files(vae_dir, os.path.join(tmp, "vae"))
            bar.update()
            _copy_model_files(te_dir, os.path.join(tmp, "text_encoder"))
            bar.update()
            tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
            bar.update()
            DPMSolverMultistepScheduler(**dpm_solver_config(schedule)).save_pretrained(os.path.join(tmp, "scheduler"))
            bar.update()
        index = {
            "_class_name": "PixArtAlphaPipeline", "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
            "text_encoder": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", type(tokenizer).__name__],
            "transformer": ["diffusers", "PixArtTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)

    write_dir_atomic(out, write)
