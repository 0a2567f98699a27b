"""Training throughput of a recipe on the hardware present, measured on the production step.

What is measured: `pixart_ds.train.step.train_step` (noise + q_sample, forward, the hybrid loss, DeepSpeed backward
and optimizer step, non-finite check) followed by the EMA update, exactly as the trainer runs them, on a DeepSpeed
engine built by `pixart_ds.train.zero.initialize` from the recipe. The batches are synthetic random tensors with the
loader's names, shapes and dtypes (latent, text_emb + text_mask with every caption token real, or label; drop at the
recipe's caption-dropout rate; img_hw + aspect_ratio for multi-scale at the square bucket), made once before timing:
this isolates the model + optimizer step; data loading is measured separately by benchmarks/loader.py.

Timing rule: `warmup` steps (kernel selection, allocator growth, lazy init) are run and discarded; then each of
`steps` steps is timed wall-clock between device synchronisations. images/s per device = micro-batch x timed steps /
total timed seconds. MFU = images/s x model FLOPs per image (flops.py; forward + backward, no recomputation) / peak;
HFU adds the recomputed block forwards when grad checkpointing is on. Memory: the CUDA caching allocator's peak
allocated (and reserved) bytes over the timed steps; on CPU the process's peak resident set over the timed steps.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from typing import Optional

import torch
from tqdm import tqdm

from pixart_ds import config as C
from pixart_ds import dist
from pixart_ds import hardware as H
from pixart_ds.bench.report import gib, hardware_md, peak_rss_reset, rss_bytes, versions_md, yaml_block
from pixart_ds.diffusion.schedule import Schedule
from pixart_ds.model.attention import resolve_backend
from pixart_ds.model.flops import format_flops, image_flops, recompute_fraction
from pixart_ds.model.pixart import build_model
from pixart_ds.train import zero
from pixart_ds.train.ema import EMA
from pixart_ds.train.step import train_step

SCHEMA = "pixart_ds.throughput/1"

RULE = (
    "Synthetic random batches of the loader's shapes fed to the production `train_step` (forward, hybrid loss, "
    "DeepSpeed backward + optimizer step) plus the EMA update, on one device; {warmup} warm-up steps discarded, "
    "{steps} steps timed between device synchronisations; images/s = micro-batch x steps / time. Data loading is "
    "excluded (measured by benchmarks/loader.py). MFU = images/s x model FLOPs per image (matrix products, "
    "3 x forward, no recomputation; pixart_ds/bench/flops.py) / peak; HFU includes recomputation."
)


def synthetic_batch(cfg: C.Config, batch_size: int, generator: torch.Generator,
                    latent_hw: Optional[tuple[int, int]] = None, pin: bool = False) -> dict:
    """One loader-shaped micro-batch of random tensors (CPU), as pixart_ds/data/loader.py yields them."""
    m = cfg.model
    lat = C.latent_size(cfg)
    h, w = latent_hw or (lat, lat)
    B = batch_size
    b = {"latent": torch.randn(B, m.in_channels, h, w, generator=generator) * 0.8,  # ~ VAE latent x 0.18215 scale
         "drop": torch.rand(B, generator=generator) < cfg.data.caption_dropout,
         "sample_idx": torch.arange(B, dtype=torch.long)}
    if m.condition == "text":
        b["text_emb"] = torch.randn(B, m.max_text_tokens, m.caption_channels, generator=generator) * 0.1
        b["text_mask"] = torch.ones(B, m.max_text_tokens, dtype=torch.long)  # every caption token real (worst case)
    else:
        b["label"] = torch.randint(0, m.num_classes, (B,), generator=generator)
    if m.multi_scale:
        b["img_hw"] = torch.tensor([[h * C.VAE_DOWNSAMPLE, w * C.VAE_DOWNSAMPLE]] * B, dtype=torch.float32)
        b["aspect_ratio"] = torch.full((B, 1), h / w, dtype=torch.float32)
    if pin:
        b = {k: v.pin_memory() for k, v in b.items()}
    return b


def single_device_config(cfg: C.Config, world_size: int = 1) -> C.Config:
    """The recipe with its per-GPU micro-batch and no gradient accumulation at `world_size` ranks: one timed
    `train_step` = one forward/backward of the recipe's per-GPU batch + one optimizer step."""
    micro = cfg.train.micro_batch_size
    return C.replace(cfg, **{"train.global_batch_size": micro * world_size})


