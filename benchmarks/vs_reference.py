#!/usr/bin/env python
"""Our PixArt against diffusers' PixArtTransformer2DModel: forward+backward time and peak memory, same machine, same
config, same weights, one run. Writes benchmarks/results/vs_reference_<hardware>_<yyyymm>.{md,json}.

    python benchmarks/vs_reference.py                          # CPU: PixArt-S/2 at 256 px, batch 4, fp32
    python benchmarks/vs_reference.py --preset PixArt-XL/2 --batch 32 --dtype bf16   # GPU defaults

Method. One model config (adaLN-single, text, 120 T5 tokens of 4,096 channels) is built as ours (PixArt) and as
diffusers' (config from pixart_ds.model.convert.diffusers_config); the weights are seeded random (not the zero init,
so the outputs are non-trivial), ours -> diffusers through convert.ours_to_diffusers, loaded strictly. Both get the
same inputs (latents, timesteps, T5-shaped features, a padding mask with random caption lengths) and the same loss
(mean of the squared output), and the same attention kernel family (torch SDPA; ours picks flash-attn only if that
package is installed). One step = zero grads, forward, loss, backward, device synchronisation. After `warmup`
untimed steps each, `repeats` rounds alternate the two models (ours-first in even rounds, diffusers-first in odd)
so that drift in machine load hits both equally. Reported: median step time of each and the ratio ours/diffusers
(< 1 = ours faster), plus the median of the per-round ratios, the fastest round of each, and the process CPU
time per step (summed over threads: on a shared CPU it counts the work done rather than the waiting). Peak memory is measured in one extra step per model:
on CUDA the allocator's peak above the bytes held before the step; on CPU the profiler's tensor-allocation peak
(torch.profiler profile_memory) above the same baseline. Parity: max |ours - diffusers| of the outputs.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from diffusers import PixArtTransformer2DModel
from torch.profiler import ProfilerActivity, profile

from pixart_ds import config as C
from pixart_ds import hardware as H
from pixart_ds.bench import report
from pixart_ds.bench.report import gib, hardware_md, versions_md
from pixart_ds.bench.throughput import _rate
from pixart_ds.model.attention import resolve_backend
from pixart_ds.model.convert import diffusers_config, ours_to_diffusers
from pixart_ds.model.flops import image_flops
from pixart_ds.model.pixart import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="PixArt-XL/2" if gpu else "PixArt-S/2")
    p.add_argument("--depth", type=int, default=None, help="override the preset's depth (fewer blocks = faster)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=32 if gpu else 4)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16" if gpu else "fp32")
    p.add_argument("--caption-channels", type=int, default=4096)
    p.add_argument("--text-tokens", type=int, default=120)
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in both models")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-op-profile", action="store_true",
                   help="skip the per-operator time comparison (one profiled step per model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", action="append", default=None, help="results folder (repeatable)")
    p.add_argument("--name", default="vs_reference")
    return p.parse_args(argv)


def build_pair(a, device):
    over = {"model": {"preset": a.preset, "condition": "text", "adaln": "single", "caption_channels":
                      a.caption_channels, "max_text_tokens": a.text_tokens, "attention": "auto",
                      "grad_checkpointing": bool(a.grad_checkpointing)},
            "data": {"resolution": a.resolution}}
    if a.depth:
        over["model"]["depth"] = a.depth
    cfg = C.from_dict(over, "vs_reference")
    torch.manual_seed(a.seed)
    ours = build_model(cfg)
    g = torch.Generator().manual_seed(a.seed)
    with torch.no_grad():  # seeded random weights: the official init zeroes the outputs
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    ref = PixArtTransformer2DModel(**diffusers_config(cfg.model, a.resolution))
    missing, unexpected = ref.load_state_dict(ours_to_diffusers(ours.state_dict(), cfg.model), strict=True)
    if a.grad_checkpointing:
        ref.enable_gradient_checkpointing()
    dtype = DTYPES[a.dtype]
    ours = ours.to(device=device, dtype=dtype).train()
    ref = ref.to(device=device, dtype=dtype).train()
    return cfg, ours, ref


def make_inputs(a, cfg, device):
    g = torch.Generator().manual_seed(a.seed + 1)
    B, lat, L = a.batch, a.resolution // 8, a.text_tokens
    dtype = DTYPES[a.dtype]
    x = torch.randn(B, 4, lat, lat, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randn(B, L, a.caption_channels, generator=g)
    lens = torch.randint(max(1, L // 6), L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None] < lens[:, None]).long()
    return {"x": x.to(device, dtype), "t": t.to(device), "y": y.to(device, dtype), "mask": mask.to(device)}


def forward(which, model, inp):
    if which == "ours":
        return model(inp["x"], inp["t"], inp["y"], mask=inp["mask"])
    return model(hidden_states=inp["x"], encoder_hidden_states=inp["y"], timestep=inp["t"],
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}, encoder_attention_mask=inp["mask"],
                 return_dict=False)[0]


def step_fn(which, model, inp):
    def run():
        model.zero_grad(set_to_none=True)
        forward(which, model, inp).float().square().mean().backward()
    return run


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds summed over threads) of one step."""
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def peak_step_bytes(fn, device) -> int:
    """Peak bytes allocated during one step above what was held before it."""

    gc.collect()
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0),
                 key=lambda e: e["ts"])
    if not mem:
        return 0
    base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in mem) - base


