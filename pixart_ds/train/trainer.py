"""fit(cfg): build -> resume -> loop (fetch, step, log, checkpoint, sample, stop on signal) -> close.

The loop reads top to bottom (DESIGN.md principle 5): `_fit` builds a `Run`, resumes it, and calls its short named
steps until the recipe's steps are done or a step ends the run. What a checkpoint holds is listed once, in
train/state.py's RunState; stop requests, agreement between ranks and lost-rank reports are train/resilience.py;
fault injection for tests is train/faults.py (parsed once, passed in).

Stopping: SIGUSR1 / SIGTERM (Slurm's --signal, preemption, scancel) only set a flag. At the next step boundary
every rank learns whether ANY rank was signalled or passed train.time_limit_s (one all_reduce of a flag), then all
write a checkpoint together and exit with REQUEUE_EXIT_CODE, which the Slurm launchers map to a requeue.

Exit codes: 0 done; REQUEUE_EXIT_CODE (75, EX_TEMPFAIL) stopped early with a checkpoint, resume with the same
command; NONFINITE_EXIT_CODE (3) stopped after train.max_nonfinite_steps consecutive non-finite steps (no new
checkpoint: the latest one predates the first bad step); LOST_RANK_EXIT_CODE (4) a collective failed because another
rank died or hung past train.collective_timeout_s, or the next batch did not come within that time (Streaming's
epoch barrier waits for every rank of the node); the message names the lost rank; resume with the same command;
2 bad input (one-line error from the CLI), including corrupt data met with data.on_corrupt=stop (every rank stops
at the same step boundary; the message names the shard file).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as tdist

from pixart_ds import config as C
from pixart_ds import dist
from pixart_ds.data.dataset import CorruptSampleError
from pixart_ds.data.loader import build_loader
from pixart_ds.diffusion.sampling import generate, make_grid, to_pil
from pixart_ds.diffusion.schedule import Schedule
from pixart_ds.dist import DistEnv
from pixart_ds.fsutil import atomic_write
from pixart_ds.model.encoders import load_text_encoder, load_vae
from pixart_ds.model.pixart import build_model
from pixart_ds.train import checkpoint as ckpt
from pixart_ds.train import zero
from pixart_ds.train.ema import EMA
from pixart_ds.train.faults import NO_FAULTS, Faults
from pixart_ds.train.metrics import Metrics
from pixart_ds.train.resilience import (LOST_RANK_EXIT_CODE, FetchWatchdog, StopFlag, agree_on_data,
                                        is_collective_error, lost_rank_message, peer_table)
from pixart_ds.train.sharedfs import check_shared_dir
from pixart_ds.train.state import RunState, TrainState, noise_generator
from pixart_ds.train.step import train_step
from pixart_ds.train.weights import init_weights

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later" -- stopped by signal or time limit after a checkpoint
NONFINITE_EXIT_CODE = 3
DATA_ERROR_EXIT_CODE = 2  # corrupt data with data.on_corrupt=stop: bad input, like the CLI's one-line errors


def _evaluation():
    """pixart_ds.eval.training, imported only when a recipe turns evaluation on."""
    from pixart_ds.eval import training  # heavy: torchmetrics, torch-fidelity and scipy, needed only for eval

    return training


class RunEnd(Exception):
    """A step that ends the run: exit code, the one line rank 0 prints, and the metrics event it records."""

    def __init__(self, code: int, message: str = "", event: Optional[str] = None, printed: bool = False, **fields):
        super().__init__(message)
        self.code, self.message, self.event, self.fields = code, message, event, fields
        self.printed = printed  # every rank already printed the message (a lost peer: nobody waits for rank 0)


# ----------------------------------------------------------------------------------------------------------------
# Inputs checked before any collective (every rank fails alike)
# ----------------------------------------------------------------------------------------------------------------


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _encoder_config(path: str, sub: str) -> Optional[dict]:
    """config.json of a local encoder folder or of a diffusers pipeline folder's `sub`/."""
    for p in (os.path.join(path, "config.json"), os.path.join(path, sub, "config.json")):
        if os.path.isfile(p):
            return _read_json(p)
    return None


