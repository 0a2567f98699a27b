"""`pixart-ds caption`: a tiny random LLaVA captions a small raw MDS on 2 ranks, survives a kill, and resumes."""
import glob
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pixart_ds.data import recaption as C
from pixart_ds.data.schema import RAW_COLUMNS, iter_samples, num_samples
from pixart_ds.dist import launch_ranks
from pixart_ds.testing import make_tiny_llava
from pixart_ds.train.faults import CAPTION_KILL_AFTER_BATCHES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD_ID = "img_0005"  # its bytes are not an image


def _png(seed: int, h: int, w: int) -> bytes:
    from PIL import Image

    arr = np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_raw_mds(root: str, n: int, bad_ids=(), compression=None, size_limit=1 << 12) -> list[str]:
    """A raw MDS (RAW_COLUMNS) of n small PNGs, several shards; ids in `bad_ids` get bytes that are no image."""
    from streaming import MDSWriter

    ids = []
    with MDSWriter(out=root, columns=RAW_COLUMNS, compression=compression, size_limit=size_limit) as w:
        for i in range(n):
            sid = f"img_{i:04d}"
            h, w_ = 20 + i, 24 + 2 * i
            data = b"\x89PNG\r\n\x1a\n truncated" if sid in bad_ids else _png(i, h, w_)
            w.write({"id": sid, "image": data, "caption": "", "label": -1, "width": w_, "height": h,
                     "source": "synthetic"})
            ids.append(sid)
    return ids


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return make_tiny_llava(str(tmp_path_factory.mktemp("tiny_llava")))


@pytest.fixture(scope="module")
def raw_mds(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("raw") / "mds")
    ids = write_raw_mds(root, 10, bad_ids=(BAD_ID,), compression="zstd")
    return root, ids


def _torchrun(*args, env=None, timeout=300):
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e.update(env or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pixart_ds.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=REPO)


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(ln) for ln in f]


def test_raw_mds_helper_reads_back_in_order(raw_mds):
    root, ids = raw_mds
    assert len(glob.glob(os.path.join(root, "shard.*.mds.zstd"))) >= 2  # the slices cross shard boundaries
    assert num_samples(root) == 10
    assert [s["id"] for s in iter_samples(root, columns=("id", "image"))] == ids
    assert [s["id"] for s in iter_samples(root, 3, 7, columns=("id", "image"))] == ids[3:7]


def test_two_ranks_killed_then_resumed(tiny_llava, raw_mds, tmp_path, capfd):
    root, ids = raw_mds
    good = [i for i in ids if i != BAD_ID]
    out = tmp_path / "caps"
    args = ["caption", "--in", root, "--out", out, "--model", tiny_llava, "--batch-size", "2",
            "--max-new-tokens", "6"]

    # Run 1: every rank SIGKILLs itself after writing its first batch (torchrun then stops the other rank).
    p = _torchrun(*args, env={CAPTION_KILL_AFTER_BATCHES: "1"})
    assert p.returncode != 0, p.stderr[-2000:]
    assert not (out / "captions.jsonl").exists()
    first = [r for f in sorted(glob.glob(str(out / "part-*.jsonl"))) for r in _lines(f)]
    assert 0 < len(first) < len(good), p.stderr[-2000:]

    # A write torn by the kill: half a record without its newline at the end of rank 0's part file.
    with open(out / "part-00000.jsonl", "a") as f:
        f.write('{"id": "img_0001", "caption": "a half-writ')

    # Run 2 resumes: only the rest is captioned, the torn line is dropped, nothing is captioned twice.
    p = _torchrun(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    parts = [r for f in sorted(glob.glob(str(out / "part-*.jsonl"))) for r in _lines(f)]  # every line parses
    part_ids = [r["id"] for r in parts]
    assert sorted(part_ids) == good  # each decodable image exactly once across both runs
    assert {r["id"]: r["caption"] for r in first}.items() <= {r["id"]: r["caption"] for r in parts}.items()

    merged = _lines(out / "captions.jsonl")
    assert [r["id"] for r in merged] == good  # ordered by id
    for r in merged:
        assert set(r) == {"id", "caption", "model", "prompt"}
        assert r["prompt"] == C.PAPER_PROMPT and r["model"] == os.path.basename(tiny_llava)
        assert isinstance(r["caption"], str)
    skipped = _lines(out / "skipped.jsonl")
    assert [r["id"] for r in skipped] == [BAD_ID] and skipped[0]["reason"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["samples"], summary["captioned"], summary["skipped"]) == (10, 9, 1)

    # The captions equal an uninterrupted single-process run's (greedy decoding; the world size does not matter).
    single = tmp_path / "single"
    assert C.caption_mds(root, str(single), tiny_llava, batch_size=4, max_new_tokens=6) == 0
    assert _lines(single / "captions.jsonl") == merged

    # A third run (one process now) finds nothing to do and writes the same merged file again.
    os.remove(out / "captions.jsonl")
    assert C.caption_mds(root, str(out), tiny_llava, batch_size=2, max_new_tokens=6) == 0
    assert "0 captioned, 0 skipped, 10 already done" in capfd.readouterr().err
    assert _lines(out / "captions.jsonl") == merged


def test_other_run_in_same_out_is_refused(tiny_llava, raw_mds, tmp_path, run_cli):
    root, _ = raw_mds
    out = tmp_path / "caps"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"input": os.path.abspath(root), "samples": 10,
                                              "model": os.path.basename(tiny_llava), "prompt": "Say hi",
                                              "max_new_tokens": 6}))
    p = run_cli("caption", "--in", root, "--out", out, "--model", tiny_llava, "--max-new-tokens", "6")
    assert p.returncode == 2
    assert "run.json belongs to another captioning run" in p.stderr and "Say hi" in p.stderr


