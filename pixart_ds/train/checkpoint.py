"""Checkpoints: DeepSpeed state + our client state; save, resume, and the crash safety between them.

Layout of a run directory:

    RUN_DIR/config.yaml                     the resolved recipe of the latest start (config.dump)
    RUN_DIR/metrics.jsonl, tensorboard/, samples/
    RUN_DIR/checkpoints/latest              our marker: the tag of the newest COMPLETE checkpoint
    RUN_DIR/checkpoints/step_00001000/      DeepSpeed: mp_rank_00_model_states.pt (module + client state),
                                            *zero_pp_rank_R_mp_rank_00_optim_states.pt (rank R's optimizer partition)
                                            pixart_ds.json: step, world size, images seen, resolved config
                                            (written last: its presence marks the checkpoint complete)
    RUN_DIR/checkpoints/step_00001000_universal/   made once when resuming at another world size

The client state lives under ONE key, "pixart_ds" (DeepSpeed merges client_state into its own dict, so keys like
"module" would silently overwrite its state: docs/stack.md); what it holds is listed once, in train/state.py's
RunState (progress, EMA, loader position, every rank's RNG), which both `save` and `load` go through.

Crash safety: a save goes into its own tag directory; only after every rank has finished writing (and fsynced
its files) does rank 0 write pixart_ds.json and atomically replace `latest` (temp file + fsync + rename).
DeepSpeed's own `latest` is never written (save_latest=False), so a save killed half-way leaves `latest` at the
previous, complete checkpoint; the half-written directory is never loaded and is removed by the next save.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Optional

from pixart_ds import config as C
from pixart_ds import dist
from pixart_ds.fsutil import atomic_write_text, fsync_file
from pixart_ds.train import zero
from pixart_ds.train.faults import NO_FAULTS, Faults
from pixart_ds.train.resilience import is_collective_error
from pixart_ds.train.state import RunState

CKPT_DIR = "checkpoints"
LATEST = "latest"
META = "pixart_ds.json"
MODEL_STATES = "mp_rank_00_model_states.pt"
_TAG_RE = re.compile(r"^step_(\d{8,})$")

# Recipe keys that may change between save and resume without --allow-config-change: they do not change what is
# trained (logging, checkpointing, sampling, stop conditions, I/O tuning, encoders used only for sample grids, the
# micro batch: the global batch is what defines the run).
RESUME_MUTABLE = ("name", "run_dir", "log.", "checkpoint.", "sample.", "eval.", "encoders.", "train.total_steps",
                  "train.resume", "train.init_from", "train.time_limit_s", "train.collective_timeout_s",
                  "train.max_nonfinite_steps", "train.micro_batch_size", "data.num_workers", "data.predownload")


class CheckpointError(ValueError):
    """A checkpoint on disk that cannot be used (missing, incomplete, or failed to write); one-line message."""

    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> Optional[int]:
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def ckpt_root(run_dir: str) -> str:
    return os.path.join(run_dir, CKPT_DIR)


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def read_meta(tag_dir: str) -> Optional[dict]:
    path = os.path.join(tag_dir, META)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_latest(root: str) -> Optional[str]:
    """Tag of the newest complete checkpoint under `root`, or None when there is none."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    tag_dir = os.path.join(root, tag)
    if read_meta(tag_dir) is None:
        raise CheckpointError(f"{path} names {tag!r} but {tag_dir} is missing or incomplete (no {META})")
    return tag


def complete_tags(root: str) -> list[str]:
    """Complete checkpoints under root, oldest first."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if step_of(t) is not None and os.path.isfile(os.path.join(root, t, META))]
    return sorted(tags, key=step_of)


def find_checkpoint(path: str, what: str) -> tuple[str, str]:
    """(root, tag) of the checkpoint a path means: a run directory (its latest), a checkpoints/ folder (its
    latest) or a tag directory itself. `what` names the recipe key in errors."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: {path}: no such file or directory")
    if os.path.isfile(os.path.join(path, MODEL_STATES)):
        if read_meta(path) is None:
            raise CheckpointError(f"{what}: {path}: incomplete checkpoint (no {META}; the save was interrupted)")
        return os.path.dirname(path), os.path.basename(path)
    for root in (ckpt_root(path), path):
        if os.path.isfile(os.path.join(root, LATEST)):
            return root, read_latest(root)
    raise FileNotFoundError(f"{what}: {path}: not a run directory with checkpoints, nor a checkpoint directory")


