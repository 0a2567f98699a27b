"""Exact resume (2 ranks, real DeepSpeed ZeRO-2, real Streaming):

- 30 steps uninterrupted vs. the same run killed with SIGKILL on every rank after step 17 (checkpoints every 5
  steps: the latest complete one is step 15), resumed with the same command and killed again INSIDE the save of
  step 20 (DeepSpeed's files written, our marker and `latest` not yet), then resumed once more: `latest` never names
  the half-written step 20, both resumes start at step 15, and the per-step losses, grad norms and global-batch
  sample ids, in order, equal the uninterrupted run's for all 30 steps (the 64-sample dataset rolls into its second
  epoch at step 17, so the resumes also cross an epoch boundary). Evaluation during training is on in every run
  (eval.every_steps 10: FID/KID with a random Inception, CLIP score, the judge): it must not change a single loss,
  and the resumed run's evaluation at step 30 equals the uninterrupted run's.
- Resuming the 2-rank step-15 checkpoint on 1 rank converts it to DeepSpeed's universal format by itself and
  continues with the same global batches (same sample ids per step) as the 2-rank runs.
"""
import os

import pytest

from eval_helpers import eval_overrides
from pixart_ds.testing import TINY_TEXT, describe, latest_tag, meta, read_metrics, run_train, write_text_shards

STEPS = 30
KILL_AT = 17


EVAL = []  # eval.* overrides, set by the fixture (they need the session's tiny T5 and VAE)


def _overrides(run_dir, shards, **extra):
    o = {"run_dir": run_dir, "data.sources": f"[{{local: {shards}}}]", "train.total_steps": STEPS,
         "train.global_batch_size": 4, "train.micro_batch_size": 2, "checkpoint.every_steps": 5,
         "checkpoint.keep_last": 10, "log.sample_ids": "true", "log.progress_bar": "false"}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()] + EVAL


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_t5_dir, tiny_vae_dir):
    base = tmp_path_factory.mktemp("resume")
    # rank 1 waits in the next step's collective while rank 0 evaluates: on a loaded 2-core machine the first
    # evaluation (loading the random Inception and CLIP, the reference's features) can take minutes
    EVAL[:] = eval_overrides(str(base), tiny_t5_dir, tiny_vae_dir, every=10, images=2) + \
        ["train.collective_timeout_s=900"]
    shards = write_text_shards(str(base / "shards"), n=64)
    full, killed = str(base / "full"), str(base / "killed")
    p = run_train(TINY_TEXT, _overrides(full, shards), launcher="torchrun")
    assert p.returncode == 0, describe(p)
    p = run_train(TINY_TEXT, _overrides(killed, shards), launcher="torchrun",
                  env={"PIXART_DS_TEST_KILL_AT_STEP": str(KILL_AT)})
    assert p.returncode != 0, "the kill hook did not fire"
    assert "SIGKILL" in p.stderr or "Signal 9" in p.stderr or "-9" in p.stderr, describe(p)
    recs, _ = read_metrics(killed)
    assert max(recs) == KILL_AT and latest_tag(killed) == "step_00000015"
    # first resume: killed again, this time inside the save of step 20 (files written, marker and `latest` not)
    p = run_train(TINY_TEXT, _overrides(killed, shards), launcher="torchrun",
                  env={"PIXART_DS_TEST_KILL_IN_SAVE_AT_STEP": "20"})
    assert p.returncode != 0, "the kill-in-save hook did not fire"
    assert latest_tag(killed) == "step_00000015"  # the half-written step 20 is never taken as latest
    partial = os.path.join(killed, "checkpoints", "step_00000020")
    assert os.path.isfile(os.path.join(partial, "mp_rank_00_model_states.pt"))
    assert not os.path.exists(os.path.join(partial, "pixart_ds.json"))
    # second resume: from step 15 again, to the end
    p = run_train(TINY_TEXT, _overrides(killed, shards), launcher="torchrun")
    assert p.returncode == 0, describe(p)
    return {"shards": shards, "full": full, "killed": killed, "base": base}


