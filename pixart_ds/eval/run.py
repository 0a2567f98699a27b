"""Evaluation: generate images for a prompt set, score them by FID / KID (Inception-v3 pool features), CLIP score
and, for the embedded dataset's captions, the pixel judge's alignment.

Two entry points:

- `run_eval(...)`: the `pixart-ds eval` job. Image i is the prompt i mod P sampled from seed + i; images are made
  and featurised in fixed shards of `shard_size` (pixart_ds.eval.shards) spread over the ranks, each written as it
  finishes, so an interrupted 30k-image run continues where it stopped, on any number of ranks, and the numbers do
  not depend on the world size. Rank 0 then scores the whole set and writes OUT/eval.json, OUT/eval.md and
  OUT/grid.png (and OUT/images/NNNNNN.png unless save_images is off).
- `evaluate_model(...)`: the same generation and scoring for a model in memory (the trainer's EMA weights), in one
  process, for a bounded number of images. It draws nothing from the global RNGs (each image's noise comes from its
  own generator; KID's subsets from a forked, seeded RNG), touches no data loader and no checkpoint, so a training
  run that evaluates itself stays exactly resumable.

Paper defaults (§3, official scripts/inference.py): DPM-Solver++ with 20 steps and guidance 4.5.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import diffusers
import numpy as np
import torch
import torch_fidelity
import torchmetrics
import transformers
from PIL import Image
from tqdm.auto import tqdm

from pixart_ds.config import VAE_SCALE, ModelConfig
from pixart_ds.data import synthetic
from pixart_ds.diffusion.sampling import generate, make_grid
from pixart_ds.eval import metrics as M
from pixart_ds.eval import shards as S
from pixart_ds.eval.clip import clip_pair_scores, load_clip
from pixart_ds.eval.inception import file_sha256, inception_features, load_inception
from pixart_ds.eval.reference import reference_stats
from pixart_ds.fsutil import atomic_write, atomic_write_json, atomic_write_text

JUDGE_KEYS = ("ok", "shape", "color", "background", "size", "position")


@dataclass(frozen=True)
class SampleSettings:
    sampler: str = "dpm-solver"
    steps: int = 20
    guidance: float = 4.5
    seed: int = 0
    batch_size: int = 16
    uncond: str = "auto"  # auto | null | empty (pixart_ds.diffusion.sampling.build_conditions)


@dataclass(frozen=True)
class ScoreSettings:
    kid_subsets: int = 100  # torch-fidelity's / torchmetrics' defaults
    kid_subset_size: int = 1000
    kid_seed: int = 0
    feature_batch_size: int = 64
    judge: str = "auto"  # auto (when every prompt is an embedded-dataset caption) | on | off


# ----------------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------------


def read_prompts(path: str) -> list[str]:
    """One caption per line (.txt), or JSON lines with a "caption", "prompt" or "text" field (.jsonl). An empty line
    is an error naming the line: silently skipping it would shift every later image's prompt and seed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts: {path}: no such file")
    out = []
    is_jsonl = path.endswith((".jsonl", ".json"))
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            text = line.rstrip("\n").rstrip("\r")
            if not text.strip():
                if ln > 1 and f.read().strip() == "" and text == "":  # a trailing newline at the end is fine
                    break
                raise ValueError(f"--prompts {path}:{ln}: empty line (one caption per line; remove it or write the "
                                 f"caption)")
            if is_jsonl:
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"--prompts {path}:{ln}: not JSON ({e.msg})") from None
                cap = next((rec[k] for k in ("caption", "prompt", "text") if isinstance(rec, dict) and k in rec), None)
                if not isinstance(cap, str) or not cap.strip():
                    raise ValueError(f"--prompts {path}:{ln}: no non-empty \"caption\", \"prompt\" or \"text\" field")
                text = cap
            out.append(text)
    if not out:
        raise ValueError(f"--prompts {path}: no prompts")
    return out


