"""Checkpoints: DeepSpeed state + our client state; resume, stage initialisation, weight export.

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
"module" would silently overwrite its state: stack-notes):

    {"version", "progress": {"step", "images_seen", "skipped_total"}, "ema": EMA state (fp32),
     "loader": StreamingDataLoader.state_dict(), "rng": [per rank: python, numpy, torch, cuda, noise generator],
     "world_size", "config": the resolved recipe as a dict}

Crash safety: a save goes into its own tag directory; only after every rank has finished writing (and fsynced
its files) does rank 0 write pixart_ds.json and atomically replace `latest` (temp file + fsync + rename).
DeepSpeed's own `latest` is never written (save_latest=False), so a save killed half-way leaves `latest` at the
previous, complete checkpoint; the half-written directory is never loaded and is removed by the next save.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as tdist

from pixart_ds import config as C

CKPT_DIR = "checkpoints"
LATEST = "latest"
META = "pixart_ds.json"
MODEL_STATES = "mp_rank_00_model_states.pt"
CLIENT_VERSION = 1
_TAG_RE = re.compile(r"^step_(\d{8,})$")
# Test hook (reliability tests): every rank SIGKILLs itself inside the save of this step, after DeepSpeed wrote its
# files and before pixart_ds.json / `latest` are written -- the worst moment for a crash.
KILL_IN_SAVE_ENV = "PIXART_DS_TEST_KILL_IN_SAVE_AT_STEP"

# Recipe keys that may change between save and resume without --allow-config-change: they do not change what is
# trained (logging, checkpointing, sampling, stop conditions, I/O tuning, encoders used only for sample grids, the
# micro batch: the global batch is what defines the run).
RESUME_MUTABLE = ("name", "run_dir", "log.", "checkpoint.", "sample.", "encoders.", "train.total_steps",
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


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_text(path: str, text: str) -> None:
    """temp file + fsync + rename + fsync(dir): readers see the old or the new content, never a mix."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:  # e.g. ENOSPC: no half-written temp file stays behind
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(d)


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
# RNG
# ----------------------------------------------------------------------------------------------------------------


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


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------------------------


def _barrier():
    if tdist.is_initialized():
        tdist.barrier()


def _rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


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


def save(engine, run_dir: str, step: int, client_state: dict, keep_last: int, meta: dict) -> str:
    """All ranks. Writes RUN_DIR/checkpoints/step_N and makes it `latest` once complete; keeps the last K.
    Returns the tag directory. Raises CheckpointError (on every rank) if any rank failed to write."""
    from pixart_ds.train import zero

    root = ckpt_root(run_dir)
    tag = tag_for(step)
    tag_dir = os.path.join(root, tag)
    rank = _rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        latest = read_latest(root)
        if os.path.isdir(tag_dir) and tag != latest:
            shutil.rmtree(tag_dir)  # left by an interrupted save of this same step: never loaded, start clean
    _barrier()
    error = None
    try:
        zero.save(engine, root, tag, client_state)
    except Exception as e:  # e.g. ENOSPC (OSError, or RuntimeError from torch.save): this rank failed to write
        from pixart_ds.train.dist import is_collective_error

        if is_collective_error(e):  # a lost peer, not a write failure: the trainer reports it
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        error = f"rank {rank}: {type(e).__name__}: {first}{_space_note(root)}"
        # The other ranks wait in the barrier DeepSpeed's save ends with; meet them there, then agree below.
        _barrier()
    if error is None:
        try:  # durable before `latest` points here: this rank's optimizer partition (+ rank 0's model states)
            for name in os.listdir(tag_dir):
                if f"zero_pp_rank_{engine.global_rank}_" in name or (rank == 0 and name == MODEL_STATES):
                    _fsync_file(os.path.join(tag_dir, name))
        except OSError as e:
            error = f"rank {rank}: {type(e).__name__}: {e}"
    errors = [e for e in gather_objects(error) if e]
    if not errors and os.environ.get(KILL_IN_SAVE_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)  # test hook: every rank dies with all files written, before `latest`
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
    errors = [e for e in gather_objects(error) if e]  # also the barrier: nobody returns before `latest` is final
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
    from pixart_ds.train import zero

    if not plan.universal:
        return
    err = None
    if _rank() == 0:
        try:
            zero.to_universal(plan.root, plan.source_tag)
        except Exception as e:  # reported on every rank below instead of leaving the others in a barrier
            err = str(e)
    errors = [e for e in gather_objects(err) if e]
    if errors:
        raise CheckpointError(errors[0])


# ----------------------------------------------------------------------------------------------------------------
# Weights of a finished (or running) run: export and stage initialisation
# ----------------------------------------------------------------------------------------------------------------


