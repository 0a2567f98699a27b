"""MDS column sets. Raw shards hold encoded images; feature shards hold what training reads.

Raw shards (written by `pixart-ds data ...`): the image's encoded bytes (JPEG/PNG, kept as `bytes` so a corrupt
image is caught and named by our decoder rather than failing inside Streaming), its caption or class label, the
original size and a stable id.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Optional, Sequence

import numpy as np
from streaming.base.compression import decompress
from streaming.base.format import reader_from_json

RAW_COLUMNS: dict[str, str] = {
    "id": "str",  # stable sample id, e.g. "sa_1234" or "n01440764/n01440764_10026"
    "image": "bytes",  # encoded image file bytes
    "caption": "str",  # "" when the source has none (ImageNet)
    "label": "int",  # class index; -1 when the source has none
    "width": "int",  # original width in pixels
    "height": "int",  # original height in pixels
    "source": "str",  # "imagenet" | "sam" | "journeydb" | "folder" | "synthetic"
}

# Feature shards (written by `pixart-ds features`): what training reads. Shapes are stored per sample
# (`ndarray:float16` without a fixed shape) so one schema serves every resolution and aspect-ratio bucket.
FEATURE_COLUMNS: dict[str, str] = {
    "id": "str",
    "vae_mean": "ndarray:float16",  # [C, h, w] VAE posterior mean (unscaled)
    "vae_std": "ndarray:float16",  # [C, h, w] VAE posterior std; the loader samples mean + std * eps, x 0.18215
    "t5": "ndarray:float16",  # [n, D] T5 tokens, unpadded (n = real tokens <= 120, incl. </s>); mask = n ones
    "caption": "str",
    "label": "int",  # class index; -1 for text data
    "height": "int",  # original image size in pixels
    "width": "int",
    "aspect_ratio": "float32",  # bucket key (rounded h / w, as official InternalData_ms feeds it); 1.0 single-scale
}

# Stage-1 (class-conditional) feature shards carry no text: MDS cannot encode an empty ndarray, so the "t5" column
# is absent rather than [0, D]. Readers branch on the model's condition (text | class), never on the column.
CLASS_FEATURE_COLUMNS: dict[str, str] = {k: v for k, v in FEATURE_COLUMNS.items() if k != "t5"}

# Multi-scale feature roots hold one stream (sub-directory, own index.json) per aspect-ratio bucket, named by
# pixart_ds.data.buckets.bucket_dirname(h, w) = "h{H}_w{W}" in pixels, e.g. "h256_w1024"; no index.json at the root.

# ----------------------------------------------------------------------------------------------------------------
# The MDS index (Streaming's index.json): the one reader every module uses
# ----------------------------------------------------------------------------------------------------------------

INDEX_FILE = "index.json"
EMPTY_INDEX = {"version": 2, "shards": []}  # Streaming's index of a dataset with no shard


def has_index(stream_dir: str) -> bool:
    return os.path.isfile(os.path.join(stream_dir, INDEX_FILE))


def read_index(stream_dir: str, what: str = "MDS", hint: str = "") -> list[dict]:
    """The shard entries of `stream_dir/index.json` (Streaming's format: {"version": 2, "shards": [...]}), each an
    MDS shard. One-line errors name the file: missing, not JSON, no shard list, a shard of another format.
    `what` and `hint` word the missing-file message (e.g. "raw MDS", "write one with `pixart-ds data ...`")."""
    path = os.path.join(stream_dir, INDEX_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} index not found: {path}" + (f" ({hint})" if hint else ""))
    with open(path) as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    shards = obj.get("shards") if isinstance(obj, dict) else None
    if not isinstance(shards, list):
        raise ValueError(f"{path}: not an MDS index (no 'shards' list)")
    for s in shards:
        if not isinstance(s, dict) or s.get("format") != "mds" or "samples" not in s:
            name = s.get("raw_data", {}).get("basename") if isinstance(s, dict) else s
            raise ValueError(f"{path}: shard {name} is not an MDS shard entry (format "
                             f"{s.get('format') if isinstance(s, dict) else None!r}, expected 'mds')")
    return shards


def num_samples(stream_dir: str, what: str = "MDS") -> int:
    return sum(int(s["samples"]) for s in read_index(stream_dir, what))


def _shard_bytes(root: str, info: dict) -> bytes:
    """The uncompressed shard file; a compressed shard is decompressed in memory (the input may be read-only)."""
    raw = os.path.join(root, info["raw_data"]["basename"])
    if os.path.exists(raw):
        with open(raw, "rb") as f:
            return f.read()
    if info.get("zip_data"):
        path = os.path.join(root, info["zip_data"]["basename"])
        if not os.path.exists(path):
            raise FileNotFoundError(f"MDS shard not found: {raw} (nor {path})")
        with open(path, "rb") as f:
            return decompress(info["compression"], f.read())
    raise FileNotFoundError(f"MDS shard not found: {raw}")


def iter_samples(root: str, start: int = 0, stop: Optional[int] = None,
                 columns: Optional[Sequence[str]] = None) -> Iterator[dict]:
    """Samples [start, stop) of an MDS dataset (raw or feature) in index order, as dicts of `columns` (default:
    all), read with Streaming's own shard decoders but no StreamingDataset: no shared memory, no shuffling, no
    padding of ranks with repeated samples, so every sample is seen exactly once (captioning, inspection, tests)."""
    base = 0
    for info in read_index(root):
        n = int(info["samples"])
        lo, hi = max(start, base), min(stop if stop is not None else base + n, base + n)
        if lo < hi:
            reader = reader_from_json(root, None, info)
            missing = [c for c in (columns or ()) if c not in reader.column_names]
            if missing:
                raise ValueError(f"{root}: MDS shard {info['raw_data']['basename']} has no column(s) {missing} "
                                 f"(columns: {reader.column_names})")
            data = _shard_bytes(root, info)
            # MDS layout: uint32 sample count, uint32 offsets [n + 1], then the samples back to back.
            offsets = np.frombuffer(data, np.uint32, count=n + 1, offset=4)
            for i in range(lo - base, hi - base):
                sample = reader.decode_sample(data[offsets[i]:offsets[i + 1]])
                yield {c: sample[c] for c in columns} if columns else sample
        base += n
