"""Non-finite steps on 2 ranks (real DeepSpeed ZeRO-2, bf16), then a recipe edited between save and resume.

Rank 0's loss is made NaN (test hook PIXART_DS_INJECT_NAN_AT_STEP) at step 2 and at steps 7-9, with
train.max_nonfinite_steps=3. Step 2 is skipped (no update, no EMA update) and counted, and training goes on; three
in a row stop the run at step 9 with exit code 3 and one line naming the step, the first bad step and the latest
checkpoint, step 5, written before the first bad step (no checkpoint is written while non-finite steps run).

The operator lowers the learning rate and the clipping threshold and runs `pixart-ds train` again: refused before any
training, the changed keys listed with their old and new values. With --allow-config-change the run resumes from the
step-5 checkpoint and ends at step 30; its global batches are the uninterrupted run's, step for step (the data order
does not depend on skipped updates or on the edited keys): no sample lost or repeated.
"""
import os

from pixart_ds.testing import TINY_TEXT, describe, read_metrics, run_train

from .faults import (SUMMARY, count, fault, latest_tag, lost_and_duplicates, overrides, stderr_errors, steps_recomputed,
                     traceback_through_ours)


def test_nonfinite_steps_skip_then_stop_and_an_edited_recipe_is_refused_unless_allowed(tmp_path, rel_shards,
                                                                                       reference):
    from pixart_ds.train.trainer import NONFINITE_EXIT_CODE

    run = str(tmp_path / "run")
    args = overrides(run, rel_shards, **{"train.max_nonfinite_steps": 3})
    p = run_train(TINY_TEXT, args, launcher="torchrun", env={"PIXART_DS_INJECT_NAN_AT_STEP": "2,7-9"})
    fault("nonfinite_step", 4)
    assert p.returncode != 0, describe(p)
    assert f"exitcode  : {NONFINITE_EXIT_CODE}" in p.stderr, describe(p)
    errs = stderr_errors(p.stderr)
    assert len(errs) == 1 and not traceback_through_ours(p.stderr), describe(p)  # rank 0 speaks for all
    assert ("stopped at step 9: 3 consecutive non-finite steps (first at step 7; train.max_nonfinite_steps=3); "
            "latest checkpoint: step_00000005") in errs[0], errs
    recs, events = read_metrics(run)
    assert [s for s in sorted(recs) if recs[s]["skipped"]] == [2, 7, 8, 9]
    assert recs[2]["skipped_total"] == 1 and recs[9]["skipped_total"] == 4
    assert recs[2]["loss"] == "nan" and isinstance(recs[3]["loss"], float)  # went on after the isolated bad step
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [5]
    assert [e["step"] for e in events if e["event"] == "nonfinite"] == [9]
    assert latest_tag(run) == "step_00000005"
    count("nonfinite_steps_skipped", 4)

    # ---- the operator edits the recipe: refused, keys listed, nothing written ----
    edited = args + ["train.lr=5.0e-4", "train.grad_clip=0.005"]
    p = run_train(TINY_TEXT, edited)  # `pixart-ds train`, single process
    fault("recipe_edited")
    assert p.returncode == 2, describe(p)
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("pixart-ds train: error: ") and not traceback_through_ours(p.stderr), describe(p)
    assert ("the recipe changed since this checkpoint was written: train.grad_clip (0.01 -> 0.005), "
            "train.lr (0.001 -> 0.0005); pass --allow-config-change to resume anyway") in last, last
    assert os.path.join(run, "checkpoints", "step_00000005") in last
    assert latest_tag(run) == "step_00000005" and len(read_metrics(run)[1]) == len(events)

    # ---- --allow-config-change: resumes from step 5 with the new values and runs to the end ----
    p = run_train(TINY_TEXT, edited + ["--allow-config-change"], launcher="torchrun")
    assert p.returncode == 0, describe(p)
    count("runs_resumed", 1)
    recs, events = read_metrics(run)
    assert [e["step"] for e in events if e["event"] == "resume"] == [5]
    assert recs[6]["lr"] == 5.0e-4 and not any(recs[s]["skipped"] for s in range(6, 31))
    from pixart_ds import config as C

    saved = C.load(os.path.join(run, "config.yaml"))  # the resolved recipe of the latest start
    assert saved.train.lr == 5.0e-4 and saved.train.grad_clip == 0.005
    ref = reference["recs"]
    assert sorted(recs) == list(range(1, 31))
    assert all(recs[s]["sample_idx"] == ref[s]["sample_idx"] for s in range(1, 31))
    lost, dup = lost_and_duplicates(ref, recs, range(1, 31))
    assert (lost, dup) == (0, 0)
    count("samples_lost", lost)
    count("duplicate_samples", dup)
    count("steps_recomputed", steps_recomputed(run))
    SUMMARY["tests"]["nonfinite_and_recipe_edit"] = {
        "injected_nan_steps": [2, 7, 8, 9], "skipped_steps": [2, 7, 8, 9], "stopped_at": 9,
        "checkpoint_kept": 5, "refused_keys": ["train.grad_clip", "train.lr"], "resumed_from": 5,
        "samples_lost": lost, "duplicate_samples": dup, "message": errs[0], "refusal": last}
