"""No space left while saving a checkpoint (2 ranks, real DeepSpeed).

RUN_DIR/checkpoints is a real 3 MiB tmpfs: the step-5 checkpoint (about 2 MiB: module + client state, two ZeRO-2
optimizer partitions) fits, the step-10 one does not. torch.save reports the full disk only as
`RuntimeError: [enforce fail at inline_container.cc] unexpected pos ...`; the ranks agree that the save failed, stop
with one line naming the checkpoint path and the free space, remove the half-written directory and leave `latest` at
step 5. After the disk grows (remount), the same command resumes from step 5 and ends exactly where the
uninterrupted run ends.

Without root (no `mount`), the same write failure is injected with a file-size limit (RLIMIT_FSIZE: writes past it
fail with EFBIG) on a second launch after a first one wrote the step-5 checkpoint.
"""
import os
import resource
import subprocess

from pixart_ds.testing import REPO, TINY_TEXT, clean_env, describe, read_metrics, run_train, train_cmd

from .faults import (SUMMARY, count, fault, latest_tag, lost_and_duplicates, overrides, stderr_errors, steps_recomputed,
                     traceback_through_ours)


def _mount_tmpfs(path: str, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True,
                       text=True)
    return p.returncode == 0


def _run_with_fsize_limit(args: list[str], limit: int) -> subprocess.CompletedProcess:
    def limit_writes():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(train_cmd(TINY_TEXT, args, launcher="torchrun"), capture_output=True, text=True,
                          timeout=300, env=clean_env(), cwd=REPO, preexec_fn=limit_writes)


def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, rel_shards, reference):
    run = str(tmp_path / "run")
    ck = os.path.join(run, "checkpoints")
    os.makedirs(ck)
    args = overrides(run, rel_shards, **{"checkpoint.keep_last": 1})
    tmpfs = not os.environ.get("PIXART_DS_TEST_NO_TMPFS") and _mount_tmpfs(ck, "3m")
    try:
        if tmpfs:
            p = run_train(TINY_TEXT, args, launcher="torchrun")
            fault("disk_full_tmpfs")
        else:  # fallback: a write limit instead of a full filesystem
            p = run_train(TINY_TEXT, args[:] + ["train.total_steps=5"], launcher="torchrun")
            assert p.returncode == 0, describe(p)
            p = _run_with_fsize_limit(args, 256 * 1024)
            fault("write_limit_efbig")
        assert p.returncode != 0, describe(p)
        errs = stderr_errors(p.stderr)
        # One line per rank that got to print it (torchrun tears the others down once the first has exited).
        assert 1 <= len(errs) <= 2, describe(p)
        assert not traceback_through_ours(p.stderr), describe(p)
        failed = os.path.join(ck, "step_00000010")
        for e in errs:
            assert f"checkpoint {failed} failed (" in e, e
            assert "the previous checkpoint (step_00000005) is intact" in e, e
        if tmpfs:
            assert any("no space left" in e and f"free on the filesystem of {ck}" in e for e in errs), errs
        assert "exitcode  : 2" in p.stderr  # the first rank out: the CLI's one-line error exit
        assert latest_tag(run) == "step_00000005"
        assert sorted(os.listdir(ck)) == ["latest", "step_00000005", "zero_to_fp32.py", "zero_to_torch.py"]
        assert os.path.isfile(os.path.join(ck, "step_00000005", "pixart_ds.json"))
        recs, events = read_metrics(run)
        assert max(recs) == 10 and [e["step"] for e in events if e["event"] == "checkpoint"] == [5]

        # ---- more space: the same command resumes from step 5 and matches the uninterrupted run ----
        if tmpfs:
            subprocess.run(["mount", "-o", "remount,size=16m", ck], check=True)
        p = run_train(TINY_TEXT, args, launcher="torchrun")
        assert p.returncode == 0, describe(p)
        count("runs_resumed", 1)
    finally:
        if tmpfs:
            subprocess.run(["umount", "-l", ck], capture_output=True)
    recs, events = read_metrics(run)
    assert [e["step"] for e in events if e["event"] == "resume"] == ([5] if tmpfs else [5, 5])
    ref = reference["recs"]
    assert sorted(recs) == list(range(1, 31))
    for s in range(1, 31):
        assert recs[s]["sample_idx"] == ref[s]["sample_idx"] and recs[s]["loss"] == ref[s]["loss"], f"step {s}"
    lost, dup = lost_and_duplicates(ref, recs, range(1, 31))
    assert (lost, dup) == (0, 0)
    count("samples_lost", lost)
    count("duplicate_samples", dup)
    count("steps_recomputed", steps_recomputed(run))
    SUMMARY["tests"]["disk_full"] = {"filesystem": "tmpfs 3 MiB" if tmpfs else "RLIMIT_FSIZE 256 KiB",
                                     "failed_save": "step_00000010", "resumed_from": 5, "samples_lost": lost,
                                     "duplicate_samples": dup, "message": errs[0]}
