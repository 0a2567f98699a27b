"""The recipe schema: one typed, frozen dataclass tree.

Recipes (YAML) mirror this tree and load strictly: an unknown key, a wrong type or inconsistent batch arithmetic is
a `ConfigError` whose message names the file and the dotted key path, e.g.

    recipes/x.yaml: model.hiden_size: unknown key (did you mean hidden_size?)

Command-line overrides are dotted `key=value` pairs whose value is parsed as YAML (`model.depth=4`,
`train.lr=1e-4`, `data.sources=[{local: /data/a}]`). Derived values (gradient accumulation, latent size,
positional-embedding interpolation) are computed and asserted here and nowhere else.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from pixart_ds.model.presets import PRESETS


class ConfigError(ValueError):
    """A recipe problem; the message always names the source and the key path."""


# ----------------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    # A preset fills depth/hidden_size/num_heads/patch_size unless the recipe sets them explicitly.
    preset: str = "PixArt-XL/2"
    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: int = 2
    mlp_ratio: float = 4.0
    in_channels: int = 4  # VAE latent channels
    # Learned-range variance (improved DDPM): the network outputs 2*in_channels (epsilon + variance interpolation).
    pred_sigma: bool = True
    # adaLN-single (paper §2.3) or DiT-style per-block adaLN MLPs (the paper's ablation).
    adaln: Literal["single", "block"] = "single"
    # Text via cross-attention over T5 tokens, or DiT-style class conditioning (stage 1).
    condition: Literal["text", "class"] = "text"
    caption_channels: int = 4096  # T5 v1.1 XXL width
    max_text_tokens: int = 120  # paper: 120 tokens, not 77
    num_classes: int = 1000
    # Init std of the class-embedding table (condition=class, null-class row included): DiT's 0.02. The demo's
    # stage 1, a few hundred steps long, uses 1.0, which its stage 2 learned object colours from a little faster
    # (benchmarks/results/demo_cpu-2core_202611.md).
    label_init_std: float = 0.02
    # PixArtMS: resolution + aspect-ratio embeddings, positional embedding recomputed per (h, w).
    multi_scale: bool = False
    # Positional-embedding grid scale; null = derived from data.resolution (0.5 / 1 / 2 at 256 / 512 / 1024).
    pe_interpolation: Optional[float] = None
    attention: Literal["auto", "torch-flash", "flash-attn", "flash", "sdpa", "math"] = "auto"
    """Kernels (model/attention.py): torch-flash, flash-attn (alias flash), sdpa, math; auto = by what is present."""
    grad_checkpointing: bool = False
    """Recompute the transformer blocks' forward in the backward pass instead of keeping their activations."""
    grad_checkpointing_every: int = 1
    """With grad_checkpointing: recompute every k-th block only (1 = all blocks, 2 = blocks 0, 2, 4, ...)."""
    compile: Literal["none", "blocks"] = "none"
    """torch.compile each transformer block (regional: one graph shared by all blocks; parameters stay plain)."""


@dataclass(frozen=True)
class DiffusionConfig:
    num_timesteps: int = 1000
    beta_schedule: Literal["linear"] = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02


@dataclass(frozen=True)
class EncodersConfig:
    # Local folders (transformers T5EncoderModel + tokenizer; diffusers AutoencoderKL). Nothing is downloaded.
    text_encoder: Optional[str] = None
    vae: Optional[str] = None
    vae_scale: float = 0.18215
    text_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"


@dataclass(frozen=True)
class SourceConfig:
    local: str = ""  # a feature-MDS directory (or, for multi-scale, a directory of per-bucket streams)
    remote: Optional[str] = None
    proportion: Optional[float] = None  # relative mixing weight; null = natural size
    name: Optional[str] = None


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[SourceConfig, ...] = ()
    resolution: int = 256  # pixels; latents are resolution // 8
    multi_scale: bool = False  # one aspect-ratio bucket per global batch
    caption_dropout: float = 0.1  # swap in the null caption / null class for CFG (paper: 0.1)
    num_workers: int = 2
    num_canonical_nodes: Optional[int] = None  # fixed so resume at another world size keeps the order
    shuffle: bool = True
    shuffle_algo: str = "py1e"
    shuffle_block_size: Optional[int] = None
    predownload: Optional[int] = None
    # What to do with a sample that fails to decode: stop with its shard's name, or skip it and count it.
    on_corrupt: Literal["stop", "skip"] = "stop"
    pin_memory: Optional[bool] = None
    """Page-locked loader batches, copied to the GPU without blocking (null = on when CUDA is present)."""


