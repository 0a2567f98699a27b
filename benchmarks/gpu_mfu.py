#!/usr/bin/env python
"""The production training step of the stage recipes on one GPU, config after config in ONE process, against a
deadline: images/s, MFU, HFU and where the time goes. One JSON line per config is appended to --out as soon as it
finishes, so a run cut short keeps everything that finished.

    python benchmarks/gpu_mfu.py --out benchmarks/results/gpu_mfu_h200.jsonl --deadline-s 420
    python benchmarks/gpu_mfu.py --dry-run --out /tmp/dry.jsonl        # CPU: tiny preset, 1 warm-up + 1 step each
    python benchmarks/gpu_mfu.py --check-imports                        # everything this script imports, or why not
    python benchmarks/gpu_days_report.py benchmarks/results/gpu_mfu_h200.jsonl --variant shipped   # GPU-days

What one config measures: the recipe (with the row's overrides) loaded as for training; its per-GPU batch is one
micro-batch per step (no accumulation; images/s per GPU do not depend on it). Synthetic feature shards of the
recipe's shapes (VAE posterior mean/std, T5 tokens of 40-120 real tokens, class labels, the square bucket for
multi-scale stages) are written on the fly with Streaming's MDSWriter and read by the real loader
(pixart_ds.data.loader.build_loader: StreamingDataset, worker processes, page-locked batches). Each step is the
production `train_step` (noise, forward, hybrid loss, DeepSpeed ZeRO-2 backward and optimizer step) plus the EMA
update, i.e. what the trainer runs; the batch fetch is inside the timed step. `warmup` steps are discarded (the
first also reports its time: kernel selection, allocator growth, torch.compile), then `steps` steps are timed
between device synchronisations.

Recorded per config: images/s per GPU; MFU = images/s x model FLOPs per image (pixart_ds/bench/flops.py: forward +
backward, no recomputation) / the card's dense bf16 peak (pixart_ds/bench/hardware.py) and / a measured 8192^3 bf16
matmul rate of the same card; HFU (recomputed blocks counted); step-time spread; optimizer-step and EMA
milliseconds (CUDA events around DeepSpeed's ZeRO optimizer step, i.e. gradient norm, clipping, AdamW and the
parameter all-gather, and around EMA.update); peak memory; the attention ops that ran (profiler, one warm-up
step); first-step time and the compile time it implies; versions, the git commit, recipe name and variant.

The deadline: before a config starts, its time is estimated from its FLOPs at the FLOP rate the previous config
achieved (at first 25% of the peak, the one GPU record before this script) plus engine and shard set-up; a config
that no longer fits --deadline-s is recorded as skipped. Rows run in the priority order of MATRIX.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SCHEMA = "pixart_ds.gpu_mfu/1"

# (row name, recipe, variant, overrides), in priority order. `variant` names the speed settings; the GPU-days report
# never mixes two variants. train.adam=torch-fused is added to every row (FusedAdam's JIT build would eat minutes of
# a lent machine); the records say so.
MATRIX = [
    ("stage2-shipped", "recipes/stage2_sam256.yaml", "shipped", []),
    ("stage2-no-recompute", "recipes/stage2_sam256.yaml", "no-recompute", ["model.grad_checkpointing=false"]),
    ("stage2-gpu", "recipes/gpu/stage2_sam256_gpu.yaml", "gpu", []),
    ("stage3-1024-shipped", "recipes/stage3_hq1024.yaml", "shipped", []),
    ("stage3-1024-attn-sdpa", "recipes/stage3_hq1024.yaml", "attn-sdpa", ["model.attention=sdpa"]),
    ("stage3-512-shipped", "recipes/stage3_hq512.yaml", "shipped", []),
    ("stage2-gpu-compile", "recipes/gpu/stage2_sam256_gpu.yaml", "gpu+compile", ["model.compile=blocks"]),
    ("stage1-shipped", "recipes/stage1_imagenet256.yaml", "shipped", []),
    ("stage3-256-shipped", "recipes/stage3_hq256.yaml", "shipped", []),
    ("stage3-1024-gpu", "recipes/gpu/stage3_hq1024_gpu.yaml", "gpu", []),
    ("stage3-512-gpu", "recipes/gpu/stage3_hq512_gpu.yaml", "gpu", []),
    ("stage1-gpu", "recipes/gpu/stage1_imagenet256_gpu.yaml", "gpu", []),
    ("stage3-256-gpu", "recipes/gpu/stage3_hq256_gpu.yaml", "gpu", []),
    ("stage2-gpu-profile", "recipes/gpu/stage2_sam256_gpu.yaml", "gpu", ["@profile"]),
]
# A CPU dry run: the same rows at a size a 2-core machine runs in seconds (the records say "dry-run").
DRY_OVERRIDES = ["model.preset=tiny", "model.depth=2", "model.hidden_size=48", "model.num_heads=3",
                 "model.caption_channels=32", "model.max_text_tokens=8", "data.resolution=64",
                 "train.micro_batch_size=2", "train.precision=fp32"]
ATTENTION_OP_WORDS = ("attention", "flash", "cudnn", "efficient", "varlen", "fmha")


def check_imports() -> int:
    """Import everything a GPU run imports; print versions or the first failure."""
    import importlib

    mods = ["torch", "numpy", "yaml", "deepspeed", "streaming", "transformers", "diffusers", "pixart_ds.config",
            "pixart_ds.model.pixart", "pixart_ds.model.attention", "pixart_ds.diffusion.schedule",
            "pixart_ds.diffusion.losses", "pixart_ds.data.loader", "pixart_ds.data.dataset", "pixart_ds.data.schema",
            "pixart_ds.train.zero", "pixart_ds.train.step", "pixart_ds.train.ema", "pixart_ds.dist",
            "pixart_ds.model.flops", "pixart_ds.hardware", "pixart_ds.bench.report",
            "pixart_ds.bench.throughput", "pixart_ds.bench.gpu_days"]
    out = []
    for m in mods:
        try:
            mod = importlib.import_module(m)
        except Exception as e:  # report which import fails and why, then stop
            print(f"gpu_mfu: error: import {m} failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        if "." not in m:
            out.append(f"{m} {getattr(mod, '__version__', '?')}")
    print("imports ok: " + ", ".join(out))
    return 0


# ------------------------------------------------------------------------------------------------------------------
# Synthetic feature shards
# ------------------------------------------------------------------------------------------------------------------

def write_shards(cfg, root: str, n: int, seed: int = 0) -> str:
    """n random feature samples of the recipe's shapes in `root` (one stream; for multi-scale recipes one square
    bucket below it, as pixart_ds.data.buckets names them). Returns the source path for data.sources."""
    import numpy as np
    from streaming import MDSWriter

    from pixart_ds import config as C
    from pixart_ds.data.schema import CLASS_FEATURE_COLUMNS, FEATURE_COLUMNS

    m = cfg.model
    res, lat = cfg.data.resolution, C.latent_size(cfg)
    text = m.condition == "text"
    stream = os.path.join(root, f"h{res}_w{res}") if m.multi_scale else root
    if os.path.isfile(os.path.join(stream, "index.json")):
        return root
    rng = np.random.default_rng(seed)
    # One pool of random values, sliced at random offsets: a few hundred MB of features are written in seconds.
    per = m.in_channels * lat * lat
    pool = rng.standard_normal(max(per * 4, m.max_text_tokens * m.caption_channels * 2)).astype(np.float16)
    std = np.full(per, 0.1, np.float16).reshape(m.in_channels, lat, lat)

    def take(k):
        o = int(rng.integers(0, pool.size - k))
        return pool[o:o + k]

    tmp = stream + ".tmp"
    with MDSWriter(out=tmp, columns=FEATURE_COLUMNS if text else CLASS_FEATURE_COLUMNS, size_limit=1 << 28,
                   exist_ok=True) as w:
        for i in range(n):
            s = {"id": f"gpu_mfu_{i:06d}", "vae_mean": take(per).reshape(m.in_channels, lat, lat), "vae_std": std,
                 "caption": "", "label": int(rng.integers(0, m.num_classes)) if not text else -1, "height": res,
                 "width": res, "aspect_ratio": np.float32(1.0)}
            if text:
                L = int(rng.integers(min(40, m.max_text_tokens), m.max_text_tokens + 1))
                s["t5"] = take(L * m.caption_channels).reshape(L, m.caption_channels)
            w.write(s)
    os.replace(tmp, stream)
    return root


# ------------------------------------------------------------------------------------------------------------------
# One config
# ------------------------------------------------------------------------------------------------------------------

class _CudaTimer:
    """Milliseconds of a region on the GPU stream (CUDA events), or host wall time on CPU."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch
        self.pairs, self.cpu = [], []

    def __enter__(self):
        if self.cuda:
            a, b = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
            a.record()
            self.pairs.append((a, b))
        else:
            self.cpu.append(time.perf_counter())
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.pairs[-1][1].record()
        else:
            self.cpu[-1] = (time.perf_counter() - self.cpu[-1]) * 1e3
        return False

    def ms(self) -> list[float]:
        if self.cuda:
            self.torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in self.pairs]
        return list(self.cpu)


