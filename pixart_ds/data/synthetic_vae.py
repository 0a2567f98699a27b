"""A small AutoencoderKL fitted to the embedded dataset, for the demo.

The demo cannot download SD's VAE, and a random VAE decodes to noise, so the alignment score of generated images
would mean nothing. This module fits a small diffusers `AutoencoderKL` (the SD layout: 4 blocks, downsample 8,
4 latent channels) to images of `pixart_ds.data.synthetic` and saves it with `save_pretrained`; the result ships
in `pixart_ds/data/assets/synthetic_vae/` and the demo loads it through `AutoencoderKL.from_pretrained` like any
other VAE. Rebuild it with

    pixart-ds fit-vae --out pixart_ds/data/assets/synthetic_vae --steps 4000

(about a minute on one H200; hours on a 2-core CPU). `scaling_factor` in its config.json is 1 / std of the posterior means, so scaled
latents have unit variance, as 0.18215 does for SD's VAE.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from diffusers import AutoencoderKL

from pixart_ds.data import synthetic
from pixart_ds.fsutil import atomic_write_json, write_dir_atomic

ASSET_DIR = os.path.join(os.path.dirname(__file__), "assets", "synthetic_vae")
RESOLUTION = 128
BLOCK_OUT_CHANNELS = (16, 32, 32, 32)


def _render_chunk(args):
    start, stop, seed, resolution = args
    return np.stack([np.asarray(synthetic.render(synthetic.attributes(i, seed), resolution)) for i in range(start, stop)])


def render_images(n: int, seed: int, resolution: int, workers: int = 2) -> torch.Tensor:
    """[n, 3, R, R] uint8 images of the embedded dataset (rendered in parallel)."""
    chunks = [(s, min(s + 512, n), seed, resolution) for s in range(0, n, 512)]
    with ProcessPoolExecutor(max_workers=workers) as ex:
        arrays = list(ex.map(_render_chunk, chunks))
    return torch.from_numpy(np.concatenate(arrays)).permute(0, 3, 1, 2).contiguous()


def build_vae():
    n = len(BLOCK_OUT_CHANNELS)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=BLOCK_OUT_CHANNELS, layers_per_block=1, norm_num_groups=8, sample_size=RESOLUTION,
    )


def fit(out: str, steps: int = 4000, batch_size: int = 64, num_images: int = 20000, seed: int = 1234,
        lr: float = 1e-3, kl_weight: float = 1e-6, device: str | None = None, workers: int = 2) -> dict:
    for name, value in (("steps", steps), ("batch-size", batch_size), ("num-images", num_images),
                        ("workers", workers)):
        if value < 1:
            raise ValueError(f"--{name} {value}: must be >= 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    t0 = time.time()
    # A seed of its own so the VAE never sees the exact images the demo's diffusion model trains on.
    images = render_images(num_images, seed=seed, resolution=RESOLUTION, workers=workers)
    vae = build_vae().to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x = images[idx].to(device).float() / 127.5 - 1.0
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        # L1 + L2 keeps flat colours exact and edges sharp; a tiny KL keeps the posterior well-conditioned.
        loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean() + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    vae.eval()
    with torch.no_grad():
        held = render_images(512, seed=seed + 1, resolution=RESOLUTION, workers=workers)
        x = held.to(device).float() / 127.5 - 1.0
        means = torch.cat([vae.encode(x[i:i + 128]).latent_dist.mean for i in range(0, len(x), 128)])
        rec = torch.cat([vae.decode(means[i:i + 128]).sample for i in range(0, len(x), 128)]).clamp(-1, 1)
        mse = float(((rec - x) ** 2).mean())
        scale = float(1.0 / means.float().std())
        rec_u8 = ((rec + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
        ok = [synthetic.judge(rec_u8[i], synthetic.attributes(i, seed + 1))["ok"] for i in range(len(rec_u8))]
    vae.register_to_config(scaling_factor=scale)
    vae = vae.to("cpu", torch.float32)

    def write(tmp: str) -> None:
        vae.save_pretrained(tmp)
        atomic_write_json(os.path.join(tmp, "fit.json"), stats)

    stats = {"steps": steps, "batch_size": batch_size, "num_images": num_images, "resolution": RESOLUTION,
             "recon_mse": mse, "judge_ok_on_reconstructions": float(np.mean(ok)), "scaling_factor": scale,
             "seconds": round(time.time() - t0, 1), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    write_dir_atomic(out, write, replace=True)
    return stats

