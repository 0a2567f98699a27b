"""Sampling with classifier-free guidance through diffusers' schedulers (used by `pixart-ds sample`, `eval` and the
trainer's sample grids).

Samplers (paper §3 / official scripts/inference.py): DPM-Solver++ multistep, order 2 (the default: 20 steps,
guidance 4.5), DDIM and ancestral DDPM. All three are diffusers schedulers configured with our training betas
(`Schedule.diffusers_config()`), so the timestep tables are the ones the network was trained on.

Classifier-free guidance (Ho & Salimans 2022, eq. 6): eps = eps_u + w (eps_c - eps_u), applied to all C channels
of the epsilon half and to nothing else; the learned-variance half (used by DDPM's learned_range step) is taken from
the conditional branch, as the official `forward_with_cfg` does. (That function guides only the first 3 channels, a
shortcut inherited from DiT; diffusers' PixArtAlphaPipeline and we guide all 4.) The unconditional input is, in order of preference,
- the model's null caption (`y_embedding`, paper §2.4, swapped in at training with probability 0.1): the model is
  called with drop=True and treats the null caption as L real tokens, the same way it saw it in training;
- T5 features of "" with their own mask, for weights without a trained null caption (the diffusers format drops it
  and diffusers' PixArtAlphaPipeline uses T5("") as its negative prompt);
- the null class index (drop=True) for class-conditional models, whose "prompts" are class ids.
Both branches run as one batch [uncond; cond], the order diffusers uses. At guidance 1.0 the unconditional branch
is skipped: the result is exactly the conditional model.
"""
from __future__ import annotations

import inspect
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as pixart_pipeline
from PIL import Image
from tqdm.auto import tqdm

from pixart_ds.config import VAE_DOWNSAMPLE, VAE_SCALE, ModelConfig
from pixart_ds.diffusion.schedule import Schedule
from pixart_ds.model.encoders import clean_caption, encode_text, text_width, vae_decode

SAMPLERS = ("dpm-solver", "ddim", "ddpm")


# ----------------------------------------------------------------------------------------------------------------
# Schedulers
# ----------------------------------------------------------------------------------------------------------------


def dpm_solver_config(schedule: Schedule) -> dict:
    """DPM-Solver++(2M) as PixArt samples (official: DPMS(..., order 2, multistep, dpmsolver++, time_uniform));
    the same dict is written into exported pipelines, so ours and diffusers' step identically."""
    return dict(**schedule.diffusers_config(), algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                prediction_type="epsilon", lower_order_final=True, timestep_spacing="linspace", steps_offset=0,
                thresholding=False, use_karras_sigmas=False, final_sigmas_type="zero")


def make_scheduler(sampler: str, schedule: Schedule, pred_sigma: bool = True):
    """A diffusers scheduler with our betas. Latents are unbounded: no x0 clipping or thresholding anywhere."""
    if sampler == "dpm-solver":
        return DPMSolverMultistepScheduler(**dpm_solver_config(schedule))
    if sampler == "ddim":
        # eta = 0; the last step lands on alpha_bar = 1 (the x0 prediction), timesteps spread over [0, T-1].
        return DDIMScheduler(**schedule.diffusers_config(), clip_sample=False, set_alpha_to_one=True,
                             timestep_spacing="linspace", prediction_type="epsilon")
    if sampler == "ddpm":
        # Ancestral sampling with the network's learned variance (improved DDPM eq. 15) when it predicts one.
        return DDPMScheduler(**schedule.diffusers_config(), clip_sample=False, timestep_spacing="linspace",
                             variance_type="learned_range" if pred_sigma else "fixed_small",
                             prediction_type="epsilon")
    raise ValueError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")


# ----------------------------------------------------------------------------------------------------------------
# Guidance
# ----------------------------------------------------------------------------------------------------------------


def _cat(a, b):
    if a is None and b is None:
        return None
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    return torch.cat([a, b], dim=0)


class GuidedDenoiser:
    """model(x [B, C, h, w], t [B]) -> guided output [B, out_ch, h, w] for a fixed batch of conditions.

    cond / uncond: keyword arguments of `PixArt.forward` for the batch (y, mask, drop, data_info), tensors with
    leading dimension B. `latent_channels` = C, the width of the epsilon half.
    """

    def __init__(self, model: Callable, cond: dict, uncond: Optional[dict], guidance: float, latent_channels: int,
                 autocast_dtype: Optional[torch.dtype] = None):
        if guidance != 1.0 and uncond is None:
            raise ValueError(f"guidance {guidance} needs an unconditional input")
        self.model, self.cond, self.uncond = model, cond, uncond
        self.guidance, self.C, self.autocast_dtype = float(guidance), latent_channels, autocast_dtype

    def _forward(self, x, t, kw):
        if self.autocast_dtype is not None:
            with torch.autocast(x.device.type, dtype=self.autocast_dtype):
                return self.model(x, t, **kw).float()
        return self.model(x, t, **kw).float()

    def both(self, x: torch.Tensor, t: torch.Tensor):
        """(unconditional, conditional) outputs from one batched call, [B, out_ch, h, w] each."""
        out = self._forward(torch.cat([x, x]), torch.cat([t, t]), _cat(self.uncond, self.cond))
        return out.chunk(2)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.guidance == 1.0:
            return self._forward(x, t, self.cond)
        u, c = self.both(x, t)
        return cfg_combine(u, c, self.guidance, self.C)


