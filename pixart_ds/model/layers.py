"""Embedders, MLP, modulation and the final layer of PixArt-alpha / DiT.

Module and parameter names follow the official code (PixArt-alpha diffusion/model/nets/PixArt_blocks.py,
facebookresearch DiT models.py) so an official checkpoint maps onto ours key for key.
"""
from __future__ import annotations

import math

import torch
from torch import nn

FREQ_DIM = 256  # sinusoidal features fed to the timestep / size MLPs (DiT, PixArt)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift (PixArt t2i_modulate); x [B, N, C], shift/scale [B, 1, C]."""
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0,
                       freq_shift: float = 0.0) -> torch.Tensor:
    """t [B] (any real dtype) -> [B, dim] float32 = [cos(t w), sin(t w)], w_k = max_period^(-k / (dim/2 - shift)).

    freq_shift = 0 is DiT / PixArt (and diffusers' PixArt, `downscale_freq_shift=0`); diffusers'
    DiTTransformer2DModel uses `downscale_freq_shift=1`, which the DiT converter reproduces to evaluate such a model.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    args = t.reshape(-1).float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar -> vector: sinusoid(256) -> Linear -> SiLU -> Linear (DiT). Key names mlp.0 / mlp.2."""

    def __init__(self, hidden_size: int, freq_dim: int = FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # [B] -> [B, hidden]
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class SizeEmbedder(TimestepEmbedder):
    """PixArtMS micro-condition embedder: each of the k scalars of s [B, k] is embedded like a timestep and the
    k vectors are concatenated -> [B, k * out]. Used for (h, w) in pixels (k = 2) and the aspect ratio (k = 1),
    each `hidden/3` wide so that their concatenation adds onto the timestep embedding (official PixArtMS.py)."""

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        if s.ndim == 1:
            s = s[:, None]
        B, k = s.shape
        return super().forward(s.reshape(-1)).reshape(B, -1)


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (timm Mlp as used by PixArt blocks and the caption projection)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """T5 features [B, L, caption_channels] -> [B, L, hidden] through y_proj (4096 -> hidden -> hidden, GELU tanh).

    y_embedding [L, caption_channels] is the null caption for classifier-free guidance: it replaces a dropped caption
    as a whole. The official code registers it with `register_buffer`, so it is saved in checkpoints but is not a
    parameter and the optimizer never updates it (it keeps its random init); the paper's 610,856,096 count
    (reference: PixArt-XL/2) excludes it. We do the same, which keeps checkpoints and counts identical.
    """

    def __init__(self, caption_channels: int, hidden_size: int, token_num: int):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, caption_channels) / caption_channels**0.5)

    def forward(self, y: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if drop is not None:
            y = torch.where(drop.to(y.device).reshape(-1, 1, 1), self.y_embedding.to(y.dtype)[None], y)
        return self.y_proj(y)


class LabelEmbedder(nn.Module):
    """Class label -> vector; row num_classes is the null class used for classifier-free guidance (DiT)."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        labels = labels.reshape(-1).long()
        if drop is not None:
            labels = torch.where(drop.to(labels.device).reshape(-1), torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """[B, C, h, w] -> [B, (h/p)*(w/p), hidden] by a stride-p convolution (key x_embedder.proj)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Contiguous tokens-major once here: the transposed view would otherwise set the memory layout of the whole
        # residual stream (elementwise ops keep their first input's strides), and every LayerNorm and Linear of
        # every block, forward and backward, would copy it back (about 5% of a CPU step at PixArt-S/2).
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class FinalLayer(nn.Module):
    """LayerNorm -> modulate -> Linear(hidden, p*p*out_channels).

    adaLN-single: shift/scale = scale_shift_table [2, hidden] + the timestep embedding t (before t_block), as in
    PixArt's T2IFinalLayer. Per-block adaLN: shift/scale = adaLN_modulation(c) (DiT FinalLayer).
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, adaln: str):
        super().__init__()
        self.adaln = adaln
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        if adaln == "single":
            self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def modulation(self, c: torch.Tensor) -> torch.Tensor:
        """c [B, hidden] -> [B, 2, hidden] (shift, scale)."""
        if self.adaln == "single":
            return self.scale_shift_table[None] + c[:, None]
        return self.adaLN_modulation(c).reshape(c.shape[0], 2, -1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=1)  # each [B, 1, hidden]
        return self.linear(modulate(self.norm_final(x), shift, scale))
