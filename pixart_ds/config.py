"""The recipe schema: one typed, frozen dataclass tree.

Recipes (YAML) mirror this tree and load strictly: an unknown key, a wrong type or inconsistent batch arithmetic is
a `ConfigError` whose message names the file and the dotted key path, e.g.

    recipes/x.yaml: model.hiden_size: unknown key (did you mean hidden_size?)

Command-line overrides are dotted `key=value` pairs whose value is parsed as YAML (`model.depth=4`,
`train.lr=1e-4`, `data.sources=[{local: /data/a}]`). Derived values (gradient accumulation, latent size,
positional-embedding interpolation) are computed and asserted here and nowhere else.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from pixart_ds.fsutil import atomic_write_text


class ConfigError(ValueError):
    """A recipe problem; the message always names the source and the key path."""


# ----------------------------------------------------------------------------------------------------------------
# Constants (each lives here once)
# ----------------------------------------------------------------------------------------------------------------

# Named model sizes. PixArt-XL/2 is the paper's model (§2.4 / Appendix A.5): 28 blocks, hidden 1152, 16 heads,
# patch 2. The L/B/S sizes follow DiT's table (Peebles & Xie 2023, Table 1). `tiny` is for tests.
PRESETS: dict[str, dict] = {
    "PixArt-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),
    "PixArt-L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2),
    "PixArt-B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "PixArt-S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "tiny": dict(depth=2, hidden_size=48, num_heads=3, patch_size=2),
}
VAE_DOWNSAMPLE = 8  # SD's VAE: an image of R pixels has R / 8 latent rows
VAE_SCALE = 0.18215  # SD's sd-vae-ft-ema latent scale (latents x 0.18215 have about unit variance)
MAX_TEXT_TOKENS = 120  # paper §2.4: T5 captions of 120 tokens, not 77
PE_BASE_RESOLUTION = 512  # positional-embedding scale 1 at 512 px (diffusers' interpolation_scale 0.5 / 1 / 2)


# ----------------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """The network (paper §2.3, Appendix A.5)."""

    preset: str = "PixArt-XL/2"
    """Named size (PRESETS); fills depth, hidden_size, num_heads and patch_size unless the recipe sets them."""
    depth: int = 28
    """Transformer blocks."""
    hidden_size: int = 1152
    """Width of the token stream."""
    num_heads: int = 16
    """Attention heads (head width = hidden_size / num_heads)."""
    patch_size: int = 2
    """Latent pixels per patch side (tokens = (resolution / 8 / patch_size)^2)."""
    mlp_ratio: float = 4.0
    """MLP width / hidden_size."""
    in_channels: int = 4
    """VAE latent channels."""
    pred_sigma: bool = True
    """Learned-range variance (improved DDPM): the network outputs 2 x in_channels (epsilon + interpolation)."""
    adaln: Literal["single", "block"] = "single"
    """adaLN-single (paper §2.3) or DiT's per-block adaLN MLPs (the paper's ablation)."""
    condition: Literal["text", "class"] = "text"
    """Text via cross-attention over T5 tokens, or DiT-style class labels (stage 1)."""
    caption_channels: int = 4096
    """Width of the text encoder's features (T5 v1.1 XXL: 4096)."""
    max_text_tokens: int = MAX_TEXT_TOKENS
    """Caption length in T5 tokens (paper: 120, not 77); the null caption's length."""
    num_classes: int = 1000
    """Class labels of a class-conditional model (a null class is added for guidance)."""
    label_init_std: float = 0.02
    """Init std of the class-embedding table (DiT's 0.02; the demo's short stage 1 uses 1.0, see its report)."""
    multi_scale: bool = False
    """PixArtMS: size and aspect-ratio embeddings, positional embedding recomputed per (h, w)."""
    pe_interpolation: Optional[float] = None
    """Positional-embedding grid scale; null = data.resolution / 512 (0.5 / 1 / 2 at 256 / 512 / 1024 px)."""
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
    """The noise schedule (DDPM / improved DDPM, as the official code)."""

    num_timesteps: int = 1000
    """Diffusion steps T."""
    beta_schedule: Literal["linear"] = "linear"
    """Shape of the beta schedule."""
    beta_start: float = 1e-4
    """beta_1."""
    beta_end: float = 0.02
    """beta_T."""


