"""PixArt-alpha transformer (Chen et al. 2023, §2.3, Fig. 4), single-device.

One class covers the paper's model and its ablations:
- adaln = "single": adaLN-single. One global t_block = SiLU -> Linear(hidden, 6*hidden) maps the timestep
  embedding t [B, hidden] to S [B, 6*hidden]; block i uses S + E_i with its own learned scale_shift_table
  E_i [6, hidden]; the final layer uses t itself plus its table [2, hidden] (official PixArt.py).
- adaln = "block": DiT's per-block adaLN MLPs (adaLN_modulation = SiLU -> Linear(hidden, 6*hidden) in every block,
  SiLU -> Linear(hidden, 2*hidden) in the final layer), for the paper's adaLN ablation (Fig. 7 / §2.3).
- condition = "text": cross-attention over projected T5 tokens with a padding mask; a dropped caption is replaced
  by the null caption y_embedding [L, caption_channels] (all L tokens real).
  condition = "class": DiT class conditioning; the class embedding (row num_classes = null class) is added to the
  timestep embedding; blocks have no cross-attention.
- multi_scale: PixArtMS. Size (h, w in pixels) and aspect-ratio embeddings, each hidden/3 wide per scalar
  ([B, 2*hidden/3] + [B, hidden/3]), are added to the timestep embedding; the positional embedding is recomputed
  for each input (h, w) (official PixArtMS.py).

Parameter and buffer names follow the official checkpoints (module docstring of convert.py lists the mapping).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.utils.checkpoint
from torch import nn

from pixart_ds import config
from pixart_ds.model.attention import (CrossAttention, SelfAttention, TextContext, check_backend, make_text_context,
                                       packs_captions, resolve_backend)
from pixart_ds.model.layers import (CaptionEmbedder, FinalLayer, LabelEmbedder, Mlp, PatchEmbed, SizeEmbedder,
                                    TimestepEmbedder, modulate)
from pixart_ds.model.pos_embed import sincos_2d


class PixArtBlock(nn.Module):
    """self-attention -> cross-attention (text only; no norm, no gate) -> MLP, with adaLN modulation.

    x [B, N, hidden]; c = t_block output [B, 6*hidden] (single) or the conditioning vector [B, hidden] (block).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, adaln: str, cross_attention: bool,
                 backend: str):
        super().__init__()
        self.adaln = adaln
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, backend)
        self.cross_attn = CrossAttention(hidden_size, num_heads, backend) if cross_attention else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)
        if adaln == "single":
            self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def modulation(self, c: torch.Tensor) -> torch.Tensor:
        """-> [B, 6, hidden] = (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)."""
        if self.adaln == "single":
            return self.scale_shift_table[None] + c.reshape(c.shape[0], 6, -1)
        return self.adaLN_modulation(c).reshape(c.shape[0], 6, -1)

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: Optional[TextContext] = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c).chunk(6, dim=1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, ctx)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


# Fan-ins the official caption-projection init (N(0, 0.02)) was set for: T5-XXL 4096 -> PixArt-XL 1152.
CAPTION_INIT_FAN_IN = (4096, 1152)


