"""Raw conversion: fake but faithful ImageNet / SA-1B / JourneyDB / folder trees (real JPEGs, the real annotation
formats) -> `pixart-ds data ...` -> every sample back with its caption or label; bad input counted and named in the
summary; crash-safe, resumable output."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from pixart_ds.data import convert
from pixart_ds.data.convert import _engine, read_summary
from pixart_ds.data.schema import iter_samples


def jpeg(path, w, h, seed=0, quality=90) -> bytes:
    """A real JPEG file with smooth random content (decodes, has the given size)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    im = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return buf.getvalue()


def truncated_jpeg(path, w=64, h=48, seed=99):
    data = jpeg(path, w, h, seed)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def by_id(root):
    return {s["id"]: s for s in iter_samples(root)}


def skips_by_id(summary):
    return {s["id"]: s["reason"] for s in summary["skips"]}


def check_layout(out):
    """The summary sits beside OUT, the only JSON under OUT are MDS indexes, nothing is left in staging, and
    Streaming's own merge_index over the root would build the same index as ours."""
    assert os.path.isfile(out + ".summary.json")
    assert not os.path.exists(out + ".partial")
    for d, _, files in os.walk(out):
        for f in files:
            if f.endswith(".json"):
                assert f == "index.json", os.path.join(d, f)
    from streaming.base.util import merge_index

    index = os.path.join(out, "index.json")
    with open(index) as f:
        ours = json.load(f)
    os.rename(index, index + ".ours")  # merge_index refuses to overwrite an existing root index
    try:
        merge_index(out, keep_local=True)
        with open(index) as f:
            theirs = json.load(f)
    finally:
        os.replace(index + ".ours", index)
    key = lambda s: s["raw_data"]["basename"]  # noqa: E731
    assert sorted(ours["shards"], key=key) == sorted(theirs["shards"], key=key)


# ------------------------------------------------------------------------------------------------------------------
# ImageNet
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_imagenet(tmp_path):
    root = tmp_path / "imagenet"
    files = {}
    for ci, syn in enumerate(["n01440764", "n01443537", "n01484850"]):
        for j in range(2):
            p = root / "train" / syn / f"{syn}_{100 + j}.JPEG"
            files[f"{syn}/{syn}_{100 + j}"] = (jpeg(str(p), 80 + 8 * j, 64, seed=10 * ci + j), ci)
    truncated_jpeg(str(root / "train" / "n01443537" / "n01443537_999.JPEG"))
    (root / "train" / "n01440764" / "notes.txt").write_text("not an image")
    return root, files


def test_imagenet_cli_labels_in_synset_order(fake_imagenet, tmp_path, run_cli):
    root, files = fake_imagenet
    out = str(tmp_path / "raw")
    p = run_cli("data", "imagenet", root, "--out", out, "--workers", "2")
    assert p.returncode == 0, p.stderr
    assert "wrote 6 samples" in p.stdout and "corrupt image" in p.stdout
    got = by_id(out)
    assert set(got) == set(files)
    for sid, (data, label) in files.items():
        assert got[sid]["label"] == label
        assert got[sid]["image"] == data  # bytes kept encoded, unchanged
        assert got[sid]["caption"] == "" and got[sid]["source"] == "imagenet"
        assert (got[sid]["width"], got[sid]["height"]) == Image.open(io.BytesIO(data)).size
    summary = read_summary(out)
    assert summary["classes"] == ["n01440764", "n01443537", "n01484850"]
    assert skips_by_id(summary) == {"n01443537/n01443537_999": "corrupt image"}
    check_layout(out)


def test_streaming_dataset_reads_converted_shards(fake_imagenet, tmp_path):
    """The merged root is a valid Streaming dataset: StreamingDataset sees every sample once."""
    from streaming import StreamingDataset

    root, files = fake_imagenet
    out = str(tmp_path / "raw")
    convert.imagenet(str(root), out=out, workers=1, progress=False)
    ds = StreamingDataset(local=out, shuffle=False, batch_size=1)
    ids = [ds[i]["id"] for i in range(len(ds))]
    assert sorted(ids) == sorted(files)


# ------------------------------------------------------------------------------------------------------------------
# SA-1B + LLaVA captions
# ------------------------------------------------------------------------------------------------------------------


def _sa_json(path, image_id, w, h):
    meta = {"image": {"image_id": image_id, "width": w, "height": h, "file_name": f"sa_{image_id}.jpg"},
            "annotations": [{"id": 1, "bbox": [0, 0, 4, 4], "area": 16, "segmentation": {"size": [h, w],
                                                                                        "counts": "abc"},
                             "predicted_iou": 0.9, "point_coords": [[1, 1]], "crop_box": [0, 0, w, h],
                             "stability_score": 0.95}]}
    path.write_text(json.dumps(meta))


