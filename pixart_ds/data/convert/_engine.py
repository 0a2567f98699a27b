"""The one write path every raw converter uses: partitions -> parallel MDS writers -> one merged index -> summary.

A converter plans its work as `Partition`s (usually one per source sub-directory) of `Item`s, plus the samples it
already knows it must skip (a caption without an image, say). `run` then

1. keeps every partition that is already finished (`OUT/<name>/index.json` exists and its `summary.jsonl` carries
   the same fingerprint of the planned items), so re-running after a crash resumes;
2. writes the others in parallel (multiprocessing, one MDSWriter per partition), each into a staging directory
   `OUT.partial/<name>` that is renamed to `OUT/<name>` only when complete -- a crash never leaves a half-written
   partition under OUT;
3. merges the partition indexes into `OUT/index.json` (Streaming's merge_index from an explicit list, written to
   staging first and renamed, so the root index is all-or-nothing);
4. prints the summary and saves it as `OUT.summary.json` beside OUT. It is deliberately not under OUT: merge_index
   given a root walks every *.json below it and would take any other JSON there for a partition index.

A partition is either a list of `Item`s (files on disk) or a streaming `source` (one archive, e.g. an SA-1B tar): an
object with `fingerprint()` and `members(scratch_dir)` yielding `Member`s, the images it holds with their bytes
already read. The images of a streaming partition are only known once it is read, so its summary record also lists
the ids it held ("ids"); `run` collects them into an SQLite table (`OUT.partial/seen.sqlite`) that the planner's
`post` step queries, e.g. for the captions whose image is in no archive. An archive that cannot be read to its end
(truncated download, corrupt gzip) fails alone: the others are converted and kept, and the run ends with an error
naming it (no merged index until it is fixed or left out).

Every image is decoded once here (JPEG at 1/8 scale via PIL's draft mode, which still reads all entropy-coded data
and so still catches truncation), so a corrupt file is counted and named now rather than failing a training run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import sqlite3
import sys
import tarfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from PIL import Image
from streaming import MDSWriter
from streaming.base.util import merge_index
from tqdm import tqdm

from pixart_ds.data import synthetic
from pixart_ds.data.schema import EMPTY_INDEX, INDEX_FILE, RAW_COLUMNS, num_samples
from pixart_ds.fsutil import atomic_write_text

# The heavy modules (streaming pulls in torch, torchvision, transformers) are imported at module level, before the
# writer pool forks, so each worker inherits them instead of spending seconds importing them again.

SUMMARY_FILE = "summary.jsonl"  # per partition; not *.json so merge_index never reads it as an index
STAGING_SUFFIX = ".partial"

# Skip reasons, the vocabulary of every summary.
CORRUPT_IMAGE = "corrupt image"
MISSING_IMAGE = "caption without image"
MISSING_CAPTION = "image without caption"
BAD_ANNOTATION = "bad annotation"
SIZE_MISMATCH = "size mismatch"
UNREADABLE = "unreadable file"
DUPLICATE = "duplicate id"


@dataclass(slots=True)  # millions of these are planned for SA-1B: keep them small
class Item:
    """One candidate sample. Exactly one of `path` (an image file) or `make` (a picklable recipe understood by
    `_materialize`, e.g. ("synthetic", seed, index, resolution)) gives the image."""

    id: str
    path: Optional[str] = None
    caption: str = ""
    label: int = -1
    expect_size: Optional[tuple[int, int]] = None  # (width, height) the annotation claims, checked on decode
    make: Optional[tuple] = None
    sa_json: Optional[str] = None  # SA-1B annotation whose "image" record gives expect_size (read by the worker)


@dataclass
class Partition:
    name: str  # sub-directory of OUT
    items: list[Item] = field(default_factory=list)
    source: Any = None  # instead of items: an object with fingerprint() and members(scratch_dir) -> Iterator[Member]

    def fingerprint(self) -> str:
        if self.source is not None:
            return self.source.fingerprint()
        h = hashlib.sha1()
        for it in self.items:
            h.update(json.dumps([it.id, it.path, it.caption, it.label, it.make, it.expect_size, it.sa_json],
                                default=str).encode())
        return h.hexdigest()


@dataclass
class Skip:
    id: str
    reason: str
    detail: str = ""

    def asdict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(slots=True)
class Member:
    """One image of a streaming source, its bytes read. `skip`: decided before decoding (no caption, a bad caption
    record, a second copy), as the planner decides for files. `bad_annotation`: the image's own annotation is
    unusable; like a file's SA-1B JSON it is only reported once the image decodes. `image=False` marks a skip that
    is not an image of the source (an annotation without its image): it is not counted as an image seen."""
    item: Item
    data: Optional[bytes] = None
    skip: Optional[Skip] = None
    bad_annotation: Optional[str] = None
    image: bool = True


class ArchiveError(Exception):
    """A source that cannot be read to its end (a truncated or corrupt archive)."""


# What reading a damaged tar / gzip stream raises.
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def staging_root(out: str) -> str:
    return os.path.abspath(out).rstrip("/") + STAGING_SUFFIX


def summary_path(out: str) -> str:
    return os.path.abspath(out).rstrip("/") + ".summary.json"


# ------------------------------------------------------------------------------------------------------------------
# Image checks
# ------------------------------------------------------------------------------------------------------------------


def check_image(data: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes after a full decode; raises on a corrupt or truncated file."""

    with Image.open(io.BytesIO(data)) as im:
        size = im.size
        if im.format == "JPEG":
            im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))  # DCT-domain downscale: 10x faster
        im.load()
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"empty image {size}")
    return size