def _stats(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "median": statistics.median(xs), "min": min(xs), "max": max(xs),
            "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0, "all": xs}


def measure(cfg: C.Config, *, warmup: int = 2, steps: int = 5, ema: bool = True, progress: bool = True,
            matmul_probe: bool = True) -> dict:
    """Build the engine for `cfg` (one micro-batch per step), run warm-up + timed train_steps; return the record
    (without report paths). Rank 0's numbers are returned on every rank."""

    env = dist.dist_env()
    device = dist.init_distributed(env, timeout_s=cfg.train.collective_timeout_s)
    cfg = single_device_config(cfg, env.world_size)
    micro, accum = C.batch_plan(cfg, env.world_size)
    assert accum == 1, (micro, accum)

    torch.manual_seed(cfg.train.seed)
    # Built directly on the device (initialisation of 0.6B parameters on a GPU takes milliseconds).
    with torch.device(device):
        model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine = zero.initialize(model, cfg, env.world_size)
    ema_state = EMA(engine.module, cfg.train.ema_decay, enabled=ema and env.rank == 0)
    schedule = Schedule.from_config(cfg.diffusion)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed + env.rank)
    batch = synthetic_batch(cfg, micro, torch.Generator().manual_seed(cfg.train.seed + env.rank),
                            pin=device.type == "cuda")

    def one_step():
        out = train_step(engine, batch, schedule, cfg, gen)
        ema_state.update(engine.module)
        return out

    load_before = _loadavg()
    bar = _bar(warmup + steps, progress and env.rank == 0, f"{cfg.name} {micro}/step")
    losses = []
    for _ in range(warmup):
        losses.append(one_step()["loss"])
        bar.update(1)
    H.synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        mem_before = torch.cuda.memory_allocated(device)
    else:
        peak_rss_reset()
        mem_before = rss_bytes("VmRSS")
    times, cpu_times = [], []
    for _ in range(steps):
        H.synchronize(device)
        c0, t0 = time.process_time(), time.perf_counter()
        out = one_step()  # returns floats: the step's device work is complete when it returns
        H.synchronize(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        losses.append(out["loss"])
        bar.update(1)
    bar.close()
    load_after = _loadavg()
    if device.type == "cuda":
        mem = {"peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
               "peak_reserved_bytes": torch.cuda.max_memory_reserved(device), "before_timed_bytes": mem_before,
               "rule": "torch.cuda.max_memory_allocated / max_memory_reserved over the timed steps (weights, "
                       "optimizer state, EMA, activations)"}
    else:
        mem = {"peak_rss_bytes": rss_bytes("VmHWM"), "before_timed_bytes": mem_before,
               "rule": "peak resident set (VmHWM) of the process over the timed steps (everything: weights, "
                       "optimizer state, EMA, activations, libraries)"}

    hw = H.device_record(device)
    measured_peak = None
    if matmul_probe:
        dtype = zero.engine_dtype(engine)
        measured_peak = H.measure_matmul_tflops(device, dtype=dtype)
    f = image_flops(cfg)
    total = sum(times)
    ips = micro * steps / total
    model_tflops = ips * f.train / 1e12
    hw_tflops = ips * f.train_step(recompute_fraction(cfg.model)) / 1e12
    peak = hw.get("peak_tflops")
    results = {
        "step_time_s": _stats(times),
        # CPU seconds the process used per step, summed over threads: on a shared CPU, other processes stretch the
        # wall time but not this (on a GPU it is the host-side work only).
        "process_cpu_s_per_step": _stats(cpu_times),
        "images_per_s_per_device": ips,
        "model_tflops_per_s": model_tflops,
        "hardware_tflops_per_s": hw_tflops,
        "mfu": model_tflops / peak if peak else None,
        "hfu": hw_tflops / peak if peak else None,
        "matmul_tflops_measured": measured_peak,
        "mfu_vs_measured_matmul": model_tflops / measured_peak if measured_peak else None,
        "memory": mem,
        "loss": {"first": losses[0], "last": losses[-1], "finite": all(math.isfinite(x) for x in losses)},
        "parameters": n_params,
    }

    probe = torch.empty(1, device=device, dtype=zero.engine_dtype(engine))
    return {
        "schema": SCHEMA,
        "stage": cfg.stage,
        "hardware": hw,
        "versions": H.versions(),
        "config": C.to_dict(cfg),
        "measure": {
            "warmup_steps": warmup, "timed_steps": steps, "micro_batch_size": micro, "gradient_accumulation_steps": 1,
            "world_size": env.world_size, "ema": bool(ema), "precision": cfg.train.precision,
            "grad_checkpointing": cfg.model.grad_checkpointing, "torch_adam": cfg.train.torch_adam,
            "attention_backend": resolve_backend(cfg.model.attention, probe),
            "latent_hw": [C.latent_size(cfg)] * 2, "text_tokens": cfg.model.max_text_tokens
            if cfg.model.condition == "text" else 0,
            "data": "synthetic (random tensors of the loader's shapes; data loading excluded)",
            "cpu_threads": torch.get_num_threads(), "load_average_before_after": [load_before, load_after],
            "rule": RULE.format(warmup=warmup, steps=steps),
        },
        "flops_per_image": f.as_dict(),
        "results": results,
    }


def _loadavg():
    """1-minute load average of the host (other processes compete for a shared CPU; recorded with every run)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    try:

        return tqdm(total=total, desc=desc, unit="step", leave=False)
    except ImportError:  # pragma: no cover
        return _NoBar()


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _rate(tflops: float | None) -> str:
    if tflops is None:
        return "—"
    return f"{tflops:.1f} TFLOP/s" if tflops >= 1 else f"{tflops * 1e3:.3g} GFLOP/s"


def render_markdown(rec: dict, notes: list[str] = ()) -> str:
    r, m, hw, cfg = rec["results"], rec["measure"], rec["hardware"], rec["config"]
    st = r["step_time_s"]
    mem = r["memory"]
    peak_mem = mem.get("peak_allocated_bytes", mem.get("peak_rss_bytes"))
    mc = cfg["model"]
    model_desc = (f"{mc['preset']} (depth {mc['depth']}, hidden {mc['hidden_size']}, {mc['num_heads']} heads, "
                  f"adaln={mc['adaln']}, condition={mc['condition']}, multi_scale={mc['multi_scale']}), "
                  f"{r['parameters'] / 1e6:.1f}M trainable parameters")

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    cpu_row = []
    if hw["type"] == "cpu" and r.get("process_cpu_s_per_step"):
        c = r["process_cpu_s_per_step"]["median"]
        cpu_row = [f"| process CPU time per step (all threads), median | {c:.3f} s (with {m['cpu_threads']} cores to "
                   f"itself: {m['micro_batch_size'] * m['cpu_threads'] / c:.3g} images/s) |"]

    lines = [
        f"# Throughput: {rec.get('recipe_name') or rec['stage']} on {hw['name']}",
        "",
        f"Recipe `{rec.get('recipe')}`" + (f" with overrides `{' '.join(rec['overrides'])}`" if rec.get("overrides")
                                           else "") + f"; measured {rec.get('timestamp', '')[:19]} UTC.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| model | {model_desc} |",
        f"| resolution | {cfg['data']['resolution']} px (latent {m['latent_hw'][0]}x{m['latent_hw'][1]}, "
        f"{rec['flops_per_image']['tokens']} tokens; {m['text_tokens']} caption tokens) |",
        f"| per-device batch | {m['micro_batch_size']} (x {m['world_size']} device(s), no accumulation) |",
        f"| precision / attention / recompute | {m['precision']} / {m['attention_backend']} / "
        f"{'grad checkpointing' if m['grad_checkpointing'] else 'none'} |",
        f"| step time (median, min-max) | {st['median']:.3f} s ({st['min']:.3f}-{st['max']:.3f}) |",
        f"| **images/s per device** | **{r['images_per_s_per_device']:.3g}** |",
        f"| model FLOPs per image (train / with recompute) | {format_flops(rec['flops_per_image']['train'])} / "
        f"{format_flops(rec['flops_per_image']['train_recompute'])} |",
        f"| achieved FLOP/s (model / hardware) | {_rate(r['model_tflops_per_s'])} / {_rate(r['hardware_tflops_per_s'])} |",
        f"| **MFU** (vs {('%g TFLOP/s peak' % hw['peak_tflops']) if hw.get('peak_tflops') else 'no vendor peak'}) "
        f"| **{pct(r['mfu'])}** (HFU {pct(r['hfu'])}) |",
        "| measured matmul rate / MFU vs it | "
        + (f"{_rate(r['matmul_tflops_measured'])} / {pct(r['mfu_vs_measured_matmul'])}"
           if r.get("matmul_tflops_measured") else "—") + " |",
        f"| peak memory | {gib(peak_mem)} ({'allocated; reserved ' + gib(mem['peak_reserved_bytes']) if 'peak_reserved_bytes' in mem else 'process peak RSS'}) |",
        *cpu_row,
        f"| host load average (1 min) before / after, torch threads | {m['load_average_before_after'][0]} / "
        f"{m['load_average_before_after'][1]}, {m['cpu_threads']} |",
        f"| loss first / last (finite) | {r['loss']['first']:.4f} / {r['loss']['last']:.4f} ({r['loss']['finite']}) |",
        "",
        "## Measurement rule",
        "",
        m["rule"],
        "",
        f"Memory: {mem['rule']}.",
        "",
        "Per-step times (s): " + ", ".join(f"{x:.3f}" for x in st["all"]),
    ]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Hardware", "", hardware_md(hw), "", "## Versions", "", versions_md(rec["versions"]), "",
              "## Resolved config (as measured)", "", yaml_block(cfg)]
    return "\n".join(lines) + "\n"
