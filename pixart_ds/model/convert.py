"""Checkpoint interop: official PixArt-alpha .pth <-> ours <-> diffusers (state-dict mapping and file formats).

Our parameter names ARE the official ones (PixArt-alpha diffusion/model/nets/PixArt*.py; for adaln=block /
condition=class the facebookresearch DiT models.py ones), so official <-> ours only unwraps/wraps `state_dict` and
drops/recomputes `pos_embed` (a frozen sin-cos table). Formats:

- official: a torch .pth, {"state_dict": {...}} (a bare dict, or DiT's {"ema": ...}/{"model": ...}, is accepted on
  input). Carries no config: the architecture is inferred from tensor shapes, num_heads from the matching preset,
  the resolution from pos_embed; `--model-json` (a file or an inline JSON object) overrides any of it.
- ours: a folder with model.safetensors (our names) + model.json (ModelConfig as a dict plus "resolution"):
  pixart_ds.model.weights.
- diffusers: a PixArtTransformer2DModel folder (config.json + diffusion_pytorch_model.safetensors, written with
  save_pretrained) or a pipeline folder with transformer/. diffusers has no null caption (its pipeline encodes ""
  instead), so we keep ours beside it in y_embedding.safetensors, which diffusers ignores; that keeps
  official -> ours -> diffusers -> ours exact.

Name mapping ours -> diffusers (scripts/convert_pixart_alpha_to_diffusers.py in diffusers does the reverse):
  x_embedder.proj                  -> pos_embed.proj
  t_embedder.mlp.{0,2}             -> adaln_single.emb.timestep_embedder.linear_{1,2}
  t_block.1                        -> adaln_single.linear
  csize_embedder.mlp.{0,2}         -> adaln_single.emb.resolution_embedder.linear_{1,2}
  ar_embedder.mlp.{0,2}            -> adaln_single.emb.aspect_ratio_embedder.linear_{1,2}
  y_embedder.y_proj.fc{1,2}        -> caption_projection.linear_{1,2}
  blocks.N.scale_shift_table       -> transformer_blocks.N.scale_shift_table
  blocks.N.attn.qkv                -> transformer_blocks.N.attn1.to_{q,k,v}   (row thirds)
  blocks.N.attn.proj               -> transformer_blocks.N.attn1.to_out.0
  blocks.N.cross_attn.q_linear     -> transformer_blocks.N.attn2.to_q
  blocks.N.cross_attn.kv_linear    -> transformer_blocks.N.attn2.to_{k,v}     (row halves)
  blocks.N.cross_attn.proj         -> transformer_blocks.N.attn2.to_out.0
  blocks.N.mlp.fc{1,2}             -> transformer_blocks.N.ff.net.{0.proj,2}
  final_layer.scale_shift_table    -> scale_shift_table
  final_layer.linear               -> proj_out

The DiT -> PixArt re-parameterization (paper §2.3) is pixart_ds.model.reparam.
"""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Optional

import torch
from diffusers import PixArtTransformer2DModel
from safetensors.torch import load_file, save_file

from pixart_ds import config
from pixart_ds.config import PRESETS, VAE_DOWNSAMPLE, ModelConfig
from pixart_ds.fsutil import atomic_write, write_dir_atomic
from pixart_ds.model.weights import _list, check_state_dict, shapes_of

DIFFUSERS_NULL_CAPTION = "y_embedding.safetensors"


# ================================================================================================================
# Architecture inference from official key sets
# ================================================================================================================

def _preset_for(depth: int, hidden: int, patch: int) -> Optional[str]:
    for name, p in PRESETS.items():
        if (p["depth"], p["hidden_size"], p["patch_size"]) == (depth, hidden, patch):
            return name
    return None


