#!/usr/bin/env python
"""Scaling model: stage 2 on 8 to 1,024 GPUs (step time, GPU-days) and its communication half checked on a network.

    # 1. communication measured on two hosts, one rank each (the local cluster's simulated hosts, or any two nodes):
    srun -p multi --nodes=2 --ntasks-per-node=1 --cpus-per-task=1 \
        bash slurm/common.sh task -- python benchmarks/scaling.py comm --out /var/tmp/comm.json
    # 2. the report: projections + that validation, written to benchmarks/results/
    python benchmarks/scaling.py report --comm /var/tmp/comm.json \
        [--record benchmarks/results/<a GPU record>.json] [--recipe recipes/stage2_sam256.yaml]

`comm` measures the link itself (TCP latency and bandwidth between the two ranks, one direction and both at once)
and then times gloo collectives (all-reduce in fp32 and bf16, all-gather and reduce-scatter in bf16) of several
sizes; `report` predicts each collective from the link's numbers with the model's own formula
(pixart_ds.bench.scaling.collective_time) and states the ratio, then projects the recipe's stage on the
interconnects of pixart_ds.bench.scaling.INTERCONNECTS. The method: pixart_ds/bench/scaling.py's docstring and
benchmarks/README.md. Writes benchmarks/results/scaling_stage2_sam256_<record's card>-cpu-<cores>core_<yyyymm>.{md,json,png}
(the card of the single-device record, the CPU machine of the network measurement).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as tdist

from pixart_ds import config as C
from pixart_ds import dist
from pixart_ds.bench import report
from pixart_ds.bench import scaling as S
from pixart_ds.bench.gpu_days import PAPER_BY_RECIPE
from pixart_ds.fsutil import atomic_write_text
from pixart_ds.hardware import cpu_model, git_revision
from pixart_ds.model.flops import train_flops_per_image
from pixart_ds.model.pixart import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZES_MIB = (1, 8, 32, 128)
GPU_COUNTS = (8, 64, 256, 1024)
# Within this factor the model's communication estimate counts as validated (issue 15's acceptance bar).
VALIDATION_FACTOR = 2.0


# ----------------------------------------------------------------------------------------------------------------
# comm: run on every rank (2 ranks, one per host)
# ----------------------------------------------------------------------------------------------------------------


def comm(a) -> int:
    env = dist.dist_env()
    dist.init_distributed(env, timeout_s=600, device="cpu")
    world, rank = tdist.get_world_size(), tdist.get_rank()
    if world != 2:
        print(f"scaling comm: error: needs exactly 2 ranks (one per host), got {world}", file=sys.stderr)
        return 2
    link_bytes = a.link_mib << 20
    port = None
    if rank == 1:
        port, server = S.link_server(link_bytes, rounds=a.repeats)
    hosts = [None, None]
    tdist.all_gather_object(hosts, (socket.gethostname(), port))
    if hosts[0][0] == hosts[1][0]:
        print(f"scaling comm: warning: both ranks run on {hosts[0][0]}: this measures one host, not a network",
              file=sys.stderr)
    link = S.measure_link(hosts[1][0], hosts[1][1], link_bytes, rounds=a.repeats) if rank == 0 else None
    if rank == 1:
        server.join()
    tdist.barrier()
    local = S.local_rates(a.local_mib << 20, (torch.float32, torch.bfloat16), repeats=a.repeats)
    results = []
    for mib in SIZES_MIB:
        for op, dtype in (("all_reduce", torch.float32), ("all_reduce", torch.bfloat16),
                          ("all_gather", torch.bfloat16), ("reduce_scatter", torch.bfloat16)):
            try:
                r = S.time_collective(op, mib << 20, dtype, repeats=a.repeats)
            except (RuntimeError, ValueError) as e:  # a backend without this collective (older gloo)
                r = {"op": op, "dtype": str(dtype).replace("torch.", ""), "nbytes": mib << 20,
                     "unsupported": str(e).splitlines()[0][:200]}
            results.append(r)
    if rank == 0:
        rec = {"schema": "pixart_ds.scaling_comm/1", "hosts": [h for h, _ in hosts], "backend": tdist.get_backend(),
               "world_size": world, "link": link, "local": local, "collectives": results, "torch": torch.__version__,
               "load_average": os.getloadavg(),
               "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "pixart_ds_commit": git_revision(),
               "note": a.note}
        atomic_write_text(a.out, json.dumps(rec, indent=2) + "\n")
        print(f"scaling comm: hosts {rec['hosts']}; link {link['bandwidth_both_ways'] / 1e9:.3f} GB/s per direction "
              f"(both ways), {link['latency_s'] * 1e6:.0f} us; wrote {a.out}")
    tdist.barrier()
    tdist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------


def validate(comm_rec: dict) -> list[dict]:
    """Every measured collective beside the model's estimates from the measured link (both-ways bandwidth: a ring
    rank sends and receives at once; latency: half the 1-byte round trip): the alpha-beta formula alone
    (`collective_time`, what the projection uses) and with gloo's local sums and copies at this host's measured
    rates (`gloo_collective_time`; for reduce_scatter that is gloo's all-reduce of the whole tensor)."""
    link, local = comm_rec["link"], comm_rec["local"]
    world = comm_rec["world_size"]
    bw = link["bandwidth_both_ways"]
    lat = S.ring_latency(world, world, link["latency_s"], link["latency_s"])
    rows = []
    for c in comm_rec["collectives"]:
        if "unsupported" in c:
            rows.append({**c, "alpha_beta_s": None, "model_s": None, "ratio": None})
            continue
        ab = S.collective_time(c["op"], c["nbytes"], world, bw, lat)
        est = S.gloo_collective_time(c["op"], c["nbytes"], world, bw, lat, local["reduce"][c["dtype"]],
                                     local["copy"], local.get("fresh_copy"))
        rows.append({**c, "alpha_beta_s": ab, "model_s": est, "ratio": c["median_s"] / est,
                     "ratio_alpha_beta": c["median_s"] / ab})
    return rows


def project(speed, cfg, params: int, recompute: float) -> dict:
    out = {}
    for key, ic in S.INTERCONNECTS.items():
        sp = speed.on(ic.gpu_peak_tflops, ic.gpu).for_recipe(recompute, cfg.model.grad_checkpointing)
        rows = []
        for n in GPU_COUNTS:
            for overlap in (False, True):
                e = S.step_estimate(gpus=n, interconnect=ic, params=params, seconds_per_image=sp.seconds_per_image,
                                    global_batch=cfg.train.global_batch_size,
                                    max_micro_batch=cfg.train.micro_batch_size, overlap=overlap,
                                    grad_checkpointing=cfg.model.grad_checkpointing, steps=cfg.train.total_steps)
                rows.append({"overlap": overlap, **e.__dict__})
        out[key] = {"interconnect": ic.__dict__, "speed": sp.__dict__, "rows": rows}
    return out


def _ms(x):
    return "—" if x is None else f"{x * 1e3:,.1f}"


def render(rep: dict) -> str:
    L = []
    L.append(f"# Scaling model: {rep['recipe_name']} on 8 to 1,024 GPUs (ZeRO-2), and its communication measured\n")
    L.append(f"Run {rep['timestamp']}; `python benchmarks/scaling.py report` at commit `{rep['commit']}`. Method: "
             f"`pixart_ds/bench/scaling.py` and benchmarks/README.md (Scaling model). Every GPU number below is "
             f"**projected**; the measured numbers are the single-device record and the CPU network in section 2.\n")
    sp = rep["speed"]
    L.append("## 1. Projection\n")
    L.append(f"- Recipe `{rep['recipe']}`: {rep['steps']:,} steps at global batch {rep['global_batch']:,} "
             f"(Table 4: 178 x 64), micro batch at most {rep['micro_batch']}, gradient checkpointing "
             f"{'on' if rep['grad_checkpointing'] else 'off'}; {rep['params']:,} parameters.")
    L.append(f"- Single-device input: `{sp['source']}` on **{sp['device']}**: {sp['kind']}; "
             f"{1 / sp['seconds_per_image']:,.1f} images/s = {sp['seconds_per_image'] * 1e3:.2f} ms per image. "
             f"There is no GPU record of the full production step (optimizer, EMA, gradient checkpointing) yet; "
             f"pass one with `--record` when it exists (a benchmarks/throughput.py JSON or a GPU MFU record "
             f"carrying images/s).")
    L.append(f"- ZeRO-2 as DeepSpeed 0.19 does it: gradients all-reduced in bf16 at every micro-batch "
             f"({rep['params'] * 2 / 1e9:.2f} GB), bf16 parameters all-gathered once per step "
             f"({rep['params'] * 2 / 1e9:.2f} GB); 'overlapped' = `overlap_comm: true` (the reduction hides behind "
             f"the backward pass), 'not' = our recipes' setting.\n")
    for key, p in rep["projection"].items():
        ic, s = p["interconnect"], p["speed"]
        L.append(f"### {ic['name']}\n")
        L.append(f"Links: {ic['note']}; collectives reach {ic['efficiency']:.0%} of them. Per-hop latency "
                 f"{ic['intra_latency'] * 1e6:.0f} us inside a node, {ic['inter_latency'] * 1e6:.0f} us between "
                 f"nodes. Compute per image on a {ic['gpu']}: {s['seconds_per_image'] * 1e3:.2f} ms"
                 f"{' (' + '; '.join(s['notes']) + ')' if s['notes'] else ''}.\n")
        L.append("| GPUs | nodes | images per GPU per step (micro-batches) | overlap | compute ms | gradient comm ms "
                 "(exposed) | param all-gather ms | step ms | scaling efficiency | images/s per GPU | GPU-days | "
                 "days on that many GPUs |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in p["rows"]:
            L.append(f"| {r['gpus']:,} | {r['nodes']} | {r['per_gpu_batch']:,.4g} ({r['accumulation']}) | "
                     f"{'yes' if r['overlap'] else 'no'} | {_ms(r['compute_s'])} | "
                     f"{_ms(r['grad_comm_s'])} ({_ms(r['grad_exposed_s'])}) | {_ms(r['param_comm_s'])} | "
                     f"{_ms(r['step_s'])} | {r['efficiency']:.1%} | {r['images_per_s_per_gpu']:,.1f} | "
                     f"{r['gpu_days']:,.0f} | {r['wall_days']:,.1f} |")
        L.append("")
    L.append(f"Table 4 for comparison: stage 2 took {rep['paper_v100_days']} V100-days on 64 V100, i.e. "
             f"{rep['paper_implied_rate']:.1f} images/s per V100 end to end.\n")
    v = rep["validation"]
    L.append("## 2. The communication half, measured: gloo between two hosts\n")
    c = v["comm"]
    L.append(f"Two simulated hosts of the local Slurm cluster (slurm/local-cluster.sh: network namespaces joined by a "
             f"Linux bridge, veth pairs) on one machine ({c['cpu_model']}, {c['cpu_count']} cores), one rank per "
             f"host ({', '.join(c['hosts'])}), torch {c['torch']} {c['backend']}, commit "
             f"`{c['pixart_ds_commit']}`. The link, measured first with plain TCP between the two ranks: "
             f"latency {c['link']['latency_s'] * 1e6:.0f} us (half the 1-byte round trip), bandwidth "
             f"{c['link']['bandwidth_one_way'] / 1e9:.3f} GB/s one way, {c['link']['bandwidth_both_ways'] / 1e9:.3f} "
             f"GB/s per direction with both directions busy ({c['link']['nbytes'] >> 20} MiB, median of "
             f"{c['link']['rounds']}). The model's estimate of each collective uses those two numbers in the same "
             f"formula as the projection (`collective_time`, both-ways bandwidth since a ring rank sends and "
             f"receives at once).\n")
    loc = c["local"]
    L.append(f"On a CPU the collective's own local work is not negligible beside this network (on a GPU it is): "
             f"gloo sums on one thread and copies between its buffers. Measured on the same host, one thread: sum "
             f"{loc['reduce']['float32'] / 1e9:.2f} GB/s (fp32), {loc['reduce']['bfloat16'] / 1e9:.2f} GB/s (bf16, "
             f"torch's vectorised add), copy {loc['copy'] / 1e9:.2f} GB/s into existing memory and "
             f"{loc.get('fresh_copy', loc['copy']) / 1e9:.2f} GB/s into new memory (allocated and first touched). "
             f"gloo's all_gather_into_tensor gathers into a buffer it allocates per call and copies it out; its "
             f"reduce_scatter_tensor is a clone (new memory), an all-reduce of the whole tensor and a copy "
             f"(torch/csrc/distributed/c10d/ProcessGroupGloo.cpp); the estimates follow that. Load average during "
             f"the measurement: {', '.join(f'{x:.1f}' for x in c.get('load_average', []))} "
             f"(the 2-core machine was shared).\n")
    L.append("| collective | dtype | size | measured ms (median; fastest) | alpha-beta ms | measured / alpha-beta | "
             "alpha-beta + local work ms | **measured / model** |")
    L.append("|---|---|---|---|---|---|---|---|")
    for r in v["rows"]:
        if r.get("unsupported"):
            L.append(f"| {r['op']} | {r['dtype']} | {r['nbytes'] / 2**20:.0f} MiB | not supported by "
                     f"{c['backend']}: {r['unsupported']} | | | | |")
            continue
        L.append(f"| {r['op']} | {r['dtype']} | {r['nbytes'] / 2**20:.0f} MiB | {_ms(r['median_s'])}; "
                 f"{_ms(r.get('min_s'))} | {_ms(r['alpha_beta_s'])} | {r['ratio_alpha_beta']:.2f} | "
                 f"{_ms(r['model_s'])} | **{r['ratio']:.2f}** |")
    L.append("")
    ar, ev = v["all_reduce"], v["every"]
    L.append(f"**All-reduce (DeepSpeed's gradient path; the acceptance bar): measured / model {ar['min_ratio']:.2f} "
             f"to {ar['max_ratio']:.2f} at {v['min_mib']} MiB and more: "
             f"{'within' if ar['within'] else 'NOT within'} {VALIDATION_FACTOR:g}x.** Every collective, all-gather "
             f"and reduce-scatter included: {ev['min_ratio']:.2f} to {ev['max_ratio']:.2f} "
             f"({'within' if ev['within'] else 'not within'} {VALIDATION_FACTOR:g}x). The alpha-beta part alone "
             f"(what the GPU projection uses, where the local work is negligible) is the column before. "
             f"PixArt-XL/2's per-step messages are {rep['params'] * 2 / 2**20:,.0f} MiB. {v['comment']}\n")
    L.append("## What this does not model\n")
    L.append("- Data loading (measured separately: benchmarks/loader.py), evaluation, checkpoint writes.\n"
             "- Compute efficiency at small per-GPU batches (1,024 GPUs leave 11 images per GPU per step), and the "
             "optimizer step shrinking to 1/N of the parameters under ZeRO.\n"
             "- NCCL's tree / NVLS algorithms and SHARP in-network reduction (lower latency or fewer bytes at "
             "large N), network contention from other jobs, stragglers.\n"
             f"- The hardware constants are vendor link rates x {S.H100_NVLINK_IB4.efficiency:.0%}; "
             f"`pixart_ds.bench.scaling.INTERCONNECTS` holds them.\n")
    return "\n".join(L)


def plot(rep: dict, path: str) -> None:
    import matplotlib  # heavy: only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only for the plot

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, p in rep["projection"].items():
        name = p["interconnect"]["gpu"]
        for overlap, style in ((False, "-"), (True, "--")):
            rows = [r for r in p["rows"] if r["overlap"] == overlap]
            n = [r["gpus"] for r in rows]
            label = f"{name}{', overlapped' if overlap else ''}"
            axes[0].plot(n, [r["efficiency"] * 100 for r in rows], style, marker="o", label=label)
            axes[1].plot(n, [r["gpu_days"] for r in rows], style, marker="o", label=label)
    axes[0].set_ylabel("scaling efficiency (compute / step), %")
    axes[1].set_ylabel("GPU-days, stage 2 (projected)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(GPU_COUNTS, [str(n) for n in GPU_COUNTS])
        ax.set_xlabel("GPUs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    fig.suptitle(f"{rep['recipe_name']}: ZeRO-2 projection from {rep['speed']['device']} "
                 f"(commit {rep['commit']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def default_record() -> str | None:
    """The newest GPU record in benchmarks/results that carries a single-device speed (throughput records of the
    stage's model first, then the bare forward+backward of gpu_attention)."""
    res = os.path.join(REPO, "benchmarks", "results")
    for pattern in ("stage2_sam256_h*.json", "stage2_sam256_a*.json", "gpu_mfu*_h*.json", "gpu_attention_h*.json"):
        found = sorted(glob.glob(os.path.join(res, pattern)))
        if found:
            return found[-1]
    return None


def report_cmd(a) -> int:
    try:
        cfg = C.load(a.recipe)
    except (C.ConfigError, FileNotFoundError) as e:
        print(f"scaling report: error: {e}", file=sys.stderr)
        return 2
    record = a.record or default_record()
    if not record or not os.path.isfile(record):
        print(f"scaling report: error: --record {record}: no single-device record (benchmarks/results has none)",
              file=sys.stderr)
        return 2
    if not os.path.isfile(a.comm):
        print(f"scaling report: error: --comm {a.comm}: no such file (run `scaling.py comm` under srun first)",
              file=sys.stderr)
        return 2
    with open(record) as f:
        rec = json.load(f)
    with open(a.comm) as f:
        comm_rec = json.load(f)
    try:
        speed = S.device_speed(rec, os.path.relpath(record, REPO))
    except (KeyError, ValueError) as e:
        print(f"scaling report: error: {record}: {e}", file=sys.stderr)
        return 2
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(cfg).parameters())
    recompute = train_flops_per_image(cfg, hardware=True) / train_flops_per_image(cfg)
    name = os.path.splitext(os.path.basename(a.recipe))[0]
    rows = validate(comm_rec)
    def verdict(ops):
        xs = [r["ratio"] for r in rows if r.get("ratio") is not None and r["nbytes"] >= (a.min_mib << 20)
              and r["op"] in ops]
        ok = bool(xs) and all(1 / VALIDATION_FACTOR <= x <= VALIDATION_FACTOR for x in xs)
        return {"within": ok, "min_ratio": min(xs) if xs else float("nan"),
                "max_ratio": max(xs) if xs else float("nan")}

    # Issue 15's bar is the all-reduce (DeepSpeed's gradient path); the other collectives are reported beside it.
    all_reduce, every = verdict({"all_reduce"}), verdict({"all_reduce", "all_gather", "reduce_scatter"})
    small = [r["ratio"] for r in rows if r.get("ratio") is not None and r["nbytes"] < (a.min_mib << 20)]
    comment = (f"Below {a.min_mib} MiB (ratios {min(small):.2f} to {max(small):.2f}) per-message overheads the "
               f"alpha-beta model leaves out weigh more on this CPU network." if small else "")
    paper = PAPER_BY_RECIPE.get(name)
    rep = {
        "schema": "pixart_ds.scaling/1", "timestamp": report.now().isoformat(), "commit": git_revision(),
        "recipe": os.path.relpath(a.recipe, REPO), "recipe_name": name, "steps": cfg.train.total_steps,
        "global_batch": cfg.train.global_batch_size, "micro_batch": cfg.train.micro_batch_size,
        "grad_checkpointing": cfg.model.grad_checkpointing, "params": params, "recompute_factor": recompute,
        "speed": speed.__dict__, "projection": project(speed, cfg, params, recompute),
        "paper_v100_days": paper.v100_days if paper else None,
        "paper_implied_rate": paper.implied_images_per_s_per_gpu if paper else float("nan"),
        "validation": {"comm": comm_rec, "rows": rows, "factor": VALIDATION_FACTOR, "min_mib": a.min_mib,
                       "all_reduce": all_reduce, "every": every, "comment": comment},
    }
    # Both machines in the name: the single-device record's card and the CPU machine the network was measured on.
    slug = f"{(rec.get('hardware') or {}).get('slug') or 'unknown'}-cpu-{comm_rec.get('cpu_count', 0)}core"
    base = report.stem(f"scaling_{name}", slug)
    md = render(rep)
    out_dirs = a.out or [report.DEFAULT_RESULTS]
    with tempfile.TemporaryDirectory() as td:
        png = os.path.join(td, f"{base}.png")
        plot(rep, png)
        with open(png, "rb") as f:
            blob = f.read()
    md += f"\n![scaling]({base}.png)\n"
    written = report.write_outputs(out_dirs, base, markdown=md, data=rep, files={f"{base}.png": blob})
    print("\n".join(written))
    for name_, v in (("all-reduce", all_reduce), ("every collective", every)):
        print(f"validation, {name_} >= {a.min_mib} MiB: measured / model {v['min_ratio']:.2f} to "
              f"{v['max_ratio']:.2f}: {'within' if v['within'] else 'NOT within'} {VALIDATION_FACTOR:g}x")
    return 0 if all_reduce["within"] else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("comm", help="measure the link and gloo collectives (2 ranks, one per host; under srun)")
    c.add_argument("--out", required=True, help="JSON to write (rank 0)")
    c.add_argument("--link-mib", type=int, default=128, help="bytes per link-bandwidth round, MiB")
    c.add_argument("--local-mib", type=int, default=64, help="tensor size for the local sum/copy rates, MiB")
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--note", default="", help="what the two hosts are (goes into the record)")
    r = sub.add_parser("report", help="projections + validation -> benchmarks/results")
    r.add_argument("--comm", required=True, help="the JSON `comm` wrote")
    r.add_argument("--record", default=None, help="single-device record (default: newest GPU record in results/)")
    r.add_argument("--recipe", default=os.path.join(REPO, "recipes", "stage2_sam256.yaml"))
    r.add_argument("--min-mib", type=int, default=8, help="smallest message size the validation judges")
    r.add_argument("--out", action="append", default=None, help="output folder (repeatable)")
    a = p.parse_args(argv)
    return comm(a) if a.cmd == "comm" else report_cmd(a)


if __name__ == "__main__":
    sys.exit(main())
