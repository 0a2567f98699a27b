"""Tiny models, configs and shards shared by the tests and the benchmarks, and the tests' launch helpers.

Everything here goes through the real code paths: tiny encoders are saved with `save_pretrained` and loaded with
`from_pretrained`, tiny shards are written with Streaming's own MDSWriter and the project's column sets
(pixart_ds.data.schema), training runs start `pixart-ds train` in a subprocess under each launcher.

    tiny_cfg / randomize / inputs              a tiny PixArt config, random weights, forward inputs
    make_tiny_vae / make_tiny_llava            small random AutoencoderKL / LLaVA folders (T5: encoders.make_tiny_t5)
    write_feature_shards / write_bucketed_source / shard_files / flip_bytes     feature MDS streams, corruption
    write_text_shards / write_class_shards     streams matching tests/recipes/tiny_{text,class}.yaml
    train_cmd / run_train / clean_env / describe / read_metrics / latest_tag / meta / worker_pids
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Optional, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL
from streaming import MDSWriter
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaProcessor, PreTrainedTokenizerFast)

from pixart_ds import config
from pixart_ds.config import VAE_SCALE
from pixart_ds.data.manifest import write_manifest
from pixart_ds.data.schema import CLASS_FEATURE_COLUMNS, FEATURE_COLUMNS, read_index
from pixart_ds.train.metrics import read_metrics as _read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPO, "tests", "recipes")
TINY_TEXT = os.path.join(RECIPES, "tiny_text.yaml")
TINY_CLASS = os.path.join(RECIPES, "tiny_class.yaml")


# ----------------------------------------------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------------------------------------------

def tiny_cfg(**model):
    """A full Config around the `tiny` preset (depth 2, hidden 48, 3 heads) with 32-d, 8-token captions at 64 px."""
    ms = model.get("multi_scale", False)
    m = {"preset": "tiny", "caption_channels": 32, "max_text_tokens": 8, "num_classes": 10, **model}
    return config.from_dict({"model": m, "data": {"resolution": 64, "multi_scale": ms}})


def randomize(model, seed=0, std=0.1):
    """Every parameter random (the official init zeroes the outputs, which would hide mapping errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(cond, B=2, h=8, w=8, L=8, C=32, seed=0):
    """x [B,4,h,w], t [B], y (features or labels), mask [B,L] (caption 0 has 3 real tokens), data_info."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, h, w, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randn(B, L, C, generator=g) if cond == "text" else torch.randint(0, 10, (B,), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 3:] = 0
    data_info = {"img_hw": torch.tensor([[h * 8.0, w * 8.0]] * B), "aspect_ratio": torch.tensor([[h / w]] * B)}
    return x, t, y, mask, data_info


def make_tiny_vae(path: str, latent_channels: int = 4, block_out_channels=(16, 16, 16, 16), seed: int = 0) -> str:
    """Save a random AutoencoderKL with the SD layout (downsample 8 for 4 blocks) that `load_vae(path)` reads."""

    torch.manual_seed(seed)
    n = len(block_out_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels), layers_per_block=1, norm_num_groups=min(8, block_out_channels[0]),
        sample_size=64, scaling_factor=VAE_SCALE,
    ).eval()
    os.makedirs(path, exist_ok=True)
    vae.save_pretrained(path)
    return path


_TINY_LLAVA_WORDS = (
    "user assistant describe this image and its style in a very detailed manner the a an of with on at to is "
    "dog cat bird horse car tree house mountain river sky cloud sun road street building window door table chair "
    "person man woman child flower grass field lake sea beach boat city light shadow wall floor book cup glass "
    "red green blue yellow white black gray small large bright dark old new wooden stone painting photo colors"
)
# LLaVA-1.5's conversation format as a chat template (the one the llava-hf folders ship says the same).
_TINY_LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% else %} ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def make_tiny_llava(path: str, image_size: int = 16, patch_size: int = 4, hidden: int = 32, seed: int = 0) -> str:
    """Save a random LlavaForConditionalGeneration (tiny CLIP vision tower + tiny Llama) and its LlavaProcessor
    (word-level tokenizer built with `tokenizers`, CLIPImageProcessor, chat template) that `load_llava` reads.
    An image becomes (image_size / patch_size)^2 = 16 image tokens (the CLS token is dropped, strategy "default")."""

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    words = list(dict.fromkeys(_TINY_LLAVA_WORDS.split())) + list(".,:;!?'\"-")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", additional_special_tokens=["<image>"],
                                        model_max_length=4096, model_input_names=["input_ids", "attention_mask"])
    image_token = tokenizer.convert_tokens_to_ids("<image>")

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                              projection_dim=hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 3
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=_TINY_LLAVA_TEMPLATE)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path

# ----------------------------------------------------------------------------------------------------------------
# Feature shards
# ----------------------------------------------------------------------------------------------------------------

def make_feature_sample(rng: np.random.Generator, i: int, *, channels: int = 4, latent_hw=(8, 8), text_dim: int = 32,
                        max_tokens: int = 120, condition: str = "text", num_classes: int = 10,
                        id_prefix: str = "s") -> dict:
    h, w = latent_hw
    sample = {
        "id": f"{id_prefix}{i:06d}",
        "vae_mean": rng.standard_normal((channels, h, w)).astype(np.float16),
        "vae_std": rng.uniform(0.01, 0.5, (channels, h, w)).astype(np.float16),
        "caption": f"caption {id_prefix}{i}",
        "label": int(rng.integers(0, num_classes)) if condition == "class" else -1,
        "height": int(h * 8 + rng.integers(0, 64)),
        "width": int(w * 8 + rng.integers(0, 64)),
        "aspect_ratio": np.float32(h / w),
    }
    if condition == "text":
        n = int(rng.integers(1, max_tokens + 1))
        sample["t5"] = rng.standard_normal((n, text_dim)).astype(np.float16)
    return sample


def write_feature_shards(out: str, n: int, *, channels: int = 4, latent_hw=(8, 8), text_dim: int = 32,
                         max_tokens: int = 120, condition: str = "text", num_classes: int = 10, seed: int = 0,
                         samples_per_shard: Optional[int] = None, compression: Optional[str] = None,
                         hashes: Sequence[str] = ("xxh64",), id_prefix: str = "s",
                         overrides: Optional[dict] = None) -> list[dict]:
    """Write `n` random feature samples to a new MDS stream at `out`; returns them (index = sample order).

    `samples_per_shard` splits the stream into shards of about that many samples (via size_limit);
    `overrides` = {sample index: {column: value}} plants bad samples (e.g. a wrong-shape vae_std).
    """
    rng = np.random.default_rng(seed)
    samples = [make_feature_sample(rng, i, channels=channels, latent_hw=latent_hw, text_dim=text_dim,
                                   max_tokens=max_tokens, condition=condition, num_classes=num_classes,
                                   id_prefix=id_prefix) for i in range(n)]
    for i, cols in (overrides or {}).items():
        samples[i].update(cols)
    columns = FEATURE_COLUMNS if condition == "text" else CLASS_FEATURE_COLUMNS
    size_limit = 1 << 26
    if samples_per_shard:
        # MDS starts a new shard when the next sample would pass size_limit bytes: size it from the mean payload.
        mean_bytes = np.mean([sum(v.nbytes for v in s.values() if isinstance(v, np.ndarray)) + 96 for s in samples])
        size_limit = max(1 << 10, int(mean_bytes * samples_per_shard))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with MDSWriter(out=out, columns=columns, compression=compression, hashes=list(hashes) or None,
                   size_limit=size_limit) as w:
        for s in samples:
            w.write(s)
    return samples


def write_bucketed_source(root: str, buckets: dict, *, seed: int = 0, manifest: bool = True, **kwargs) -> dict:
    """A multi-scale source: {(latent_h, latent_w): n} -> one stream per bucket in root/h{8*h}_w{8*w}, and (unless
    `manifest` is False, as in directories written before manifests) root/manifest.jsonl. Returns {(h, w): samples}."""
    out = {}
    for k, ((h, w), n) in enumerate(sorted(buckets.items())):
        out[(h, w)] = write_feature_shards(os.path.join(root, f"h{8 * h}_w{8 * w}"), n, latent_hw=(h, w),
                                           seed=seed + 1000 * k, id_prefix=f"b{h}x{w}_", **kwargs)
    if manifest:
        write_manifest(root, multi_scale=True, resolution=None, condition=kwargs.get("condition", "text"))
    return out


def shard_files(stream_dir: str) -> list[str]:
    shards = read_index(stream_dir)
    return [os.path.join(stream_dir, s["raw_data"]["basename"]) for s in shards]


def flip_bytes(path: str, count: int = 16, where: float = 0.6) -> None:
    """XOR `count` bytes at fraction `where` of the file (past the offset header: inside sample payloads)."""
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        at = int(len(data) * where)
        for i in range(at, min(at + count, len(data))):
            data[i] ^= 0xFF
        f.seek(0)
        f.write(bytes(data))

# ----------------------------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------------------------

RECIPES = os.path.join(REPO, "tests", "recipes")
TINY_TEXT = os.path.join(RECIPES, "tiny_text.yaml")
TINY_CLASS = os.path.join(RECIPES, "tiny_class.yaml")


def write_text_shards(out: str, n: int = 64, seed: int = 0) -> str:
    """n text samples matching tests/recipes/tiny_text.yaml (8x8x4 latents, T5 width 32, <= 16 tokens)."""
    write_feature_shards(out, n, max_tokens=16, text_dim=32, samples_per_shard=16, seed=seed)
    return out


def write_class_shards(out: str, n: int = 64, seed: int = 1) -> str:
    """n class-labelled samples matching tests/recipes/tiny_class.yaml (10 classes)."""
    write_feature_shards(out, n, condition="class", num_classes=10, samples_per_shard=16, seed=seed)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(extra: dict | None = None) -> dict:
    """The test process's environment without launcher variables, one OpenMP thread per process (2 shared cores),
    no GPU (these are the CPU tests)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                        "MASTER_PORT") and not k.startswith("SLURM_") and not k.startswith("TORCHELASTIC")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def train_cmd(recipe: str, overrides: list[str], launcher: str = "single", nproc: int = 2) -> list[str]:
    cli = ["-m", "pixart_ds.cli", "train", recipe, *overrides]
    if launcher == "single":
        return [sys.executable, *cli]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cli]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
                str(free_port()), "--module", *cli[1:]]
    raise ValueError(launcher)


