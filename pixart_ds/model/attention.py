"""Self- and cross-attention around ONE seam, `attention()`. Recipes choose the kernels with `model.attention`:

- ``torch-flash``: torch's own FlashAttention kernels, no extra package. Self-attention is
  scaled_dot_product_attention restricted to its FLASH backend (torch.nn.attention.sdpa_kernel; an input the kernel
  cannot take is an error, not a silent fallback). Cross-attention runs over the caption tokens packed without
  padding through torch.nn.attention.varlen.varlen_attn (cumulative sequence lengths, the call shape of flash-attn's
  flash_attn_varlen_func), so padding costs nothing. On torch builds without varlen_attn (it appeared in 2.9; the
  H200 image's 2.11 has it) cross-attention falls back to masked SDPA, with a warning. Newer torch may route varlen
  calls with more than 128 queries to cuDNN on Hopper (torch 2.14 does); the benchmark records the kernels that ran.
- ``flash-attn`` (alias ``flash``): the flash-attn 2 package (`pip install 'pixart_ds[flash]'`): `flash_attn_func`
  for self-attention, `flash_attn_varlen_func` over the packed caption tokens, as the official PixArt code does with
  xformers' BlockDiagonalMask (diffusion/model/nets/PixArt_blocks.py MultiHeadCrossAttention).
- ``sdpa``: torch.nn.functional.scaled_dot_product_attention with torch's own kernel choice (on an H100/H200 torch
  ranks cuDNN attention first: benchmarks/results/gpu_attention_h200_202611.md). Self-attention is called without a
  mask; cross-attention passes a boolean key mask over the padded captions.
- ``math``: the explicit softmax(q k^T / sqrt(d)) v in float32, the reference the others are tested against.
- ``auto``: on fp16/bf16 CUDA tensors ``flash-attn`` when the package imports, else ``torch-flash``; otherwise (CPU,
  fp32) ``sdpa``. The order is the rule "FlashAttention kernels, packed captions" that the measurements so far
  support only in part: the one GPU record (above) compares sdpa with math; benchmarks/gpu_mfu.py's `attn-sdpa` and
  `attn-torch-flash` rows at 1024 px (where attention is 30% of the FLOPs) decide between cuDNN and flash, and
  `auto` follows them.

Padding semantics (all backends agree): a key whose mask is 0 gets no weight. A caption whose mask is all 0 has no
key at all; its attention output (the weighted sum of values, before the output projection) is defined as 0, the
empty sum, instead of the NaN of a softmax over nothing. flash-attn's varlen kernel does the same for a zero-length
key sequence. diffusers' PixArtTransformer2DModel adds a -10000 bias instead of masking, which
gives exactly the same result whenever a caption has at least one real token (exp(-10000) underflows to 0 in fp32)
and a uniform average over padding when it has none.

No host synchronisation: packing the captions (make_text_context) and the empty-caption handling use only device
ops with static shapes, so a forward pass never waits for the GPU (and torch.compile sees no data-dependent shape).

Shapes: q [B, Lq, H, D]; k, v [B, Lk, H, D] dense, or [T, H, D] packed (T rows, the first cu_seqlens[-1] real).
"""
from __future__ import annotations

import importlib.util
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch import nn

BACKENDS = ("auto", "torch-flash", "flash-attn", "flash", "sdpa", "math")
ALIASES = {"flash": "flash-attn"}  # the name recipes used before torch's kernels were added
FLASH_KERNELS = ("torch-flash", "flash-attn")  # need fp16/bf16 CUDA tensors; pack the captions


def flash_attn_available() -> bool:
    """The flash-attn package is importable."""
    return importlib.util.find_spec("flash_attn") is not None


flash_available = flash_attn_available  # older name


