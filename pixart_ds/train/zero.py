"""Everything DeepSpeed: the config dict derived from the recipe, initialize, save/load, universal checkpoints.

This is the only module that imports deepspeed (DESIGN.md principle 4). The DeepSpeed JSON is never written by
hand: `ds_config(cfg, world_size)` derives it from the recipe, so the recipe stays the single source of truth.

Facts this module relies on (docs/stack.md, checked against deepspeed 0.19.8):
- gradient_clipping defaults to 1.0 since 0.19.3; PixArt clips at 0.01, so it is always written explicitly.
- bf16 `check_grad_overflow` (default true) skips steps with inf/NaN gradients; fp32 ZeRO skips them too
  (an invalid global norm sets the overflow flag); fp16 adds dynamic loss scaling.
- client_state is merged into DeepSpeed's own checkpoint dict, so ours lives under ONE key ("pixart_ds").
- A ZeRO-2 checkpoint loads only at the data-parallel size that wrote it; at another size we convert it once to
  DeepSpeed's universal format (ds_to_universal --inject_missing_state) and load it with load_universal.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any, Optional

import deepspeed  # noqa: E402  (the one import in the project)
import deepspeed.ops as ds_ops
import torch
from deepspeed.utils import logger as ds_logger
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from pixart_ds import config as C
from pixart_ds.fsutil import write_dir_atomic

CLIENT_KEY = "pixart_ds"

# Parameter names (last dotted component) that are lookup tables or modulation offsets, not projections: no
# weight decay, like biases and norm gains. y_embedding is the learned null caption [L, D] (paper §2.3, CFG);
# scale_shift_table is adaLN-single's per-block E_i [6, D] and the final layer's [2, D]; embedding_table is the
# class-embedding lookup of the class-conditional (DiT) model.
NO_DECAY_NAMES = ("y_embedding", "scale_shift_table", "embedding_table")
NO_DECAY_MODULES = (torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm1d,
                    torch.nn.BatchNorm2d)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weight matrices only; none on biases, norms, embeddings, the null caption and
    the modulation tables. Returns [{"params", "weight_decay", "name"}, ...] without empty groups."""
    no_decay_ids = set()
    for mod in model.modules():
        if isinstance(mod, NO_DECAY_MODULES):
            no_decay_ids.update(id(p) for p in mod.parameters(recurse=False))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim <= 1 or id(p) in no_decay_ids or leaf in NO_DECAY_NAMES or leaf == "bias":
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [dict(params=decay, weight_decay=weight_decay, name="decay"),
              dict(params=no_decay, weight_decay=0.0, name="no_decay")]
    return [g for g in groups if g["params"]]


def param_group_names(model: torch.nn.Module, weight_decay: float) -> dict[str, list[str]]:
    """Names per group, for tests and logs."""
    ids = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [ids[id(p)] for p in g["params"]] for g in param_groups(model, weight_decay)}


