"""Tiny feature shards for tests and benchmarks, written with Streaming's own MDSWriter and the project's column set
(pixart_ds.data.schema.FEATURE_COLUMNS / CLASS_FEATURE_COLUMNS), so loader tests do not depend on the VAE/T5 path.

    write_feature_shards(dir, n, ...)   one stream of n random samples; returns the samples written
    write_bucketed_source(root, {(h, w): n, ...})   a multi-scale source: one stream per bucket (h{H}_w{W} in pixels)
    flip_bytes(path, ...)               corrupt a shard file in place (bytes XOR 0xFF after the header)
    shard_files(dir)                    the raw shard files of a stream, in index order
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np

from pixart_ds.data.schema import CLASS_FEATURE_COLUMNS, FEATURE_COLUMNS


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
    from streaming import MDSWriter

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


def write_bucketed_source(root: str, buckets: dict, *, seed: int = 0, **kwargs) -> dict:
    """A multi-scale source: {(latent_h, latent_w): n} -> one stream per bucket in root/h{8*h}_w{8*w}.
    Returns {(h, w): samples}."""
    out = {}
    for k, ((h, w), n) in enumerate(sorted(buckets.items())):
        out[(h, w)] = write_feature_shards(os.path.join(root, f"h{8 * h}_w{8 * w}"), n, latent_hw=(h, w),
                                           seed=seed + 1000 * k, id_prefix=f"b{h}x{w}_", **kwargs)
    return out


def shard_files(stream_dir: str) -> list[str]:
    with open(os.path.join(stream_dir, "index.json")) as f:
        shards = json.load(f)["shards"]
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
