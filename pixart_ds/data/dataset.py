"""The training dataset: feature MDS shards -> one dict of named tensors per sample.

PixArt-alpha trains on precomputed features (paper §2.4: VAE latents and T5 tokens are extracted once). A feature
sample (pixart_ds.data.schema.FEATURE_COLUMNS) holds the VAE posterior mean/std and the unpadded T5 tokens; this
module turns it into what `train_step` consumes:

    latent        float32 [C, h, w]   (mean + std * eps) * vae_scale   (a fresh posterior sample, like
                                                                       DiagonalGaussianDistribution.sample())
    text_emb      float32 [L, D]      T5 tokens zero-padded to L = model.max_text_tokens (120)   } text data
    text_mask     int64   [L]         1 for the real tokens                                      }
    label         int64   []          class index                                                  class data
    drop          bool    []          caption / class dropout for classifier-free guidance (paper §2.4, p = 0.1)
    img_hw        float32 [2]         original (height, width) in pixels   } PixArtMS micro-conditions
    aspect_ratio  float32 [1]         bucket h / w                         }
    sample_idx    int64   []          global sample index (which sample this is, for exact-resume checks)
    skipped       bool    []          the scheduled sample was corrupt and a deterministic replacement was returned

Randomness (eps and drop) is a pure function of (train.seed, epoch, scheduled sample index): the same sample in
the same epoch gets the same noise whatever the worker count, rank count or resume point, so an interrupted run
and an uninterrupted run train on identical tensors (DESIGN.md principle 9).

Corrupt data is never trained on silently. A shard whose bytes do not match the hash recorded in its index.json
(MDSWriter(hashes=[...]); checked once per node, by the first process that touches the shard), a sample that fails
to decode, has the wrong shape (against the stream's first sample / the recipe) or non-finite values, is either an
error naming the shard file and sample index (data.on_corrupt = "stop") or is replaced by another sample of the
same stream, chosen deterministically, and counted (data.on_corrupt = "skip"; the `skipped` flag is summed by the
loader). Replacing instead of dropping keeps every rank's batch count equal (a dropped sample would desynchronise
the ranks) and keeps the loader's sample counter, hence resume, exact.
"""
from __future__ import annotations

import logging
import os
import time
from multiprocessing.shared_memory import SharedMemory as BuiltinSharedMemory
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as tdist
from filelock import FileLock
from streaming import Stream, StreamingDataset
from streaming.base.compression import decompress
from streaming.base.dataset import _ShardState  # private in streaming 0.13; its states drive the ready thread
from streaming.base.format import reader_from_json
from streaming.base.hashing import get_hash
from streaming.base.shared import SharedArray

from pixart_ds.config import Config, ConfigError, latent_size
from pixart_ds.data.schema import read_index

logger = logging.getLogger(__name__)

# Preferred order when an index records several hashes: fast non-cryptographic ones first.
_HASH_PREFERENCE = ("xxh3_64", "xxh64", "xxh128", "xxh3_128", "xxh32", "md5", "sha1", "sha256")
# How many deterministic candidates a corrupt sample may try before giving up (skip mode).
_MAX_REPLACEMENT_TRIES = 64
# Node-wide shard verdicts (shared memory, one byte per shard): Streaming's prefix + this name.
SHARD_CHECK_SHM = "pixart_shard_checks"
_CHECK_UNKNOWN, _CHECK_RUNNING, _CHECK_OK, _CHECK_SIZE, _CHECK_HASH, _CHECK_UNREADABLE = range(6)
_CHECK_REASONS = {
    _CHECK_SIZE: "size differs from the {bytes} bytes in index.json (truncated?)",
    _CHECK_HASH: "{algo} checksum does not match index.json (bytes changed on disk)",
    _CHECK_UNREADABLE: "cannot read the shard file",
}


class CorruptSampleError(RuntimeError):
    """A sample or shard that cannot be trained on; the message names the shard file and the sample index."""


class _Corrupt(Exception):
    def __init__(self, shard_path: str, sample_idx: int, reason: str):
        super().__init__(f"corrupt sample {sample_idx} in shard {shard_path}: {reason}")
        self.shard_path, self.sample_idx, self.reason = shard_path, sample_idx, reason


