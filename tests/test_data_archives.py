"""Raw conversion straight from the downloads: SA-1B tars (sa_N.jpg + sa_N.json pairs), the paper's caption archive
(SA1B_caption.tar.gz: one sa_N.txt per image), JourneyDB's imgs/NNN.tgz + its annotation .jsonl.tgz. Each is
converted in place and compared with the conversion of the same files extracted: the same samples, captions and
skips. A conversion killed in the middle of an archive resumes without losing or repeating an archive."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time

import pytest
from test_data_convert import check_layout, fake_journeydb, fake_sam, jpeg, skips_by_id  # noqa: F401 (fixtures)

from pixart_ds.data import convert
from pixart_ds.data.convert import archives as arc
from pixart_ds.data.convert import read_summary
from pixart_ds.data.schema import iter_samples

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pack(members, path, order=None):
    """Write a tar (gzip for .tgz / .tar.gz) of {arcname: bytes} in `order` (default: sorted names)."""
    mode = "w:gz" if path.endswith((".tgz", ".tar.gz")) else "w"
    with tarfile.open(path, mode) as t:
        for name in order or sorted(members):
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            info.mtime = 1_700_000_000
            t.addfile(info, io.BytesIO(members[name]))
    return path


def sam_tars(root, dest, order="pairs"):
    """One sa_00000K.tar per extracted directory of `root`, members "./sa_N.jpg" / "./sa_N.json" as SA-1B ships
    them; order "pairs" (jpg, json, jpg, json, ...) or "json_last" (every JPEG first: they wait for their JSON)."""
    os.makedirs(dest, exist_ok=True)
    out = []
    for d in sorted(os.listdir(root)):
        files = {f"./{f}": (root / d / f).read_bytes() for f in sorted(os.listdir(root / d))}
        names = sorted(files, key=lambda n: (n.endswith(".json"), n) if order == "json_last" else n)
        out.append(pack(files, os.path.join(dest, f"{d}.tar"), names))
    return out


def samples(out):
    return {s["id"]: {k: v for k, v in s.items()} for s in iter_samples(out)}


def assert_same_conversion(a, b, sa, sb):
    """Two conversions hold the same samples (every column) and the same skips (id -> reason, and counts)."""
    assert samples(a) == samples(b)
    assert skips_by_id(sa) == skips_by_id(sb)
    assert sa["skipped_by_reason"] == sb["skipped_by_reason"] and sa["written"] == sb["written"]
    assert sa["skipped"] == len(sa["skips"]) == len(sb["skips"])


# ------------------------------------------------------------------------------------------------------------------
# SA-1B
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["pairs", "json_last"])
def test_sam_tars_equal_extracted(fake_sam, tmp_path, order, monkeypatch):
    root, caps, imgs = fake_sam
    ref = str(tmp_path / "ref")
    s_ref = convert.sam(str(root), captions=str(caps), out=ref, workers=1, progress=False)
    tars = sam_tars(root, str(tmp_path / "dl"), order)
    if order == "json_last":
        monkeypatch.setattr(arc, "PENDING_BYTES", 2000)  # one small JPEG waits in memory, the others in a file
    out = str(tmp_path / "raw")
    s = convert.sam(tars, captions=str(caps), out=out, workers=1, progress=False)
    assert_same_conversion(out, ref, s, s_ref)
    assert s["archives"] == 2 and s["partitions"] == 2
    assert sorted(os.listdir(out)) == ["index.json", "sa_000000", "sa_000001"]  # one partition per tar
    got = skips_by_id(s)
    assert got["sa_6"] == "corrupt image" and got["sa_7"] == "size mismatch" and got["sa_8"] == "caption without image"
    assert got["sa_10"] == "bad annotation" and got["sa_3"] == "image without caption"
    check_layout(out)


def test_sam_cli_inputs_dir_glob_list(fake_sam, tmp_path, run_cli):
    """The same tars given as a directory, a quoted glob, a list file, or the shell's expansion name the same
    archives; converted as a user types it (a quoted glob, two workers) they equal the extracted conversion."""
    root, caps, _ = fake_sam
    dl = tmp_path / "dl"
    tars = sam_tars(root, str(dl))
    (dl / "SA1B_caption.tar.gz").write_bytes(b"")  # a caption archive beside the tars is not an image archive
    listing = tmp_path / "lists" / "tars.txt"
    listing.parent.mkdir()
    listing.write_text("# the SA-1B tars\n" + "\n".join(os.path.relpath(t, listing.parent) for t in tars) + "\n\n")
    for inputs in ([str(dl)], [str(dl / "sa_0000*.tar")], [str(listing)], tars):
        assert arc.resolve_inputs(inputs, "SA-1B root", prefix="sa_") == (None, sorted(tars))
    ref = str(tmp_path / "ref")
    s_ref = convert.sam(str(root), captions=str(caps), out=ref, workers=1, progress=False)
    out = str(tmp_path / "raw")
    p = run_cli("data", "sam", str(dl / "sa_0000*.tar"), "--captions", caps, "--out", out, "--workers", "2")
    assert p.returncode == 0, p.stderr
    assert "wrote 3 samples" in p.stdout and "data sam archives" in p.stderr  # progress in archives and images
    assert_same_conversion(out, ref, read_summary(out), s_ref)
    with pytest.raises(FileNotFoundError, match="no SA-1B root archives match .*sa_9"):
        arc.resolve_inputs([str(dl / "sa_9*.tar")], "SA-1B root")
    listing.write_text("../dl/sa_000000.tar\nnotes.txt\n")
    p = run_cli("data", "sam", listing, "--out", tmp_path / "x")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    assert "pixart-ds data: error: " in p.stderr and "tars.txt:2: notes.txt is not an archive" in p.stderr


def test_sam_without_captions_from_tars(fake_sam, tmp_path):
    root, _, _ = fake_sam
    ref, out = str(tmp_path / "ref"), str(tmp_path / "raw")
    s_ref = convert.sam(str(root), out=ref, workers=1, progress=False)
    s = convert.sam(sam_tars(root, str(tmp_path / "dl")), out=out, workers=2, progress=False)
    assert_same_conversion(out, ref, s, s_ref)
    assert sorted(samples(out)) == ["sa_1", "sa_2", "sa_3", "sa_4", "sa_5"]


def test_rerun_with_fewer_archives_says_which_partitions_it_removes(fake_sam, tmp_path, capsys):
    """The merged index holds what this run lists: a rerun without one tar removes that tar's partition and says so."""
    root, caps, _ = fake_sam
    tars = sam_tars(root, str(tmp_path / "dl"))
    out = str(tmp_path / "raw")
    convert.sam(tars, captions=str(caps), out=out, workers=1, progress=False)
    capsys.readouterr()
    s = convert.sam(tars[:1], captions=str(caps), out=out, workers=1, progress=False)
    said = capsys.readouterr().out
    assert f"removing 1 partition(s) of an earlier run that this one no longer lists from {out}: sa_000001" in said
    assert sorted(os.listdir(out)) == ["index.json", "sa_000000"] and s["partitions_resumed"] == 1
    with tarfile.open(tars[0]) as t:
        first = {os.path.basename(n)[:-4] for n in t.getnames() if n.endswith(".jpg")}
    assert samples(out) and set(samples(out)) <= first