_SA_IMAGE = re.compile(rb'"image"\s*:\s*(\{[^{}]*\})')


def sa_image_size(path: str) -> tuple[int, int]:
    """(width, height) from an SA-1B annotation JSON. Those files hold every mask as RLE (up to MBs each) and
    start with the "image" record, so only the head is read and that record parsed."""
    with open(path, "rb") as f:
        return sa_image_size_stream(f)


def sa_image_size_stream(f) -> tuple[int, int]:
    """`sa_image_size` of an open binary stream (a file, or a tar member read in stream mode)."""
    head = f.read(1 << 16)
    m = _SA_IMAGE.search(head)
    if m is None:
        meta = json.loads(head + f.read())["image"]  # not at the head: parse it all
    else:
        meta = json.loads(m.group(1))
    return int(meta["width"]), int(meta["height"])


def _materialize(make: tuple) -> bytes:
    kind = make[0]
    if kind == "synthetic":

        _, seed, index, resolution = make
        im = synthetic.render(synthetic.attributes(index, seed), resolution)
        buf = io.BytesIO()
        im.save(buf, format="PNG")  # lossless: the judge and the captions refer to exact palette colours
        return buf.getvalue()
    raise ValueError(f"unknown item recipe {kind!r}")


# ------------------------------------------------------------------------------------------------------------------
# One partition (runs in a worker process)
# ------------------------------------------------------------------------------------------------------------------

_PROGRESS = None  # callable(n) advancing the progress bar: bar.update in-process, a shared counter in workers