@dataclass(frozen=True)
class EncodersConfig:
    """Frozen encoders, local folders loaded with from_pretrained (nothing is downloaded)."""

    text_encoder: Optional[str] = None
    """T5 folder (transformers T5EncoderModel + tokenizer); needed for sample grids and evaluation."""
    vae: Optional[str] = None
    """VAE folder (diffusers AutoencoderKL); needed for sample grids and evaluation."""
    vae_scale: float = VAE_SCALE
    """Latent scale: latents x vae_scale are what the model sees (SD's VAE: 0.18215)."""
    text_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """T5's dtype on GPU (fp32 on CPU)."""


@dataclass(frozen=True)
class SourceConfig:
    """One feature-shard dataset mixed into training."""

    local: str = ""
    """Feature-MDS directory (multi-scale: bucket streams listed in its manifest.jsonl); the cache of `remote`."""
    remote: Optional[str] = None
    """Where the shards live when not local (any Streaming remote: s3://, gs://, another directory)."""
    proportion: Optional[float] = None
    """Relative mixing weight; null = in proportion to the source's size."""
    name: Optional[str] = None
    """A label for logs."""


@dataclass(frozen=True)
class DataConfig:
    """What training reads: feature shards through Streaming."""

    sources: tuple[SourceConfig, ...] = ()
    """The feature-shard datasets (SourceConfig each)."""
    resolution: int = 256
    """Image resolution in pixels; latents are resolution / 8."""
    multi_scale: bool = False
    """Aspect-ratio buckets, one bucket per global batch (stage 3 at 512 / 1024; must equal model.multi_scale)."""
    caption_dropout: float = 0.1
    """Probability of the null caption / null class, for classifier-free guidance (paper: 0.1)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    num_canonical_nodes: Optional[int] = None
    """Streaming's canonical node count, fixed so a resume at another world size keeps the sample order."""
    shuffle: bool = True
    """Shuffle the samples (seeded by train.seed)."""
    shuffle_algo: str = "py1e"
    """Streaming's shuffle algorithm."""
    shuffle_block_size: Optional[int] = None
    """Streaming's shuffle block size (null: its default)."""
    predownload: Optional[int] = None
    """Samples to download ahead per worker from a remote (null: Streaming's default)."""
    on_corrupt: Literal["stop", "skip"] = "stop"
    """A sample that fails to decode: stop naming its shard, or replace it by another of its stream and count it."""
    pin_memory: Optional[bool] = None
    """Page-locked loader batches, copied to the GPU without blocking (null = on when CUDA is present)."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, precision, stage initialisation and the run's safety limits (official stage configs)."""

    total_steps: int = 1000
    """Optimizer steps of the run."""
    global_batch_size: int = 256
    """Images per optimizer step, independent of the number of GPUs (paper Table 4)."""
    micro_batch_size: int = 32
    """Images per GPU per forward/backward (upper bound; lowered until it divides the per-GPU batch)."""
    lr: float = 2e-5
    """Learning rate after warm-up (constant)."""
    lr_scaling: Literal["none", "sqrt"] = "none"
    """sqrt = lr x sqrt(global_batch_size / 256), as the official code does."""
    warmup_steps: int = 1000
    """Linear warm-up steps."""
    weight_decay: float = 0.03
    """AdamW weight decay on weight matrices (none on biases, norms, embeddings, tables)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-10
    """AdamW epsilon (official: 1e-10)."""
    grad_clip: float = 0.01
    """Global gradient-norm clip (official: 0.01)."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """DeepSpeed precision; fp16 uses dynamic loss scaling."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (0, 1 or 2)."""
    ema_decay: float = 0.9999
    """EMA of the weights, kept outside the optimizer; sampling uses it."""
    seed: int = 0
    """Seeds the init, the data order and the noise."""
    init_from: Optional[str] = None
    """Weights (+ EMA) of an earlier stage (run directory, checkpoint or weights folder); fresh optimizer and data."""
    init_reparam_t: int = 500
    """Timestep of the DiT -> PixArt re-parameterization when init_from is class-conditional (paper §2.3)."""
    resume: str = "auto"
    """auto = continue from the run's latest checkpoint; none; or a checkpoint path."""
    max_nonfinite_steps: int = 10
    """Consecutive non-finite (skipped) steps before the run stops with exit code 3."""
    collective_timeout_s: int = 600
    """Seconds a collective, or the wait for the next batch, may block on another rank before the lost rank is
    named (exit code 4)."""
    time_limit_s: Optional[float] = None
    """Stop with a checkpoint (exit code 75, requeue) after this much wall time."""
    torch_adam: bool = False
    """DeepSpeed's torch AdamW instead of its FusedAdam (no JIT compile; for CPU)."""
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
    """When checkpoints are written (RUN_DIR/checkpoints)."""

    every_steps: int = 1000
    """Steps between checkpoints (one is also written at the end and when the run is asked to stop)."""
    keep_last: int = 3
    """Newest complete checkpoints kept."""


