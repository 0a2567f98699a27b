"""Raw datasets -> raw MDS shards (schema.RAW_COLUMNS): `pixart-ds data imagenet|sam|journeydb|folder|synthetic`.

Each function plans partitions from its source (sources.py) and hands them to the one write path (_engine.py):
parallel writers, one merged index, resume, and a summary of written and skipped samples saved as OUT.summary.json.
Every function returns that summary dict.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from pixart_ds.data.convert import sources
from pixart_ds.data.convert._engine import check_out, read_summary, run, staging_root, summary_path

__all__ = ["imagenet", "sam", "journeydb", "folder", "synthetic", "read_summary", "summary_path"]

_SHARD = 1 << 26  # 64 MiB, Streaming's recommended shard size


def imagenet(root: str, out: str, workers: Optional[int] = None, shard_size_limit: int = _SHARD,
             progress: bool = True) -> dict:
    """ImageNet class folders -> raw MDS with label = sorted-synset index and an empty caption."""
    parts, skips, extra = sources.plan_imagenet(root)
    return run("imagenet", out, parts, skips, workers=workers, shard_size_limit=shard_size_limit, extra=extra,
               progress=progress)


Inputs = Union[str, Sequence[str]]


def sam(root: Inputs, captions: Optional[str] = None, out: str = "", workers: Optional[int] = None,
        shard_size_limit: int = _SHARD, progress: bool = True) -> dict:
    """SA-1B images joined with LLaVA captions keyed by image id. `root`: the sa_NNNNNN.tar downloads (files,
    directories, globs, list files; read in place, one partition per tar) or one directory of extracted tars.
    `captions`: JSONL/CSV/JSON, a directory tree of <id>.txt, or an archive of them (SA1B_caption.tar.gz)."""
    out = check_out(out)
    parts, skips, extra, post = sources.plan_sam(root, captions, staging_root(out), progress=progress)
    return run("sam", out, parts, skips, workers=workers, shard_size_limit=shard_size_limit, extra=extra,
               progress=progress, post=post)


def journeydb(root: Inputs, annotations: str, out: str = "", workers: Optional[int] = None,
              shard_size_limit: int = _SHARD, text: str = "caption", progress: bool = True) -> dict:
    """JourneyDB images + annotation JSONL; text = "caption" (Task2.Caption) or "prompt". `root`: the
    data/train/imgs/NNN.tgz downloads (read in place, one partition per archive) or the extracted imgs/."""
    out = check_out(out)
    parts, skips, extra, post = sources.plan_journeydb(root, annotations, text=text, work_dir=staging_root(out),
                                                       progress=progress)
    return run("journeydb", out, parts, skips, workers=workers, shard_size_limit=shard_size_limit, extra=extra,
               progress=progress, post=post)


def folder(root: str, index: Optional[str] = None, out: str = "", workers: Optional[int] = None,
           shard_size_limit: int = _SHARD, progress: bool = True) -> dict:
    """Any image folder with .txt/.json caption sidecars, or one JSONL/CSV index of (path, caption)."""
    parts, skips, extra = sources.plan_folder(root, index)
    return run("folder", out, parts, skips, workers=workers, shard_size_limit=shard_size_limit, extra=extra,
               progress=progress)


def synthetic(num_samples: int = 1024, resolution: int = 256, seed: int = 0, out: str = "",
              workers: Optional[int] = None, shard_size_limit: int = _SHARD, progress: bool = True) -> dict:
    """The embedded shapes dataset (pixart_ds.data.synthetic), written through the same path as real data."""
    parts, skips, extra = sources.plan_synthetic(num_samples, resolution, seed)
    return run("synthetic", out, parts, skips, workers=workers, shard_size_limit=shard_size_limit, extra=extra,
               progress=progress)

