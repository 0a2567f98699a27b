"""`pixart-ds train RECIPE [key=value ...] [--allow-config-change]` (pixart_ds.train.trainer.fit)."""
from __future__ import annotations

from pixart_ds import config
from pixart_ds.train.faults import Faults
from pixart_ds.train.trainer import fit


def main(a) -> int:
    cfg = config.load(a.recipe, a.overrides)
    return fit(cfg, allow_config_change=a.allow_config_change, faults=Faults.from_env())