def cfg_combine(u: torch.Tensor, c: torch.Tensor, guidance: float, latent_channels: int) -> torch.Tensor:
    """The guidance formula (Ho & Salimans eq. 6) on the epsilon half of [B, out_ch, h, w] outputs; the variance
    half comes from the conditional branch."""
    C = latent_channels
    return torch.cat([u[:, :C] + guidance * (c[:, :C] - u[:, :C]), c[:, C:]], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# The sampling loop
# ----------------------------------------------------------------------------------------------------------------


def initial_noise(shape: tuple[int, int, int], seeds: list[int], device) -> tuple[torch.Tensor, list]:
    """x_T ~ N(0, I) [N, C, h, w], one CPU generator per image (seed i -> image i whatever the batch or device);
    the same draws diffusers makes with `generator=torch.Generator().manual_seed(seed)` for one image."""
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    x = torch.cat([torch.randn((1, *shape), generator=g) for g in gens]).to(device)
    return x, gens


@torch.no_grad()
def sample_latents(denoiser: Callable, scheduler, noise: torch.Tensor, steps: int, generators=None,
                   progress: bool = False) -> torch.Tensor:
    """Run `scheduler` for `steps` steps from x_T = noise [B, C, h, w]; returns x_0 latents [B, C, h, w] float32.

    DPM-Solver and DDIM get only the epsilon half; DDPM (learned_range) gets [eps, v] for its variance.
    """
    C = noise.shape[1]
    scheduler.set_timesteps(steps, device=noise.device)
    wants_var = getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    x = noise.float() * scheduler.init_noise_sigma
    extra = {"generator": generators} if generators is not None and _step_takes_generator(scheduler) else {}
    for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
        inp = scheduler.scale_model_input(x, t)
        tt = t.reshape(1).to(noise.device).expand(x.shape[0])
        out = denoiser(inp, tt)
        out = out if wants_var and out.shape[1] == 2 * C else out[:, :C]
        x = scheduler.step(out, t, x, **extra, return_dict=False)[0]
    return x


def _step_takes_generator(scheduler) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters


# ----------------------------------------------------------------------------------------------------------------
# Text conditions
# ----------------------------------------------------------------------------------------------------------------


def preprocess_prompt(p: str) -> str:
    return clean_caption(p)


def encode_prompts(tokenizer, text_encoder, prompts: list[str], max_length: int, device) -> tuple:
    """T5 features [N, L, D] float32 and mask [N, L] int64 of the preprocessed prompts; warns on truncation."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        emb, mask = encode_text(tokenizer, text_encoder, [preprocess_prompt(p) for p in prompts], max_length)
    return emb.float().to(device), mask.to(device)


def check_text_width(text_encoder, caption_channels: int, path: str) -> None:
    d = text_width(text_encoder)
    if d != caption_channels:
        raise ValueError(f"text encoder {path}: width d_model={d} does not match the model's "
                         f"caption_channels={caption_channels}")


def build_conditions(model_cfg: ModelConfig, prompts: list[str], *, tokenizer=None, text_encoder=None,
                     uncond: str = "null", device="cpu", data_info: Optional[dict] = None) -> tuple[dict, dict]:
    """(cond, uncond) keyword arguments of PixArt.forward for a batch of N prompts.

    uncond: "null" = the null caption y_embedding / null class (drop=True); "empty" = T5 features of "".
    data_info: {"img_hw": [N, 2], "aspect_ratio": [N, 1]} for multi-scale models (added to both).
    """
    n = len(prompts)
    keep = torch.zeros(n, dtype=torch.bool, device=device)
    drop = torch.ones(n, dtype=torch.bool, device=device)
    if model_cfg.condition == "class":
        labels = []
        for p in prompts:
            if not re.fullmatch(r"\s*\d+\s*", p) or not 0 <= int(p) < model_cfg.num_classes:
                raise ValueError(f"prompt {p!r}: a class-conditional model takes class ids "
                                 f"0..{model_cfg.num_classes - 1}")
            labels.append(int(p))
        y = torch.tensor(labels, dtype=torch.long, device=device)
        cond, unc = dict(y=y, drop=keep), dict(y=y, drop=drop)
    else:
        max_len = model_cfg.max_text_tokens
        emb, mask = encode_prompts(tokenizer, text_encoder, prompts, max_len, device)
        cond = dict(y=emb, mask=mask, drop=keep)
        if uncond == "null":
            unc = dict(y=emb, mask=mask, drop=drop)
        elif uncond == "empty":
            e, m = encode_prompts(tokenizer, text_encoder, [""] * n, max_len, device)
            unc = dict(y=e, mask=m, drop=keep)
        else:
            raise ValueError(f"unknown unconditional input {uncond!r} (null | empty)")
    if data_info is not None:
        cond["data_info"] = data_info
        unc["data_info"] = data_info
    return cond, unc


# ----------------------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------------------


def parse_aspect_ratio(s: str) -> float:
    """'16:9' (width:height) or '1.5' (width/height) -> height / width."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*[:x/]\s*(\d+(?:\.\d+)?)\s*", s)
    try:
        w_over_h = float(m.group(1)) / float(m.group(2)) if m else float(s)
    except (ValueError, ZeroDivisionError):
        w_over_h = -1.0
    if not w_over_h > 0 or not math.isfinite(w_over_h):
        raise ValueError(f"--aspect-ratio {s!r}: expected W:H such as 16:9, or a positive number W/H")
    return 1.0 / w_over_h