# ----------------------------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------------------------


def _dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                pass
    return total


def _space_note(root: str) -> str:
    """Free space beside a failed save, against the size of the latest complete checkpoint. A full disk does not
    always say so: torch.save reports it as `RuntimeError: [enforce fail at inline_container.cc] unexpected pos`."""
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return ""
    note = f"; {free / 2**20:.1f} MiB free on the filesystem of {root}"
    try:
        latest = read_latest(root)
    except CheckpointError:
        latest = None
    need = _dir_bytes(os.path.join(root, latest)) if latest else 0
    if need and free < need:
        note += f", a checkpoint needs about {need / 2**20:.1f} MiB: no space left"
    return note


def save(engine, run_dir: str, state: RunState, keep_last: int, faults: Faults = NO_FAULTS) -> str:
    """All ranks. Writes RUN_DIR/checkpoints/step_N (N = state.progress.step) and makes it `latest` once complete;
    keeps the last K. Returns the tag directory. Raises CheckpointError (on every rank) if any rank failed to write."""
    step = state.progress.step
    client_state, meta = state.client_state(), state.meta()
    root = ckpt_root(run_dir)
    tag = tag_for(step)
    tag_dir = os.path.join(root, tag)
    rank = dist.rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        latest = read_latest(root)
        if os.path.isdir(tag_dir) and tag != latest:
            shutil.rmtree(tag_dir)  # left by an interrupted save of this same step: never loaded, start clean
    dist.barrier()
    error = None
    try:
        zero.save(engine, root, tag, client_state)
    except Exception as e:  # e.g. ENOSPC (OSError, or RuntimeError from torch.save): this rank failed to write
        if is_collective_error(e):  # a lost peer, not a write failure: the trainer reports it
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        error = f"rank {rank}: {type(e).__name__}: {first}{_space_note(root)}"
        # The other ranks wait in the barrier DeepSpeed's save ends with; meet them there, then agree below.
        dist.barrier()
    if error is None:
        try:  # durable before `latest` points here: this rank's optimizer partition (+ rank 0's model states)
            for name in os.listdir(tag_dir):
                if f"zero_pp_rank_{engine.global_rank}_" in name or (rank == 0 and name == MODEL_STATES):
                    fsync_file(os.path.join(tag_dir, name))
        except OSError as e:
            error = f"rank {rank}: {type(e).__name__}: {e}"
    errors = [e for e in dist.gather_objects(error) if e]
    if not errors:
        faults.in_save(step)  # tests: every rank dies with all files written, before `latest`
    if errors:
        prev = read_latest(root)  # every rank: the first rank to exit may take the launcher down with the others
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        raise CheckpointError(f"checkpoint {tag_dir} failed ({'; '.join(errors)}); the previous checkpoint "
                              f"{'(' + prev + ') ' if prev else ''}is intact")
    error = None
    if rank == 0:
        try:
            atomic_write_text(os.path.join(tag_dir, META), json.dumps({**meta, "tag": tag, "time": time.time()},
                                                                      indent=1))
            atomic_write_text(os.path.join(root, LATEST), tag)
        except OSError as e:  # the marker or `latest` could not be written (e.g. ENOSPC): `latest` is unchanged
            error = f"rank 0: {type(e).__name__}: {e}{_space_note(root)}"
            prev = read_latest(root)
            if prev != tag:
                shutil.rmtree(tag_dir, ignore_errors=True)
        else:
            prune(root, keep_last)
    errors = [e for e in dist.gather_objects(error) if e]  # also the barrier: nobody returns before `latest` is final
    if errors:
        prev = read_latest(root)
        raise CheckpointError(f"checkpoint {tag_dir} failed ({errors[0]}); the previous checkpoint "
                              f"{'(' + prev + ') ' if prev else ''}is intact")
    return tag_dir


