"""Weights in our format ("ours"): a folder with model.safetensors (official PixArt parameter names) and model.json
(the ModelConfig as plain data plus "resolution", the training resolution in pixels). `pixart-ds ckpt export`,
`convert --to ours`, `sample`, `export`, `eval` and `train.init_from` all read and write it through this module.

Every load is strict: missing or unexpected keys and shape mismatches are refused with their names and shapes
(never `strict=False` in silence).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pixart_ds import config
from pixart_ds.config import ModelConfig
from pixart_ds.fsutil import atomic_write, atomic_write_json
from pixart_ds.model.pixart import PixArt

OURS_WEIGHTS = "model.safetensors"
OURS_CONFIG = "model.json"


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


def build(model_cfg: ModelConfig, resolution: int, source: str = "model.json") -> PixArt:
    """The PixArt of `model_cfg` trained at `resolution` px (positional-embedding grid and scale as trained)."""
    mult = config.VAE_DOWNSAMPLE * model_cfg.patch_size
    if resolution % mult:
        raise ValueError(f"{source}: resolution {resolution} is not a multiple of 8 x patch size = {mult}")
    return PixArt(model_cfg, resolution // config.VAE_DOWNSAMPLE, config.model_pe_interpolation(model_cfg, resolution))


def shapes_of(model_cfg: ModelConfig, input_size: int) -> dict:
    """Our state-dict shapes for a config, from a meta-device model (no memory)."""

    with torch.device("meta"):
        m = PixArt(dataclasses.replace(model_cfg, attention="sdpa"), input_size, 1.0)
    return m.state_dict()


def save_ours(dir: str, model_cfg: Union[ModelConfig, dict], state_dict: dict, resolution: int) -> None:
    """Write an "ours" folder: model.safetensors (our names, tensors as given) + model.json (config + resolution)."""
    if isinstance(model_cfg, dict):
        model_cfg = config.model_from_dict(model_cfg, f"{dir}/{OURS_CONFIG}")
    meta = config.model_to_dict(model_cfg, resolution)
    meta["resolution"] = int(resolution)
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(os.path.join(dir, OURS_WEIGHTS), lambda p: save_file(sd, p, metadata={"format": "pt"}))
    atomic_write_json(os.path.join(dir, OURS_CONFIG), meta)


def is_ours(path: str) -> bool:
    return os.path.isfile(os.path.join(path, OURS_CONFIG)) and os.path.isfile(os.path.join(path, OURS_WEIGHTS))


def load_ours(dir: str) -> tuple[ModelConfig, int, dict]:
    """-> (model config, resolution in pixels, state_dict)."""
    cfg_path, w_path = os.path.join(dir, OURS_CONFIG), os.path.join(dir, OURS_WEIGHTS)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: not found (an 'ours' folder holds {OURS_WEIGHTS} and {OURS_CONFIG})")
    with open(cfg_path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON: {e}") from None
    if not isinstance(meta, dict) or "resolution" not in meta:
        raise ValueError(f"{cfg_path}: resolution: missing (the image resolution in pixels)")
    resolution = int(meta.pop("resolution"))
    return config.model_from_dict(meta, cfg_path), resolution, load_file(w_path)


def load_model(dir: str, device="cpu") -> tuple[PixArt, int]:
    """An "ours" folder -> (PixArt in eval mode with the weights, strictly loaded, resolution)."""
    cfg, resolution, sd = load_ours(dir)
    model = build(cfg, resolution, os.path.join(dir, OURS_CONFIG))
    load_state_dict_strict(model, sd, os.path.join(dir, OURS_WEIGHTS))
    return model.to(device).eval(), resolution