def image_size(resolution: int, aspect_ratio: Optional[str], patch_size: int, multi_scale: bool) -> tuple[int, int]:
    """(height, width) in pixels. Square at `resolution`, or for multi-scale models the paper's aspect-ratio bucket
    nearest to the request (official ASPECT_RATIO_{256,512,1024} tables, as in diffusers) or, at other resolutions,
    about resolution^2 pixels rounded to the patch grid."""
    mult = VAE_DOWNSAMPLE * patch_size
    if resolution % mult:
        raise ValueError(f"resolution {resolution} is not a multiple of 8 x patch size = {mult}")
    if aspect_ratio is None:
        return resolution, resolution
    if not multi_scale:
        raise ValueError(f"--aspect-ratio {aspect_ratio}: this model is not multi-scale (model.multi_scale is false); "
                         f"it samples square {resolution}x{resolution} images only")
    r = parse_aspect_ratio(aspect_ratio)
    table = _ratio_table(resolution)
    if table:
        key = min(table, key=lambda k: abs(float(k) - r))
        h, w = (int(v) for v in table[key])
    else:
        w = resolution / math.sqrt(r)
        h, w = round(w * r / mult) * mult, round(w / mult) * mult
        h, w = max(h, mult), max(w, mult)
    return h, w


def _ratio_table(resolution: int) -> Optional[dict]:
    return {256: pixart_pipeline.ASPECT_RATIO_256_BIN, 512: pixart_pipeline.ASPECT_RATIO_512_BIN,
            1024: pixart_pipeline.ASPECT_RATIO_1024_BIN}.get(resolution)


# ----------------------------------------------------------------------------------------------------------------
# One call: prompts -> images
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SampleResult:
    images: torch.Tensor  # [N, 3, H, W] in [-1, 1], float32, CPU
    latents: torch.Tensor  # [N, C, h, w] scaled latents, float32, CPU
    seeds: list = field(default_factory=list)


@torch.no_grad()
def generate(model, model_cfg: ModelConfig, prompts: list[str], *, vae, tokenizer=None, text_encoder=None,
             schedule: Optional[Schedule] = None, sampler: str = "dpm-solver", steps: int = 20,
             guidance: float = 4.5, seeds: Optional[list[int]] = None, height: int = 256, width: int = 256,
             uncond: str = "null", device="cpu", batch_size: int = 8, autocast_dtype=None,
             progress: bool = False, vae_scale: float = VAE_SCALE) -> SampleResult:
    """Sample one image per prompt. `model` is a PixArt (or anything with its forward signature) in eval mode
    on `device`; seeds[i] seeds image i (default 0..N-1)."""
    schedule = schedule or Schedule.linear()
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    C, pred_sigma = model_cfg.in_channels, model_cfg.pred_sigma
    h, w = height // VAE_DOWNSAMPLE, width // VAE_DOWNSAMPLE
    images, latents = [], []
    for i in range(0, len(prompts), batch_size):
        chunk, chunk_seeds = prompts[i:i + batch_size], seeds[i:i + batch_size]
        n = len(chunk)
        data_info = None
        if model_cfg.multi_scale:
            data_info = {"img_hw": torch.tensor([[float(height), float(width)]] * n, device=device),
                         "aspect_ratio": torch.tensor([[height / width]] * n, device=device)}
        cond, unc = build_conditions(model_cfg, chunk, tokenizer=tokenizer, text_encoder=text_encoder,
                                     uncond=uncond, device=device, data_info=data_info)
        den = GuidedDenoiser(model, cond, unc, guidance, C, autocast_dtype)
        noise, gens = initial_noise((C, h, w), chunk_seeds, device)
        sch = make_scheduler(sampler, schedule, pred_sigma)
        z = sample_latents(den, sch, noise, steps, generators=gens, progress=progress)
        latents.append(z.cpu())
        images.append(vae_decode(vae, z, scale=vae_scale).float().cpu())
    return SampleResult(torch.cat(images), torch.cat(latents), seeds)


def to_pil(images: torch.Tensor) -> list:
    """[N, 3, H, W] in [-1, 1] -> PIL images, rounded as diffusers' image processor does."""
    arr = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def make_grid(pils: list, cols: Optional[int] = None, pad: int = 2):
    n = len(pils)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = pils[0].size
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), (255, 255, 255))
    for i, im in enumerate(pils):
        r, c = divmod(i, cols)
        grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