@dataclass(frozen=True)
class TrainConfig:
    total_steps: int = 1000  # optimizer steps
    global_batch_size: int = 256  # images per optimizer step, independent of the number of GPUs
    micro_batch_size: int = 32  # images per GPU per forward/backward
    lr: float = 2e-5
    lr_scaling: Literal["none", "sqrt"] = "none"  # official code: lr * sqrt(global_batch / 256)
    warmup_steps: int = 1000
    weight_decay: float = 0.03
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-10
    grad_clip: float = 0.01
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    zero_stage: int = 2
    ema_decay: float = 0.9999
    seed: int = 0
    init_from: Optional[str] = None  # weights (+EMA) of an earlier stage; fresh optimizer and data
    init_reparam_t: int = 500  # DiT -> PixArt re-parameterization timestep (paper §2.3)
    resume: str = "auto"  # auto | none | a checkpoint path
    max_nonfinite_steps: int = 10  # consecutive skipped (non-finite) steps before the run stops
    # Seconds a collective, or the wait for the next batch, may block on another rank before this rank stops and
    # names the lost rank (exit 4).
    collective_timeout_s: int = 600
    time_limit_s: Optional[float] = None  # stop (checkpoint + requeue exit code) after this much wall time
    torch_adam: bool = False  # DeepSpeed's torch AdamW instead of FusedAdam (no JIT compile; used on CPU)
    adam: Literal["auto", "fused-adam", "torch", "torch-fused"] = "auto"
    """AdamW kernel: DeepSpeed FusedAdam (JIT), torch foreach, torch fused; auto = torch_adam ? torch : fused-adam."""
    overlap_comm: bool = False
    """ZeRO: overlap the gradient reduce-scatter with the backward pass (pays off across nodes)."""
    reduce_bucket_size: Optional[int] = None
    """ZeRO gradient-reduction bucket in elements (null = DeepSpeed's default, 5e8)."""
    allgather_bucket_size: Optional[int] = None
    """ZeRO all-gather bucket for the updated parameters, in elements (null = DeepSpeed's default, 5e8)."""


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3


@dataclass(frozen=True)
class LogConfig:
    every_steps: int = 10
    tensorboard: bool = True
    wandb: bool = False
    progress_bar: bool = True
    sample_every_steps: int = 0  # 0 = never
    sample_prompts: tuple[str, ...] = ()
    # Record every step's global-batch sample indices in metrics.jsonl (exact-resume and lost/duplicate-sample
    # checks; one all_gather per step).
    sample_ids: bool = False


@dataclass(frozen=True)
class SampleConfig:
    sampler: Literal["dpm-solver", "ddim", "ddpm"] = "dpm-solver"
    steps: int = 20
    guidance: float = 4.5
    seed: int = 0


@dataclass(frozen=True)
class Config:
    name: str = "run"
    stage: str = "custom"
    run_dir: str = "runs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


# ----------------------------------------------------------------------------------------------------------------
# Strict construction from plain data
# ----------------------------------------------------------------------------------------------------------------

