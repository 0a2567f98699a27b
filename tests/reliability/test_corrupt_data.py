"""A corrupt shard met mid-epoch (2 ranks, real Streaming shards with xxh64 hashes in index.json).

A copy of the reference run's shards has bytes flipped in the shard that the run reaches last (first needed after the
step-5 checkpoint, known from the reference run's sample order).

- data.on_corrupt=stop (the default): every rank stops at the same step boundary, before training on the first
  global batch that holds a sample of that shard; one line names the shard file, the sample and the reason (checksum
  mismatch), and the latest checkpoint (step 5). Exit code 2 on every rank; no step is recorded past the last good
  one and no sample of the corrupt shard was trained on.
- The operator switches to data.on_corrupt=skip (an edit of the recipe: --allow-config-change) and resumes from step
  5: each sample of the corrupt shard is replaced by another sample of the same stream, chosen deterministically, and
  counted (data_skipped per step and data_skipped_total in metrics.jsonl, a warning per sample in the log). Every other
  sample of every global batch is the uninterrupted run's, in order; the corrupt shard's samples never appear.
"""
import json
import os
import shutil

from pixart_ds.testing import TINY_TEXT, describe, flip_bytes, read_metrics, run_train, shard_files

from .faults import (SUMMARY, count, fault, latest_tag, lost_and_duplicates, overrides, stderr_errors, steps_recomputed,
                     traceback_through_ours)


def _shard_ranges(stream_dir):
    """[(first sample index, end, file)] per shard, in index order."""
    with open(os.path.join(stream_dir, "index.json")) as f:
        shards = json.load(f)["shards"]
    out, lo = [], 0
    for s, path in zip(shards, shard_files(stream_dir)):
        out.append((lo, lo + s["samples"], path))
        lo += s["samples"]
    return out


def test_corrupt_shard_stops_naming_the_file_then_skip_counts(tmp_path, rel_shards, reference):
    from pixart_ds.train.trainer import DATA_ERROR_EXIT_CODE

    ref = reference["recs"]
    shards = str(tmp_path / "shards")
    shutil.copytree(rel_shards, shards)
    first_step = {}
    for lo, hi, path in _shard_ranges(shards):
        first_step[path] = min(s for s in ref if any(lo <= i < hi for i in ref[s]["sample_idx"]))
    bad_file = max(first_step, key=first_step.get)
    met = first_step[bad_file]
    assert met > 5, first_step  # reached after the step-5 checkpoint: mid-epoch, not at start-up
    lo, hi = next((lo, hi) for lo, hi, path in _shard_ranges(shards) if path == bad_file)
    bad = set(range(lo, hi))
    flip_bytes(bad_file)
    fault("corrupt_shard")

    # ---- on_corrupt=stop ----
    run = str(tmp_path / "run")
    args = overrides(run, shards)
    p = run_train(TINY_TEXT, args, launcher="torchrun")
    assert p.returncode != 0, describe(p)
    assert f"exitcode  : {DATA_ERROR_EXIT_CODE}" in p.stderr and not traceback_through_ours(p.stderr), describe(p)
    errs = stderr_errors(p.stderr)
    assert len(errs) == 1, describe(p)  # rank 0 speaks for every rank
    assert f"stopped before step {met}: rank " in errs[0] and f"in shard {bad_file}: " in errs[0], errs
    assert "xxh64 checksum does not match index.json" in errs[0] and "data.on_corrupt=stop" in errs[0], errs
    assert errs[0].endswith("latest checkpoint: step_00000005"), errs
    recs, events = read_metrics(run)
    assert max(recs) == met - 1 and [e["step"] for e in events if e["event"] == "corrupt_data"] == [met - 1]
    assert not bad & {i for r in recs.values() for i in r["sample_idx"]}  # nothing of that shard was trained on
    assert latest_tag(run) == "step_00000005"

    # ---- on_corrupt=skip, resumed from step 5 ----
    p = run_train(TINY_TEXT, args + ["data.on_corrupt=skip", "--allow-config-change"], launcher="torchrun")
    assert p.returncode == 0, describe(p)
    count("runs_resumed", 1)
    assert "skipping corrupt sample" in p.stderr and bad_file in p.stderr
    recs, events = read_metrics(run)
    assert [e["step"] for e in events if e["event"] == "resume"] == [5]
    assert sorted(recs) == list(range(1, 31))
    expected_total = 0
    for s in range(6, 31):
        want = sum(i in bad for i in ref[s]["sample_idx"])
        expected_total += want
        assert recs[s]["data_skipped"] == want, f"step {s}"
        assert recs[s]["data_skipped_total"] == expected_total, f"step {s}"
        got = recs[s]["sample_idx"]
        assert len(got) == 4 and not bad & set(got), f"step {s}: {got}"
        assert [g for g, r in zip(got, ref[s]["sample_idx"]) if r not in bad] == \
               [r for r in ref[s]["sample_idx"] if r not in bad], f"step {s}: order differs"
    assert expected_total >= 2  # once per epoch at least
    # Lost / duplicated among the samples that are not corrupt: none (the replacements are counted, not hidden).
    ref_ok = {s: {"sample_idx": [i for i in ref[s]["sample_idx"] if i not in bad]} for s in ref}
    got_ok = {s: {"sample_idx": [g for g, r in zip(recs[s]["sample_idx"], ref[s]["sample_idx"]) if r not in bad]}
              for s in recs}
    lost, dup = lost_and_duplicates(ref_ok, got_ok, range(1, 31))
    assert (lost, dup) == (0, 0)
    count("samples_lost", lost)
    count("duplicate_samples", dup)
    count("corrupt_samples_skipped", expected_total)
    count("steps_recomputed", steps_recomputed(run))
    SUMMARY["tests"]["corrupt_shard"] = {"shard": os.path.basename(bad_file), "first_met_at_step": met,
                                         "stop_exit_code": DATA_ERROR_EXIT_CODE, "resumed_from": 5,
                                         "skipped_and_counted": expected_total, "samples_lost": lost,
                                         "duplicate_samples": dup, "message": errs[0]}