def _init_worker(counter) -> None:
    global _PROGRESS

    def add(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    _PROGRESS = add


def _tick(n: int = 1) -> None:
    if _PROGRESS is not None:
        _PROGRESS(n)


def _file_members(items: list[Item]) -> Iterator[Member]:
    """The images of a list partition, read from disk (or rendered) one at a time."""
    for it in items:
        try:
            data = _materialize(it.make) if it.make is not None else _read_file(it.path)
        except OSError as e:
            yield Member(it, skip=Skip(it.id, UNREADABLE, f"{it.path}: {e.strerror or e}"))
            continue
        yield Member(it, data)


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_partition(out: str, part: Partition, source: str, shard_size_limit: int) -> dict:
    """Write one partition into staging, then rename it into OUT. Returns its summary record, or for a source that
    cannot be read to its end {"partition", "error"} with nothing kept."""

    stage = os.path.join(staging_root(out), part.name)
    if os.path.exists(stage):
        shutil.rmtree(stage)  # left by a crashed run
    os.makedirs(os.path.dirname(stage), exist_ok=True)
    written, skips, ids = 0, [], []
    members = part.source.members(os.path.dirname(stage)) if part.source is not None else _file_members(part.items)
    try:
        with MDSWriter(out=stage, columns=RAW_COLUMNS, compression=None, hashes=["xxh64"],
                       size_limit=shard_size_limit) as w:
            for m in members:
                it = m.item
                if m.image:
                    ids.append(it.id)
                    _tick()
                if m.skip is not None:
                    skips.append(m.skip)
                    continue
                try:
                    width, height = check_image(m.data)
                except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
                    skips.append(Skip(it.id, CORRUPT_IMAGE, f"{it.path or it.id}: {type(e).__name__}: {e}"))
                    continue
                expect = it.expect_size
                if m.bad_annotation is not None:
                    skips.append(Skip(it.id, BAD_ANNOTATION, m.bad_annotation))
                    continue
                if it.sa_json is not None:
                    try:
                        expect = sa_image_size(it.sa_json)
                    except (OSError, ValueError, KeyError, TypeError) as e:
                        skips.append(Skip(it.id, BAD_ANNOTATION, f"{it.sa_json}: {type(e).__name__}: {e}"))
                        continue
                if expect is not None and tuple(expect) != (width, height):
                    skips.append(Skip(it.id, SIZE_MISMATCH, f"annotation says {expect[0]}x{expect[1]}, "
                                                            f"{it.path} is {width}x{height}"))
                    continue
                w.write({"id": it.id, "image": m.data, "caption": it.caption, "label": int(it.label),
                         "width": int(width), "height": int(height), "source": source})
                written += 1
    except ArchiveError as e:
        shutil.rmtree(stage, ignore_errors=True)
        return {"partition": part.name, "error": str(e)}
    record = {"partition": part.name, "fingerprint": part.fingerprint(), "written": written,
              "skips": [s.asdict() for s in skips]}
    if part.source is not None:
        record["ids"] = ids  # the images this source held (run() collects them for the post step)
    # index.json is MDSWriter's last file; our record goes in before the rename makes the partition visible.
    atomic_write_text(os.path.join(stage, SUMMARY_FILE), json.dumps(record) + "\n")
    final = os.path.join(os.path.abspath(out), part.name)
    if os.path.exists(final):
        shutil.rmtree(final)  # an older, stale version of this partition (fingerprint changed)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    os.replace(stage, final)
    return record


def _write_partition_star(args) -> dict:
    return write_partition(*args)


def finished_record(out: str, part: Partition) -> Optional[dict]:
    """The saved summary record of a partition that is complete and still matches the plan, else None."""
    d = os.path.join(os.path.abspath(out), part.name)
    try:
        if not os.path.isfile(os.path.join(d, "index.json")):
            return None
        with open(os.path.join(d, SUMMARY_FILE)) as f:
            rec = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    return rec if rec.get("fingerprint") == part.fingerprint() else None


# ------------------------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------------------------


def merge_partitions(out: str, names: list[str], tmp_root: Optional[str] = None) -> int:
    """Write OUT/index.json from the indexes of the partitions OUT/<name>; returns the number of samples. Atomic:
    merged into a temporary folder under `tmp_root` (default OUT.partial), then renamed over OUT/index.json."""

    out = os.path.abspath(out)
    index_files = [os.path.join(out, n, "index.json") for n in names]
    stage = tmp_root or staging_root(out)
    os.makedirs(stage, exist_ok=True)
    tmp_dir = os.path.join(stage, f"_merge{os.getpid()}")
    os.makedirs(tmp_dir, exist_ok=True)
    if index_files:

        # merge_index names each shard "<partition dir>/<shard file>", relative to the folder the merged index
        # sits in; it is renamed into OUT, the partitions' parent, so those paths hold.
        logging.disable(logging.WARNING)  # it logs a warning about its own temporary folder on every call
        try:
            merge_index(index_files, tmp_dir)
        finally:
            logging.disable(logging.NOTSET)
    else:
        atomic_write_text(os.path.join(tmp_dir, INDEX_FILE), json.dumps(EMPTY_INDEX))
    total = num_samples(tmp_dir)
    os.replace(os.path.join(tmp_dir, "index.json"), os.path.join(out, "index.json"))
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return total


def default_workers(n_partitions: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, n_partitions))


def check_out(out: str) -> str:
    """OUT as an absolute path, or a one-line error."""
    if not out:
        raise ValueError("an output directory (--out) is required")
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} exists and is not a directory")
    return out