def test_sam_tar_member_edge_cases(tmp_path):
    """A JPEG whose JSON comes first, a second copy of a JPEG, a JPEG without JSON (written, unchecked as a file
    would be), a JSON without JPEG, directories and other files: each handled as the extracted path handles it."""
    a, b, c = (jpeg(str(tmp_path / "src" / f"{n}.jpg"), 64 + n, 48, seed=n) for n in (1, 2, 3))
    meta = lambda w, h: json.dumps({"image": {"width": w, "height": h}}).encode()  # noqa: E731
    members = {"./sa_1.json": meta(65, 48), "./sa_1.jpg": a, "./sa_2.jpg": b, "./sa_2.json": meta(66, 48),
               "./x/sa_2.jpg": b, "./sa_3.jpg": c, "./sa_4.json": meta(10, 10), "./readme.txt": b"hello"}
    order = ["./sa_1.json", "./sa_1.jpg", "./sa_2.jpg", "./x/sa_2.jpg", "./sa_2.json", "./sa_3.jpg", "./sa_4.json",
             "./readme.txt"]
    tar = pack(members, str(tmp_path / "sa_000007.tar"), order)
    out = str(tmp_path / "raw")
    s = convert.sam(tar, out=out, workers=1, progress=False)
    got = samples(out)
    assert sorted(got) == ["sa_1", "sa_2", "sa_3"] and got["sa_2"]["image"] == b
    assert [(x["id"], x["reason"]) for x in s["skips"]] == [("sa_2", "duplicate id"),
                                                            ("sa_4", "caption without image")]
    assert "ids_in_several_archives" not in s