@dataclass(frozen=True)
class LogConfig:
    """What the run reports (RUN_DIR/metrics.jsonl, TensorBoard, W&B, sample grids)."""

    every_steps: int = 10
    """Steps between metric records (skipped steps are always recorded)."""
    tensorboard: bool = True
    """Write RUN_DIR/tensorboard."""
    wandb: bool = False
    """Log to Weights & Biases (pip install pixart_ds[wandb])."""
    progress_bar: bool = True
    """A tqdm bar on rank 0."""
    sample_every_steps: int = 0
    """Steps between EMA sample grids in RUN_DIR/samples (0 = never)."""
    sample_prompts: tuple[str, ...] = ()
    """Prompts of the sample grid (class ids for a class-conditional model)."""
    sample_ids: bool = False
    """Record every step's global-batch sample indices (exact-resume checks; one all_gather per step)."""


@dataclass(frozen=True)
class SampleConfig:
    """How sample grids are drawn (paper: DPM-Solver++ 20 steps, guidance 4.5)."""

    sampler: Literal["dpm-solver", "ddim", "ddpm"] = "dpm-solver"
    """Sampler."""
    steps: int = 20
    """Sampling steps."""
    guidance: float = 4.5
    """Classifier-free guidance scale."""
    seed: int = 0
    """Seed of the first image (image i: seed + i)."""


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation of the EMA weights during training (pixart_ds.eval: FID / KID / CLIP score / alignment)."""

    every_steps: int = 0
    """Evaluate the EMA weights every N optimizer steps (0 = never): rank 0 generates and scores, the others wait
    in the next step's collective, so one evaluation must take less than train.collective_timeout_s."""
    num_images: int = 64
    """Images per evaluation (bounded cost); image i is prompt i mod P, seeded with eval.seed + i."""
    prompts: tuple[str, ...] = ()
    """The fixed prompt set (class ids for class-conditional models); empty = eval.prompts_file."""
    prompts_file: Optional[str] = None
    """One caption per line or JSON lines with a caption field (pixart_ds.eval.run.read_prompts)."""
    seed: int = 0
    """Image i is sampled from seed + i, the same at every evaluation."""
    sampler: Literal["dpm-solver", "ddim", "ddpm"] = "dpm-solver"
    """Sampler (paper: DPM-Solver++)."""
    steps: int = 20
    """Sampling steps (paper: 20)."""
    guidance: float = 4.5
    """Classifier-free guidance scale (paper: 4.5)."""
    batch_size: int = 16
    """Images generated per forward batch."""
    reference: Optional[str] = None
    """FID/KID reference: an image folder, raw MDS shards or a statistics .npz (null = no FID/KID)."""
    reference_images: Optional[int] = None
    """Use the first N reference images (null = all)."""
    inception: Optional[str] = None
    """Inception-v3 weights file (torch-fidelity's format) for FID/KID; nothing is downloaded."""
    clip: Optional[str] = None
    """A local CLIP folder (transformers CLIPModel + CLIPProcessor) for CLIP score (null = none)."""
    kid_subsets: int = 100
    """KID subsets (subset size: min(1000, images))."""
    grid_images: int = 16
    """Images in the grid written to RUN_DIR/eval/step_N.png."""
    cache_dir: Optional[str] = None
    """Where reference statistics are cached (null = RUN_DIR/eval/cache)."""


@dataclass(frozen=True)
class Config:
    """A recipe: one complete run."""

    name: str = "run"
    """Run name (logs, W&B)."""
    stage: str = "custom"
    """Which paper stage this recipe is (a label)."""
    run_dir: str = "runs/run"
    """Where config.yaml, metrics.jsonl, checkpoints/ and samples/ go."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """The noise schedule."""
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    """Frozen T5 and VAE."""
    data: DataConfig = field(default_factory=DataConfig)
    """Feature shards and how they are read."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and the run's limits."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint frequency and retention."""
    log: LogConfig = field(default_factory=LogConfig)
    """Metrics, TensorBoard, sample grids."""
    sample: SampleConfig = field(default_factory=SampleConfig)
    """Sampler of the sample grids."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation during training (pixart_ds.eval): FID / KID / CLIP score / alignment of the EMA weights."""