def judged(prompts: list[str]) -> bool:
    """True when every prompt is an embedded-dataset caption (pixart_ds.data.synthetic.parse_prompt)."""
    try:
        for p in set(prompts):
            synthetic.parse_prompt(p)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Scorer:
    """What images are scored with: Inception (+ reference statistics), CLIP, the judge. Any may be absent."""

    inception: object = None
    inception_sha: str | None = None
    reference: dict | None = None  # pixart_ds.eval.reference: {n, mu, sigma, features, ...}
    clip: tuple | None = None  # (CLIPModel, CLIPProcessor)
    settings: ScoreSettings = field(default_factory=ScoreSettings)

    def features(self, images: torch.Tensor, prompts: list[str], judge: bool) -> dict:
        """Per-image arrays for uint8 images [n, 3, H, W]: inception [n, 2048] float32, clip [n] float64,
        judge_* [n] bool."""
        out = {}
        bs = self.settings.feature_batch_size
        if self.inception is not None:
            out["inception"] = inception_features(self.inception, images, bs).astype(np.float32)
        if self.clip is not None:
            out["clip"] = clip_pair_scores(self.clip[0], self.clip[1], images, prompts, bs)
        if judge:
            vs = [synthetic.judge(Image.fromarray(im.permute(1, 2, 0).numpy()), p) for im, p in zip(images, prompts)]
            for k in JUDGE_KEYS:
                out[f"judge_{k}"] = np.asarray([bool(v[k]) for v in vs])
        return out

    def score(self, arrays: dict) -> dict:
        """Metrics of a whole set from its per-image arrays (in index order)."""
        res: dict = {"num_images": len(arrays["index"]) if "index" in arrays else None}
        if "inception" in arrays and self.reference is not None:
            g = arrays["inception"].astype(np.float64)
            res["fid"] = M.fid(g, self.reference)
            st = self.settings
            res["kid"] = M.kid(g, self.reference.get("features"), st.kid_subsets, st.kid_subset_size, st.kid_seed)
        if "clip" in arrays:
            res["clip_score"] = M.clip_score(arrays["clip"])
        if "judge_ok" in arrays:
            n = len(arrays["judge_ok"])
            res["judge"] = {"n": n, "alignment": float(arrays["judge_ok"].mean()),
                            **{k: float(arrays[f"judge_{k}"].mean()) for k in JUDGE_KEYS if k != "ok"}}
        return res


