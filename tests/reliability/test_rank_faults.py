"""A 30-step run on 2 ranks (torchrun, real DeepSpeed ZeRO-2 and Streaming) meets four process faults in a row and
still ends exactly where the uninterrupted run ends.

1. Rank 1 is SIGKILLed mid-run (a node failure, the OOM killer): the job ends within the recipe's collective timeout;
   torchrun's summary names rank 1 (local_rank 1, SIGKILL) and rank 0 says it lost contact, naming rank 1 as exited.
   `latest` is the last complete checkpoint.
2. Resumed with the same command, rank 1 is SIGSTOPped (a hung node: alive, silent, its sockets still open). Rank 0's
   collective fails after train.collective_timeout_s (20 s here; DeepSpeed's gradient-reduction group used to wait
   torch's 30-minute default whatever the recipe said) with a message naming rank 1 as stopped; torchrun then ends
   the job (SIGKILL after its 30 s shutdown grace). No silent hang.
3. Resumed again, rank 1 hangs between steps 16 and 17, at the epoch boundary (SIGSTOP through the test hook
   PIXART_DS_TEST_STOP_RANK_BEFORE_STEP): rank 0 then waits in Streaming's shared-memory barrier of the new epoch,
   which has no timeout at all; the trainer's fetch watchdog ends it after train.collective_timeout_s (10 s here),
   naming rank 1 as stopped. (The test then kills rank 1 rather than wait for torchrun's grace again.)
4. Resumed again, every rank is SIGKILLed inside a checkpoint save after DeepSpeed wrote its files (test hook
   PIXART_DS_TEST_KILL_IN_SAVE_AT_STEP): `latest` stays at the previous checkpoint; the half-written directory is
   never loaded and is replaced by the next save of that step.
5. Resumed a fourth time, to the end.

Per-step losses, grad norms, lr and global-batch sample ids of the final record of every step equal the
uninterrupted run's for all 30 steps (the 64-sample epoch rolls over at step 16): no sample lost or repeated.
"""
import os
import signal
import time

from pixart_ds.testing import read_metrics

from .faults import (SUMMARY, count, fault, finish, latest_tag, launch, lost_and_duplicates, metrics_lines, overrides,
                     rank_pids, stderr_errors, step_of, steps_recomputed, wait_for_step)

TIMEOUT_S = 20  # train.collective_timeout_s of these runs
# torchrun's SIGTERM -> SIGKILL wait when it tears a failed group down: 30 s, fixed on this path in torch 2.14
# (LocalElasticAgent._stop_workers; --shutdown-timeout applies only when the agent itself is signalled). A stopped
# process ignores SIGTERM until continued, so the hung job below ends only at the SIGKILL.
TORCHRUN_GRACE_S = 30


def _events(run_dir, after):
    return [r for r in metrics_lines(run_dir)[after:] if "event" in r]


