"""`pixart-ds caption-stats`: the paper's Table-1 noun statistics, checked against hand counts on a fixed corpus."""
import json

import pytest

from pixart_ds.data import caption_stats as C
from pixart_ds.data.recaption import PAPER_PROMPT

# Hand count (nouns by lemma, so "dogs" counts as "dog"):
#   "A dog sleeps on a chair."          x11 -> dog 11, chair 11
#   "A bird sits on the roof."          x10 -> bird 10, roof 10   (exactly 10: NOT valid, valid needs > 10)
#   "The cat drinks milk from a bowl."  x2  -> cat 2, milk 2, bowl 2
#   "Two dogs play near a tree."        x1  -> dog +1 (= 12), tree 1
# images 24; total nouns 22 + 20 + 6 + 2 = 50; distinct {dog chair bird roof cat milk bowl tree} = 8;
# valid {dog (12), chair (11)} = 2; VN/DN = 2/8 = 0.25; nouns per image = 50/24.
DENSE = (["A dog sleeps on a chair."] * 11 + ["A bird sits on the roof."] * 10
         + ["The cat drinks milk from a bowl."] * 2 + ["Two dogs play near a tree."])
DENSE_EXPECTED = {"images": 24, "total_nouns": 50, "distinct_nouns": 8, "valid_nouns": 2,
                  "valid_noun_ratio": 0.25, "avg_nouns_per_image": 50 / 24}

# Alt-text-like captions: "Red car." x12 -> car 12; "Blue sky over the sea." x3 -> sky 3, sea 3.
# images 15; total 18; distinct 3; valid {car} = 1; VN/DN = 1/3; nouns per image 1.2.
SPARSE = ["Red car."] * 12 + ["Blue sky over the sea."] * 3
SPARSE_EXPECTED = {"images": 15, "total_nouns": 18, "distinct_nouns": 3, "valid_nouns": 1,
                   "valid_noun_ratio": 1 / 3, "avg_nouns_per_image": 1.2}


def _jsonl(path, caps):
    with open(path, "w") as f:
        for i, c in enumerate(caps):
            f.write(json.dumps({"id": f"sa_{i}", "caption": c, "model": "llava", "prompt": PAPER_PROMPT}) + "\n")
    return path


def _close(got, want):
    assert set(want) <= set(got)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k


def test_tagger_nouns_per_caption():
    assert C.noun_lemmas(["Two dogs play near a tree.", "The cat drinks milk from a bowl."]) == [
        ["dog", "tree"], ["cat", "milk", "bowl"]]


def test_hand_counted_corpus(tmp_path):
    _close(C.caption_file_stats(_jsonl(tmp_path / "dense.jsonl", DENSE)), DENSE_EXPECTED)
    txt = tmp_path / "sparse.txt"
    txt.write_text("\n".join(SPARSE) + "\n")  # plain text: one caption a line
    _close(C.caption_file_stats(str(txt)), SPARSE_EXPECTED)


def test_raw_mds_captions(tmp_path):
    from streaming import MDSWriter

    from pixart_ds.data.schema import RAW_COLUMNS

    root = str(tmp_path / "mds")
    with MDSWriter(out=root, columns=RAW_COLUMNS) as w:
        for i, c in enumerate(SPARSE):
            w.write({"id": str(i), "image": b"", "caption": c, "label": -1, "width": 1, "height": 1,
                     "source": "folder"})
    _close(C.caption_file_stats(root), SPARSE_EXPECTED)


def test_cli_compare_prints_both_columns_and_json(tmp_path, run_cli):
    dense = _jsonl(tmp_path / "llava.jsonl", DENSE)
    sparse = _jsonl(tmp_path / "raw.jsonl", SPARSE)
    out = tmp_path / "stats" / "table1.json"
    p = run_cli("caption-stats", dense, "--compare", sparse, "--json", out, check=True)
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["llava.jsonl", "raw.jsonl"]
    rows = {ln[:28].strip(): ln[28:].split() for ln in lines[1:7]}
    assert rows["images"] == ["24", "15"]
    assert rows["total nouns"] == ["50", "18"]
    assert rows["distinct nouns (DN)"] == ["8", "3"]
    assert rows["valid nouns (VN, >10 times)"] == ["2", "1"]
    assert rows["VN/DN"] == ["25.0%", "33.3%"]
    assert rows["nouns per image"] == ["2.08", "1.20"]
    doc = json.loads(out.read_text())
    assert doc["valid_min_count"] == 10 and doc["tagger"].startswith("spacy 3.8") and "en_core_web_sm" in doc["tagger"]
    _close(doc["files"]["llava.jsonl"], DENSE_EXPECTED)
    _close(doc["files"]["raw.jsonl"], SPARSE_EXPECTED)


def test_cli_bad_inputs_are_one_line_errors(tmp_path, run_cli):
    p = run_cli("caption-stats", tmp_path / "missing.jsonl")
    assert p.returncode == 2 and "captions file not found" in p.stderr and "missing.jsonl" in p.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "a dog"}\n')
    p = run_cli("caption-stats", bad)
    assert p.returncode == 2 and "bad.jsonl:1: record has no 'caption' field" in p.stderr