def build_scorer(inception_path: str | None, reference: str | None, clip_path: str | None, resolution: int,
                 cache_dir: str, settings: ScoreSettings = ScoreSettings(), device="cpu", rank: int = 0,
                 world: int = 1, reference_images: int | None = None, reference_resize: bool = False,
                 progress: bool = False) -> Scorer:
    """Load what is given; compute (or reuse) the reference statistics. FID/KID need both an Inception file and a
    reference; CLIP score needs a CLIP folder."""
    if reference and not inception_path:
        raise FileNotFoundError("--inception: a reference was given but no Inception-v3 weights file (FID and KID "
                                "need one; nothing is downloaded)")
    sc = Scorer(settings=settings)
    if inception_path:
        sc.inception = load_inception(inception_path).to(device)
        sc.inception_sha = file_sha256(inception_path)
    if reference:
        bar = _bar(None, "reference features", progress and rank == 0)
        sc.reference = reference_stats(reference, inception=sc.inception, inception_sha=sc.inception_sha,
                                       resolution=resolution, cache_dir=cache_dir, max_images=reference_images,
                                       resize=reference_resize, rank=rank, world=world,
                                       batch_size=settings.feature_batch_size,
                                       progress=bar.update if bar is not None else None)
        if bar is not None:
            bar.close()
    if clip_path:
        sc.clip = load_clip(clip_path, device=device)
    return sc


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Generator:
    """A model and its encoders, ready to turn (prompts, seeds) into uint8 images [n, 3, H, W]."""

    model: object
    model_cfg: ModelConfig
    vae: object
    tokenizer: object = None
    text_encoder: object = None
    schedule: object = None
    height: int = 256
    width: int = 256
    vae_scale: float = VAE_SCALE
    device: object = "cpu"
    settings: SampleSettings = field(default_factory=SampleSettings)
    uncond: str = "null"

    def images(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        st = self.settings
        dev = torch.device(self.device)
        autocast = torch.bfloat16 if dev.type == "cuda" else None
        r = generate(self.model, self.model_cfg, list(prompts), vae=self.vae, tokenizer=self.tokenizer,
                     text_encoder=self.text_encoder, schedule=self.schedule, sampler=st.sampler, steps=st.steps,
                     guidance=st.guidance, seeds=list(seeds), height=self.height, width=self.width,
                     uncond=self.uncond, device=dev, batch_size=st.batch_size, autocast_dtype=autocast,
                     vae_scale=self.vae_scale)
        # the PNG a user would save (sampling.to_pil's rounding): FID sees quantised images, as it should
        return ((r.images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def _bar(total, desc, enabled):
    if not enabled:
        return None
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, file=sys.stderr,
                mininterval=0.5 if sys.stderr.isatty() else 20.0)


def write_grid(images: torch.Tensor, path: str, n: int = 64) -> str:
    pils = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images[:n]]
    atomic_write(path, make_grid(pils).save)
    return path


# ----------------------------------------------------------------------------------------------------------------
# In memory (evaluation during training)
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_model(gen: Generator, scorer: Scorer, prompts: list[str], num_images: int, grid_path: str | None = None,
                   grid_images: int = 16) -> dict:
    """Generate `num_images` images (image i: prompt i mod P, seed settings.seed + i), score them, write a grid of
    the first `grid_images`. Uses no global RNG and no data-loader state."""
    t0 = time.perf_counter()
    plist = [prompts[i % len(prompts)] for i in range(num_images)]
    seeds = [gen.settings.seed + i for i in range(num_images)]
    judge = scorer.settings.judge == "on" or (scorer.settings.judge == "auto" and judged(plist))
    bs = max(gen.settings.batch_size, 1)
    parts, first = [], None
    for i in range(0, num_images, bs):
        imgs = gen.images(plist[i:i + bs], seeds[i:i + bs])
        if first is None:
            first = imgs[:grid_images]
        elif len(first) < grid_images:
            first = torch.cat([first, imgs[:grid_images - len(first)]])
        parts.append(scorer.features(imgs, plist[i:i + bs], judge))
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    arrays["index"] = np.arange(num_images)
    res = scorer.score(arrays)
    if grid_path and first is not None:
        res["grid"] = write_grid(first, grid_path, grid_images)
    res["seconds"] = round(time.perf_counter() - t0, 3)
    return res


# ----------------------------------------------------------------------------------------------------------------
# The sharded job (`pixart-ds eval`)
# ----------------------------------------------------------------------------------------------------------------


def weights_signature(sd: dict) -> str:
    """A cheap identity of a set of weights: names, shapes and float64 sums (a changed checkpoint changes it)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k]
        h.update(f"{k}:{tuple(v.shape)}:{float(v.double().sum()):.17g};".encode())
    return h.hexdigest()[:20]


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pixart_ds", "eval")


def run_eval(gen: Generator, desc: dict, *, prompts: list[str], prompts_path: str, out: str,
             reference: str | None = None, inception: str | None = None, clip: str | None = None,
             num_images: int | None = None, score: ScoreSettings = ScoreSettings(), shard_size: int = 256,
             save_images: bool = True, grid_images: int = 64,
             cache_dir: str | None = None, reference_images: int | None = None, reference_resize: bool = False,
             rank: int = 0, world: int = 1, device="cpu", wait_timeout_s: float = 86400.0,
             progress: bool = True) -> dict | None:
    """The `pixart-ds eval` job on this rank for the model in `gen` (described by `desc`, pixart_ds.commands.eval),
    see the module docstring. Returns the record on rank 0."""
    t_start = time.time()
    sample = gen.settings
    n = int(num_images or len(prompts))
    if n < 1:
        raise ValueError(f"--num-images {n}: must be >= 1")
    if shard_size < 1:
        raise ValueError(f"--shard-size {shard_size}: must be >= 1")
    if gen.height != gen.width:
        raise ValueError(f"FID's reference is square; this evaluation would generate {gen.height}x{gen.width}")
    cache_dir = cache_dir or default_cache_dir()
    scorer = build_scorer(inception, reference, clip, gen.height, cache_dir, score, device, rank, world,
                          reference_images, reference_resize, progress)
    plist = [prompts[i % len(prompts)] for i in range(n)]
    judge = score.judge == "on" or (score.judge == "auto" and judged(plist))

    # ---- the job's identity: a rerun continues only the same job ----
    job = {"prompts_sha256": hashlib.sha256("\n".join(plist).encode()).hexdigest(), "num_images": n,
           "sample": asdict(sample), "shard_size": shard_size, "weights_signature": desc["weights_signature"],
           "height": gen.height, "width": gen.width, "inception_sha256": scorer.inception_sha,
           "clip": os.path.abspath(clip) if clip else None, "judge": judge, "save_images": save_images}
    shard_dir = os.path.join(out, "features")
    job_path = os.path.join(out, "job.json")
    os.makedirs(shard_dir, exist_ok=True)
    if rank == 0 and not os.path.isfile(job_path):
        atomic_write_json(job_path, job)
    t0 = time.time()
    while not os.path.isfile(job_path):  # the other ranks wait for rank 0's job file
        if time.time() - t0 > 600:
            raise TimeoutError(f"{job_path} did not appear (rank 0 failed?)")
        time.sleep(0.2)
    with open(job_path) as f:
        old = json.load(f)
    if old != job:
        diff = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
        raise ValueError(f"{out} holds an evaluation with other settings ({', '.join(diff)} differ): use another "
                         f"--out, or remove {out} to start over")

    # ---- this rank's shards ----
    img_dir = os.path.join(out, "images")
    if save_images:
        os.makedirs(img_dir, exist_ok=True)
    mine = [k for k in range(rank, S.num_shards(n, shard_size), world)]
    todo = sum(len(S.shard_items(k, n, shard_size)) for k in mine)
    bar = _bar(todo, f"eval rank {rank}/{world}", progress)
    t_gen = time.perf_counter()

    def compute(items: range) -> dict:
        idx = list(items)
        parts = []
        for b in range(0, len(idx), sample.batch_size):
            ib = idx[b:b + sample.batch_size]
            imgs = gen.images([plist[i] for i in ib], [sample.seed + i for i in ib])
            if save_images:
                for i, im in zip(ib, imgs):
                    pil = Image.fromarray(im.permute(1, 2, 0).numpy())
                    atomic_write(os.path.join(img_dir, f"{i:06d}.png"), pil.save, durable=False)
            parts.append(scorer.features(imgs, [plist[i] for i in ib], judge))
            if bar is not None:
                bar.update(len(ib))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    done = S.run_shards(shard_dir, n, shard_size, rank, world, compute)
    gen_seconds = time.perf_counter() - t_gen
    made = sum(len(S.shard_items(k, n, shard_size)) for k in done["computed"])
    if bar is not None:
        bar.close()
    if progress:
        rate = made / gen_seconds if gen_seconds > 0 and made else float("nan")
        print(f"pixart-ds eval: rank {rank}/{world}: {made} images generated and scored in {gen_seconds:.1f} s "
              f"({rate:.2f} images/s); {len(done['reused'])} finished shard(s) reused", file=sys.stderr, flush=True)
    # A marker per rank and run (no collectives: ranks meet only through files).
    atomic_write_json(os.path.join(shard_dir, f".rank{rank}.json"),
                      {**done, "world": world, "images": made, "seconds": gen_seconds}, durable=False)
    if rank != 0:
        return None

    S.wait_for_shards(shard_dir, n, shard_size, wait_timeout_s, "eval")
    arrays = S.gather_shards(shard_dir, n, shard_size)
    res = scorer.score(arrays)
    grid = write_grid(_load_first(img_dir, plist, sample, gen, min(grid_images, n), save_images),
                      os.path.join(out, "grid.png"), grid_images)
    ranks = _rank_markers(shard_dir, world, t_start)
    record = {
        "metrics": res,
        "checkpoint": desc,
        "prompts": {"file": os.path.abspath(prompts_path), "count": len(prompts), "images": n,
                    "sha256": job["prompts_sha256"], "judged": judge},
        "sampling": {**asdict(sample), "unconditional": gen.uncond, "height": gen.height, "width": gen.width,
                     "image_i": "prompt i mod P, seeded with seed + i"},
        "fid_kid": None if scorer.reference is None else {
            "library": "torchmetrics FrechetInceptionDistance / KernelInceptionDistance "
                       "(torch-fidelity's Inception-v3)",
            "features": "2048-d pool, uint8 images resized to 299 with TF1 bilinear (antialias off)",
            "inception": os.path.abspath(inception), "inception_sha256": scorer.inception_sha,
            "reference": {k: scorer.reference.get(k) for k in ("path", "source", "n", "resolution")},
            "kid": {"subsets": score.kid_subsets, "subset_size": score.kid_subset_size, "seed": score.kid_seed}},
        "clip": {"model": os.path.abspath(clip), "definition": "torchmetrics CLIPScore: max(mean 100*cos, 0)"}
        if clip else None,
        "sharding": {"size": shard_size, "count": S.num_shards(n, shard_size), "world_size": world,
                     "by_rank": ranks, "dir": shard_dir},
        "grid": grid, "images_dir": img_dir if save_images else None, "device": str(device),
        "seconds": round(time.time() - t_start, 1), "versions": _versions(),
    }
    atomic_write_json(os.path.join(out, "eval.json"), record)
    atomic_write_text(os.path.join(out, "eval.md"), render_md(record))
    return record


def _rank_markers(shard_dir: str, world: int, since: float, timeout_s: float = 60.0) -> dict:
    """Each rank's account of this run ({computed, reused, images, seconds}), written after its last shard: a rank
    may still be writing it when rank 0 has seen every shard, so wait a little for markers newer than `since`."""
    ranks, t0 = {}, time.time()
    while len(ranks) < world and time.time() - t0 < timeout_s:
        for r in range(world):
            p = os.path.join(shard_dir, f".rank{r}.json")
            if r not in ranks and os.path.isfile(p) and os.path.getmtime(p) >= since - 1:
                with open(p) as f:
                    ranks[r] = json.load(f)
        if len(ranks) < world:
            time.sleep(0.2)
    return ranks


def _load_first(img_dir, plist, sample, gen, k, saved) -> torch.Tensor:
    """The first k images for the grid: from the saved PNGs, or regenerated (same prompts and seeds)."""
    if saved:
        return torch.stack([torch.from_numpy(np.array(Image.open(os.path.join(img_dir, f"{i:06d}.png"))
                                                        .convert("RGB"))).permute(2, 0, 1) for i in range(k)])
    return gen.images(plist[:k], [sample.seed + i for i in range(k)])


def _versions() -> dict:
    return {"torch": torch.__version__, "torchmetrics": torchmetrics.__version__,
            "torch_fidelity": torch_fidelity.__version__, "transformers": transformers.__version__,
            "diffusers": diffusers.__version__}


def _fmt(v, nd=4):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def render_md(rec: dict) -> str:
    m, ck, s = rec["metrics"], rec["checkpoint"], rec["sampling"]
    lines = [f"# pixart-ds eval: {os.path.basename(ck['checkpoint'].rstrip('/'))}", "",
             f"{rec['prompts']['images']} images of {rec['prompts']['count']} prompts (`{rec['prompts']['file']}`), "
             f"{s['sampler']} {s['steps']} steps, guidance {s['guidance']}, seed {s['seed']} + i, "
             f"{s['height']}x{s['width']}; {ck['kind']} checkpoint `{ck['checkpoint']}` ({ck['weights']} weights).",
             "", "| metric | value |", "|---|---|"]
    if "fid" in m:
        lines.append(f"| FID | {_fmt(m['fid'], 3)} |")
        if m.get("kid"):
            lines.append(f"| KID (x 1000) | {_fmt(1000 * m['kid']['mean'], 3)} ± {_fmt(1000 * m['kid']['std'], 3)} |")
    if "clip_score" in m:
        lines.append(f"| CLIP score | {_fmt(m['clip_score'], 3)} |")
    if "judge" in m:
        j = m["judge"]
        lines.append(f"| alignment (judge: shape + colour + background) | {_fmt(j['alignment'], 3)} "
                     f"(shape {j['shape']:.2f}, colour {j['color']:.2f}, background {j['background']:.2f}) |")
    if rec.get("fid_kid"):
        fk = rec["fid_kid"]
        lines += ["", f"FID/KID: {fk['library']}; {fk['features']}; Inception weights `{fk['inception']}` (sha256 "
                      f"{fk['inception_sha256'][:12]}...); reference {fk['reference']['n']} images "
                      f"(`{fk['reference']['source']}`)."]
    lines += ["", f"![grid]({os.path.basename(rec['grid'])})", "",
              f"{rec['sharding']['count']} shard(s) of {rec['sharding']['size']} on {rec['sharding']['world_size']} "
              f"rank(s); "
              f"{rec['seconds']} s; {rec['device']}."]
    return "\n".join(lines) + "\n"
