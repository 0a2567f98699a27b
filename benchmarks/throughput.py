#!/usr/bin/env python
"""Training throughput of one or more stage recipes on the hardware present: images/s per device, achieved TFLOP/s,
MFU, peak memory. Writes benchmarks/results/<recipe>_<hardware>_<yyyymm>.{md,json}.

    python benchmarks/throughput.py recipes/stage2_sam256.yaml                  # the recipe as is (GPU)
    python benchmarks/throughput.py recipes/stage*.yaml recipes/stage3*.yaml     # several, one process each
    python benchmarks/throughput.py recipes/stage2_sam256.yaml --set model.grad_checkpointing=false
    python benchmarks/throughput.py recipes/stage2_sam256.yaml --cpu-preset PixArt-S/2 --cpu-batch 4   # on a CPU

On a machine without a GPU the recipe's PixArt-XL/2 would take minutes per step, so the CPU defaults replace the
model preset, the per-device batch and the precision (fp32: the recipes' bf16 is a GPU choice) and say so in the
report. The method is pixart_ds/bench/throughput.py's docstring; benchmarks/README.md explains how to read the
reports.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
import torch.distributed as tdist

from pixart_ds import config as C
from pixart_ds.bench import report
from pixart_ds.bench.throughput import measure, render_markdown
from pixart_ds.dist import destroy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="+", help="stage recipe YAML files")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted recipe override, applied to every recipe (repeatable)")
    p.add_argument("--warmup", type=int, default=2, help="discarded steps (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--cpu-preset", default="PixArt-S/2", help="model preset used when no GPU is present")
    p.add_argument("--cpu-batch", type=int, default=4, help="per-device batch used when no GPU is present")
    p.add_argument("--cpu-precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--torch-adam", action=argparse.BooleanOptionalAction, default=True,
                   help="torch's AdamW (foreach) instead of DeepSpeed's FusedAdam, whose JIT build takes minutes "
                        "on a fresh machine (default: on)")
    p.add_argument("--no-ema", action="store_true", help="leave out the EMA update")
    p.add_argument("--out", action="append", default=None,
                   help="results folder (repeatable; default benchmarks/results)")
    p.add_argument("--tag", default="", help="suffix for the result name, e.g. 'nockpt'")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # one recipe, this process
    return p.parse_args(argv)


def run_one(a, recipe: str) -> int:
    overrides = list(a.overrides)
    notes = []
    if a.torch_adam:
        overrides.append("train.torch_adam=true")
    if not torch.cuda.is_available():
        cfg0 = C.load(recipe)
        overrides = [f"model.preset={a.cpu_preset}", f"train.micro_batch_size={a.cpu_batch}",
                     f"train.precision={a.cpu_precision}"] + overrides
        notes.append(f"No GPU: measured with model preset {a.cpu_preset} (the recipe's is {cfg0.model.preset}), "
                     f"per-device batch {a.cpu_batch} (recipe {cfg0.train.micro_batch_size}) and "
                     f"{a.cpu_precision} (recipe {cfg0.train.precision}). These numbers describe this CPU, not the "
                     f"recipe's training cost.")
    cfg = C.load(recipe, overrides)
    if cfg.train.torch_adam:
        notes.append("Optimizer: DeepSpeed with torch.optim.AdamW (foreach) (train.torch_adam=true), not FusedAdam.")
    rec = measure(cfg, warmup=a.warmup, steps=a.steps, ema=not a.no_ema, progress=not a.no_progress)

    if tdist.is_initialized() and tdist.get_rank() != 0:
        return 0
    name = os.path.splitext(os.path.basename(recipe))[0] + (f"-{a.tag}" if a.tag else "")
    rec.update(recipe=os.path.relpath(os.path.abspath(recipe), REPO), recipe_name=os.path.splitext(
        os.path.basename(recipe))[0], overrides=overrides, timestamp=report.now().isoformat(), notes=notes)
    base = report.stem(name, rec["hardware"]["slug"])
    outs = a.out or [report.DEFAULT_RESULTS]
    rec["report"] = os.path.join("benchmarks", "results", base + ".md")
    report.write_outputs(outs, base, render_markdown(rec, notes), rec)
    r = rec["results"]
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    print(f"{name} on {rec['hardware']['name']}: {r['images_per_s_per_device']:.3g} images/s/device, "
          f"{r['model_tflops_per_s']:.3g} model TFLOP/s, MFU {mfu}; "
          f"-> {os.path.join(outs[0], base + '.md')}", flush=True)
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    for r in a.recipes:
        if not os.path.isfile(r):
            print(f"throughput: error: {r}: recipe file not found", file=sys.stderr)
            return 2
    if a.in_process or len(a.recipes) == 1:

        rc = 0
        try:
            for r in a.recipes:
                rc |= run_one(a, r)
        finally:
            destroy()  # before exit-time destructors: gloo's threads can abort an exiting process
        return rc
    # Several recipes: one subprocess each, so every measurement starts from a clean device and process group,
    # and one failing stage does not stop the others.
    argv = sys.argv[1:] if argv is None else list(argv)
    flags = [x for x in argv if x not in a.recipes]
    rc = 0
    for r in a.recipes:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), r, "--in-process", *flags])
        if p.returncode:
            print(f"throughput: {r} failed with exit code {p.returncode}", file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
