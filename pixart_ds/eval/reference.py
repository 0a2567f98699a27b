"""Reference statistics for FID / KID: from an image folder, raw MDS shards (`pixart-ds data ...` output: the
`image` column) or a cached `.npz`, computed once per (images, resolution, Inception weights) and reused.

A computed reference is cached as CACHE/ref-<key>.npz with n, mu, sigma, the features (for KID), the resolution,
the Inception weights' sha256 and where it came from; the key hashes the source listing (file names, sizes and
modification times; an MDS index's bytes), the image count, the resolution, the resize rule and the Inception
weights, so a changed source or network never reuses stale statistics. The features are computed in shards
(pixart_ds.eval.shards) across the evaluation's ranks and survive an interruption.

An `.npz` reference may also be foreign: `mu` + `sigma` (pytorch-fid's format) gives FID but no KID.

Reference images must have the evaluated resolution (a 256-px reference against 128-px samples is refused, naming
both); `resize=True` resizes the shorter side (bicubic, antialiased) and center-crops, the rule of
pixart_ds.data.features.preprocess.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
from collections.abc import Callable

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from pixart_ds.data.schema import INDEX_FILE, has_index, iter_samples, num_samples
from pixart_ds.eval import shards as S
from pixart_ds.eval.inception import FEATURE_DIM, inception_features
from pixart_ds.eval.metrics import stats

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SHARD_SIZE = 256


def _listing(source: str) -> tuple[str, list, object]:
    """(kind, items, fingerprint material). Folder items: file paths; MDS items: sample indices."""
    if has_index(source):
        n = num_samples(source, "raw MDS")
        with open(os.path.join(source, INDEX_FILE), "rb") as f:
            return "mds", list(range(n)), hashlib.sha256(f.read()).hexdigest()
    files = sorted(p for p in glob.glob(os.path.join(source, "**", "*"), recursive=True)
                   if p.lower().endswith(IMAGE_EXTS) and os.path.isfile(p))
    if not files:
        raise FileNotFoundError(f"--reference {source}: no images ({', '.join(IMAGE_EXTS)}) and no MDS index.json")
    fp = [(os.path.relpath(p, source), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in files]
    return "folder", files, fp


def _to_uint8(img: Image.Image, where: str, resolution: int, resize: bool) -> torch.Tensor:
    """[3, R, R] uint8 of a reference image; another size is an error naming it, unless `resize`."""
    img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (resolution, resolution):
        if not resize:
            raise ValueError(f"--reference: {where} is {w}x{h} but the evaluation generates {resolution}x{resolution} "
                             f"images (give a reference at that resolution, or --reference-resize to resize and "
                             f"center-crop it)")
        img = TF.center_crop(TF.resize(img, [resolution], interpolation=InterpolationMode.BICUBIC, antialias=True),
                             [resolution, resolution])
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _images(source: str, kind: str, items: list, idx: range, resolution: int, resize: bool) -> torch.Tensor:
    """uint8 [n, 3, R, R] of reference items idx (a contiguous range)."""
    out = []
    if kind == "mds":
        for i, s in zip(idx, iter_samples(source, idx.start, idx.stop, columns=["image"])):
            img = s["image"]
            try:
                img = img if isinstance(img, Image.Image) else Image.open(io.BytesIO(img))
                out.append(_to_uint8(img, f"{source} sample {i}", resolution, resize))
            except (OSError, SyntaxError) as e:
                raise ValueError(f"--reference: {source} sample {i}: cannot read the image ({e})") from None
    else:
        for i in idx:
            try:
                img = Image.open(items[i])
            except OSError as e:
                raise ValueError(f"--reference: cannot read image {items[i]} ({e})") from None
            out.append(_to_uint8(img, items[i], resolution, resize))
    return torch.stack(out)


def load_npz_reference(path: str, resolution: int, inception_sha: str | None) -> dict:
    try:
        z = S.load_npz(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--reference {path}: not a readable .npz ({e})") from None
    if "mu" not in z or "sigma" not in z:
        raise ValueError(f"--reference {path}: no 'mu' and 'sigma' arrays (keys: {sorted(z)})")
    if "resolution" in z and int(z["resolution"]) != resolution:
        raise ValueError(f"--reference {path}: statistics of {int(z['resolution'])}-px images, but the evaluation "
                         f"generates {resolution}x{resolution} images")
    if "inception_sha256" in z and inception_sha and str(z["inception_sha256"]) != inception_sha:
        raise ValueError(f"--reference {path}: computed with other Inception weights (sha256 "
                         f"{str(z['inception_sha256'])[:12]}..., these are {inception_sha[:12]}...)")
    if z["mu"].shape != (FEATURE_DIM,) or z["sigma"].shape != (FEATURE_DIM, FEATURE_DIM):
        raise ValueError(f"--reference {path}: mu {z['mu'].shape} / sigma {z['sigma'].shape} are not 2048-d pool "
                         f"statistics")
    return {"n": int(z.get("n", 50_000)), "mu": z["mu"], "sigma": z["sigma"], "features": z.get("features"),
            "resolution": resolution, "path": os.path.abspath(path),
            "source": str(z["source"]) if "source" in z else os.path.abspath(path)}


def reference_stats(source: str, *, inception, inception_sha: str, resolution: int, cache_dir: str,
                    max_images: int | None = None, resize: bool = False, rank: int = 0, world: int = 1,
                    batch_size: int = 64, wait_timeout_s: float = 86400.0,
                    progress: Callable[[int], None] | None = None) -> dict | None:
    """Reference statistics {n, mu, sigma, features, path, source, ...}; computed (sharded over the ranks) and
    cached the first time. Returns None on ranks other than 0 (only rank 0 scores)."""
    if not source or not os.path.exists(source):
        raise FileNotFoundError(f"--reference: {source}: no such file or directory")
    if os.path.isfile(source):
        return load_npz_reference(source, resolution, inception_sha) if rank == 0 else None
    kind, items, fp = _listing(source)
    if max_images:
        items = items[:max_images]
    key = hashlib.sha256(json.dumps({"kind": kind, "source": os.path.abspath(source), "listing": fp,
                                     "n": len(items), "resolution": resolution, "resize": bool(resize),
                                     "inception": inception_sha}, default=str).encode()).hexdigest()[:20]
    cached = os.path.join(cache_dir, f"ref-{key}.npz")
    if os.path.isfile(cached):
        return load_npz_reference(cached, resolution, inception_sha) if rank == 0 else None
    work = os.path.join(cache_dir, f"ref-{key}.shards")

    def compute(idx: range) -> dict:
        imgs = _images(source, kind, items, idx, resolution, resize)
        return {"inception": inception_features(inception, imgs, batch_size).astype(np.float32)}

    S.run_shards(work, len(items), SHARD_SIZE, rank, world, compute, progress)
    if rank != 0:
        return None
    S.wait_for_shards(work, len(items), SHARD_SIZE, wait_timeout_s, f"reference {source}")
    feats = S.gather_shards(work, len(items), SHARD_SIZE)["inception"]
    st = stats(feats)
    S.save_npz(cached, {"n": np.asarray(st["n"]), "mu": st["mu"], "sigma": st["sigma"], "features": feats,
                        "resolution": np.asarray(resolution), "inception_sha256": np.asarray(inception_sha),
                        "source": np.asarray(os.path.abspath(source))})
    for f in glob.glob(os.path.join(work, "*.npz")):
        os.remove(f)
    os.rmdir(work)
    return load_npz_reference(cached, resolution, inception_sha)