def _model_json(cfg: C.Config) -> dict:
    d = C.to_dict(cfg)["model"]
    d["pe_interpolation"] = C.pe_interpolation(cfg)  # explicit, so the folder does not depend on the derivation
    return d


def _is_ours(path: str) -> bool:
    from pixart_ds.model.convert import OURS_CONFIG, OURS_WEIGHTS

    return os.path.isfile(os.path.join(path, OURS_CONFIG)) and os.path.isfile(os.path.join(path, OURS_WEIGHTS))


def load_weights(run_dir_or_ckpt: str, use_ema: bool = True, what: str = "checkpoint") -> tuple[dict, int, dict]:
    """(model_cfg_dict, resolution, state_dict) from a run directory (its latest checkpoint), a checkpoint tag
    directory or an "ours" folder. use_ema: the EMA weights (fp32), else the optimizer's fp32 master weights."""
    from pixart_ds.model.convert import load_ours
    from pixart_ds.train import zero

    path = os.path.abspath(os.path.expanduser(run_dir_or_ckpt))
    if os.path.isdir(path) and _is_ours(path):
        return load_ours(path)
    root, tag = find_checkpoint(path, what)
    tag_dir = os.path.join(root, tag)
    meta = read_meta(tag_dir)
    cfg = C.from_dict(meta["config"], f"{tag_dir}/{META}")
    states = zero.read_model_states(tag_dir)
    module = {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    if use_ema:
        client = states.get(zero.CLIENT_KEY)
        if not client or "ema" not in client:
            raise CheckpointError(f"{tag_dir}: no EMA state in the checkpoint")
        sd = client["ema"]["state_dict"]
    else:
        sd = dict(module)
        sd.update(zero.fp32_weights(root, tag))
    missing = set(module) - set(sd)
    if missing:
        raise CheckpointError(f"{tag_dir}: weights lack {sorted(missing)[:5]}")
    return _model_json(cfg), cfg.data.resolution, {k: sd[k] for k in module}


def export_weights(run_dir: str, out: str, use_ema: bool = True) -> int:
    """`pixart-ds ckpt export RUN_DIR OUT`: consolidated EMA (or raw fp32) weights as an "ours" folder
    (model.safetensors + model.json) that `sample`, `convert` and `export` read."""
    from pixart_ds.model.convert import save_ours

    model_cfg, resolution, sd = load_weights(run_dir, use_ema=use_ema, what="ckpt export")
    save_ours(out, model_cfg, sd, resolution)
    n = sum(v.numel() for k, v in sd.items())
    print(f"wrote {out} ({'EMA' if use_ema else 'raw'} weights, {len(sd)} tensors, {n:,} values, "
          f"resolution {resolution})")
    return 0


def init_weights(cfg: C.Config, model: torch.nn.Module) -> tuple[dict, dict, str]:
    """Weights and EMA of an earlier stage for a fresh run (`train.init_from`): (state_dict, ema_state_dict, note).

    The source is a run directory, a checkpoint directory or an "ours" folder. A class-conditional source (stage 1,
    DiT-style) for a text-conditional adaLN-single run (stage 2) goes through the DiT -> PixArt
    re-parameterization at t = train.init_reparam_t (paper §2.3); otherwise the architectures must match exactly.
    """
    from pixart_ds.model.convert import build_from_dict, check_state_dict, dit_to_pixart, load_state_dict_strict

    src = cfg.train.init_from
    path = os.path.abspath(os.path.expanduser(src))
    if not os.path.exists(path):
        raise FileNotFoundError(f"train.init_from: {src}: no such file or directory")
    if _is_ours(path):  # exported weights: one set, used for both
        src_cfg, res, raw = load_weights(path, what="train.init_from")
        ema = raw
    else:
        src_cfg, res, raw = load_weights(path, use_ema=False, what="train.init_from")
        ema = load_weights(path, use_ema=True, what="train.init_from")[2]
    m = cfg.model
    if src_cfg.get("condition") == "class" and m.condition == "text":
        if m.adaln != "single":
            raise C.ConfigError(f"train.init_from: {src} is class-conditional; the re-parameterization targets "
                                f"model.adaln=single, got {m.adaln}")
        out = []
        for sd in (raw, ema):
            dit = build_from_dict(src_cfg, res, f"train.init_from: {src}")
            load_state_dict_strict(dit, sd, f"train.init_from: {src}")
            out.append(dit_to_pixart(dit, target_cfg=m, reparam_t=cfg.train.init_reparam_t,
                                     seed=cfg.train.seed).state_dict())
        raw, ema = out
        note = f"re-parameterized from class-conditional {src} at t={cfg.train.init_reparam_t}"
    else:
        note = f"weights and EMA of {src}"
    want = model.state_dict()
    check_state_dict(want, raw, f"train.init_from: {src}")
    check_state_dict(want, ema, f"train.init_from: {src} (EMA)")
    return raw, ema, note
