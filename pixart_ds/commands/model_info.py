"""`pixart-ds model-info`: parameter counts with a per-component breakdown (pixart_ds.model.pixart.model_info)."""
from __future__ import annotations

import json

from pixart_ds.model.pixart import model_info


def main(a) -> int:
    info = model_info(preset=a.preset, adaln=a.adaln, condition=a.condition, multi_scale=a.multi_scale)
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['preset']} adaln={info['adaln']} condition={info['condition']} "
          f"multi_scale={info['multi_scale']}: {info['total']:,} trainable parameters")
    for k, v in info["components"].items():
        print(f"  {k:<24} {v:>14,}")
    if info.get("note"):
        print(info["note"])
    return 0
