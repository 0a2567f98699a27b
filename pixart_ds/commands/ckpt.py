"""`pixart-ds ckpt export RUN_DIR OUT [--raw]`: a run's consolidated weights as an "ours" folder."""
from __future__ import annotations

from pixart_ds.train.weights import export_weights


def main(a) -> int:
    if a.ckpt_verb != "export":
        raise ValueError(f"unknown ckpt verb {a.ckpt_verb}")
    print(export_weights(a.run_dir, a.out, use_ema=not a.raw))
    return 0