@pytest.fixture
def fake_sam(tmp_path):
    root = tmp_path / "sa1b"
    imgs = {}
    for tar, ids in (("sa_000000", [1, 2, 3, 4, 7]), ("sa_000001", [5, 6])):
        for i in ids:
            w, h = 96 + 4 * i, 64
            d = root / tar
            d.mkdir(parents=True, exist_ok=True)
            imgs[f"sa_{i}"] = jpeg(str(d / f"sa_{i}.jpg"), w, h, seed=i)
            _sa_json(d / f"sa_{i}.json", i, w, h if i != 7 else h + 1)  # sa_7: the JSON disagrees with the JPEG
    truncated_jpeg(str(root / "sa_000001" / "sa_6.jpg"))  # corrupt, with a caption
    _sa_json(root / "sa_000000" / "sa_8.json", 8, 100, 64)  # annotation without its image
    imgs["sa_10"] = jpeg(str(root / "sa_000001" / "sa_10.jpg"), 64, 64, seed=10)
    (root / "sa_000001" / "sa_10.json").write_text('{"image": {"image_id": 10, "width": ')  # cut-off JSON
    caps = tmp_path / "llava_captions.jsonl"
    rows = [{"id": "sa_1", "caption": "A red barn under a cloudy sky.", "model": "llava", "prompt": "Describe"},
            {"id": "sa_2", "caption": "Two cats on a sofa.", "model": "llava", "prompt": "Describe"},
            {"id": "sa_5.jpg", "caption": "A street at night.", "model": "llava", "prompt": "Describe"},
            {"id": 6, "caption": "A broken image.", "model": "llava", "prompt": "Describe"},
            {"id": "sa_7", "caption": "Size mismatch.", "model": "llava", "prompt": "Describe"},
            {"id": "sa_9", "caption": "Caption without image.", "model": "llava", "prompt": "Describe"},
            {"id": "sa_8", "caption": "Its JSON is there, its JPEG is not.", "model": "llava", "prompt": "D"},
            {"id": "sa_10", "caption": "Its JSON is cut off.", "model": "llava", "prompt": "Describe"},
            {"id": "sa_4", "caption": ["a", "list"], "model": "llava", "prompt": "Describe"}]
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "{not json")
    caps.write_text("\n".join(lines) + "\n")
    return root, caps, imgs


def test_sam_cli_join_and_skip_reasons(fake_sam, tmp_path, run_cli):
    root, caps, imgs = fake_sam
    out = str(tmp_path / "raw")
    p = run_cli("data", "sam", root, "--captions", caps, "--out", out)
    assert p.returncode == 0, p.stderr
    got = by_id(out)
    assert {k: v["caption"] for k, v in got.items()} == {
        "sa_1": "A red barn under a cloudy sky.", "sa_2": "Two cats on a sofa.", "sa_5": "A street at night."}
    for k, v in got.items():
        assert v["image"] == imgs[k] and v["source"] == "sam" and v["label"] == -1
    summary = read_summary(out)
    skips = skips_by_id(summary)
    assert skips["sa_3"] == "image without caption"
    assert skips["sa_9"] == "caption without image"
    assert skips["sa_8"] == "caption without image"  # the annotation JSON names an image that is not there
    assert skips["sa_6"] == "corrupt image"
    assert skips["sa_7"] == "size mismatch"
    assert skips["sa_4"] == "bad annotation"  # caption is a list: wrong type, named with its line
    assert skips["sa_10"] == "bad annotation"  # its SA-1B JSON does not parse
    assert skips["llava_captions.jsonl:4"] == "bad annotation"  # the line that is not JSON
    assert summary["written"] == 3 and summary["skipped"] == len(summary["skips"]) == 8
    assert "caption is list" in next(s["detail"] for s in summary["skips"] if s["id"] == "sa_4")
    check_layout(out)


