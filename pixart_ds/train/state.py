"""Everything a run must carry across a restart, listed once.

`TrainState` holds the counters. `RunState` is the one registry of what a checkpoint holds beside DeepSpeed's own
engine state (module, optimizer partitions, lr scheduler, step counters, written by zero.save):
    progress   TrainState: step, images seen, skipped non-finite steps, replaced corrupt samples
    ema        the EMA weights (rank 0 only; None elsewhere)
    loader     StreamingDataLoader.state_dict(): the samples consumed, so the order continues exactly
    rng        every rank's Python, NumPy, torch (and CUDA) RNG and its noise generator (timesteps and noise)

Save (`client_state`) and resume (`restore`) both walk the same table, so nothing can be saved and forgotten on
resume, or the other way round (the edm2 / torchtitan way of listing state once). The data order is Streaming's
(a function of the seed and the samples consumed); the latent posterior sample and caption dropout are pure
functions of (seed, epoch, sample index) in the dataset; the noise comes from the checkpointed generator: an
interrupted and an uninterrupted run therefore see the same samples in the same order with the same noise.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from pixart_ds import config as C
from pixart_ds import dist
from pixart_ds.train.ema import EMA

CLIENT_VERSION = 1


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    images_seen: int = 0  # global-batch images trained on
    skipped_total: int = 0  # optimizer steps skipped as non-finite
    data_skipped_total: int = 0  # corrupt samples replaced by another of their stream (data.on_corrupt=skip)

    def advance(self, out: dict) -> None:
        """Count one optimizer step (`out` from train_step, plus "data_skipped")."""
        self.step += 1
        self.images_seen += int(out["images"])
        self.skipped_total += int(out["skipped"])
        self.data_skipped_total += int(out.get("data_skipped", 0))

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        self.step, self.images_seen = int(d["step"]), int(d["images_seen"])
        self.skipped_total = int(d["skipped_total"])
        self.data_skipped_total = int(d.get("data_skipped_total", 0))


def noise_generator(cfg: C.Config, rank: int, device: torch.device, step: int = 0) -> torch.Generator:
    """Per-rank stream of timesteps and noise; distinct per rank, fixed by the seed (its state is checkpointed).
    `step` > 0 reseeds for a resume at another world size, where per-rank streams cannot map one to one."""
    g = torch.Generator(device=device)
    g.manual_seed(int(cfg.train.seed) * 1_000_003 + 7919 * (rank + 1) + 104_729 * step)
    return g


def rng_state(generator: Optional[torch.Generator]) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: Optional[torch.Generator]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


@dataclass
class RunState:
    """The registry: what a checkpoint holds beside DeepSpeed's engine state (see the module docstring)."""

    cfg: C.Config
    rank: int
    world_size: int
    progress: TrainState
    ema: EMA
    module: torch.nn.Module  # the engine's module (the EMA's template on resume)
    loader: Any  # StreamingDataLoader
    noise: torch.Generator

    def _table(self, same_world: bool) -> dict[str, tuple[Callable[[], Any], Callable[[Any], None]]]:
        """name -> (save, restore). Saving is collective (the RNG states of all ranks are gathered)."""

        def load_rng(states: list) -> None:
            if same_world and self.rank < len(states):
                set_rng_state(states[self.rank], self.noise)
            else:  # another world size: reseed deterministically from (seed, rank, step); the data order is global
                self.noise.set_state(noise_generator(self.cfg, self.rank, self.noise.device,
                                                     self.progress.step).get_state())

        return {
            "progress": (self.progress.state_dict, self.progress.load_state_dict),
            "ema": (lambda: self.ema.checkpoint_state() if self.ema.enabled else None,
                    lambda s: self.ema.load_checkpoint_state(self.module, s)),
            "loader": (self.loader.state_dict, self.loader.load_state_dict),
            "rng": (lambda: dist.gather_objects(rng_state(self.noise)), load_rng),
        }

    def client_state(self) -> dict:
        """All ranks (collective). Our part of a checkpoint, stored by zero.save under one key."""
        saved = {name: save() for name, (save, _) in self._table(True).items()}
        return {"version": CLIENT_VERSION, "world_size": self.world_size, "config": C.to_dict(self.cfg), **saved}

    def restore(self, client: dict, same_world: bool) -> None:
        for name, (_, load) in self._table(same_world).items():
            load(client[name])

    def meta(self) -> dict:
        """The small file that marks a checkpoint complete (checkpoint.META): read without loading tensors."""
        return {"step": self.progress.step, "images_seen": self.progress.images_seen, "world_size": self.world_size,
                "config": C.to_dict(self.cfg)}