def infer_model_config(sd: dict, source: str, overrides: Optional[dict] = None) -> dict:
    """ModelConfig dict from an official/DiT/ours-named state dict; `overrides` wins over anything inferred."""
    overrides = dict(overrides or {})
    need = "x_embedder.proj.weight"
    if need not in sd or "final_layer.linear.weight" not in sd:
        raise ValueError(f"{source}: not a PixArt/DiT checkpoint (no {need} / final_layer.linear.weight; "
                         f"first keys: {_list(sorted(sd), 5)})")
    w = sd["x_embedder.proj.weight"]  # [hidden, in_ch, p, p]
    hidden, in_ch, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    out = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    cfg = dict(depth=depth, hidden_size=hidden, patch_size=patch, in_channels=in_ch,
               mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden if "blocks.0.mlp.fc1.weight" in sd else 4.0,
               adaln="single" if "t_block.1.weight" in sd else "block",
               multi_scale="csize_embedder.mlp.0.weight" in sd)
    if out == 2 * in_ch:
        cfg["pred_sigma"] = True
    elif out == in_ch:
        cfg["pred_sigma"] = False
    else:
        raise ValueError(f"{source}: final_layer.linear gives {out} channels for {in_ch} input channels "
                         f"(expected {in_ch} or {2 * in_ch})")
    if "y_embedder.y_proj.fc1.weight" in sd:
        cfg["condition"] = "text"
        cfg["caption_channels"] = sd["y_embedder.y_proj.fc1.weight"].shape[1]
        if "y_embedder.y_embedding" in sd:
            cfg["max_text_tokens"] = sd["y_embedder.y_embedding"].shape[0]
    elif "y_embedder.embedding_table.weight" in sd:
        cfg["condition"] = "class"
        cfg["num_classes"] = sd["y_embedder.embedding_table.weight"].shape[0] - 1
    preset = _preset_for(depth, hidden, patch)
    if "num_heads" not in overrides:
        if preset is None:
            raise ValueError(f"{source}: cannot infer num_heads for depth {depth}, hidden {hidden} (no preset "
                             f"matches); give it with --model-json '{{\"num_heads\": N}}'")
        cfg["num_heads"] = PRESETS[preset]["num_heads"]
    cfg["preset"] = preset or "PixArt-XL/2"  # explicit depth/hidden/heads/patch below override the preset's
    cfg.update(overrides)
    return cfg


def _read_model_json(model_json) -> dict:
    """--model-json: a path to a JSON file or an inline JSON object."""
    if model_json is None:
        return {}
    if isinstance(model_json, dict):
        return dict(model_json)
    s = str(model_json).strip()
    if s.startswith("{"):
        try:
            return json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"--model-json: not valid JSON: {e}") from None
    if not os.path.isfile(s):
        raise FileNotFoundError(f"{s}: model JSON not found")
    with open(s) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{s}: not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{s}: expected a JSON object of model config keys")
    return d


# ================================================================================================================
# official .pth
# ================================================================================================================