# ------------------------------------------------------------------------------------------------------------------
# The paper's caption archive and .txt trees
# ------------------------------------------------------------------------------------------------------------------

CAPTIONS = {"sa_1": "A red barn under a cloudy sky.", "sa_2": "Two cats on a sofa.", "sa_5": "A street at night.",
            "sa_6": "A broken image.", "sa_7": "Size mismatch.", "sa_9": "Caption without image.",
            "sa_4": "  ", "sa_10": "Its JSON is cut off."}


def test_caption_archive_and_txt_tree(fake_sam, tmp_path, run_cli):
    """SA1B_caption.tar.gz (sa_N.txt members, keyed by file stem), the same files as a directory tree, and the same
    captions as JSONL give the same conversion, from the extracted images and from the tars."""
    root, _, _ = fake_sam
    members = {f"{sid}.txt": text.encode() for sid, text in CAPTIONS.items()}
    members["README"] = b"not a caption"
    tgz = pack(members, str(tmp_path / "SA1B_caption.tar.gz"))
    tree = tmp_path / "captions"
    for i, (sid, text) in enumerate(CAPTIONS.items()):  # spread over sub-directories
        (tree / f"part{i % 3}").mkdir(parents=True, exist_ok=True)
        (tree / f"part{i % 3}" / f"{sid}.txt").write_text(text)
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text("".join(json.dumps({"id": k, "caption": v}) + "\n" for k, v in CAPTIONS.items()))
    ref = str(tmp_path / "ref")
    s_ref = convert.sam(str(root), captions=str(jsonl), out=ref, workers=1, progress=False)
    assert {k: v["caption"] for k, v in samples(ref).items()} == {k: CAPTIONS[k] for k in ("sa_1", "sa_2", "sa_5")}
    assert skips_by_id(s_ref)["sa_4"] == "image without caption"  # an empty caption file: no caption
    tars = sam_tars(root, str(tmp_path / "dl"))
    for k, (images, caps) in enumerate([(str(root), tgz), (str(root), str(tree)), (tars, tgz)]):
        out = str(tmp_path / f"raw{k}")
        s = convert.sam(images, captions=caps, out=out, workers=1, progress=False)
        assert_same_conversion(out, ref, s, s_ref)
    # As a user types it, the archive straight from the download.
    out = str(tmp_path / "cli")
    p = run_cli("data", "sam", tmp_path / "dl", "--captions", tgz, "--out", out)
    assert p.returncode == 0, p.stderr
    assert_same_conversion(out, ref, read_summary(out), s_ref)
    with pytest.raises(ValueError, match="a .txt caption file holds one caption"):
        convert.sam(tars, captions=str(tree / "part0" / "sa_1.txt"), out=str(tmp_path / "x"), progress=False)


