#!/usr/bin/env python
"""Data-loading throughput of the training loader, next to what one training step consumes, on this machine.

    python benchmarks/loader.py                                           # stage 2 shapes, synthetic shards
    python benchmarks/loader.py recipes/stage3_hq512.yaml --workers 0,2,4,8
    python benchmarks/loader.py recipes/stage2_sam256.yaml --data data/features/sam256   # real feature shards

For each DataLoader worker count, a fresh `pixart_ds.data.loader.build_loader` (the production path: Streaming
partition and shuffle, shard hash check, posterior sampling, T5 padding, collate, worker IPC) is iterated over one
epoch of feature shards: time to the first batch (worker start, first shards opened) is reported apart, and
samples/s = micro batch x batches after the first / their time. Beside it, the production `train_step` is timed
at the same micro batch by pixart_ds.bench.throughput.measure (synthetic batches, no data loading), so the two
columns say whether the loader keeps up with the step: headroom = loader samples/s / step images/s (>= 1: it does).

Without --data the shards are synthetic, written with the project's feature columns at the recipe's shapes: latent
mean/std fp16 [C, res/8, res/8] and T5 tokens fp16 [n, caption_channels] with n uniform in 1..max_text_tokens (the
features are stored unpadded; the loader pads to max_text_tokens in float32). On a machine without a GPU the step
uses a smaller preset/batch/precision (like benchmarks/throughput.py) and the loader uses the same batch; the report
says so. Writes benchmarks/results/loader_<recipe>_<hardware>_<yyyymm>.{md,json}.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as tdist
from tqdm import tqdm

from pixart_ds import config as C
from pixart_ds import hardware as H
from pixart_ds.bench import report
from pixart_ds.bench.report import hardware_md, versions_md
from pixart_ds.bench.throughput import measure
from pixart_ds.data.loader import build_loader, epoch_size
from pixart_ds.testing import write_feature_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCHEMA = "pixart_ds.loader/1"
RULE = ("Per worker count: a fresh build_loader over the feature shards, one epoch iterated; the first batch (worker "
        "start-up, first shards opened and hash-checked) is timed apart; samples/s = micro batch x the remaining "
        "batches / their wall time. Step: pixart_ds.bench.throughput.measure at the same micro batch ({warmup} "
        "warm-up steps discarded, {steps} timed; synthetic batches, data loading excluded). Both ran in this process "
        "on this machine, one after the other (the loader alone, not competing with the step for CPU).")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", default=os.path.join(REPO, "recipes", "stage2_sam256.yaml"),
                   help="stage recipe whose shapes, batch and model are measured (default stage2_sam256)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted recipe override (repeatable)")
    p.add_argument("--data", default=None, help="feature-shard directory to read (default: synthetic shards)")
    p.add_argument("--samples", type=int, default=512, help="synthetic samples to write (default 512)")
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts (default 0,1,2)")
    p.add_argument("--batch", type=int, default=None, help="per-device micro batch (default: the recipe's; CPU: "
                                                           "--cpu-batch)")
    p.add_argument("--cpu-preset", default="PixArt-S/2", help="model preset for the step when no GPU is present")
    p.add_argument("--cpu-batch", type=int, default=4, help="micro batch when no GPU is present")
    p.add_argument("--cpu-precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--warmup", type=int, default=2, help="discarded train steps (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed train steps (default 5)")
    p.add_argument("--no-step", action="store_true", help="measure the loader only")
    p.add_argument("--out", action="append", default=None, help="results folder (repeatable; default "
                                                                 "benchmarks/results)")
    p.add_argument("--tag", default="", help="suffix for the result name")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def synthesize(cfg, n: int, root: str) -> str:
    """Feature shards of `n` random samples at the recipe's shapes (pixart_ds.testing.write_feature_shards)."""

    ls = C.latent_size(cfg)
    out = os.path.join(root, "features")
    write_feature_shards(out, n, channels=cfg.model.in_channels, latent_hw=(ls, ls),
                         text_dim=cfg.model.caption_channels, max_tokens=cfg.model.max_text_tokens,
                         condition=cfg.model.condition, num_classes=cfg.model.num_classes, seed=0)
    return out


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs if ".mds" in f)