def sample_rng(seed: int, epoch: int, sample_idx: int, stream: int) -> np.random.Generator:
    """The generator for one (seed, epoch, sample) and purpose: stream 0 = latent noise eps, 1 = caption dropout,
    2 = replacement choice. Separate streams so that changing, e.g., the dropout rate leaves the noise unchanged."""
    return np.random.default_rng([int(seed), int(epoch), int(sample_idx), int(stream)])


def latent_noise(seed: int, epoch: int, sample_idx: int, shape: Sequence[int]) -> np.ndarray:
    """eps ~ N(0, I) float32 of `shape` for the posterior sample latent = (mean + std * eps) * vae_scale."""
    return sample_rng(seed, epoch, sample_idx, 0).standard_normal(tuple(shape), dtype=np.float32)


def caption_drop(seed: int, epoch: int, sample_idx: int, p: float) -> bool:
    """Whether this sample's caption (or class) is replaced by the null one for classifier-free guidance."""
    return bool(sample_rng(seed, epoch, sample_idx, 1).random() < p) if p > 0 else False


# ----------------------------------------------------------------------------------------------------------------
# Reading one sample without a StreamingDataset (build-time validation; no shared memory, no writes)
# ----------------------------------------------------------------------------------------------------------------


def peek_first_sample(stream_dir: str) -> tuple[dict[str, Any], str]:
    """(decoded first sample, shard path) of a local MDS stream, read straight from the shard file (decompressed in
    memory when only the compressed shard is present). Raises CorruptSampleError naming the shard if it cannot be
    decoded."""
    shards = read_index(stream_dir, "feature-shard", "is this a feature-shard directory?")
    for obj in shards:
        if int(obj.get("samples", 0)) < 1:
            continue
        reader = reader_from_json(stream_dir, None, obj)
        raw_info, zip_info = reader.file_pairs[0]
        raw_path = os.path.join(stream_dir, raw_info.basename)
        try:
            if os.path.isfile(raw_path):
                data = reader.get_sample_data(0)
            elif zip_info is not None and os.path.isfile(os.path.join(stream_dir, zip_info.basename)):
                raw_path = os.path.join(stream_dir, zip_info.basename)
                with open(raw_path, "rb") as f:
                    blob = decompress(reader.compression, f.read())
                begin, end = np.frombuffer(blob[4:12], np.uint32)
                data = blob[begin:end]
            else:
                raise FileNotFoundError(f"{raw_path}: shard listed in index.json is missing")
            return reader.decode_sample(data), raw_path
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - any decode failure is a corrupt shard
            raise CorruptSampleError(f"corrupt sample 0 in shard {raw_path}: {type(e).__name__}: {e}") from None
    raise ValueError(f"{os.path.join(stream_dir, 'index.json')}: the stream has no samples")


class StreamSpec:
    """What build-time validation learned about one stream: its shard path (for messages) and latent shape."""

    def __init__(self, path: str, shard_path: str, latent_shape: tuple[int, int, int], text_dim: Optional[int]):
        self.path, self.shard_path, self.latent_shape, self.text_dim = path, shard_path, latent_shape, text_dim