def check_inputs(cfg: C.Config) -> None:
    """Bad input that must stop a run before any training (cheap checks; data shapes are checked by the loader)."""
    m = cfg.model
    if cfg.train.init_from and not os.path.exists(os.path.expanduser(cfg.train.init_from)):
        raise FileNotFoundError(f"train.init_from: {cfg.train.init_from}: no such file or directory")
    sampling = cfg.log.sample_every_steps > 0
    te, vae = cfg.encoders.text_encoder, cfg.encoders.vae
    if te and m.condition == "text":
        if os.path.isdir(te):
            tc = _encoder_config(te, "text_encoder") or {}
            width = tc.get("d_model")
            if width is not None and int(width) != m.caption_channels:
                raise C.ConfigError(f"encoders.text_encoder: {te} has width {width} but model.caption_channels is "
                                    f"{m.caption_channels}")
        elif sampling:
            raise FileNotFoundError(f"encoders.text_encoder: {te}: no such directory (needed for the sample grid, "
                                    f"log.sample_every_steps={cfg.log.sample_every_steps})")
    if vae:
        if os.path.isdir(vae):
            vc = _encoder_config(vae, "vae") or {}
            ch = vc.get("latent_channels")
            if ch is not None and int(ch) != m.in_channels:
                raise C.ConfigError(f"encoders.vae: {vae} has {ch} latent channels but model.in_channels is "
                                    f"{m.in_channels}")
        elif sampling:
            raise FileNotFoundError(f"encoders.vae: {vae}: no such directory (needed for the sample grid, "
                                    f"log.sample_every_steps={cfg.log.sample_every_steps})")
    if sampling and m.condition == "text" and not te:
        raise C.ConfigError("encoders.text_encoder: log.sample_every_steps > 0 needs a text encoder for the prompts")
    if sampling and not vae:
        raise C.ConfigError("encoders.vae: log.sample_every_steps > 0 needs a VAE to decode the sample grid")
    if cfg.eval.every_steps > 0:
        _evaluation().check_eval_inputs(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Pieces of a run
# ----------------------------------------------------------------------------------------------------------------


class _Batches:
    """Micro-batches from the loader, rolling over epochs (Streaming moves to the next epoch on a new iter)."""

    def __init__(self, loader):
        self.loader = loader
        self.it = None

    def next(self) -> dict:
        for _ in range(2):
            if self.it is None:
                self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:
                self.it = None
        raise RuntimeError("the data loader yielded no batch in a whole epoch")


class _SampleGrid:
    """Rank 0: a grid of samples for log.sample_prompts with the EMA weights (pixart_ds.diffusion.sampling)."""

    def __init__(self, cfg: C.Config, device: torch.device):
        self.cfg, self.device = cfg, device
        self.model = None
        self.enc = None

    def __call__(self, ema: EMA, step: int, run_dir: str) -> str:
        cfg = self.cfg
        prompts = list(cfg.log.sample_prompts) or (
            ["0", "1", "2", "3"] if cfg.model.condition == "class" else ["a photo"])
        if self.model is None:
            self.model = build_model(cfg).to(self.device).eval()
            tok = te = None
            if cfg.model.condition == "text":
                tok, te = load_text_encoder(cfg.encoders.text_encoder, cfg.encoders.text_dtype
                                            if self.device.type == "cuda" else "fp32", self.device)
            self.enc = (tok, te, load_vae(cfg.encoders.vae, "fp32", self.device))
        ema.copy_to(self.model)
        tok, te, vae = self.enc
        res = cfg.data.resolution
        autocast = torch.bfloat16 if (self.device.type == "cuda" and cfg.train.precision == "bf16") else None
        out = generate(self.model, cfg.model, prompts, vae=vae, tokenizer=tok, text_encoder=te,
                       schedule=Schedule.from_config(cfg.diffusion), sampler=cfg.sample.sampler,
                       steps=cfg.sample.steps, guidance=cfg.sample.guidance,
                       seeds=[cfg.sample.seed + i for i in range(len(prompts))], height=res, width=res,
                       device=self.device, autocast_dtype=autocast, vae_scale=cfg.encoders.vae_scale)
        path = os.path.join(run_dir, "samples", f"step_{step:08d}.png")
        atomic_write(path, make_grid(to_pil(out.images)).save)
        return path


def _ema_on_device(ema: EMA, device: torch.device) -> None:
    """Keep the EMA on the compute device (it was created from the CPU fp32 model)."""
    if not ema.enabled or device.type == "cpu":
        return
    ema.params = {k: v.to(device) for k, v in ema.params.items()}
    ema.buffers = {k: v.to(device) for k, v in ema.buffers.items()}


@dataclass
class Run:
    """A training run's objects and its short named steps (what `_fit` calls in order)."""

    cfg: C.Config
    env: DistEnv
    device: torch.device
    faults: Faults
    engine: object
    state: RunState
    batches: _Batches
    schedule: Schedule
    metrics: Metrics
    accum: int
    plan: Optional[ckpt.ResumePlan]
    init_note: Optional[str]
    t_start: float = field(default_factory=time.time)
    stop: StopFlag = field(default_factory=StopFlag)
    peers: list = field(default_factory=list)
    grid: Optional[_SampleGrid] = None
    evaluator: Optional[object] = None  # pixart_ds.eval.training.TrainingEvaluator when eval is on
    nonfinite_run: int = 0
    first_bad: Optional[int] = None
    checkpoint_due: bool = False
    last_saved: int = -1

    @property
    def progress(self) -> TrainState:
        return self.state.progress

    @property
    def step_no(self) -> int:
        return self.state.progress.step

    def latest(self) -> str:
        try:
            return ckpt.read_latest(ckpt.ckpt_root(self.cfg.run_dir)) or "none"
        except ckpt.CheckpointError as e:
            return f"unreadable ({e})"

    # ---- build and resume ----------------------------------------------------------------------------------------

    @classmethod
    def build(cls, cfg: C.Config, env: DistEnv, device: torch.device, faults: Faults,
              allow_config_change: bool) -> "Run":
        """The model (+ stage initialisation) and EMA in fp32 before DeepSpeed casts the module, the loader (after
        the process group: Streaming shares one view of the order across ranks), the engine."""
        check_shared_dir(cfg.run_dir, "run_dir")  # every rank must see rank 0's files (multi-node: a shared fs)
        plan = ckpt.plan_resume(cfg, env.world_size, allow_config_change)  # small files, same on every rank
        if plan is not None:
            ckpt.prepare_universal(plan)
        if env.rank == 0:
            os.makedirs(cfg.run_dir, exist_ok=True)
            C.dump(cfg, os.path.join(cfg.run_dir, "config.yaml"))
        micro, accum = C.batch_plan(cfg, env.world_size)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg)
        init_note, init_ema = None, None
        if plan is None and cfg.train.init_from:
            raw, init_ema, init_note = init_weights(cfg, model)
            model.load_state_dict(raw, strict=True)
        ema = EMA(model, cfg.train.ema_decay, enabled=env.rank == 0)
        if init_ema is not None:
            ema.reset(model, init_ema)
        model.to(device)
        _ema_on_device(ema, device)
        loader = build_loader(cfg, micro, env)
        engine = zero.initialize(model, cfg, env.world_size, load_universal=bool(plan and plan.universal))
        state = RunState(cfg, env.rank, env.world_size, TrainState(), ema, engine.module, loader,
                         noise_generator(cfg, env.rank, device))
        metrics = Metrics(cfg, cfg.run_dir, env.rank, env.world_size, device,
                          start_step=int(plan.meta["step"]) if plan else 0)
        return cls(cfg, env, device, faults, engine, state, _Batches(loader), Schedule.from_config(cfg.diffusion),
                   metrics, accum, plan, init_note)

    def resume(self) -> None:
        if self.plan is not None:
            ckpt.load(self.engine, self.plan, self.state)
            self.last_saved = self.step_no
            self.metrics.event("resume", self.step_no, checkpoint=os.path.join(self.plan.root, self.plan.source_tag),
                               saved_world_size=self.plan.meta["world_size"], world_size=self.env.world_size,
                               universal=self.plan.universal)
        else:
            micro, accum = C.batch_plan(self.cfg, self.env.world_size)
            self.metrics.event("start", 0, world_size=self.env.world_size, micro_batch=micro, grad_accum=accum,
                               launcher=self.env.launcher, init=self.init_note)
        self.stop.install()
        self.peers = peer_table()  # (host, pid) per rank: after a failed collective, say which peer is gone
        if self.env.rank == 0 and self.cfg.log.sample_every_steps > 0:
            self.grid = _SampleGrid(self.cfg, self.device)
        if self.env.rank == 0 and self.cfg.eval.every_steps > 0:
            self.evaluator = _evaluation().TrainingEvaluator(self.cfg, self.device, self.cfg.run_dir)

    # ---- the steps of the loop ---------------------------------------------------------------------------------

    def fetch(self) -> tuple[list[dict], int]:
        """(this rank's micro-batches of the next step, corrupt samples replaced in the global batch), once every
        rank has its own; every rank stops together if one met data it must not train on."""
        self.faults.before_fetch(self.step_no + 1, self.env.rank)
        mbs, error = [], None
        try:
            with FetchWatchdog(self.cfg.train.collective_timeout_s, self._stalled_fetch):
                mbs = [self.batches.next() for _ in range(self.accum)]
        except CorruptSampleError as e:
            error = f"rank {self.env.rank}: {e}"
        skipped, errors = agree_on_data(mbs, error, self.device)
        if errors:
            raise RunEnd(DATA_ERROR_EXIT_CODE, f"stopped before step {self.step_no + 1}: {'; '.join(errors)}; "
                         f"latest checkpoint: {self.latest()}", "corrupt_data")
        return mbs, skipped

    def _stalled_fetch(self) -> str:
        lost, msg = lost_rank_message(None, self.peers, self.env.rank, self.step_no,
                                      self.cfg.train.collective_timeout_s, self.latest())
        self.metrics.event("rank_lost", self.step_no, message=msg, lost_ranks=lost)
        return msg

    def train(self, mbs: list[dict], data_skipped: int, t0: float) -> dict:
        """One optimizer step, the EMA after it, the counters and the log."""
        poison = self.faults.poison_loss(self.step_no + 1, self.env.rank)
        out = train_step(self.engine, mbs, self.schedule, self.cfg, self.state.noise, poison_loss=poison)
        out["data_skipped"] = float(data_skipped)
        if not out["skipped"]:
            self.state.ema.update(self.engine.module)
        self.progress.advance(out)
        ids = None
        if self.cfg.log.sample_ids:
            ids = dist.gather_tensor(torch.cat([mb["sample_idx"] for mb in mbs]), self.device).tolist()
        self.metrics.step(self.progress, out, time.perf_counter() - t0, ids)
        self.faults.after_step(self.step_no)
        return out

    def guard_nonfinite(self, out: dict) -> None:
        """train.max_nonfinite_steps non-finite steps in a row end the run; isolated ones are skipped and counted."""
        if not out["nonfinite"]:
            self.nonfinite_run, self.first_bad = 0, None
            return
        self.nonfinite_run += 1
        self.first_bad = self.first_bad or self.step_no
        if self.nonfinite_run >= self.cfg.train.max_nonfinite_steps:
            raise RunEnd(NONFINITE_EXIT_CODE, f"stopped at step {self.step_no}: {self.nonfinite_run} consecutive "
                         f"non-finite steps (first at step {self.first_bad}; train.max_nonfinite_steps="
                         f"{self.cfg.train.max_nonfinite_steps}); latest checkpoint: {self.latest()}", "nonfinite")

    def stop_requested(self) -> tuple[bool, bool]:
        """(every rank stops now, this rank was asked): a signal or train.time_limit_s on ANY rank."""
        limit = self.cfg.train.time_limit_s
        local = self.stop.signum is not None or (limit is not None and time.time() - self.t_start >= limit)
        return dist.any_rank(local, self.device), local

    def checkpoint(self, force: bool = False) -> None:
        """Every checkpoint.every_steps and at the end; deferred while non-finite steps are running (the latest
        checkpoint must predate the first bad step); always when stopping (`force`)."""
        s = self.step_no
        self.checkpoint_due = self.checkpoint_due or s % self.cfg.checkpoint.every_steps == 0 or \
            s == self.cfg.train.total_steps
        if force or (self.checkpoint_due and self.nonfinite_run == 0):
            t0 = time.perf_counter()
            path = ckpt.save(self.engine, self.cfg.run_dir, self.state, self.cfg.checkpoint.keep_last, self.faults)
            self.metrics.event("checkpoint", s, path=path, seconds=round(time.perf_counter() - t0, 3))
            self.last_saved, self.checkpoint_due = s, False

    def sample_grid(self) -> None:
        if self.grid is None or self.step_no % self.cfg.log.sample_every_steps:
            return
        try:
            path = self.grid(self.state.ema, self.step_no, self.cfg.run_dir)
            self.metrics.event("sample", self.step_no, path=path)
            self.metrics.image("samples", path, self.step_no)
        except Exception as e:  # a failing preview must not kill a month-long run
            print(f"pixart-ds train: sample grid at step {self.step_no} failed: {e}", file=sys.stderr)
            self.grid = None

    def evaluate(self) -> None:
        """Rank 0, every eval.every_steps: the EMA weights through pixart_ds.eval (no global RNG, data loader or
        checkpoint is touched, so exact resume holds); metrics to metrics.jsonl and TensorBoard, a grid."""
        s = self.step_no
        if self.evaluator is None or s % self.cfg.eval.every_steps:
            return
        try:
            res = self.evaluator(self.state.ema.copy_to, s)
        except Exception as e:  # a failing evaluation must not kill a month-long run: say so, stop evaluating
            print(f"pixart-ds train: evaluation at step {s} failed, evaluation disabled: {type(e).__name__}: {e}",
                  file=sys.stderr)
            self.metrics.event("eval_failed", s, error=f"{type(e).__name__}: {e}")
            self.evaluator = None
            return
        flat = _evaluation().flat_metrics(res)
        self.metrics.event("eval", s, **flat, images=self.cfg.eval.num_images, seconds=res["seconds"],
                           grid=res.get("grid"), record=res["record"])
        self.metrics.scalars("eval", flat, s)
        if res.get("grid"):
            self.metrics.image("eval", res["grid"], s)

    def stop_now(self, asked_here: bool) -> RunEnd:
        why = f"signal {signal.Signals(self.stop.signum).name}" if self.stop.signum else \
            f"train.time_limit_s={self.cfg.train.time_limit_s}"
        return RunEnd(REQUEUE_EXIT_CODE, event="stop", reason=why if asked_here else "another rank",
                      exit_code=REQUEUE_EXIT_CODE)

    def finish(self) -> None:
        if self.last_saved != self.step_no:
            self.checkpoint(force=True)
        self.metrics.event("done", self.step_no, seconds=round(time.time() - self.t_start, 1),
                           images_seen=self.progress.images_seen)

    def lost(self, e: BaseException) -> Optional[RunEnd]:
        """The end of a run whose collective failed because a peer died or hangs; None for any other error."""
        lost, msg = lost_rank_message(e, self.peers, self.env.rank, self.step_no,
                                      self.cfg.train.collective_timeout_s, self.latest())
        if self.env.world_size == 1 or not (lost or is_collective_error(e)):
            return None
        # Now, not after the loop: the launcher's SIGTERM may follow shortly (its handler is restored below).
        print(f"pixart-ds train: error: {msg}", file=sys.stderr, flush=True)
        return RunEnd(LOST_RANK_EXIT_CODE, msg, "rank_lost", printed=True, lost_ranks=lost)


