"""The weights of any checkpoint a user has at hand, for sampling, export, evaluation and stage initialisation.

`resolve_checkpoint` accepts:
- an "ours" folder (model.json + model.safetensors; pixart_ds.model.weights), or its model.safetensors;
- a diffusers PixArtTransformer2DModel folder, or a whole diffusers pipeline folder (transformer/ inside, whose
  vae/ and text_encoder/ + tokenizer/ then serve as the default encoders);
- a training run directory or one of its checkpoints (train/checkpoint.py), EMA weights by default, whose resolved
  recipe supplies the default encoders and the diffusion schedule.

`export_weights` (`pixart-ds ckpt export`) writes a run's consolidated weights as an "ours" folder; `init_weights`
gives a new stage the weights and EMA of an earlier one (`train.init_from`), through the paper's re-parameterization
(§2.3) when a class-conditional stage 1 starts a text-conditional stage 2.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import yaml

from pixart_ds import config as C
from pixart_ds.config import ModelConfig
from pixart_ds.diffusion.schedule import Schedule
from pixart_ds.model import convert
from pixart_ds.model.pixart import PixArt
from pixart_ds.model.reparam import dit_to_pixart
from pixart_ds.model.weights import (OURS_CONFIG, OURS_WEIGHTS, build, check_state_dict, is_ours, load_ours,
                                     load_state_dict_strict, save_ours)
from pixart_ds.train import zero
from pixart_ds.train.checkpoint import META, CheckpointError, find_checkpoint, read_meta

# ----------------------------------------------------------------------------------------------------------------
# Run directories
# ----------------------------------------------------------------------------------------------------------------


def load_weights(path: str, use_ema: bool = True, what: str = "checkpoint") -> tuple[ModelConfig, int, dict]:
    """(model config, resolution, state_dict) from a run directory (its latest checkpoint), a checkpoint tag
    directory or an "ours" folder. use_ema: the EMA weights (fp32), else the optimizer's fp32 master weights."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path) and is_ours(path):
        return load_ours(path)
    root, tag = find_checkpoint(path, what)
    tag_dir = os.path.join(root, tag)
    cfg = C.from_dict(read_meta(tag_dir)["config"], f"{tag_dir}/{META}")
    states = zero.read_model_states(tag_dir)
    module = {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    if use_ema:
        client = states.get(zero.CLIENT_KEY)
        if not client or "ema" not in client:
            raise CheckpointError(f"{tag_dir}: no EMA state in the checkpoint")
        sd = client["ema"]["state_dict"]
    else:
        sd = dict(module)
        sd.update(zero.fp32_weights(root, tag))
    missing = set(module) - set(sd)
    if missing:
        raise CheckpointError(f"{tag_dir}: weights lack {sorted(missing)[:5]}")
    return cfg.model, cfg.data.resolution, {k: sd[k] for k in module}


def export_weights(run_dir: str, out: str, use_ema: bool = True) -> str:
    """Consolidated EMA (or raw fp32) weights of a run as an "ours" folder (model.safetensors + model.json) that
    `sample`, `convert` and `export` read. Returns a one-line description."""
    model_cfg, resolution, sd = load_weights(run_dir, use_ema=use_ema, what="ckpt export")
    save_ours(out, model_cfg, sd, resolution)
    n = sum(v.numel() for v in sd.values())
    return (f"wrote {out} ({'EMA' if use_ema else 'raw'} weights, {len(sd)} tensors, {n:,} values, "
            f"resolution {resolution})")


def transfer_matching(target: dict, source: dict) -> tuple[dict, set]:
    """(target's state dict with every tensor of `source` of the same name and shape copied in, the copied names).
    Tensors only in `source` are dropped; tensors only in `target` keep their values."""
    out, copied = {}, set()
    for k, v in target.items():
        s = source.get(k)
        if s is not None and tuple(s.shape) == tuple(v.shape):
            out[k] = s.detach().clone().to(v.dtype)
            copied.add(k)
        else:
            out[k] = v.detach().clone()
    return out, copied


def init_weights(cfg: C.Config, model: torch.nn.Module) -> tuple[dict, dict, str]:
    """Weights and EMA of an earlier stage for a fresh run (`train.init_from`): (state_dict, ema_state_dict, note).

    The source is a run directory, a checkpoint directory or an "ours" folder. A class-conditional source (stage 1,
    DiT-style) for a text-conditional adaLN-single run (stage 2) goes through the DiT -> PixArt
    re-parameterization at t = train.init_reparam_t (paper §2.3); otherwise the architectures must match exactly.
    """
    src = cfg.train.init_from
    path = os.path.abspath(os.path.expanduser(src))
    if not os.path.exists(path):
        raise FileNotFoundError(f"train.init_from: {src}: no such file or directory")
    if is_ours(path):  # exported weights: one set, used for both
        src_cfg, res, raw = load_weights(path, what="train.init_from")
        ema = raw
    else:
        src_cfg, res, raw = load_weights(path, use_ema=False, what="train.init_from")
        ema = load_weights(path, use_ema=True, what="train.init_from")[2]
    m = cfg.model
    if src_cfg.condition == "class" and m.condition == "text" and m.adaln == "block":
        if src_cfg.adaln != "block":
            raise C.ConfigError(f"train.init_from: {src} is class-conditional adaln={src_cfg.adaln}; a "
                                f"text-conditional model.adaln=block starts from a per-block (DiT-style) model")
        # The paper's per-block adaLN arm (§2.3, Fig. 6 "adaLN"): the DiT-style network keeps its per-block
        # modulation MLPs, so every tensor of the class-conditional model that exists in the text-conditional one
        # (same name, same shape) is copied; the class table is dropped, and the caption projection and
        # cross-attention keep this run's fresh official init (cross-attention output zero, as for adaLN-single).
        fresh = model.state_dict()
        raw, copied = transfer_matching(fresh, raw)
        ema, _ = transfer_matching(fresh, ema)
        new = sorted({"blocks.N." + k.split(".")[2] if k.startswith("blocks.") else k.split(".")[0]
                      for k in fresh if k not in copied})
        note = (f"per-block adaLN from class-conditional {src}: {len(copied)} of {len(fresh)} tensors copied; "
                f"fresh: {', '.join(new)}")
    elif src_cfg.condition == "class" and m.condition == "text":
        if m.adaln != "single":
            raise C.ConfigError(f"train.init_from: {src} is class-conditional; the re-parameterization targets "
                                f"model.adaln=single, got {m.adaln}")
        out = []
        for sd in (raw, ema):
            dit = build(src_cfg, res, f"train.init_from: {src}")
            load_state_dict_strict(dit, sd, f"train.init_from: {src}")
            out.append(dit_to_pixart(dit, target_cfg=m, reparam_t=cfg.train.init_reparam_t,
                                     seed=cfg.train.seed).state_dict())
        raw, ema = out
        note = f"re-parameterized from class-conditional {src} at t={cfg.train.init_reparam_t}"
    else:
        note = f"weights and EMA of {src}"
    want = model.state_dict()
    check_state_dict(want, raw, f"train.init_from: {src}")
    check_state_dict(want, ema, f"train.init_from: {src} (EMA)")
    return raw, ema, note


# ----------------------------------------------------------------------------------------------------------------
# Any checkpoint form (sampling, export, evaluation)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    path: str
    kind: str  # "ours" | "diffusers" | "run"
    weights: str  # "ema" | "raw" (run directories) or "as saved"
    model_cfg: ModelConfig
    resolution: int  # training resolution in pixels
    state_dict: dict = field(repr=False)
    has_null_caption: bool  # a null caption the model was trained with (else sampling uses T5(""))
    vae: Optional[str] = None  # default encoders named by the checkpoint, if any
    text_encoder: Optional[str] = None
    schedule: Schedule = field(default_factory=Schedule.linear)


def _run_config(path: str) -> Optional[C.Config]:
    """The resolved recipe of a run (None if none is found).

    RUN_DIR/config.yaml is the recipe of the latest start (train/checkpoint.py); for a checkpoint tag directory
    (RUN_DIR/checkpoints/step_N) we look two levels up, then fall back to the recipe stored in the checkpoint.
    """
    d = os.path.abspath(path)
    for cand in (d, os.path.dirname(d), os.path.dirname(os.path.dirname(d))):
        p = os.path.join(cand, "config.yaml")
        if os.path.isfile(p):
            with open(p) as f:
                data = yaml.safe_load(f)
            if isinstance(data, dict) and "model" in data:
                return C.from_dict(data, p)
    root, tag = find_checkpoint(d, "--ckpt")
    meta = read_meta(os.path.join(root, tag)) or {}
    return C.from_dict(meta["config"], os.path.join(root, tag, META)) if meta.get("config") else None


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
    if not ckpt or not os.path.exists(ckpt):
        raise FileNotFoundError(f"checkpoint not found: {ckpt}")
    path = ckpt
    if os.path.isfile(path):
        d, name = os.path.split(os.path.abspath(path))
        if name == OURS_WEIGHTS and os.path.isfile(os.path.join(d, OURS_CONFIG)):
            path = d
        elif name.startswith("diffusion_pytorch_model") and _is_diffusers_dir(d):
            path = d
        else:
            raise ValueError(f"checkpoint {ckpt}: a single file is not a supported checkpoint here; give an 'ours' "
                             f"folder, a diffusers folder or a run directory (official .pth files: convert them "
                             f"first with `pixart-ds convert --from official --to ours`)")

    if os.path.isfile(os.path.join(path, OURS_CONFIG)):
        mc, res, sd = load_ours(path)
        return Checkpoint(ckpt, "ours", "as saved", mc, res, sd, "y_embedder.y_embedding" in sd)

    pipeline_root = os.path.isfile(os.path.join(path, "model_index.json")) and \
        _is_diffusers_dir(os.path.join(path, "transformer"))
    if _is_diffusers_dir(path) or pipeline_root:
        tdir = os.path.join(path, "transformer") if pipeline_root else path
        mc, res, sd = convert.read_diffusers(tdir)
        # diffusers drops the null caption; our exports keep it beside the weights (convert.DIFFUSERS_NULL_CAPTION)
        has_null = os.path.isfile(os.path.join(tdir, convert.DIFFUSERS_NULL_CAPTION))
        vae = os.path.join(path, "vae") if pipeline_root and os.path.isdir(os.path.join(path, "vae")) else None
        te = path if pipeline_root and os.path.isdir(os.path.join(path, "text_encoder")) else None
        return Checkpoint(ckpt, "diffusers", "as saved", mc, res, sd, has_null, vae, te)

    if os.path.isdir(path):
        try:
            mc, res, sd = load_weights(path, use_ema, what="--ckpt")
        except FileNotFoundError as e:
            if "not a run directory" not in str(e):
                raise
            raise FileNotFoundError(
                f"checkpoint {ckpt}: not an 'ours' folder ({OURS_CONFIG} + {OURS_WEIGHTS}), a diffusers "
                f"transformer or pipeline folder, nor a training run directory with checkpoints") from None
        rc = _run_config(path)
        enc = rc.encoders if rc else C.EncodersConfig()
        schedule = Schedule.from_config(rc.diffusion if rc else C.DiffusionConfig())
        return Checkpoint(ckpt, "run", "ema" if use_ema else "raw", mc, res, sd, "y_embedder.y_embedding" in sd,
                          enc.vae, enc.text_encoder, schedule)
    raise ValueError(f"checkpoint {ckpt}: not a recognised checkpoint")


def build_sampling_model(ck: Checkpoint, device="cpu") -> PixArt:
    """The PixArt for `ck` in eval mode on `device`, weights loaded strictly. The model is built at its training
    resolution (positional-embedding base grid and interpolation as trained) and samples any h x w from there;
    a run may have trained with flash-attn or checkpointing: sampling picks the best backend here."""
    mc = dataclasses.replace(ck.model_cfg, attention="auto", grad_checkpointing=False)
    model = build(mc, ck.resolution, f"{ck.path} (model config)")
    load_state_dict_strict(model, ck.state_dict, ck.path)
    return model.to(device).eval().requires_grad_(False)