def validate_stream(cfg: Config, stream_dir: str) -> StreamSpec:
    """Check a stream's first sample against the recipe; a mismatch is a one-line ConfigError naming the key and
    the shard path (a wrong text encoder, VAE or resolution must not start a multi-day run)."""
    sample, shard = peek_first_sample(stream_dir)
    m = cfg.model
    for col in ("vae_mean", "vae_std"):
        if col not in sample:
            raise ConfigError(f"{shard}: column {col!r} missing: not a feature shard (run `pixart-ds features`)")
    mean = sample["vae_mean"]
    if mean.ndim != 3:
        raise ConfigError(f"{shard}: vae_mean has shape {list(mean.shape)}, expected [C, h, w]")
    c, h, w = (int(x) for x in mean.shape)
    if c != m.in_channels:
        raise ConfigError(f"model.in_channels: {m.in_channels} but {shard} has {c}-channel latents")
    if not m.multi_scale:
        ls = latent_size(cfg)
        if (h, w) != (ls, ls):
            raise ConfigError(f"data.resolution: {cfg.data.resolution} px means {ls}x{ls} latents but {shard} has "
                              f"{h}x{w} (features made at another resolution, or multi-scale buckets)")
    else:
        if h % m.patch_size or w % m.patch_size:
            raise ConfigError(f"model.patch_size: {m.patch_size} does not divide the {h}x{w} latents of {shard}")
        ls = latent_size(cfg)
        area = h * w / float(ls * ls)
        if not 0.5 <= area <= 2.0:
            raise ConfigError(f"data.resolution: {cfg.data.resolution} px means ~{ls * ls} latent pixels per bucket "
                              f"but {shard} has {h}x{w} (buckets made for another resolution)")
    text_dim = None
    if m.condition == "text":
        if "t5" not in sample:
            raise ConfigError(f"model.condition: text but {shard} has no t5 column (class-conditional features)")
        t5 = sample["t5"]
        if t5.ndim != 2:
            raise ConfigError(f"{shard}: t5 has shape {list(t5.shape)}, expected [tokens, D]")
        text_dim = int(t5.shape[1])
        if text_dim != m.caption_channels:
            raise ConfigError(f"model.caption_channels: {m.caption_channels} but {shard} has T5 width {text_dim} "
                              f"(features made with another text encoder)")
    else:
        label = int(sample.get("label", -1))
        if not 0 <= label < m.num_classes:
            raise ConfigError(f"model.condition: class but {shard} has label {label} (outside [0, "
                              f"model.num_classes={m.num_classes}); text features?)")
    return StreamSpec(stream_dir, shard, (c, h, w), text_dim)


# ----------------------------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------------------------