def test_sam_csv_captions_and_folder_of_txt(fake_sam, tmp_path):
    root, _, _ = fake_sam
    csv_caps = tmp_path / "caps.csv"
    csv_caps.write_text('image_id,caption\n1,"A barn, red."\nsa_2.jpg,Two cats\n5,A street\n3\n')
    s = convert.sam(str(root), captions=str(csv_caps), out=str(tmp_path / "a"), workers=1, progress=False)
    assert {k: v["caption"] for k, v in by_id(str(tmp_path / "a")).items()} == {
        "sa_1": "A barn, red.", "sa_2": "Two cats", "sa_5": "A street"}
    assert skips_by_id(s)["caps.csv:5"] == "bad annotation"  # a row with too few columns
    txt = tmp_path / "txt"
    txt.mkdir()
    (txt / "sa_2.txt").write_text("Two cats on a sofa.\n")
    convert.sam(str(root), captions=str(txt), out=str(tmp_path / "b"), workers=1, progress=False)
    assert {k: v["caption"] for k, v in by_id(str(tmp_path / "b")).items()} == {"sa_2": "Two cats on a sofa."}
    # Without a caption file: every readable image, captions empty (the input of `pixart-ds caption`).
    s = convert.sam(str(root), out=str(tmp_path / "c"), workers=1, progress=False)
    assert sorted(by_id(str(tmp_path / "c"))) == ["sa_1", "sa_2", "sa_3", "sa_4", "sa_5"]
    assert s["skipped_by_reason"] == {"bad annotation": 1, "caption without image": 1, "corrupt image": 1,
                                      "size mismatch": 1}


# ------------------------------------------------------------------------------------------------------------------
# JourneyDB
# ------------------------------------------------------------------------------------------------------------------


def _jdb_record(rel, prompt, caption=None):
    rec = {"img_path": f"./{rel}", "prompt": prompt,
           "Task1": {"Style": ["cinematic"], "Content": ["a lighthouse"], "Atmosphere": ["calm"], "Others": []},
           "Task3": {"Style Relevant Questions and Answers": [], "Content Relevant Questions and Answers": []}}
    if caption is not None:
        rec["Task2"] = {"Caption": caption}
    return rec


@pytest.fixture
def fake_journeydb(tmp_path):
    base = tmp_path / "JourneyDB" / "data" / "train"
    imgs = base / "imgs"
    files = {}
    for rel, (w, h) in {"000/3f2a9c": (128, 72), "000/77b1d0": (72, 128), "000/aa0000": (96, 96),
                        "001/c0ffee": (100, 64)}.items():
        files[rel] = jpeg(str(imgs / f"{rel}.jpg"), w, h, seed=len(files))
    anno = base / "train_anno_realease_repath.jsonl"
    recs = [_jdb_record("000/3f2a9c.jpg", "lighthouse at dusk, volumetric light --ar 16:9 --v 5",
                        "A lighthouse glows at dusk."),
            _jdb_record("000/77b1d0.jpg", "portrait of a fox --v 5.1", "A fox in a portrait."),
            _jdb_record("001/c0ffee.jpg", "tiny robot, studio photo --q 2"),  # no Task2: prompt is the fallback
            _jdb_record("002/deadbe.jpg", "missing image", "This image is not on disk."),
            {"img_path": 17, "prompt": "bad path"}]
    anno.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return imgs, anno, files


def test_journeydb_cli_captions(fake_journeydb, tmp_path, run_cli):
    imgs, anno, files = fake_journeydb
    out = str(tmp_path / "raw")
    p = run_cli("data", "journeydb", imgs, "--annotations", anno, "--out", out)
    assert p.returncode == 0, p.stderr
    got = by_id(out)
    assert {k: v["caption"] for k, v in got.items()} == {
        "000/3f2a9c": "A lighthouse glows at dusk.", "000/77b1d0": "A fox in a portrait.",
        "001/c0ffee": "tiny robot, studio photo"}
    for k, v in got.items():
        assert v["image"] == files[k] and v["source"] == "journeydb"
    s = read_summary(out)
    assert skips_by_id(s) == {"000/aa0000": "image without caption", "002/deadbe": "caption without image",
                              "train_anno_realease_repath.jsonl:5": "bad annotation"}
    assert s["used_prompt_as_fallback"] == 1
    check_layout(out)


def test_journeydb_prompt_text_and_tgz(fake_journeydb, tmp_path):
    import tarfile

    imgs, anno, _ = fake_journeydb
    tgz = str(anno) + ".tgz"
    with tarfile.open(tgz, "w:gz") as t:
        t.add(str(anno), arcname="train_anno_realease_repath.jsonl")
    out = str(tmp_path / "p")
    # ROOT may be data/train (the parent of imgs/) as well.
    convert.journeydb(str(imgs.parent), annotations=tgz, out=out, text="prompt", workers=1, progress=False)
    assert {k: v["caption"] for k, v in by_id(out).items()} == {
        "000/3f2a9c": "lighthouse at dusk, volumetric light", "000/77b1d0": "portrait of a fox",
        "001/c0ffee": "tiny robot, studio photo"}


# ------------------------------------------------------------------------------------------------------------------
# Folder
# ------------------------------------------------------------------------------------------------------------------


