"""Checkpoints need a filesystem every node sees: rank 0 writes `latest` and the model states, every rank writes its
ZeRO optimizer partition into the same directory, and a resumed run reads them all -- possibly on other nodes.

`check_shared_dir(path, what)` (all ranks, once at start) proves it: rank 0 writes a file with a random token into
`path`, every rank looks for it, and if some cannot see it every rank raises the same SharedFilesystemError naming the
hosts and ranks that cannot, before anything is trained. A run directory on a node-local disk (/tmp, /scratch, a
local NVMe) would otherwise fail late and obscurely: each node would hold a part of every checkpoint, `latest` would
exist on one node only, and a requeued job would resume on some ranks and start fresh on others.
"""
from __future__ import annotations

import os
import socket
import time
import uuid

from pixart_ds import dist
from pixart_ds.train import liveness

# How long a rank keeps looking for rank 0's file: a network filesystem may show a new file on other clients a
# little later (attribute caching); a node-local directory never shows it.
VISIBLE_WITHIN_S = 10.0


class SharedFilesystemError(ValueError):
    """`path` is not shared by every node of the job; the message names the hosts and ranks that cannot see it."""


def check_shared_dir(path: str, what: str, timeout_s: float = VISIBLE_WITHIN_S) -> None:
    """All ranks. Raise SharedFilesystemError on every rank when a rank cannot see a file rank 0 wrote in `path`.
    Free for a single process; with one node the file is always visible (one gather, one small file)."""
    if not dist.is_multi():
        return
    rank = dist.rank()
    token = None
    error = None
    if rank == 0:
        token = uuid.uuid4().hex
        try:
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, f".shared-check-{token}"), "w") as f:
                f.write(token)
        except OSError as e:
            error = f"rank 0 cannot write there ({e})"
    token, error = dist.gather_objects((token, error))[0]
    if error:
        raise SharedFilesystemError(f"{what}: {path}: {error}")
    probe = os.path.join(path, f".shared-check-{token}")
    deadline = time.monotonic() + timeout_s
    seen = False
    while True:
        try:
            with open(probe) as f:
                seen = f.read() == token
        except OSError:
            seen = False
        if seen or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    views = dist.gather_objects((socket.gethostname(), seen))
    if rank == 0:
        try:
            os.remove(probe)
        except OSError:
            pass
    blind: dict[str, list[int]] = {}
    for r, (host, ok) in enumerate(views):
        if not ok:
            blind.setdefault(host, []).append(r)
    if blind:
        who = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {liveness.ranges(rs)} on host {h}"
                        for h, rs in blind.items())
        raise SharedFilesystemError(
            f"{what}: {path} is not on a filesystem shared by every node: rank 0 (host {views[0][0]}) wrote "
            f"{probe} and {who} cannot see it; checkpoints written there would be split between nodes. Put {what} "
            f"on a filesystem every node mounts (NFS, Lustre, GPFS, ...), not on node-local /tmp or scratch")