class FeatureDataset(StreamingDataset):
    """StreamingDataset over feature shards yielding the named tensors listed in the module docstring.

    `streams` are built by pixart_ds.data.loader.build_loader (the only place that knows paths and weights);
    `specs` are the matching validate_stream results. All Streaming keyword arguments pass through.
    """

    def __init__(self, *, cfg: Config, streams: Sequence[Stream], specs: Sequence[StreamSpec], **kwargs):
        self.cfg = cfg
        self.seed = int(cfg.train.seed)
        self.vae_scale = float(cfg.encoders.vae_scale)
        self.caption_dropout = float(cfg.data.caption_dropout)
        self.on_corrupt = cfg.data.on_corrupt
        self.condition = cfg.model.condition
        self.max_tokens = int(cfg.model.max_text_tokens)
        self.text_dim = int(cfg.model.caption_channels)
        self.specs = list(specs)
        self._epoch = 0
        # Per-process (and per DataLoader worker) shard verdicts: shard id -> None (ok) or the reason it is bad.
        self._shard_verdict: dict[int, Optional[str]] = {}
        super().__init__(streams=list(streams), **kwargs)
        self._attach_shard_checks()

    # -- epoch bookkeeping ---------------------------------------------------------------------------------------

    def _resume_incr_epoch(self) -> tuple[int, int]:
        # Streaming decides the epoch (fresh, or from a loaded state_dict) at the top of __iter__, in every worker;
        # we keep it so eps/drop depend on the epoch without another shared-memory read per sample.
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._epoch = int(epoch)
        return epoch, sample_in_epoch

    # -- shard integrity -----------------------------------------------------------------------------------------

    def shard_path(self, shard_id: int) -> str:
        stream = self.streams[self.stream_per_shard[shard_id]]
        raw_info, _ = self.shards[shard_id].file_pairs[0]
        return os.path.join(stream.local, stream.split or "", raw_info.basename)

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        # Streaming calls this from its background download thread too. An exception there only sets an event
        # that makes the sample loop stop early, which would end the epoch silently. Record the failure instead;
        # the sample read (_check_shard) turns it into a named error or a counted skip.
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as e:  # noqa: BLE001
            self._shard_verdict[shard_id] = f"cannot prepare shard: {type(e).__name__}: {e}"
            # Mark it LOCAL rather than leave it PREPARING: Streaming's ready thread waits for LOCAL and would
            # hang. Readers in other processes then retry, fail the same way and record their own verdict.
            self._shard_states[shard_id] = _ShardState.LOCAL

    def _attach_shard_checks(self) -> None:
        """The node-wide table of shard verdicts (one byte per shard, _CHECK_* codes) in shared memory, so each
        shard is read and hashed once per node and run rather than once per rank and DataLoader worker."""

        name = f"{self._shm_prefix_int:06d}_{SHARD_CHECK_SHM}"
        leader = self._unique_rank_world.is_local_leader
        if leader:
            # A segment of this name left by a killed run would hold stale verdicts: start from a fresh one.
            try:
                stale = BuiltinSharedMemory(name)
                stale.close()
                stale.unlink()
            except FileNotFoundError:
                pass
            self._shard_checks = SharedArray(self.num_shards, np.uint8, name)
            self._shard_checks[:] = _CHECK_UNKNOWN
        if tdist.is_available() and tdist.is_initialized():
            tdist.barrier()
        if not leader:
            self._shard_checks = SharedArray(self.num_shards, np.uint8, name)

    def _check_shard(self, shard_id: int) -> Optional[str]:
        """None if the shard is usable, else why not. The hash recorded in index.json is verified once per node:
        the first process to touch the shard claims it, the others wait for its verdict."""
        if shard_id in self._shard_verdict:
            return self._shard_verdict[shard_id]
        path = self.shard_path(shard_id)
        if not os.path.isfile(path):
            self.prepare_shard(shard_id, blocking=True)
            if self._shard_verdict.get(shard_id):
                return self._shard_verdict[shard_id]
        raw_info, _ = self.shards[shard_id].file_pairs[0]
        algo = next((a for a in _HASH_PREFERENCE if a in raw_info.hashes), None)
        if algo is None and raw_info.hashes:
            algo = sorted(raw_info.hashes)[0]
        if algo is None:  # no hash recorded: only the size can be checked (cheap, per process)
            size = os.path.getsize(path)
            verdict = None if size == raw_info.bytes else \
                f"size {size} bytes, index.json says {raw_info.bytes} (truncated?)"
            self._shard_verdict[shard_id] = verdict
            return verdict

        checks = self._shard_checks
        mine = False
        if checks[shard_id] == _CHECK_UNKNOWN:
            if not hasattr(self, "_check_lock"):  # FileLocks hold thread locks: created lazily, per process
                self._check_lock = FileLock(self._cache_filelock_path)
            with self._check_lock:
                if checks[shard_id] == _CHECK_UNKNOWN:
                    checks[shard_id] = _CHECK_RUNNING
                    mine = True
        if mine:
            code = _CHECK_UNREADABLE
            try:
                with open(path, "rb") as f:
                    data = f.read()
                if len(data) != raw_info.bytes:
                    code = _CHECK_SIZE
                elif get_hash(algo, data) != raw_info.hashes[algo]:
                    code = _CHECK_HASH
                else:
                    code = _CHECK_OK
            finally:
                checks[shard_id] = code
        else:
            while checks[shard_id] == _CHECK_RUNNING:
                time.sleep(0.005)
        code = int(checks[shard_id])
        verdict = None if code == _CHECK_OK else _CHECK_REASONS[code].format(algo=algo, bytes=raw_info.bytes)
        self._shard_verdict[shard_id] = verdict
        return verdict

    # -- decoding ------------------------------------------------------------------------------------------------

    def _decode(self, sample_id: int, rng_idx: int) -> dict[str, torch.Tensor]:
        """Read and convert sample `sample_id`; eps/drop come from `rng_idx` (the scheduled index). Raises _Corrupt."""
        shard_id, _ = self.spanner[sample_id]
        stream_id = int(self.stream_per_shard[shard_id])
        problem = self._check_shard(shard_id)
        if problem:
            raise _Corrupt(self.shard_path(shard_id), sample_id, problem)
        try:
            s = super().get_item(sample_id)
            return self._convert(s, stream_id, sample_id, rng_idx)
        except _Corrupt:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to read or convert is a corrupt sample
            raise _Corrupt(self.shard_path(shard_id), sample_id, f"{type(e).__name__}: {e}") from None

    def _convert(self, s: dict, stream_id: int, sample_id: int, rng_idx: int) -> dict[str, torch.Tensor]:
        spec = self.specs[stream_id]

        def bad(reason):
            shard_id, _ = self.spanner[sample_id]
            return _Corrupt(self.shard_path(shard_id), sample_id, reason)

        mean, std = s["vae_mean"], s["vae_std"]
        if tuple(mean.shape) != spec.latent_shape or tuple(std.shape) != spec.latent_shape:
            raise bad(f"vae_mean {list(mean.shape)} / vae_std {list(std.shape)}, the stream's latents are "
                      f"{list(spec.latent_shape)}")
        mean32 = mean.astype(np.float32)
        std32 = std.astype(np.float32)
        if not (np.isfinite(mean32).all() and np.isfinite(std32).all()) or (std32 < 0).any():
            raise bad("non-finite VAE mean/std or negative std")
        eps = latent_noise(self.seed, self._epoch, rng_idx, spec.latent_shape)
        latent = (mean32 + std32 * eps) * self.vae_scale  # [C, h, w]

        height, width = int(s["height"]), int(s["width"])
        if height <= 0 or width <= 0:
            raise bad(f"original size {height}x{width}")
        out = {
            "latent": torch.from_numpy(latent),
            "drop": torch.tensor(caption_drop(self.seed, self._epoch, rng_idx, self.caption_dropout)),
            "img_hw": torch.tensor([height, width], dtype=torch.float32),
            "aspect_ratio": torch.tensor([float(s["aspect_ratio"])], dtype=torch.float32),
            "sample_idx": torch.tensor(sample_id, dtype=torch.long),
            "skipped": torch.tensor(False),
        }
        if self.condition == "text":
            t5 = s.get("t5")
            if t5 is None or t5.ndim != 2 or t5.shape[1] != self.text_dim or not 1 <= t5.shape[0] <= self.max_tokens:
                raise bad(f"t5 {None if t5 is None else list(t5.shape)}, expected [1..{self.max_tokens}, "
                          f"{self.text_dim}]")
            t5 = t5.astype(np.float32)
            if not np.isfinite(t5).all():
                raise bad("non-finite T5 tokens")
            n = t5.shape[0]
            # Zero padding: padded positions are masked out of cross-attention (mask = 0), so their value is unused.
            emb = np.zeros((self.max_tokens, self.text_dim), np.float32)
            emb[:n] = t5
            mask = np.zeros(self.max_tokens, np.int64)
            mask[:n] = 1
            out["text_emb"] = torch.from_numpy(emb)  # [L, D]
            out["text_mask"] = torch.from_numpy(mask)  # [L]
        else:
            label = int(s["label"])
            if not 0 <= label < self.cfg.model.num_classes:
                raise bad(f"label {label} outside [0, {self.cfg.model.num_classes})")
            out["label"] = torch.tensor(label, dtype=torch.long)
        return out

    def _replacement_candidates(self, sample_id: int):
        """Deterministic candidates from the same stream (same latent shape, so per-stream batches stay uniform and
        the mixing proportions hold)."""
        shard_id, _ = self.spanner[sample_id]
        stream_id = int(self.stream_per_shard[shard_id])
        lo = int(self.sample_offset_per_stream[stream_id])
        n = int(self.samples_per_stream[stream_id])
        rng = sample_rng(self.seed, self._epoch, sample_id, 2)
        for c in rng.integers(0, n, size=_MAX_REPLACEMENT_TRIES):
            if lo + int(c) != sample_id:
                yield lo + int(c)

    def __getitem__(self, sample_id: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        sample_id = int(sample_id)
        try:
            return self._decode(sample_id, sample_id)
        except _Corrupt as err:
            if self.on_corrupt == "stop":
                raise CorruptSampleError(f"{err} (data.on_corrupt=stop; set data.on_corrupt=skip to skip and "
                                         f"count corrupt samples)") from None
            logger.warning("skipping %s", err)
            first = err
        for cand in self._replacement_candidates(sample_id):
            try:
                out = self._decode(cand, sample_id)
            except _Corrupt:
                continue
            out["skipped"] = torch.tensor(True)
            return out
        raise CorruptSampleError(f"{first}; and no readable replacement among {_MAX_REPLACEMENT_TRIES} samples of the "
                                 f"same stream")

    def get_item(self, sample_id: int, retry: int = 7) -> Any:  # random access, same conversion as iteration
        return self[sample_id]