def _torch_varlen():
    """torch.nn.attention.varlen.varlen_attn, or None on a torch without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # optional: only in recent torch releases
    except ImportError:
        return None
    return varlen_attn


def torch_varlen_available() -> bool:
    return _torch_varlen() is not None


def check_backend(name: str) -> str:
    """Fail early (at model construction) for an unknown or unavailable backend; returns the canonical name."""
    if name not in BACKENDS:
        raise ValueError(f"model.attention: {name!r} is not one of {', '.join(BACKENDS)}")
    name = ALIASES.get(name, name)
    if name == "flash-attn" and not flash_attn_available():
        raise ValueError("model.attention: 'flash-attn' needs the flash-attn package, which is not installed "
                         "(pip install 'pixart_ds[flash]' on a CUDA machine, or use attention=torch-flash/auto)")
    return name


def _half_cuda(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def resolve_backend(name: str, x: torch.Tensor) -> str:
    """The kernel family a call on tensor `x` will use (a canonical name, never `auto` or an alias)."""
    name = ALIASES.get(name, name)
    if name == "auto":
        if _half_cuda(x):
            return "flash-attn" if flash_attn_available() else "torch-flash"
        return "sdpa"
    if name in FLASH_KERNELS and not _half_cuda(x):
        raise ValueError(f"attention={name} needs fp16/bf16 CUDA tensors, got {x.dtype} on {x.device} "
                         "(use attention=auto to fall back to sdpa)")
    return name


def packs_captions(backend: str) -> bool:
    """Whether cross-attention with this (resolved) backend takes the caption tokens packed (varlen)."""
    return backend == "flash-attn" or (backend == "torch-flash" and torch_varlen_available())


@dataclass
class TextContext:
    """Projected caption tokens for cross-attention, built once per forward and shared by all blocks.

    Dense (sdpa/math): y [B, L, C], mask [B, L] bool. Packed (varlen kernels): y [B*L, C] with the real tokens of
    caption 0, then caption 1, ... first and the padding rows after them (the kernels read rows
    cu_seqlens[b]:cu_seqlens[b+1] only), cu_seqlens [B+1] int32 offsets, max_seqlen = L (an upper bound: the exact
    maximum would need a host sync). `empty` [B] bool marks captions with no real token; the one placeholder key
    they are given (the first token, so no kernel sees an empty softmax) is cancelled by zeroing their output.
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
    """y [B, L, C]; mask [B, L] (nonzero = real token) or None (all real). Device ops only (no host sync)."""
    B, L, C = y.shape
    if mask is None:
        mask = torch.ones(B, L, dtype=torch.bool, device=y.device)
    if tuple(mask.shape) != (B, L):
        raise ValueError(f"caption mask shape {tuple(mask.shape)} does not match caption features {tuple(y.shape)}")
    mask = mask.to(device=y.device) != 0
    empty = ~mask.any(dim=1)  # [B]
    mask = torch.cat([mask[:, :1] | empty[:, None], mask[:, 1:]], dim=1)  # placeholder first key for empty captions
    if not pack:
        return TextContext(y=y, mask=mask, empty=empty)
    lens = mask.sum(dim=1)  # [B]
    cu = F.pad(torch.cumsum(lens, dim=0), (1, 0)).to(torch.int32)  # [B+1]
    # Stable sort on "is padding": real tokens first, in (caption, position) order; static shape [B*L].
    order = torch.argsort((~mask).reshape(-1).to(torch.int8), stable=True)
    return TextContext(y=y.reshape(B * L, C).index_select(0, order), cu_seqlens=cu, max_seqlen=L, empty=empty)


_warned_no_varlen = False


def _warn_no_varlen() -> None:
    global _warned_no_varlen
    if not _warned_no_varlen:
        _warned_no_varlen = True
        warnings.warn(f"attention=torch-flash: torch {torch.__version__} has no torch.nn.attention.varlen; "
                      "cross-attention runs masked SDPA over the padded captions instead", stacklevel=3)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto",
              kv_mask: Optional[torch.Tensor] = None, cu_seqlens_k: Optional[torch.Tensor] = None,
              max_seqlen_k: int = 0) -> torch.Tensor:
    """The one attention seam. q [B, Lq, H, D]; k, v [B, Lk, H, D] (kv_mask [B, Lk] bool, True = attend) or packed
    [T, H, D] with cu_seqlens_k [B+1] (varlen kernels only). Returns [B, Lq, H, D] in q's dtype."""
    backend = resolve_backend(backend, q)
    B, Lq, H, D = q.shape
    if cu_seqlens_k is not None:
        if not packs_captions(backend):
            raise ValueError(f"packed keys (cu_seqlens_k) need attention=torch-flash or flash-attn, got {backend}")
        cu_q = torch.arange(0, (B + 1) * Lq, Lq, dtype=torch.int32, device=q.device)  # every image has Lq queries
        qp, kp, vp = q.reshape(B * Lq, H, D), k.contiguous(), v.contiguous()
        if backend == "flash-attn":
            from flash_attn import flash_attn_varlen_func  # optional: pip install 'pixart_ds[flash]'

            out = flash_attn_varlen_func(qp, kp, vp, cu_q, cu_seqlens_k, Lq, max_seqlen_k)
        else:
            out = _torch_varlen()(qp, kp, vp, cu_q, cu_seqlens_k, Lq, max_seqlen_k)
        return out.reshape(B, Lq, H, D)
    if backend == "flash-attn":
        if kv_mask is not None:
            raise ValueError("attention=flash-attn takes padded keys packed (cu_seqlens_k), not a dense mask")
        from flash_attn import flash_attn_func  # optional: pip install 'pixart_ds[flash]'

        return flash_attn_func(q, k, v)
    if backend == "torch-flash" and kv_mask is None:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # FlashAttention-2 or an error, never another kernel
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if backend in ("sdpa", "torch-flash"):  # torch-flash here: masked cross-attention on a torch without varlen
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
            out = attention(q, k, v, self.backend, cu_seqlens_k=ctx.cu_seqlens, max_seqlen_k=ctx.max_seqlen)
        else:
            backend = resolve_backend(self.backend, q)
            if backend == "torch-flash":
                _warn_no_varlen()  # packs_captions() was false: this torch has no varlen kernel
            k, v = kv.reshape(B, -1, 2, H, D).unbind(2)  # each [B, L, H, D]
            out = attention(q, k, v, backend, kv_mask=ctx.mask)
        out = out.reshape(B, N, C)
        if ctx.empty is not None:  # captions with no real token contribute nothing (see module doc)
            out = out.masked_fill(ctx.empty[:, None, None], 0.0)
        return self.proj(out)
