"""Frozen encoders through the libraries made for them: T5 (transformers) and the SD VAE (diffusers).

Both load from local folders with `from_pretrained(..., local_files_only=True)`; nothing downloads at run time.
`make_tiny_t5` builds a small random T5 with the same classes and file layout, for the demo and tests (the tests'
small VAE is pixart_ds.testing.make_tiny_vae), so every caller goes through the real loading path.
"""
from __future__ import annotations

import os
import warnings

import torch
from diffusers import AutoencoderKL
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from pixart_ds.config import MAX_TEXT_TOKENS, VAE_SCALE

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def as_dtype(name: str | torch.dtype) -> torch.dtype:
    return name if isinstance(name, torch.dtype) else _DTYPES[name]


def _require_dir(path: str, what: str) -> None:
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"{what} folder not found: {path}")


def clean_caption(text: str) -> str:
    """Lower-case and strip, as the official T5Embedder (diffusion/model/t5.py) and diffusers' pipeline do; applied
    to training captions (features) and sampling prompts alike so both reach T5 in the same form."""
    return text.lower().strip()


def load_text_encoder(path: str, dtype="bf16", device="cpu"):
    """(tokenizer, T5EncoderModel) from a local folder, in eval mode, requires_grad off."""

    _require_dir(path, "text encoder")
    tok_dir, model_dir = path, path
    if os.path.isdir(os.path.join(path, "text_encoder")):  # a diffusers pipeline folder: text_encoder/ + tokenizer/
        tok_dir, model_dir = os.path.join(path, "tokenizer"), os.path.join(path, "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    model = T5EncoderModel.from_pretrained(model_dir, dtype=as_dtype(dtype), local_files_only=True)
    model.requires_grad_(False).eval().to(device)
    return tokenizer, model


def text_width(model) -> int:
    return int(model.config.d_model)


@torch.no_grad()
def encode_text(tokenizer, model, captions: list[str], max_length: int = MAX_TEXT_TOKENS):
    """T5 features of `captions`, padded to `max_length`.

    Returns (emb [B, max_length, d_model] in the model's dtype, mask [B, max_length] int64 with 1 = real token).
    Captions longer than max_length tokens are truncated with a warning (the paper trains with 120).
    """
    enc = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt", return_overflowing_tokens=False, return_length=False)
    full = tokenizer(list(captions), truncation=False, padding=False)["input_ids"]
    long = [i for i, ids in enumerate(full) if len(ids) > max_length]
    if long:
        warnings.warn(f"{len(long)} caption(s) longer than {max_length} tokens were truncated "
                      f"(first: {captions[long[0]][:60]!r}...)", stacklevel=2)
    device = next(model.parameters()).device
    ids = enc["input_ids"].to(device)
    mask = enc["attention_mask"].to(device)
    emb = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return emb, mask.long()


def load_vae(path: str, dtype="fp32", device="cpu"):
    _require_dir(path, "VAE")
    if os.path.isfile(os.path.join(path, "vae", "config.json")):  # a diffusers pipeline folder
        path = os.path.join(path, "vae")
    vae = AutoencoderKL.from_pretrained(path, torch_dtype=as_dtype(dtype), local_files_only=True)
    vae.requires_grad_(False).eval().to(device)
    return vae


@torch.no_grad()
def vae_encode(vae, images: torch.Tensor):
    """images [B, 3, H, W] in [-1, 1] -> posterior (mean, std), each [B, C, H/8, W/8], unscaled."""
    images = images.to(device=vae.device, dtype=vae.dtype)
    dist = vae.encode(images).latent_dist
    return dist.mean, dist.std


@torch.no_grad()
def vae_decode(vae, latents: torch.Tensor, scale: float = VAE_SCALE) -> torch.Tensor:
    """Scaled latents [B, C, h, w] -> images [B, 3, 8h, 8w] in [-1, 1]."""
    latents = latents.to(device=vae.device, dtype=vae.dtype) / scale
    return vae.decode(latents).sample.clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------------------
# Tiny encoders for tests and the demo (random weights, real classes, real file layout)
# ---------------------------------------------------------------------------------------------------------------

_TINY_WORDS = (
    "a an the small large big tiny red green blue yellow orange purple white black gray pink cyan magenta "
    "circle square triangle cross ring star diamond in at on top bottom left right center middle of "
    "background image photo with and picture style detailed describe very manner"
)


def _tiny_tokenizer():
    """A SentencePiece-style Unigram tokenizer over a fixed vocabulary: every word of _TINY_WORDS is one piece
    ("▁red"), as a real T5 tokenizer keeps common words whole; any other text falls back to single characters
    (never <unk> for printable ASCII). Built from an explicit vocabulary, so it is the same on every machine."""

    specials = ["<pad>", "</s>", "<unk>"]
    words = list(dict.fromkeys(_TINY_WORDS.split()))
    chars = list(dict.fromkeys("abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'\"-"))
    # Unigram log-probabilities: a whole word always beats spelling it out (-2 vs >= 2 x -8).
    vocab = [(t, 0.0) for t in specials] + [("▁" + w, -2.0) for w in words] + [("▁", -8.0)]
    vocab += [(c, -8.0) for c in chars] + [("▁" + c, -8.0) for c in chars if "▁" + c not in dict(vocab)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def make_tiny_t5(path: str, d_model: int = 32, num_layers: int = 2, num_heads: int = 2, seed: int = 0,
                 neighbour_bias: float = 0.0) -> str:
    """Save a random T5EncoderModel + tokenizer that `load_text_encoder(path)` reads.

    `neighbour_bias` > 0 replaces the random relative-attention bias (learned, in a real T5) with a locality prior:
    head h adds `neighbour_bias` to the logit of the word right after it (even h) or right before it (odd h) and 0
    elsewhere. A random T5 attends almost uniformly, so each word's output is the word plus the caption's average,
    and "a red circle on a blue background" encodes almost as "a blue circle on a red background": no model reading
    it can tell which colour is whose. A pretrained T5's features are contextual; with the prior each word's
    features carry its neighbours ("blue" before "background" differs from "blue" before "circle"), which is what
    a small stand-in for it needs (the demo, pixart_ds/commands/demo.py DEMO_T5).
    """

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads, d_ff=2 * d_model,
                   num_layers=num_layers, num_heads=num_heads, relative_attention_num_buckets=8,
                   relative_attention_max_distance=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                   pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    model = T5EncoderModel(cfg).eval()
    if neighbour_bias:
        attn = model.encoder.block[0].layer[0].SelfAttention  # T5 keeps the bias in block 0, shared by every block
        with torch.no_grad():
            attn.relative_attention_bias.weight.zero_()
            for h in range(num_heads):
                offset = torch.tensor(1 if h % 2 == 0 else -1)  # key position - query position
                bucket = attn._relative_position_bucket(offset, bidirectional=True,
                                                        num_buckets=cfg.relative_attention_num_buckets,
                                                        max_distance=cfg.relative_attention_max_distance)
                attn.relative_attention_bias.weight[bucket, h] = float(neighbour_bias)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
