"""Checkpoint resolution for sampling, and `pixart-ds export --to diffusers`.

`resolve_checkpoint` accepts what a user has at hand:
- an "ours" folder (model.json + model.safetensors; see model/convert.py), or its model.safetensors;
- a diffusers PixArtTransformer2DModel folder, or a whole diffusers pipeline folder (transformer/ inside, whose
  vae/ and text_encoder/ + tokenizer/ then serve as the default encoders);
- a training run directory, read through `pixart_ds.train.checkpoint.load_weights` (EMA weights by default),
  whose resolved config supplies the default encoders and the diffusion schedule.

`export_diffusers` writes a complete PixArtAlphaPipeline folder (transformer, vae, text_encoder, tokenizer,
scheduler, model_index.json) into a temporary directory and renames it into place, so a failed export leaves
nothing behind. The scheduler is the DPM-Solver++ configuration `pixart-ds sample` uses (sampling.dpm_solver_config).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from pixart_ds.diffusion.schedule import Schedule
from pixart_ds.model.convert import write_dir_atomic


@dataclass
class Checkpoint:
    path: str
    kind: str  # "ours" | "diffusers" | "run"
    weights: str  # "ema" | "raw" (run directories) or "as saved"
    model_cfg: dict  # a ModelConfig as a dict
    resolution: int  # training resolution in pixels
    state_dict: dict = field(repr=False)
    has_null_caption: bool  # a null caption the model was trained with (else sampling uses T5(""))
    vae: Optional[str] = None  # default encoders named by the checkpoint, if any
    text_encoder: Optional[str] = None
    schedule: Schedule = field(default_factory=Schedule.linear)


def _run_config(path: str) -> dict:
    """The resolved recipe of a run, as plain data ({} if none is found).

    RUN_DIR/config.yaml is the recipe of the latest start (train/checkpoint.py); for a checkpoint tag directory
    (RUN_DIR/checkpoints/step_N) we look two levels up, then fall back to the config stored in the checkpoint.
    """
    import yaml

    d = os.path.abspath(path)
    for cand in (d, os.path.dirname(d), os.path.dirname(os.path.dirname(d))):
        p = os.path.join(cand, "config.yaml")
        if os.path.isfile(p):
            with open(p) as f:
                data = yaml.safe_load(f) or {}
            if isinstance(data, dict) and "model" in data:
                return data
    try:
        from pixart_ds.train.checkpoint import find_checkpoint, read_meta

        root, tag = find_checkpoint(d, "sample")
        return dict((read_meta(os.path.join(root, tag)) or {}).get("config") or {})
    except Exception:  # a layout we do not know: defaults apply, the caller names what is missing
        return {}


def _is_diffusers_dir(d: str) -> bool:
    p = os.path.join(d, "config.json")
    if not os.path.isfile(p):
        return False
    try:
        with open(p) as f:
            cls = json.load(f).get("_class_name", "")
    except (OSError, json.JSONDecodeError):
        return False
    return cls in ("PixArtTransformer2DModel", "Transformer2DModel")


def resolve_checkpoint(ckpt: str, use_ema: bool = True) -> Checkpoint:
    """Load weights + model config from any supported checkpoint form (see the module docstring)."""
    from pixart_ds.model import convert

    if not ckpt or not os.path.exists(ckpt):
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    path = ckpt
    if os.path.isfile(path):
        d, name = os.path.split(os.path.abspath(path))
        if name == convert.OURS_WEIGHTS and os.path.isfile(os.path.join(d, convert.OURS_CONFIG)):
            path = d
        elif name.startswith("diffusion_pytorch_model") and _is_diffusers_dir(d):
            path = d
        else:
            raise ValueError(f"checkpoint {ckpt}: a single file is not a supported checkpoint here; give an 'ours' "
                             f"folder, a diffusers folder or a run directory (official .pth files: convert them "
                             f"first with `pixart-ds convert --from official --to ours`)")

    if os.path.isfile(os.path.join(path, convert.OURS_CONFIG)):
        cfg, res, sd = convert.load_ours(path)
        return Checkpoint(ckpt, "ours", "as saved", cfg, res, sd, "y_embedder.y_embedding" in sd)

    pipeline_root = os.path.isfile(os.path.join(path, "model_index.json")) and \
        _is_diffusers_dir(os.path.join(path, "transformer"))
    if _is_diffusers_dir(path) or pipeline_root:
        tdir = os.path.join(path, "transformer") if pipeline_root else path
        cfg, res, sd = convert.read_diffusers(tdir)
        # diffusers drops the null caption; our exports keep it beside the weights (convert.DIFFUSERS_NULL_CAPTION)
        has_null = os.path.isfile(os.path.join(tdir, convert.DIFFUSERS_NULL_CAPTION))
        vae = os.path.join(path, "vae") if pipeline_root and os.path.isdir(os.path.join(path, "vae")) else None
        te = path if pipeline_root and os.path.isdir(os.path.join(path, "text_encoder")) else None
        return Checkpoint(ckpt, "diffusers", "as saved", cfg, res, sd, has_null, vae, te)

    if os.path.isdir(path):
        try:
            from pixart_ds.train.checkpoint import load_weights
        except ImportError as e:  # pragma: no cover - the trainer ships with the package
            raise ValueError(f"checkpoint {ckpt}: looks like a run directory, but the trainer is unavailable: {e}")
        try:
            cfg, res, sd = load_weights(path, use_ema, what="--ckpt")
        except FileNotFoundError as e:
            if "not a run directory" not in str(e):
                raise
            raise FileNotFoundError(
                f"checkpoint {ckpt}: not an 'ours' folder ({convert.OURS_CONFIG} + {convert.OURS_WEIGHTS}), a diffusers "
                f"transformer or pipeline folder, nor a training run directory with checkpoints") from None
        except RuntimeError as e:  # CheckpointError (incomplete save, no EMA): a one-line user error
            raise ValueError(str(e)) from None
        rc = _run_config(path)
        enc = rc.get("encoders") or {}
        diff = rc.get("diffusion") or {}
        schedule = Schedule.linear(int(diff.get("num_timesteps", 1000)), float(diff.get("beta_start", 1e-4)),
                                   float(diff.get("beta_end", 0.02)))
        return Checkpoint(ckpt, "run", "ema" if use_ema else "raw", cfg, res, sd, "y_embedder.y_embedding" in sd,
                          enc.get("vae"), enc.get("text_encoder"), schedule)
    raise ValueError(f"checkpoint {ckpt}: not a recognised checkpoint")


def build_sampling_model(ck: Checkpoint, device="cpu"):
    """The PixArt for `ck` in eval mode on `device`, weights loaded strictly. The model is built at its training
    resolution (positional-embedding base grid and interpolation as trained) and samples any h x w from there."""
    from pixart_ds.model import convert

    cfg = dict(ck.model_cfg)
    # a run may have trained with flash-attn or checkpointing; sampling picks the best backend here
    cfg.update(attention="auto", grad_checkpointing=False)
    model = convert.build_from_dict(cfg, ck.resolution, f"{ck.path} (model config)")
    convert.load_state_dict_strict(model, ck.state_dict, ck.path)
    return model.to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------
# export --to diffusers
# ----------------------------------------------------------------------------------------------------------------

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


def export_diffusers(ckpt: str, out: str, vae: Optional[str] = None, text_encoder: Optional[str] = None,
                     use_ema: bool = True) -> int:
    """`pixart-ds export --to diffusers OUT`: a folder `PixArtAlphaPipeline.from_pretrained(OUT)` loads and runs.

    vae / text_encoder default to those the checkpoint names (a run's resolved config, a pipeline folder).
    Notes: diffusers' pipeline uses T5("") as its unconditional input (it has no null caption); our exported
    transformer folder keeps the null caption in y_embedding.safetensors for `pixart-ds sample --ckpt OUT`.
    The pipeline passes size / aspect-ratio conditions only to 1024-px (sample_size 128) transformers, and its
    default resolution binning knows 256 / 512 / 1024 px only (use_resolution_binning=False otherwise).
    """
    import diffusers
    from diffusers import DPMSolverMultistepScheduler
    from transformers import AutoTokenizer
    from tqdm.auto import tqdm

    from pixart_ds.diffusion.sampling import dpm_solver_config
    from pixart_ds.model import convert

    ck = resolve_checkpoint(ckpt, use_ema=use_ema)
    vae, text_encoder = vae or ck.vae, text_encoder or ck.text_encoder
    if not vae:
        raise ValueError(f"--vae is required: checkpoint {ckpt} names no VAE")
    if not text_encoder:
        raise ValueError(f"--text-encoder is required: checkpoint {ckpt} names no text encoder")
    mc = convert.build_from_dict(dict(ck.model_cfg, attention="sdpa"), ck.resolution, f"{ckpt} (model config)").cfg
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
    if mc.multi_scale and ck.resolution != 1024:
        print(f"pixart-ds export: warning: diffusers' PixArtAlphaPipeline passes size/aspect-ratio conditions only "
              f"to 1024-px transformers; this multi-scale {ck.resolution}-px model needs them passed to the "
              f"transformer by hand (added_cond_kwargs)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    pe = mc.pe_interpolation if mc.pe_interpolation is not None else ck.resolution / 512

    def write(tmp: str) -> None:
        steps = ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"]
        with tqdm(total=len(steps), desc="export", leave=False) as bar:
            convert.write_diffusers(os.path.join(tmp, "transformer"), ck.state_dict, mc, ck.resolution, pe)
            bar.update()
            _copy_model_files(vae_dir, os.path.join(tmp, "vae"))
            bar.update()
            _copy_model_files(te_dir, os.path.join(tmp, "text_encoder"))
            bar.update()
            tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
            bar.update()
            DPMSolverMultistepScheduler(**dpm_solver_config(ck.schedule)).save_pretrained(os.path.join(tmp, "scheduler"))
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
    print(f"pixart-ds export: {ck.kind} {ckpt} ({ck.weights} weights, {ck.resolution} px) -> PixArtAlphaPipeline {out}")
    return 0
