"""Checkpoint interop: official PixArt-alpha .pth <-> ours <-> diffusers, and DiT -> PixArt re-parameterization.

Our parameter names ARE the official ones (PixArt-alpha diffusion/model/nets/PixArt*.py; for adaln=block /
condition=class the facebookresearch DiT models.py ones), so official <-> ours only unwraps/wraps `state_dict` and
drops/recomputes `pos_embed` (a frozen sin-cos table). Formats:

- official: a torch .pth, {"state_dict": {...}} (a bare dict, or DiT's {"ema": ...}/{"model": ...}, is accepted on
  input). Carries no config: the architecture is inferred from tensor shapes, num_heads from the matching preset,
  the resolution from pos_embed; `--model-json` (a file or an inline JSON object) overrides any of it.
- ours: a folder with model.safetensors (our names) + model.json (ModelConfig as a dict plus "resolution").
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

Re-parameterization (paper §2.3, code never released): `dit_to_pixart` turns a class-conditional DiT (our own
stage-1 model, facebookresearch DiT key names, or a diffusers DiTTransformer2DModel) into a text-conditional
adaLN-single PixArt whose every block modulation S_i = t_block(t_emb(t)) + E_i equals DiT's adaLN_i(t_emb(t))
WITHOUT the class term at t = reparam_t (default 500), and likewise the final layer's (shift, scale).
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Optional

import torch
from torch import nn

from pixart_ds.model.presets import PRESETS

OURS_WEIGHTS = "model.safetensors"
OURS_CONFIG = "model.json"
DIFFUSERS_NULL_CAPTION = "y_embedding.safetensors"
VAE_DOWNSAMPLE = 8


# ================================================================================================================
# Strict key/shape checking (never strict=False in silence)
# ================================================================================================================

def _list(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def check_state_dict(expected: dict, got: dict, source: str) -> None:
    """expected/got: name -> tensor (or shape). Raise ValueError naming missing/unexpected keys and bad shapes."""
    shape = lambda v: tuple(v.shape) if hasattr(v, "shape") else tuple(v)  # noqa: E731
    missing = [f"{k} {list(shape(v))}" for k, v in expected.items() if k not in got]
    unexpected = [f"{k} {list(shape(v))}" for k, v in got.items() if k not in expected]
    mismatch = [f"{k}: file {list(shape(got[k]))} vs model {list(shape(v))}"
                for k, v in expected.items() if k in got and shape(got[k]) != shape(v)]
    if missing or unexpected or mismatch:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {_list(unexpected)}")
        if mismatch:
            parts.append(f"{len(mismatch)} shape mismatches: {_list(mismatch)}")
        raise ValueError(f"{source}: checkpoint does not match the model: " + "; ".join(parts))


def load_state_dict_strict(model: nn.Module, sd: dict, source: str) -> None:
    check_state_dict(model.state_dict(), sd, source)
    model.load_state_dict(sd, strict=True)


# ================================================================================================================
# "ours": model.safetensors + model.json
# ================================================================================================================

def _atomic_write(path: str, write) -> None:
    """write(tmp_path) then rename onto path, so a failure leaves no half-written file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp.", dir=d)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_ours(dir: str, model_cfg_dict: dict, state_dict: dict, resolution: int) -> None:
    """Write an "ours" folder: model.safetensors (our names, tensors as given) + model.json (config + resolution)."""
    from safetensors.torch import save_file

    meta = dict(model_cfg_dict)
    meta["resolution"] = int(resolution)
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    os.makedirs(dir, exist_ok=True)
    _atomic_write(os.path.join(dir, OURS_WEIGHTS), lambda p: save_file(sd, p, metadata={"format": "pt"}))
    _atomic_write(os.path.join(dir, OURS_CONFIG), lambda p: open(p, "w").write(json.dumps(meta, indent=2) + "\n"))


