"""Raw MDS -> feature MDS: the VAE posterior and T5 tokens computed once, offline (paper §2.4, Appendix A.5: feature
extraction is excluded from the 753 A100-day count because it runs in advance).

    pixart-ds features --in RAW --out FEAT --vae VAE --text-encoder T5 --resolution 256 [--multi-scale]

Distributed by slicing: under torchrun / the deepspeed launcher (RANK, WORLD_SIZE) or srun (SLURM_PROCID,
SLURM_NTASKS) each rank takes a contiguous, disjoint slice of the raw samples and writes its own partition;
one process alone takes everything. No collective is needed: a rank commits its work by renaming its partition
into place and then writing a marker file `FEAT/.rank-RRRRR-of-WWWWW.done` (a JSON record, but not named *.json so
Streaming's merge_index never mistakes it for an index). Rank 0 waits for every marker, merges the partition indexes
and writes the summary `FEAT.summary.json` beside FEAT. Re-running the same command resumes: ranks whose marker
exists do nothing; partitions without one are recomputed.

Layout (W ranks):
    FEAT/index.json, FEAT/part-RRRRR-of-WWWWW/...                  single resolution, one stream
    FEAT/h{H}_w{W}/index.json, FEAT/h{H}_w{W}/part-RRRRR-of-WWWWW/   --multi-scale: one stream per bucket
    FEAT/manifest.jsonl                                             the streams, their sizes and latent shapes
                                                                    (pixart_ds.data.manifest; written last)

Stored per sample (schema.FEATURE_COLUMNS; CLASS_FEATURE_COLUMNS for --class-labels):
- vae_mean, vae_std: the posterior of the image resized + center-cropped to the resolution (or its bucket),
  [C, H/8, W/8] fp16, unscaled. Storing the distribution, not one latent, lets the loader draw a fresh
  latent every epoch as the official code does (its .npy holds mean and std concatenated).
- t5: the T5 encoder output for the real tokens only, [n, D] fp16 with n <= 120 (incl. </s>). The encoder runs
  with the padding masked, so these rows are exactly the first n rows of the padded [120, D] output and padded
  rows carry nothing the model uses (its cross-attention masks them); the loader re-pads with zeros and a mask.
  At D = 4096 padding would cost 983,040 bytes per sample whatever the caption length; unpadded costs
  8,192 bytes per token (see `bytes_per_sample`).
- caption, label, original height/width, aspect_ratio (the bucket's table key, 1.0 without --multi-scale).
A sample that cannot be used (corrupt image, truncated shard, missing caption or label, wrong shape,
non-finite features) is skipped and named in the summary; it never stops the run.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
import warnings
from collections import Counter, defaultdict
from typing import Optional

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from streaming import MDSWriter
from streaming.base.format import reader_from_json
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

from pixart_ds.config import MAX_TEXT_TOKENS
from pixart_ds.data import buckets, manifest
from pixart_ds.data.convert._engine import merge_partitions, summary_path
from pixart_ds.data.schema import CLASS_FEATURE_COLUMNS, FEATURE_COLUMNS, INDEX_FILE, read_index
from pixart_ds.dist import launch_ranks
from pixart_ds.fsutil import atomic_write_text
from pixart_ds.model import encoders

# Skip reasons (the summary's vocabulary, shared with the raw converters where they overlap).
CORRUPT_IMAGE = "corrupt image"
TRUNCATED_SHARD = "truncated shard"
MISSING_SHARD = "missing shard"
UNREADABLE_SAMPLE = "unreadable sample"
NO_CAPTION = "no caption"
NO_LABEL = "no class label"
WRONG_SHAPE = "wrong shape"
NON_FINITE = "non-finite features"

_RAW_REQUIRED = {"id": {"str"}, "image": {"bytes", "jpeg", "png", "pil"}, "caption": {"str"},
                 "label": {"int", "int64", "int32"}, "width": {"int", "int64", "int32"},
                 "height": {"int", "int64", "int32"}}
_SHARD_BYTES = 1 << 26


def bytes_per_sample(resolution: int, text_tokens: int, text_width: int = 4096, latent_channels: int = 4,
                     downsample: int = 8, bucket_hw: Optional[tuple[int, int]] = None) -> dict:
    """Payload bytes of one feature sample (fp16 arrays; MDS adds ~40 bytes of headers and the caption string)."""
    h, w = bucket_hw or (resolution, resolution)
    vae = 2 * latent_channels * (h // downsample) * (w // downsample) * 2  # mean + std, fp16
    return {"vae": vae, "t5_unpadded": text_tokens * text_width * 2, "t5_padded_120": 120 * text_width * 2,
            "total_unpadded": vae + text_tokens * text_width * 2, "total_padded": vae + 120 * text_width * 2}



def _part_name(rank: int, world: int) -> str:
    return f"part-{rank:05d}-of-{world:05d}"


def _marker(out: str, rank: int, world: int) -> str:
    return os.path.join(out, f".rank-{rank:05d}-of-{world:05d}.done")


def _markers(out: str) -> dict[tuple[int, int], str]:
    found = {}
    if os.path.isdir(out):
        for f in os.listdir(out):
            if f.startswith(".rank-") and f.endswith(".done"):
                r, w = f[len(".rank-"):-len(".done")].split("-of-")
                found[(int(r), int(w))] = os.path.join(out, f)
    return found


# ------------------------------------------------------------------------------------------------------------------
# Raw input
# ------------------------------------------------------------------------------------------------------------------


def _read_raw_index(inp: str) -> list[dict]:
    index = os.path.join(inp, INDEX_FILE)
    shards = read_index(inp, "raw MDS", "write one with `pixart-ds data ...`")
    for s in shards:
        cols = dict(zip(s["column_names"], s["column_encodings"]))
        for name, allowed in _RAW_REQUIRED.items():
            if name not in cols:
                raise ValueError(f"{index}: shard {s['raw_data']['basename']}: column {name!r} missing "
                                 f"(raw shards need {sorted(_RAW_REQUIRED)})")
            if cols[name] not in allowed:
                raise ValueError(f"{index}: shard {s['raw_data']['basename']}: column {name!r} is "
                                 f"{cols[name]!r}, expected {' or '.join(sorted(allowed))}")
    return shards


def _shard_problem(inp: str, shard: dict) -> Optional[tuple[str, str]]:
    """(reason, detail) when a shard file is missing or shorter than its index says (a truncated copy)."""
    raw = shard.get("raw_data") or {}
    path = os.path.join(inp, raw.get("basename", ""))
    if not os.path.isfile(path):
        return MISSING_SHARD, f"{raw.get('basename')}: file not found"
    size = os.path.getsize(path)
    if raw.get("bytes") is not None and size != int(raw["bytes"]):
        return TRUNCATED_SHARD, f"{raw['basename']}: {size} of {raw['bytes']} bytes"
    return None


def target_size(height: int, width: int, resolution: int, multi_scale: bool) -> tuple[str, int, int]:
    """(aspect-ratio key, target height, target width) for an image of height x width."""
    if multi_scale:
        key, (bh, bw) = buckets.nearest_bucket(height, width, resolution)
        return key, bh, bw
    return "1.0", resolution, resolution


def preprocess(img, target_h: int, target_w: int, multi_scale: bool) -> torch.Tensor:
    """PIL image -> [3, target_h, target_w] float in [-1, 1].

    Single scale (official default_train transform): resize the shorter side to the resolution, center crop.
    Multi-scale (official InternalData_ms): resize to cover the bucket keeping the aspect ratio, center crop.
    Both with bicubic + antialias (the official 'Image.BICUBIC' intent; its single-scale T.Resize defaults to
    bilinear)."""
    img = img.convert("RGB")
    w, h = img.size
    if multi_scale:
        size = list(buckets.cover_size(h, w, target_h, target_w))
    else:
        size = [target_h]  # shorter side
    img = TF.resize(img, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    img = TF.center_crop(img, [target_h, target_w])
    return TF.to_tensor(img) * 2.0 - 1.0


class _RawSlice(torch.utils.data.Dataset):
    """The rank's raw samples, decoded and preprocessed (runs in DataLoader workers)."""

    def __init__(self, inp: str, shards: list[dict], refs: list[tuple[int, int, int]], resolution: int,
                 multi_scale: bool):
        self.inp, self.shards, self.refs = inp, shards, refs
        self.resolution, self.multi_scale = resolution, multi_scale
        self._readers: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.refs)

    def _reader(self, si: int):
        if si not in self._readers:

            self._readers[si] = reader_from_json(self.inp, None, self.shards[si])
        return self._readers[si]

    def __getitem__(self, k: int) -> dict:
        si, li, gidx = self.refs[k]
        where = f"{self.shards[si]['raw_data']['basename']}#{li}"
        item = {"gidx": gidx, "id": where, "skip": None}
        try:
            s = self._reader(si).get_item(li)
        except Exception as e:  # a damaged sample inside an intact-looking shard
            item["skip"] = (UNREADABLE_SAMPLE, f"{where}: {type(e).__name__}: {e}")
            return item
        item.update(id=str(s["id"]), caption=str(s["caption"]), label=int(s["label"]),
                    height=int(s["height"]), width=int(s["width"]))
        try:
            img = s["image"] if isinstance(s["image"], Image.Image) else Image.open(io.BytesIO(s["image"]))
            img.load()
        except Exception as e:
            item["skip"] = (CORRUPT_IMAGE, f"{where}: {type(e).__name__}: {e}")
            return item
        w, h = img.size
        if (w, h) != (item["width"], item["height"]):
            item["skip"] = (WRONG_SHAPE, f"{where}: stored {item['width']}x{item['height']}, image is {w}x{h}")
            return item
        key, th, tw = target_size(h, w, self.resolution, self.multi_scale)
        item.update(ratio=float(key), th=th, tw=tw, pixels=preprocess(img, th, tw, self.multi_scale))
        return item


