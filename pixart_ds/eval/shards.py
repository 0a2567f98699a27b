"""Sharded, resumable per-item work on files: the bookkeeping behind `pixart-ds eval`'s generation and reference
features.

Items 0..N-1 are cut into fixed shards of `shard_size` (independent of the number of ranks); rank r computes shards
k with k % world == r, skipping those already on disk, and writes each as `shard_KKKKK.npz` atomically (temp file +
rename), so a killed run loses at most the shards in flight and a rerun, on any number of ranks, computes only the
missing ones. Nothing is exchanged between ranks but files: rank 0 waits for every shard to appear, then reads them
in index order. Results therefore do not depend on the world size, as long as each item's computation does not
depend on which other items share its batch (fixed shards and batch boundaries see to that).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

from pixart_ds.fsutil import atomic_write


def shard_path(d: str, k: int) -> str:
    return os.path.join(d, f"shard_{k:05d}.npz")


def num_shards(n: int, shard_size: int) -> int:
    return -(-n // shard_size)


def shard_items(k: int, n: int, shard_size: int) -> range:
    return range(k * shard_size, min(n, (k + 1) * shard_size))


def save_npz(path: str, arrays: dict) -> None:
    """np.savez through pixart_ds.fsutil.atomic_write: readers see the whole file or none."""
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def load_npz(path: str) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def run_shards(d: str, n: int, shard_size: int, rank: int, world: int,
               compute: Callable[[range], dict], progress: Callable[[int], None] | None = None) -> dict:
    """Compute this rank's missing shards of items 0..n-1 into `d`. `compute(items)` returns arrays whose first
    dimension is len(items). Returns {"computed": [k...], "reused": [k...]} for this rank."""
    os.makedirs(d, exist_ok=True)
    done = {"computed": [], "reused": []}
    for k in range(rank, num_shards(n, shard_size), world):
        items = shard_items(k, n, shard_size)
        p = shard_path(d, k)
        if os.path.isfile(p):
            done["reused"].append(k)
            if progress:
                progress(len(items))
            continue
        arrays = compute(items)
        arrays["index"] = np.asarray(list(items), dtype=np.int64)
        save_npz(p, arrays)
        done["computed"].append(k)
    return done


def wait_for_shards(d: str, n: int, shard_size: int, timeout_s: float, what: str, poll_s: float = 0.5) -> None:
    """Block until every shard file exists (the other ranks' included); TimeoutError naming the missing ones."""
    t0 = time.time()
    while True:
        missing = [k for k in range(num_shards(n, shard_size)) if not os.path.isfile(shard_path(d, k))]
        if not missing:
            return
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"{what}: after {timeout_s:.0f} s, {len(missing)} shard(s) are still missing in {d} "
                               f"(e.g. {os.path.basename(shard_path(d, missing[0]))}): did another rank fail? "
                               f"Rerun the same command to continue")
        time.sleep(poll_s)


def gather_shards(d: str, n: int, shard_size: int) -> dict:
    """Every shard's arrays concatenated in item order (checked against the stored indices)."""
    parts = [load_npz(shard_path(d, k)) for k in range(num_shards(n, shard_size))]
    out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    if not np.array_equal(out["index"], np.arange(n)):
        raise ValueError(f"{d}: the shards do not hold items 0..{n - 1} in order (written by another job?)")
    return out