def test_caption_store_is_reused_and_follows_its_source(fake_sam, tmp_path):
    from pixart_ds.data.convert import captionstore as cs
    from pixart_ds.data.convert import sources

    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text('{"id": "sa_1", "caption": "one"}\n{"id": 1, "caption": "again"}\n{"id": "sa_2", "text": 5}\n'
                     '{"caption": "no id"}\n')
    work = str(tmp_path / "work")
    store = sources.sam_captions(str(jsonl), work, progress=False)
    assert store.caption("sa_1") == "one" and store.caption("sa_3") is None and len(store) == 1
    assert "text is int" in store.problem("sa_2")
    assert [(s.id, s.reason) for s in store.skips()] == [("caps.jsonl:4", "bad annotation"),
                                                         ("sa_1", "duplicate id")]
    mtime = os.stat(os.path.join(work, cs.STORE_FILE)).st_mtime_ns
    again = sources.sam_captions(str(jsonl), work, progress=False)  # unchanged source: not read again
    assert again.digest == store.digest and os.stat(os.path.join(work, cs.STORE_FILE)).st_mtime_ns == mtime
    jsonl.write_text('{"id": "sa_1", "caption": "changed"}\n')
    changed = sources.sam_captions(str(jsonl), work, progress=False)
    assert changed.caption("sa_1") == "changed" and changed.digest != store.digest


# ------------------------------------------------------------------------------------------------------------------
# JourneyDB
# ------------------------------------------------------------------------------------------------------------------


def jdb_archives(imgs, dest):
    """data/train/imgs/NNN.tgz with members NNN/<hash>.jpg, as JourneyDB ships them."""
    os.makedirs(dest, exist_ok=True)
    out = []
    for d in sorted(os.listdir(imgs)):
        files = {f"{d}/{f}": (imgs / d / f).read_bytes() for f in sorted(os.listdir(imgs / d))}
        out.append(pack(files, os.path.join(dest, f"{d}.tgz")))
    return out


@pytest.mark.parametrize("text", ["caption", "prompt"])
def test_journeydb_tgz_equal_extracted(fake_journeydb, tmp_path, run_cli, text):
    imgs, anno, _ = fake_journeydb
    ref = str(tmp_path / "ref")
    s_ref = convert.journeydb(str(imgs), annotations=str(anno), out=ref, text=text, workers=1, progress=False)
    # The download: data/train/imgs/NNN.tgz and data/train/train_anno_realease_repath.jsonl.tgz.
    train = tmp_path / "dl" / "data" / "train"
    jdb_archives(imgs, str(train / "imgs"))
    anno_tgz = pack({anno.name: anno.read_bytes()}, str(train / (anno.name + ".tgz")))
    out = str(tmp_path / "raw")
    p = run_cli("data", "journeydb", train, "--annotations", anno_tgz, "--out", out, "--text", text)
    assert p.returncode == 0, p.stderr
    s = read_summary(out)
    # Same samples and skips; only the location of the bad annotation line names the archive it was read from.
    rename = {"train_anno_realease_repath.jsonl:5": "train_anno_realease_repath.jsonl.tgz:"
                                                    "train_anno_realease_repath.jsonl:5"}
    s_ref = dict(s_ref, skips=[dict(x, id=rename.get(x["id"], x["id"])) for x in s_ref["skips"]])
    assert_same_conversion(out, ref, s, s_ref)
    assert s["archives"] == 2 and sorted(os.listdir(out)) == ["000", "001", "index.json"]
    key = f"used_{'prompt' if text == 'caption' else 'caption'}_as_fallback"
    assert s[key] == s_ref[key]
    check_layout(out)


