"""`pixart-ds convert --from official|diffusers|dit|ours --to ours|official|diffusers IN OUT`.

Formats and the name mapping are pixart_ds.model.convert; `--from dit` goes through the paper's re-parameterization
(pixart_ds.model.reparam). Every load is strict: missing, unexpected or mis-shaped keys are refused with their names.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

from pixart_ds import config
from pixart_ds.config import VAE_DOWNSAMPLE
from pixart_ds.fsutil import write_dir_atomic
from pixart_ds.model.convert import (_read_model_json, _resolution_from_pos, infer_model_config, read_diffusers,
                                     read_official_with_pos, write_diffusers, write_official)
from pixart_ds.model.reparam import SOURCE_KEYS, dit_to_pixart, load_dit
from pixart_ds.model.weights import build, load_ours, load_state_dict_strict, save_ours


def run(src: str, dst: str, inp: str, out: str, reparam_t: int = 500, resolution: Optional[int] = None,
        model_json=None, weights: str = "auto") -> int:
    """Convert a checkpoint between formats. `model_json` (a file or an inline JSON object) gives model keys the
    input does not carry; `weights` chooses the weight set of an official/DiT .pth holding several (ema | raw |
    auto = EMA where present)."""
    overrides = _read_model_json(model_json)
    res_override = overrides.pop("resolution", None)
    resolution = resolution or res_override
    if os.path.abspath(inp) == os.path.abspath(out):
        raise ValueError(f"{out}: output is the input")
    if weights != "auto" and src not in ("official", "dit"):
        raise ValueError(f"--weights {weights}: only --from official and --from dit files hold several weight sets")

    note = None
    if src == "dit":
        if dst not in ("ours", "official", "diffusers"):
            raise ValueError(f"--to {dst}: not supported for --from dit")
        view = load_dit(inp, overrides, weights)
        note = view.note
        tgt = {k: view.cfg[k] for k in ("preset", "depth", "hidden_size", "num_heads", "patch_size", "mlp_ratio",
                                        "in_channels", "pred_sigma")}
        tgt.update(adaln="single", condition="text", pe_interpolation=view.pe_interpolation)
        tgt.update({k: v for k, v in overrides.items() if k not in SOURCE_KEYS or k in tgt})
        model = dit_to_pixart(view, tgt, reparam_t=reparam_t)
        if resolution and resolution // VAE_DOWNSAMPLE != view.input_size:
            raise ValueError(f"--resolution {resolution} differs from the DiT's {view.input_size * VAE_DOWNSAMPLE}")
        resolution = view.input_size * VAE_DOWNSAMPLE
    else:
        if src == "ours":
            mc, res, sd = load_ours(inp)
            mc = config.model_from_dict({**config.to_dict(mc), **overrides}, f"{inp} + --model-json")
        elif src == "official":
            sd, pos, note = read_official_with_pos(inp, weights)
            mc = config.model_from_dict(infer_model_config(sd, inp, overrides), inp)
            res = _resolution_from_pos(pos, mc.patch_size)
        elif src == "diffusers":
            mc, res, sd = read_diffusers(inp, overrides)
        else:
            raise ValueError(f"--from {src}: unknown format")
        if resolution:
            res = int(resolution)
        if not res:
            raise ValueError(f"{inp}: the resolution cannot be inferred; give --resolution (pixels)")
        resolution = res
        model = build(mc, resolution, inp)
        load_state_dict_strict(model, sd, inp)
    if note is not None:
        print(f"pixart-ds convert: {inp}: using the {note}", file=sys.stderr)
    sd = model.state_dict()
    mc = model.cfg
    if dst == "ours":
        write_dir_atomic(out, lambda tmp: save_ours(tmp, mc, sd, resolution))
    elif dst == "official":
        write_official(out, sd, model)
    elif dst == "diffusers":
        write_diffusers(out, sd, mc, resolution)
    else:
        raise ValueError(f"--to {dst}: unknown format")
    n = sum(v.numel() for v in sd.values())
    print(f"pixart-ds convert: {src} {inp} -> {dst} {out} ({len(sd)} tensors, {n:,} values, "
          f"{mc.adaln}/{mc.condition}{'/multi-scale' if mc.multi_scale else ''}, {resolution} px)")
    return 0


def main(a) -> int:
    return run(src=a.src, dst=a.dst, inp=a.input, out=a.output, reparam_t=a.reparam_t, resolution=a.resolution,
               model_json=a.model_json, weights=a.weights)
