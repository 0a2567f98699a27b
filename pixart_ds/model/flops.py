"""Analytic FLOPs of PixArt per image: forward, and a training step with and without activation recomputation.

Counting rule (the one MFU papers use, e.g. PaLM Appendix B; Megatron-LM's "model FLOPs"):
- only matrix products count, 2*m*n*k FLOPs each (one multiply + one add per term); the patch-embedding convolution is
  a matrix product over its p*p*C input patch; element-wise work (norms, GELU, softmax, modulate, residuals) is not
  counted;
- attention counts both products: Q K^T (2 * n_q * n_kv * D) and A V (2 * n_q * n_kv * D) summed over heads;
- cross-attention runs over all `text_len` caption tokens (default model.max_text_tokens = 120, padded with a mask,
  as torch SDPA computes them; a varlen flash kernel skips padding, so pass the mean caption length to model that);
- backward = 2 x forward (gradient w.r.t. inputs and w.r.t. weights), so a training step = 3 x forward ("model
  FLOPs", used for MFU), less the input gradients nobody needs: the first layer fed by data (patch embedding on the
  latents, caption fc1 on the T5 features, the timestep / size MLPs' fc1 on sinusoids) computes only its weight
  gradient. That correction is 0.1% of PixArt-XL/2 at 256 px, but 3% of a small model with 64 tokens and 120 T5
  tokens of 4,096 channels;
- activation recomputation (model.grad_checkpointing: each transformer block re-runs its forward in the backward
  pass, as the official code's `auto_grad_checkpoint`) adds one forward of the blocks ("hardware FLOPs", HFU).

The architecture counted is the paper's (§2.3, Fig. 4) and the official PixArt.py / PixArt_blocks.py:
  x_embedder   conv p x p, C_in -> D over N = (latent/p)^2 tokens
  t_embedder   256-d sinusoid -> Linear(256, D) -> SiLU -> Linear(D, D)           (per image)
  t_block      SiLU -> Linear(D, 6D), adaLN-single only                              (per image)
  y_embedder   text: Linear(4096, D) -> GELU -> Linear(D, D) over L tokens; class: an embedding table (no matmul)
  csize/ar     multi-scale: three SizeEmbedders, each Linear(256, D/3) -> SiLU -> Linear(D/3, D/3) (per image)
  block x depth:
     adaLN-block only: SiLU -> Linear(D, 6D)                                         (per image)
     self-attn    qkv Linear(D, 3D), QK^T, AV, proj Linear(D, D)                      over N tokens
     cross-attn   text only: q Linear(D, D) over N, kv Linear(D, 2D) over L, QK^T, AV, proj Linear(D, D)
     mlp          Linear(D, 4D) -> GELU(tanh) -> Linear(4D, D)                        over N tokens
  final layer  adaLN-block only: SiLU -> Linear(D, 2D) (per image); Linear(D, p*p*C_out) over N tokens

tests/test_flops.py checks these numbers against torch.utils.flop_counter.FlopCounterMode on the real model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pixart_ds.config import VAE_DOWNSAMPLE, Config, ModelConfig, checkpointed_blocks

# The timestep and size embedders start from a 256-wide sinusoid (official TimestepEmbedder.frequency_embedding_size).
FREQ_EMBED = 256


def _mm(m: int, n: int, k: int) -> int:
    """FLOPs of an [m, k] x [k, n] matrix product."""
    return 2 * m * n * k


@dataclass(frozen=True)
class ImageFlops:
    """FLOPs for one image (one sample of a micro-batch). All values are plain FLOPs (not MACs)."""

    forward: int  # one forward pass
    blocks_forward: int  # the part of `forward` inside the transformer blocks (what recomputation re-runs)
    train: int  # forward + backward ~= 3 x forward ("model FLOPs", MFU numerator)
    train_recompute: int  # train + one more forward of the blocks ("hardware FLOPs" with grad checkpointing)
    tokens: int  # image tokens N
    text_len: int  # caption tokens L attended by cross-attention (0 for class conditioning)
    components: dict = field(default_factory=dict)  # forward FLOPs by component, summing to `forward`

    def train_step(self, recompute: bool | float) -> int:
        """FLOPs the hardware executes per image in one training step; `recompute` is a bool or the fraction of
        blocks recomputed (recompute_fraction: model.grad_checkpointing_every)."""
        return self.train + round(self.blocks_forward * float(recompute))

    def as_dict(self) -> dict:
        return {
            "forward": self.forward, "blocks_forward": self.blocks_forward, "train": self.train,
            "train_recompute": self.train_recompute, "tokens": self.tokens, "text_len": self.text_len,
            "components": dict(self.components),
        }


def image_flops(model: ModelConfig | Config, resolution: int | None = None, *, latent_hw: tuple[int, int] | None = None,
                text_len: int | None = None) -> ImageFlops:
    """Analytic FLOPs per image.

    `model` is a ModelConfig (then give `resolution` in pixels or `latent_hw`) or a whole Config (resolution from
    data.resolution unless given). `latent_hw` overrides the square latent for multi-aspect buckets, e.g. (48, 80).
    `text_len` defaults to model.max_text_tokens.
    """
    if isinstance(model, Config):
        if resolution is None and latent_hw is None:
            resolution = model.data.resolution
        model = model.model
    if latent_hw is None:
        if resolution is None:
            raise ValueError("image_flops: give resolution (pixels) or latent_hw")
        if resolution % VAE_DOWNSAMPLE:
            raise ValueError(f"image_flops: resolution {resolution} is not a multiple of {VAE_DOWNSAMPLE}")
        latent_hw = (resolution // VAE_DOWNSAMPLE, resolution // VAE_DOWNSAMPLE)
    h, w = latent_hw
    p = model.patch_size
    if h % p or w % p:
        raise ValueError(f"image_flops: latent {h}x{w} is not divisible by patch size {p}")
    D = model.hidden_size
    N = (h // p) * (w // p)
    mlp_hidden = int(D * model.mlp_ratio)
    out_ch = model.in_channels * (2 if model.pred_sigma else 1)
    text = model.condition == "text"
    L = (model.max_text_tokens if text_len is None else int(text_len)) if text else 0
    block_adaln = model.adaln == "block"

    c: dict[str, int] = {}
    # Embedders (outside the blocks). `data_fed` = forward FLOPs of layers whose input is data (no input gradient).
    c["patch_embed"] = _mm(N, D, model.in_channels * p * p)
    c["timestep_embed"] = _mm(1, D, FREQ_EMBED) + _mm(1, D, D)
    data_fed = c["patch_embed"] + _mm(1, D, FREQ_EMBED)
    c["t_block"] = 0 if block_adaln else _mm(1, 6 * D, D)
    c["caption_embed"] = _mm(L, D, model.caption_channels) + _mm(L, D, D) if text else 0
    data_fed += _mm(L, D, model.caption_channels) if text else 0  # the null caption is a buffer: no gradient
    if model.multi_scale:
        e = D // 3
        c["size_embed"] = 3 * (_mm(1, e, FREQ_EMBED) + _mm(1, e, e))  # height, width, aspect ratio
        data_fed += 3 * _mm(1, e, FREQ_EMBED)
    # Transformer blocks.
    per_block = {
        "adaln_block": _mm(1, 6 * D, D) if block_adaln else 0,
        "self_attn_linear": _mm(N, 3 * D, D) + _mm(N, D, D),
        "self_attn_scores": _mm(N, N, D) + _mm(N, D, N),  # QK^T and AV summed over heads (head_dim * heads = D)
        "cross_attn_linear": (_mm(N, D, D) + _mm(L, 2 * D, D) + _mm(N, D, D)) if text else 0,
        "cross_attn_scores": (_mm(N, L, D) + _mm(N, D, L)) if text else 0,
        "mlp": _mm(N, mlp_hidden, D) + _mm(N, D, mlp_hidden),
    }
    for k, v in per_block.items():
        c[f"blocks.{k}"] = model.depth * v
    blocks = sum(v for k, v in c.items() if k.startswith("blocks."))
    # Final layer.
    c["final_layer"] = _mm(N, p * p * out_ch, D) + (_mm(1, 2 * D, D) if block_adaln else 0)
    c = {k: v for k, v in c.items() if v}
    fwd = sum(c.values())
    train = 3 * fwd - data_fed
    return ImageFlops(forward=fwd, blocks_forward=blocks, train=train, train_recompute=train + blocks, tokens=N,
                      text_len=L, components=c)


def recompute_fraction(model: ModelConfig) -> float:
    """Share of the blocks whose forward runs twice (model.grad_checkpointing, every grad_checkpointing_every-th)."""
    return len(checkpointed_blocks(model)) / model.depth


def train_flops_per_image(cfg: Config, *, hardware: bool = False, text_len: int | None = None) -> int:
    """Model FLOPs (hardware=False; MFU) or executed FLOPs (hardware=True: + recomputation if the recipe enables
    model.grad_checkpointing; HFU) of one training image of the recipe."""
    f = image_flops(cfg, text_len=text_len)
    return f.train_step(recompute_fraction(cfg.model) if hardware else 0.0)


def format_flops(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOP"
