"""Fault-injection helpers for the reliability tests: launch `pixart-ds train` under torchrun (2 CPU ranks, real
DeepSpeed and Streaming), find each rank's process, wait for a step, end a job, and count lost and duplicated
samples from the `sample_idx` records of metrics.jsonl (log.sample_ids=true)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter

from pixart_ds.testing import REPO, TINY_TEXT, clean_env, train_cmd, worker_pids

# Figures reported at the end of the session (conftest.pytest_terminal_summary) and written to JSON.
SUMMARY: dict = {"faults_injected": {}, "runs_resumed": 0, "samples_lost": 0, "duplicate_samples": 0,
                 "steps_recomputed": 0, "nonfinite_steps_skipped": 0, "corrupt_samples_skipped": 0,
                 "recipes_fuzzed": 0, "tests": {}}


def fault(kind: str, n: int = 1) -> None:
    SUMMARY["faults_injected"][kind] = SUMMARY["faults_injected"].get(kind, 0) + n


def count(key: str, n: int) -> None:
    SUMMARY[key] += n


def overrides(run_dir: str, shards: str, **extra) -> list[str]:
    """The tiny text recipe at 2 ranks: global batch 4 (micro 2, no accumulation), 64 samples = 16 steps per epoch,
    a checkpoint every 5 steps, every step's global-batch sample ids recorded."""
    o = {"run_dir": run_dir, "data.sources": f"[{{local: {shards}}}]", "train.total_steps": 30,
         "train.global_batch_size": 4, "train.micro_batch_size": 2, "checkpoint.every_steps": 5,
         "checkpoint.keep_last": 10, "log.sample_ids": "true", "log.progress_bar": "false"}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def launch(args: list[str], env: dict | None = None, recipe: str = TINY_TEXT) -> subprocess.Popen:
    """torchrun, 2 ranks, in its own session (so a test can always end the whole job)."""
    return subprocess.Popen(train_cmd(recipe, args, launcher="torchrun"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env(env), cwd=REPO, start_new_session=True)


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's workers (torchrun starts each in a session of its own) and the launcher."""
    for pid in worker_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """Wait for the job; on timeout kill it and fail (a hang is the bug these tests look for)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        out, err = proc.communicate()
        raise AssertionError(f"the job did not end within {timeout:.0f} s\n--- stderr ---\n{err[-6000:]}") from None
    return proc.returncode, out, err


def metrics_lines(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):  # a line being written is skipped until complete
                out.append(json.loads(line))
    return out


def wait_for_step(run_dir: str, step: int, proc: subprocess.Popen, after_line: int = 0, timeout: float = 240) -> int:
    """Block until this launch (lines after `after_line`) has logged `step`; returns the step logged last."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        recs = [r for r in metrics_lines(run_dir)[after_line:] if "loss" in r]
        if recs and recs[-1]["step"] >= step:
            return recs[-1]["step"]
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before step {step}:\n"
                                 f"{proc.communicate()[1][-4000:]}")
        time.sleep(0.02)
    kill_job(proc)
    raise AssertionError(f"step {step} not reached within {timeout} s")


def rank_pids(proc: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the training processes under a torchrun launcher."""
    out = {}
    for pid in worker_pids(proc.pid):
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        out[int(env[b"RANK"])] = pid
    return out


def latest_tag(run_dir: str) -> str:
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        return f.read().strip()


def step_of(tag: str) -> int:
    return int(tag.split("_")[1])


def lost_and_duplicates(ref: dict, recs: dict, steps) -> tuple[int, int]:
    """Samples the uninterrupted run trained on in `steps` that this run did not (lost), and samples this run trained
    on more often than the uninterrupted one (duplicates). Each step counts once, with its last record: the state a
    resumed run continues from (steps redone after a resume replace the lost ones)."""
    want = Counter(i for s in steps for i in ref[s]["sample_idx"])
    got = Counter(i for s in steps if s in recs for i in recs[s]["sample_idx"])
    return sum((want - got).values()), sum((got - want).values())


def steps_recomputed(run_dir: str) -> int:
    """Step records beyond one per step: work redone after resumes (steps since the last checkpoint)."""
    steps = [r["step"] for r in metrics_lines(run_dir) if "loss" in r]
    return len(steps) - len(set(steps))


def traceback_through_ours(err: str) -> list[str]:
    """Traceback lines through pixart_ds (torchrun prints its own ChildFailedError traceback: that one is fine)."""
    return [ln for ln in err.splitlines() if re.search(r'File ".*/pixart_ds/', ln)]


def stderr_errors(err: str) -> list[str]:
    return [ln[ln.index("pixart-ds train: error:"):] for ln in err.splitlines() if "pixart-ds train: error:" in ln]