_PRESET_KEYS = ("depth", "hidden_size", "num_heads", "patch_size")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, path: str, src: str):
    """Check/convert `value` against annotation `tp`; raise ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, path, src)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{src}: {path}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: {path}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, path, src)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{src}: {path}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{src}: {path}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]", src) for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else Any
        return tuple(_coerce(v, elem, f"{path}[{i}]", src) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{src}: {path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{src}: {path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-4" as a string; accept numeric strings.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{src}: {path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{src}: {path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{src}: {path}: unsupported type {_type_name(tp)}")


def _show(key) -> str:
    """A key as it goes into a one-line message (a key with a newline or control characters is quoted)."""
    text = str(key)
    return text if text.isprintable() else repr(text)


def _build(cls, data: dict, prefix: str, src: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"{src}: {prefix + '.' if prefix else ''}{_show(key)}: unknown key{hint}")
    data = dict(data)
    if cls is ModelConfig:
        name = data.get("preset", ModelConfig.preset)
        if not isinstance(name, str) or name not in PRESETS:
            raise ConfigError(f"{src}: {prefix}.preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
        for k, v in PRESETS[name].items():
            data.setdefault(k, v)
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(value, hints[key], f"{prefix + '.' if prefix else ''}{key}", src)
    return cls(**kwargs)


def from_dict(data: dict, source: str = "<dict>") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the recipe must be a mapping at top level, got {type(data).__name__}")
    cfg = _build(Config, data, "", source)
    validate(cfg, source)
    return cfg


def to_dict(cfg) -> dict:
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def _set_dotted(data: dict, dotted: str, value, src: str):
    parts = dotted.split(".")
    cur = data
    cls = Config
    for i, p in enumerate(parts[:-1]):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if p not in hints:
            names = list(hints)
            near = difflib.get_close_matches(p, names, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"{src}: {_show('.'.join(parts[: i + 1]))}: unknown key{hint}")
        cls = hints[p]
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{src}: {'.'.join(parts[: i + 1])}: is not a section")
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    leaf = parts[-1]
    names = [f.name for f in dataclasses.fields(cls)]
    if leaf not in names:
        near = difflib.get_close_matches(leaf, names, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ConfigError(f"{src}: {_show(dotted)}: unknown key{hint}")
    cur[leaf] = value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: {item!r}: an override must look like key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def load(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a recipe strictly and apply dotted overrides (`model.depth=4`)."""
    src = str(path) if path is not None else "<defaults>"
    data: dict = {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"{src}: recipe file not found")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{src}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{src}: the recipe must be a mapping at top level, got {type(data).__name__}")
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value, f"{src} (override {_show(key)})")
    return from_dict(data, src)


def replace(cfg: Config, **dotted) -> Config:
    """Return a copy with dotted keys replaced, e.g. replace(cfg, **{"train.lr": 1e-3})."""
    data = to_dict(cfg)
    for k, v in dotted.items():
        _set_dotted(data, k, v, "<replace>")
    return from_dict(data, "<replace>")


