"""Planners: read a source tree and its annotations, and lay the work out as partitions of items plus plan-time skips.

Nothing here decodes images (the engine does, in parallel). Ids are stable strings derived from file names, so a
caption file written by `pixart-ds caption` (JSONL: id, caption, model, prompt) joins back onto the same images.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
import tarfile
from collections import defaultdict
from typing import Iterator, Optional

from pixart_ds.data import synthetic
from pixart_ds.data.convert import archives as arc
from pixart_ds.data.convert import captionstore as cs
from pixart_ds.data.convert._engine import (BAD_ANNOTATION, DUPLICATE, MISSING_CAPTION, MISSING_IMAGE, Item, Partition,
                                            Skip, chunked, safe_name)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
PARTITION_SIZE = 10_000  # items per partition when a directory is larger (SA-1B tars hold ~11k images)

_ID_KEYS = ("id", "image_id", "key", "image", "file_name", "filename", "path", "img_path")
_CAPTION_KEYS = ("caption", "text")  # never "prompt": in our caption JSONL that is the LLaVA instruction
_FOLDER_CAPTION_KEYS = ("caption", "text", "prompt")


def _require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    return os.path.abspath(path)


def _require_file(path: str, what: str) -> str:
    if not path or not (os.path.isfile(path) or os.path.isdir(path)):
        raise FileNotFoundError(f"{what} not found: {path}")
    return os.path.abspath(path)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS) and not name.startswith(".")


def _walk_images(root: str) -> dict[str, list[str]]:
    """{relative dir: sorted image file names} under root (hidden entries skipped)."""
    out: dict[str, list[str]] = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        imgs = sorted(f for f in files if _is_image(f))
        if imgs:
            out[os.path.relpath(d, root)] = imgs
    return dict(sorted(out.items()))


def _stem_id(rel_path: str) -> str:
    """"./000/abc.jpg" -> "000/abc" (posix separators, no extension): the sample id."""
    p = rel_path.replace(os.sep, "/")
    p = p[2:] if p.startswith("./") else p
    return os.path.splitext(p)[0]


# ------------------------------------------------------------------------------------------------------------------
# Annotation readers: yield (where, row-dict or error) so a bad line is reported, never fatal
# ------------------------------------------------------------------------------------------------------------------


_TABLE_MEMBERS = (".jsonl", ".json", ".csv")


def _open_text(path: str, members=_TABLE_MEMBERS) -> Iterator[tuple[str, io.TextIOBase]]:
    """Yield (display name, text stream) for a plain file or each member of a .tar/.tgz/.tar.gz whose name ends
    with one of `members` (JourneyDB ships its annotation JSONL inside a .tgz; the paper's SA-1B captions are a
    .tar.gz of one sa_N.txt per image). Archives are read in stream mode: one pass, members never listed first
    (10M of them would not fit in memory)."""
    if arc.is_archive(path):
        with tarfile.open(path, "r|*") as tar:
            for m in tar:
                tar.members.clear()  # TarFile keeps every member it has read, even in stream mode: 10M of them
                if m.isfile() and m.name.lower().endswith(members) \
                        and not os.path.basename(m.name).startswith("."):
                    # codecs' reader, not io.TextIOWrapper: a stream-mode member cannot answer seekable().
                    yield f"{os.path.basename(path)}:{m.name}", codecs.getreader("utf-8")(tar.extractfile(m),
                                                                                          errors="replace")
        return
    with open(path, encoding="utf-8") as f:
        yield os.path.basename(path), f


def _rows(path: str, members=_TABLE_MEMBERS) -> Iterator[tuple[str, object]]:
    """(location "file:line", dict) per record of a JSONL, CSV or JSON (list or {id: caption}) file; a record that
    does not parse comes as (location, ValueError). A .txt member of an archive is one record
    {"id": its file name, "caption": its text}."""
    for name, f in _open_text(path, members):
        low = name.lower()
        if low.endswith(".txt"):
            yield name, {"id": name.rsplit(":", 1)[-1], "caption": f.read()}
        elif low.endswith(".csv"):
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                yield f"{name}:1", ValueError("empty CSV (no header)")
                continue
            for i, row in enumerate(reader, start=2):
                if None in row or any(v is None for v in row.values()):
                    yield f"{name}:{i}", ValueError(f"{len(reader.fieldnames)} columns expected, row has "
                                                    f"{len([v for v in row.values() if v is not None])}"
                                                    f"{' + ' + str(len(row[None])) if None in row else ''}")
                else:
                    yield f"{name}:{i}", dict(row)
        elif low.endswith(".json"):
            try:
                obj = json.load(f)
            except ValueError as e:
                yield f"{name}:1", ValueError(f"not JSON: {e}")
                continue
            if isinstance(obj, dict):
                for k, v in obj.items():
                    yield f"{name}:{k}", {"id": k, "caption": v}
            elif isinstance(obj, list):
                for i, v in enumerate(obj):
                    yield f"{name}:[{i}]", v if isinstance(v, dict) else ValueError(f"record is {type(v).__name__}")
            else:
                yield f"{name}:1", ValueError(f"top level is {type(obj).__name__}, expected a list or object")
        else:  # JSONL
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    v = json.loads(line)
                except ValueError as e:
                    yield f"{name}:{i}", ValueError(f"not JSON: {e.msg}")
                    continue
                yield f"{name}:{i}", v if isinstance(v, dict) else ValueError(f"record is {type(v).__name__}, "
                                                                              "expected an object")


def _first(row: dict, keys) -> tuple[Optional[str], object]:
    for k in keys:
        if k in row and row[k] is not None:
            return k, row[k]
    return None, None


def _str_field(row: dict, keys, what: str) -> str:
    k, v = _first(row, keys)
    if k is None:
        raise ValueError(f"no {what} field (one of {', '.join(keys)})")
    if not isinstance(v, str):
        raise ValueError(f"{k} is {type(v).__name__}, expected a string")
    return v


# ------------------------------------------------------------------------------------------------------------------
# ImageNet
# ------------------------------------------------------------------------------------------------------------------


def plan_imagenet(root: str):
    """Class-folder layout (ROOT/<synset>/<image>, or ROOT/train/<synset>/...): label = index of the folder in sorted
    order, which for ImageNet is the standard synset order (n01440764 = 0 ... n15075141 = 999)."""
    root = _require_dir(root, "ImageNet root")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if classes == ["train"] or ("train" in classes and not any(re.fullmatch(r"n\d{8}", c) for c in classes)):
        root = os.path.join(root, "train")
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise ValueError(f"no class folders under {root} (expected ROOT/<synset>/<image>.JPEG)")
    parts, skips = [], []
    for label, cls in enumerate(classes):
        d = os.path.join(root, cls)
        items = []
        for dp, dirs, files in os.walk(d):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            for f in sorted(files):
                if _is_image(f):
                    rel = os.path.relpath(os.path.join(dp, f), root)
                    items.append(Item(id=_stem_id(rel), path=os.path.join(dp, f), caption="", label=label))
        parts.extend(chunked(safe_name(cls), items, PARTITION_SIZE))
    return parts, skips, {"root": root, "num_classes": len(classes), "classes": classes}


# ------------------------------------------------------------------------------------------------------------------
# Caption files keyed by image id (SAM + LLaVA)
# ------------------------------------------------------------------------------------------------------------------


def _sam_id(key: str) -> str:
    """"sa_1234", "sa_1234.jpg", "path/to/sa_1234.jpg", 1234, "1234" -> "sa_1234"."""
    base = os.path.splitext(os.path.basename(str(key).strip()))[0]
    return f"sa_{base}" if base.isdigit() else base


def sam_caption_events(path: str, normalize=_sam_id) -> Iterator[tuple]:
    """Caption-store events (captionstore.build) of a caption source keyed by image id: JSONL/CSV/JSON with an id
    field (id, image_id, key, image, file_name, path) and a caption field (caption, text); a directory tree of
    <id>.txt files; or an archive (.tar.gz / .tgz / .tar) of either, e.g. the paper's SA1B_caption.tar.gz
    (PixArt-alpha/SAM-LLaVA-Captions10M, one sa_N.txt per image). Ids are file stems wherever the file sits."""
    if os.path.isdir(path):
        for d, dirs, files in os.walk(path):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            for f in sorted(files):
                if f.endswith(".txt") and not f.startswith("."):
                    with open(os.path.join(d, f), encoding="utf-8", errors="replace") as fh:
                        text = fh.read().strip()
                    if text:
                        yield cs.CAPTION, normalize(f), text, os.path.relpath(os.path.join(d, f), path)
        return
    if path.lower().endswith(".txt"):
        raise ValueError(f"{path}: a .txt caption file holds one caption; give a directory of <id>.txt files, an "
                         "archive of them (e.g. SA1B_caption.tar.gz) or a JSONL/CSV/JSON keyed by id")
    for where, row in _rows(path, _TABLE_MEMBERS + (".txt",)):
        if isinstance(row, Exception):
            yield cs.bad_record(where, str(row))
            continue
        k, key = _first(row, _ID_KEYS)
        if k is None or not isinstance(key, (str, int)) or isinstance(key, bool):
            yield cs.bad_record(where, f"no usable id field (one of {', '.join(_ID_KEYS)})")
            continue
        sid = normalize(key)
        try:
            text = _str_field(row, _CAPTION_KEYS, "caption").strip()
        except ValueError as e:
            yield cs.PROBLEM, sid, f"{where}: {e}"
            continue
        if text:  # an empty caption: the image then counts as "image without caption"
            yield cs.CAPTION, sid, text, where


def sam_captions(path: str, work_dir: str, progress: bool = True) -> cs.CaptionStore:
    """The caption store of `path` (see sam_caption_events), built in `work_dir` or reused from an earlier run."""
    path = _require_file(path, "caption file")
    return cs.open_or_build(os.path.join(work_dir, cs.STORE_FILE), cs.source_key(path, reader="sam"),
                            lambda: sam_caption_events(path), progress=progress, desc="captions")


class _DictCaptions:
    """The caption-store interface over in-memory dicts (the folder converter's sidecars)."""

    def __init__(self, caps: dict, bad: dict):
        self.caps, self.bad = caps, bad

    def caption(self, sid):
        return self.caps.get(sid)

    def problem(self, sid):
        return self.bad.get(sid)

    def caption_ids(self):
        return iter(sorted(self.caps))

    def problem_ids(self):
        return iter(sorted(self.bad))


def _join(images: dict[str, tuple[str, Optional[tuple]]], caps, group) -> tuple:
    """Join {id: (path, expect_size)} with captions (a CaptionStore or _DictCaptions; None: no captions, all
    empty); returns ({partition key: [Item]}, skips)."""
    skips: list[Skip] = []
    groups: dict[str, list[Item]] = defaultdict(list)
    for sid in sorted(images):
        path, size = images[sid]
        cap = ""
        if caps is not None:
            problem = caps.problem(sid)
            if problem is not None:
                skips.append(Skip(sid, BAD_ANNOTATION, problem))
                continue
            cap = caps.caption(sid)
            if cap is None:
                skips.append(Skip(sid, MISSING_CAPTION, os.path.basename(path)))
                continue
        groups[group(sid, path)].append(Item(id=sid, path=path, caption=cap, expect_size=size))
    if caps is not None:
        skips += [Skip(sid, MISSING_IMAGE, "no image file for this caption") for sid in caps.caption_ids()
                  if sid not in images]
        skips += [Skip(sid, BAD_ANNOTATION, caps.problem(sid)) for sid in caps.problem_ids() if sid not in images]
    return groups, skips


def plan_sam(root, captions: Optional[str], work_dir: str, progress: bool = True):
    """SA-1B: sa_N.jpg with sa_N.json ({"image": {"image_id", "width", "height", "file_name"}, "annotations": [...]}),
    either in the downloaded tars (`root`: tar files, directories of them, globs, list files; see archives.py) or
    in one directory of extracted tars. The JSON's size is checked against the JPEG. Joined with captions keyed by
    image id (see sam_caption_events; stored in `work_dir`); without them, captions stay empty (the input for
    `pixart-ds caption`). Returns (partitions, skips, summary fields, post step or None).
    The annotation JSONs are read by the writers, not here: they hold every mask and are large."""
    extracted, archives = arc.resolve_inputs(root, "SA-1B root", exclude=[captions], prefix="sa_")
    store = sam_captions(captions, work_dir, progress) if captions is not None else None
    skips: list[Skip] = store.skips() if store is not None else []
    extra = {"root": extracted or (archives[0] if len(archives) == 1 else os.path.commonpath(archives)),
             "captions": os.path.abspath(captions) if captions else None}
    if archives:
        extra["archives"] = len(archives)
        return (arc.plan_archives(arc.SamArchive, archives, store), skips, extra,
                lambda seen: arc.post_join(store, seen))
    root = extracted
    images: dict[str, tuple[str, Optional[tuple]]] = {}
    rel_dir: dict[str, str] = {}
    sa_json: dict[str, Optional[str]] = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        names = set(files)
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if ext.lower() == ".json" and stem.startswith("sa_") and not any(stem + e in names
                                                                             for e in (".jpg", ".JPG")):
                rel = os.path.relpath(os.path.join(d, f), root)
                skips.append(Skip(stem, MISSING_IMAGE, f"{rel} has no {stem}.jpg"))
            if not (ext.lower() in (".jpg", ".jpeg") and stem.startswith("sa_")):
                continue
            jpath = os.path.join(d, stem + ".json")
            sa_json[stem] = jpath if os.path.isfile(jpath) else None
            images[stem] = (os.path.join(d, f), None)
            rel_dir[stem] = os.path.relpath(d, root)
    if not images and not skips:
        raise ValueError(f"no SA-1B images (sa_N.jpg) or archives (sa_N.tar) under {root}")
    groups, join_skips = _join(images, store, lambda sid, p: rel_dir[sid])
    skips.extend(join_skips)
    for items in groups.values():
        for it in items:
            it.sa_json = sa_json[it.id]  # its size is checked against the JPEG by the writer
    parts = [p for g, items in groups.items() for p in chunked(safe_name(g), items, PARTITION_SIZE)]
    return parts, skips, extra, None


# ------------------------------------------------------------------------------------------------------------------
# JourneyDB
# ------------------------------------------------------------------------------------------------------------------

# Midjourney parameters at the end of a prompt ("--ar 16:9 --v 5 --q 2"): not a description of the image.
_MJ_FLAGS = re.compile(r"(\s+--?[a-zA-Z]+(\s+(?!-)[^\s]+)?)+\s*$")


def clean_prompt(prompt: str) -> str:
    return _MJ_FLAGS.sub("", prompt).strip()


def journeydb_caption_events(annotations: str, text: str, strip_imgs: bool = True) -> Iterator[tuple]:
    """Caption-store events of the JourneyDB annotation JSONL (plain or in its .tgz), one record per image:
    {"img_path": "./NNN/<hash>.jpg", "prompt": "<Midjourney prompt>", "Task1": {...},
     "Task2": {"Caption": "<GPT-3.5 caption>"}, "Task3": {...}}, keyed "NNN/<hash>".
    text="caption" uses Task2.Caption (falling back to the prompt when absent); text="prompt" uses the prompt with
    its trailing Midjourney --parameters removed (falling back to the caption). Ends with the fallback count."""
    fallback = 0
    for where, row in _rows(annotations):
        if isinstance(row, Exception):
            yield cs.bad_record(where, str(row))
            continue
        p = row.get("img_path")
        if not isinstance(p, str) or not p.strip():
            yield cs.bad_record(where, "img_path missing or not a string")
            continue
        rel = p.strip()
        rel = rel[2:] if rel.startswith("./") else rel
        rel = rel[5:] if rel.startswith("imgs/") and strip_imgs else rel
        sid = _stem_id(rel)
        task2 = row.get("Task2")
        cap = task2.get("Caption") if isinstance(task2, dict) else None
        prompt = row.get("prompt")
        wrong = [(k, v) for k, v in (("Task2.Caption", cap), ("prompt", prompt)) if v is not None
                 and not isinstance(v, str)]
        if wrong:
            yield cs.PROBLEM, sid, f"{where}: {wrong[0][0]} is {type(wrong[0][1]).__name__}, expected a string"
            continue
        cap = (cap or "").strip()
        prompt = clean_prompt(prompt or "")
        first, second = (cap, prompt) if text == "caption" else (prompt, cap)
        chosen = first or second
        if not chosen:
            continue  # counted as an image without caption when the image exists
        fallback += int(not first)
        yield cs.CAPTION, sid, chosen, where
    yield cs.META, "fallback", fallback


def plan_journeydb(root, annotations: str, text: str = "caption", work_dir: str = "", progress: bool = True):
    """JourneyDB: the image archives data/train/imgs/NNN.tgz as downloaded (`root`: archives, directories of them,
    globs, list files; see archives.py), or the extracted images ROOT/<NNN>/<hash>.jpg; joined with the
    annotation JSONL (train_anno_realease_repath.jsonl, plain or as its .tgz) through a caption store in
    `work_dir` (see journeydb_caption_events). Returns (partitions, skips, summary fields, post step or None)."""
    if text not in ("caption", "prompt"):
        raise ValueError(f"journeydb text must be 'caption' or 'prompt', got {text!r}")
    # Given data/train/ rather than data/train/imgs/: the images are in imgs/.
    roots = [root] if isinstance(root, (str, os.PathLike)) else list(root)
    roots = [os.path.join(r, "imgs") if os.path.isdir(os.path.join(r, "imgs")) else r for r in roots]
    extracted, archives = arc.resolve_inputs(roots, "JourneyDB image root", exclude=[annotations])
    annotations = _require_file(annotations, "JourneyDB annotation file")
    strip_imgs = not (extracted and os.path.isdir(os.path.join(extracted, "imgs")))
    store = cs.open_or_build(os.path.join(work_dir, cs.STORE_FILE),
                             cs.source_key(annotations, reader="journeydb", text=text, strip_imgs=strip_imgs),
                             lambda: journeydb_caption_events(annotations, text, strip_imgs), progress=progress,
                             desc="annotations")
    skips = store.skips()
    extra = {"root": extracted or (archives[0] if len(archives) == 1 else os.path.commonpath(archives)),
             "annotations": annotations, "text": text,
             f"used_{'prompt' if text == 'caption' else 'caption'}_as_fallback": store.meta["fallback"]}
    if archives:
        extra["archives"] = len(archives)
        return (arc.plan_archives(arc.JourneyDBArchive, archives, store, {"text": text}), skips, extra,
                lambda seen: arc.post_join(store, seen))
    images = {}
    for rel_dir, files in _walk_images(extracted).items():
        for f in files:
            rel = os.path.normpath(os.path.join(rel_dir, f))
            images[_stem_id(rel)] = (os.path.join(extracted, rel), None)
    groups, join_skips = _join(images, store, lambda sid, path: os.path.dirname(sid) or ".")
    skips.extend(join_skips)
    parts = [p for g, items in groups.items() for p in chunked(safe_name(g), items, PARTITION_SIZE)]
    return parts, skips, extra, None


# ------------------------------------------------------------------------------------------------------------------
# Generic folder
# ------------------------------------------------------------------------------------------------------------------


def plan_folder(root: str, index: Optional[str]):
    """Images anywhere under ROOT with captions either in sidecars (x.jpg + x.txt, or x.json with a "caption" /
    "text" / "prompt" string and an optional integer "label") or in one index file (--index: JSONL/CSV/JSON with a
    path field -- path, file_name, image, img_path, relative to ROOT -- and a caption field)."""
    root = _require_dir(root, "image folder")
    skips: list[Skip] = []
    caps: dict[str, str] = {}
    labels: dict[str, int] = {}
    bad: dict[str, str] = {}
    images: dict[str, tuple[str, Optional[tuple]]] = {}
    for rel_dir, files in _walk_images(root).items():
        for f in files:
            rel = os.path.normpath(os.path.join(rel_dir, f))
            images[_stem_id(rel)] = (os.path.join(root, rel), None)

    def take(sid: str, where: str, row: dict) -> None:
        try:
            cap = _str_field(row, _FOLDER_CAPTION_KEYS, "caption").strip()
            lab = row.get("label", -1)
            if isinstance(lab, str) and lab.strip().lstrip("-").isdigit():
                lab = int(lab)
            if not isinstance(lab, int) or isinstance(lab, bool):
                raise ValueError(f"label is {type(lab).__name__}, expected an integer")
        except ValueError as e:
            bad[sid] = f"{where}: {e}"
            return
        if not cap:
            return
        if sid in caps:
            skips.append(Skip(sid, DUPLICATE, f"{where}: second caption for this image ignored"))
            return
        caps[sid], labels[sid] = cap, lab

    if index is not None:
        index = _require_file(index, "index file")
        for where, row in _rows(index):
            if isinstance(row, Exception):
                skips.append(Skip(where, BAD_ANNOTATION, str(row)))
                continue
            k, p = _first(row, ("path", "file_name", "image", "img_path", "filename"))
            if not isinstance(p, str) or not p.strip():
                skips.append(Skip(where, BAD_ANNOTATION, "no path field (path, file_name, image, img_path)"))
                continue
            p = p.strip()
            rel = os.path.relpath(p, root) if os.path.isabs(p) else os.path.normpath(p)
            take(_stem_id(rel), where, row)
    else:
        for d, dirs, files in os.walk(root):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            for f in sorted(files):
                stem, ext = os.path.splitext(f)
                if ext.lower() not in (".txt", ".json") or f.startswith("."):
                    continue
                sid = _stem_id(os.path.relpath(os.path.join(d, stem), root))
                where = os.path.relpath(os.path.join(d, f), root)
                if sid in caps or (ext.lower() == ".json" and os.path.isfile(os.path.join(d, stem + ".txt"))):
                    continue  # .txt wins over .json
                try:
                    if ext.lower() == ".txt":
                        with open(os.path.join(d, f), encoding="utf-8") as fh:
                            row = {"caption": fh.read()}
                    else:
                        with open(os.path.join(d, f), encoding="utf-8") as fh:
                            row = json.load(fh)
                        if not isinstance(row, dict):
                            raise ValueError(f"top level is {type(row).__name__}, expected an object")
                except (OSError, ValueError) as e:
                    bad[sid] = f"{where}: {e}"
                    continue
                take(sid, where, row)
    groups, join_skips = _join(images, _DictCaptions(caps, bad), lambda sid, path: os.path.dirname(sid) or ".")
    for items in groups.values():
        for it in items:
            it.label = labels.get(it.id, -1)
    skips.extend(join_skips)
    parts = [p for g, items in groups.items() for p in chunked(safe_name(g), items, PARTITION_SIZE)]
    return parts, skips, {"root": root, "index": index}


# ------------------------------------------------------------------------------------------------------------------
# Synthetic
# ------------------------------------------------------------------------------------------------------------------


def plan_synthetic(num_samples: int, resolution: int, seed: int, per_partition: int = 1000):
    if num_samples <= 0:
        raise ValueError(f"--num-samples must be positive, got {num_samples}")
    if resolution < 32:
        raise ValueError(f"--resolution must be at least 32, got {resolution}")
    items = []
    for i in range(num_samples):
        a = synthetic.attributes(i, seed)
        items.append(Item(id=f"shapes-{seed}-{i:07d}", make=("synthetic", seed, i, resolution),
                          caption=synthetic.caption(a), label=synthetic.label(a)))
    parts = [Partition(f"part-{i // per_partition:05d}", items[i:i + per_partition])
             for i in range(0, num_samples, per_partition)]
    return parts, [], {"seed": seed, "resolution": resolution, "num_classes": synthetic.NUM_CLASSES,
                       "held_out_triples": sorted(list(t) for t in synthetic.HELD_OUT)}