def load_ours(dir: str) -> tuple[dict, int, dict]:
    """-> (model_cfg_dict, resolution, state_dict)."""
    from safetensors.torch import load_file

    cfg_path, w_path = os.path.join(dir, OURS_CONFIG), os.path.join(dir, OURS_WEIGHTS)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: not found (an 'ours' folder holds {OURS_WEIGHTS} and {OURS_CONFIG})")
    with open(cfg_path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON: {e}") from None
    if "resolution" not in meta:
        raise ValueError(f"{cfg_path}: resolution: missing (the image resolution in pixels)")
    resolution = int(meta.pop("resolution"))
    return meta, resolution, load_file(w_path)


def build_from_dict(model_cfg_dict: dict, resolution: int, source: str = "model.json"):
    """PixArt for a ModelConfig dict; pe_interpolation null = resolution / 512 (config.pe_interpolation)."""
    from pixart_ds import config
    from pixart_ds.model.pixart import PixArt

    cfg = config._build(config.ModelConfig, dict(model_cfg_dict), "model", source)
    if resolution % (VAE_DOWNSAMPLE * cfg.patch_size):
        raise ValueError(f"{source}: resolution {resolution} is not a multiple of 8 x patch size")
    pe = cfg.pe_interpolation if cfg.pe_interpolation is not None else resolution / 512
    return PixArt(cfg, resolution // VAE_DOWNSAMPLE, pe)


def load_model(dir: str, device="cpu"):
    """An "ours" folder -> (PixArt in eval mode with the weights, strictly loaded, resolution)."""
    cfg, resolution, sd = load_ours(dir)
    model = build_from_dict(cfg, resolution, os.path.join(dir, OURS_CONFIG))
    load_state_dict_strict(model, sd, os.path.join(dir, OURS_WEIGHTS))
    return model.to(device).eval(), resolution


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


def read_official_with_pos(path: str) -> tuple[dict, Optional[torch.Tensor]]:
    """official .pth -> (our state dict, its pos_embed or None). The wrapper is removed and pos_embed taken out: our
    model recomputes it from the config; its shape tells the training resolution of a fixed-size model."""
    obj = _torch_load(path)
    for key in ("state_dict", "ema", "model"):  # PixArt release / DiT training checkpoint (EMA first, as DiT samples)
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{path}: non-tensor entries {_list(bad)} (expected a state dict, or one under 'state_dict')")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    return sd, sd.pop("pos_embed", None)


def read_official(path: str) -> dict:
    """official .pth -> our state dict (pos_embed dropped)."""
    return read_official_with_pos(path)[0]


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
    _atomic_write(path, lambda p: torch.save({"state_dict": out}, p))


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


def diffusers_config(model_cfg, resolution: int, pe_interpolation: float) -> dict:
    h = model_cfg.hidden_size
    return dict(num_attention_heads=model_cfg.num_heads, attention_head_dim=h // model_cfg.num_heads,
                in_channels=model_cfg.in_channels,
                out_channels=2 * model_cfg.in_channels if model_cfg.pred_sigma else model_cfg.in_channels,
                num_layers=model_cfg.depth, cross_attention_dim=h, attention_bias=True,
                sample_size=resolution // VAE_DOWNSAMPLE, patch_size=model_cfg.patch_size,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=pe_interpolation,
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
    from safetensors.torch import load_file

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


def read_diffusers(path: str, overrides: Optional[dict] = None) -> tuple[dict, int, dict]:
    """diffusers PixArtTransformer2DModel folder -> (model_cfg_dict, resolution, our state dict)."""
    from pixart_ds import config

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
        from safetensors.torch import load_file

        y_emb = load_file(null_path)["y_embedding"]
        cfg["max_text_tokens"] = y_emb.shape[0]
    else:
        cfg.update({k: v for k, v in (overrides or {}).items() if k == "max_text_tokens"})
        L = cfg.get("max_text_tokens", config.ModelConfig.max_text_tokens)
        print(f"pixart-ds convert: {d} has no {DIFFUSERS_NULL_CAPTION}; the null caption y_embedding "
              f"[{L}, {cfg['caption_channels']}] is initialised as the official code does (randn / sqrt(C), seed 0)",
              file=sys.stderr)
        g = torch.Generator().manual_seed(0)
        y_emb = torch.randn(L, cfg["caption_channels"], generator=g) / cfg["caption_channels"] ** 0.5
    cfg.update(overrides or {})
    mc = config._build(config.ModelConfig, dict(cfg), "model", src)
    dsd = _read_diffusers_weights(d)
    expected = ours_to_diffusers({k: v for k, v in _shapes_of(mc, sample).items()}, mc)
    check_state_dict(expected, dsd, d)
    return cfg, sample * VAE_DOWNSAMPLE, diffusers_to_ours(dsd, mc, y_emb.to(dsd["proj_out.weight"].dtype))


def _shapes_of(model_cfg, input_size: int) -> dict:
    """Our state-dict shapes for a config, from a meta-device model (no memory)."""
    from pixart_ds.model.pixart import PixArt

    with torch.device("meta"):
        m = PixArt(dataclass_replace(model_cfg, attention="sdpa"), input_size, 1.0)
    return m.state_dict()


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def write_diffusers(path: str, sd: dict, model_cfg, resolution: int, pe_interpolation: float) -> None:
    """Save with diffusers' own save_pretrained (so from_pretrained reads it back) + our null caption beside."""
    from diffusers import PixArtTransformer2DModel
    from safetensors.torch import save_file

    dsd = ours_to_diffusers(sd, model_cfg)
    dcfg = diffusers_config(model_cfg, resolution, pe_interpolation)
    with torch.device("meta"):
        dm = PixArtTransformer2DModel(**dcfg)
    check_state_dict(dm.state_dict(), dsd, "--to diffusers")
    dm.load_state_dict(dsd, strict=True, assign=True)
    write_dir_atomic(path, lambda tmp: (
        dm.save_pretrained(tmp, safe_serialization=True),
        save_file({"y_embedding": sd["y_embedder.y_embedding"].contiguous().cpu()},
                  os.path.join(tmp, DIFFUSERS_NULL_CAPTION))))


def write_dir_atomic(path: str, write) -> None:
    """write(tmp_dir) then rename it to `path`; refuses a non-empty existing `path`."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(f"{path}: output exists and is not empty; remove it or choose another path")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp.", dir=parent)
    try:
        write(tmp)
        if os.path.isdir(path):
            os.rmdir(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ================================================================================================================
# DiT -> PixArt re-parameterization (paper §2.3)
# ================================================================================================================

class _DiTView:
    """What the re-parameterization needs from a DiT-like source, in our names, plus its modulation functions.

    shared: tensors copied as they are (patch embed, timestep embedder, self-attention, MLP, final projection).
    t_block: (weight [6H, H], bias [6H]) initial global MLP. mods(t) -> [depth, 6, H] and final(t) -> [2, H]:
    the source's modulation vectors at timestep t WITHOUT the class term, in float64.
    """

    def __init__(self, cfg: dict, input_size: int, pe_interpolation: float, shared: dict, t_block, mods, final):
        self.cfg, self.input_size, self.pe_interpolation = cfg, input_size, pe_interpolation
        self.shared, self.t_block, self.mods, self.final = shared, t_block, mods, final


_SHARED = re.compile(r"^(x_embedder\.|t_embedder\.|final_layer\.linear\.|blocks\.\d+\.(attn|mlp)\.)")


def _view_of_ours(model) -> _DiTView:
    """Our class-conditional PixArt (adaln block or single; stage 1)."""
    m = model.cfg
    if m.condition != "class":
        raise ValueError(f"dit_to_pixart: the source must be class-conditional, got condition={m.condition}")
    if m.multi_scale:
        raise ValueError("dit_to_pixart: a multi-scale source is not supported")
    ref = copy.deepcopy(model).to(device="cpu", dtype=torch.float64).eval()
    sd = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
    shared = {k: v for k, v in sd.items() if _SHARED.match(k)}
    if m.adaln == "block":  # the mean of the per-block MLPs as the one global MLP
        tb = (torch.stack([sd[f"blocks.{i}.adaLN_modulation.1.weight"] for i in range(m.depth)]).mean(0),
              torch.stack([sd[f"blocks.{i}.adaLN_modulation.1.bias"] for i in range(m.depth)]).mean(0))
    else:
        tb = (sd["t_block.1.weight"], sd["t_block.1.bias"])

    @torch.no_grad()
    def temb(t):
        return ref.t_embedder(torch.tensor([float(t)], dtype=torch.float64))  # [1, H], no class term

    @torch.no_grad()
    def mods(t):
        c = temb(t)
        inp = ref.t_block(c) if m.adaln == "single" else c
        return torch.cat([b.modulation(inp) for b in ref.blocks])  # [depth, 6, H]

    @torch.no_grad()
    def final(t):
        return ref.final_layer.modulation(temb(t))[0]  # [2, H]

    import dataclasses
    return _DiTView(dataclasses.asdict(m), model.input_size, model.pe_interpolation, shared, tb, mods, final)


def _view_of_diffusers_dit(dm) -> _DiTView:
    """A diffusers DiTTransformer2DModel (each block has its own timestep embedder; block 0's also feeds the final
    layer, as in its forward). Its sinusoid uses downscale_freq_shift=1; we evaluate it with its own modules."""
    c = dm.config
    if c.norm_eps != 1e-6:
        print(f"pixart-ds convert: DiT config norm_eps={c.norm_eps} for its MLP LayerNorm; PixArt (and the original "
              f"DiT) use 1e-6", file=sys.stderr)
    H = c.num_attention_heads * c.attention_head_dim
    depth = c.num_layers
    # nn.Module.to: diffusers' ModelMixin.to warns about dtype casts meant for inference
    ref = nn.Module.to(copy.deepcopy(dm), device="cpu", dtype=torch.float64).eval()
    dsd = {k: v.detach().float().cpu().clone() for k, v in dm.state_dict().items()}
    b0 = "transformer_blocks.0.norm1.emb.timestep_embedder"
    shared = {"x_embedder.proj.weight": dsd["pos_embed.proj.weight"], "x_embedder.proj.bias": dsd["pos_embed.proj.bias"],
              "t_embedder.mlp.0.weight": dsd[f"{b0}.linear_1.weight"], "t_embedder.mlp.0.bias": dsd[f"{b0}.linear_1.bias"],
              "t_embedder.mlp.2.weight": dsd[f"{b0}.linear_2.weight"], "t_embedder.mlp.2.bias": dsd[f"{b0}.linear_2.bias"],
              "final_layer.linear.weight": dsd["proj_out_2.weight"], "final_layer.linear.bias": dsd["proj_out_2.bias"]}
    for i in range(depth):
        d = f"transformer_blocks.{i}"
        for s in ("weight", "bias"):
            shared[f"blocks.{i}.attn.qkv.{s}"] = torch.cat([dsd[f"{d}.attn1.to_{x}.{s}"] for x in "qkv"], dim=0)
            shared[f"blocks.{i}.attn.proj.{s}"] = dsd[f"{d}.attn1.to_out.0.{s}"]
            shared[f"blocks.{i}.mlp.fc1.{s}"] = dsd[f"{d}.ff.net.0.proj.{s}"]
            shared[f"blocks.{i}.mlp.fc2.{s}"] = dsd[f"{d}.ff.net.2.{s}"]
    tb = (torch.stack([dsd[f"transformer_blocks.{i}.norm1.linear.weight"] for i in range(depth)]).mean(0),
          torch.stack([dsd[f"transformer_blocks.{i}.norm1.linear.bias"] for i in range(depth)]).mean(0))

    def temb(block, t):
        e = block.norm1.emb
        return e.timestep_embedder(e.time_proj(torch.tensor([float(t)], dtype=torch.float64)).to(torch.float64))

    @torch.no_grad()
    def mods(t):
        return torch.cat([b.norm1.linear(torch.nn.functional.silu(temb(b, t))).reshape(1, 6, H)
                          for b in ref.transformer_blocks])

    @torch.no_grad()
    def final(t):
        return ref.proj_out_1(torch.nn.functional.silu(temb(ref.transformer_blocks[0], t))).reshape(2, H)

    out_ch = c.out_channels or c.in_channels
    preset = _preset_for(depth, H, c.patch_size)
    cfg = dict(preset=preset or "PixArt-XL/2", depth=depth, hidden_size=H, num_heads=c.num_attention_heads,
               patch_size=c.patch_size, mlp_ratio=4.0, in_channels=c.in_channels,
               pred_sigma=out_ch == 2 * c.in_channels, adaln="block", condition="class",
               num_classes=c.num_embeds_ada_norm, pe_interpolation=1.0)
    return _DiTView(cfg, c.sample_size, 1.0, shared, tb, mods, final)


def load_dit(path: str, overrides: Optional[dict] = None) -> _DiTView:
    """--from dit input: facebookresearch .pt/.pth, a diffusers DiTTransformer2DModel (or pipeline) folder, or
    an "ours" folder holding a class-conditional model."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, OURS_CONFIG)):
            model, _ = load_model(path)
            return _view_of_ours(model)
        d = _diffusers_dir(path)
        with open(os.path.join(d, "config.json")) as f:
            cls = json.load(f).get("_class_name")
        if cls not in ("DiTTransformer2DModel", "Transformer2DModel"):
            raise ValueError(f"{d}/config.json: _class_name {cls!r} is not a DiT transformer")
        from diffusers import DiTTransformer2DModel

        return _view_of_diffusers_dit(DiTTransformer2DModel.from_pretrained(d))
    sd, pos = read_official_with_pos(path)
    cfg = infer_model_config(sd, path, overrides)
    if cfg.get("condition") != "class":
        raise ValueError(f"{path}: not a class-conditional DiT checkpoint (no y_embedder.embedding_table.weight)")
    # facebookresearch DiT's grid: pos = token index (PatchEmbed without interpolation) -> pe_interpolation 1
    cfg.setdefault("pe_interpolation", 1.0)
    res = _resolution_from_pos(pos, cfg["patch_size"])
    if res is None:
        raise ValueError(f"{path}: cannot infer the resolution (no square pos_embed in the checkpoint)")
    model = build_from_dict(cfg, res, path)
    load_state_dict_strict(model, sd, path)
    return _view_of_ours(model)


@torch.no_grad()
def dit_to_pixart(dit, target_cfg=None, reparam_t: int = 500, seed: int = 0):
    """Re-parameterize a class-conditional DiT into a text-conditional adaLN-single PixArt (paper §2.3).

    dit: our class-conditional PixArt module (stage 1), a diffusers DiTTransformer2DModel, a path (see load_dit),
      or a _DiTView.
    target_cfg: ModelConfig (or dict) of the new model; defaults to the source's sizes with adaln=single,
      condition=text and the default caption settings. Sizes must match the source; adaln must be single,
      condition text, multi_scale off.
    Returns a float32 PixArt (CPU) whose
      - patch embedding, timestep embedder, self-attention, MLP and final projection are the source's;
      - t_block starts as the mean of the source's per-block adaLN MLPs (the paper leaves this open; the mean keeps
        each block's t-dependence close to its own) or the source's t_block if it is adaLN-single already;
      - E_i = DiT_i(t*) - t_block(t_emb(t*)) per block and F = DiT_final(t*) - t_emb(t*), computed in float64, so
        every modulation equals the source's without class term at t* = reparam_t;
      - caption projection, cross-attention q/kv are freshly initialised (seeded), cross-attention proj zero:
        the new model's output at t* equals DiT's with the class term removed, for any caption.
    """
    from pixart_ds import config
    from pixart_ds.model.pixart import PixArt

    if isinstance(dit, _DiTView):
        view = dit
    elif isinstance(dit, (str, os.PathLike)):
        view = load_dit(os.fspath(dit))
    elif isinstance(dit, PixArt):
        view = _view_of_ours(dit)
    elif type(dit).__name__ == "DiTTransformer2DModel":
        view = _view_of_diffusers_dit(dit)
    else:
        raise ValueError(f"dit_to_pixart: unsupported source {type(dit).__name__}")

    src = view.cfg
    if target_cfg is None:
        tgt = {k: src[k] for k in ("preset", "depth", "hidden_size", "num_heads", "patch_size", "mlp_ratio",
                                   "in_channels", "pred_sigma")}
        tgt.update(adaln="single", condition="text", pe_interpolation=view.pe_interpolation)
        target_cfg = tgt
    if isinstance(target_cfg, dict):
        target_cfg = config._build(config.ModelConfig, dict(target_cfg), "model", "dit_to_pixart target")
    for k in ("depth", "hidden_size", "num_heads", "patch_size", "mlp_ratio", "in_channels", "pred_sigma"):
        if getattr(target_cfg, k) != src[k]:
            raise ValueError(f"dit_to_pixart: target model.{k} = {getattr(target_cfg, k)} but the DiT source has "
                             f"{src[k]}")
    if target_cfg.adaln != "single" or target_cfg.condition != "text" or target_cfg.multi_scale:
        raise ValueError("dit_to_pixart: the target must be adaln=single, condition=text, multi_scale=false")
    pe = target_cfg.pe_interpolation if target_cfg.pe_interpolation is not None else view.pe_interpolation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PixArt(target_cfg, view.input_size, pe).float()
    sd = model.state_dict()
    check_state_dict({k: v for k, v in sd.items() if _SHARED.match(k)}, view.shared, "dit_to_pixart (shared weights)")
    for k, v in view.shared.items():
        sd[k] = v.to(torch.float32).clone()
    H = target_cfg.hidden_size
    sd["t_block.1.weight"], sd["t_block.1.bias"] = (x.to(torch.float32).clone() for x in view.t_block)

    # the new model's own t_emb(t*) and t_block(t_emb(t*)), in float64, with the weights just set
    ref = PixArt(dataclass_replace(target_cfg, attention="math"), view.input_size, pe).to(torch.float64)
    ref.load_state_dict({k: v.to(torch.float64) for k, v in sd.items()}, strict=True)
    t = torch.tensor([float(reparam_t)], dtype=torch.float64)
    temb = ref.t_embedder(t)  # [1, H]
    s = ref.t_block(temb).reshape(6, H)
    mods = view.mods(reparam_t)  # [depth, 6, H]
    for i in range(target_cfg.depth):
        sd[f"blocks.{i}.scale_shift_table"] = (mods[i] - s).to(torch.float32)
    sd["final_layer.scale_shift_table"] = (view.final(reparam_t) - temb).to(torch.float32)  # [2, H]
    for i in range(target_cfg.depth):  # new text path starts silent (official init; asserted for clarity)
        sd[f"blocks.{i}.cross_attn.proj.weight"].zero_()
        sd[f"blocks.{i}.cross_attn.proj.bias"].zero_()
    model.load_state_dict(sd, strict=True)
    return model


# ================================================================================================================
# CLI entry: pixart-ds convert --from X --to Y IN OUT
# ================================================================================================================

def _save_model_json_cfg(model) -> dict:
    import dataclasses

    d = dataclasses.asdict(model.cfg)
    d["pe_interpolation"] = model.pe_interpolation  # explicit, so the folder does not depend on the derivation
    return d


def convert_file(src: str, dst: str, inp: str, out: str, reparam_t: int = 500, resolution: Optional[int] = None,
                 model_json=None) -> int:
    """Convert a checkpoint between formats; every load is strict (missing/unexpected/mis-shaped keys refused)."""
    overrides = _read_model_json(model_json)
    res_override = overrides.pop("resolution", None)
    resolution = resolution or res_override
    if os.path.abspath(inp) == os.path.abspath(out):
        raise ValueError(f"{out}: output is the input")

    if src == "dit":
        if dst not in ("ours", "official", "diffusers"):
            raise ValueError(f"--to {dst}: not supported for --from dit")
        view = load_dit(inp)
        tgt = {k: view.cfg[k] for k in ("preset", "depth", "hidden_size", "num_heads", "patch_size", "mlp_ratio",
                                        "in_channels", "pred_sigma")}
        tgt.update(adaln="single", condition="text", pe_interpolation=view.pe_interpolation)
        tgt.update(overrides)
        model = dit_to_pixart(view, tgt, reparam_t=reparam_t)
        if resolution and resolution // VAE_DOWNSAMPLE != view.input_size:
            raise ValueError(f"--resolution {resolution} differs from the DiT's {view.input_size * VAE_DOWNSAMPLE}")
        resolution = view.input_size * VAE_DOWNSAMPLE
        sd = model.state_dict()
    else:
        if src == "ours":
            cfg_d, res, sd = load_ours(inp)
            cfg_d.update(overrides)
        elif src == "official":
            sd, pos = read_official_with_pos(inp)
            cfg_d = infer_model_config(sd, inp, overrides)
            res = _resolution_from_pos(pos, cfg_d["patch_size"])
        elif src == "diffusers":
            cfg_d, res, sd = read_diffusers(inp, overrides)
        else:
            raise ValueError(f"--from {src}: unknown format")
        if resolution:
            res = int(resolution)
        if not res:
            raise ValueError(f"{inp}: the resolution cannot be inferred; give --resolution (pixels)")
        resolution = res
        model = build_from_dict(cfg_d, resolution, inp)
        load_state_dict_strict(model, sd, inp)
        sd = model.state_dict()

    if dst == "ours":
        write_dir_atomic(out, lambda tmp: save_ours(tmp, _save_model_json_cfg(model), sd, resolution))
    elif dst == "official":
        write_official(out, sd, model)
    elif dst == "diffusers":
        write_diffusers(out, sd, model.cfg, resolution, model.pe_interpolation)
    else:
        raise ValueError(f"--to {dst}: unknown format")
    n = sum(v.numel() for k, v in sd.items())
    print(f"pixart-ds convert: {src} {inp} -> {dst} {out} ({len(sd)} tensors, {n:,} values, "
          f"{model.cfg.adaln}/{model.cfg.condition}{'/multi-scale' if model.cfg.multi_scale else ''}, "
          f"{resolution} px)")
    return 0
