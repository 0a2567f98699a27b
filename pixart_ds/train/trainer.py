"""fit(cfg): build -> resume -> loop (step, log, checkpoint, sample, stop on signal) -> close.

The loop reads top to bottom (DESIGN.md principle 5). Everything a run needs to continue exactly is listed in
checkpoint.py's client state; the data order is Streaming's (a function of the seed and the samples consumed), the
noise and timesteps come from one generator per rank whose state is checkpointed, and the latent posterior sample
and caption dropout are pure functions of (seed, epoch, sample index) in the dataset. An interrupted and an
uninterrupted run therefore see the same samples in the same order with the same noise.

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
import threading
import time
from typing import Optional

import torch
import torch.distributed as tdist

from pixart_ds import config as C
from pixart_ds.train import checkpoint as ckpt
from pixart_ds.train.dist import (DistEnv, describe_peers, destroy, dist_env, export_env, init_distributed,
                                   is_collective_error, peer_table)
from pixart_ds.train.ema import EMA
from pixart_ds.train.metrics import Metrics

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later" -- stopped by signal or time limit after a checkpoint
NONFINITE_EXIT_CODE = 3
LOST_RANK_EXIT_CODE = 4
DATA_ERROR_EXIT_CODE = 2  # corrupt data with data.on_corrupt=stop: bad input, like the CLI's one-line errors

# Test hook (exact-resume and reliability tests): every rank SIGKILLs itself right after this (1-based) step,
# before its checkpoint, as a node failure or `scancel -s KILL` would.
KILL_ENV = "PIXART_DS_TEST_KILL_AT_STEP"
# Test hook (reliability tests): "N:R" -- rank R SIGSTOPs itself before fetching the data of step N, as a hung node
# would between two steps (at an epoch boundary the other ranks then wait in Streaming's barrier, not in torch).
STOP_ENV = "PIXART_DS_TEST_STOP_RANK_BEFORE_STEP"


class _StopFlag:
    """Set by SIGUSR1/SIGTERM; the handler does nothing else (no I/O or collectives inside a signal handler)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def install(self):
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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


def _any_rank(flag: bool, device: torch.device) -> bool:
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def _agree_on_data(mbs: list, error: Optional[str], device: torch.device) -> tuple[int, list[str]]:
    """(corrupt samples replaced in this global batch (data.on_corrupt=skip), every rank's data error). One small
    all_reduce per step, before train_step: a rank that met data it must not train on (data.on_corrupt=stop) would
    otherwise leave the others waiting in the gradient reduction until the collective timeout."""
    skipped = sum(int(mb["skipped"].sum()) for mb in mbs if "skipped" in mb)
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return skipped, [error] if error else []
    t = torch.tensor([skipped, 1 if error else 0], dtype=torch.int64, device=device)
    tdist.all_reduce(t)
    if int(t[1]) == 0:
        return int(t[0]), []
    return int(t[0]), [e for e in ckpt.gather_objects(error) if e]