def run_train(recipe: str, overrides: list[str], launcher: str = "single", nproc: int = 2, env: dict | None = None,
              timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(recipe, overrides, launcher, nproc), capture_output=True, text=True,
                          timeout=timeout, env=clean_env(env), cwd=REPO)


def describe(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout ---\n{p.stdout[-3000:]}\n--- stderr ---\n{p.stderr[-6000:]}"


def read_metrics(run_dir: str) -> tuple[dict, list]:
    return _read_metrics(os.path.join(run_dir, "metrics.jsonl"))


def latest_tag(run_dir: str) -> str:
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        return f.read().strip()


def meta(run_dir: str, tag: str) -> dict:
    with open(os.path.join(run_dir, "checkpoints", tag, "pixart_ds.json")) as f:
        return json.load(f)


def worker_pids(launcher_pid: int, pattern: str = "pixart_ds.cli") -> list[int]:
    """The training processes below a launcher (children of torchrun, grandchildren under the deepspeed runner)."""
    out, todo = [], [launcher_pid]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except FileNotFoundError:
            continue
        for k in kids:
            try:
                with open(f"/proc/{k}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode()
            except FileNotFoundError:
                continue
            if pattern in cmd and "deepspeed.launcher" not in cmd and "torch.distributed.run" not in cmd:
                out.append(k)
            else:
                todo.append(k)
    return sorted(out)
