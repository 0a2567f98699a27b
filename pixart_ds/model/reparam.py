"""DiT -> PixArt re-parameterization (PixArt-α §2.3; the official code never released it).

`dit_to_pixart` turns a class-conditional DiT (our own stage-1 model, facebookresearch DiT key names, or a diffusers
DiTTransformer2DModel) into a text-conditional adaLN-single PixArt whose every block modulation
S_i = t_block(t_emb(t)) + E_i equals DiT's adaLN_i(t_emb(t)) WITHOUT the class term at t = reparam_t (default 500),
and likewise the final layer's (shift, scale). The paper's stage 2 starts from stage 1 this way; without it
("w/o re-param") its samples were distorted (§3.4, Fig. 6).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import sys
from typing import Optional

import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from pixart_ds import config
from pixart_ds.model.convert import (_diffusers_dir, _preset_for, _resolution_from_pos, infer_model_config,
                                     read_official_with_pos)
from pixart_ds.model.pixart import PixArt
from pixart_ds.model.weights import OURS_CONFIG, build, check_state_dict, load_model, load_state_dict_strict

# Architecture keys a --model-json may give for the DiT source (its sizes); other keys describe only the new model.
SOURCE_KEYS = ("depth", "hidden_size", "num_heads", "patch_size", "mlp_ratio", "in_channels", "pred_sigma",
               "num_classes", "pe_interpolation")


class _DiTView:
    """What the re-parameterization needs from a DiT-like source, in our names, plus its modulation functions.

    shared: tensors copied as they are (patch embed, timestep embedder, self-attention, MLP, final projection).
    t_block: (weight [6H, H], bias [6H]) initial global MLP. mods(t) -> [depth, 6, H] and final(t) -> [2, H]:
    the source's modulation vectors at timestep t WITHOUT the class term, in float64.
    """

    def __init__(self, cfg: dict, input_size: int, pe_interpolation: float, shared: dict, t_block, mods, final):
        self.cfg, self.input_size, self.pe_interpolation = cfg, input_size, pe_interpolation
        self.shared, self.t_block, self.mods, self.final = shared, t_block, mods, final
        self.note = "as saved"  # which weight set of the source file (load_dit)


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


def load_dit(path: str, overrides: Optional[dict] = None, weights: str = "auto") -> _DiTView:
    """--from dit input: facebookresearch .pt/.pth, a diffusers DiTTransformer2DModel (or pipeline) folder, or
    an "ours" folder holding a class-conditional model. `overrides`: the source's architecture keys (SOURCE_KEYS)
    that cannot be inferred from tensor shapes, e.g. num_heads of a DiT of no preset size. `weights`: ema | raw |
    auto for a .pth that holds both (convert.select_weights); the view's `note` says which was used."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, OURS_CONFIG)):
            model, _ = load_model(path)
            return _view_of_ours(model)
        d = _diffusers_dir(path)
        with open(os.path.join(d, "config.json")) as f:
            cls = json.load(f).get("_class_name")
        if cls not in ("DiTTransformer2DModel", "Transformer2DModel"):
            raise ValueError(f"{d}/config.json: _class_name {cls!r} is not a DiT transformer")
        return _view_of_diffusers_dit(DiTTransformer2DModel.from_pretrained(d))
    sd, pos, note = read_official_with_pos(path, weights)
    cfg = infer_model_config(sd, path, {k: v for k, v in (overrides or {}).items() if k in SOURCE_KEYS})
    if cfg.get("condition") != "class":
        raise ValueError(f"{path}: not a class-conditional DiT checkpoint (no y_embedder.embedding_table.weight)")
    # facebookresearch DiT's grid: pos = token index (PatchEmbed without interpolation) -> pe_interpolation 1
    cfg.setdefault("pe_interpolation", 1.0)
    res = _resolution_from_pos(pos, cfg["patch_size"])
    if res is None:
        raise ValueError(f"{path}: cannot infer the resolution (no square pos_embed in the checkpoint)")
    model = build(config.model_from_dict(cfg, path), res, path)
    load_state_dict_strict(model, sd, path)
    view = _view_of_ours(model)
    view.note = note
    return view


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
        target_cfg = config.model_from_dict(target_cfg, "dit_to_pixart target")
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
    ref = PixArt(dataclasses.replace(target_cfg, attention="math"), view.input_size, pe).to(torch.float64)
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