def _torch_load(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with non-tensor payload, truncated file, ...
        raise ValueError(f"{path}: cannot read as a torch checkpoint: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


# Where a checkpoint keeps its weight sets: PixArt's released weights and training checkpoints ("state_dict", plus
# "state_dict_ema" in training checkpoints: official train.py save_checkpoint), DiT's training checkpoints ("model",
# "ema": facebookresearch DiT train.py).
WEIGHT_SETS = {"ema": ("state_dict_ema", "ema"), "raw": ("state_dict", "model")}


def select_weights(obj: dict, path: str, weights: str = "auto") -> tuple[dict, str]:
    """(the chosen weight set, a note saying which) of a checkpoint dict. weights: "ema" | "raw" | "auto" (the EMA
    where the file holds one: it is what sampling and fine-tuning almost always want, as DiT samples from it)."""
    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"--weights {weights!r}: expected ema, raw or auto")
    found = {kind: next((k for k in keys if isinstance(obj.get(k), dict)), None) for kind, keys in WEIGHT_SETS.items()}
    if not any(found.values()):
        if weights != "auto":
            raise ValueError(f"{path}: --weights {weights}: the file is a bare state dict with one weight set (no "
                             f"{'/'.join(k for keys in WEIGHT_SETS.values() for k in keys)} entries)")
        return obj, "the file's only weight set"
    kind = ("ema" if found["ema"] else "raw") if weights == "auto" else weights
    if not found[kind]:
        have = ", ".join(f"{k} ({v!r})" for k, v in found.items() if v)
        raise ValueError(f"{path}: --weights {kind}: no {kind.upper() if kind == 'ema' else kind} weights in the file "
                         f"(it holds {have})")
    others = [v for k, v in found.items() if v and k != kind]
    note = f"{kind} weights ({found[kind]!r}" + (f"; the file also holds {others[0]!r})" if others else ")")
    return obj[found[kind]], note


def read_official_with_pos(path: str, weights: str = "auto") -> tuple[dict, Optional[torch.Tensor], str]:
    """official .pth -> (our state dict, its pos_embed or None, which weight set). The wrapper is removed and
    pos_embed taken out: our model recomputes it from the config; its shape tells the training resolution of a
    fixed-size model."""
    obj, note = select_weights(_torch_load(path), path, weights)
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{path}: non-tensor entries {_list(bad)} (expected a state dict, or one under 'state_dict')")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    return sd, sd.pop("pos_embed", None), note


def read_official(path: str, weights: str = "auto") -> dict:
    """official .pth -> our state dict (pos_embed dropped)."""
    return read_official_with_pos(path, weights)[0]


def _resolution_from_pos(pos: Optional[torch.Tensor], patch: int) -> Optional[int]:
    if pos is None:
        return None
    n = pos.shape[-2]
    side = int(round(n ** 0.5))
    return side * patch * VAE_DOWNSAMPLE if side * side == n else None


def write_official(path: str, sd: dict, model) -> None:
    """our state dict -> {"state_dict": ... + pos_embed [1, N, hidden]} (the official model holds pos_embed as a
    frozen nn.Parameter, so a strict official load expects it)."""
    out = {k: v.detach().cpu() for k, v in sd.items()}
    out["pos_embed"] = model.pos_embed.detach().cpu().clone()
    atomic_write(path, lambda p: torch.save({"state_dict": out}, p))


# ================================================================================================================
# diffusers PixArtTransformer2DModel
# ================================================================================================================

def _pairs(model_cfg) -> list[tuple[str, str]]:
    """(ours, diffusers) names for tensors that map one to one (weight and bias)."""
    p = [("x_embedder.proj", "pos_embed.proj"),
         ("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1"),
         ("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2"),
         ("t_block.1", "adaln_single.linear"),
         ("y_embedder.y_proj.fc1", "caption_projection.linear_1"),
         ("y_embedder.y_proj.fc2", "caption_projection.linear_2"),
         ("final_layer.linear", "proj_out")]
    if model_cfg.multi_scale:
        p += [("csize_embedder.mlp.0", "adaln_single.emb.resolution_embedder.linear_1"),
              ("csize_embedder.mlp.2", "adaln_single.emb.resolution_embedder.linear_2"),
              ("ar_embedder.mlp.0", "adaln_single.emb.aspect_ratio_embedder.linear_1"),
              ("ar_embedder.mlp.2", "adaln_single.emb.aspect_ratio_embedder.linear_2")]
    for i in range(model_cfg.depth):
        o, d = f"blocks.{i}", f"transformer_blocks.{i}"
        p += [(f"{o}.attn.proj", f"{d}.attn1.to_out.0"), (f"{o}.cross_attn.q_linear", f"{d}.attn2.to_q"),
              (f"{o}.cross_attn.proj", f"{d}.attn2.to_out.0"), (f"{o}.mlp.fc1", f"{d}.ff.net.0.proj"),
              (f"{o}.mlp.fc2", f"{d}.ff.net.2")]
    return [(f"{a}.{s}", f"{b}.{s}") for a, b in p for s in ("weight", "bias")]


def _check_diffusers_able(model_cfg, what: str):
    if model_cfg.adaln != "single" or model_cfg.condition != "text":
        raise ValueError(f"{what}: diffusers' PixArtTransformer2DModel is adaLN-single and text-conditional; this "
                         f"model is adaln={model_cfg.adaln}, condition={model_cfg.condition}")
    if model_cfg.mlp_ratio != 4.0:
        raise ValueError(f"{what}: diffusers' PixArtTransformer2DModel has MLP ratio 4, got {model_cfg.mlp_ratio}")


def diffusers_config(model_cfg: ModelConfig, resolution: int) -> dict:
    """PixArtTransformer2DModel's config for our model trained at `resolution` px."""
    h = model_cfg.hidden_size
    return dict(num_attention_heads=model_cfg.num_heads, attention_head_dim=h // model_cfg.num_heads,
                in_channels=model_cfg.in_channels,
                out_channels=2 * model_cfg.in_channels if model_cfg.pred_sigma else model_cfg.in_channels,
                num_layers=model_cfg.depth, cross_attention_dim=h, attention_bias=True,
                sample_size=resolution // VAE_DOWNSAMPLE, patch_size=model_cfg.patch_size,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=config.model_pe_interpolation(model_cfg, resolution),
                use_additional_conditions=bool(model_cfg.multi_scale), caption_channels=model_cfg.caption_channels)


def ours_to_diffusers(sd: dict, model_cfg) -> dict:
    """Our state dict -> diffusers names (the null caption y_embedding is not part of it)."""
    _check_diffusers_able(model_cfg, "--to diffusers")
    h = model_cfg.hidden_size
    out = {d: sd[o] for o, d in _pairs(model_cfg)}
    for i in range(model_cfg.depth):
        o, d = f"blocks.{i}", f"transformer_blocks.{i}"
        out[f"{d}.scale_shift_table"] = sd[f"{o}.scale_shift_table"]
        for s in ("weight", "bias"):
            q, k, v = sd[f"{o}.attn.qkv.{s}"].split(h, dim=0)
            out[f"{d}.attn1.to_q.{s}"], out[f"{d}.attn1.to_k.{s}"], out[f"{d}.attn1.to_v.{s}"] = q, k, v
            k, v = sd[f"{o}.cross_attn.kv_linear.{s}"].split(h, dim=0)
            out[f"{d}.attn2.to_k.{s}"], out[f"{d}.attn2.to_v.{s}"] = k, v
    out["scale_shift_table"] = sd["final_layer.scale_shift_table"]
    return {k: v.contiguous() for k, v in out.items()}


def diffusers_to_ours(dsd: dict, model_cfg, y_embedding: torch.Tensor) -> dict:
    out = {o: dsd[d] for o, d in _pairs(model_cfg)}
    for i in range(model_cfg.depth):
        o, d = f"blocks.{i}", f"transformer_blocks.{i}"
        out[f"{o}.scale_shift_table"] = dsd[f"{d}.scale_shift_table"]
        for s in ("weight", "bias"):
            out[f"{o}.attn.qkv.{s}"] = torch.cat([dsd[f"{d}.attn1.to_{x}.{s}"] for x in "qkv"], dim=0)
            out[f"{o}.cross_attn.kv_linear.{s}"] = torch.cat([dsd[f"{d}.attn2.to_{x}.{s}"] for x in "kv"], dim=0)
    out["final_layer.scale_shift_table"] = dsd["scale_shift_table"]
    out["y_embedder.y_embedding"] = y_embedding
    return out


def _diffusers_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: diffusers model folder not found")
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
            os.path.join(path, "transformer", "config.json")):
        return os.path.join(path, "transformer")  # a pipeline folder
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json (nor transformer/config.json)")
    return path


