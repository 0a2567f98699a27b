"""`pixart-ds demo`: the whole pipeline, small, on a fresh machine with nothing downloaded.

    pixart-ds demo [--out runs/demo] [--small] [--ranks 2] [--vae DIR]

Phases (each prints its progress and wall time; a phase whose output is already complete is reused, so an
interrupted demo continues where it stopped):

1. data      the embedded shapes dataset (pixart_ds.data.synthetic) -> raw MDS at 128 px through the same
             converter as real data (`pixart-ds data synthetic`): one image set for stage 1, another for stage 2
             (as the paper's stages train on different data, ImageNet then SAM).
2. encoders  a small random T5 with a neighbour prior (encoders.make_tiny_t5, DEMO_T5; fixed: the model learns to
             read its features) and the VAE fitted to the embedded images (pixart_ds/data/assets/synthetic_vae, made by
             pixart_ds/data/synthetic_vae.py). Its config.json `scaling_factor` is the recipes' encoders.vae_scale.
3. features  raw MDS -> feature MDS (`pixart-ds features` on N ranks, each encoding its slice): VAE posterior +
             class label for stage 1, VAE posterior + T5 tokens for stage 2 (paper §2.4: extracted once, offline).
4. stage 1   recipes/demo_stage1.yaml: the class-conditional DiT-style model (condition=class, adaln=block; class =
             shape x colour), `pixart-ds train` under `torch.distributed.run` with DeepSpeed ZeRO-2 on N ranks
             (CPU processes over gloo, or the GPUs present).
5. stage 2   recipes/demo.yaml: text-conditional adaLN-single, initialised from stage 1 through the DiT -> PixArt
             re-parameterization (train.init_from, paper §2.3), same launcher.
6. sample    stage 2's EMA weights, DPM-Solver++ with classifier-free guidance, on captions whose (shape, colour,
             background) triple never occurs in training (synthetic.held_out_prompts) and, for comparison, on
             captions of training images; every image is judged from its pixels by synthetic.judge.

The alignment score is the fraction of generated images whose shape, colour and background colour match their
prompt (synthetic.judge's "ok"); the headline number is the held-out one. Everything is recorded in
OUT/demo_summary.json.

Layout of OUT (default runs/demo; recipes/demo*.yaml name the same paths relative to the repository):
    data/raw_class/  data/raw_text/                          raw MDS (+ *.summary.json beside them)
    data/features_class/  data/features_text/                feature MDS (+ *.summary.json beside them)
    encoders/t5/                                             the small T5 (+ encoders/vae/ if one had to be fitted)
    stage1/  stage2/                                         run directories: config.yaml (resolved recipe),
                                                             metrics.jsonl, checkpoints/
    logs/                                                    the launchers' output (features, stage1, stage2)
    samples/heldout_grid.png  samples/indist_grid.png        sample grids (frame: green = judged right, red = wrong)
    samples/alignment.json                                   every prompt, seed, verdict and what the judge saw
    demo_summary.json                                        phases, timings, paths, scores
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Optional

import torch
from PIL import Image

from pixart_ds import config as C
from pixart_ds.config import VAE_SCALE
from pixart_ds.data import convert as dconv
from pixart_ds.data import synthetic, synthetic_vae
from pixart_ds.diffusion.sampling import generate, to_pil
from pixart_ds.fsutil import atomic_write, atomic_write_json, write_dir_atomic
from pixart_ds.model.encoders import load_text_encoder, load_vae, make_tiny_t5
from pixart_ds.train import checkpoint as ckpt
from pixart_ds.train.metrics import read_metrics
from pixart_ds.train.weights import build_sampling_model, resolve_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = os.path.join(REPO, "recipes")
STAGE1_RECIPE = os.path.join(RECIPES, "demo_stage1.yaml")
STAGE2_RECIPE = os.path.join(RECIPES, "demo.yaml")

# Dataset and evaluation sizes. The training sizes (model, steps, batch, lr, ...) live in the recipes.
FULL = {"class_images": 1024, "text_images": 4096, "eval_prompts": 64, "vae_fit_steps": 1500, "vae_fit_images": 6000}
# --small (CI): the same pipeline at a size that runs in a few minutes on 2 CPU cores. It proves the plumbing
# (both stages train and checkpoint, stage 2 starts from stage 1 through the re-parameterization, samples are
# judged), not the quality: its alignment score is reported, not expected to reach the full demo's.
SMALL = {"class_images": 128, "text_images": 256, "eval_prompts": 8, "vae_fit_steps": 100, "vae_fit_images": 512}
SMALL_OVERRIDES = {
    "stage1": ["model.depth=2", "model.hidden_size=64", "model.num_heads=2", "train.total_steps=8",
               "train.global_batch_size=16", "train.micro_batch_size=8", "train.warmup_steps=2",
               "checkpoint.every_steps=4", "log.every_steps=2"],
    "stage2": ["model.depth=2", "model.hidden_size=64", "model.num_heads=2", "train.total_steps=8",
               "train.global_batch_size=16", "train.micro_batch_size=8", "train.warmup_steps=2",
               "checkpoint.every_steps=4", "log.every_steps=2", "sample.steps=8"],
}
# Two image sets, as the paper's stages train on different data (ImageNet, then SAM): stage 1 on seed 1's images
# with class labels, stage 2 on seed 0's with captions. The VAE was fitted on yet another seed's (synthetic_vae.fit).
# Held-out (shape, colour, background) triples are absent from every seed's images.
CLASS_SEED = 1
DATA_SEED = 0
# The demo's T5 stand-in: random, 4 layers x 128 wide, with a neighbour prior in place of its random relative-attention
# bias (encoders.make_tiny_t5 neighbour_bias): each word's features carry the words beside it, so "blue" before
# "background" and "blue" before "circle" differ, as they do in a pretrained T5. With the random bias a one-layer
# cross-attention read-out trained for 200 steps names shape, colour and background of 6% of held-out captions,
# with the prior 100% (tests/test_demo.py); the full demo's held-out background colour went from 0.25 to 0.84.
DEMO_T5 = {"d_model": 128, "num_layers": 4, "num_heads": 4, "neighbour_bias": 4.0}
# The VAE fitted to the embedded images (pixart_ds/data/synthetic_vae.py), shipped as package data.
ASSET_VAE = synthetic_vae.ASSET_DIR


# ----------------------------------------------------------------------------------------------------------------
# Output helpers
# ----------------------------------------------------------------------------------------------------------------


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _fmt_s(seconds: float) -> str:
    m, s = divmod(seconds, 60)
    return f"{int(m)}m{s:04.1f}s" if m else f"{s:.1f}s"


class _Phases:
    """Numbered phases with wall times, printed as they start and end and kept for the summary."""

    def __init__(self, names: list[str]):
        self.names = names
        self.seconds: dict[str, float] = {}
        self.notes: dict[str, str] = {}
        self._t0 = time.perf_counter()
        self._cur: Optional[tuple[str, float]] = None

    def start(self, name: str, what: str) -> None:
        i = self.names.index(name) + 1
        _say(f"\n== [{i}/{len(self.names)}] {name}: {what} (t = {_fmt_s(time.perf_counter() - self._t0)})")
        self._cur = (name, time.perf_counter())

    def end(self, note: str = "") -> None:
        name, t = self._cur
        self.seconds[name] = round(time.perf_counter() - t, 3)
        if note:
            self.notes[name] = note
        _say(f"== {name} done in {_fmt_s(self.seconds[name])}" + (f" ({note})" if note else ""))

    def total(self) -> float:
        return round(time.perf_counter() - self._t0, 1)


# ----------------------------------------------------------------------------------------------------------------
# Phases
# ----------------------------------------------------------------------------------------------------------------


def _vae_info(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def _resolve_vae(vae: Optional[str], out: str, small: bool, sizes: dict) -> tuple[str, str]:
    """(VAE folder, where it came from). The shipped fitted VAE unless --vae is given; without either, fit one
    now (the alignment score needs a VAE that decodes the dataset's colours and shapes; a random one decodes noise)."""
    if vae:
        return os.path.abspath(vae), "--vae"
    if os.path.isfile(os.path.join(ASSET_VAE, "config.json")):
        return ASSET_VAE, "shipped (pixart_ds/data/assets/synthetic_vae)"
    fitted = os.path.join(out, "encoders", "vae")
    if not os.path.isfile(os.path.join(fitted, "config.json")):
        _say(f"   {ASSET_VAE} is missing: fitting a VAE to the embedded images now "
             f"({sizes['vae_fit_steps']} steps; the shipped one is better fitted)")
        synthetic_vae.fit(fitted, steps=sizes["vae_fit_steps"], batch_size=16, num_images=sizes["vae_fit_images"])
    return fitted, "fitted by the demo (asset missing)"


def _launcher(world_size: int) -> tuple[list[str], dict, str]:
    """(command prefix, environment, description) for `pixart-ds VERB ...` on `world_size` ranks."""

    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    # The child processes import this checkout even when it is not installed.
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if torch.cuda.is_available():
        what = f"{world_size} GPU rank(s) ({torch.cuda.get_device_name(0)})"
    else:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:
            cpus = os.cpu_count() or 1
        # One intra-op thread per rank per core: more threads than cores makes every rank slower.
        env["OMP_NUM_THREADS"] = str(max(1, cpus // world_size))
        what = f"{world_size} CPU rank(s) x {env['OMP_NUM_THREADS']} thread(s), gloo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
           "-m", "pixart_ds.cli"]
    return cmd, env, what


def _tee(cmd: list[str], env: dict, log_path: str) -> int:
    """Run `cmd`, copying its output (stdout + stderr, progress bars included) to ours and to `log_path`."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            while True:
                chunk = os.read(p.stdout.fileno(), 65536)
                if not chunk:
                    break
                log.write(chunk)
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        except BaseException:
            p.terminate()  # Ctrl-C: stop the ranks too (the trainer checkpoints on SIGTERM)
            p.wait()
            raise
        return p.wait()


def _launch(what: str, args: list[str], world_size: int, log_path: str) -> int:
    """`pixart-ds ARGS` on `world_size` ranks under torch.distributed.run; returns its exit code."""
    cmd, env, _ = _launcher(world_size)
    cmd = cmd + args
    _say("   $ " + " ".join(os.path.relpath(c, REPO) if c.startswith(RECIPES) else c for c in cmd[1:]))
    rc = _tee(cmd, env, log_path)
    if rc != 0:
        print(f"pixart-ds demo: error: {what} failed with exit code {rc}; its output is above and in {log_path}",
              file=sys.stderr)
    return rc


def _run_record(run_dir: str) -> dict:
    """What the trainer recorded about a finished run: steps, images, losses, its init note, its checkpoint."""

    steps, events = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    starts = [e for e in events if e["event"] == "start"]
    done = [e for e in events if e["event"] == "done"]
    tag = ckpt.read_latest(ckpt.ckpt_root(run_dir))
    last = steps[max(steps)] if steps else {}
    first = steps[min(steps)] if steps else {}
    return {
        "run_dir": run_dir,
        "config": os.path.join(run_dir, "config.yaml"),
        "metrics": os.path.join(run_dir, "metrics.jsonl"),
        "checkpoint": os.path.join(ckpt.ckpt_root(run_dir), tag) if tag else None,
        "steps": int(max(steps)) if steps else 0,
        "images_seen": int(last.get("images_seen", 0)),
        "first_loss": first.get("loss"),
        "last_loss_avg": last.get("loss_avg", last.get("loss")),
        "init": starts[0].get("init") if starts else None,
        "world_size": starts[0].get("world_size") if starts else None,
        "train_seconds": done[-1].get("seconds") if done else None,
    }


def _judged_grid(pils: list, oks: list[bool], cols: int = 8, frame: int = 3):
    """The images in rows of `cols`, each framed green (judged right) or red (wrong)."""

    w, h = pils[0].size
    cols = min(cols, len(pils))
    rows = (len(pils) + cols - 1) // cols
    cell_w, cell_h = w + 2 * frame, h + 2 * frame
    grid = Image.new("RGB", (cols * cell_w + (cols + 1) * 2, rows * cell_h + (rows + 1) * 2), (255, 255, 255))
    for i, (im, ok) in enumerate(zip(pils, oks)):
        r, c = divmod(i, cols)
        x, y = 2 + c * (cell_w + 2), 2 + r * (cell_h + 2)
        grid.paste(Image.new("RGB", (cell_w, cell_h), (40, 170, 60) if ok else (210, 40, 40)), (x, y))
        grid.paste(im, (x + frame, y + frame))
    return grid


def _score(verdicts: list[dict]) -> dict:
    n = len(verdicts)
    out = {"n": n, "alignment": sum(v["ok"] for v in verdicts) / n}
    for k in ("shape", "color", "background", "size", "position"):
        out[k] = sum(v[k] for v in verdicts) / n
    return out


def _sample_and_judge(run_dir: str, t5: str, vae: str, vae_scale: float, prompts: dict, out_dir: str,
                      steps: int, guidance: float, seed: int) -> dict:
    """Sample every prompt set with the run's EMA weights, judge the pixels, write grids + alignment.json."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ck = resolve_checkpoint(run_dir, use_ema=True)
    model = build_sampling_model(ck, device=device)
    tok, te = load_text_encoder(t5, dtype="fp32", device=device)
    vae_model = load_vae(vae, dtype="fp32", device=device)
    os.makedirs(out_dir, exist_ok=True)
    results, record = {}, {"checkpoint": run_dir, "weights": "EMA", "sampler": "dpm-solver", "steps": steps,
                           "guidance": guidance, "resolution": ck.resolution, "sets": {}}
    for name, plist in prompts.items():
        seeds = [seed + i for i in range(len(plist))]
        r = generate(model, ck.model_cfg, plist, vae=vae_model, tokenizer=tok, text_encoder=te, schedule=ck.schedule,
                     sampler="dpm-solver", steps=steps, guidance=guidance, seeds=seeds, height=ck.resolution,
                     width=ck.resolution, device=device, batch_size=32, progress=True, vae_scale=vae_scale)
        pils = to_pil(r.images)
        verdicts = [synthetic.judge(im, p) for im, p in zip(pils, plist)]
        grid_path = os.path.join(out_dir, f"{name}_grid.png")
        atomic_write(grid_path, _judged_grid(pils, [v["ok"] for v in verdicts]).save)
        results[name] = {**_score(verdicts), "grid": grid_path}
        record["sets"][name] = {"score": results[name], "images": [
            {"prompt": p, "seed": s, **{k: v[k] for k in ("ok", "shape", "color", "background", "size", "position")},
             "detected": v["detected"]} for p, s, v in zip(plist, seeds, verdicts)]}
    atomic_write_json(os.path.join(out_dir, "alignment.json"), record)
    return results


# ----------------------------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------------------------


def run_demo(out_dir: str = "runs/demo", small: bool = False, world_size: int = 2, vae: Optional[str] = None) -> int:
    """Run the demo into `out_dir` (see the module docstring). Returns 0, or a training launcher's exit code after
    a one-line error; bad input raises ValueError / FileNotFoundError (one line from the CLI)."""
    t_begin = time.time()
    sizes = SMALL if small else FULL
    if world_size < 1:
        raise ValueError(f"--ranks must be >= 1, got {world_size}")
    if torch.cuda.is_available() and world_size > torch.cuda.device_count():
        _say(f"note: --ranks {world_size} but {torch.cuda.device_count()} GPU(s): using {torch.cuda.device_count()}")
        world_size = torch.cuda.device_count()
    if vae is not None and not os.path.isfile(os.path.join(vae, "config.json")):
        raise FileNotFoundError(f"--vae {vae}: no config.json (expected a diffusers AutoencoderKL folder)")
    for r in (STAGE1_RECIPE, STAGE2_RECIPE):
        if not os.path.isfile(r):
            raise FileNotFoundError(f"{r}: demo recipe not found (run the demo from a checkout of the repository)")
    out = os.path.abspath(out_dir)
    os.makedirs(out, exist_ok=True)
    paths = {
        "out": out,
        "raw_class": os.path.join(out, "data", "raw_class"),
        "raw_text": os.path.join(out, "data", "raw_text"),
        "features_class": os.path.join(out, "data", "features_class"),
        "features_text": os.path.join(out, "data", "features_text"),
        "t5": os.path.join(out, "encoders", "t5"),
        "stage1": os.path.join(out, "stage1"),
        "stage2": os.path.join(out, "stage2"),
        "logs": os.path.join(out, "logs"),
        "samples": os.path.join(out, "samples"),
        "summary": os.path.join(out, "demo_summary.json"),
    }
    ph = _Phases(["data", "encoders", "features", "stage1", "stage2", "sample"])
    _, _, launch_what = _launcher(world_size)
    _say(f"pixart-ds demo{' --small' if small else ''}: embedded dataset -> stage 1 (class) -> stage 2 (text, "
         f"re-parameterized) -> samples + alignment score")
    _say(f"   output: {out}; training on {launch_what}")

    # ---- 1. data ----
    s1 = C.load(STAGE1_RECIPE)
    res = s1.data.resolution
    ph.start("data", f"embedded shapes dataset at {res} px -> raw MDS: {sizes['class_images']} images (seed "
                     f"{CLASS_SEED}) for stage 1, {sizes['text_images']} (seed {DATA_SEED}) for stage 2")

    for key, n, seed in (("raw_class", sizes["class_images"], CLASS_SEED), ("raw_text", sizes["text_images"], DATA_SEED)):
        dconv.synthetic(num_samples=n, resolution=res, seed=seed, out=paths[key], progress=True)
    ph.end(f"{paths['raw_class']}, {paths['raw_text']}")

    # ---- 2. encoders ----
    ph.start("encoders", "small T5 (random, fixed seed) + the VAE fitted to the embedded images")

    if not os.path.isfile(os.path.join(paths["t5"], "config.json")):
        write_dir_atomic(paths["t5"], lambda tmp: make_tiny_t5(tmp, **DEMO_T5), replace=True)
    vae_path, vae_source = _resolve_vae(vae, out, small, sizes)
    vinfo = _vae_info(vae_path)
    vae_scale = float(vinfo.get("scaling_factor", VAE_SCALE))
    with open(os.path.join(paths["t5"], "config.json")) as f:
        t5_width = int(json.load(f)["d_model"])
    ph.end(f"T5 d_model {t5_width} in {paths['t5']}; VAE {vae_path} [{vae_source}], scaling_factor {vae_scale:.5f}")

    # ---- 3. features ----
    ph.start("features", f"VAE posteriors + class labels (stage 1) and + T5 tokens (stage 2) -> feature MDS, "
                         f"{world_size} rank(s)")
    # `pixart-ds features` under the same launcher as training: each rank encodes its slice, rank 0 merges.
    for key, raw, extra in (("features_class", paths["raw_class"], ["--class-labels"]),
                            ("features_text", paths["raw_text"], ["--text-encoder", paths["t5"]])):
        rc = _launch(f"{key.replace('_', ' ')}", ["features", "--in", raw, "--out", paths[key], "--vae", vae_path,
                                                   "--resolution", str(res), "--batch-size", "64", *extra],
                     world_size, os.path.join(paths["logs"], f"{key}.log"))
        if rc:
            return rc
    ph.end(f"{paths['features_class']}, {paths['features_text']}")

    # Overrides that point the recipes at this demo's files (the recipes' defaults are the same layout under
    # runs/demo). The VAE's own scaling factor wins over the recipe's if another VAE is used.
    common = [f"encoders.vae={vae_path}", f"encoders.vae_scale={vae_scale!r}"]
    for r in (STAGE1_RECIPE, STAGE2_RECIPE):
        rs = C.load(r).encoders.vae_scale
        if abs(rs - vae_scale) > 1e-6 * max(1.0, abs(vae_scale)):
            _say(f"   note: {os.path.relpath(r, REPO)} has encoders.vae_scale={rs} but {vae_path} has scaling_factor "
                 f"{vae_scale}; using the VAE's")

    def train_stage(stage: str, recipe: str, overrides: list[str]):
        """`pixart-ds train RECIPE` for `stage` on the demo's ranks: (exit code, the run's record or None)."""
        args = ["train", recipe, f"run_dir={paths[stage]}", *overrides, *common,
                *(SMALL_OVERRIDES[stage] if small else [])]
        rc = _launch(f"stage {stage[-1]} training", args, world_size, os.path.join(paths["logs"], f"{stage}.log"))
        return rc, (None if rc else _run_record(paths[stage]))

    # ---- 4. stage 1 ----
    ph.start("stage1", "class-conditional DiT-style model (adaLN per block), DeepSpeed ZeRO-2")
    rc, rec1 = train_stage("stage1", STAGE1_RECIPE, [f"data.sources=[{{local: {paths['features_class']}}}]"])
    if rc:
        return rc
    ph.end(f"{rec1['steps']} steps, {rec1['images_seen']} images, loss {rec1['first_loss']:.4f} -> "
           f"{rec1['last_loss_avg']:.4f}; checkpoint {rec1['checkpoint']}")

    # ---- 5. stage 2 ----
    ph.start("stage2", "text-conditional adaLN-single, initialised from stage 1 by re-parameterization")
    rc, rec2 = train_stage("stage2", STAGE2_RECIPE,
                           [f"data.sources=[{{local: {paths['features_text']}}}]",
                            f"encoders.text_encoder={paths['t5']}", f"model.caption_channels={t5_width}",
                            f"train.init_from={paths['stage1']}"])
    if rc:
        return rc
    ph.end(f"{rec2['steps']} steps, {rec2['images_seen']} images, loss {rec2['first_loss']:.4f} -> "
           f"{rec2['last_loss_avg']:.4f}; init: {rec2['init']}")

    # ---- 6. sample + judge ----

    s2 = C.load(STAGE2_RECIPE, SMALL_OVERRIDES["stage2"] if small else [])
    n = sizes["eval_prompts"]
    prompts = {
        # (shape, colour, background) triples never seen in training: compositional generalisation
        "heldout": synthetic.held_out_prompts(n, seed=DATA_SEED),
        # captions of training images (seen triples), spread over the dataset
        "indist": [synthetic.caption(synthetic.attributes(i * (sizes["text_images"] // n), DATA_SEED))
                   for i in range(n)],
    }
    ph.start("sample", f"{n} held-out + {n} in-distribution prompts, DPM-Solver++ {s2.sample.steps} steps, "
                       f"guidance {s2.sample.guidance}, EMA weights; judged by synthetic.judge")
    scores = _sample_and_judge(paths["stage2"], paths["t5"], vae_path, vae_scale, prompts, paths["samples"],
                               s2.sample.steps, s2.sample.guidance, s2.sample.seed)
    ph.end(f"alignment held-out {scores['heldout']['alignment']:.3f}, in-distribution "
           f"{scores['indist']['alignment']:.3f}")

    total = ph.total()
    summary = {
        "mode": "small" if small else "full",
        "alignment": scores["heldout"]["alignment"],
        "alignment_in_distribution": scores["indist"]["alignment"],
        "scores": scores,
        "definition": "fraction of generated images whose shape, colour and background colour all match the prompt, "
                      "judged from pixels by pixart_ds.data.synthetic.judge; held-out = (shape, colour, background) "
                      "triples never seen in training",
        "seconds": {**ph.seconds, "total": total},
        "notes": ph.notes,
        "world_size": world_size,
        "launcher": launch_what,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "images": {"stage1": sizes["class_images"], "stage2": sizes["text_images"]},
        "resolution": res,
        "vae": {"path": vae_path, "source": vae_source, "scaling_factor": vae_scale},
        "text_encoder": {"path": paths["t5"], "d_model": t5_width},
        "stage1": {**rec1, "recipe": STAGE1_RECIPE, "log": os.path.join(paths["logs"], "stage1.log")},
        "stage2": {**rec2, "recipe": STAGE2_RECIPE, "log": os.path.join(paths["logs"], "stage2.log")},
        "sampling": {"sampler": "dpm-solver", "steps": s2.sample.steps, "guidance": s2.sample.guidance,
                     "seed": s2.sample.seed, "weights": "EMA"},
        "paths": {k: v for k, v in paths.items() if k not in ("out",)} | {
            "heldout_grid": scores["heldout"]["grid"], "indist_grid": scores["indist"]["grid"],
            "alignment_details": os.path.join(paths["samples"], "alignment.json")},
        "started": t_begin,
    }
    atomic_write_json(paths["summary"], summary)

    h, d = scores["heldout"], scores["indist"]
    _say("\n" + "=" * 100)
    _say(f"pixart-ds demo{' --small' if small else ''} finished in {_fmt_s(total)} "
         f"({', '.join(f'{k} {_fmt_s(v)}' for k, v in ph.seconds.items())})")
    _say(f"  data            {paths['raw_class']}, {paths['raw_text']}")
    _say(f"    features      {paths['features_class']}, {paths['features_text']}")
    _say(f"  encoders        T5 {paths['t5']}; VAE {vae_path}")
    _say(f"  stage 1 run     {paths['stage1']}  ({rec1['steps']} steps; config.yaml, metrics.jsonl)")
    _say(f"    checkpoint    {rec1['checkpoint']}")
    _say(f"  stage 2 run     {paths['stage2']}  ({rec2['steps']} steps; {rec2['init']})")
    _say(f"    checkpoint    {rec2['checkpoint']}")
    _say(f"  sample grid     {h['grid']}  (held-out prompts; green frame = judged right)")
    _say(f"                  {d['grid']}  (in-distribution prompts)")
    _say(f"  details         {os.path.join(paths['samples'], 'alignment.json')}")
    _say(f"  summary         {paths['summary']}")
    _say(f"  alignment score (held-out prompts, shape + colour + background): {h['alignment']:.3f}  "
         f"[{round(h['alignment'] * h['n'])}/{h['n']}; shape {h['shape']:.2f}, colour {h['color']:.2f}, "
         f"background {h['background']:.2f}]")
    _say(f"  alignment score (in-distribution prompts, for comparison):       {d['alignment']:.3f}  "
         f"[{round(d['alignment'] * d['n'])}/{d['n']}; shape {d['shape']:.2f}, colour {d['color']:.2f}, "
         f"background {d['background']:.2f}]")
    _say("=" * 100)
    return 0


def main(a) -> int:
    return run_demo(out_dir=a.out, small=a.small, world_size=a.ranks, vae=a.vae)
