"""Helpers for the Slurm tests (tests/test_slurm.py, tests/test_multinode.py): submit the sbatch files unmodified,
read job state from Slurm itself (`scontrol show job`; no accounting daemon), follow a run's metrics.jsonl."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def sbatch(script: str, *options: str, variables: dict | None = None, args=(), cwd=REPO) -> int:
    """Submit slurm/SCRIPT unmodified with command-line options; returns the job id."""
    export = "ALL" + "".join(f",{k}={v}" for k, v in (variables or {}).items())
    cmd = ["sbatch", "--parsable", f"--export={export}", *options, os.path.join(REPO, "slurm", script), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=60)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stderr}"
    return int(p.stdout.strip().split(";")[0])


def job_info(job_id: int) -> dict:
    """`scontrol show job -o ID` as a dict (JobState, ExitCode, Restarts, Dependency, Command, ...)."""
    p = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, f"job {job_id} unknown to Slurm: {p.stderr}"
    info = {}
    for tok in p.stdout.split():
        k, _, v = tok.partition("=")
        if v or k not in info:
            info[k] = v
    return info


def wait_job(job_id: int, timeout: float, log: str | None = None, states=TERMINAL) -> dict:
    deadline = time.time() + timeout
    while True:
        info = job_info(job_id)
        if info["JobState"] in states:
            return info
        if time.time() > deadline:
            subprocess.run(["scancel", str(job_id)])
            tail = open(log).read()[-3000:] if log and os.path.exists(log) else ""
            pytest.fail(f"job {job_id} still {info['JobState']} after {timeout:.0f}s\n{tail}")
        time.sleep(0.5)


def read_log(path: str) -> str:
    with open(path) as f:
        return f.read()


def steps_done(metrics: str) -> int:
    """The highest step record in a metrics.jsonl being written (a torn last line is skipped)."""
    best = 0
    if os.path.exists(metrics):
        for line in open(metrics):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "event" not in rec:
                best = max(best, int(rec["step"]))
    return best