def test_unreadable_archive_fails_alone_then_resumes(fake_journeydb, tmp_path, run_cli):
    """A truncated download: the other archives are converted and kept, the error names the broken one, and once
    it is replaced the same command finishes without redoing the others."""
    imgs, anno, _ = fake_journeydb
    dest = tmp_path / "imgs"
    good = jdb_archives(imgs, str(dest))
    whole = open(good[1], "rb").read()
    with open(good[1], "wb") as f:
        f.write(whole[: len(whole) // 2])
    out = str(tmp_path / "raw")
    p = run_cli("data", "journeydb", dest, "--annotations", anno, "--out", out, "--workers", "1")
    assert p.returncode == 2, p.stdout + p.stderr
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith("pixart-ds data: error: 1 of 2 archives could not be read: 001: ") and "001.tgz" in err
    assert sorted(os.listdir(out)) == ["000"] and not os.path.exists(os.path.join(out, "index.json"))
    with open(good[1], "wb") as f:
        f.write(whole)
    p = run_cli("data", "journeydb", dest, "--annotations", anno, "--out", out)
    assert p.returncode == 0, p.stderr
    s = read_summary(out)
    assert s["partitions_resumed"] == 1 and s["written"] == 3
    ref = str(tmp_path / "ref")
    convert.journeydb(str(imgs), annotations=str(anno), out=ref, workers=1, progress=False)
    assert samples(out) == samples(ref)


# ------------------------------------------------------------------------------------------------------------------
# Killed for real in the middle of an archive
# ------------------------------------------------------------------------------------------------------------------


def test_killed_mid_archive_resumes_without_duplicates(fake_sam, tmp_path):
    """`pixart-ds data sam` reads its second tar from a named pipe that delivers half the archive and then stalls;
    the process group is SIGKILLed once the first tar is committed. Nothing of the second tar counts; the rerun
    keeps the first, converts the second once, and equals an uninterrupted conversion."""
    root, caps, _ = fake_sam
    with open(caps, "a") as f:  # more images in the second tar, so its half holds written shards
        for i in range(20, 32):
            w, h = 80 + 2 * i, 64
            jpeg(str(root / "sa_000001" / f"sa_{i}.jpg"), w, h, seed=i)
            (root / "sa_000001" / f"sa_{i}.json").write_text(json.dumps({"image": {"width": w, "height": h}}))
            f.write(json.dumps({"id": f"sa_{i}", "caption": f"picture {i}"}) + "\n")
    dl = tmp_path / "dl"
    first, second = sam_tars(root, str(dl))
    data = open(second, "rb").read()
    os.remove(second)
    os.mkfifo(second)
    out = str(tmp_path / "raw")
    cmd = [sys.executable, "-m", "pixart_ds.cli", "data", "sam", str(dl), "--captions", str(caps), "--out", out,
           "--workers", "2", "--shard-size-limit", "4096"]
    log = open(tmp_path / "killed.log", "w+")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    fed = threading.Event()

    def feed():
        with open(second, "wb") as f:  # blocks until the converter opens the pipe
            f.write(data[: len(data) // 2])
            f.flush()
            fed.set()
            proc.wait()  # keep the pipe open (the reader stalls) until the converter is gone

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    committed = os.path.join(out, "sa_000000", "index.json")
    staged = out + ".partial/sa_000001"
    deadline = time.time() + 240
    while not (fed.is_set() and os.path.isfile(committed) and os.path.isdir(staged)
               and any(f.endswith(".mds") for f in os.listdir(staged))):
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.time() < deadline, "the converter never reached the middle of the second archive"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    feeder.join(timeout=10)
    log.close()
    # The first tar is committed, the half-read second one only in staging, no dataset index yet.
    assert sorted(os.listdir(out)) == ["sa_000000"] and not os.path.exists(os.path.join(out, "index.json"))

    os.remove(second)
    with open(second, "wb") as f:
        f.write(data)
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    s = read_summary(out)
    assert s["partitions_resumed"] == 1 and s["partitions"] == 2
    ids = [x["id"] for x in iter_samples(out)]
    assert len(ids) == len(set(ids)) == s["written"]  # no archive twice
    ref = str(tmp_path / "ref")
    s_ref = convert.sam(str(root), captions=str(caps), out=ref, workers=1, progress=False)
    assert_same_conversion(out, ref, s, s_ref)
    assert not os.path.exists(out + ".partial")
