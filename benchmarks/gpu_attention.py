#!/usr/bin/env python
"""Attention kernels of PixArt-XL/2 at 256 px in bf16: forward + backward with each backend present, outputs and
gradients compared, step time and peak memory. Writes benchmarks/results/gpu_attention_<hardware>_<yyyymm>.{md,json}.

    python benchmarks/gpu_attention.py                       # GPU: PixArt-XL/2, 256 px, batch 32, bf16
    python benchmarks/gpu_attention.py --preset tiny --device cpu --batch 2 --check-batch 2 --repeats 1   # smoke

Method. One PixArt (adaLN-single, text, 120 T5 tokens of 4,096 channels) with seeded weights: the official init,
then the zero-initialised cross-attention output projections and final linear drawn N(0, 0.02) so that the text
path and the output are not trivially zero. Inputs: seeded latents [B, 4, 32, 32], timesteps, T5-shaped features
and a padding mask with random caption lengths; the last caption is all padding (the no-NaN case).

Correctness (batch --check-batch): a float32 copy with the `math` kernel is the reference. Each backend present
(flash when flash-attn imports, sdpa, math; `auto` resolves to one of them) runs forward + backward (loss = mean of
the squared output) on a bf16 copy of the same weights. Reported per backend: max |out - ref| / max |ref|, the
cosine of the outputs and of the full gradient vectors against the reference, finiteness, and the same numbers
between every pair of bf16 backends. Which torch SDPA kernels ran is read from the profiler (aten op names): with no
mask, `sdpa` self-attention is eligible for torch's fused kernels (FlashAttention-2, cuDNN), and torch picks among
them by its own priority (torch 2.11 on an H200 picked cuDNN attention for both self- and cross-attention).

Speed (batch --batch): per backend, --warmup untimed steps, then --repeats timed steps (zero grads, forward, loss,
backward; CUDA-event timed). Reported: median ms/step, images/s, and the allocator's peak above the bytes held
before the step.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pixart_ds import config
from pixart_ds import hardware as H
from pixart_ds.bench import report
from pixart_ds.model.attention import resolve_backend
from pixart_ds.model.pixart import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def parse_args(argv=None):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="PixArt-XL/2")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=32 if gpu else 2, help="batch of the timed steps")
    p.add_argument("--check-batch", type=int, default=8 if gpu else 2, help="batch of the correctness comparison")
    p.add_argument("--caption-channels", type=int, default=4096)
    p.add_argument("--text-tokens", type=int, default=120)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", action="append", default=None, help="results folder (repeatable)")
    p.add_argument("--name", default="gpu_attention")
    return p.parse_args(argv)


def backends_present(device: torch.device) -> list[str]:
    out = []
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        out.append("flash")
    return out + ["sdpa", "math"]


def build(a, device):
    cfg = config.from_dict({"model": {"preset": a.preset, "caption_channels": a.caption_channels,
                                      "max_text_tokens": a.text_tokens, "attention": "math"},
                            "data": {"resolution": a.resolution}}, "gpu_attention")
    torch.manual_seed(a.seed)
    model = build_model(cfg)
    with torch.no_grad():
        for b in model.blocks:
            b.cross_attn.proj.weight.normal_(0, 0.02)
        model.final_layer.linear.weight.normal_(0, 0.02)
    return cfg, model.to(device)


def make_inputs(a, cfg, B, device, dtype):
    g = torch.Generator().manual_seed(a.seed + 1)
    n = cfg.data.resolution // 8
    x = torch.randn(B, cfg.model.in_channels, n, n, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randn(B, a.text_tokens, a.caption_channels, generator=g)
    lens = torch.randint(1, a.text_tokens + 1, (B,), generator=g)
    lens[-1] = 0  # an all-padding caption
    mask = (torch.arange(a.text_tokens)[None] < lens[:, None]).long()
    return (x.to(device, dtype), t.to(device), y.to(device, dtype), mask.to(device))


def step(model, inp):
    model.zero_grad(set_to_none=True)
    out = model(*inp)
    out.float().square().mean().backward()
    return out


def grad_vector(model) -> torch.Tensor:
    return torch.cat([p.grad.float().reshape(-1) for p in model.parameters() if p.grad is not None])


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float().reshape(-1), b.float().reshape(-1)
    return {"max_abs": (a - b).abs().max().item(), "rel_max": ((a - b).abs().max() / b.abs().max()).item(),
            "cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item()}


def sdpa_ops(model, inp) -> dict:
    """aten SDPA kernels that one forward calls (name -> count)."""

    acts = [ProfilerActivity.CPU]
    with torch.no_grad(), profile(activities=acts) as prof:
        model(*inp)
    counts = {}
    for e in prof.events():
        if e.name.startswith("aten::_scaled_dot_product") or e.name.startswith("aten::_flash_attention") or \
                e.name.startswith("aten::_efficient_attention") or "flash_attn" in e.name:
            counts[e.name] = counts.get(e.name, 0) + 1
    return counts


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(model, inp, device, warmup, repeats) -> list[float]:
    for _ in range(warmup):
        step(model, inp)
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step(model, inp)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            step(model, inp)
            times.append(time.perf_counter() - t0)
    return times


def peak_bytes(model, inp, device) -> int | None:
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(model, inp)
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def main(argv=None) -> int:
    a = parse_args(argv)
    device = torch.device(a.device)
    hw, versions = H.device_record(device), H.versions()
    print(f"gpu_attention on {hw['name']}: {a.preset} at {a.resolution} px, batch {a.batch} (check {a.check_batch})")
    cfg, model = build(a, device)
    backends = backends_present(device)

    # -- correctness: fp32 math reference vs each bf16 backend --------------------------------------------------
    ref_model = model.float()
    ref_model.set_attention("math")
    inp32 = make_inputs(a, cfg, a.check_batch, device, torch.float32)
    ref_out = step(ref_model, inp32).detach()
    ref_grad = grad_vector(ref_model)
    model = ref_model.to(torch.bfloat16)  # bf16 weights, as DeepSpeed's bf16 engine holds them
    inp16 = make_inputs(a, cfg, a.check_batch, device, torch.bfloat16)
    outs, grads, checks = {}, {}, {}
    for be in backends:
        model.set_attention(be)
        out = step(model, inp16).detach()
        outs[be], grads[be] = out, grad_vector(model)
        checks[be] = {"finite": bool(torch.isfinite(out).all() and torch.isfinite(grads[be]).all()),
                      "out_vs_fp32_math": compare(out, ref_out), "grad_vs_fp32_math": compare(grads[be], ref_grad),
                      "sdpa_ops_per_forward": sdpa_ops(model, inp16)}
        print(f"  {be}: out vs fp32 {checks[be]['out_vs_fp32_math']}, grad cos "
              f"{checks[be]['grad_vs_fp32_math']['cosine']:.6f}, ops {checks[be]['sdpa_ops_per_forward']}")
    pairs = {}
    for i, b1 in enumerate(backends):
        for b2 in backends[i + 1:]:
            pairs[f"{b1}_vs_{b2}"] = {"out": compare(outs[b1], outs[b2]), "grad": compare(grads[b1], grads[b2])}
    auto = resolve_backend("auto", inp16[0])
    del outs, grads, ref_out, ref_grad

    # -- speed ---------------------------------------------------------------------------------------------------
    inp = make_inputs(a, cfg, a.batch, device, torch.bfloat16)
    speed = {}
    for be in backends:
        model.set_attention(be)
        times = timed_steps(model, inp, device, a.warmup, a.repeats)
        med = statistics.median(times)
        speed[be] = {"median_s": med, "images_per_s": a.batch / med, "times_s": times,
                     "peak_step_bytes": peak_bytes(model, inp, device)}
        print(f"  {be}: {med * 1e3:.1f} ms/step, {a.batch / med:.1f} images/s, "
              f"peak {report.gib(speed[be]['peak_step_bytes'])}")

    data = {"schema": "pixart_ds.gpu_attention/1", "timestamp": report.now().isoformat(), "hardware": hw,
            "versions": versions, "args": vars(a), "backends": backends, "auto_resolves_to": auto,
            "params": sum(p.numel() for p in model.parameters()), "checks": checks, "pairs": pairs, "speed": speed}
    md = [f"# Attention kernels: {a.preset} at {a.resolution} px, bf16, on {hw['name']}", "",
          f"Run {data['timestamp']}; `python benchmarks/gpu_attention.py` (method: the script's docstring).", "",
          report.hardware_md(hw), "", report.versions_md(versions), "",
          f"Backends present: {', '.join(backends)}; `auto` resolves to `{auto}`. "
          f"Correctness at batch {a.check_batch} (last caption all padding) against a float32 copy with the math "
          f"kernel; speed at batch {a.batch}, median of {a.repeats} steps after {a.warmup} warm-up.", "",
          "| backend | finite | out rel. max err vs fp32 | out cosine | grad cosine | ms/step | images/s | "
          "peak step memory | SDPA kernels per forward |",
          "|---|---|---|---|---|---|---|---|---|"]
    for be in backends:
        c, s = checks[be], speed[be]
        ops = ", ".join(f"{k.replace('aten::', '')} x{v}" for k, v in c["sdpa_ops_per_forward"].items()) or "—"
        md.append(f"| {be} | {c['finite']} | {c['out_vs_fp32_math']['rel_max']:.2e} | "
                  f"{c['out_vs_fp32_math']['cosine']:.6f} | {c['grad_vs_fp32_math']['cosine']:.6f} | "
                  f"{s['median_s'] * 1e3:.1f} | {s['images_per_s']:.1f} | {report.gib(s['peak_step_bytes'])} | {ops} |")
    md += ["", "Between bf16 backends:", "", "| pair | out rel. max diff | out cosine | grad cosine |",
           "|---|---|---|---|"]
    for k, v in pairs.items():
        md.append(f"| {k} | {v['out']['rel_max']:.2e} | {v['out']['cosine']:.6f} | {v['grad']['cosine']:.6f} |")
    outs_dirs = a.out or [report.DEFAULT_RESULTS]
    for path in report.write_outputs(outs_dirs, report.stem(a.name, hw["slug"]), "\n".join(md) + "\n", data):
        print("wrote", path)
    ok = all(c["finite"] for c in checks.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
