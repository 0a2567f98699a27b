"""Fixed 2-D sin-cos positional embeddings with an interpolation scale.

Follows the official PixArt-alpha `get_2d_sincos_pos_embed(embed_dim, grid_size, lewei_scale, base_size)`
(diffusion/model/nets/PixArt.py) and diffusers' `get_2d_sincos_pos_embed(..., interpolation_scale, base_size)`:
the token at row i of an h-row grid sits at position  i * base_size / (h * interpolation_scale),  where
base_size = (training latent size) // patch_size. At the training grid this is i / interpolation_scale, so
0.5 / 1 / 2 at 256 / 512 / 1024 px keeps the positions of a 1024-px model on the same scale as a 512-px one
(paper §2.4 trains 512 -> 1024 by fine-tuning). A multi-scale model calls this per (h, w) bucket.
"""
from __future__ import annotations

import torch


def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos [M] -> [M, embed_dim] = [sin(pos * omega), cos(pos * omega)], omega_k = 10000^(-2k/embed_dim).

    Frequencies in float64 as in the official numpy code and diffusers; the result is float32.
    """
    if embed_dim % 2:
        raise ValueError(f"positional embedding width must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=pos.device) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [D/2]
    out = torch.outer(pos.reshape(-1).to(torch.float64), omega)  # [M, D/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).to(torch.float32)


def sincos_2d(embed_dim: int, grid_hw: tuple[int, int], base_size: int, interpolation: float = 1.0,
              device=None) -> torch.Tensor:
    """-> [h*w, embed_dim], rows in h-major token order (the order of PatchEmbed's flatten).

    The first half of the channels encodes the column (w) coordinate and the second half the row (h) coordinate:
    the official code builds `np.meshgrid(grid_w, grid_h)` ("here w goes first") and diffusers keeps that order.
    """
    h, w = int(grid_hw[0]), int(grid_hw[1])
    if embed_dim % 4:
        raise ValueError(f"2-D positional embedding width must be divisible by 4, got {embed_dim}")
    # float32 positions, as both references compute them
    grid_h = torch.arange(h, dtype=torch.float32, device=device) / (h / base_size) / interpolation
    grid_w = torch.arange(w, dtype=torch.float32, device=device) / (w / base_size) / interpolation
    gw, gh = torch.meshgrid(grid_w, grid_h, indexing="xy")  # each [h, w]
    emb_w = sincos_1d(embed_dim // 2, gw.reshape(-1))  # [h*w, D/2]
    emb_h = sincos_1d(embed_dim // 2, gh.reshape(-1))
    return torch.cat([emb_w, emb_h], dim=1)