def test_dead_and_hung_ranks_and_a_killed_save_resume_exactly(tmp_path, rel_shards, reference):
    run = str(tmp_path / "run")
    args = overrides(run, rel_shards, **{"train.collective_timeout_s": TIMEOUT_S})
    figures = {}

    # ---- 1. SIGKILL rank 1 mid-run ----
    proc = launch(args)
    wait_for_step(run, 7, proc)
    pids = rank_pids(proc)
    assert sorted(pids) == [0, 1]
    t0 = time.time()
    os.kill(pids[1], signal.SIGKILL)
    fault("rank_sigkill")
    rc, _, err = finish(proc, TIMEOUT_S + TORCHRUN_GRACE_S + 30)
    figures["sigkill_job_end_s"] = round(time.time() - t0, 1)
    assert rc != 0
    assert figures["sigkill_job_end_s"] <= TIMEOUT_S, figures
    assert "local_rank: 1" in err and "SIGKILL" in err, err[-4000:]  # torchrun's summary: the failed rank
    ours = stderr_errors(err)
    assert ours and "rank 0 lost contact with the other ranks" in ours[0], err[-4000:]
    assert f"rank 1 (pid {pids[1]}) has exited" in ours[0], ours
    figures["sigkill_message"] = ours[0]
    l1 = step_of(latest_tag(run))
    assert l1 >= 5 and l1 % 5 == 0 and f"latest checkpoint: step_{l1:08d}" in ours[0], ours

    # ---- 2. resume; SIGSTOP rank 1: a hung rank must not hang the job ----
    start = len(metrics_lines(run))
    proc = launch(args)
    wait_for_step(run, l1 + 3, proc, after_line=start)
    pids = rank_pids(proc)
    t0 = time.time()
    os.kill(pids[1], signal.SIGSTOP)
    fault("rank_hang")
    count("runs_resumed", 1)
    try:
        rc, _, err = finish(proc, TIMEOUT_S + TORCHRUN_GRACE_S + 60)
    finally:
        try:
            os.kill(pids[1], signal.SIGKILL)
        except ProcessLookupError:
            pass
    figures["hang_job_end_s"] = round(time.time() - t0, 1)
    lost = [e for e in _events(run, start) if e["event"] == "rank_lost"]
    assert len(lost) == 1, err[-4000:]
    figures["hang_detected_s"] = round(lost[0]["time"] - t0, 1)
    assert TIMEOUT_S - 5 <= figures["hang_detected_s"] <= TIMEOUT_S + 15, figures
    assert figures["hang_job_end_s"] <= TIMEOUT_S + TORCHRUN_GRACE_S + 20, figures
    assert lost[0]["lost_ranks"] == [1]
    ours = stderr_errors(err)
    assert ours and f"rank 1 (pid {pids[1]}) is stopped and does not answer" in ours[0], err[-4000:]
    assert "Timed out" in ours[0] and f"train.collective_timeout_s={TIMEOUT_S}" in ours[0], ours
    figures["hang_message"] = ours[0]
    assert "local_rank: 0" in err and "exitcode  : 4" in err  # torchrun: rank 0 ended with LOST_RANK_EXIT_CODE
    l2 = step_of(latest_tag(run))
    assert l1 <= l2 <= 15

    # ---- 3. resume; rank 1 hangs before step 17: rank 0 waits in Streaming's epoch barrier, not in torch ----
    start = len(metrics_lines(run))
    fetch_timeout = 10
    proc = launch(overrides(run, rel_shards, **{"train.collective_timeout_s": fetch_timeout}),
                  env={"PIXART_DS_TEST_STOP_RANK_BEFORE_STEP": "17:1"})
    wait_for_step(run, 16, proc, after_line=start)
    pids = rank_pids(proc)
    fault("rank_hang_epoch_boundary")
    count("runs_resumed", 1)
    deadline = time.time() + fetch_timeout + 60
    while not [e for e in _events(run, start) if e["event"] == "rank_lost"] and time.time() < deadline:
        time.sleep(0.1)
    lost = [e for e in _events(run, start) if e["event"] == "rank_lost"]
    stopped_at = next(r["time"] for r in metrics_lines(run)[start:] if r.get("step") == 16 and "loss" in r)
    try:
        os.kill(pids[1], signal.SIGKILL)  # torchrun's 30 s grace for a stopped rank was measured above
    except (KeyError, ProcessLookupError):
        pass
    rc, _, err = finish(proc, 120)
    assert len(lost) == 1, err[-4000:]
    figures["epoch_boundary_hang_detected_s"] = round(lost[0]["time"] - stopped_at, 1)
    assert fetch_timeout - 1 <= figures["epoch_boundary_hang_detected_s"] <= fetch_timeout + 15, figures
    ours = stderr_errors(err)
    assert ours and f"rank 0 waited more than train.collective_timeout_s={fetch_timeout} s for the data of step 17" \
        in ours[0] and "rank 1 (pid " in ours[0] and "is stopped and does not answer" in ours[0], err[-4000:]
    figures["epoch_boundary_hang_message"] = ours[0]
    l3 = step_of(latest_tag(run))
    assert l3 == 15

    # ---- 4. resume; every rank dies inside the save of step l3 + 10 ----
    start = len(metrics_lines(run))
    kill_at = l3 + 10
    p = finish(launch(args, env={"PIXART_DS_TEST_KILL_IN_SAVE_AT_STEP": str(kill_at)}), 300)
    fault("kill_in_save")
    count("runs_resumed", 1)
    assert p[0] != 0
    assert latest_tag(run) == f"step_{l3 + 5:08d}"  # the half-written save is never taken as latest
    partial = os.path.join(run, "checkpoints", f"step_{kill_at:08d}")
    assert os.path.isfile(os.path.join(partial, "mp_rank_00_model_states.pt"))
    assert not os.path.exists(os.path.join(partial, "pixart_ds.json"))

    # ---- 5. resume to the end ----
    start4 = len(metrics_lines(run))
    rc, _, err = finish(launch(args), 300)
    count("runs_resumed", 1)
    assert rc == 0, err[-4000:]
    assert os.path.isfile(os.path.join(partial, "pixart_ds.json"))  # step kill_at redone and complete now
    resumes = [e["step"] for e in _events(run, 0) if e["event"] == "resume"]
    assert resumes == [l1, l2, l3, l3 + 5]
    assert not [e for e in _events(run, start4) if e["event"] in ("rank_lost", "nonfinite", "corrupt_data")]

    ref = reference["recs"]
    recs, _ = read_metrics(run)
    assert sorted(recs) == list(range(1, 31))
    for s in range(1, 31):
        a, b = ref[s], recs[s]
        assert a["sample_idx"] == b["sample_idx"], f"step {s}: sample order differs"
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"]), f"step {s}"
    lost_n, dup_n = lost_and_duplicates(ref, recs, range(1, 31))
    assert (lost_n, dup_n) == (0, 0)
    count("samples_lost", lost_n)
    count("duplicate_samples", dup_n)
    count("steps_recomputed", steps_recomputed(run))
    figures.update(resumed_from=resumes, steps_recomputed=steps_recomputed(run), samples_lost=lost_n,
                   duplicate_samples=dup_n)
    SUMMARY["tests"]["rank_faults"] = figures


def test_fetch_watchdog_ends_a_stalled_wait_and_stays_quiet_otherwise():
    """The watchdog alone, in a subprocess: a fetch that returns in time leaves no trace; one that does not ends the
    process with LOST_RANK_EXIT_CODE and the one-line message, also with a single process (a hung filesystem)."""
    import subprocess
    import sys

    code = ("import time\nfrom pixart_ds.train.resilience import FetchWatchdog as _FetchWatchdog\n"
            "with _FetchWatchdog(5, lambda: 'never'):\n    pass\n"
            "with _FetchWatchdog(1, lambda: 'stuck fetch'):\n    time.sleep(60)\n")
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 4 and p.stderr.strip().splitlines()[-1] == "pixart-ds train: error: stuck fetch", p.stderr
    assert "never" not in p.stderr and time.time() - t0 < 50