class PixArt(nn.Module):
    """forward(x [B, C, h, w], timestep [B], y, mask=None, drop=None, data_info=None) -> [B, out_channels, h, w].

    y: T5 features [B, L, caption_channels] (text) or labels [B] long (class). mask [B, L], nonzero = real token.
    drop [B] bool: use the null caption / null class (classifier-free guidance dropout and sampling).
    data_info (multi_scale): {"img_hw": [B, 2] pixels, "aspect_ratio": [B, 1] or [B]}.
    """

    def __init__(self, model_cfg, input_size: int, pe_interpolation: float = 1.0):
        super().__init__()
        m = model_cfg
        self.cfg = m
        if m.adaln not in ("single", "block"):
            raise ValueError(f"model.adaln: {m.adaln!r} is not one of single, block")
        if m.condition not in ("text", "class"):
            raise ValueError(f"model.condition: {m.condition!r} is not one of text, class")
        if m.hidden_size % m.num_heads:
            raise ValueError(f"model.hidden_size {m.hidden_size} is not divisible by model.num_heads {m.num_heads}")
        if m.multi_scale and m.hidden_size % 3:
            raise ValueError(f"model.multi_scale needs hidden_size divisible by 3 (size + aspect-ratio embeddings are "
                             f"hidden/3 wide each), got {m.hidden_size}")
        if input_size % m.patch_size:
            raise ValueError(f"latent size {input_size} is not divisible by model.patch_size {m.patch_size}")
        check_backend(m.attention)
        hidden = m.hidden_size
        self.in_channels = m.in_channels
        self.out_channels = 2 * m.in_channels if m.pred_sigma else m.in_channels
        self.patch_size = m.patch_size
        self.input_size = input_size
        self.pe_interpolation = float(pe_interpolation)
        self.base_size = input_size // m.patch_size  # tokens per side at the training resolution
        self.attention_backend = m.attention
        self.grad_checkpointing = m.grad_checkpointing
        self.grad_checkpointing_every = getattr(m, "grad_checkpointing_every", 1)  # recompute blocks 0, k, 2k, ...

        self.x_embedder = PatchEmbed(m.patch_size, m.in_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        if m.adaln == "single":
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        if m.condition == "text":
            self.y_embedder = CaptionEmbedder(m.caption_channels, hidden, m.max_text_tokens)
        else:
            self.y_embedder = LabelEmbedder(m.num_classes, hidden)
        if m.multi_scale:
            self.csize_embedder = SizeEmbedder(hidden // 3)
            self.ar_embedder = SizeEmbedder(hidden // 3)
        # Fixed sin-cos table for the training grid; not saved (recomputed on load, as the official loader does).
        self.register_buffer("pos_embed", sincos_2d(hidden, (self.base_size, self.base_size), self.base_size,
                                                    self.pe_interpolation)[None], persistent=False)
        self.blocks = nn.ModuleList([
            PixArtBlock(hidden, m.num_heads, m.mlp_ratio, m.adaln, m.condition == "text", m.attention)
            for _ in range(m.depth)])
        self.final_layer = FinalLayer(hidden, m.patch_size, self.out_channels, m.adaln)
        self.initialize_weights()

    # ------------------------------------------------------------------------------------------------------------
    def initialize_weights(self):
        """Official PixArt / DiT init: xavier-uniform linears with zero bias; N(0, 0.02) for the timestep, size,
        caption (width-scaled, see below) and label embedders and t_block; cross-attention output projection and the
        final linear zero (a fresh block adds nothing through text; the model starts by predicting 0); DiT's adaLN
        MLPs zero."""
        if self.pos_embed.is_meta:
            return

        def _basic(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for mlp in [self.t_embedder.mlp] + ([self.csize_embedder.mlp, self.ar_embedder.mlp]
                                            if self.cfg.multi_scale else []):
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        if hasattr(self, "t_block"):
            nn.init.normal_(self.t_block[1].weight, std=0.02)
        if isinstance(self.y_embedder, CaptionEmbedder):
            # The official N(0, 0.02) is calibrated for T5-XXL's 4096 channels into PixArt-XL's 1152: each std is
            # scaled by sqrt(reference fan-in / fan-in), so the projected caption has the same scale for any
            # encoder or model width (exactly the official init for T5-XXL into hidden 1152). Unscaled, a narrow
            # encoder (the tests' 32-wide T5) projects captions ~10x smaller and the model is slow to read them.
            fc1, fc2 = self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2
            nn.init.normal_(fc1.weight, std=0.02 * (CAPTION_INIT_FAN_IN[0] / fc1.in_features) ** 0.5)
            nn.init.normal_(fc2.weight, std=0.02 * (CAPTION_INIT_FAN_IN[1] / fc2.in_features) ** 0.5)
        else:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=self.cfg.label_init_std)
        for block in self.blocks:
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
            if self.cfg.adaln == "block":
                nn.init.zeros_(block.adaLN_modulation[1].weight)
                nn.init.zeros_(block.adaLN_modulation[1].bias)
        if self.cfg.adaln == "block":
            nn.init.zeros_(self.final_layer.adaLN_modulation[1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def set_attention(self, backend: str) -> None:
        """Switch every attention layer to `backend` (pixart_ds.model.attention.BACKENDS); weights are unchanged."""
        check_backend(backend)
        self.attention_backend = backend
        for module in self.modules():
            if isinstance(module, (SelfAttention, CrossAttention)):
                module.backend = backend

    def compile_blocks(self) -> None:
        """Regional torch.compile: each block's forward is compiled in place (nn.Module.compile), so parameters,
        their names and the state dict stay those of the plain model (what DeepSpeed ZeRO partitions and
        checkpoints), and the blocks, identical in code, share one compiled graph (torch.compile's regional
        compilation recipe) instead of one graph for the whole network: compile time stays that of one block."""
        for block in self.blocks:
            block.compile()

    # ------------------------------------------------------------------------------------------------------------
    def pos_embed_for(self, gh: int, gw: int, device, dtype) -> torch.Tensor:
        """[1, gh*gw, hidden] for a gh x gw token grid (recomputed unless it is the training grid)."""
        if (gh, gw) == (self.base_size, self.base_size) and not self.pos_embed.is_meta:
            pe = self.pos_embed
        else:
            pe = sincos_2d(self.cfg.hidden_size, (gh, gw), self.base_size, self.pe_interpolation, device=device)[None]
        return pe.to(device=device, dtype=dtype)

    def conditioning(self, timestep: torch.Tensor, y: Optional[torch.Tensor] = None,
                     drop: Optional[torch.Tensor] = None, data_info: Optional[dict] = None) -> torch.Tensor:
        """The vector every modulation is computed from, [B, hidden]: timestep embedding (+ size and aspect-ratio
        embeddings when multi_scale) (+ class embedding for condition=class)."""
        t = self.t_embedder(timestep)
        B = t.shape[0]
        if self.cfg.multi_scale:
            if data_info is None or "img_hw" not in data_info or "aspect_ratio" not in data_info:
                raise ValueError("a multi_scale model needs data_info={'img_hw': [B, 2], 'aspect_ratio': [B, 1]}")
            hw = data_info["img_hw"].to(t.device).reshape(B, 2)
            ar = data_info["aspect_ratio"].to(t.device).reshape(B, 1)
            t = t + torch.cat([self.csize_embedder(hw), self.ar_embedder(ar)], dim=1)
        if self.cfg.condition == "class":
            t = t + self.y_embedder(y.to(t.device), drop)
        return t

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None,
                drop: Optional[torch.Tensor] = None, data_info: Optional[dict] = None) -> torch.Tensor:
        B, C, h, w = x.shape
        p = self.patch_size
        if C != self.in_channels or h % p or w % p:
            raise ValueError(f"input {tuple(x.shape)}: expected [B, {self.in_channels}, h, w] with h, w divisible "
                             f"by patch size {p}")
        gh, gw = h // p, w // p
        if timestep.ndim == 0:
            timestep = timestep.expand(B)
        x = self.x_embedder(x)  # [B, N, hidden]
        x = x + self.pos_embed_for(gh, gw, x.device, x.dtype)
        c = self.conditioning(timestep, y, drop, data_info)  # [B, hidden]

        ctx = None
        if self.cfg.condition == "text":
            if y.ndim != 3:
                raise ValueError(f"condition=text expects T5 features [B, L, {self.cfg.caption_channels}], "
                                 f"got {tuple(y.shape)}")
            if drop is not None and mask is not None:
                # The null caption is L real tokens. (The official trainer keeps the dropped caption's own mask;
                # a fixed all-ones mask makes training and CFG sampling see the same null condition.)
                mask = torch.where(drop.to(mask.device).reshape(-1, 1), torch.ones_like(mask), mask)
            yp = self.y_embedder(y, drop)  # [B, L, hidden]
            backend = resolve_backend(self.attention_backend, yp)
            ctx = make_text_context(yp, mask, pack=packs_captions(backend))

        mod = self.t_block(c) if self.cfg.adaln == "single" else c  # [B, 6*hidden] or [B, hidden]
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled() and i % self.grad_checkpointing_every == 0:
                x = torch.utils.checkpoint.checkpoint(block, x, mod, ctx, use_reentrant=False)
            else:
                x = block(x, mod, ctx)
        x = self.final_layer(x, c)  # [B, N, p*p*out]
        return self.unpatchify(x, gh, gw)

    def unpatchify(self, x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """[B, gh*gw, p*p*C] -> [B, C, gh*p, gw*p] (DiT / diffusers: 'nhwpqc->nchpwq')."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, gh * p, gw * p)


# ----------------------------------------------------------------------------------------------------------------
def build_model(cfg) -> PixArt:
    """The model a recipe describes (latent size and positional-embedding scale derived in config.py)."""
    model = PixArt(cfg.model, config.latent_size(cfg), config.pe_interpolation(cfg))
    if cfg.model.compile == "blocks":
        model.compile_blocks()
    return model


# ----------------------------------------------------------------------------------------------------------------
# Parameter counts
# ----------------------------------------------------------------------------------------------------------------

_PAPER_BLOCK_ADALN_M = 833  # paper §2.3 / Fig. 7: "adaLN 833M vs adaLN-single 611M"


def _component(name: str) -> str:
    if name.startswith("blocks."):
        part = name.split(".")[2]
        return {"attn": "blocks.self_attn", "cross_attn": "blocks.cross_attn", "mlp": "blocks.mlp",
                "scale_shift_table": "blocks.adaln_table", "adaLN_modulation": "blocks.adaln_mlp"}.get(
                    part, "blocks." + part)
    if name.startswith("final_layer."):
        return "final_layer.adaln" if ("scale_shift_table" in name or "adaLN" in name) else "final_layer.linear"
    if name.startswith("y_embedder."):
        return "caption_proj" if "y_proj" in name else "class_embedding"
    return name.split(".")[0]


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[_component(name)] = out.get(_component(name), 0) + p.numel()
    return out


def model_info(preset: str = "PixArt-XL/2", adaln: str = "single", condition: str = "text",
               multi_scale: bool = False) -> dict:
    """Trainable parameter count with a per-component breakdown, built on the meta device (no memory, no init).

    Reference counts (PixArt-XL/2): adaLN-single text 610,856,096; multi-scale 611,349,152 (+2 size MLPs of
    256 -> 384 -> 384 = 493,056). Not trainable and not counted: the null caption y_embedding [120, 4096] (a buffer
    in the official code too) and the fixed sin-cos pos_embed.

    Per-block adaLN (DiT-style) replaces t_block (7,969,536) + 28 tables (193,536) + the final table (2,304) with
    28 block MLPs Linear(1152, 6912) (28 x 7,969,536 = 223,147,008) + a final Linear(1152, 2304) (2,656,512):
    828,494,240 in all. The paper reports 833M (§2.3, Fig. 7). The 4.7M gap equals a 64x64-token frozen pos_embed
    (4,718,592 = 4096 x 1152), which the official code holds as an nn.Parameter(requires_grad=False) and includes
    when it logs `sum(p.numel() for p in model.parameters())` at 1024 px; the same convention would make
    adaLN-single 615.6M rather than 611M, so the two figures in the paper were likely logged under different
    settings. We count trainable parameters only.
    """

    if preset not in config.PRESETS:
        raise ValueError(f"unknown model preset {preset!r} (known: {', '.join(config.PRESETS)})")
    mc = config.from_dict({"model": {"preset": preset, "adaln": adaln, "condition": condition,
                                     "multi_scale": multi_scale, "attention": "sdpa"},
                         "data": {"multi_scale": multi_scale}}, "model-info").model
    with torch.device("meta"):
        model = PixArt(mc, input_size=32, pe_interpolation=0.5)
    comps = parameter_breakdown(model)
    total = sum(comps.values())
    note = None
    if adaln == "block":
        note = (f"paper (§2.3, Fig. 7): {_PAPER_BLOCK_ADALN_M}M for per-block adaLN at PixArt-XL/2; this count: "
                f"{total / 1e6:.1f}M trainable (XL/2: 828.5M). The 4.7M gap at XL/2 equals the frozen 1024-px "
                f"pos_embed (4096 x 1152 = 4,718,592) that the official code keeps as an nn.Parameter and counts in "
                f"its log; we count trainable parameters only.")
    else:
        note = ("not counted: null caption y_embedding (a buffer, as in the official code) and the fixed sin-cos "
                "pos_embed")
    return dict(preset=preset, adaln=adaln, condition=condition, multi_scale=bool(multi_scale), total=total,
                components=comps, note=note)

