"""Self- and cross-attention around ONE seam, `attention()`, with three kernels:

- ``flash``: flash-attn 2 (`flash_attn_func` for self-attention; `flash_attn_varlen_func` for cross-attention over
  the caption tokens packed without padding, as the official PixArt code does with xformers'
  BlockDiagonalMask: diffusion/model/nets/PixArt_blocks.py MultiHeadCrossAttention).
- ``sdpa``: torch.nn.functional.scaled_dot_product_attention. Self-attention is called WITHOUT a mask so torch may
  pick its own FlashAttention-2 backend on a GPU that lacks the flash-attn package; cross-attention passes a boolean
  key mask (torch then uses the memory-efficient or math backend).
- ``math``: the explicit softmax(q k^T / sqrt(d)) v in float32, the reference the other two are tested against.

``auto`` = flash when flash-attn imports and the tensors are fp16/bf16 on CUDA, otherwise sdpa.

Padding semantics (all backends agree): a key whose mask is 0 gets no weight. A caption whose mask is all 0 has no
key at all; its attention output (the weighted sum of values, before the output projection) is defined as 0, the
empty sum, instead of the NaN of a softmax over nothing. flash-attn's varlen kernel does the same for a zero-length
key sequence. diffusers' PixArtTransformer2DModel adds a -10000 bias instead of masking, which
gives exactly the same result whenever a caption has at least one real token (exp(-10000) underflows to 0 in fp32)
and a uniform average over padding when it has none.

Shapes: q [B, Lq, H, D]; k, v [B, Lk, H, D] dense, or [T, H, D] packed (T = real caption tokens in the batch).
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("auto", "flash", "sdpa", "math")


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def check_backend(name: str) -> None:
    """Fail early (at model construction) for an unknown or unavailable backend."""
    if name not in BACKENDS:
        raise ValueError(f"model.attention: {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "flash" and not flash_available():
        raise ValueError("model.attention: 'flash' needs the flash-attn package, which is not installed "
                         "(pip install 'pixart_ds[flash]' on a CUDA machine, or use attention=sdpa/auto)")


def resolve_backend(name: str, x: torch.Tensor) -> str:
    """The kernel a call on tensor `x` will use."""
    if name == "auto":
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and flash_available():
            return "flash"
        return "sdpa"
    if name == "flash" and not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)):
        raise ValueError(f"attention=flash needs fp16/bf16 CUDA tensors, got {x.dtype} on {x.device} "
                         "(use attention=auto to fall back to sdpa)")
    return name


@dataclass
class TextContext:
    """Projected caption tokens for cross-attention, built once per forward and shared by all blocks.

    Dense (sdpa/math): y [B, L, C], mask [B, L] bool. Packed (flash): y [T, C] real tokens only, cu_seqlens [B+1]
    int32 offsets, max_seqlen. `empty` [B] bool marks captions with no real token; the one placeholder key they are
    given (the first token, so no kernel sees an empty softmax) is cancelled by zeroing their output.
    """

    y: torch.Tensor
    mask: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: int = 0
    empty: Optional[torch.Tensor] = None

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None


def make_text_context(y: torch.Tensor, mask: Optional[torch.Tensor], pack: bool) -> TextContext:
    """y [B, L, C]; mask [B, L] (nonzero = real token) or None (all real)."""
    B, L, _ = y.shape
    if mask is None:
        mask = torch.ones(B, L, dtype=torch.bool, device=y.device)
    mask = mask.to(device=y.device) != 0
    if mask.shape != (B, L):
        raise ValueError(f"caption mask shape {tuple(mask.shape)} does not match caption features {tuple(y.shape)}")
    lens = mask.sum(dim=1)
    empty = lens == 0
    has_empty = bool(empty.any())
    if has_empty:
        mask = mask.clone()
        mask[empty, 0] = True
        lens = mask.sum(dim=1)
    if not pack:
        return TextContext(y=y, mask=mask, empty=empty if has_empty else None)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=y.device)
    cu[1:] = torch.cumsum(lens, dim=0)
    return TextContext(y=y[mask], cu_seqlens=cu, max_seqlen=int(lens.max()), empty=empty if has_empty else None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto",
              kv_mask: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
              max_seqlen_k: int = 0) -> torch.Tensor:
    """The one attention seam. q [B, Lq, H, D]; k, v [B, Lk, H, D] (kv_mask [B, Lk] bool, True = attend) or packed
    [T, H, D] with cu_seqlens_k [B+1] (flash only). Returns [B, Lq, H, D] in q's dtype."""
    backend = resolve_backend(backend, q)
    B, Lq, H, D = q.shape
    if cu_seqlens_k is not None:
        if backend != "flash":
            raise ValueError("packed keys (cu_seqlens_k) need attention=flash")
        from flash_attn import flash_attn_varlen_func  # optional: pip install 'pixart_ds[flash]'

        cu_q = torch.arange(0, (B + 1) * Lq, Lq, dtype=torch.int32, device=q.device)
        out = flash_attn_varlen_func(q.reshape(B * Lq, H, D), k, v, cu_q, cu_seqlens_k, Lq, max_seqlen_k)
        return out.reshape(B, Lq, H, D)
    if backend == "flash":
        if kv_mask is not None and not bool(kv_mask.all()):
            raise ValueError("attention=flash takes padded keys packed (cu_seqlens_k), not a dense mask")
        from flash_attn import flash_attn_func  # optional: pip install 'pixart_ds[flash]'

        return flash_attn_func(q, k, v)
    if backend == "sdpa":
        attn_mask = None if kv_mask is None else kv_mask[:, None, None, :]  # [B, 1, 1, Lk] broadcast over heads/q
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attn_mask)
        return out.transpose(1, 2)
    if backend == "math":
        qf, kf, vf = (t.transpose(1, 2).float() for t in (q, k, v))  # [B, H, L, D]
        scores = qf @ kf.transpose(-1, -2) / math.sqrt(D)  # [B, H, Lq, Lk]
        if kv_mask is not None:
            scores = scores.masked_fill(~kv_mask[:, None, None, :], float("-inf"))
        out = scores.softmax(dim=-1) @ vf
        return out.transpose(1, 2).to(q.dtype)
    raise ValueError(f"unknown attention backend {backend!r}")