class SeenIds:
    """The ids of the images the streaming partitions held, in an SQLite table `seen(id)` at `path` (millions for
    SA-1B), for the planner's post step (e.g. a caption store attaches it to find captions without an image)."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):
            os.remove(path)
        self.con = sqlite3.connect(path)
        self.con.executescript("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; CREATE TABLE seen (id TEXT);")

    def add(self, ids: list[str]) -> None:
        self.con.executemany("INSERT INTO seen VALUES (?)", ((i,) for i in ids))

    def index(self) -> None:
        self.con.execute("CREATE INDEX seen_id ON seen (id)")
        self.con.commit()

    def repeated(self) -> list[str]:
        """Ids held by more than one source (each written once per source), sorted."""
        return [r[0] for r in self.con.execute("SELECT id FROM seen GROUP BY id HAVING COUNT(*) > 1 ORDER BY id")]

    def close(self) -> None:
        self.con.close()


def run(kind: str, out: str, partitions: list[Partition], plan_skips: list[Skip], *, workers: Optional[int],
        shard_size_limit: int, extra: Optional[dict] = None, progress: bool = True,
        post: Optional[Callable[[SeenIds], tuple[list[Skip], dict]]] = None) -> dict:
    """Convert `partitions` into the raw MDS dataset OUT (see the module docstring). Returns the summary dict.
    `post(seen)`, called once every partition is written, returns more skips and summary fields."""
    t0 = time.time()
    out = check_out(out)
    if not any(p.items or p.source is not None for p in partitions):
        where = (extra or {}).get("root")
        reasons = Counter(s.reason for s in plan_skips)
        raise ValueError(f"nothing to convert: no usable {kind} images" + (f" under {where}" if where else "")
                         + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))})" if reasons else ""))
    names = [p.name for p in partitions]
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise ValueError(f"two partitions would share the directory {dup[0]!r}")
    os.makedirs(out, exist_ok=True)

    # Drop stale partitions from an earlier plan so the merged index only holds what this plan produced, and say so:
    # a rerun that lists fewer archives removes the others' finished work.
    keep = set(names)
    stale = sorted(e for e in os.listdir(out) if e not in keep and os.path.isfile(os.path.join(out, e, SUMMARY_FILE)))
    if stale:
        print(f"note: removing {len(stale)} partition(s) of an earlier run that this one no longer lists from {out}: "
              f"{', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}", flush=True)
    for entry in stale:
        shutil.rmtree(os.path.join(out, entry))

    streamed = any(p.source is not None for p in partitions)
    seen = SeenIds(os.path.join(staging_root(out), "seen.sqlite")) if streamed else None
    records: dict[str, dict] = {}
    failed: dict[str, str] = {}

    def take(rec: dict) -> None:
        if "error" in rec:
            failed[rec["partition"]] = rec["error"]
            return
        if seen is not None:
            seen.add(rec.pop("ids", []))  # not kept in memory: millions of ids for SA-1B
        records[rec["partition"]] = rec

    todo = []
    for part in partitions:
        rec = finished_record(out, part)
        if rec is not None:
            take(rec)
        else:
            todo.append(part)
    resumed = len(records)
    total_items = sum(len(p.items) for p in todo)
    if workers is None:
        workers = default_workers(len(todo))

    # Images of a streaming source are counted as they are read (its total is unknown until then); archives
    # get a bar of their own.
    bar = tqdm(total=None if streamed else total_items, desc=f"data {kind}", unit="img", file=sys.stderr,
               disable=not progress or not todo or (total_items == 0 and not streamed), dynamic_ncols=True)
    abar = tqdm(total=len(todo), desc=f"data {kind} archives", unit="archive", file=sys.stderr, position=1,
                disable=not progress or not streamed or not todo, dynamic_ncols=True)
    try:
        if workers <= 1 or len(todo) <= 1:
            global _PROGRESS
            _PROGRESS = bar.update
            try:
                for part in todo:
                    take(write_partition(out, part, kind, shard_size_limit))
                    abar.update(1)
            finally:
                _PROGRESS = None
        else:
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            counter = ctx.Value("q", 0)
            # Largest partitions first: the pool then finishes close together.
            order = sorted(todo, key=lambda p: -(len(p.items) if p.source is None else p.source.size_hint()))
            with ctx.Pool(workers, initializer=_init_worker, initargs=(counter,)) as pool:
                pending = pool.imap_unordered(_write_partition_star,
                                              [(out, p, kind, shard_size_limit) for p in order], chunksize=1)
                done = 0
                while done < len(order):
                    try:
                        rec = pending.next(timeout=0.5)
                    except mp.TimeoutError:
                        bar.n = counter.value
                        bar.refresh()
                        continue
                    take(rec)
                    done += 1
                    abar.update(1)
                    bar.n = counter.value
                    bar.refresh()
    finally:
        abar.close()
        bar.close()

    if failed:
        if seen is not None:
            seen.close()
        kept = len(records)
        raise ValueError(f"{len(failed)} of {len(partitions)} archives could not be read: "
                         + "; ".join(f"{n}: {e}" for n, e in sorted(failed.items()))
                         + f". The other {kept} are converted and kept under {out}; re-download or leave out the "
                           "failed ones and run the same command again (no index.json until then)")

    post_skips, post_extra = [], {}
    if seen is not None:
        seen.index()
        repeated = seen.repeated()
        if repeated:
            post_extra["ids_in_several_archives"] = len(repeated)
            print(f"warning: {len(repeated)} image ids are in more than one archive and were written once per "
                  f"archive (first: {', '.join(repeated[:5])})", file=sys.stderr)
        if post is not None:
            post_skips, more = post(seen)
            post_extra.update(more)
        seen.close()

    num_samples = merge_partitions(out, names)
    shutil.rmtree(staging_root(out), ignore_errors=True)

    seen_skips, skips = set(), []
    # One record per (id, reason): an annotation and a caption may both lack the image.
    for s in [x.asdict() for x in plan_skips] + [x for n in names for x in records[n]["skips"]] + \
            [x.asdict() for x in post_skips]:
        if (s["id"], s["reason"]) not in seen_skips:
            seen_skips.add((s["id"], s["reason"]))
            skips.append(s)
    written = sum(records[n]["written"] for n in names)
    if written != num_samples:  # the merged index and our own count must agree
        raise RuntimeError(f"{out}: merged index holds {num_samples} samples but partitions report {written}")
    summary = {
        "kind": kind,
        "out": out,
        "written": written,
        "skipped": len(skips),
        "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skips).items())),
        "partitions": len(partitions),
        "partitions_resumed": resumed,
        "seconds": round(time.time() - t0, 3),
        **(extra or {}),
        **post_extra,
        "skips": skips,
    }
    atomic_write_text(summary_path(out), json.dumps(summary, indent=1) + "\n")
    print(format_summary(summary))
    if written == 0:
        raise ValueError(f"no samples written to {out}: all {len(skips)} skipped; see {summary_path(out)}")
    return summary


def format_summary(summary: dict, max_lines: int = 20) -> str:
    lines = [f"{summary['kind']}: wrote {summary['written']} samples to {summary['out']}, "
             f"skipped {summary['skipped']}"
             + (f" ({', '.join(f'{k}: {v}' for k, v in summary['skipped_by_reason'].items())})"
                if summary["skipped"] else "")
             + (f"; {summary['partitions_resumed']} of {summary['partitions']} partitions kept from an earlier run"
                if summary.get("partitions_resumed") else "")]
    for s in summary["skips"][:max_lines]:
        lines.append(f"  skipped {s['id']}: {s['reason']}" + (f" ({s['detail']})" if s.get("detail") else ""))
    if len(summary["skips"]) > max_lines:
        lines.append(f"  ... {len(summary['skips']) - max_lines} more")
    lines.append(f"summary: {summary_path(summary['out'])}")
    return "\n".join(lines)


def read_summary(out: str) -> dict:
    with open(summary_path(out)) as f:
        return json.load(f)


def safe_name(rel: str) -> str:
    """A partition directory name for a source-relative path ("a/b c" -> "a__b_c"); "." -> "root"."""
    if rel in ("", "."):
        return "root"
    s = rel.replace(os.sep, "__")
    s = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s)
    return s.lstrip(".") or "root"


def chunked(name: str, items: list[Item], size: int) -> list[Partition]:
    """Split a large flat directory into partitions of `size` items (stable for an unchanged listing)."""
    if len(items) <= size:
        return [Partition(name, items)]
    return [Partition(f"{name}-{i // size:05d}", items[i:i + size]) for i in range(0, len(items), size)]