def dumps(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def dump(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (temp file + rename)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(dumps(cfg))
    os.replace(tmp, path)


def diff(a: Config, b: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs (for refusing edited recipes on resume)."""

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                out.update(flat(v, key + "."))
            else:
                out[key] = v
        return out

    fa, fb = flat(to_dict(a)), flat(to_dict(b))
    keys = sorted(set(fa) | set(fb))
    return [k for k in keys if fa.get(k) != fb.get(k) and not any(k.startswith(i) for i in ignore)]


# ----------------------------------------------------------------------------------------------------------------
# Derived values, asserted in one place
# ----------------------------------------------------------------------------------------------------------------

VAE_DOWNSAMPLE = 8


def latent_size(cfg: Config) -> int:
    return cfg.data.resolution // VAE_DOWNSAMPLE


def pe_interpolation(cfg: Config) -> float:
    """Positional-embedding scale: 0.5 / 1 / 2 at 256 / 512 / 1024 px unless the recipe sets it."""
    if cfg.model.pe_interpolation is not None:
        return cfg.model.pe_interpolation
    return cfg.data.resolution / 512


def adam_impl(cfg: Config) -> str:
    """The AdamW kernel a run uses: fused-adam | torch | torch-fused (train.adam, with auto from train.torch_adam)."""
    if cfg.train.adam == "auto":
        return "torch" if cfg.train.torch_adam else "fused-adam"
    return cfg.train.adam


def checkpointed_blocks(cfg_model) -> list[int]:
    """Indices of the blocks whose forward is recomputed in the backward pass (model.grad_checkpointing[_every])."""
    if not cfg_model.grad_checkpointing:
        return []
    return list(range(0, cfg_model.depth, cfg_model.grad_checkpointing_every))


def effective_lr(cfg: Config) -> float:
    if cfg.train.lr_scaling == "sqrt":
        return cfg.train.lr * math.sqrt(cfg.train.global_batch_size / 256)
    return cfg.train.lr


def batch_plan(cfg: Config, world_size: int, source: str = "<config>") -> tuple[int, int]:
    """(micro_batch_size, gradient_accumulation_steps) for `world_size` ranks.

    global_batch_size = micro_batch_size * gradient_accumulation_steps * world_size. The global batch is the
    recipe's and never depends on the number of GPUs; the micro batch is an upper bound lowered until it divides.
    """
    g, m = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if g % world_size:
        raise ConfigError(
            f"{source}: train.global_batch_size: {g} is not divisible by the world size {world_size}"
        )
    per_rank = g // world_size
    micro = min(m, per_rank)
    while per_rank % micro:
        micro -= 1
    return micro, per_rank // micro


def validate(cfg: Config, source: str = "<config>") -> None:
    m, d, t = cfg.model, cfg.data, cfg.train

    def err(key, msg):
        raise ConfigError(f"{source}: {key}: {msg}")

    # Numbers the trainer hands to torch, DeepSpeed and Streaming fail here, naming the key, rather than minutes
    # later inside those libraries (tests/reliability/test_recipe_fuzz.py). Positive sizes first: the checks below
    # divide by some of them.
    def leaves(v, key=""):
        if isinstance(v, dict):
            for k, x in v.items():
                yield from leaves(x, f"{key}.{k}" if key else k)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                yield from leaves(x, f"{key}[{i}]")
        else:
            yield key, v

    for key, value in leaves(to_dict(cfg)):
        if isinstance(value, float) and not math.isfinite(value):
            err(key, f"must be a finite number, got {value}")
    for key, value in (("model.hidden_size", m.hidden_size), ("model.num_heads", m.num_heads),
                       ("model.patch_size", m.patch_size), ("model.in_channels", m.in_channels),
                       ("model.caption_channels", m.caption_channels), ("model.max_text_tokens", m.max_text_tokens),
                       ("model.num_classes", m.num_classes), ("diffusion.num_timesteps", cfg.diffusion.num_timesteps),
                       ("data.num_canonical_nodes", d.num_canonical_nodes),
                       ("data.shuffle_block_size", d.shuffle_block_size)):
        if value is not None and value < 1:
            err(key, f"must be >= 1, got {value}")

    if m.grad_checkpointing_every < 1:
        err("model.grad_checkpointing_every", f"must be >= 1, got {m.grad_checkpointing_every}")
    if t.torch_adam and t.adam == "fused-adam":
        err("train.adam", "fused-adam contradicts train.torch_adam=true (use train.adam=torch or torch-fused)")
    for key, value in (("train.reduce_bucket_size", t.reduce_bucket_size),
                       ("train.allgather_bucket_size", t.allgather_bucket_size)):
        if value is not None and value < 1:
            err(key, f"must be >= 1 elements (or null), got {value}")
    if m.label_init_std <= 0:
        err("model.label_init_std", f"must be > 0, got {m.label_init_std}")
    if m.hidden_size % m.num_heads:
        err("model.hidden_size", f"{m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    if m.multi_scale and m.hidden_size % 3:
        err("model.hidden_size", f"{m.hidden_size} must be divisible by 3 for multi_scale (size/ar embedders)")
    if m.condition == "class" and m.multi_scale:
        err("model.multi_scale", "the class-conditional model has no multi-scale variant")
    if m.depth < 1:
        err("model.depth", f"must be >= 1, got {m.depth}")
    if d.resolution % (VAE_DOWNSAMPLE * m.patch_size):
        err("data.resolution", f"{d.resolution} is not a multiple of 8 x patch size = {VAE_DOWNSAMPLE * m.patch_size}")
    if d.multi_scale != m.multi_scale:
        err("data.multi_scale", f"{d.multi_scale} but model.multi_scale is {m.multi_scale}; they must agree")
    if not 0.0 <= d.caption_dropout < 1.0:
        err("data.caption_dropout", f"must be in [0, 1), got {d.caption_dropout}")
    props = [s.proportion for s in d.sources]
    if any(p is not None for p in props) and any(p is None for p in props):
        err("data.sources", "either every source has a proportion or none has")
    for i, s in enumerate(d.sources):
        if not s.local and not s.remote:
            err(f"data.sources[{i}].local", "a source needs a local (or remote) path")
        if s.proportion is not None and s.proportion <= 0:
            err(f"data.sources[{i}].proportion", f"must be > 0, got {s.proportion}")
    if t.global_batch_size < 1:
        err("train.global_batch_size", f"must be >= 1, got {t.global_batch_size}")
    if t.micro_batch_size < 1:
        err("train.micro_batch_size", f"must be >= 1, got {t.micro_batch_size}")
    if t.micro_batch_size > t.global_batch_size:
        err("train.micro_batch_size", f"{t.micro_batch_size} exceeds train.global_batch_size={t.global_batch_size}")
    if t.total_steps < 1:
        err("train.total_steps", f"must be >= 1, got {t.total_steps}")
    if t.lr <= 0:
        err("train.lr", f"must be > 0, got {t.lr}")
    if not 0.0 <= t.ema_decay <= 1.0:
        err("train.ema_decay", f"must be in [0, 1], got {t.ema_decay}")
    if t.zero_stage not in (0, 1, 2):
        err("train.zero_stage", f"must be 0, 1 or 2, got {t.zero_stage}")
    if t.warmup_steps < 0:
        err("train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    if t.max_nonfinite_steps < 1:
        err("train.max_nonfinite_steps", f"must be >= 1, got {t.max_nonfinite_steps}")
    if cfg.checkpoint.every_steps < 1:
        err("checkpoint.every_steps", f"must be >= 1, got {cfg.checkpoint.every_steps}")
    if cfg.checkpoint.keep_last < 1:
        err("checkpoint.keep_last", f"must be >= 1, got {cfg.checkpoint.keep_last}")
    if cfg.sample.steps < 1:
        err("sample.steps", f"must be >= 1, got {cfg.sample.steps}")
    if m.mlp_ratio <= 0:
        err("model.mlp_ratio", f"must be > 0, got {m.mlp_ratio}")
    if m.pe_interpolation is not None and m.pe_interpolation <= 0:
        err("model.pe_interpolation", f"must be > 0 (or null), got {m.pe_interpolation}")
    df = cfg.diffusion
    if df.num_timesteps > 1_000_000:  # one float64 table entry per timestep, several tables
        err("diffusion.num_timesteps", f"must be <= 1000000, got {df.num_timesteps}")
    if not 0 < df.beta_start <= df.beta_end < 1:
        err("diffusion.beta_start", f"need 0 < beta_start <= diffusion.beta_end < 1, got {df.beta_start} and "
                                    f"{df.beta_end}")
    if cfg.encoders.vae_scale <= 0:
        err("encoders.vae_scale", f"must be > 0, got {cfg.encoders.vae_scale}")
    if d.resolution < VAE_DOWNSAMPLE * m.patch_size:
        err("data.resolution", f"must be >= 8 x patch size = {VAE_DOWNSAMPLE * m.patch_size}, got {d.resolution}")
    if d.num_workers < 0:
        err("data.num_workers", f"must be >= 0, got {d.num_workers}")
    if d.predownload is not None and d.predownload < 0:
        err("data.predownload", f"must be >= 0 (or null), got {d.predownload}")
    if t.micro_batch_size > 2**20:
        err("train.micro_batch_size", f"must be <= {2**20} images per device, got {t.micro_batch_size}")
    for i, beta in enumerate(t.adam_betas):
        if not 0.0 <= beta < 1.0:
            err(f"train.adam_betas[{i}]", f"must be in [0, 1), got {beta}")
    for key, value in (("train.adam_eps", t.adam_eps), ("train.weight_decay", t.weight_decay),
                       ("train.grad_clip", t.grad_clip)):
        if value < 0:
            err(key, f"must be >= 0, got {value}")
    if not 0 <= t.seed < 2**32:
        err("train.seed", f"must be in [0, 2**32), got {t.seed}")
    if not 0 <= t.init_reparam_t < df.num_timesteps:
        err("train.init_reparam_t", f"must be in [0, diffusion.num_timesteps={df.num_timesteps}), got "
                                    f"{t.init_reparam_t}")
    if not 1 <= t.collective_timeout_s <= 10**8:
        err("train.collective_timeout_s", f"must be in [1, 10**8] seconds, got {t.collective_timeout_s}")
    if t.time_limit_s is not None and t.time_limit_s <= 0:
        err("train.time_limit_s", f"must be > 0 seconds (or null), got {t.time_limit_s}")