def op_profile(fn, device) -> dict:
    """Self time (ms) and call count per aten operator of one step, from torch.profiler."""

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    out = {}
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        ms = (e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total) / 1e3
        out[e.key] = [round(ms, 3), int(e.count)]
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    device = H.default_device()
    cfg, ours, ref = build_pair(a, device)
    inp = make_inputs(a, cfg, device)
    fns = {"ours": step_fn("ours", ours, inp), "diffusers": step_fn("diffusers", ref, inp)}

    with torch.no_grad():
        o = forward("ours", ours, inp).float()
        r = forward("diffusers", ref, inp).float()
    parity = {"max_abs_diff": float((o - r).abs().max()), "max_abs_ref": float(r.abs().max())}
    del o, r

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for name in ("ours", "diffusers"):
        for _ in range(a.warmup):
            timed(fns[name], device)
    times = {"ours": [], "diffusers": []}
    cpu = {"ours": [], "diffusers": []}
    order = []
    for i in range(a.repeats):
        seq = ("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")
        order.append(seq[0])
        for name in seq:
            wall, c = timed(fns[name], device)
            times[name].append(wall)
            cpu[name].append(c)
        print(f"round {i + 1}/{a.repeats}: ours {times['ours'][-1]:.3f} s, diffusers {times['diffusers'][-1]:.3f} s",
              flush=True)
    mem = {name: peak_step_bytes(fns[name], device) for name in ("ours", "diffusers")}
    ops = None if a.no_op_profile else {name: op_profile(fns[name], device) for name in ("ours", "diffusers")}
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    ratio = med["ours"] / med["diffusers"]
    round_ratios = [o_ / d_ for o_, d_ in zip(times["ours"], times["diffusers"])]
    mem_ratio = mem["ours"] / mem["diffusers"] if mem["diffusers"] else None
    f = image_flops(cfg.model, a.resolution, text_len=a.text_tokens)
    flops_step = a.batch * f.train_step(a.grad_checkpointing)
    hw = H.device_record(device)

    backend = resolve_backend("auto", inp["x"])
    rec = {
        "schema": "pixart_ds.vs_reference/1", "timestamp": report.now().isoformat(), "hardware": hw,
        "versions": H.versions(),
        "setup": {"preset": a.preset, "depth": cfg.model.depth, "hidden_size": cfg.model.hidden_size,
                  "num_heads": cfg.model.num_heads, "resolution": a.resolution, "batch": a.batch, "dtype": a.dtype,
                  "text_tokens": a.text_tokens, "caption_channels": a.caption_channels,
                  "grad_checkpointing": a.grad_checkpointing, "warmup": a.warmup, "repeats": a.repeats,
                  "threads": torch.get_num_threads(), "our_attention_backend": backend,
                  "load_average_before_after": [load_before,
                                                os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
                  "parameters": sum(p.numel() for p in ours.parameters())},
        "times_s": times, "first_in_round": order, "median_s": med, "ratio_time": ratio,
        "process_cpu_s": cpu, "median_process_cpu_s": med_cpu,
        "ratio_process_cpu": med_cpu["ours"] / med_cpu["diffusers"] if med_cpu["diffusers"] else None,
        "min_s": {k: min(v) for k, v in times.items()},
        "ratio_time_per_round_median": statistics.median(round_ratios),
        "peak_step_bytes": mem, "ratio_memory": mem_ratio, "parity": parity,
        "tflops_per_s": {k: flops_step / v / 1e12 for k, v in med.items()},
        "ops": ops,
    }
    md = render(rec)
    base = report.stem(a.name, hw["slug"])
    outs = a.out or [report.DEFAULT_RESULTS]
    report.write_outputs(outs, base, md, rec)
    print(f"ours/diffusers time ratio {ratio:.3f} (per-round median {rec['ratio_time_per_round_median']:.3f}), "
          f"memory ratio {mem_ratio if mem_ratio is None else round(mem_ratio, 3)} on {hw['name']} "
          f"-> {os.path.join(outs[0], base + '.md')}", flush=True)
    return 0


def render(rec: dict) -> str:

    s, hw = rec["setup"], rec["hardware"]
    verdict = "faster than" if rec["ratio_time"] < 1 else "slower than"
    mem_ratio = "—" if rec["ratio_memory"] is None else f"{rec['ratio_memory']:.3f}"
    lines = [
        f"# Ours vs diffusers' PixArtTransformer2DModel on {hw['name']}",
        "",
        f"{s['preset']} (depth {s['depth']}, hidden {s['hidden_size']}, {s['num_heads']} heads, "
        f"{s['parameters'] / 1e6:.1f}M parameters) at {s['resolution']} px, batch {s['batch']}, {s['dtype']}, "
        f"{s['text_tokens']} caption tokens x {s['caption_channels']}, grad checkpointing "
        f"{'on' if s['grad_checkpointing'] else 'off'}; {s['repeats']} interleaved rounds after {s['warmup']} "
        f"warm-up step(s) each; {s['threads']} torch threads; our attention kernel: {s['our_attention_backend']}; "
        f"host load average (1 min) {s['load_average_before_after'][0]} before, {s['load_average_before_after'][1]} "
        f"after. "
        f"Measured {rec['timestamp'][:19]} UTC.",
        "",
        "| | ours | diffusers | ours / diffusers |",
        "|---|---|---|---|",
        f"| forward+backward, median | {rec['median_s']['ours']:.3f} s | {rec['median_s']['diffusers']:.3f} s "
        f"| **{rec['ratio_time']:.3f}** (per-round median {rec['ratio_time_per_round_median']:.3f}) |",
        f"| forward+backward, fastest round | {rec['min_s']['ours']:.3f} s | {rec['min_s']['diffusers']:.3f} s "
        f"| {rec['min_s']['ours'] / rec['min_s']['diffusers']:.3f} |",
        f"| process CPU time per step (all threads), median | {rec['median_process_cpu_s']['ours']:.3f} s | "
        f"{rec['median_process_cpu_s']['diffusers']:.3f} s | {rec['ratio_process_cpu']:.3f} |",
        f"| achieved FLOP/s (model FLOPs) | {_rate(rec['tflops_per_s']['ours'])} | "
        f"{_rate(rec['tflops_per_s']['diffusers'])} | |",
        f"| peak memory of one step | {gib(rec['peak_step_bytes']['ours'])} | "
        f"{gib(rec['peak_step_bytes']['diffusers'])} | "
        f"**{mem_ratio}** |",
        "",
        (f"By process CPU time, the measure that other processes on a shared CPU disturb least, ours / diffusers = "
         f"{rec['ratio_process_cpu']:.3f}; by median wall time {rec['ratio_time']:.3f}. "
         if rec["hardware"]["type"] == "cpu" else f"Ours is {verdict} the reference at this config. ")
        + "Goal: ratio <= 1.0 on CPU (aim 0.8). Output parity: "
        f"max |ours - diffusers| = {rec['parity']['max_abs_diff']:.3g} (max |diffusers| = "
        f"{rec['parity']['max_abs_ref']:.3g}).",
        "",
        "Per-round times (s): ours " + ", ".join(f"{x:.3f}" for x in rec["times_s"]["ours"]) + "; diffusers "
        + ", ".join(f"{x:.3f}" for x in rec["times_s"]["diffusers"]) + "; first in each round: "
        + ", ".join(rec["first_in_round"]) + ".",
        "",
        *_ops_table(rec.get("ops")),
        "## Method",
        "",
        __doc__.split("Method.", 1)[1].strip().replace("\n", " "),
        "",
        "## Hardware",
        "",
        hardware_md(hw),
        "",
        "## Versions",
        "",
        versions_md(rec["versions"]),
    ]
    return "\n".join(lines) + "\n"


def _ops_table(ops) -> list[str]:
    """Where the time goes: aten operators of one profiled step of each model, largest first."""
    if not ops:
        return []
    o, d = ops["ours"], ops["diffusers"]
    keys = sorted(set(o) | set(d), key=lambda k: -max(o.get(k, [0])[0], d.get(k, [0])[0]))[:14]
    lines = ["## Where the time goes (one profiled step each, self time per operator)", "",
             "| operator | ours ms (calls) | diffusers ms (calls) | ours - diffusers |", "|---|---|---|---|"]
    for k in keys:
        a, b = o.get(k, [0.0, 0]), d.get(k, [0.0, 0])
        lines.append(f"| `{k}` | {a[0]:.1f} ({a[1]}) | {b[0]:.1f} ({b[1]}) | {a[0] - b[0]:+.1f} |")
    lines += ["", f"Total aten self time: ours {sum(v[0] for v in o.values()):.0f} ms, diffusers "
              f"{sum(v[0] for v in d.values()):.0f} ms (the profiler adds overhead; compare the two, not to the "
              "timings above).", ""]
    return lines


if __name__ == "__main__":
    sys.exit(main())