class SelfAttention(nn.Module):
    """Multi-head self-attention, official key names (timm Attention): qkv [3*C, C] laid out (q|k|v, head, dim)."""

    def __init__(self, hidden_size: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, N, C]
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)  # each [B, N, H, D]
        return self.proj(attention(q, k, v, self.backend).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens (official MultiHeadCrossAttention: q_linear, kv_linear, proj).

    No norm and no gate before it (PixArt_blocks.py); `proj` is zero-initialised so a new block starts as DiT's.
    """

    def __init__(self, hidden_size: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.backend = backend
        self.q_linear = nn.Linear(hidden_size, hidden_size)
        self.kv_linear = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, ctx: TextContext) -> torch.Tensor:  # x [B, N, C]
        B, N, C = x.shape
        H, D = self.num_heads, C // self.num_heads
        q = self.q_linear(x).reshape(B, N, H, D)
        kv = self.kv_linear(ctx.y)  # [B, L, 2C] dense or [T, 2C] packed
        if ctx.packed:
            k, v = kv.reshape(-1, 2, H, D).unbind(1)  # each [T, H, D]
            out = attention(q, k, v, "flash", cu_seqlens_k=ctx.cu_seqlens, max_seqlen_k=ctx.max_seqlen)
        else:
            k, v = kv.reshape(B, -1, 2, H, D).unbind(2)  # each [B, L, H, D]
            out = attention(q, k, v, self.backend, kv_mask=ctx.mask)
        out = out.reshape(B, N, C)
        if ctx.empty is not None:  # captions with no real token contribute nothing (see module doc)
            out = out.masked_fill(ctx.empty[:, None, None], 0.0)
        return self.proj(out)