def _read_diffusers_weights(d: str) -> dict:
    single = os.path.join(d, "diffusion_pytorch_model.safetensors")
    index = single + ".index.json"
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for name in files:
            sd.update(load_file(os.path.join(d, name)))
        return sd
    binf = os.path.join(d, "diffusion_pytorch_model.bin")
    if os.path.isfile(binf):
        return _torch_load(binf)
    raise FileNotFoundError(f"{d}: no diffusion_pytorch_model.safetensors (or sharded index, or .bin)")


def read_diffusers(path: str, overrides: Optional[dict] = None) -> tuple[ModelConfig, int, dict]:
    """diffusers PixArtTransformer2DModel folder -> (model config, resolution, our state dict)."""
    d = _diffusers_dir(path)
    with open(os.path.join(d, "config.json")) as f:
        dc = json.load(f)
    src = os.path.join(d, "config.json")
    cls = dc.get("_class_name", "PixArtTransformer2DModel")
    if cls not in ("PixArtTransformer2DModel", "Transformer2DModel"):
        raise ValueError(f"{src}: _class_name {cls!r} is not a PixArt transformer (for DiT use --from dit)")
    for key, want in (("norm_type", "ada_norm_single"), ("activation_fn", "gelu-approximate"),
                      ("norm_elementwise_affine", False), ("attention_bias", True)):
        if dc.get(key, want) != want:
            raise ValueError(f"{src}: {key} = {dc[key]!r}; PixArt-alpha needs {want!r}")
    if dc.get("norm_eps", 1e-6) != 1e-6:
        raise ValueError(f"{src}: norm_eps = {dc['norm_eps']}; PixArt-alpha uses 1e-6")
    heads, hd = dc.get("num_attention_heads", 16), dc.get("attention_head_dim", 72)
    hidden = heads * hd
    if dc.get("cross_attention_dim", hidden) != hidden:
        raise ValueError(f"{src}: cross_attention_dim {dc['cross_attention_dim']} != inner dim {hidden}")
    if dc.get("caption_channels") is None:
        raise ValueError(f"{src}: caption_channels is null; a PixArt-alpha transformer projects T5 features")
    in_ch = dc.get("in_channels", 4)
    out_ch = dc.get("out_channels") or in_ch
    sample = dc.get("sample_size", 128)
    multi = dc.get("use_additional_conditions")
    if multi is None:  # diffusers' own default (pixart_transformer_2d.py)
        multi = sample == 128
    pe = dc.get("interpolation_scale")
    if pe is None:
        pe = max(sample // 64, 1)
    depth, patch = dc.get("num_layers", 28), dc.get("patch_size", 2)
    preset = _preset_for(depth, hidden, patch)
    cfg = dict(preset=preset or "PixArt-XL/2", depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch,
               mlp_ratio=4.0, in_channels=in_ch, pred_sigma=out_ch == 2 * in_ch, adaln="single", condition="text",
               caption_channels=dc["caption_channels"], multi_scale=bool(multi), pe_interpolation=float(pe))
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"{src}: out_channels {out_ch} is neither in_channels nor 2 x in_channels ({in_ch})")
    null_path = os.path.join(d, DIFFUSERS_NULL_CAPTION)
    if os.path.isfile(null_path):
        y_emb = load_file(null_path)["y_embedding"]
        cfg["max_text_tokens"] = y_emb.shape[0]
    else:
        cfg.update({k: v for k, v in (overrides or {}).items() if k == "max_text_tokens"})
        L = cfg.get("max_text_tokens", config.MAX_TEXT_TOKENS)
        print(f"pixart-ds convert: {d} has no {DIFFUSERS_NULL_CAPTION}; the null caption y_embedding "
              f"[{L}, {cfg['caption_channels']}] is initialised as the official code does (randn / sqrt(C), seed 0)",
              file=sys.stderr)
        g = torch.Generator().manual_seed(0)
        y_emb = torch.randn(L, cfg["caption_channels"], generator=g) / cfg["caption_channels"] ** 0.5
    cfg.update(overrides or {})
    mc = config.model_from_dict(cfg, src)
    dsd = _read_diffusers_weights(d)
    expected = ours_to_diffusers(shapes_of(mc, sample), mc)
    check_state_dict(expected, dsd, d)
    return mc, sample * VAE_DOWNSAMPLE, diffusers_to_ours(dsd, mc, y_emb.to(dsd["proj_out.weight"].dtype))


def write_diffusers(path: str, sd: dict, model_cfg: ModelConfig, resolution: int) -> None:
    """Save with diffusers' own save_pretrained (so from_pretrained reads it back) + our null caption beside."""
    dsd = ours_to_diffusers(sd, model_cfg)
    dcfg = diffusers_config(model_cfg, resolution)
    with torch.device("meta"):
        dm = PixArtTransformer2DModel(**dcfg)
    check_state_dict(dm.state_dict(), dsd, "--to diffusers")
    dm.load_state_dict(dsd, strict=True, assign=True)
    write_dir_atomic(path, lambda tmp: (
        dm.save_pretrained(tmp, safe_serialization=True),
        save_file({"y_embedding": sd["y_embedder.y_embedding"].contiguous().cpu()},
                  os.path.join(tmp, DIFFUSERS_NULL_CAPTION))))