def _stats(xs):
    if not xs:
        return None
    return {"median": statistics.median(xs), "mean": statistics.fmean(xs), "min": min(xs), "max": max(xs),
            "spread": (max(xs) - min(xs)) / statistics.median(xs) if statistics.median(xs) else None, "all": xs}


def _attention_ops(prof) -> dict:
    out = {}
    for e in prof.key_averages():
        name = e.key
        if name.split("::")[0] in ("aten", "torch_attn", "flash_attn") and "backward" not in name.lower() \
                and any(w in name.lower() for w in ATTENTION_OP_WORDS):
            out[name] = out.get(name, 0) + e.count
    return out


def _top_kernels(prof, k: int = 15) -> list[dict]:
    import torch

    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t and e.device_type == torch.autograd.DeviceType.CUDA:
            rows.append((t, e.key, e.count))
    total = sum(t for t, _, _ in rows) or 1.0
    rows.sort(reverse=True)
    return [{"kernel": n, "ms": t / 1e3, "calls": c, "share": t / total} for t, n, c in rows[:k]]


def run_config(a, row, env, device, state: dict) -> dict:
    import torch

    from pixart_ds import config as C
    from pixart_ds import hardware as H
    from pixart_ds.model.flops import image_flops, recompute_fraction
    from pixart_ds.bench.throughput import single_device_config
    from pixart_ds.data.loader import build_loader
    from pixart_ds.diffusion.schedule import Schedule
    from pixart_ds.model.attention import resolve_backend
    from pixart_ds.model.pixart import build_model
    from pixart_ds.train import zero
    from pixart_ds.train.ema import EMA
    from pixart_ds.train.step import train_step

    name, recipe, variant, overrides = row
    profile = "@profile" in overrides
    overrides = [o for o in overrides if not o.startswith("@")]
    extra = ["train.adam=torch-fused"] + (DRY_OVERRIDES if a.dry_run else [])
    cfg = C.load(os.path.join(REPO, recipe), overrides + extra)
    cfg = single_device_config(cfg, 1)
    micro, _ = C.batch_plan(cfg, 1)
    warmup, steps = (1, 1) if a.dry_run else (a.warmup, a.steps)
    f = image_flops(cfg)
    peak = state["peak_tflops"]
    rate = state["achieved_tflops"] or (0.25 * peak if peak else state["matmul_tflops"] * 0.3)
    step_s = micro * f.train_step(recompute_fraction(cfg.model)) / (rate * 1e12)
    estimate = 25.0 + (warmup + steps + (1 if profile else 0)) * step_s + (60.0 if cfg.model.compile == "blocks" else 0)
    if a.dry_run:
        estimate = 5.0 + (30.0 if cfg.model.compile == "blocks" else 0)
    left = state["deadline"] - time.time()
    base = {"schema": SCHEMA, "name": name, "recipe": recipe, "recipe_name": _stage_of(recipe), "variant": variant,
            "overrides": overrides + extra, "dry_run": bool(a.dry_run), "hardware": state["hardware"],
            "versions": state["versions"], "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if estimate > left:
        return {**base, "status": "skipped", "reason": f"estimated {estimate:.0f} s, {left:.0f} s left before the "
                                                       f"deadline"}
    t_setup = time.perf_counter()
    n = micro * (warmup + steps + (1 if profile else 0)) + micro
    key = f"{cfg.model.condition}_{cfg.data.resolution}_{cfg.model.caption_channels}_{int(cfg.model.multi_scale)}"
    src = write_shards(cfg, os.path.join(state["work"], key + f"_{n}"), n)
    cfg = C.replace(cfg, **{"data.sources": [{"local": src}], "data.num_canonical_nodes": 1,
                            "data.num_workers": 0 if a.dry_run else min(8, os.cpu_count() or 1),
                            "run_dir": os.path.join(state["work"], "run")})
    torch.manual_seed(cfg.train.seed)
    with torch.device(device):
        model = build_model(cfg)
    engine = zero.initialize(model, cfg, 1)
    ema = EMA(engine.module, cfg.train.ema_decay)
    loader = build_loader(cfg, micro, env)
    it = iter(loader)
    sched = Schedule.from_config(cfg.diffusion)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    opt_timer, ema_timer = _CudaTimer(device), _CudaTimer(device)
    inner_step = engine.optimizer.step

    def timed_step(*args, **kw):  # DeepSpeed's ZeRO optimizer step: norm, clip, AdamW, all-gather of parameters
        with opt_timer:
            return inner_step(*args, **kw)

    engine.optimizer.step = timed_step
    setup_s = time.perf_counter() - t_setup

    def one_step():
        out = train_step(engine, [next(it)], sched, cfg, gen)
        with ema_timer:
            ema.update(engine.module)
        return out

    losses, first_s, attn = [], None, {}
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for i in range(warmup):
        H.synchronize(device)
        t0 = time.perf_counter()
        if i == warmup - 1:  # the attention ops that run (CPU-side op names: cheap to record)
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                losses.append(one_step()["loss"])
            attn = _attention_ops(prof)
        else:
            losses.append(one_step()["loss"])
        H.synchronize(device)
        if i == 0:
            first_s = time.perf_counter() - t0
    opt_timer.pairs.clear(), opt_timer.cpu.clear(), ema_timer.pairs.clear(), ema_timer.cpu.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        H.synchronize(device)
        t0 = time.perf_counter()
        losses.append(one_step()["loss"])
        H.synchronize(device)
        times.append(time.perf_counter() - t0)
    top = None
    if profile:
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            one_step()
            H.synchronize(device)
        top = _top_kernels(prof) if device.type == "cuda" else None
    mem = ({"peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(device)} if device.type == "cuda" else None)
    med = statistics.median(times)
    ips = micro / med
    model_tf = ips * f.train / 1e12
    hw_tf = ips * f.train_step(recompute_fraction(cfg.model)) / 1e12
    state["achieved_tflops"] = hw_tf
    probe = torch.empty(1, device=device, dtype=zero.engine_dtype(engine))
    mm = state["matmul_tflops"]
    rec = {**base, "status": "ok", "config": C.to_dict(cfg), "flops_per_image": f.as_dict(),
           "measure": {"warmup_steps": warmup, "timed_steps": steps, "micro_batch_size": micro,
                       "precision": cfg.train.precision, "optimizer": C.adam_impl(cfg),
                       "grad_checkpointing": cfg.model.grad_checkpointing,
                       "recompute_fraction": recompute_fraction(cfg.model), "compile": cfg.model.compile,
                       "attention": cfg.model.attention, "attention_resolved": resolve_backend(cfg.model.attention,
                                                                                              probe),
                       "loader": "pixart_ds.data.loader.build_loader on synthetic MDS feature shards, "
                                 f"{cfg.data.num_workers} workers, fetch inside the timed step",
                       "rule": "median step time between device synchronisations; images/s = micro-batch / median"},
           "results": {"images_per_s_per_device": ips, "step_time_s": _stats(times), "first_step_s": first_s,
                       "compile_s": (first_s - med) if cfg.model.compile == "blocks" and first_s else None,
                       "setup_s": setup_s, "model_tflops_per_s": model_tf, "hardware_tflops_per_s": hw_tf,
                       "mfu": model_tf / peak if peak else None, "hfu": hw_tf / peak if peak else None,
                       "matmul_tflops_measured": mm, "mfu_vs_measured_matmul": model_tf / mm if mm else None,
                       "optimizer_step_ms": _stats(opt_timer.ms()), "ema_ms": _stats(ema_timer.ms()),
                       "memory": mem, "attention_ops": attn, "top_kernels": top,
                       "loss": {"values": losses, "finite": all(x == x and abs(x) != float("inf") for x in losses)}}}
    engine.optimizer.step = inner_step
    engine = model = ema = loader = it = None  # free them before the next config (the closures above are done)
    return rec


def _stage_of(recipe: str) -> str:
    stem = os.path.splitext(os.path.basename(recipe))[0]
    return stem[:-4] if stem.endswith("_gpu") else stem


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="JSON-lines file the records are appended to")
    p.add_argument("--deadline-s", type=float, default=420.0, help="seconds from start; configs that no longer fit "
                                                                   "are recorded as skipped (default 420)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--only", nargs="+", default=None, help="row names (default: all, in priority order)")
    p.add_argument("--work", default=None, help="scratch folder for shards (default: a temporary folder)")
    p.add_argument("--dry-run", action="store_true", help="CPU check of the whole script: tiny model, 1+1 steps")
    p.add_argument("--check-imports", action="store_true", help="import everything a run needs and exit")
    a = p.parse_args(argv)
    if a.check_imports:
        return check_imports()
    if not a.out:
        p.error("--out is required")
    rows = [r for r in MATRIX if a.only is None or r[0] in a.only]
    unknown = set(a.only or []) - {r[0] for r in MATRIX}
    if unknown:
        print(f"gpu_mfu: error: unknown row(s) {', '.join(sorted(unknown))} (rows: {', '.join(r[0] for r in MATRIX)})",
              file=sys.stderr)
        return 2
    t_start = time.time()
    import tempfile

    import torch  # heavy: imported after the argument checks

    from pixart_ds import hardware as H
    from pixart_ds import dist

    if not torch.cuda.is_available() and not a.dry_run:
        print("gpu_mfu: error: no CUDA device (use --dry-run to check the script on a CPU)", file=sys.stderr)
        return 2
    env = dist.dist_env()
    device = dist.init_distributed(env, timeout_s=600)
    work = a.work or tempfile.mkdtemp(prefix="gpu_mfu_")
    hw = H.device_record(device)
    mm = H.measure_matmul_tflops(device, seconds=0.2 if a.dry_run else 1.0)
    versions = H.versions()
    # PIXART_DS_COMMIT names the commit the working tree was copied from (the device machine gets no history)
    versions["pixart_ds_commit"] = os.environ.get("PIXART_DS_COMMIT") or versions.get("pixart_ds_commit")
    state = {"deadline": t_start + a.deadline_s, "hardware": hw, "versions": versions, "peak_tflops":
             hw.get("peak_tflops"), "matmul_tflops": mm, "achieved_tflops": None, "work": work}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    print(f"gpu_mfu: {hw['name']}, matmul {mm:.1f} TFLOP/s, commit {versions['pixart_ds_commit']}, "
          f"{len(rows)} configs, deadline {a.deadline_s:.0f} s", flush=True)
    failed = 0
    try:
        for row in rows:
            t0 = time.time()
            try:
                rec = run_config(a, row, env, device, state)
            except Exception as e:  # one failing config (out of memory, a kernel refusing a shape) must not end the run
                failed += 1
                rec = {"schema": SCHEMA, "name": row[0], "recipe": row[1], "recipe_name": _stage_of(row[1]),
                       "variant": row[2], "status": "failed", "error": f"{type(e).__name__}: {str(e)[:500]}",
                       "traceback": traceback.format_exc()[-2000:], "hardware": hw, "versions": versions,
                       "dry_run": bool(a.dry_run)}
            gc.collect()  # DeepSpeed engines hold reference cycles: free the last config's memory before the next
            if device.type == "cuda":
                torch.cuda.empty_cache()
            with open(a.out, "a") as f:  # appended and flushed now: a timeout keeps what finished
                f.write(json.dumps(rec) + "\n")
            r = rec.get("results", {})
            mfu = r.get("mfu")
            print(f"gpu_mfu: {row[0]}: {rec['status']}"
                  + (f" {r['images_per_s_per_device']:.3g} img/s, MFU {100 * mfu:.1f}%" if mfu else "")
                  + (f" {r['images_per_s_per_device']:.3g} img/s" if r and not mfu else "")
                  + (f" ({rec.get('reason') or rec.get('error')})" if rec["status"] != "ok" else "")
                  + f" [{time.time() - t0:.0f} s]", flush=True)
    finally:
        dist.destroy()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