def test_kill_and_resume_is_exact(runs):
    full, _ = read_metrics(runs["full"])
    resumed, events = read_metrics(runs["killed"])
    assert sorted(full) == sorted(resumed) == list(range(1, STEPS + 1))
    res = [e for e in events if e["event"] == "resume"]
    assert [e["step"] for e in res] == [15, 15] and not any(e["universal"] for e in res)
    for s in range(1, STEPS + 1):
        a, b = full[s], resumed[s]
        assert a["sample_idx"] == b["sample_idx"], f"step {s}: sample order differs"
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a["lr"] == b["lr"], \
            f"step {s}: {a['loss']} vs {b['loss']}"
    ids = [i for s in range(1, STEPS + 1) for i in full[s]["sample_idx"]]
    assert len(full[1]["sample_idx"]) == 4
    assert sorted(ids[:64]) == list(range(64))  # epoch 1: every sample once, none lost or repeated
    assert len(set(ids[64:])) == len(ids[64:])  # epoch 2 so far: no repeats
    # evaluation ran in both (and once more in the killed run before its kill) and saw the same weights at step 30
    ev_full = {e["step"]: e for e in read_metrics(runs["full"])[1] if e["event"] == "eval"}
    ev_res = {e["step"]: e for e in events if e["event"] == "eval"}
    assert sorted(ev_full) == [10, 20, 30] and sorted(ev_res) == [10, 20, 30]
    for k in ("fid", "kid", "clip_score", "alignment"):
        assert ev_full[30][k] == ev_res[30][k], k
    # the final checkpoints agree too (same step, same images seen)
    assert meta(runs["full"], "step_00000030")["images_seen"] == meta(runs["killed"], "step_00000030")["images_seen"]


def test_resume_on_one_rank_continues_the_same_sample_order(runs):
    one = str(runs["base"] / "one_rank")
    src = os.path.join(runs["killed"], "checkpoints", "step_00000015")
    p = run_train(TINY_TEXT, _overrides(one, runs["shards"], **{"train.resume": src, "train.total_steps": 22}))
    assert p.returncode == 0, describe(p)
    assert os.path.isdir(src + "_universal")  # converted by itself
    recs, events = read_metrics(one)
    res = [e for e in events if e["event"] == "resume"][0]
    assert res["universal"] is True and res["saved_world_size"] == 2 and res["world_size"] == 1
    full, _ = read_metrics(runs["full"])
    assert sorted(recs) == list(range(16, 23))
    for s in range(16, 23):
        assert sorted(recs[s]["sample_idx"]) == sorted(full[s]["sample_idx"]), f"step {s}"
    m = meta(one, "step_00000022")
    assert m["world_size"] == 1 and m["images_seen"] == 22 * 4


def test_latest_marker_and_pruning(tmp_path):
    """The bookkeeping alone (no DeepSpeed): incomplete directories are never `latest`, pruning keeps the last K
    complete checkpoints (+ `latest`), drops universal copies of removed ones and interrupted saves."""
    import json

    from pixart_ds.fsutil import atomic_write_text
    from pixart_ds.train import checkpoint as ck

    root = tmp_path / "checkpoints"
    root.mkdir()

    def make(step, complete=True):
        d = root / ck.tag_for(step)
        d.mkdir()
        (d / ck.MODEL_STATES).write_bytes(b"x")
        if complete:
            (d / ck.META).write_text(json.dumps({"step": step, "world_size": 2}))
        return d

    assert ck.read_latest(str(root)) is None
    for s in (1, 2, 3):
        make(s)
    make(4, complete=False)  # a save that was killed
    (root / "step_00000001_universal").mkdir()
    atomic_write_text(str(root / ck.LATEST), "step_00000003")
    assert ck.read_latest(str(root)) == "step_00000003"
    assert ck.complete_tags(str(root)) == ["step_00000001", "step_00000002", "step_00000003"]
    removed = ck.prune(str(root), keep_last=2)
    assert sorted(os.path.basename(r) for r in removed) == ["step_00000001", "step_00000001_universal",
                                                            "step_00000004"]
    assert ck.find_checkpoint(str(tmp_path), "train.resume") == (str(root), "step_00000003")
    atomic_write_text(str(root / ck.LATEST), "step_00000009")
    with pytest.raises(ck.CheckpointError, match="missing or incomplete"):
        ck.read_latest(str(root))
    with pytest.raises(ck.CheckpointError, match="incomplete checkpoint"):
        ck.find_checkpoint(str(make(5, complete=False)), "train.resume")
    assert not [f for f in os.listdir(root) if f.startswith(".")]  # no temp files left