def time_loader(cfg, batch: int, workers: int, progress: bool) -> dict:
    cfg = C.replace(cfg, **{"data.num_workers": workers})
    t0 = time.perf_counter()
    loader = build_loader(cfg, batch)
    t_build = time.perf_counter() - t0
    n_batches = epoch_size(loader).batches_per_rank
    bar = None
    if progress:

        bar = tqdm(total=n_batches, desc=f"loader workers={workers}", unit="batch", leave=False)
    t0 = time.perf_counter()
    t_first, count, out_bytes = None, 0, 0
    for b in loader:
        if t_first is None:
            t_first = time.perf_counter() - t0
            t1 = time.perf_counter()
        else:
            count += 1
            out_bytes += sum(v.numel() * v.element_size() for v in b.values())
        if bar:
            bar.update(1)
    t_rest = time.perf_counter() - t1
    if bar:
        bar.close()
    if count == 0:
        raise SystemExit("loader: the epoch has a single batch; give more --samples")
    return {"workers": workers, "build_s": t_build, "first_batch_s": t_first, "batches_timed": count,
            "timed_s": t_rest, "samples_per_s": count * batch / t_rest, "batch_mib_per_s": out_bytes / t_rest / 2**20}


def render_markdown(rec: dict, notes: list[str]) -> str:
    m, step = rec["measure"], rec.get("step")
    hw = rec["hardware"]
    lines = [f"# Data loading: {rec['recipe_name']} on {hw['name']}", "",
             f"Recipe `{rec['recipe']}`" + (f" with overrides `{' '.join(rec['overrides'])}`" if rec["overrides"]
                                            else "") + f"; measured {rec['timestamp'][:19]} UTC.", "",
             f"Feature shards: {m['data']} — {m['samples']} samples, {m['shard_mib']:.1f} MiB on disk "
             f"({m['shard_mib'] * 2**20 / m['samples'] / 1024:.0f} KiB per sample); latent {m['latent_shape']}, "
             f"T5 width {m['text_dim']}, padded to {m['text_tokens']} tokens. Micro batch {m['micro_batch_size']}.",
             ""]
    if step:
        lines += [f"One training step at this batch: **{step['images_per_s']:.2f} images/s** "
                  f"({step['model']}, {step['precision']}, median step {step['step_s_median']:.3f} s).", ""]
    lines += ["| DataLoader workers | samples/s | headroom vs step | batch MiB/s out | first batch (s) | build (s) |",
              "|---|---|---|---|---|---|"]
    for r in rec["loader"]:
        head = f"{r['samples_per_s'] / step['images_per_s']:.1f}x" if step else "—"
        lines.append(f"| {r['workers']} | **{r['samples_per_s']:.1f}** | {head} | {r['batch_mib_per_s']:.0f} | "
                     f"{r['first_batch_s']:.2f} | {r['build_s']:.2f} |")
    lines += ["", "## Measurement rule", "", rec["rule"]]
    if m.get("load_average_before"):
        lines += ["", f"Machine load (1/5/15-min load average) before: "
                      f"{' / '.join(f'{x:.1f}' for x in m['load_average_before'])}, after: "
                      f"{' / '.join(f'{x:.1f}' for x in m['load_average_after'])} on {m['cpu_count']} cores; "
                      f"other processes sharing the cores slow both columns alike."]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Hardware", "", hardware_md(hw), "", "## Versions", "", versions_md(rec["versions"]), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    a = parse_args(argv)
    if not os.path.isfile(a.recipe):
        print(f"loader: error: {a.recipe}: recipe file not found", file=sys.stderr)
        return 2
    try:
        workers = [int(x) for x in a.workers.split(",") if x.strip()]
    except ValueError:
        print(f"loader: error: --workers {a.workers!r}: expected comma-separated integers", file=sys.stderr)
        return 2

    notes = []
    overrides = list(a.overrides) + ["train.torch_adam=true"]
    gpu = torch.cuda.is_available()
    if not gpu:
        cfg0 = C.load(a.recipe)
        batch = a.batch or a.cpu_batch
        overrides = [f"model.preset={a.cpu_preset}", f"train.precision={a.cpu_precision}"] + overrides
        notes.append(f"No GPU: the step is measured with preset {a.cpu_preset} (recipe {cfg0.model.preset}) in "
                     f"{a.cpu_precision} (recipe {cfg0.train.precision}) at micro batch {batch} (recipe "
                     f"{cfg0.train.micro_batch_size}); the loader at the same batch with the recipe's data shapes. "
                     f"These numbers describe this CPU.")
    cfg = C.load(a.recipe, overrides)
    batch = a.batch or (cfg.train.micro_batch_size if gpu else a.cpu_batch)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp:
        data = os.path.abspath(a.data) if a.data else synthesize(cfg, a.samples, tmp)
        # One source, one global batch = one micro batch (a single process measures one device's loader).
        cfg = C.replace(cfg, **{"data.sources": [{"local": data}], "train.global_batch_size": batch,
                                "train.micro_batch_size": batch, "train.init_from": None})

        probe = build_loader(C.replace(cfg, **{"data.num_workers": 0}), batch)
        samples = epoch_size(probe).drawn
        del probe
        results = [time_loader(cfg, batch, w, not a.no_progress) for w in workers]
        shard_mib = dir_bytes(data) / 2**20

    step = None
    if not a.no_step:

        srec = measure(C.replace(cfg, **{"train.micro_batch_size": batch}), warmup=a.warmup, steps=a.steps,
                       progress=not a.no_progress, matmul_probe=False)
        mc = srec["config"]["model"]
        step = {"images_per_s": srec["results"]["images_per_s_per_device"],
                "step_s_median": srec["results"]["step_time_s"]["median"],
                "model": f"{mc['preset']} ({srec['results']['parameters'] / 1e6:.1f}M parameters)",
                "precision": srec["measure"]["precision"], "record": srec["results"]}

    if tdist.is_initialized() and tdist.get_rank() != 0:
        return 0
    hw = H.device_record(H.default_device())
    ls = C.latent_size(cfg)
    name = "loader_" + os.path.splitext(os.path.basename(a.recipe))[0] + (f"-{a.tag}" if a.tag else "")
    rec = {
        "schema": SCHEMA,
        "recipe": os.path.relpath(os.path.abspath(a.recipe), REPO),
        "recipe_name": os.path.splitext(os.path.basename(a.recipe))[0],
        "overrides": overrides,
        "timestamp": report.now().isoformat(),
        "hardware": hw,
        "versions": H.versions(),
        "measure": {"micro_batch_size": batch, "samples": int(samples), "shard_mib": shard_mib,
                    "data": a.data or "synthetic (pixart_ds.testing.write_feature_shards, T5 tokens uniform in "
                                      f"1..{cfg.model.max_text_tokens})",
                    "latent_shape": [cfg.model.in_channels, ls, ls], "text_dim": cfg.model.caption_channels,
                    "text_tokens": cfg.model.max_text_tokens, "cpu_count": os.cpu_count(),
                    "load_average_before": load_before,
                    "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "rule": RULE.format(warmup=a.warmup, steps=a.steps),
        "loader": results,
        "step": step,
        "notes": notes,
        "config": C.to_dict(cfg),
    }
    base = report.stem(name, hw["slug"])
    outs = a.out or [report.DEFAULT_RESULTS]
    report.write_outputs(outs, base, render_markdown(rec, notes), rec)
    best = max(results, key=lambda r: r["samples_per_s"])
    msg = f"{name} on {hw['name']}: best {best['samples_per_s']:.1f} samples/s ({best['workers']} workers)"
    if step:
        msg += f"; train_step {step['images_per_s']:.2f} images/s"
    print(msg + f" -> {os.path.join(outs[0], base + '.md')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