# ------------------------------------------------------------------------------------------------------------------
# Extraction
# ------------------------------------------------------------------------------------------------------------------


def _default_workers(local_world: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    per_rank = cpus // max(1, local_world)
    return 0 if per_rank <= 2 else min(8, per_rank - 1)


def extract_features(inp: str, out: str, vae: str, text_encoder: Optional[str] = None, resolution: int = 256,
                     multi_scale: bool = False, batch_size: int = 16, class_labels: bool = False, *,
                     device: Optional[str] = None, num_workers: Optional[int] = None, text_dtype: Optional[str] = None,
                     vae_dtype: str = "fp32", environ=None, wait_timeout_s: Optional[float] = None,
                     progress: bool = True) -> dict:
    """Write the feature MDS of raw MDS `inp` into `out` (see the module docstring). Returns rank 0's summary
    (other ranks: their own record)."""
    t0 = time.time()
    rank, world, local_rank = launch_ranks(environ)
    env = os.environ if environ is None else environ
    local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1")).split("(")[0] or 1)
    inp, out = os.path.abspath(inp), os.path.abspath(out)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if not class_labels and not text_encoder:
        raise ValueError("--text-encoder is required for text features (or pass --class-labels for stage 1)")
    if multi_scale:
        buckets.table(resolution)  # validates the resolution
    elif resolution % 8:
        raise ValueError(f"--resolution must be a multiple of 8, got {resolution}")
    shards = _read_raw_index(inp)
    settings = {"inp": inp, "resolution": resolution, "multi_scale": bool(multi_scale),
                "class_labels": bool(class_labels), "vae": os.path.abspath(vae),
                "text_encoder": None if class_labels else os.path.abspath(text_encoder)}

    # Resume bookkeeping: markers from a run with another world size or other settings cannot be mixed in.
    for (r, w), path in sorted(_markers(out).items()):
        if w != world:
            raise ValueError(f"{out} holds features written by {w} ranks; run again with {w} ranks to resume, "
                             "or write to a new --out")
        with open(path) as f:
            old = json.load(f)["settings"]
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise ValueError(f"{out} was written with {diff[0]}={old.get(diff[0])!r}, now {settings[diff[0]]!r}; "
                             "write to a new --out")

    part = _part_name(rank, world)
    marker = _marker(out, rank, world)
    columns = CLASS_FEATURE_COLUMNS if class_labels else FEATURE_COLUMNS
    if os.path.isfile(marker):
        print(f"features: rank {rank}/{world} already finished ({marker}); keeping it", file=sys.stderr)
    else:
        os.makedirs(out, exist_ok=True)
        # Leftovers of this rank from a crash between rename and marker: not committed, so redo them.
        for d in [os.path.join(out, part)] + [os.path.join(out, b, part) for b in os.listdir(out)
                                              if buckets.parse_bucket_dirname(b)]:
            if os.path.isdir(d):
                shutil.rmtree(d)
        stage = os.path.join(out + ".partial", part)
        if os.path.exists(stage):
            shutil.rmtree(stage)
        os.makedirs(stage)

        # This rank's contiguous slice of the global sample order; samples of damaged shards are skipped by name.
        n_total = sum(int(s["samples"]) for s in shards)
        lo, hi = rank * n_total // world, (rank + 1) * n_total // world
        refs, skips = [], []
        base = 0
        for si, s in enumerate(shards):
            n = int(s["samples"])
            a, b = max(lo, base), min(hi, base + n)
            if a < b:
                problem = _shard_problem(inp, s)
                if problem:
                    skips.extend({"id": f"{s['raw_data']['basename']}#{g - base}", "reason": problem[0],
                                  "detail": problem[1]} for g in range(a, b))
                else:
                    refs.extend((si, g - base, g) for g in range(a, b))
            base += n

        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        if text_dtype is None:
            text_dtype = "bf16" if str(device).startswith("cuda") else "fp32"
        vae_model = encoders.load_vae(vae, dtype=vae_dtype, device=device)
        latent_ch = int(vae_model.config.latent_channels)
        down = 2 ** (len(vae_model.config.block_out_channels) - 1)
        tok = t5 = None
        if not class_labels:
            tok, t5 = encoders.load_text_encoder(text_encoder, dtype=text_dtype, device=device)
        if num_workers is None:
            num_workers = _default_workers(local_world)
        ds = _RawSlice(inp, shards, refs, resolution, multi_scale)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers,
                                             prefetch_factor=4 if num_workers else None)

        writers: dict[str, MDSWriter] = {}
        per_bucket: Counter = Counter()
        written, truncated_captions = 0, 0
        pending: dict[tuple[int, int], list[dict]] = defaultdict(list)

        def writer_for(th: int, tw: int) -> MDSWriter:
            key = buckets.bucket_dirname(th, tw) if multi_scale else ""
            if key not in writers:
                writers[key] = MDSWriter(out=os.path.join(stage, key) if key else os.path.join(stage, "_single"),
                                         columns=columns, compression=None, hashes=["xxh64"],
                                         size_limit=_SHARD_BYTES)
            return writers[key]

        def flush(hw: tuple[int, int]) -> None:
            nonlocal written, truncated_captions
            batch = pending.pop(hw, [])
            if not batch:
                return
            th, tw = hw
            mean, std = encoders.vae_encode(vae_model, torch.stack([it["pixels"] for it in batch]))
            mean = mean.float().cpu().numpy().astype(np.float16)
            std = std.float().cpu().numpy().astype(np.float16)
            embs = lens = None
            if not class_labels:
                caps = [encoders.clean_caption(it["caption"]) for it in batch]
                full = tok(caps, truncation=False, padding=False)["input_ids"]
                truncated_captions += sum(len(ids) > MAX_TEXT_TOKENS for ids in full)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # counted above, reported once in the summary
                    emb, mask = encoders.encode_text(tok, t5, caps)
                embs = emb.float().cpu().numpy().astype(np.float16)
                lens = mask.sum(1).cpu().tolist()
            want = (latent_ch, th // down, tw // down)
            w = writer_for(th, tw)
            for i, it in enumerate(batch):
                if mean[i].shape != want or std[i].shape != want:
                    skips.append({"id": it["id"], "reason": WRONG_SHAPE,
                                  "detail": f"latent {tuple(mean[i].shape)}, expected {want}"})
                    continue
                sample = {"id": it["id"], "vae_mean": mean[i], "vae_std": std[i], "caption": it["caption"],
                          "label": it["label"], "height": it["height"], "width": it["width"],
                          "aspect_ratio": np.float32(it["ratio"])}
                finite = np.isfinite(mean[i]).all() and np.isfinite(std[i]).all()
                if not class_labels:
                    sample["t5"] = embs[i, :int(lens[i])]
                    finite = finite and np.isfinite(sample["t5"]).all()
                if not finite:
                    skips.append({"id": it["id"], "reason": NON_FINITE, "detail": "inf/NaN after fp16 cast"})
                    continue
                w.write(sample)
                written += 1
                per_bucket[buckets.bucket_dirname(th, tw) if multi_scale else "."] += 1

        bar = tqdm(total=len(refs), desc=f"features rank {rank}/{world}", unit="img", file=sys.stderr,
                   disable=not progress or rank != 0, dynamic_ncols=True)
        for it in loader:
            bar.update(1)
            if it["skip"] is None and not class_labels and not it["caption"].strip():
                it["skip"] = (NO_CAPTION, "empty caption")
            if it["skip"] is None and class_labels and it["label"] < 0:
                it["skip"] = (NO_LABEL, f"label {it['label']}")
            if it["skip"] is not None:
                skips.append({"id": it["id"], "reason": it["skip"][0], "detail": it["skip"][1]})
                continue
            hw = (it["th"], it["tw"])
            pending[hw].append(it)
            if len(pending[hw]) >= batch_size:
                flush(hw)
        for hw in list(pending):
            flush(hw)
        bar.close()
        for w in writers.values():
            w.finish()

        # Commit: partitions into place, then the marker (the commit point a rerun trusts).
        for key in writers:
            src = os.path.join(stage, key) if key else os.path.join(stage, "_single")
            dst = os.path.join(out, key, part) if key else os.path.join(out, part)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
        shutil.rmtree(stage, ignore_errors=True)
        record = {"rank": rank, "world_size": world, "settings": settings, "samples_in_slice": hi - lo,
                  "written": written, "per_bucket": dict(sorted(per_bucket.items())),
                  "captions_truncated_to_120_tokens": truncated_captions,
                  "seconds": round(time.time() - t0, 3), "device": str(device), "skips": skips}
        atomic_write_text(marker, json.dumps(record))

    if rank != 0:
        with open(marker) as f:
            return json.load(f)
    return _finish(out, world, settings, class_labels, t0, wait_timeout_s)


def _finish(out: str, world: int, settings: dict, class_labels: bool, t0: float,
            wait_timeout_s: Optional[float]) -> dict:
    """Rank 0: wait for every rank's marker, merge the indexes, write and print the summary."""
    if wait_timeout_s is None:
        # Ranks hold equal slices, so they finish close together; allow rank 0's own time again plus 10 minutes.
        wait_timeout_s = 2 * (time.time() - t0) + 600
    deadline = time.time() + wait_timeout_s
    last_note = time.time()
    while True:
        missing = [r for r in range(world) if not os.path.isfile(_marker(out, r, world))]
        if not missing:
            break
        if time.time() > deadline:
            raise RuntimeError(f"features: ranks {missing} of {world} did not finish within {wait_timeout_s:.0f} s; "
                               "run the same command again to resume (finished ranks are kept)")
        if time.time() - last_note > 60:
            print(f"features: waiting for ranks {missing}", file=sys.stderr)
            last_note = time.time()
        time.sleep(0.5)

    records = []
    for r in range(world):
        with open(_marker(out, r, world)) as f:
            records.append(json.load(f))
    part_names = [_part_name(r, world) for r in range(world)]
    tmp = out + ".partial"
    streams = {}
    if settings["multi_scale"]:
        for b in sorted(os.listdir(out)):
            if buckets.parse_bucket_dirname(b):
                names = [p for p in part_names if os.path.isdir(os.path.join(out, b, p))]
                streams[b] = merge_partitions(os.path.join(out, b), names, tmp_root=tmp)
    else:
        names = [p for p in part_names if os.path.isdir(os.path.join(out, p))]
        streams["."] = merge_partitions(out, names, tmp_root=tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    # The streams and their sizes, for readers that cannot list the directory (a remote copy of it).
    manifest.write_manifest(out, multi_scale=settings["multi_scale"], resolution=settings["resolution"],
                            condition="class" if class_labels else "text")

    skips = [s for rec in records for s in rec["skips"]]
    written = sum(rec["written"] for rec in records)
    if written != sum(streams.values()):
        raise RuntimeError(f"{out}: merged indexes hold {sum(streams.values())} samples, ranks wrote {written}")
    shard_bytes = 0
    for root, _, files in os.walk(out):
        shard_bytes += sum(os.path.getsize(os.path.join(root, f)) for f in files if f.endswith(".mds"))
    summary = {
        "kind": "features",
        "out": out,
        **settings,
        "world_size": world,
        "written": written,
        "skipped": len(skips),
        "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skips).items())),
        "streams": streams,
        "shard_bytes": shard_bytes,
        "bytes_per_sample": round(shard_bytes / written, 1) if written else None,
        "captions_truncated_to_120_tokens": sum(r.get("captions_truncated_to_120_tokens", 0) for r in records),
        "seconds": round(time.time() - t0, 3),
        "rank_seconds": [r["seconds"] for r in records],
        "skips": skips,
    }
    atomic_write_text(summary_path(out), json.dumps(summary, indent=1) + "\n")
    reasons = ", ".join(f"{k}: {v}" for k, v in summary["skipped_by_reason"].items())
    lines = [f"features: wrote {written} samples to {out} ({len(streams)} stream{'s' * (len(streams) != 1)}, "
             f"{summary['bytes_per_sample']} bytes/sample), skipped {len(skips)}"
             + (f" ({reasons})" if reasons else "")]
    lines += [f"  skipped {s['id']}: {s['reason']} ({s['detail']})" for s in skips[:20]]
    if len(skips) > 20:
        lines.append(f"  ... {len(skips) - 20} more")
    lines.append(f"summary: {summary_path(out)}")
    print("\n".join(lines))
    return summary
