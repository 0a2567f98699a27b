#!/usr/bin/env python
"""The paper's two ablations (§2.3, Fig. 6), trained on the embedded dataset and judged by `pixart_ds.eval`.

    python benchmarks/ablations.py --work runs/ablation                 # everything: setup, train, score, report
    python benchmarks/ablations.py --work runs/ablation --phase train   # one phase (setup | train | score | report)

The demo's setup (recipes/demo_stage1.yaml, recipes/demo.yaml; `pixart-ds demo` runs the same data, encoders,
features and stages) with ONE shared stage-1 checkpoint, then three stage-2 arms per seed:

- `single`  adaLN-single, re-parameterized from stage 1 at t = 500 (train.init_from, paper §2.3): the demo's stage 2;
- `block`   per-block adaLN (DiT's), text-conditional, initialised from the same stage-1 model: every tensor that
            exists in both is copied, the caption projection and cross-attention start from the official init
            (train.init_from with model.adaln=block);
- `scratch` adaLN-single from scratch ("w/o re-param"), trained for the stage-2 steps plus stage 1's budget in
            images (stage 1's steps x its global batch / stage 2's global batch), as the paper did.

Pairs: adaLN (`block`) vs adaLN-single (`single`); re-param (`single`) vs w/o re-param (`scratch`). Every arm keeps a
checkpoint every --ckpt-every steps; `score` evaluates the EMA weights of each (pixart_ds.eval.evaluate_model: FID
and KID against the stage-2 training images, and the embedded dataset's pixel-judge alignment on held-out and
in-distribution prompts), which gives the metric over training. `report` writes
benchmarks/results/ablation_{adaln,reparam}-judged_<hardware>_<yyyymm>.{md,json,png} + sample grids.

Each phase resumes: a finished run, score or setup step is reused; an interrupted training run continues from its
last checkpoint (train.resume: auto). The trainings' scores do not depend on the machine's load, so they may run
niced beside other work; step times are measured separately (`--phase speed`, benchmarks/throughput.py on the two
stage-2 architectures, side by side).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from pixart_ds import config as C
from pixart_ds import hardware as H
from pixart_ds.bench import report as R
from pixart_ds.commands import demo as D
from pixart_ds.data import convert as dconv
from pixart_ds.data import synthetic
from pixart_ds.diffusion.schedule import Schedule
from pixart_ds.eval import metrics as M
from pixart_ds.eval.inception import save_random_inception
from pixart_ds.eval.run import Generator, SampleSettings, ScoreSettings, build_scorer, evaluate_model
from pixart_ds.model.encoders import load_text_encoder, load_vae, make_tiny_t5
from pixart_ds.model.pixart import build_model, model_info
from pixart_ds.model.weights import build, load_state_dict_strict
from pixart_ds.train import checkpoint as ck
from pixart_ds.train.metrics import read_metrics
from pixart_ds.train.weights import load_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ARMS = ("single", "block", "scratch")
PAIRS = {"adaln": ("block", "single"), "reparam": ("single", "scratch")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=os.path.join(REPO, "runs", "ablation"), help="working folder (runs, data)")
    p.add_argument("--phase", action="append", choices=["setup", "train", "score", "speed", "report"],
                   help="phases to run (repeatable; default: all in order)")
    p.add_argument("--seeds", default="0,1,2", help="train.seed of each arm's runs")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--ckpt-every", type=int, default=400, help="stage-2 checkpoint (and curve point) interval, steps")
    p.add_argument("--score-images", type=int, default=64,
                   help="images per checkpoint evaluation (half held-out, half in-distribution prompts)")
    p.add_argument("--final-images", type=int, default=128, help="images for each run's last checkpoint")
    p.add_argument("--reference-images", type=int, default=512,
                   help="reference images: the first N of stage 2's training set")
    p.add_argument("--score-every", type=int, default=1200, help="evaluate checkpoints at multiples of this (+ last)")
    p.add_argument("--inception-seed", type=int, default=0, help="seed of the randomly initialised Inception")
    p.add_argument("--out", action="append", default=None, help="results folder (repeatable)")
    p.add_argument("--measure-speed", action=argparse.BooleanOptionalAction, default=True,
                   help="report: include the side-by-side step-time measurement (speed phase)")
    p.add_argument("--wait", action="store_true", help="score: keep scoring arms as their training finishes")
    p.add_argument("--small", action="store_true", help="the demo's --small sizes (a plumbing check, minutes)")
    return p.parse_args(argv)


def _say(msg: str) -> None:
    print(f"[ablations {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _commit() -> str:
    """The checkout's commit; a source snapshot (git archive) carries it in a COMMIT file."""
    snap = os.path.join(REPO, "COMMIT")
    if os.path.isfile(snap):
        return open(snap).read().strip() + " (snapshot)"
    try:
        c = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return c + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