def prune(root: str, keep_last: int) -> list[str]:
    """Rank 0: keep the newest `keep_last` complete checkpoints (and `latest`); remove the rest, universal
    conversions of removed ones, and directories of interrupted saves."""
    latest = read_latest(root)
    keep = set(complete_tags(root)[-keep_last:])
    if latest:
        keep.add(latest)
    removed = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        base = name[:-len("_universal")] if name.endswith("_universal") else name
        if step_of(base) is None or base in keep:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# ----------------------------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ResumePlan:
    root: str
    tag: str  # the tag to load (may be <tag>_universal)
    source_tag: str
    meta: dict
    universal: bool


def plan_resume(cfg: C.Config, world_size: int, allow_config_change: bool) -> Optional[ResumePlan]:
    """What to resume from (None = start fresh), checked against the recipe. No collectives, no big reads."""
    mode = cfg.train.resume
    run_root = ckpt_root(cfg.run_dir)
    if mode == "none":
        if complete_tags(run_root):
            raise C.ConfigError(f"train.resume: none, but {run_root} already holds checkpoints; use resume=auto "
                                f"to continue, or another run_dir")
        return None
    if mode == "auto":
        tag = read_latest(run_root)
        if tag is None:
            return None
        root = run_root
    else:
        root, tag = find_checkpoint(mode, "train.resume")
    tag_dir = os.path.join(root, tag)
    meta = read_meta(tag_dir)
    try:
        saved = C.from_dict(meta["config"], f"{tag_dir}/{META}")
    except C.ConfigError as e:
        raise C.ConfigError(f"{tag_dir}: the saved recipe no longer loads ({e})") from None
    changed = C.diff(saved, cfg, ignore=RESUME_MUTABLE)
    if changed and not allow_config_change:
        a, b = C.to_dict(saved), C.to_dict(cfg)

        def get(d, key):
            for part in key.split("."):
                d = d.get(part) if isinstance(d, dict) else None
            return d

        detail = ", ".join(f"{k} ({get(a, k)!r} -> {get(b, k)!r})" for k in changed)
        raise C.ConfigError(f"{tag_dir}: the recipe changed since this checkpoint was written: {detail}; "
                            f"pass --allow-config-change to resume anyway")
    universal = int(meta["world_size"]) != world_size
    return ResumePlan(root, f"{tag}_universal" if universal else tag, tag, meta, universal)


def prepare_universal(plan: ResumePlan) -> None:
    """All ranks: rank 0 converts the checkpoint to the universal format (once), the others wait."""
    if not plan.universal:
        return
    err = None
    if dist.rank() == 0:
        try:
            zero.to_universal(plan.root, plan.source_tag)
        except Exception as e:  # reported on every rank below instead of leaving the others in a barrier
            err = str(e)
    errors = [e for e in dist.gather_objects(err) if e]
    if errors:
        raise CheckpointError(errors[0])


def load(engine, plan: ResumePlan, state: RunState) -> None:
    """All ranks: restore DeepSpeed's state (module, optimizer partitions, lr scheduler, counters) and everything
    RunState lists, from the checkpoint `plan` names; the recipe's optimizer settings then take effect again (an edited
    recipe resumed with --allow-config-change)."""
    client = zero.load(engine, plan.root, plan.tag)
    zero.apply_recipe_optimizer(engine, state.cfg)
    state.restore(client, same_world=not plan.universal)
    if int(engine.global_steps) != state.progress.step:
        raise CheckpointError(f"{plan.root}/{plan.tag}: DeepSpeed step {engine.global_steps} != ours "
                              f"{state.progress.step}")
