#!/usr/bin/env python
"""The adaLN ablation (paper §2.3, Fig. 7): DiT's per-block adaLN vs PixArt's adaLN-single.

    python benchmarks/ablation_adaln.py                    # parameters + memory/throughput + a short training of both
    python benchmarks/ablation_adaln.py --skip-training    # parameters + memory/throughput only (gpu_check.sh)

Writes benchmarks/results/ablation_adaln_<hardware>_<yyyymm>.{md,json,png} (+ the two throughput reports, tagged
`-throughput`).

1. Parameters: trainable parameters of PixArt-XL/2 with each variant (pixart_ds.model.pixart.model_info, built on
   the meta device), against the paper's 833M / 611M.
2. Memory and throughput at the same batch: benchmarks/throughput.py on recipes/ablation_adaln.yaml and
   recipes/ablation_adaln_single.yaml (identical but for model.adaln): PixArt-XL/2 at the recipe's per-GPU batch on
   a GPU; on a CPU throughput.py's smaller defaults (the report says which).
3. A short training of both, same seed, data, steps and hyperparameters, through the trainer (`pixart-ds train`,
   one process) on the embedded shapes dataset (pixart_ds.data.synthetic -> raw MDS -> feature MDS with a VAE and a
   small T5): loss curves from each run's metrics.jsonl, then images sampled from each run's EMA weights for
   captions seen in training and for held-out (shape, colour, background) combinations, scored by the dataset's
   pixel judge (fraction whose shape and colours match the prompt). The alignment score is meaningful only with a
   VAE fitted to the dataset (pixart_ds/data/assets/synthetic_vae, or --vae); with a random VAE the report says
   "not meaningful" instead of a number.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import yaml

from pixart_ds import config as C
from pixart_ds import hardware as H
from pixart_ds.bench import report
from pixart_ds.bench.report import gib, hardware_md, versions_md
from pixart_ds.data import synthetic
from pixart_ds.diffusion.sampling import generate, to_pil
from pixart_ds.model.encoders import load_text_encoder, load_vae, make_tiny_t5
from pixart_ds.model.pixart import build_model, model_info
from pixart_ds.testing import make_tiny_vae
from pixart_ds.train.metrics import read_metrics
from pixart_ds.train.weights import build_sampling_model, resolve_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PAPER_PARAMS_M = {"block": 833, "single": 611}
PAPER_MEMORY_GB = {"block": 29, "single": 23}
VARIANTS = (("block", "ablation_adaln"), ("single", "ablation_adaln_single"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-training", action="store_true", help="parts 1 and 2 only")
    p.add_argument("--skip-throughput", action="store_true", help="parts 1 and 3 only")
    p.add_argument("--throughput-from", default=None, metavar="DIR",
                   help="reuse the <recipe>-throughput_*.json reports in DIR instead of measuring again")
    p.add_argument("--throughput-arg", action="append", default=[],
                   help="extra argument for benchmarks/throughput.py (repeatable), e.g. --throughput-arg=--steps=3")
    # Part 3: the training run. Model, optimizer and data sizes come from recipes/demo.yaml (the demo's stage 2,
    # sized for minutes on a CPU), trained from scratch (no init_from); the flags below override them.
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default: the demo's)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the demo's)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--samples", type=int, default=2048, help="images in the embedded training set")
    p.add_argument("--resolution", type=int, default=None, help="px (default: the demo's / the VAE's)")
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--text-tokens", type=int, default=None, help="caption tokens (default: the demo's)")
    p.add_argument("--eval-prompts", type=int, default=64, help="prompts sampled per variant (half held out)")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--vae", default=None, help="a VAE folder (default: the fitted embedded-dataset VAE if shipped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed afterwards)")
    p.add_argument("--out", action="append", default=None, help="results folder (repeatable)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------------------
# 1. Parameters
# ------------------------------------------------------------------------------------------------------------------
def params_part() -> dict:
    out = {}
    for adaln, _ in VARIANTS:
        info = model_info("PixArt-XL/2", adaln=adaln, condition="text")
        out[adaln] = {"total": info["total"], "components": info["components"], "paper_m": PAPER_PARAMS_M[adaln]}
    return out


# ------------------------------------------------------------------------------------------------------------------
# 2. Memory and throughput at the same batch
# ------------------------------------------------------------------------------------------------------------------
def throughput_part(a, outs: list[str]) -> dict:
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for adaln, recipe in VARIANTS:
            cmd = [sys.executable, os.path.join(REPO, "benchmarks", "throughput.py"),
                   os.path.join(REPO, "recipes", f"{recipe}.yaml"), "--tag", "throughput", "--no-progress",
                   "--out", tmp, *a.throughput_arg]
            for o in outs:
                cmd += ["--out", o]
            print("ablation: " + " ".join(cmd[1:]), flush=True)
            p = subprocess.run(cmd)
            found = sorted(glob.glob(os.path.join(tmp, f"{recipe}-throughput_*.json")))
            if p.returncode != 0 or not found:
                res[adaln] = {"error": f"throughput.py exited with {p.returncode}"}
                continue
            with open(found[-1]) as f:
                res[adaln] = json.load(f)
    return res


# ------------------------------------------------------------------------------------------------------------------
# 3. Short training of both variants
# ------------------------------------------------------------------------------------------------------------------
def _fitted_vae() -> str | None:
    d = os.path.join(REPO, "pixart_ds", "data", "assets", "synthetic_vae")
    return d if os.path.isfile(os.path.join(d, "config.json")) else None


def _vae_info(path: str) -> tuple[float, int | None]:
    """(scaling_factor, sample_size) from a diffusers AutoencoderKL config.json."""
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    return float(c.get("scaling_factor", 0.18215)), c.get("sample_size")


def _run(cmd: list[str], what: str) -> None:
    print(f"ablation: {what}: {' '.join(cmd)}", flush=True)
    p = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get(
        "PYTHONPATH", "")))
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed (exit code {p.returncode})")


DEMO_RECIPE = os.path.join(REPO, "recipes", "demo.yaml")


def _demo_recipe() -> dict | None:
    if not os.path.isfile(DEMO_RECIPE):
        return None
    with open(DEMO_RECIPE) as f:
        return yaml.safe_load(f)


def _base_recipe(a, t5, t5_width, vae, vae_scale, feat, res, gpu) -> dict:
    """The training recipe both variants share: the demo's stage 2 (recipes/demo.yaml) from scratch, or built-in
    small defaults without it; command-line flags override either."""
    demo = _demo_recipe()
    if demo:
        model = {k: v for k, v in demo["model"].items() if k not in ("adaln", "init_from")}
        train = {k: v for k, v in demo["train"].items() if k not in ("init_from", "init_reparam_t")}
    else:
        model = {"preset": "PixArt-S/2", "depth": 4, "hidden_size": 192, "num_heads": 3, "max_text_tokens": 120,
                 "attention": "auto"}
        train = {"total_steps": 300, "global_batch_size": 32, "micro_batch_size": 32, "lr": 3e-4, "warmup_steps": 30,
                 "weight_decay": 0.0, "grad_clip": 1.0, "precision": "fp32", "ema_decay": 0.99, "seed": 0,
                 "torch_adam": True}
    model.update(condition="text", caption_channels=t5_width, grad_checkpointing=False)
    for key, val in (("depth", a.depth), ("hidden_size", a.hidden), ("num_heads", a.heads),
                     ("max_text_tokens", a.text_tokens)):
        if val is not None:
            model[key] = val
    for key, val in (("total_steps", a.steps), ("lr", a.lr)):
        if val is not None:
            train[key] = val
    if a.batch is not None:
        train["global_batch_size"] = a.batch
        train["micro_batch_size"] = min(a.batch, train.get("micro_batch_size", a.batch))
    train.update(seed=a.seed, resume="none", torch_adam=True, precision="bf16" if gpu else train.get("precision",
                                                                                                      "fp32"))
    train["warmup_steps"] = min(train.get("warmup_steps", 0), max(0, train["total_steps"] // 10))
    return {
        "name": "ablation", "stage": "ablation", "model": model,
        "encoders": {"text_encoder": t5, "vae": vae, "vae_scale": vae_scale, "text_dtype": "fp32"},
        "data": {"sources": [{"local": feat}], "resolution": res, "caption_dropout": 0.1, "num_workers": 0,
                 "num_canonical_nodes": 1},
        "train": train,
        "checkpoint": {"every_steps": train["total_steps"], "keep_last": 1},
        "log": {"every_steps": 1, "tensorboard": False, "progress_bar": False},
        "sample": (demo or {}).get("sample", {}),
    }


def training_part(a, work: str) -> dict:
    gpu = torch.cuda.is_available()
    vae = a.vae or _fitted_vae()
    fitted = vae is not None
    vae_kind = "given (--vae)" if a.vae else ("fitted to the dataset (shipped asset)" if fitted else
                                               "random (no fitted VAE available)")
    if vae is None:
        vae = make_tiny_vae(os.path.join(work, "tiny_vae"))
    vae_scale, vae_size = _vae_info(vae)
    demo = _demo_recipe()
    res = a.resolution or (demo["data"]["resolution"] if demo else (int(vae_size) if fitted and vae_size else 64))
    t5 = make_tiny_t5(os.path.join(work, "tiny_t5"))
    with open(os.path.join(t5, "config.json")) as f:
        t5_width = int(json.load(f)["d_model"])

    raw, feat = os.path.join(work, "raw"), os.path.join(work, "features")
    if not os.path.isfile(os.path.join(feat, "index.json")):
        _run([sys.executable, "-m", "pixart_ds.cli", "data", "synthetic", "--out", raw, "--num-samples",
              str(a.samples), "--resolution", str(res), "--seed", str(a.seed)], "embedded dataset")
        _run([sys.executable, "-m", "pixart_ds.cli", "features", "--in", raw, "--out", feat, "--vae", vae,
              "--text-encoder", t5, "--resolution", str(res), "--batch-size", "64"], "features")

    base = _base_recipe(a, t5, t5_width, vae, vae_scale, feat, res, gpu)
    runs = {}
    for adaln, _ in VARIANTS:
        d = {**base, "model": {**base["model"], "adaln": adaln}, "run_dir": os.path.join(work, f"run_{adaln}"),
             "name": f"ablation_{adaln}"}
        cfg = C.from_dict(d, f"ablation ({adaln})")
        path = os.path.join(work, f"recipe_{adaln}.yaml")
        C.dump(cfg, path)
        shutil.rmtree(d["run_dir"], ignore_errors=True)  # a fresh run every time (resume: none)
        t0 = time.time()
        _run([sys.executable, "-m", "pixart_ds.cli", "train", path], f"train adaln={adaln}")
        runs[adaln] = {"recipe": C.to_dict(cfg), "wall_s": time.time() - t0, "run_dir": d["run_dir"]}

    for adaln, r in runs.items():
        steps, _ = read_metrics(os.path.join(r["run_dir"], "metrics.jsonl"))
        r["loss"] = [[s, steps[s]["loss"]] for s in sorted(steps) if "loss" in steps[s]]
        r["mse"] = [[s, steps[s]["mse"]] for s in sorted(steps) if "mse" in steps[s]]
        tail = [v for _, v in r["loss"][-max(1, len(r["loss"]) // 10):]]
        r["final_loss_mean_last10pct"] = sum(tail) / len(tail)

    # Alignment: sample each run's EMA weights on the same prompts and seeds, judge the pixels.
    n_held = a.eval_prompts // 2
    seen = [synthetic.caption(synthetic.attributes(i, a.seed)) for i in range(a.eval_prompts - n_held)]
    held = synthetic.held_out_prompts(n_held, seed=a.seed)
    for adaln, r in runs.items():
        r["alignment"] = _alignment(r["run_dir"], seen, held, vae, t5, res, vae_scale, a) if fitted else None
    return {"runs": runs, "fitted_vae": fitted, "vae": vae, "vae_kind": vae_kind, "resolution": res, "samples": a.samples,
            "t5_width": t5_width, "prompts": {"seen": seen, "held_out": held}}


def _alignment(run_dir, seen, held, vae_path, t5_path, res, vae_scale, a) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ck = resolve_checkpoint(run_dir, use_ema=True)
    model = build_sampling_model(ck, device=device)
    tok, te = load_text_encoder(t5_path, dtype="fp32", device=device)
    vae = load_vae(vae_path, device=device)
    out = {}
    for name, prompts in (("seen", seen), ("held_out", held)):
        r = generate(model, ck.model_cfg, prompts, vae=vae, tokenizer=tok, text_encoder=te, schedule=ck.schedule,
                     steps=a.sample_steps, guidance=4.5, seeds=list(range(len(prompts))), height=res, width=res,
                     device=device, batch_size=16, vae_scale=vae_scale)
        verdicts = [synthetic.judge(img, p) for img, p in zip(to_pil(r.images), prompts)]
        out[name] = {"n": len(prompts), "ok": sum(v["ok"] for v in verdicts) / len(prompts),
                     "shape": sum(v["shape"] for v in verdicts) / len(prompts),
                     "color": sum(v["color"] for v in verdicts) / len(prompts),
                     "background": sum(v["background"] for v in verdicts) / len(prompts)}
    return out


# ------------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------------
def plot(rec: dict, path: str) -> None:
    import matplotlib  # heavy: only the report plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy (see above); after use("Agg"), so no display is needed

    tr = rec.get("training") or {}
    runs = tr.get("runs") or {}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    for adaln, r in runs.items():
        xs = [s for s, _ in r["loss"]]
        ys = [v for _, v in r["loss"]]
        ax.plot(xs, ys, alpha=0.25, color="C0" if adaln == "block" else "C1")
        sm, acc = [], None
        for v in ys:  # exponential smoothing (0.9) for readability; raw curve beneath
            acc = v if acc is None else 0.9 * acc + 0.1 * v
            sm.append(acc)
        ax.plot(xs, sm, color="C0" if adaln == "block" else "C1",
                label=f"adaLN{'-single' if adaln == 'single' else ' (per block)'}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mse + vb)")
    ax.set_yscale("log")
    ax.set_title("loss, same seed / data / steps")
    if runs:
        ax.legend()
    ax = axes[1]
    p = rec["params"]
    names = ["adaLN (block)", "adaLN-single"]
    ours = [p["block"]["total"] / 1e6, p["single"]["total"] / 1e6]
    paper = [PAPER_PARAMS_M["block"], PAPER_PARAMS_M["single"]]
    x = range(2)
    ax.bar([i - 0.2 for i in x], ours, 0.4, label="ours (trainable)")
    ax.bar([i + 0.2 for i in x], paper, 0.4, label="paper", color="#9e9e9e")
    for i in x:
        ax.text(i - 0.2, ours[i], f"{ours[i]:.0f}M", ha="center", va="bottom", fontsize=8)
        ax.text(i + 0.2, paper[i], f"{paper[i]}M", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("parameters (M), PixArt-XL/2")
    ax.set_title("parameters")
    ax.legend(fontsize=8)
    fig.suptitle(f"adaLN vs adaLN-single — {rec['hardware']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(rec: dict, base: str) -> str:
    p, hw = rec["params"], rec["hardware"]
    pb, ps = p["block"]["total"], p["single"]["total"]
    lines = [
        f"# adaLN vs adaLN-single (paper §2.3) on {hw['name']}",
        "",
        f"Measured {rec['timestamp'][:19]} UTC. ![adaLN ablation]({base}.png)",
        "",
        "## 1. Parameters (PixArt-XL/2, trainable)",
        "",
        "| | adaLN (per block, DiT) | adaLN-single (PixArt) | change |",
        "|---|---|---|---|",
        f"| ours | {pb:,} | {ps:,} | {100 * (ps - pb) / pb:+.1f}% |",
        f"| paper | {PAPER_PARAMS_M['block']}M | {PAPER_PARAMS_M['single']}M | "
        f"{100 * (PAPER_PARAMS_M['single'] - PAPER_PARAMS_M['block']) / PAPER_PARAMS_M['block']:+.1f}% |",
        "",
        "Ours counts trainable parameters (pixart_ds.model.pixart.model_info, which explains the gap to the paper's "
        "833M: the official log also counted a frozen 1024-px positional table).",
    ]
    tp = rec.get("throughput")
    if tp:
        lines += ["", "## 2. Memory and throughput at the same batch", ""]
        ok = all("results" in tp.get(k, {}) for k in ("block", "single"))
        if ok:
            rb, rs = tp["block"], tp["single"]
            mb = rb["results"]["memory"].get("peak_allocated_bytes", rb["results"]["memory"].get("peak_rss_bytes"))
            ms = rs["results"]["memory"].get("peak_allocated_bytes", rs["results"]["memory"].get("peak_rss_bytes"))
            ib, is_ = rb["results"]["images_per_s_per_device"], rs["results"]["images_per_s_per_device"]
            m = rb["config"]["model"]
            mem_kind = "CUDA peak allocated" if "peak_allocated_bytes" in rb["results"]["memory"] else "process peak RSS"
            lines += [
                f"{m['preset']} (depth {m['depth']}, hidden {m['hidden_size']}) at {rb['config']['data']['resolution']}"
                f" px, batch {rb['measure']['micro_batch_size']}, {rb['measure']['precision']}, grad checkpointing "
                f"{'on' if rb['measure']['grad_checkpointing'] else 'off'}, measured by benchmarks/throughput.py "
                f"(reports `{os.path.basename(rb.get('report') or '')}`, `{os.path.basename(rs.get('report') or '')}`). "
                + (" ".join(rb.get("notes", [])[:1]) or "The recipes as written."),
                "",
                "| | adaLN (per block) | adaLN-single | change | paper |",
                "|---|---|---|---|---|",
                f"| parameters at this size | {rb['results']['parameters']:,} | {rs['results']['parameters']:,} | "
                f"{100 * (rs['results']['parameters'] - rb['results']['parameters']) / rb['results']['parameters']:+.1f}%"
                f" | -26% (XL/2) |",
                f"| peak memory ({mem_kind}) | {gib(mb)} | {gib(ms)} | {100 * (ms - mb) / mb:+.1f}% | 29 GB -> 23 GB "
                f"(-21%) |",
                f"| images/s per device | {ib:.2f} | {is_:.2f} | {100 * (is_ - ib) / ib:+.1f}% | — |",
                f"| step time, median | {rb['results']['step_time_s']['median']:.3f} s | "
                f"{rs['results']['step_time_s']['median']:.3f} s | | |",
            ]
        else:
            lines += [f"Not measured: {tp}"]
    tr = rec.get("training")
    if tr:
        runs = tr["runs"]
        r0 = next(iter(runs.values()))["recipe"]
        m, t = r0["model"], r0["train"]
        lines += [
            "", "## 3. Short training, same seed, data and steps", "",
            f"The trainer (`pixart-ds train`, DeepSpeed ZeRO-2, one process) on the embedded shapes dataset: "
            f"{tr['samples']} images at {tr['resolution']} px -> feature MDS (VAE: {tr['vae_kind']}; T5: a small "
            f"random T5, width {tr['t5_width']}). Settings of recipes/demo.yaml (the demo's stage 2) but from scratch "
            f"(no init_from). Model {m['preset']} resized to depth {m['depth']}, hidden "
            f"{m['hidden_size']}, {m['num_heads']} heads; {t['total_steps']} steps x batch {t['global_batch_size']}, "
            f"lr {t['lr']}, warm-up {t['warmup_steps']}, {t['precision']}, EMA {t['ema_decay']}, seed {t['seed']}; "
            "the two runs differ only in model.adaln.",
            "",
            "| | adaLN (per block) | adaLN-single |",
            "|---|---|---|",
            f"| trainable parameters | {runs['block'].get('params', '—')} | {runs['single'].get('params', '—')} |",
            f"| loss, first step | {runs['block']['loss'][0][1]:.4f} | {runs['single']['loss'][0][1]:.4f} |",
            f"| loss, mean of the last 10% of steps | {runs['block']['final_loss_mean_last10pct']:.4f} | "
            f"{runs['single']['final_loss_mean_last10pct']:.4f} |",
            f"| wall time | {runs['block']['wall_s']:.0f} s | {runs['single']['wall_s']:.0f} s |",
        ]
        if tr["fitted_vae"]:
            for split in ("seen", "held_out"):
                ab, as_ = runs["block"]["alignment"][split], runs["single"]["alignment"][split]
                lines.append(f"| alignment, {split.replace('_', '-')} prompts (n={ab['n']}; shape / colour / "
                             f"background) | **{ab['ok']:.2f}** ({ab['shape']:.2f} / {ab['color']:.2f} / "
                             f"{ab['background']:.2f}) | **{as_['ok']:.2f}** ({as_['shape']:.2f} / {as_['color']:.2f} / "
                             f"{as_['background']:.2f}) |")
        else:
            lines.append("| alignment | not meaningful (random VAE) | not meaningful (random VAE) |")
        if tr["fitted_vae"] and all(runs[v]["alignment"][k]["ok"] < 0.05 for v in runs for k in ("seen", "held_out")):
            lines += ["", f"Neither variant aligns text and image after {t['total_steps']} steps from scratch (the "
                      "demo reaches its score by starting stage 2 from a class-conditional stage 1, paper §2.3); at "
                      "this length the loss curves are the comparison."]
        lines += ["", "Alignment = fraction of sampled images (DPM-Solver++, "
                  f"{rec['args']['sample_steps']} steps, guidance 4.5, EMA weights, seeds 0..n-1 for both) whose shape, "
                  "object colour and background colour match the prompt, by pixart_ds.data.synthetic.judge. "
                  "Held-out prompts combine a shape, colour and background never seen together in training."]
    elif rec.get("training_skipped"):
        lines += ["", "## 3. Short training", "", rec["training_skipped"]]
    lines += ["", "## Hardware", "", hardware_md(hw), "", "## Versions", "", versions_md(rec["versions"])]
    return "\n".join(lines) + "\n"


def _trainable(recipe: dict) -> int:
    """Trainable parameters of a recipe's model (built on the meta device)."""
    with torch.device("meta"):
        m = build_model(C.from_dict(recipe, "ablation recipe"))
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def main(argv=None) -> int:
    a = parse_args(argv)

    outs = a.out or [report.DEFAULT_RESULTS]
    hw = H.device_record()
    rec = {"schema": "pixart_ds.ablation_adaln/1", "timestamp": report.now().isoformat(), "hardware": hw,
           "versions": H.versions(), "args": vars(a), "params": params_part()}
    if a.throughput_from:
        rec["throughput"] = {}
        for adaln, recipe in VARIANTS:
            found = sorted(glob.glob(os.path.join(a.throughput_from, f"{recipe}-throughput_{hw['slug']}_*.json")))
            if not found:
                print(f"ablation: error: no {recipe}-throughput_{hw['slug']}_*.json in {a.throughput_from}",
                      file=sys.stderr)
                return 2
            with open(found[-1]) as f:
                rec["throughput"][adaln] = json.load(f)
    elif not a.skip_throughput:
        rec["throughput"] = throughput_part(a, outs)
    if a.skip_training:
        rec["training_skipped"] = "Skipped (--skip-training)."
    else:
        work = a.work or tempfile.mkdtemp(prefix="pixart_ablation_")
        try:
            rec["training"] = training_part(a, work)
            for r in rec["training"]["runs"].values():
                r["params"] = f"{_trainable(r['recipe']):,}"
        finally:
            if a.work is None:
                shutil.rmtree(work, ignore_errors=True)
    base = report.stem("ablation_adaln", hw["slug"])
    with tempfile.TemporaryDirectory() as d:
        png = os.path.join(d, "a.png")
        plot(rec, png)
        with open(png, "rb") as f:
            blob = f.read()
    report.write_outputs(outs, base, render(rec, base), rec, {f"{base}.png": blob})
    print(f"ablation: -> {os.path.join(outs[0], base + '.md')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
