"""Datasets read straight from the archives they are downloaded as, never unpacked to disk.

- SA-1B: about 1,000 tar files of about 11 GB (`sa_000000.tar` ...), each holding `sa_N.jpg` + `sa_N.json` pairs
  (the JSON: {"image": {"image_id", "width", "height", "file_name"}, "annotations": [masks as RLE]}).
- JourneyDB: `data/train/imgs/000.tgz` ... `199.tgz`, each holding `000/<hash>.jpg` ...
  (extracted, they form `imgs/000/<hash>.jpg`, the paths the annotation JSONL names as "./000/<hash>.jpg").

Each archive is one partition of the conversion (one MDS writer, committed or redone as a whole; see _engine.py),
read front to back with tarfile's stream mode ("r|*": one pass, no seeking, gzip or not). An SA-1B image is
written once its JSON has been seen (the JSON's size is checked against the JPEG); a JPEG whose JSON has not come
yet waits in memory, or past `PENDING_BYTES` in an anonymous temporary file, so any member order works.

Inputs (`pixart-ds data sam|journeydb INPUT...`): archive files, directories holding them, shell-style globs
("/data/sa1b/sa_00*.tar", quoted so the shell leaves it alone) and list files (one archive path per line, relative
to the list file; blank lines and # comments ignored).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import posixpath
import tarfile
import tempfile
from abc import ABC, abstractmethod
from typing import Iterator, Optional

from pixart_ds.data.convert._engine import (ARCHIVE_ERRORS, BAD_ANNOTATION, DUPLICATE, MISSING_CAPTION,
                                            MISSING_IMAGE, ArchiveError, Item, Member, Partition, Skip,
                                            sa_image_size_stream, safe_name)

ARCHIVE_EXTS = (".tar", ".tgz", ".tar.gz")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
PENDING_BYTES = 1 << 28  # JPEGs waiting in memory for their JSON before they go to a temporary file


def is_archive(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_EXTS)


def archive_stem(path: str) -> str:
    base = os.path.basename(path)
    for ext in sorted(ARCHIVE_EXTS, key=len, reverse=True):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base


def _is_table_archive(path: str) -> bool:
    """An archived annotation file (JourneyDB's train_anno_realease_repath.jsonl.tgz), not an image archive."""
    return archive_stem(path).lower().endswith((".jsonl", ".json", ".csv"))


def _walk_archives(root: str, exclude: set[str], prefix: str) -> list[str]:
    found = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        found += [os.path.join(d, f) for f in sorted(files) if is_archive(f) and f.startswith(prefix)
                  and not f.startswith(".") and not _is_table_archive(f)
                  and os.path.abspath(os.path.join(d, f)) not in exclude]
    return found


def _read_list(path: str) -> list[str]:
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = os.path.join(base, os.path.expanduser(line))
            if not is_archive(p):
                raise ValueError(f"{path}:{i}: {line} is not an archive (expected {', '.join(ARCHIVE_EXTS)})")
            if not os.path.exists(p):
                raise FileNotFoundError(f"{path}:{i}: archive not found: {p}")
            out.append(p)
    if not out:
        raise ValueError(f"{path}: the list names no archives")
    return out


def resolve_inputs(inputs, what: str, exclude=(), prefix: str = "") -> tuple[Optional[str], list[str]]:
    """(extracted directory or None, archives) named by `inputs` (a path or a list of them): archive files,
    directories of archives, globs, list files; or exactly one directory of extracted images. Inside directories
    only archives whose name starts with `prefix` ("sa_" for SA-1B) count, and never archived annotation files
    (*.jsonl.tgz, ...) or the paths in `exclude` (the caption archive); files named explicitly always count."""
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    exclude = {os.path.abspath(e) for e in exclude if e}
    if not inputs:
        raise ValueError(f"no {what} input given")
    archives: list[str] = []
    extracted: list[str] = []
    for raw in map(os.fspath, inputs):
        p = os.path.expanduser(raw)
        if os.path.isdir(p):
            found = _walk_archives(p, exclude, prefix)
            if found:
                archives += found
            else:
                extracted.append(p)
        elif os.path.exists(p):  # a file (or a named pipe) that is an archive, else a list of archives
            archives += [p] if is_archive(p) else _read_list(p)
        elif glob.has_magic(p):
            hits = sorted(glob.glob(p))
            found = [h for h in hits if is_archive(h) and not _is_table_archive(h)
                     and os.path.abspath(h) not in exclude]
            if not found:
                raise FileNotFoundError(f"no {what} archives match {raw}"
                                        + (f" ({len(hits)} other files do)" if hits else ""))
            archives += found
        else:
            raise FileNotFoundError(f"{what} not found: {raw}")
    if extracted and (archives or len(extracted) > 1):
        raise ValueError(f"{what}: give archives (files, directories of them, globs, list files) or one directory "
                         f"of extracted images, not both: {', '.join(extracted)}"
                         + (f" and {len(archives)} archives" if archives else ""))
    if extracted:
        return os.path.abspath(extracted[0]), []
    archives = [os.path.abspath(a) for a in archives]
    dup = sorted({a for a in archives if archives.count(a) > 1})
    if dup:
        raise ValueError(f"{what}: archive given twice: {dup[0]}")
    return None, archives


def partition_names(archives: list[str]) -> list[str]:
    """One partition (sub-directory of OUT) per archive, named by its stem ("sa_000000", "000"); archives of the
    same stem in different directories are told apart by their path."""
    stems = [archive_stem(a) for a in archives]
    if len(set(stems)) == len(stems):
        return [safe_name(s) for s in stems]
    common = os.path.commonpath([os.path.dirname(a) for a in archives])
    return [safe_name(os.path.join(os.path.relpath(os.path.dirname(a), common), archive_stem(a)))
            for a in archives]


class _ArchiveSource(ABC):
    """What SA-1B and JourneyDB archives share: the fingerprint, the size hint, the caption join, error wrapping."""

    kind = ""

    def __init__(self, path: str, captions=None, params: Optional[dict] = None):
        self.path = path
        self.captions = captions  # a captionstore.CaptionStore, or None (images only, empty captions)
        self.params = params or {}

    def fingerprint(self) -> str:
        # Name, size and mtime rather than the path: moving the downloads keeps a conversion resumable.
        st = os.stat(self.path)
        key = [self.kind, os.path.basename(self.path), st.st_size, st.st_mtime_ns,
               self.captions.digest if self.captions is not None else None, self.params]
        return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def size_hint(self) -> int:
        return os.stat(self.path).st_size

    def where(self, member: str) -> str:
        return f"{os.path.basename(self.path)}:{member}"

    def caption_skip(self, sid: str, base: str) -> tuple[Optional[Skip], str]:
        """(skip, caption) as the planner's join decides for an image file: a bad caption record first, then a
        missing caption."""
        if self.captions is None:
            return None, ""
        problem = self.captions.problem(sid)
        if problem is not None:
            return Skip(sid, BAD_ANNOTATION, problem), ""
        cap = self.captions.caption(sid)
        if cap is None:
            return Skip(sid, MISSING_CAPTION, base), ""
        return None, cap

    def members(self, scratch: str) -> Iterator[Member]:
        try:
            with tarfile.open(self.path, "r|*") as tar:
                yield from self._read(tar, scratch)
        except ArchiveError:
            raise
        except ARCHIVE_ERRORS as e:
            raise ArchiveError(f"{self.path}: {type(e).__name__}: {e}") from None

    @abstractmethod
    def _read(self, tar: tarfile.TarFile, scratch: str) -> Iterator[Member]:
        """The images of one opened archive, as `Member`s (each archive layout reads its own members)."""


class SamArchive(_ArchiveSource):
    """One SA-1B tar: sa_N.jpg with its sa_N.json, in any member order."""

    kind = "sam"

    def _read(self, tar, scratch):
        waiting: dict[str, tuple] = {}  # stem -> (Item, bytes or (offset, length) in the spill file)
        sizes: dict[str, tuple] = {}  # stem -> ((w, h) | None, problem | None) of a JSON read before its JPEG
        done: set[str] = set()  # images yielded or skipped
        spill = None
        held = 0
        try:
            for m in tar:
                tar.members.clear()  # TarFile keeps every member it has read, even in stream mode
                if not m.isfile():
                    continue
                base = posixpath.basename(m.name)
                stem, ext = posixpath.splitext(base)
                ext = ext.lower()
                if not stem.startswith("sa_"):
                    continue
                if ext in (".jpg", ".jpeg"):
                    if stem in done or stem in waiting:
                        yield Member(Item(id=stem), skip=Skip(stem, DUPLICATE, f"{self.where(m.name)}: second "
                                                                               "copy of this image ignored"),
                                     image=False)
                        continue
                    skip, cap = self.caption_skip(stem, base)
                    if skip is not None:
                        done.add(stem)
                        sizes.pop(stem, None)
                        yield Member(Item(id=stem, path=self.where(m.name)), skip=skip)
                        continue
                    data = tar.extractfile(m).read()
                    it = Item(id=stem, path=self.where(m.name), caption=cap)
                    if stem in sizes:
                        done.add(stem)
                        yield self._pair(it, data, *sizes.pop(stem))
                    elif held + len(data) <= PENDING_BYTES:
                        waiting[stem] = (it, data)
                        held += len(data)
                    else:
                        if spill is None:
                            spill = tempfile.TemporaryFile(dir=scratch)  # unlinked at once: nothing left on a kill
                        spill.seek(0, os.SEEK_END)
                        waiting[stem] = (it, (spill.tell(), len(data)))
                        spill.write(data)
                elif ext == ".json":
                    try:
                        size, problem = sa_image_size_stream(tar.extractfile(m)), None
                    except (ValueError, KeyError, TypeError) as e:
                        size, problem = None, f"{self.where(m.name)}: {type(e).__name__}: {e}"
                    if stem in waiting:
                        it, data = waiting.pop(stem)
                        if isinstance(data, bytes):
                            held -= len(data)
                        else:
                            spill.seek(data[0])
                            data = spill.read(data[1])
                        done.add(stem)
                        yield self._pair(it, data, size, problem)
                    elif stem not in done:
                        sizes.setdefault(stem, (size, problem))
            # JPEGs without a JSON are written unchecked, as files are; JSONs without a JPEG name a missing image.
            for stem in sorted(waiting):
                it, data = waiting[stem]
                if not isinstance(data, bytes):
                    spill.seek(data[0])
                    data = spill.read(data[1])
                yield Member(it, data)
            for stem in sorted(sizes):
                yield Member(Item(id=stem), skip=Skip(stem, MISSING_IMAGE, f"{self.where(stem + '.json')} has no "
                                                                           f"{stem}.jpg"), image=False)
        finally:
            if spill is not None:
                spill.close()

    @staticmethod
    def _pair(it: Item, data: bytes, size, problem) -> Member:
        it.expect_size = size
        return Member(it, data, bad_annotation=problem)


class JourneyDBArchive(_ArchiveSource):
    """One JourneyDB image archive (data/train/imgs/NNN.tgz): NNN/<hash>.jpg members, ids "NNN/<hash>" as the
    annotation's img_path names them."""

    kind = "journeydb"

    def _read(self, tar, scratch):
        seen: set[str] = set()
        prefix = archive_stem(self.path)
        for m in tar:
            tar.members.clear()  # TarFile keeps every member it has read, even in stream mode
            base = posixpath.basename(m.name)
            if not m.isfile() or base.startswith(".") or not base.lower().endswith(IMAGE_EXTS):
                continue
            rel = posixpath.normpath(m.name.lstrip("/"))
            parts = rel.split("/")
            if parts[0] == "imgs" and len(parts) > 2:  # packed from data/train/ rather than from imgs/
                rel = "/".join(parts[1:])
            if "/" not in rel:  # packed from inside NNN/: the archive's name is the folder
                rel = f"{prefix}/{rel}"
            sid = posixpath.splitext(rel)[0]
            if sid in seen:
                yield Member(Item(id=sid), skip=Skip(sid, DUPLICATE, f"{self.where(m.name)}: second copy of this "
                                                                     "image ignored"), image=False)
                continue
            seen.add(sid)
            skip, cap = self.caption_skip(sid, base)
            it = Item(id=sid, path=self.where(m.name), caption=cap)
            if skip is not None:
                yield Member(it, skip=skip)
                continue
            yield Member(it, tar.extractfile(m).read())


def plan_archives(source_cls, archives: list[str], captions=None, params: Optional[dict] = None) -> list[Partition]:
    return [Partition(name, source=source_cls(path, captions, params))
            for name, path in zip(partition_names(archives), archives)]


def post_join(captions, seen) -> tuple[list[Skip], dict]:
    """Once every archive is read: captions whose image was in no archive, and bad caption records naming such an
    image, as the planner reports them for files (sorted by id)."""
    if captions is None:
        return [], {}
    skips = [Skip(sid, MISSING_IMAGE, "no image file for this caption")
             for sid in captions.caption_ids_not_in(seen.path)]
    skips += [Skip(sid, BAD_ANNOTATION, detail) for sid, detail in captions.problems_not_in(seen.path)]
    return skips, {}