# ------------------------------------------------------------------------------------------------------------------
# Paths and recipes
# ------------------------------------------------------------------------------------------------------------------
def paths(work: str) -> dict:
    w = os.path.abspath(work)
    return {"work": w, "raw_class": f"{w}/data/raw_class", "raw_text": f"{w}/data/raw_text",
            "features_class": f"{w}/data/features_class", "features_text": f"{w}/data/features_text",
            "t5": f"{w}/encoders/t5", "inception": f"{w}/encoders/inception_random.pt", "stage1": f"{w}/stage1",
            "logs": f"{w}/logs", "scores": f"{w}/scores", "setup": f"{w}/setup.json"}


def run_dir(p: dict, arm: str, seed: int) -> str:
    return os.path.join(p["work"], f"{arm}_s{seed}")


def stage_budget(small: bool) -> dict:
    """Steps and global batches of the two demo stages (after --small's overrides), and the scratch arm's steps."""

    s1 = C.load(D.STAGE1_RECIPE, D.SMALL_OVERRIDES["stage1"] if small else [])
    s2 = C.load(D.STAGE2_RECIPE, D.SMALL_OVERRIDES["stage2"] if small else [])
    s1_images = s1.train.total_steps * s1.train.global_batch_size
    extra = -(-s1_images // s2.train.global_batch_size)  # stage 1's images at stage 2's batch, rounded up
    return {"stage1_steps": s1.train.total_steps, "stage1_batch": s1.train.global_batch_size,
            "stage1_images": s1_images, "stage2_steps": s2.train.total_steps,
            "stage2_batch": s2.train.global_batch_size, "scratch_steps": s2.train.total_steps + extra}


# ------------------------------------------------------------------------------------------------------------------
# setup: data, encoders, features (the demo's phases 1-3), a random Inception, stage 1
# ------------------------------------------------------------------------------------------------------------------
def setup(a, p: dict) -> dict:

    done = _read_json(p["setup"])
    if done and done.get("complete"):
        return done
    sizes = D.SMALL if a.small else D.FULL
    s1 = C.load(D.STAGE1_RECIPE)
    res = s1.data.resolution
    os.makedirs(p["work"], exist_ok=True)
    for key, n, seed in (("raw_class", sizes["class_images"], D.CLASS_SEED),
                         ("raw_text", sizes["text_images"], D.DATA_SEED)):
        dconv.synthetic(num_samples=n, resolution=res, seed=seed, out=p[key], progress=True)
    if not os.path.isfile(os.path.join(p["t5"], "config.json")):
        make_tiny_t5(p["t5"] + ".tmp", **D.DEMO_T5)
        os.replace(p["t5"] + ".tmp", p["t5"])
    if not os.path.isfile(p["inception"]):
        save_random_inception(p["inception"], seed=a.inception_seed)
    vae = D.ASSET_VAE
    with open(os.path.join(vae, "config.json")) as f:
        vae_scale = float(json.load(f)["scaling_factor"])
    for key, raw, extra in (("features_class", p["raw_class"], ["--class-labels"]),
                            ("features_text", p["raw_text"], ["--text-encoder", p["t5"]])):
        if os.path.isfile(os.path.join(p[key], "index.json")):
            continue
        rc = D._launch(key, ["features", "--in", raw, "--out", p[key], "--vae", vae, "--resolution", str(res),
                             "--batch-size", "64", *extra], a.ranks, os.path.join(p["logs"], f"{key}.log"))
        if rc:
            raise SystemExit(f"ablations: {key} failed ({rc})")
    common = [f"encoders.vae={vae}", f"encoders.vae_scale={vae_scale!r}", "log.progress_bar=false"]
    rc = _train(a, p, "stage1", D.STAGE1_RECIPE, [f"run_dir={p['stage1']}",
                                                  f"data.sources=[{{local: {p['features_class']}}}]", *common,
                                                  *(D.SMALL_OVERRIDES["stage1"] if a.small else [])])
    if rc:
        raise SystemExit(f"ablations: stage 1 failed ({rc})")
    rec = {"complete": True, "commit": _commit(), "vae": vae, "vae_scale": vae_scale, "resolution": res,
           "sizes": sizes, "budget": stage_budget(a.small), "common": common, "time": time.time()}
    _write_json(p["setup"], rec)
    return rec


def _train(a, p: dict, name: str, recipe: str, overrides: list[str]) -> int:
    """`pixart-ds train` on --ranks ranks under torch.distributed.run (the demo's launcher), logs in logs/NAME.log;
    the commit is recorded beside the run."""

    rd = [o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")][0]
    os.makedirs(rd, exist_ok=True)
    with open(os.path.join(rd, "commits.txt"), "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {_commit()}\n")
    _say(f"train {name}")
    return D._launch(f"training {name}", ["train", recipe, *overrides], a.ranks, os.path.join(p["logs"], f"{name}.log"))


def arm_overrides(arm: str, seed: int, p: dict, st: dict, a) -> list[str]:

    with open(os.path.join(p["t5"], "config.json")) as f:
        width = int(json.load(f)["d_model"])
    o = [f"run_dir={run_dir(p, arm, seed)}", f"data.sources=[{{local: {p['features_text']}}}]",
         f"encoders.text_encoder={p['t5']}", f"model.caption_channels={width}", f"train.seed={seed}",
         f"checkpoint.every_steps={a.ckpt_every}", "checkpoint.keep_last=100", *st["common"],
         *(D.SMALL_OVERRIDES["stage2"] if a.small else [])]
    if arm == "single":
        o += [f"train.init_from={p['stage1']}"]
    elif arm == "block":
        o += [f"train.init_from={p['stage1']}", "model.adaln=block"]
    elif arm == "scratch":
        o += ["train.init_from=null", f"train.total_steps={st['budget']['scratch_steps']}"]
    return o


def train(a, p: dict, st: dict) -> None:

    for seed in [int(s) for s in a.seeds.split(",")]:
        for arm in a.arms.split(","):
            rc = _train(a, p, f"{arm}_s{seed}", D.STAGE2_RECIPE, arm_overrides(arm, seed, p, st, a))
            if rc:
                raise SystemExit(f"ablations: {arm} seed {seed} failed ({rc}); rerun to continue")


# ------------------------------------------------------------------------------------------------------------------
# score: every selected checkpoint's EMA weights through pixart_ds.eval
# ------------------------------------------------------------------------------------------------------------------
def _steps_to_score(rd: str, every: int) -> list[int]:

    tags = ck.complete_tags(ck.ckpt_root(rd))
    steps = [ck.step_of(t) for t in tags]
    if not steps:
        return []
    return sorted({s for s in steps if s % every == 0} | {max(steps)})


def _finished(rd: str) -> bool:

    try:
        _, events = read_metrics(os.path.join(rd, "metrics.jsonl"))
    except OSError:
        return False
    return any(e["event"] == "done" for e in events)


class _Scoring:
    """The shared pieces: T5, VAE, random Inception + reference statistics, prompts."""

    def __init__(self, a, p: dict, st: dict):


        self.a, self.p, self.st = a, p, st
        s2 = C.load(D.STAGE2_RECIPE)
        self.sample = s2.sample
        self.tok, self.te = load_text_encoder(p["t5"], dtype="fp32", device="cpu")
        self.vae = load_vae(st["vae"], dtype="fp32", device="cpu")
        # KID on 100 subsets of at most 1,000 (torchmetrics' defaults), fixed seed
        self.scorer = build_scorer(p["inception"], p["raw_text"], None, st["resolution"],
                                   os.path.join(p["work"], "cache"), ScoreSettings(judge="on"),
                                   reference_images=a.reference_images, progress=True)
        torch.set_num_threads(max(1, os.cpu_count() or 1))

    def prompts(self, n_images: int) -> dict:
        """Half held-out captions ((shape, colour, background) never trained on), half training captions, as the
        demo scores (pixart_ds/train/demo.py)."""

        n = n_images // 2
        total = self.st["sizes"]["text_images"]
        return {"heldout": synthetic.held_out_prompts(n, seed=D.DATA_SEED),
                "indist": [synthetic.caption(synthetic.attributes(i * (total // n), D.DATA_SEED)) for i in range(n)]}

    def generator(self, ckpt_dir: str):


        mc, res, sd = load_weights(ckpt_dir, use_ema=True)
        with torch.random.fork_rng(devices=[]):
            model = build(dataclasses.replace(mc, attention="auto", grad_checkpointing=False), res, ckpt_dir)
        load_state_dict_strict(model, sd, ckpt_dir)
        model.eval().requires_grad_(False)
        s = self.sample
        return Generator(model, mc, self.vae, self.tok, self.te, Schedule.linear(), res, res, self.st["vae_scale"],
                         "cpu", SampleSettings(s.sampler, s.steps, s.guidance, s.seed, 32, "null"), "null")

    def score(self, ckpt_dir: str, n_images: int, grid_dir: str | None = None, fid: bool = True) -> dict:
        """The judge on held-out and in-distribution prompts; with `fid`, FID/KID over both sets together (the
        random Inception costs ~0.5 s per image on 2 cores: the curve points are judged only)."""



        gen = self.generator(ckpt_dir)
        out, feats = {}, []
        scorer = self.scorer if fid else dataclasses.replace(self.scorer, inception=None, reference=None)
        for name, prompts in self.prompts(n_images).items():
            grid = os.path.join(grid_dir, f"{name}_grid.png") if grid_dir else None
            # features kept: FID is over both prompt sets together
            r = evaluate_model(gen, _Keep(scorer, feats), prompts, len(prompts), grid, 32)
            out[name] = r["judge"]
            out[f"{name}_seconds"] = r["seconds"]
        out["num_images"] = n_images
        if not fid:
            return out
        allf = np.concatenate(feats)
        ref = self.scorer.reference
        out["fid"] = M.fid(allf, ref)
        out["kid"] = M.kid(allf, ref.get("features"), 100, 1000, 0)
        out["num_images"] = len(allf)
        out["reference_images"] = int(ref["n"])
        return out


class _Keep:
    """A Scorer that also hands its Inception features to the caller (to pool the two prompt sets)."""

    def __init__(self, scorer, sink: list):
        self.scorer, self.sink, self.settings = scorer, sink, scorer.settings

    def features(self, images, prompts, judge):
        f = self.scorer.features(images, prompts, judge)
        if "inception" in f:
            self.sink.append(f["inception"])
        return f

    def score(self, arrays):
        return {"judge": self.scorer.score({k: v for k, v in arrays.items() if k != "inception"})["judge"]}


def score(a, p: dict, st: dict, wait: bool = False) -> None:
    """Score every finished arm's selected checkpoints (resumable: one JSON per checkpoint). With `wait`, keep
    polling until every arm of every seed is finished and scored (run it beside `train`)."""
    sc = None
    seeds = [int(s) for s in a.seeds.split(",")]
    while True:
        pending = 0
        for seed in seeds:
            for arm in a.arms.split(","):
                rd = run_dir(p, arm, seed)
                if not _finished(rd):
                    pending += 1
                    continue
                steps = _steps_to_score(rd, a.score_every)
                for s in steps:
                    dst = os.path.join(p["scores"], f"{arm}_s{seed}", f"step_{s:08d}.json")
                    if os.path.isfile(dst):
                        continue
                    sc = sc or _Scoring(a, p, st)
                    _say(f"score {arm} seed {seed} step {s}")
                    ck = os.path.join(rd, "checkpoints", f"step_{s:08d}")
                    last = s == max(steps)
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    r = sc.score(ck, a.final_images if last else a.score_images,
                                 os.path.dirname(dst) if last else None, fid=last)
                    r.update(step=s, arm=arm, seed=seed, checkpoint=ck)
                    _write_json(dst, r)
        if not wait or pending == 0:
            return
        time.sleep(60)


# ------------------------------------------------------------------------------------------------------------------
# speed: step time, images/s and peak memory of the two stage-2 architectures, side by side
# ------------------------------------------------------------------------------------------------------------------
def speed(a, p: dict) -> dict:
    """benchmarks/throughput.py (the production train_step on synthetic batches, one process) on recipes/demo.yaml
    with model.adaln single and block, the demo's model size and per-rank batch. Run this phase on a quiet machine
    (the trainings' own step times are not comparable: they ran beside other work)."""

    out = os.path.join(p["work"], "speed")
    os.makedirs(out, exist_ok=True)
    res = {}
    for adaln in ("single", "block"):
        found = [f for f in os.listdir(out) if f.startswith(f"demo-ablation_{adaln}_") and f.endswith(".json")]
        if not found:
            cmd = [sys.executable, os.path.join(REPO, "benchmarks", "throughput.py"), D.STAGE2_RECIPE, "--cpu-preset",
                   "tiny", "--cpu-batch", "16", "--set", f"model.adaln={adaln}", "--set", "train.init_from=null",
                   "--warmup", "5", "--steps", "40", "--tag", f"ablation_{adaln}", "--no-progress", "--out", out]
            _say(" ".join(cmd[1:]))
            subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get(
                "OMP_NUM_THREADS", "2")))
            found = [f for f in os.listdir(out) if f.startswith(f"demo-ablation_{adaln}_") and f.endswith(".json")]
        with open(os.path.join(out, sorted(found)[-1])) as f:
            res[adaln] = json.load(f)
    return res


# ------------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------------
LABEL = {"single": "adaLN-single (re-param)", "block": "adaLN per block", "scratch": "w/o re-param (scratch)"}


def _collect(a, p: dict) -> dict:
    """{arm: {seed: {"curve": [(step, score json)], "final": score json, "run": ...}}} of what is scored."""

    out = {}
    for arm in a.arms.split(","):
        for seed in [int(s) for s in a.seeds.split(",")]:
            d = os.path.join(p["scores"], f"{arm}_s{seed}")
            rd = run_dir(p, arm, seed)
            if not os.path.isdir(d) or not _finished(rd):
                continue
            curve = []
            for f in sorted(os.listdir(d)):
                if f.startswith("step_") and f.endswith(".json"):
                    curve.append(_read_json(os.path.join(d, f)))
            steps = _steps_to_score(rd, a.score_every)
            if not curve or curve[-1]["step"] != max(steps):
                continue  # the last checkpoint is not scored yet
            recs, events = read_metrics(os.path.join(rd, "metrics.jsonl"))
            start = [e for e in events if e["event"] == "start"][0]
            done = [e for e in events if e["event"] == "done"][-1]
            last = recs[max(recs)]
            commits = open(os.path.join(rd, "commits.txt")).read().split()[1::2] if os.path.isfile(
                os.path.join(rd, "commits.txt")) else []
            out.setdefault(arm, {})[seed] = {
                "curve": curve, "final": curve[-1], "steps": max(recs), "images_seen": last["images_seen"],
                "final_loss_avg": last.get("loss_avg"), "train_seconds": done.get("seconds"), "init": start["init"],
                "world_size": start["world_size"], "commit": commits[0] if commits else None, "grids": {
                    k: os.path.join(d, f"{k}_grid.png") for k in ("heldout", "indist")}}
    return out


def _ms(xs: list) -> tuple:

    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None, 0
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0, len(xs)


def _fmt_ms(xs: list, nd: int = 3) -> str:
    m, s, n = _ms(xs)
    return "—" if m is None else f"{m:.{nd}f} ± {s:.{nd}f}"


def _verdict(xa: list, xb: list) -> tuple[float, float, str]:
    """(difference of means a - b, its standard error over seeds, a word on whether it exceeds the noise)."""
    ma, sa, na = _ms(xa)
    mb, sb, nb = _ms(xb)
    if ma is None or mb is None:
        return float("nan"), float("nan"), "not measured"
    se = ((sa ** 2 / na if na else 0) + (sb ** 2 / nb if nb else 0)) ** 0.5
    d = ma - mb
    if na < 2 or nb < 2:
        return d, se, "one seed: noise unknown"
    return d, se, ("larger than the seed noise (> 2 standard errors)" if abs(d) > 2 * se else
                   "within the seed noise (< 2 standard errors)")


def plot_pair(runs: dict, arms: tuple, path: str, title: str, budget: dict) -> None:
    import matplotlib  # heavy: only the report phase plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy, as above

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {arms[0]: "C0", arms[1]: "C1"}
    for ax, (key, ylabel) in zip(axes[:2], (("heldout", "alignment, held-out prompts"),
                                            ("indist", "alignment, in-distribution prompts"))):
        for arm in arms:
            seeds = runs.get(arm, {})
            series = {}
            for seed, r in seeds.items():
                # x: images trained on, stage 1's included for the arms that start from it, so the re-param pair
                # is compared at equal total budget (the scratch arm's extra steps are stage 1's images)
                base = budget["stage1_images"] if arm != "scratch" else 0
                xs = [base + c["step"] * budget["stage2_batch"] for c in r["curve"]]
                ys = [c[key]["alignment"] for c in r["curve"]]
                ax.plot(xs, ys, color=colors[arm], alpha=0.3, lw=1)
                for x, y in zip(xs, ys):
                    series.setdefault(x, []).append(y)
            if series:
                xs = sorted(series)
                ax.plot(xs, [np.mean(series[x]) for x in xs], color=colors[arm], lw=2, marker="o",
                        label=f"{LABEL[arm]} (mean of {len(seeds)} seeds)")
        ax.set_xlabel("images trained on (stage 1 included)")
        ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:.0f}k")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax = axes[2]  # FID of the last checkpoint: one dot per seed, the bar is the mean
    for i, arm in enumerate(arms):
        vals = [r["final"]["fid"] for r in runs.get(arm, {}).values()]
        if vals:
            ax.bar(i, np.mean(vals), color=colors[arm], alpha=0.4, width=0.6)
            ax.scatter([i] * len(vals), vals, color=colors[arm], zorder=3)
    ax.set_xticks(range(len(arms)), [LABEL[x] for x in arms], fontsize=8)
    ax.set_ylabel("FID at the last checkpoint (random Inception)")
    ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _params(adaln: str, caption_channels: int) -> dict:
    """Trainable parameters: the demo-size model of each arm and PixArt-XL/2."""


    cfg = C.load(D.STAGE2_RECIPE, [f"model.adaln={adaln}", f"model.caption_channels={caption_channels}",
                                   "train.init_from=null"])
    with torch.device("meta"):
        m = build_model(cfg)
    return {"demo": sum(x.numel() for x in m.parameters() if x.requires_grad),
            "xl": model_info("PixArt-XL/2", adaln=adaln, condition="text")["total"]}


def _sampling() -> dict:

    s = C.load(D.STAGE2_RECIPE).sample
    return {"sampler": s.sampler, "steps": s.steps, "guidance": s.guidance}


def report(a, p: dict, st: dict) -> list[str]:


    runs = _collect(a, p)
    sp = speed(a, p) if a.measure_speed else {}
    hw = H.device_record()
    outs = a.out or [R.DEFAULT_RESULTS]
    with open(os.path.join(p["t5"], "config.json")) as f:
        width = int(json.load(f)["d_model"])
    written = []
    for pair, arms in PAIRS.items():
        base = R.stem(f"ablation_{pair}-judged", hw["slug"])
        finals = {arm: {seed: r["final"] for seed, r in runs.get(arm, {}).items()} for arm in arms}
        rec = {"schema": "pixart_ds.ablation_eval/1", "pair": pair, "arms": list(arms),
               "timestamp": R.now().isoformat(),
               "hardware": hw, "versions": H.versions(), "report_commit": _commit(), "setup": st, "args": vars(a),
               "runs": {arm: {str(k): v for k, v in runs.get(arm, {}).items()} for arm in arms},
               "sampling": _sampling(),
               "params": {arm: _params("block" if arm == "block" else "single", width) for arm in arms},
               "speed": {k: {"images_per_s_per_device": v["results"]["images_per_s_per_device"],
                             "step_time_s": v["results"]["step_time_s"], "memory": v["results"]["memory"],
                             "report": v.get("report")} for k, v in sp.items()}}
        comp = {}
        for key in ("heldout", "indist", "fid"):
            xa = [f[key]["alignment"] if key != "fid" else f["fid"] for f in finals[arms[0]].values()]
            xb = [f[key]["alignment"] if key != "fid" else f["fid"] for f in finals[arms[1]].values()]
            comp[key] = {"a": xa, "b": xb, "diff_and_se_and_verdict": _verdict(xa, xb)}
        rec["comparison"] = comp
        blobs = {}
        with tempfile.TemporaryDirectory() as tmp:
            png = os.path.join(tmp, "p.png")
            plot_pair(runs, arms, png, f"{LABEL[arms[0]]} vs {LABEL[arms[1]]} — embedded dataset, {hw['name']}",
                      st["budget"])
            blobs[f"{base}.png"] = open(png, "rb").read()
        for arm in arms:
            r0 = runs.get(arm, {}).get(min(runs.get(arm, {}) or [0]))
            if r0:
                for k, g in r0["grids"].items():
                    if os.path.isfile(g):
                        blobs[f"{base}_{arm}_{k}.png"] = open(g, "rb").read()
        R.write_outputs(outs, base, render_pair(rec, base, blobs), rec, blobs)
        written.append(os.path.join(outs[0], base + ".md"))
    return written


def conclusion(rec: dict) -> str:
    """The paper's claim for the pair, and what the final-checkpoint numbers say about it, with the seed noise."""
    pair, (A, B) = rec["pair"], rec["arms"]
    comp = rec["comparison"]
    n = min(len(rec["runs"].get(A, {})), len(rec["runs"].get(B, {})))
    if n == 0:
        return "Not enough runs scored yet to say."
    dh, seh, vh = comp["heldout"]["diff_and_se_and_verdict"]
    di, sei, vi = comp["indist"]["diff_and_se_and_verdict"]
    df, sef, vf = comp["fid"]["diff_and_se_and_verdict"]
    noise = (f"Seed noise (standard deviation over {n} seed(s) per arm): held-out alignment "
             f"{_ms(comp['heldout']['a'])[1]:.3f} / {_ms(comp['heldout']['b'])[1]:.3f}, FID "
             f"{_ms(comp['fid']['a'])[1]:.3f} / {_ms(comp['fid']['b'])[1]:.3f} ({LABEL[A]} / {LABEL[B]}).")
    diffs = (f"{LABEL[A]} − {LABEL[B]}: held-out alignment {dh:+.3f} ± {seh:.3f} ({vh}), in-distribution "
             f"{di:+.3f} ± {sei:.3f} ({vi}), FID {df:+.3f} ± {sef:.3f} ({vf}).")
    within = lambda v: v.startswith("within")
    if pair == "adaln":
        claim = ("The paper (§2.3, Fig. 6) finds adaLN-single on par with per-block adaLN (adaLN slightly lower FID) "
                 "with 26% fewer parameters and 21% less memory.")
        if n < 2:
            verdict = "With one seed the noise is unknown: no verdict yet."
        elif within(vh) and within(vf) and (within(vi) or di < 0):
            verdict = ("At this scale the two are on par within the seed noise, as the paper says, and adaLN-single "
                       "is the smaller model: the conclusion holds.")
        elif within(vh) and within(vf):
            verdict = ("At this scale the two are on par on held-out prompts and FID, within the seed noise, while "
                       f"per-block adaLN is ahead on in-distribution prompts ({di:+.3f} ± {sei:.3f}, beyond the "
                       "noise): on par on what generalises, with a small edge for the larger per-block model where "
                       "it has seen the captions, close to the paper's 'on par, adaLN slightly better'. adaLN-single "
                       "is the smaller model.")
        elif dh > 0 and not within(vh):
            verdict = ("Here per-block adaLN aligns text and image better beyond the seed noise: at this scale and "
                       "budget adaLN-single costs quality, more than the paper's 'on par'.")
        else:
            verdict = ("Here adaLN-single is at least as good as per-block adaLN: the paper's conclusion (no loss "
                       "from adaLN-single) holds.")
    else:
        claim = ("The paper (§2.3) finds that without the re-parameterization (stage 2 from scratch, stage 1's "
                 "budget added) samples are visibly distorted: the re-parameterized start is better.")
        if n < 2:
            verdict = "With one seed the noise is unknown: no verdict yet."
        elif dh > 0 and not within(vh):
            verdict = ("At this scale the re-parameterized start aligns text and image better than training from "
                       "scratch with the same total budget, beyond the seed noise: the conclusion holds.")
        elif within(vh):
            verdict = ("At this scale the difference is within the seed noise: the paper's conclusion is not "
                       "confirmed here.")
        else:
            verdict = "Here training from scratch did better: the paper's conclusion does not hold at this scale."
    nh = next(iter(rec["runs"][A].values()))["final"]["heldout"]["n"]
    ph = _ms(comp["heldout"]["a"] + comp["heldout"]["b"])[0]
    sampling = (f"(Part of that noise is the finite prompt set: with {nh} held-out images per checkpoint the "
                f"binomial standard error of one alignment is {(ph * (1 - ph) / nh) ** 0.5:.3f}.)")
    return " ".join([claim, diffs, noise, sampling, verdict])


def _final_n(runs: dict) -> str:
    ns = sorted({r["final"]["num_images"] for arm in runs.values() for r in arm.values()})
    return "/".join(map(str, ns)) or "—"


def render_pair(rec: dict, base: str, blobs: dict) -> str:

    arms, pair = rec["arms"], rec["pair"]
    st, a = rec["setup"], rec["args"]
    b = st["budget"]
    A, B = arms
    runs = rec["runs"]
    title = {"adaln": "adaLN (per block) vs adaLN-single", "reparam": "re-parameterization vs w/o re-param"}[pair]
    lines = [f"# {title} (paper §2.3, Fig. 6), judged on the embedded dataset — {rec['hardware']['name']}", "",
             f"Report written {rec['timestamp'][:19]} UTC at commit {rec['report_commit']} by "
             f"`benchmarks/ablations.py`. ![curves]({base}.png)", ""]
    if pair == "adaln":
        lines += ["Both arms start stage 2 from the same class-conditional, per-block adaLN stage-1 checkpoint "
                  f"(recipes/demo_stage1.yaml: {b['stage1_steps']} steps x {b['stage1_batch']}). "
                  "**adaLN-single** is the demo's stage 2: re-parameterized at t = 500 (paper §2.3). **adaLN per "
                  "block** keeps DiT's per-block modulation MLPs: every tensor of stage 1 that exists in the text "
                  "model is copied, the caption projection and cross-attention start from the official init "
                  "(`train.init_from` with `model.adaln=block`). Both train recipes/demo.yaml's stage 2 "
                  f"({b['stage2_steps']} steps x {b['stage2_batch']}); the arms differ only in model.adaln."]
    else:
        lines += ["**Re-param** is the demo's stage 2: adaLN-single re-parameterized from the shared stage-1 "
                  f"checkpoint at t = 500 and trained {b['stage2_steps']} steps x {b['stage2_batch']}. "
                  "**w/o re-param** trains the same adaLN-single model from scratch for "
                  f"{b['scratch_steps']} steps: stage 2's steps plus stage 1's budget ({b['stage1_steps']} x "
                  f"{b['stage1_batch']} = {b['stage1_images']:,} images) at stage 2's batch, as the paper compared."]
    want = len(str(a["seeds"]).split(","))
    done = min(len(runs.get(A, {})), len(runs.get(B, {})))
    if done < want:
        lines += ["", f"**Status: {done} of {want} seeds per arm trained and scored** (the driver resumes the rest: "
                  f"`python benchmarks/ablations.py --work WORK`; this report is regenerated from what is scored)."]
    commits = sorted({r["commit"] for arm in runs.values() for r in arm.values() if r.get("commit")})
    lines += ["", f"Training code: commit(s) {', '.join(commits) or '—'} (recorded beside each run; a `(snapshot)` "
              "commit is a source snapshot the runs were started from, so later edits of the checkout could not "
              "reach running jobs)."]
    lines += ["", f"Seeds: `train.seed` {a['seeds']} per arm (model init of new parts, data order, noise). Scores: "
              f"EMA weights, DPM-Solver++ {rec['sampling']['steps']} steps, guidance {rec['sampling']['guidance']} "
              f"(recipes/demo.yaml's sample section: the demo's best guidance for this model size), "
              f"image i seeded with i; half held-out prompts ((shape, colour, background) never trained on), half "
              f"training captions. Curve points (alignment only): {a['score_images']} images at every "
              f"{a['score_every']} steps; the last checkpoint (alignment, FID, KID): {_final_n(runs)} images. Mean ± "
              f"standard deviation over seeds.", ""]
    def col(arm, f):
        vals = [f(r) for r in runs.get(arm, {}).values()]
        return _fmt_ms(vals)

    lines += [f"| | {LABEL[A]} | {LABEL[B]} | difference (A − B) ± s.e. |", "|---|---|---|---|"]
    for key, name in (("heldout", "alignment, held-out prompts"), ("indist", "alignment, in-distribution prompts"),
                      ("fid", "FID vs the training images (random Inception)")):
        d, se, verdict = rec["comparison"][key]["diff_and_se_and_verdict"]
        get = (lambda r, k=key: r["final"][k]["alignment"]) if key != "fid" else (lambda r: r["final"]["fid"])
        diff = "—" if d != d else f"{d:+.3f} ± {se:.3f}: {verdict}"
        lines.append(f"| {name} | {col(A, get)} | {col(B, get)} | {diff} |")
    lines.append(f"| KID x 1000 | {col(A, lambda r: 1000 * r['final']['kid']['mean'])} | "
                 f"{col(B, lambda r: 1000 * r['final']['kid']['mean'])} | |")
    for k in ("shape", "color", "background"):
        lines.append(f"| held-out {k} | {col(A, lambda r, k=k: r['final']['heldout'][k])} | "
                     f"{col(B, lambda r, k=k: r['final']['heldout'][k])} | |")
    lines.append(f"| final training loss (avg of last 10 steps) | {col(A, lambda r: r['final_loss_avg'])} | "
                 f"{col(B, lambda r: r['final_loss_avg'])} | |")
    lines.append(f"| seeds scored | {len(runs.get(A, {}))} | {len(runs.get(B, {}))} | |")
    pa, pb = rec["params"][A], rec["params"][B]
    lines.append(f"| trainable parameters, this model | {pa['demo']:,} | {pb['demo']:,} | "
                 f"{100 * (pa['demo'] - pb['demo']) / pb['demo']:+.1f}% |")
    lines.append(f"| trainable parameters, PixArt-XL/2 | {pa['xl']:,} | {pb['xl']:,} | "
                 f"{100 * (pa['xl'] - pb['xl']) / pb['xl']:+.1f}% |")
    spd = rec["speed"]
    if spd and pair == "adaln":
        sb, ss = spd["block"], spd["single"]
        mem = lambda s: s["memory"].get("peak_allocated_bytes") or s["memory"].get("peak_rss_bytes")
        tb, ts = sb["step_time_s"], ss["step_time_s"]
        lines.append(f"| step time, median ± s.d. of 40 (throughput.py, 1 process, batch 16) | "
                     f"{tb['median']:.3f} ± {tb['stdev']:.3f} s | {ts['median']:.3f} ± {ts['stdev']:.3f} s | "
                     f"{100 * (tb['median'] / ts['median'] - 1):+.1f}% |")
        lines.append(f"| peak memory (process RSS) | {mem(sb) / 2**20:.0f} MiB | {mem(ss) / 2**20:.0f} MiB | "
                     f"{100 * (mem(sb) - mem(ss)) / mem(ss):+.1f}% |")
    if spd and pair == "adaln":
        lines += ["", "Step time and memory come from `benchmarks/throughput.py` (the production train_step on "
                  "synthetic batches) run on the two architectures one after the other, under the machine's test "
                  "lock; a large s.d. means other work shared the cores (the reports' JSON holds every step's "
                  "time; `--phase speed` on a quiet machine measures again).", ""]
    elif spd:
        lines.append("| step time | same architecture (adaLN-single) in both arms: the same step time | | |")
    elif pair == "adaln":
        lines.append("| step time, memory | not measured in this report (`--phase speed` on a quiet machine); "
                     "PixArt-S/2 on this CPU: ablation_adaln-throughput / ablation_adaln_single-throughput reports "
                     "in benchmarks/results | | |")
    lines += ["", "## Does the paper's conclusion hold here?", "", conclusion(rec), ""]
    lines += ["", "Per seed (final checkpoint):", "", "| arm | seed | steps | held-out | in-dist. | FID | training "
              "commit | init |", "|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        for seed, r in sorted(runs.get(arm, {}).items()):
            f = r["final"]
            lines.append(f"| {LABEL[arm]} | {seed} | {r['steps']} | {f['heldout']['alignment']:.3f} | "
                         f"{f['indist']['alignment']:.3f} | {f['fid']:.4f} | {r['commit']} | {r['init']} |")
    grids = [k for k in blobs if k.endswith("_grid.png")]
    if grids:
        lines += ["", "Samples of seed " + str(min(next(iter(runs.values())).keys()) if runs else 0)
                  + "'s final EMA weights (first 32 prompts of each set):", ""]
        for g in sorted(grids):
            lines.append(f"- {g.split('_')[-2]} prompts, {LABEL[[x for x in arms if f'_{x}_' in g][0]]}: ![]({g})")
    lines += ["", "## What these numbers mean", "",
              "- **Alignment** is the embedded dataset's pixel judge (pixart_ds.data.synthetic.judge): the fraction "
              "of images whose shape, object colour and background colour all match the prompt. It is the "
              "meaningful score here.",
              "- **FID / KID** are computed by torchmetrics on 2,048-d pool features of an Inception-v3 with "
              "**random weights** (pixart_ds.eval.inception.save_random_inception, seed "
              f"{a['inception_seed']}; no pretrained weights can be had on this machine), against the first "
              f"{a['reference_images']} images of stage 2's training set. Such features are a fixed random "
              "projection of colour and texture statistics: the FID compares image statistics (palette, edges, "
              "object sizes) between generated and training images, it says nothing about semantic quality, and "
              "its values are not comparable to any published FID (COCO FID-30K, the paper's 7.32). Lower is "
              "still closer to the training distribution. With few images it is biased upwards; the arms are "
              "compared at equal image counts.",
              "", "## Hardware", "", R.hardware_md(rec["hardware"]), "", "## Versions", "",
              R.versions_md(rec["versions"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    a = parse_args(argv)
    p = paths(a.work)
    phases = a.phase or ["setup", "train", "score", "speed", "report"]
    st = setup(a, p) if "setup" in phases or "train" in phases else _read_json(p["setup"])
    if "train" in phases:
        train(a, p, st)
    if "score" in phases:
        score(a, p, st, wait=a.wait)
    if "speed" in phases and "report" not in phases:
        speed(a, p)
    if "report" in phases:
        for w in report(a, p, st):
            _say(f"-> {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