def warmup_factor(step: int, warmup_steps: int) -> float:
    """lr multiplier for optimizer step index `step` (0-based): linear warm-up then constant.

    Official PixArt uses diffusers' constant-with-warm-up (factor step / warmup). We use (step + 1) / warmup so
    the first update is not a wasted lr = 0 step; after `warmup_steps` updates the lr is the recipe's.
    """
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def ds_config(cfg: C.Config, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed config dict for this recipe at this world size."""
    t = cfg.train
    micro, accum = C.batch_plan(cfg, world_size)
    adam = C.adam_impl(cfg)
    zero_opt: dict[str, Any] = {"stage": t.zero_stage, "contiguous_gradients": True,
                                "overlap_comm": bool(t.overlap_comm)}
    if t.reduce_bucket_size is not None:
        zero_opt["reduce_bucket_size"] = int(t.reduce_bucket_size)
    if t.allgather_bucket_size is not None:
        zero_opt["allgather_bucket_size"] = int(t.allgather_bucket_size)
    d: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.grad_clip,  # explicit: DeepSpeed >= 0.19.3 would clip at 1.0
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": C.effective_lr(cfg),
                "betas": list(t.adam_betas),
                "eps": t.adam_eps,
                "weight_decay": t.weight_decay,  # per-group values in param_groups() take precedence
                # fused-adam: DeepSpeed's FusedAdam (JIT-built op). Otherwise DeepSpeed constructs torch.optim.AdamW
                # with these params, so `fused` reaches torch (engine._configure_basic_optimizer).
                "torch_adam": adam != "fused-adam",
                **({"fused": True} if adam == "torch-fused" else {}),
            },
        },
        "zero_optimization": zero_opt,
        # Explicit (docs/stack.md: DeepSpeed >= 0.18 logs at WARNING): our metrics.jsonl is the log, DeepSpeed's own
        # progress lines stay rare.
        "log_level": "warning",
        "steps_per_print": max(1, cfg.log.every_steps) * 100,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": False,
        "checkpoint": {"load_universal": bool(load_universal), "tag_validation": "Fail"},
    }
    if t.precision == "bf16":
        # Steps whose gradients overflow are skipped (docs/stack.md: default true since 0.19.3; set explicitly).
        d["bf16"] = {"enabled": True, "check_grad_overflow": True}
    elif t.precision == "fp16":
        # Dynamic loss scaling, as the official fp16 training (AMP GradScaler) does.
        d["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                     "hysteresis": 2, "min_loss_scale": 1}
    return d


def initialize(model: torch.nn.Module, cfg: C.Config, world_size: int, load_universal: bool = False):
    """Wrap the model: returns the DeepSpeed engine (optimizer and warm-up scheduler inside it)."""
    ds_logger.setLevel(logging.WARNING)  # same choice as the config's log_level, for the messages before it is read
    if not torch.cuda.is_available() and os.environ.get("PIXART_DS_CPU_SHM_COMM") != "1":
        # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce op with g++ the first time (minutes on a small
        # machine) and its kernels need AVX-512 for bf16. gloo is enough for CPU runs (tests, the demo); the
        # compatibility table is a module-level dict DeepSpeed documents as editable.
        ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False
    warmup = cfg.train.warmup_steps

    def make_scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_factor(s, warmup))

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.train.weight_decay),
        lr_scheduler=make_scheduler,
        config=ds_config(cfg, world_size, load_universal=load_universal),
        dist_init_required=True,
    )
    return engine


def engine_dtype(engine) -> torch.dtype:
    """The dtype the engine's module computes in (inputs are not auto-cast: docs/stack.md)."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def loss_scale(engine) -> Optional[float]:
    if engine.fp16_enabled():
        opt = engine.optimizer
        return float(getattr(opt, "loss_scale", getattr(opt, "cur_scale", 1.0)))
    return None


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def save(engine, ckpt_root: str, tag: str, client_state: dict) -> None:
    """All ranks: DeepSpeed state into ckpt_root/tag, ours under one key. DeepSpeed's `latest` is not written
    (save_latest=False): the caller writes its own marker once every rank has finished."""
    engine.save_checkpoint(ckpt_root, tag=tag, client_state={CLIENT_KEY: client_state}, save_latest=False)


def load(engine, ckpt_root: str, tag: str, load_optimizer: bool = True) -> dict:
    """All ranks: restore DeepSpeed state (module, optimizer partitions, lr scheduler, step counters) from
    ckpt_root/tag; returns our client state."""
    path, client = engine.load_checkpoint(ckpt_root, tag=tag, load_optimizer_states=load_optimizer,
                                          load_lr_scheduler_states=load_optimizer, load_module_strict=True)
    if path is None:
        raise FileNotFoundError(f"{os.path.join(ckpt_root, tag)}: DeepSpeed could not load this checkpoint")
    if not client or CLIENT_KEY not in client:
        raise ValueError(f"{os.path.join(ckpt_root, tag)}: no '{CLIENT_KEY}' state in the checkpoint "
                         f"(not written by pixart-ds train?)")
    return client[CLIENT_KEY]


def apply_recipe_optimizer(engine, cfg: C.Config) -> None:
    """After `load`: make the recipe's lr, betas, eps and weight decay current again.

    DeepSpeed restores the optimizer's param_groups and the lr scheduler's base_lrs from the checkpoint, so a recipe
    edited between save and resume (--allow-config-change, e.g. a lower lr after non-finite steps) kept the old
    values without a word. With an unchanged recipe every value is recomputed exactly as LambdaLR computes it
    (base lr x warm-up factor at the saved step), so an exact resume stays exact."""
    t = cfg.train
    groups = engine.optimizer.param_groups
    for g in groups:
        g["betas"] = tuple(t.adam_betas)
        g["eps"] = t.adam_eps
        if g.get("name") == "decay":  # param_groups(): the no_decay group keeps 0
            g["weight_decay"] = t.weight_decay
    sched = engine.lr_scheduler
    if sched is not None and hasattr(sched, "lr_lambdas"):
        lr = C.effective_lr(cfg)
        sched.base_lrs = [lr for _ in groups]
        for g, factor in zip(groups, sched.lr_lambdas):
            g["lr"] = lr * factor(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in groups]


def saved_world_size(tag_dir: str) -> int:
    """Data-parallel size that wrote a ZeRO checkpoint (one optimizer partition file per rank)."""
    n = len([f for f in os.listdir(tag_dir) if f.endswith("_optim_states.pt") and "zero_pp_rank_" in f])
    return n


def to_universal(ckpt_root: str, tag: str) -> str:
    """Rank 0 only: convert ckpt_root/tag to DeepSpeed's universal format in ckpt_root/<tag>_universal (once).

    Runs DeepSpeed's own converter in a subprocess (it spawns worker pools and prints a lot). The output is built
    in a temporary folder and renamed into place, so an interrupted conversion is never mistaken for a finished
    one. Returns the universal tag.
    """
    utag = f"{tag}_universal"
    out = os.path.join(ckpt_root, utag)
    if os.path.isdir(out):
        return utag

    def convert(tmp: str) -> None:
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               os.path.join(ckpt_root, tag), "--output_folder", tmp, "--inject_missing_state",
               "--num_extract_workers", "2", "--num_merge_workers", "1"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        # The converter points ckpt_root/latest_universal at the temporary name; we select tags explicitly instead.
        try:
            os.remove(os.path.join(ckpt_root, "latest_universal"))
        except FileNotFoundError:
            pass
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"{os.path.join(ckpt_root, tag)}: conversion to a universal checkpoint failed: "
                               f"{tail[0]}")

    write_dir_atomic(out, convert)
    return utag


def model_states_path(tag_dir: str) -> str:
    """The file holding the module weights and our client state (written by data-parallel rank 0)."""
    path = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{tag_dir}: not a DeepSpeed checkpoint (no mp_rank_00_model_states.pt)")
    return path


def read_model_states(tag_dir: str) -> dict:
    """The rank-0 model-states dict of a checkpoint, read without an engine (CPU tensors)."""
    return torch.load(model_states_path(tag_dir), map_location="cpu", weights_only=False)


def fp32_weights(ckpt_root: str, tag: str) -> dict[str, torch.Tensor]:
    """Consolidated fp32 master weights of a ZeRO checkpoint (the optimizer's copy, not the bf16 module)."""

    sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_root, tag=tag)
    return {k: v.contiguous() for k, v in sd.items()}