def test_not_llava_folder_is_one_line_error(tiny_t5_dir, raw_mds, tmp_path, run_cli):
    root, _ = raw_mds
    p = run_cli("caption", "--in", root, "--out", tmp_path / "o", "--model", tiny_t5_dir)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1, p.stderr
    assert err[0].startswith("pixart-ds caption: error:") and tiny_t5_dir in err[0] and "model_type 't5'" in err[0]

    empty = tmp_path / "not_a_model"
    empty.mkdir()
    (empty / "weights.bin").write_bytes(b"")
    p = run_cli("caption", "--in", root, "--out", tmp_path / "o", "--model", empty)
    assert p.returncode == 2 and "no config.json (found: weights.bin)" in p.stderr

    p = run_cli("caption", "--in", tmp_path / "nowhere", "--out", tmp_path / "o", "--model", empty)
    assert p.returncode == 2 and "not a LLaVA model folder" in p.stderr  # the model is checked first


def test_missing_input_index_is_one_line_error(tiny_llava, tmp_path, run_cli):
    p = run_cli("caption", "--in", tmp_path / "nowhere", "--out", tmp_path / "o", "--model", tiny_llava)
    assert p.returncode == 2 and "raw MDS index not found" in p.stderr and "nowhere" in p.stderr


def test_torn_tail_dropped_and_cut_corruption_named(tmp_path):
    p = tmp_path / "part-00000.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "cap')
    assert [r["id"] for r in C.read_jsonl(str(p))] == ["a", "b"]
    assert p.read_text().endswith("cap")  # reading alone never changes the file
    assert [r["id"] for r in C.read_jsonl(str(p), repair=True)] == ["a", "b"]
    assert p.read_text() == '{"id": "a"}\n{"id": "b"}\n'

    p.write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(ValueError, match=r"part-00000.jsonl:2: not a JSON record"):
        C.read_jsonl(str(p))


def test_caption_ranks_from_launchers():
    """Captioning needs no process group: dist.launch_ranks reads torchrun's or srun's variables."""
    assert launch_ranks({}) == (0, 1, 0)
    assert launch_ranks({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    assert launch_ranks({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}) == (5, 8, 1)
    with pytest.raises(ValueError, match="outside world size"):
        launch_ranks({"RANK": "2", "WORLD_SIZE": "2"})


def test_ids_order_naturally():
    assert sorted(["sa_10", "sa_2", "sa_1"], key=C._natural_key) == ["sa_1", "sa_2", "sa_10"]


def test_sam_round_trip_through_data_sam(tiny_llava, tmp_path):
    """SA-1B folder -> raw MDS without captions -> caption -> `data sam --captions captions.jsonl` joins them."""
    from pixart_ds.data import convert

    root = tmp_path / "sa1b"
    root.mkdir()
    for i in (1, 2, 10):
        (root / f"sa_{i}.jpg").write_bytes(_jpeg(i))
    raw, capdir, joined = str(tmp_path / "raw"), str(tmp_path / "caps"), str(tmp_path / "joined")
    convert.sam(str(root), captions=None, out=raw, workers=1, progress=False)
    assert C.caption_mds(raw, capdir, tiny_llava, batch_size=2, max_new_tokens=6) == 0
    caps = _lines(os.path.join(capdir, "captions.jsonl"))
    assert [r["id"] for r in caps] == ["sa_1", "sa_2", "sa_10"]
    assert all(r["caption"] for r in caps)  # data sam treats an empty caption as a missing one
    convert.sam(str(root), captions=os.path.join(capdir, "captions.jsonl"), out=joined, workers=1, progress=False)
    got = {s["id"]: s["caption"] for s in iter_samples(joined, columns=("id", "caption"))}
    assert got == {r["id"]: r["caption"] for r in caps}


def _jpeg(seed: int) -> bytes:
    from PIL import Image

    arr = np.random.RandomState(seed).randint(0, 256, (18, 26, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.gpu
def test_caption_on_cuda_fp16(tiny_llava, raw_mds, tmp_path):
    """The GPU path: the model runs in fp16 on cuda:LOCAL_RANK; every decodable image still gets one caption."""
    root, ids = raw_mds
    out = tmp_path / "gpu"
    assert C.caption_mds(root, str(out), tiny_llava, batch_size=4, max_new_tokens=6) == 0
    merged = _lines(out / "captions.jsonl")
    assert [r["id"] for r in merged] == [i for i in ids if i != BAD_ID]
    assert all(isinstance(r["caption"], str) for r in merged)
