"""Aspect-ratio buckets for multi-scale training (paper §2.4 / Appendix A.5: 40 buckets, h/w from 0.25 to 4).

The tables are the official ones (PixArt-alpha diffusion/data/datasets/utils.py, ASPECT_RATIO_256/512/1024; diffusers'
pipeline_pixart_alpha.py carries the 256/512/1024 "_BIN" copies for inference). Keys are the rounded ratio h / w as a
string, values [height, width] in pixels; every side is a multiple of 16 (256), 32 (512) or 64 (1024), so latents
(side / 8) stay divisible by the patch size 2. Each bucket holds about resolution**2 pixels.

An image is assigned to the bucket whose key is nearest to its h / w (official `get_closest_ratio` in
InternalData_ms.py), resized so it covers the bucket, then center-cropped to it. The model's aspect-ratio
condition is the bucket key as a float (official data_info['aspect_ratio'] = float(closest_ratio)).
Feature shards hold one stream per bucket, a sub-directory named by `bucket_dirname`.
"""
from __future__ import annotations

import os
import re

from pixart_ds.data.schema import has_index, num_samples

# [height, width] per key; 10 rows x 4 = 40 buckets each.
ASPECT_RATIO_1024: dict[str, tuple[int, int]] = {
    "0.25": (512, 2048), "0.26": (512, 1984), "0.27": (512, 1920), "0.28": (512, 1856),
    "0.32": (576, 1792), "0.33": (576, 1728), "0.35": (576, 1664), "0.4": (640, 1600),
    "0.42": (640, 1536), "0.48": (704, 1472), "0.5": (704, 1408), "0.52": (704, 1344),
    "0.57": (768, 1344), "0.6": (768, 1280), "0.68": (832, 1216), "0.72": (832, 1152),
    "0.78": (896, 1152), "0.82": (896, 1088), "0.88": (960, 1088), "0.94": (960, 1024),
    "1.0": (1024, 1024), "1.07": (1024, 960), "1.13": (1088, 960), "1.21": (1088, 896),
    "1.29": (1152, 896), "1.38": (1152, 832), "1.46": (1216, 832), "1.67": (1280, 768),
    "1.75": (1344, 768), "2.0": (1408, 704), "2.09": (1472, 704), "2.4": (1536, 640),
    "2.5": (1600, 640), "2.89": (1664, 576), "3.0": (1728, 576), "3.11": (1792, 576),
    "3.62": (1856, 512), "3.75": (1920, 512), "3.88": (1984, 512), "4.0": (2048, 512),
}
# The 512 and 256 tables are the 1024 one halved and quartered, exactly (checked in tests/test_features.py).
ASPECT_RATIO_512: dict[str, tuple[int, int]] = {k: (h // 2, w // 2) for k, (h, w) in ASPECT_RATIO_1024.items()}
ASPECT_RATIO_256: dict[str, tuple[int, int]] = {k: (h // 4, w // 4) for k, (h, w) in ASPECT_RATIO_1024.items()}

TABLES: dict[int, dict[str, tuple[int, int]]] = {256: ASPECT_RATIO_256, 512: ASPECT_RATIO_512, 1024: ASPECT_RATIO_1024}


def table(resolution: int) -> dict[str, tuple[int, int]]:
    """The 40-bucket table for a base resolution. Other resolutions (the tests' 64/128 px) scale the 1024 table by
    resolution / 1024, rounded to multiples of 16 px so latents stay divisible by the patch size."""
    if resolution in TABLES:
        return TABLES[resolution]
    if resolution <= 0 or resolution % 16:
        raise ValueError(f"multi-scale resolution must be a positive multiple of 16, got {resolution}")
    s = resolution / 1024
    return {k: (max(16, int(round(h * s / 16)) * 16), max(16, int(round(w * s / 16)) * 16))
            for k, (h, w) in ASPECT_RATIO_1024.items()}


def nearest_bucket(height: int, width: int, resolution: int) -> tuple[str, tuple[int, int]]:
    """(key, (bucket_h, bucket_w)) of the bucket whose key is nearest to height / width; ties go to the first key
    in table order, as min() does in the official get_closest_ratio."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    ratio = height / width
    tab = table(resolution)
    key = min(tab.keys(), key=lambda k: abs(float(k) - ratio))
    return key, tab[key]


def cover_size(height: int, width: int, bucket_h: int, bucket_w: int) -> tuple[int, int]:
    """(h, w) to resize an image to so it covers the bucket with its own aspect ratio kept; the center crop then
    removes the overhang (official InternalData_ms.getdata: scale by the larger of bucket_h/h and bucket_w/w)."""
    if bucket_h / height > bucket_w / width:
        return bucket_h, max(bucket_w, int(width * bucket_h / height))
    return max(bucket_h, int(height * bucket_w / width)), bucket_w


def bucket_dirname(bucket_h: int, bucket_w: int) -> str:
    """Sub-directory of a multi-scale feature root holding the stream of one bucket, e.g. "h256_w1024"."""
    return f"h{bucket_h}_w{bucket_w}"


_DIR_RE = re.compile(r"^h(\d+)_w(\d+)$")


def parse_bucket_dirname(name: str) -> tuple[int, int] | None:
    m = _DIR_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def list_bucket_streams(root: str) -> list[dict]:
    """The per-bucket streams of a multi-scale feature root, sorted by aspect ratio: dicts with `name` (the
    sub-directory), `path`, `height`, `width` (pixels), `num_samples` (from the stream's index.json).
    Sub-directories without an index.json (an unfinished extraction) are left out."""
    out = []
    for name in sorted(os.listdir(root)):
        hw = parse_bucket_dirname(name)
        path = os.path.join(root, name)
        if hw is None or not has_index(path):
            continue
        out.append(dict(name=name, path=path, height=hw[0], width=hw[1], num_samples=num_samples(path)))
    out.sort(key=lambda d: d["height"] / d["width"])
    return out