# ----------------------------------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------------------------------


def fit(cfg: C.Config, allow_config_change: bool = False, faults: Optional[Faults] = None) -> int:
    """Train the recipe; returns the process exit code (see the module docstring). `faults`: test fault injection
    (default: none; the CLI passes Faults.from_env())."""
    env = dist.dist_env()
    dist.export_env(env)
    check_inputs(cfg)  # before any collective: every rank fails alike on bad input
    device = dist.init_distributed(env, timeout_s=cfg.train.collective_timeout_s)
    rc = None
    try:
        rc = _fit(cfg, env, device, faults or NO_FAULTS, allow_config_change)
        return rc
    finally:
        if rc == LOST_RANK_EXIT_CODE:
            # The process group is broken: tearing it down can block on the lost peer or abort in gloo's destructors
            # ("terminate called without an active exception"). The message is out; leave with our exit code.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        dist.destroy()


def _fit(cfg: C.Config, env: DistEnv, device: torch.device, faults: Faults, allow_config_change: bool) -> int:
    run = Run.build(cfg, env, device, faults, allow_config_change)
    run.resume()
    end = RunEnd(0)
    try:
        while run.step_no < cfg.train.total_steps:
            t0 = time.perf_counter()
            out = run.train(*run.fetch(), t0)
            run.guard_nonfinite(out)
            stopping, asked_here = run.stop_requested()
            run.checkpoint(force=stopping)
            run.sample_grid()
            if stopping:
                raise run.stop_now(asked_here)
            run.evaluate()
        run.finish()
    except RunEnd as e:
        end = e
    except Exception as e:
        end = run.lost(e)
        if end is None:
            raise
    finally:
        run.stop.restore()
    if end.event:
        run.metrics.event(end.event, run.step_no, **({"message": end.message} if end.message else {}), **end.fields)
    run.metrics.close()
    _report(run, end)
    return end.code


def _report(run: Run, end: RunEnd) -> None:
    """Rank 0's last line (after the progress bar is closed, so it starts on a line of its own)."""
    main, step = run.env.rank == 0, run.step_no
    if main and end.message and not end.printed:
        print(f"pixart-ds train: error: {end.message}", file=sys.stderr, flush=True)
    if main and end.code == 0:
        print(f"pixart-ds train: done at step {step}; checkpoints in {ckpt.ckpt_root(run.cfg.run_dir)}; "
              f"metrics in {os.path.join(run.cfg.run_dir, 'metrics.jsonl')}", flush=True)
    elif main and end.code == REQUEUE_EXIT_CODE:
        print(f"pixart-ds train: stopped at step {step} with a checkpoint; run the same command to resume "
              f"(exit code {REQUEUE_EXIT_CODE})", file=sys.stderr, flush=True)
    if run.env.world_size > 1 and end.code != LOST_RANK_EXIT_CODE:
        # Nobody leaves before rank 0 has printed: torchrun tears the other ranks down as soon as one exits non-zero,
        # which could kill rank 0 before its one-line error.
        try:
            tdist.barrier()
        except Exception:  # noqa: BLE001 - a peer already gone: its exit is what the launcher reports
            pass
