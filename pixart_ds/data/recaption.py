"""LLaVA re-captioning of raw MDS shards (PixArt-α §2.4, "Dataset construction").

SAM images are re-captioned by LLaVA with the prompt "Describe this image and its style in a very detailed manner",
because web alt-texts name few objects and many of their nouns are rare (the effect is measured by
pixart_ds.data.caption_stats, the paper's Table 1).

`caption_mds` (`pixart-ds caption`) runs LLaVA through transformers on every rank's disjoint slice of a raw MDS and
appends JSONL records {id, caption, model, prompt} to one part file per rank (flushed and fsynced per batch, so a
killed run loses at most one batch and a rerun skips every id already written). When the slices of all ranks are
complete, the rank that completes them merges the parts into `captions.jsonl`, ordered by id, which
`pixart-ds data sam --captions` reads.
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

import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoProcessor, LlavaForConditionalGeneration

from pixart_ds.data.schema import iter_samples, num_samples
from pixart_ds.dist import launch_ranks
from pixart_ds.fsutil import atomic_write, atomic_write_text

PAPER_PROMPT = "Describe this image and its style in a very detailed manner"  # PixArt-α §2.4
# LLaVA-1.5's conversation format, used when the processor carries no chat template.
LLAVA15_FORMAT = "USER: <image>\n{prompt} ASSISTANT:"


# ---------------------------------------------------------------------------------------------------------------
# Append-only JSONL logs
# ---------------------------------------------------------------------------------------------------------------

def read_jsonl(path: str, repair: bool = False) -> list[dict]:
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

        def copy_records(tmp: str) -> None:
            handles = {}
            with open(tmp, "wb") as g:
                for rid in ids:
                    path, pos, n = where[rid]
                    f = handles.get(path) or handles.setdefault(path, open(path, "rb"))
                    f.seek(pos)
                    g.write(f.read(n))
            for f in handles.values():
                f.close()

        atomic_write(os.path.join(out, name), copy_records)
        return len(ids)

    caps = index("part")
    skipped = index("skipped")
    n_caps = write("captions.jsonl", caps)
    n_skip = write("skipped.jsonl", skipped, drop=caps)
    summary = dict(run, captioned=n_caps, skipped=n_skip, captions=os.path.join(out, "captions.jsonl"),
                   skipped_file=os.path.join(out, "skipped.jsonl"))
    atomic_write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary


def caption_mds(inp: str, out: str, model: str, prompt: str = PAPER_PROMPT, batch_size: int = 8,
                max_new_tokens: int = 256, kill_after_batches: int = 0) -> int:
    """`pixart-ds caption`: caption every image of the raw MDS `inp` with the LLaVA folder `model`.
    `kill_after_batches` (fault injection for the resume test, train.faults): SIGKILL this process after it has
    written that many batches."""
    inp, out, model = os.fspath(inp), os.fspath(out), os.fspath(model)
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"--batch-size ({batch_size}) and --max-new-tokens ({max_new_tokens}) must be >= 1")
    check_llava_folder(model)  # bad arguments fail before the heavy imports
    total = num_samples(inp, "raw MDS")
    rank, world, local = launch_ranks()
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
        atomic_write_text(run_path, json.dumps(run, indent=2) + "\n")

    # Resume: ids of every earlier part (any rank, any world size) are done; own files lose a torn last line.
    done = set()
    for path in glob.glob(os.path.join(out, "part-*.jsonl")) + glob.glob(os.path.join(out, "skipped-*.jsonl")):
        own = path in (_part(out, "part", rank), _part(out, "skipped", rank))
        done.update(r["id"] for r in read_jsonl(path, repair=own))

    start, stop = total * rank // world, total * (rank + 1) // world  # this rank's contiguous slice
    if torch.cuda.is_available():
        device, dtype = torch.device("cuda", local), torch.float16  # LLaVA-1.5 weights are released in fp16
    else:
        device, dtype = torch.device("cpu"), torch.float32
    processor, llava = load_llava(model, device, dtype)
    text = prompt_text(processor, prompt)

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
            if kill_after_batches and batches >= kill_after_batches:
                os.kill(os.getpid(), signal.SIGKILL)

        for s in iter_samples(inp, start, stop, columns=("id", "image")):
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
    atomic_write_text(os.path.join(out, "done", f"{start:012d}-{stop:012d}.json"),
                  json.dumps({"start": start, "stop": stop, "rank": rank, "world_size": world}) + "\n")
    if _slices_complete(out, total):
        summary = _merge(out, run)
        print(f"caption: {summary['captioned']} captions -> {summary['captions']}; "
              f"{summary['skipped']} skipped -> {summary['skipped_file']}")
    else:
        print(f"caption rank {rank}: slice done; the rank that completes the last slice writes "
              f"{os.path.join(out, 'captions.jsonl')}", file=sys.stderr)
    return 0


