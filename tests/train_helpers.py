"""Helpers for trainer tests: tiny shards, `pixart-ds train` under each launcher, metrics readers."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPO, "tests", "recipes")
TINY_TEXT = os.path.join(RECIPES, "tiny_text.yaml")
TINY_CLASS = os.path.join(RECIPES, "tiny_class.yaml")


def write_text_shards(out: str, n: int = 64, seed: int = 0) -> str:
    """n text samples matching tests/recipes/tiny_text.yaml (8x8x4 latents, T5 width 32, <= 16 tokens)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from data_helpers import write_feature_shards

    write_feature_shards(out, n, max_tokens=16, text_dim=32, samples_per_shard=16, seed=seed)
    return out


def write_class_shards(out: str, n: int = 64, seed: int = 1) -> str:
    """n class-labelled samples matching tests/recipes/tiny_class.yaml (10 classes)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from data_helpers import write_feature_shards

    write_feature_shards(out, n, condition="class", num_classes=10, samples_per_shard=16, seed=seed)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(extra: dict | None = None) -> dict:
    """The test process's environment without launcher variables, one OpenMP thread per process (2 shared cores),
    no GPU (these are the CPU tests)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                        "MASTER_PORT") and not k.startswith("SLURM_") and not k.startswith("TORCHELASTIC")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def train_cmd(recipe: str, overrides: list[str], launcher: str = "single", nproc: int = 2) -> list[str]:
    cli = ["-m", "pixart_ds.cli", "train", recipe, *overrides]
    if launcher == "single":
        return [sys.executable, *cli]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cli]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
                str(free_port()), "--module", *cli[1:]]
    raise ValueError(launcher)


def run_train(recipe: str, overrides: list[str], launcher: str = "single", nproc: int = 2, env: dict | None = None,
              timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(recipe, overrides, launcher, nproc), capture_output=True, text=True,
                          timeout=timeout, env=clean_env(env), cwd=REPO)


def describe(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout ---\n{p.stdout[-3000:]}\n--- stderr ---\n{p.stderr[-6000:]}"


def read_metrics(run_dir: str) -> tuple[dict, list]:
    from pixart_ds.train.metrics import read_metrics as _read

    return _read(os.path.join(run_dir, "metrics.jsonl"))


def latest_tag(run_dir: str) -> str:
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        return f.read().strip()


def meta(run_dir: str, tag: str) -> dict:
    with open(os.path.join(run_dir, "checkpoints", tag, "pixart_ds.json")) as f:
        return json.load(f)


def worker_pids(launcher_pid: int, pattern: str = "pixart_ds.cli") -> list[int]:
    """The training processes below a launcher (children of torchrun, grandchildren under the deepspeed runner)."""
    out, todo = [], [launcher_pid]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except FileNotFoundError:
            continue
        for k in kids:
            try:
                with open(f"/proc/{k}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode()
            except FileNotFoundError:
                continue
            if pattern in cmd and "deepspeed.launcher" not in cmd and "torch.distributed.run" not in cmd:
                out.append(k)
            else:
                todo.append(k)
    return sorted(out)
