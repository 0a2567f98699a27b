"""Evaluation during training: the recipe's `eval` section turned into metrics of the EMA weights every
eval.every_steps steps (pixart_ds.eval.run.evaluate_model), on rank 0.

The trainer hands a function that loads its current EMA weights into a model; `TrainingEvaluator` keeps its own
copy of the network (built once, on a forked RNG) and its own encoders, Inception, CLIP and reference statistics.
Every call runs inside `preserved_rng()`: the Python, NumPy, torch CPU and CUDA global generators are saved before
and restored after, so whatever a library draws while loading or sampling cannot shift the training's random
streams; the images' noise comes from per-image generators seeded with eval.seed + i. No data loader, optimizer or
checkpoint is touched: a run with evaluation on resumes exactly as one without.

Written per evaluation: RUN_DIR/eval/step_N.png (a grid of the first eval.grid_images images) and
RUN_DIR/eval/step_N.json (the metrics); the trainer adds them to metrics.jsonl and TensorBoard.
"""
from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable

import numpy as np
import torch

from pixart_ds import config as C
from pixart_ds.diffusion.schedule import Schedule
from pixart_ds.eval.run import Generator, SampleSettings, ScoreSettings, build_scorer, evaluate_model, read_prompts
from pixart_ds.fsutil import atomic_write_json
from pixart_ds.model.encoders import load_text_encoder, load_vae
from pixart_ds.model.pixart import build_model


@contextlib.contextmanager
def preserved_rng():
    """Save and restore every global RNG (python, numpy, torch CPU + CUDA) around a block."""
    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def eval_prompts(cfg: C.Config) -> list[str]:
    return list(cfg.eval.prompts) if cfg.eval.prompts else read_prompts(cfg.eval.prompts_file)


def check_eval_inputs(cfg: C.Config) -> None:
    """Cheap checks before any training, on every rank: the files the evaluation will need exist."""
    ev = cfg.eval
    if ev.every_steps <= 0:
        return
    if ev.prompts_file and not ev.prompts:
        read_prompts(ev.prompts_file)  # a missing file or an empty line is an error now, not in an hour
    for key, path, is_dir in (("eval.reference", ev.reference, None), ("eval.inception", ev.inception, False),
                              ("eval.clip", ev.clip, True)):
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"{key}: {path}: no such file or directory")
    if not cfg.encoders.vae:
        raise C.ConfigError("encoders.vae: eval.every_steps > 0 needs a VAE to decode the images")
    if cfg.model.condition == "text" and not cfg.encoders.text_encoder:
        raise C.ConfigError("encoders.text_encoder: eval.every_steps > 0 needs a text encoder for the prompts")


class TrainingEvaluator:
    """Rank 0's evaluator; construction is cheap, the first call loads everything."""

    def __init__(self, cfg: C.Config, device: torch.device, run_dir: str):
        self.cfg, self.device, self.run_dir = cfg, device, run_dir
        self.gen: Generator | None = None
        self.scorer = None
        self.prompts = eval_prompts(cfg)

    def _load(self) -> None:
        cfg, dev = self.cfg, self.device
        ev = cfg.eval
        model = build_model(cfg).to(dev).eval().requires_grad_(False)
        tok = te = None
        if cfg.model.condition == "text":
            tok, te = load_text_encoder(cfg.encoders.text_encoder,
                                        cfg.encoders.text_dtype if dev.type == "cuda" else "fp32", dev)
        vae = load_vae(cfg.encoders.vae, "fp32", dev)
        res = cfg.data.resolution
        self.gen = Generator(model, cfg.model, vae, tok, te, Schedule.from_config(cfg.diffusion), res,
                             res, cfg.encoders.vae_scale, dev,
                             SampleSettings(ev.sampler, ev.steps, ev.guidance, ev.seed, ev.batch_size, "null"), "null")
        cache = ev.cache_dir or os.path.join(self.run_dir, "eval", "cache")
        self.scorer = build_scorer(ev.inception, ev.reference, ev.clip, res, cache,
                                   ScoreSettings(ev.kid_subsets, 1000, 0, 64, "auto"), dev,
                                   reference_images=ev.reference_images)

    @torch.no_grad()
    def __call__(self, load_weights: Callable[[torch.nn.Module], None], step: int) -> dict:
        """Evaluate the weights `load_weights(model)` puts into the evaluator's model; returns the metrics with the
        grid's and the record's paths."""
        with preserved_rng():
            if self.gen is None:
                self._load()
            load_weights(self.gen.model)
            d = os.path.join(self.run_dir, "eval")
            grid = os.path.join(d, f"step_{step:08d}.png")
            res = evaluate_model(self.gen, self.scorer, self.prompts, self.cfg.eval.num_images,
                                 grid if self.cfg.eval.grid_images else None, self.cfg.eval.grid_images)
        res["step"] = step
        path = os.path.join(d, f"step_{step:08d}.json")
        atomic_write_json(path, res)
        res["record"] = path
        return res


def flat_metrics(res: dict) -> dict:
    """Scalar metrics of an evaluation, flat (for metrics.jsonl and TensorBoard)."""
    out = {}
    for k in ("fid", "clip_score"):
        if res.get(k) is not None:
            out[k] = float(res[k])
    if res.get("kid"):
        out["kid"], out["kid_std"] = float(res["kid"]["mean"]), float(res["kid"]["std"])
    if res.get("judge"):
        for k, v in res["judge"].items():
            if k != "n":
                out["alignment" if k == "alignment" else f"judge_{k}"] = float(v)
    return out