class _FetchWatchdog:
    """Bounds the one wait torch's collective timeout does not: the next batch. Streaming's shared-memory barrier at
    the start of every epoch spins without a timeout until every rank of the node arrives, and a DataLoader worker on
    a hung filesystem blocks the same way, so a hung peer would stall this rank forever. After
    train.collective_timeout_s the watchdog says which peer is gone or stopped and ends the process."""

    def __init__(self, timeout_s: float, describe):
        self.timeout_s, self.describe = timeout_s, describe
        self._timer: Optional[threading.Timer] = None

    def __enter__(self):
        self._timer = threading.Timer(self.timeout_s, self._fire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        return False

    def _fire(self):
        try:
            print(f"pixart-ds train: error: {self.describe()}", file=sys.stderr, flush=True)
        finally:
            os._exit(LOST_RANK_EXIT_CODE)


def _latest(run_dir: str) -> str:
    try:
        return ckpt.read_latest(ckpt.ckpt_root(run_dir)) or "none"
    except ckpt.CheckpointError as e:
        return f"unreadable ({e})"


def _gather_ids(ids: torch.Tensor, device: torch.device) -> list[int]:
    """Global-batch sample indices in rank order ([world, n] flattened)."""
    ids = ids.to(device)
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        out = [torch.empty_like(ids) for _ in range(tdist.get_world_size())]
        tdist.all_gather(out, ids)
        ids = torch.cat(out)
    return ids.cpu().tolist()


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


class _Sampler:
    """Rank 0: a grid of samples for log.sample_prompts with the EMA weights (pixart_ds.diffusion.sampling)."""

    def __init__(self, cfg: C.Config, device: torch.device):
        self.cfg, self.device = cfg, device
        self.model = None
        self.enc = None

    def __call__(self, ema: EMA, step: int, run_dir: str) -> Optional[str]:
        from pixart_ds.diffusion.sampling import generate, make_grid, to_pil
        from pixart_ds.diffusion.schedule import Schedule
        from pixart_ds.model.encoders import load_text_encoder, load_vae
        from pixart_ds.model.pixart import build_model

        cfg = self.cfg
        prompts = list(cfg.log.sample_prompts) or (
            ["0", "1", "2", "3"] if cfg.model.condition == "class" else ["a photo"])
        if self.model is None:
            self.model = build_model(cfg).to(self.device).eval()
            tok = te = None
            if cfg.model.condition == "text":
                tok, te = load_text_encoder(cfg.encoders.text_encoder, cfg.encoders.text_dtype
                                            if self.device.type == "cuda" else "fp32", self.device)
            vae = load_vae(cfg.encoders.vae, "fp32", self.device)
            self.enc = (tok, te, vae)
        ema.copy_to(self.model)
        tok, te, vae = self.enc
        model_cfg = C.to_dict(cfg)["model"]
        res = cfg.data.resolution
        autocast = torch.bfloat16 if (self.device.type == "cuda" and cfg.train.precision == "bf16") else None
        out = generate(self.model, model_cfg, prompts, vae=vae, tokenizer=tok, text_encoder=te,
                       schedule=Schedule.from_config(cfg.diffusion), sampler=cfg.sample.sampler,
                       steps=cfg.sample.steps, guidance=cfg.sample.guidance,
                       seeds=[cfg.sample.seed + i for i in range(len(prompts))], height=res, width=res,
                       device=self.device, autocast_dtype=autocast, vae_scale=cfg.encoders.vae_scale)
        grid = make_grid(to_pil(out.images))
        path = os.path.join(run_dir, "samples", f"step_{step:08d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".tmp.{os.getpid()}.png"
        grid.save(tmp)
        os.replace(tmp, path)
        return path


def _noise_generator(cfg: C.Config, rank: int, device: torch.device) -> torch.Generator:
    """Per-rank stream of timesteps and noise; distinct per rank, fixed by the seed (state checkpointed)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(cfg.train.seed) * 1_000_003 + 7919 * (rank + 1))
    return g


def fit(cfg: C.Config, allow_config_change: bool = False) -> int:
    """Train the recipe; returns the process exit code (see the module docstring)."""
    env = dist_env()
    export_env(env)
    check_inputs(cfg)  # before any collective: every rank fails alike on bad input
    device = init_distributed(env, timeout_s=cfg.train.collective_timeout_s)
    rc = None
    try:
        rc = _fit(cfg, env, device, allow_config_change)
        return rc
    finally:
        if rc == LOST_RANK_EXIT_CODE:
            # The process group is broken: tearing it down can block on the lost peer or abort in gloo's destructors
            # ("terminate called without an active exception"). The message is out; leave with our exit code.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        destroy()


def _fit(cfg: C.Config, env: DistEnv, device: torch.device, allow_config_change: bool) -> int:
    from pixart_ds.data.dataset import CorruptSampleError
    from pixart_ds.data.loader import build_loader
    from pixart_ds.diffusion.schedule import Schedule
    from pixart_ds.model.pixart import build_model
    from pixart_ds.train import zero
    from pixart_ds.train.step import train_step

    t_start = time.time()
    is_main = env.rank == 0
    run_dir = cfg.run_dir
    micro, accum = C.batch_plan(cfg, env.world_size)

    # ---- what to resume from (decided from small files, identically on every rank) ----
    plan = ckpt.plan_resume(cfg, env.world_size, allow_config_change)
    if plan is not None:
        ckpt.prepare_universal(plan)
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        C.dump(cfg, os.path.join(run_dir, "config.yaml"))

    # ---- model (+ stage initialisation) and EMA, in fp32 before DeepSpeed casts the module ----
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    init_note = None
    init_ema_sd = None
    if plan is None and cfg.train.init_from:
        raw_sd, init_ema_sd, init_note = ckpt.init_weights(cfg, model)
        model.load_state_dict(raw_sd, strict=True)
    ema = EMA(model, cfg.train.ema_decay, enabled=is_main)
    if init_ema_sd is not None:
        ema.reset(model, init_ema_sd)
    model.to(device)
    ema_device_fix(ema, device)

    # ---- data (after the process group: Streaming shares one view of the order across ranks) ----
    loader = build_loader(cfg, micro, env)

    # ---- DeepSpeed engine ----
    engine = zero.initialize(model, cfg, env.world_size, load_universal=bool(plan and plan.universal))
    schedule = Schedule.from_config(cfg.diffusion)
    gen = _noise_generator(cfg, env.rank, device)
    step, images_seen, skipped_total, data_skipped_total = 0, 0, 0, 0

    if plan is not None:
        client = zero.load(engine, plan.root, plan.tag)
        zero.apply_recipe_optimizer(engine, cfg)  # an edited recipe (--allow-config-change) takes effect
        prog = client["progress"]
        step, images_seen, skipped_total = int(prog["step"]), int(prog["images_seen"]), int(prog["skipped_total"])
        data_skipped_total = int(prog.get("data_skipped_total", 0))
        if is_main:
            ema.load_checkpoint_state(engine.module, client["ema"])
        loader.load_state_dict(client["loader"])
        rngs = client["rng"]
        if env.rank < len(rngs) and not plan.universal:
            ckpt.set_rng_state(rngs[env.rank], gen)
        else:
            # Another world size: the per-rank noise streams cannot map one to one; reseed deterministically from
            # (seed, rank, step). Data order is unaffected (Streaming's state is global).
            gen.manual_seed(int(cfg.train.seed) * 1_000_003 + 7919 * (env.rank + 1) + 104_729 * step)
        if int(engine.global_steps) != step:
            raise ckpt.CheckpointError(f"{plan.root}/{plan.tag}: DeepSpeed step {engine.global_steps} != ours {step}")

    metrics = Metrics(cfg, run_dir, env.rank, env.world_size, device, start_step=step, images_seen=images_seen)
    metrics.skipped_total = skipped_total
    metrics.data_skipped_total = data_skipped_total
    if plan is not None:
        metrics.event("resume", step, checkpoint=os.path.join(plan.root, plan.source_tag),
                      saved_world_size=plan.meta["world_size"], world_size=env.world_size,
                      universal=plan.universal)
    else:
        metrics.event("start", step, world_size=env.world_size, micro_batch=micro, grad_accum=accum,
                      launcher=env.launcher, init=init_note)

    def save_checkpoint(at_step: int) -> str:
        client = {
            "version": ckpt.CLIENT_VERSION,
            "progress": {"step": at_step, "images_seen": metrics.images_seen, "skipped_total": metrics.skipped_total,
                         "data_skipped_total": metrics.data_skipped_total},
            "ema": ema.checkpoint_state() if is_main else None,
            "loader": loader.state_dict(),
            "rng": ckpt.gather_objects(ckpt.rng_state(gen)),
            "world_size": env.world_size,
            "config": C.to_dict(cfg),
        }
        meta = {"step": at_step, "images_seen": metrics.images_seen, "world_size": env.world_size,
                "config": C.to_dict(cfg)}
        t0 = time.perf_counter()
        path = ckpt.save(engine, run_dir, at_step, client, cfg.checkpoint.keep_last, meta)
        metrics.event("checkpoint", at_step, path=path, seconds=round(time.perf_counter() - t0, 3))
        return path

    stop = _StopFlag()
    stop.install()
    sampler = _Sampler(cfg, device) if (is_main and cfg.log.sample_every_steps > 0) else None
    kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
    batches = _Batches(loader)
    peers = peer_table()  # (host, pid) per rank: after a failed collective, say which peer is gone
    stop_before = tuple(int(x) for x in os.environ.get(STOP_ENV, "").split(":") if x)  # test hook: (step, rank)

    def stalled_fetch() -> str:
        lost, who = describe_peers(peers, env.rank) if env.world_size > 1 else ([], "")
        if not lost:
            who = (who + "; " if who else "") + "the data loader itself may be stuck (a hung filesystem or remote source)"
        msg = (f"rank {env.rank} waited more than train.collective_timeout_s={cfg.train.collective_timeout_s} s for "
               f"the data of step {step + 1}: {who}; latest checkpoint: {_latest(run_dir)}; run the same command to "
               f"resume from it")
        metrics.event("rank_lost", step, message=msg, lost_ranks=lost)
        return msg

    nonfinite_run, first_bad, due = 0, None, False
    last_saved = step if plan is not None else -1
    rc, error_msg = 0, None
    try:
        while step < cfg.train.total_steps:
            # ---- one optimizer step ----
            t0 = time.perf_counter()
            mbs, data_error = [], None
            if stop_before == (step + 1, env.rank):
                os.kill(os.getpid(), signal.SIGSTOP)
            try:
                with _FetchWatchdog(cfg.train.collective_timeout_s, stalled_fetch):
                    mbs = [batches.next() for _ in range(accum)]
            except CorruptSampleError as e:
                data_error = f"rank {env.rank}: {e}"
            data_skipped, data_errors = _agree_on_data(mbs, data_error, device)
            if data_errors:
                msg = (f"stopped before step {step + 1}: {'; '.join(data_errors)}; latest checkpoint: "
                       f"{_latest(run_dir)}")
                metrics.event("corrupt_data", step, message=msg)
                error_msg, rc = msg, DATA_ERROR_EXIT_CODE
                break
            out = train_step(engine, mbs, schedule, cfg, gen)
            out["data_skipped"] = float(data_skipped)
            step += 1
            if not out["skipped"]:
                ema.update(engine.module)
            ids = _gather_ids(torch.cat([mb["sample_idx"] for mb in mbs]), device) if cfg.log.sample_ids else None
            metrics.step(step, out, time.perf_counter() - t0, ids)
            if kill_at and step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

            # ---- non-finite guard ----
            if out["nonfinite"]:
                nonfinite_run += 1
                first_bad = first_bad or step
                if nonfinite_run >= cfg.train.max_nonfinite_steps:
                    latest = ckpt.read_latest(ckpt.ckpt_root(run_dir))
                    msg = (f"stopped at step {step}: {nonfinite_run} consecutive non-finite steps (first at step "
                           f"{first_bad}; train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); "
                           f"latest checkpoint: {latest or 'none'}")
                    metrics.event("nonfinite", step, message=msg)
                    error_msg = msg
                    rc = NONFINITE_EXIT_CODE
                    break
            else:
                nonfinite_run, first_bad = 0, None

            # ---- stop requests: every rank agrees before anyone checkpoints ----
            local_stop = stop.signum is not None or (
                cfg.train.time_limit_s is not None and time.time() - t_start >= cfg.train.time_limit_s)
            stopping = _any_rank(local_stop, device)

            # ---- checkpoint (deferred while non-finite steps are running: the latest checkpoint must predate
            # the first bad step) ----
            due = due or step % cfg.checkpoint.every_steps == 0 or step == cfg.train.total_steps
            if stopping or (due and nonfinite_run == 0):
                save_checkpoint(step)
                last_saved, due = step, False

            # ---- sample grid ----
            if sampler is not None and step % cfg.log.sample_every_steps == 0:
                try:
                    path = sampler(ema, step, run_dir)
                    metrics.event("sample", step, path=path)
                    metrics.image("samples", path, step)
                except Exception as e:  # a failing preview must not kill a month-long run
                    print(f"pixart-ds train: sample grid at step {step} failed: {e}", file=sys.stderr)
                    sampler = None

            if stopping:
                why = f"signal {signal.Signals(stop.signum).name}" if stop.signum else \
                    f"train.time_limit_s={cfg.train.time_limit_s}"
                metrics.event("stop", step, reason=why if local_stop else "another rank", exit_code=REQUEUE_EXIT_CODE)
                rc = REQUEUE_EXIT_CODE
                break
        if rc == 0 and last_saved != step:
            save_checkpoint(step)
        if rc == 0:
            metrics.event("done", step, seconds=round(time.time() - t_start, 1), images_seen=metrics.images_seen)
    except Exception as e:
        lost, who = describe_peers(peers, env.rank) if env.world_size > 1 else ([], "")
        if env.world_size == 1 or not (lost or is_collective_error(e)):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        msg = (f"rank {env.rank} lost contact with the other ranks after step {step} ({type(e).__name__}: {first}): "
               f"{who}; train.collective_timeout_s={cfg.train.collective_timeout_s}; latest checkpoint: "
               f"{_latest(run_dir)}; run the same command to resume from it")
        # Now, not after the loop: the launcher's SIGTERM may follow shortly (its handler is restored below).
        print(f"pixart-ds train: error: {msg}", file=sys.stderr, flush=True)
        metrics.event("rank_lost", step, message=msg, lost_ranks=lost)
        rc = LOST_RANK_EXIT_CODE
    finally:
        stop.restore()
        metrics.close()
    # after the progress bar is closed, so these lines start on a line of their own
    if is_main and error_msg:
        print(f"pixart-ds train: error: {error_msg}", file=sys.stderr, flush=True)
    if is_main and rc == 0:
        print(f"pixart-ds train: done at step {step}; checkpoints in {ckpt.ckpt_root(run_dir)}; "
              f"metrics in {os.path.join(run_dir, 'metrics.jsonl')}", flush=True)
    elif is_main and rc == REQUEUE_EXIT_CODE:
        print(f"pixart-ds train: stopped at step {step} with a checkpoint; run the same command to resume "
              f"(exit code {REQUEUE_EXIT_CODE})", file=sys.stderr, flush=True)
    if env.world_size > 1 and rc != LOST_RANK_EXIT_CODE:
        # Nobody leaves before rank 0 has printed: torchrun tears the other ranks down as soon as one exits non-zero,
        # which could kill rank 0 before its one-line error.
        try:
            tdist.barrier()
        except Exception:  # noqa: BLE001 - a peer already gone: its exit is what the launcher reports
            pass
    return rc


def ema_device_fix(ema: EMA, device: torch.device) -> None:
    """Keep the EMA on the compute device (it was created from the CPU fp32 model)."""
    if not ema.enabled or device.type == "cpu":
        return
    ema.params = {k: v.to(device) for k, v in ema.params.items()}
    ema.buffers = {k: v.to(device) for k, v in ema.buffers.items()}
