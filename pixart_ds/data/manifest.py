"""The stream manifest of a feature-shard directory, written by `pixart-ds features` and read by the loader.

A multi-scale feature directory holds one MDS stream per aspect-ratio bucket (FEAT/h{H}_w{W}/index.json, see
buckets.py) and no root index. Listing the directory finds them only on a local filesystem; in object storage
(s3://, gs://, ... any Streaming remote) there is nothing to list. So `features` writes FEAT/manifest.jsonl, one
JSON record naming every stream with its sample count and latent shape:

    {"format": "pixart-ds features", "version": 1, "multi_scale": true, "resolution": 512, "condition": "text",
     "text_dim": 4096, "samples": 1200,
     "streams": [{"dir": "h256_w1024", "samples": 40, "latent_shape": [4, 32, 128]}, ...]}

(a single-scale directory has one stream, "dir": "."). The file is not *.json so Streaming's merge_index never
reads it as an index. The loader fetches it from the remote into the source's local cache, builds one Stream per
entry (remote/<dir> -> local/<dir>), checks the recipe against the recorded shapes before anything else is
downloaded, and stops with a message naming the stream when the manifest and the shards disagree.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from streaming.base.format import reader_from_json
from streaming.base.storage.download import CloudDownloader

from pixart_ds.data import buckets
from pixart_ds.data.schema import has_index, read_index
from pixart_ds.fsutil import atomic_write_text

MANIFEST_FILE = "manifest.jsonl"
FORMAT = "pixart-ds features"
VERSION = 1


class ManifestError(ValueError):
    """A manifest that cannot be read, or that disagrees with the shards beside it."""


def _stream_entry(root: str, name: str) -> dict:
    """{dir, samples, latent_shape} of one local stream (the shape read from its first sample)."""
    path = os.path.join(root, name) if name != "." else root
    shards = read_index(path, "feature MDS")
    samples = sum(int(s["samples"]) for s in shards)
    shape, text_dim = None, None
    for s in shards:
        if int(s["samples"]):
            first = reader_from_json(path, None, s).get_item(0)
            shape = [int(x) for x in first["vae_mean"].shape]
            text_dim = int(first["t5"].shape[1]) if "t5" in first else None
            break
    return {"dir": name, "samples": samples, "latent_shape": shape, "_text_dim": text_dim}


def write_manifest(root: str, *, multi_scale: bool, resolution: Optional[int], condition: str) -> dict:
    """Describe the streams under the feature directory `root` (the bucket sub-directories with an index.json, or
    the root's own index) in root/manifest.jsonl, atomically. Returns the record."""
    if multi_scale:
        names = [st["name"] for st in buckets.list_bucket_streams(root)]  # sorted by aspect ratio
    else:
        names = ["."] if has_index(root) else []
    entries = [_stream_entry(root, n) for n in names]
    dims = {e.pop("_text_dim") for e in entries} - {None}
    record = {"format": FORMAT, "version": VERSION, "multi_scale": bool(multi_scale), "resolution": resolution,
              "condition": condition, "text_dim": dims.pop() if len(dims) == 1 else None,
              "samples": sum(e["samples"] for e in entries), "streams": entries}
    atomic_write_text(os.path.join(root, MANIFEST_FILE), json.dumps(record) + "\n")
    return record


def read_manifest(path: str) -> dict:
    """The manifest record at `path`, checked for the fields the loader uses; a ManifestError names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.loads(f.readline())
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: not a readable stream manifest ({e})") from None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a {FORMAT} manifest")
    if rec.get("version") != VERSION:
        raise ManifestError(f"{path}: manifest version {rec.get('version')}, this pixart_ds reads {VERSION}")
    streams = rec.get("streams")
    if not isinstance(streams, list) or not all(isinstance(s, dict) and isinstance(s.get("dir"), str)
                                                and isinstance(s.get("samples"), int) for s in streams):
        raise ManifestError(f"{path}: 'streams' must be a list of {{dir, samples, latent_shape}}")
    for s in streams:
        if s["dir"] != "." and (buckets.parse_bucket_dirname(s["dir"]) is None):
            raise ManifestError(f"{path}: stream {s['dir']!r} is not a bucket directory (h<H>_w<W>)")
    return rec


def fetch_manifest(remote: str, local: str, timeout: float = 60.0) -> str:
    """Copy remote/manifest.jsonl (any Streaming remote: a directory, s3://, gs://, ...) to local/manifest.jsonl
    and return that path. Each process downloads to its own temporary name and renames, so the ranks of a node
    may fetch at once; a fresh copy every time keeps a stale cache from hiding a rewritten dataset."""
    src = os.path.join(remote, MANIFEST_FILE)  # Streaming joins remote paths the same way (stream.py)
    dst = os.path.join(local, MANIFEST_FILE)
    tmp = f"{dst}.tmp{os.getpid()}"
    os.makedirs(local, exist_ok=True)
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        CloudDownloader.direct_download(src, tmp, timeout)
    except FileNotFoundError:
        raise ManifestError(f"{src}: no stream manifest. A multi-scale source read from a remote needs the "
                            f"{MANIFEST_FILE} that `pixart-ds features --multi-scale` writes; for shards made "
                            f"before it existed, run the same features command again (it only rewrites the "
                            f"index and the manifest) and upload {MANIFEST_FILE}") from None
    except Exception as e:  # noqa: BLE001 - every storage client raises its own types
        if not os.path.exists(tmp):
            raise ManifestError(f"{src}: cannot fetch the stream manifest ({type(e).__name__}: {e})") from None
        raise
    os.replace(tmp, dst)
    return dst


def local_manifest(root: str) -> Optional[str]:
    path = os.path.join(root, MANIFEST_FILE)
    return path if os.path.isfile(path) else None