def field_docs(cls) -> dict[str, str]:
    """{field: its one-line description} of a config dataclass: the string literal under each field (the
    attribute-docstring convention litgpt uses), read from this module's source."""
    docs: dict[str, str] = {}
    last = None
    for node in ast.parse(inspect.getsource(cls)).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            last = node.target.id
        elif isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant) and last:
            docs[last] = " ".join(str(node.value.value).split())
            last = None
        else:
            last = None
    return docs


def describe_keys(cls=None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every recipe key, in schema order (`pixart-ds train --help`,
    docs/recipe.md)."""
    cls = cls or Config
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(describe_keys(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append((key, yaml.safe_dump(to_dict(default), default_flow_style=True).strip().removesuffix("\n..."),
                    docs.get(f.name, "")))
        if typing.get_origin(tp) is tuple and typing.get_args(tp) and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            out.extend(describe_keys(typing.get_args(tp)[0], key + "[i]."))
    return out


def keys_markdown() -> str:
    """Every recipe key as a markdown table (docs/recipe.md is this, written by `pixart-ds keys --markdown`)."""
    rows = ["| key | default | description |", "|---|---|---|"]
    rows += [f"| `{k}` | `{d}` | {t} |" for k, d, t in describe_keys()]
    return ("# Recipe keys\n\nEvery key of a recipe (pixart_ds/config.py), its default and what it does. Override any "
            "of them on the command line as `key=value` (YAML), e.g. `pixart-ds train recipes/stage2_sam256.yaml "
            "train.lr=1e-4`.\n\n" + "\n".join(rows) + "\n")


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
    """Write the resolved config atomically (pixart_ds.fsutil)."""
    atomic_write_text(os.fspath(path), dumps(cfg))


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

def latent_size(cfg: Config) -> int:
    return cfg.data.resolution // VAE_DOWNSAMPLE


def model_pe_interpolation(model: ModelConfig, resolution: int) -> float:
    """Positional-embedding scale of a model trained at `resolution` px: 0.5 / 1 / 2 at 256 / 512 / 1024 unless
    model.pe_interpolation sets it."""
    if model.pe_interpolation is not None:
        return model.pe_interpolation
    return resolution / PE_BASE_RESOLUTION


def pe_interpolation(cfg: Config) -> float:
    return model_pe_interpolation(cfg.model, cfg.data.resolution)


def model_from_dict(data: dict, source: str = "<dict>") -> ModelConfig:
    """A ModelConfig from plain data (a checkpoint's model.json, a converter's inferred keys), strictly: unknown keys
    and wrong types fail naming `source`; the preset fills the sizes not given."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: model: expected a mapping, got {type(data).__name__}")
    return _build(ModelConfig, dict(data), "model", source)


def model_to_dict(model: ModelConfig, resolution: Optional[int] = None) -> dict:
    """A ModelConfig as plain data with the positional-embedding scale made explicit when the resolution is known
    (so a weights folder does not depend on the derivation)."""
    d = to_dict(model)
    if resolution is not None:
        d["pe_interpolation"] = model_pe_interpolation(model, resolution)
    return d


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
    ev = cfg.eval
    for key, value in (("eval.every_steps", ev.every_steps), ("eval.grid_images", ev.grid_images)):
        if value < 0:
            err(key, f"must be >= 0, got {value}")
    for key, value in (("eval.num_images", ev.num_images), ("eval.steps", ev.steps),
                       ("eval.batch_size", ev.batch_size), ("eval.kid_subsets", ev.kid_subsets),
                       ("eval.reference_images", ev.reference_images)):
        if value is not None and value < 1:
            err(key, f"must be >= 1, got {value}")
    if ev.every_steps > 0:
        if not ev.prompts and not ev.prompts_file:
            err("eval.prompts", "eval.every_steps > 0 needs a prompt set (eval.prompts or eval.prompts_file)")
        if ev.reference and not ev.inception:
            err("eval.inception", "eval.reference needs an Inception-v3 weights file for FID/KID")