def test_folder_sidecars_cli_and_index(tmp_path, run_cli):
    root = tmp_path / "pics"
    a = jpeg(str(root / "a.jpg"), 64, 64, 1)
    b = jpeg(str(root / "sub" / "b.jpg"), 80, 64, 2)
    jpeg(str(root / "sub" / "c.jpg"), 64, 80, 3)  # no sidecar
    (root / "a.txt").write_text("  an apple on a table \n")
    (root / "sub" / "b.json").write_text(json.dumps({"caption": "a bicycle", "label": 3}))
    (root / "sub" / "d.txt").write_text("orphan caption")
    out = str(tmp_path / "raw")
    p = run_cli("data", "folder", root, "--out", out)
    assert p.returncode == 0, p.stderr
    got = by_id(out)
    assert {k: (v["caption"], v["label"]) for k, v in got.items()} == {"a": ("an apple on a table", -1),
                                                                      "sub/b": ("a bicycle", 3)}
    assert got["a"]["image"] == a and got["sub/b"]["image"] == b
    assert skips_by_id(read_summary(out)) == {"sub/c": "image without caption", "sub/d": "caption without image"}
    check_layout(out)

    idx = tmp_path / "index.jsonl"
    idx.write_text("\n".join(json.dumps(r) for r in [
        {"path": "a.jpg", "caption": "apple"}, {"file_name": "sub/c.jpg", "text": "a cat"},
        {"path": "sub/zzz.jpg", "caption": "gone"}, {"path": "sub/b.jpg", "caption": 5}]) + "\n")
    s = convert.folder(str(root), index=str(idx), out=str(tmp_path / "idx"), workers=1, progress=False)
    assert {k: v["caption"] for k, v in by_id(str(tmp_path / "idx")).items()} == {"a": "apple", "sub/c": "a cat"}
    assert skips_by_id(s) == {"sub/zzz": "caption without image", "sub/b": "bad annotation"}


def test_missing_root_is_one_line_error(tmp_path, run_cli):
    p = run_cli("data", "journeydb", tmp_path / "nope", "--annotations", tmp_path / "a.jsonl", "--out",
                tmp_path / "o")
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "not found" in p.stderr and "nope" in p.stderr


# ------------------------------------------------------------------------------------------------------------------
# Crash safety and resume
# ------------------------------------------------------------------------------------------------------------------


def test_crash_halfway_leaves_no_broken_output_then_resumes(fake_imagenet, tmp_path, monkeypatch):
    root, files = fake_imagenet
    out = str(tmp_path / "raw")
    real = _engine.check_image
    calls = {"n": 0}

    def flaky(data):
        calls["n"] += 1
        if calls["n"] == 4:  # in the middle of the second partition
            raise KeyboardInterrupt
        return real(data)

    monkeypatch.setattr(_engine, "check_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert.imagenet(str(root), out=out, workers=1, progress=False)
    # No root index (not a dataset yet), only complete partitions under OUT, the half one in staging.
    assert not os.path.exists(os.path.join(out, "index.json"))
    done = sorted(os.listdir(out))
    assert done == ["n01440764"] and os.path.isfile(os.path.join(out, "n01440764", "index.json"))
    assert os.listdir(out + ".partial") == ["n01443537"]

    monkeypatch.setattr(_engine, "check_image", real)
    s = convert.imagenet(str(root), out=out, workers=1, progress=False)
    assert s["partitions_resumed"] == 1 and s["written"] == 6
    assert sorted(by_id(out)) == sorted(files)
    check_layout(out)

    # Unchanged source: everything kept. A new image in one class: only that partition is rewritten.
    s = convert.imagenet(str(root), out=out, workers=1, progress=False)
    assert s["partitions_resumed"] == 3
    jpeg(str(root / "train" / "n01484850" / "n01484850_555.JPEG"), 64, 64, seed=5)
    s = convert.imagenet(str(root), out=out, workers=2, progress=False)
    assert s["partitions_resumed"] == 2 and s["written"] == 7
    assert by_id(out)["n01484850/n01484850_555"]["label"] == 2


def test_nothing_to_convert_is_an_error(tmp_path, fake_journeydb):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable folder images under"):
        convert.folder(str(tmp_path / "empty"), out=str(tmp_path / "o"), workers=1, progress=False)
    assert not (tmp_path / "o").exists()
    # Images that are all unusable: the summary is written, then a one-line error points to it.
    root = tmp_path / "bad"
    truncated_jpeg(str(root / "x.jpg"))
    (root / "x.txt").write_text("a caption")
    with pytest.raises(ValueError, match="all 1 skipped; see .*o2.summary.json"):
        convert.folder(str(root), out=str(tmp_path / "o2"), workers=1, progress=False)
    assert read_summary(str(tmp_path / "o2"))["skipped_by_reason"] == {"corrupt image": 1}
