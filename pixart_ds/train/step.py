"""train_step(): one optimizer step. The one step used by the trainer, the tests and the benchmarks.

For each micro-batch (there are `gradient_accumulation_steps` of them, derived from the recipe's global batch and
the world size by config.batch_plan):

    t ~ U{0..T-1} [B], eps ~ N(0, I) [B, C, h, w]          (official train.py: torch.randint, torch.randn_like)
    x_t = q_sample(x_0, t, eps)                             (DDPM eq. 4)
    out = model(x_t, t, y, mask, drop, data_info)           [B, 2C, h, w] (epsilon + variance interpolation)
    loss = mean_B(mse + vb)                                 (improved DDPM hybrid loss, diffusion/losses.py)
    engine.backward(loss); engine.step()

`engine.step()` is called after EVERY micro-batch: DeepSpeed counts micro-batches itself and runs the optimizer
only at the accumulation boundary; calling backward several times before one step would make ZeRO-2 drop the
earlier gradients (docs/stack.md). DeepSpeed scales each micro-batch loss by 1/accumulation, so the update uses the
mean gradient over the global batch.

Non-finite loss or gradients: DeepSpeed's overflow check (bf16 check_grad_overflow, fp16 loss scaling, fp32
invalid-norm check in ZeRO) skips the update; `skipped` reports it and `nonfinite` says whether it counts towards
train.max_nonfinite_steps (fp16 loss-scale search skips are normal while the loss is finite).

`poison_loss` (fault injection, train/faults.py) makes this rank's loss NaN, so the gradients of every rank become
non-finite after the reduction.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as tdist

from pixart_ds import dist
from pixart_ds.diffusion.losses import training_losses
from pixart_ds.train import zero


def model_inputs(batch: dict, cfg, device: torch.device, dtype: torch.dtype) -> dict:
    """Keyword arguments of PixArt.forward (besides x and t) from a loader batch, on `device`.

    Float conditioning (T5 features) is cast to the engine dtype: DeepSpeed does not auto-cast inputs. Copies are
    non-blocking: from the loader's page-locked batches (data.pin_memory) they overlap with the GPU's work; the
    dtype cast runs on the device after the copy (a cast on the host would copy from unpinned memory).
    """
    kw: dict = {}
    if cfg.model.condition == "text":
        kw["y"] = batch["text_emb"].to(device, non_blocking=True).to(dtype)  # [B, L, D]
        kw["mask"] = batch["text_mask"].to(device, non_blocking=True)  # [B, L]
    else:
        kw["y"] = batch["label"].to(device, non_blocking=True)  # [B]
    if "drop" in batch:
        kw["drop"] = batch["drop"].to(device, non_blocking=True)  # [B] bool
    if cfg.model.multi_scale:
        kw["data_info"] = {"img_hw": batch["img_hw"].to(device, non_blocking=True),  # [B, 2]
                           "aspect_ratio": batch["aspect_ratio"].to(device, non_blocking=True)}  # [B, 1]
    return kw


def current_lr(engine) -> float:
    """The lr the next optimizer update uses (the warm-up scheduler steps after each applied update)."""
    return float(engine.optimizer.param_groups[0]["lr"])


def train_step(engine, batch, schedule, cfg, generator: Optional[torch.Generator] = None,
               poison_loss: bool = False) -> dict:
    """One optimizer step over `batch`: a list of `engine.gradient_accumulation_steps()` micro-batch dicts (a
    single dict when accumulation is 1). Returns floats averaged over the GLOBAL batch (all ranks):
    loss, mse, vb, grad_norm (before clipping), lr (used by this update), skipped (1.0 if the update was skipped),
    nonfinite (1.0 if it counts towards train.max_nonfinite_steps), images (global batch size)."""
    micro_batches = list(batch) if isinstance(batch, (list, tuple)) else [batch]
    accum = engine.gradient_accumulation_steps()
    if len(micro_batches) != accum:
        raise ValueError(f"train_step: got {len(micro_batches)} micro-batches but the engine accumulates {accum}")
    device = engine.device
    dtype = zero.engine_dtype(engine)
    gen_device = generator.device if generator is not None else device
    lr = current_lr(engine)

    engine.train()
    # [sum loss, sum mse, sum vb] over this rank's micro-batches, on the device: nothing in this loop reads a value
    # back to the host (no .item(), no bool(tensor)), so the micro-batches queue up without waiting for the GPU;
    # the one synchronisation is the .tolist() after the loop.
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    samples = 0
    for mb in micro_batches:
        x0 = mb["latent"].to(device, non_blocking=True).float()  # [B, C, h, w], already x vae_scale
        B = x0.shape[0]
        t = schedule.sample_timesteps(B, generator=generator, device=device)  # [B] int64
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)
        x_t = schedule.q_sample(x0, t, noise)  # [B, C, h, w] float32
        out = engine(x_t.to(dtype), t, **model_inputs(mb, cfg, device, dtype))  # [B, 2C, h, w]
        losses = training_losses(out, x0, x_t, t, noise, schedule, pred_sigma=cfg.model.pred_sigma)
        loss = losses["loss"].mean()
        if poison_loss:
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
        with torch.no_grad():
            stats += torch.stack([loss.detach().double() * B, losses["mse"].detach().double().sum(),
                                  losses["vb"].detach().double().sum()])
        samples += B
    stats = torch.cat([stats, stats.new_tensor([float(samples)])])  # [4]: + samples (after the loop)
    if dist.is_multi():
        tdist.all_reduce(stats)
    s = stats.tolist()
    n = max(s[3], 1.0)
    applied = bool(engine.was_step_applied())
    gn = engine.get_global_grad_norm()
    grad_norm = float(gn) if gn is not None else float("nan")
    loss_v = s[0] / n
    skipped = not applied
    if engine.fp16_enabled():
        # Loss-scale search skips steps with finite loss by design; only a non-finite loss counts.
        nonfinite = skipped and not math.isfinite(loss_v)
    else:
        nonfinite = skipped or not math.isfinite(loss_v)
    out = {"loss": loss_v, "mse": s[1] / n, "vb": s[2] / n, "grad_norm": grad_norm, "lr": lr,
           "skipped": float(skipped), "nonfinite": float(nonfinite), "images": float(s[3])}
    scale = zero.loss_scale(engine)
    if scale is not None:
        out["loss_scale"] = scale
    return out
