"""What keeps one bad rank from costing a week: stop requests, agreement between ranks, and lost-rank reports.

- `StopFlag`: SIGUSR1 / SIGTERM (Slurm's --signal, preemption, scancel) only set a flag; at the next step boundary
  the ranks agree (one all_reduce) whether ANY rank was signalled or passed train.time_limit_s, then all checkpoint.
- `agree_on_data`: corrupt samples replaced (data.on_corrupt=skip) and data errors (=stop) of every rank, agreed
  before train_step, so a rank that must stop never leaves the others waiting in the gradient reduction.
- `FetchWatchdog`: bounds the one wait torch's collective timeout does not, the next batch (Streaming's epoch
  barrier spins without a timeout until every rank of the node arrives).
- `peer_table` / `describe_peers` / `lost_rank_message`: after a failed collective, say which peer is gone or
  stopped (on this host through /proc, on another through its liveness responder: which host, which ranks), and
  where the last good checkpoint is.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from typing import Callable, Optional

import torch
import torch.distributed as tdist

from pixart_ds import dist
from pixart_ds.train import liveness

LOST_RANK_EXIT_CODE = 4


class StopFlag:
    """Set by SIGUSR1/SIGTERM; the handler does nothing else (no I/O or collectives inside a signal handler)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def install(self) -> "StopFlag":
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def agree_on_data(mbs: list, error: Optional[str], device: torch.device) -> tuple[int, list[str]]:
    """(corrupt samples replaced in this global batch (data.on_corrupt=skip), every rank's data error). One small
    all_reduce per step, before train_step: a rank that met data it must not train on (data.on_corrupt=stop) would
    otherwise leave the others waiting in the gradient reduction until the collective timeout."""
    skipped = sum(int(mb["skipped"].sum()) for mb in mbs if "skipped" in mb)
    if not dist.is_multi():
        return skipped, [error] if error else []
    t = torch.tensor([skipped, 1 if error else 0], dtype=torch.int64, device=device)
    tdist.all_reduce(t)
    if int(t[1]) == 0:
        return int(t[0]), []
    return int(t[0]), [e for e in dist.gather_objects(error) if e]


class FetchWatchdog:
    """Bounds the wait for the next batch. Streaming's shared-memory barrier at the start of every epoch spins
    without a timeout until every rank of the node arrives, and a DataLoader worker on a hung filesystem blocks the
    same way, so a hung peer would stall this rank forever. After `timeout_s` the watchdog prints what
    `describe()` says (which peer is gone or stopped) and ends the process with LOST_RANK_EXIT_CODE."""

    def __init__(self, timeout_s: float, describe: Callable[[], str]):
        self.timeout_s, self.describe = timeout_s, describe
        self._timer: Optional[threading.Timer] = None

    def __enter__(self):
        self._timer = threading.Timer(self.timeout_s, self._fire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        return False

    def _fire(self):
        try:
            print(f"pixart-ds train: error: {self.describe()}", file=sys.stderr, flush=True)
        finally:
            os._exit(LOST_RANK_EXIT_CODE)


def is_collective_error(e: BaseException) -> bool:
    """Whether an exception is a failed collective (a peer died, hung past the timeout, or the network broke)
    rather than a bug. torch raises DistError subclasses for some and plain RuntimeErrors from gloo for others
    ("Connection reset by peer", "Timed out waiting 20000ms for recv operation to complete")."""
    if isinstance(e, getattr(tdist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "gloo/", "NCCL", "Connection reset", "Connection closed", "Connection refused", "Broken pipe",
        "Timed out waiting", "timed out", "ProcessGroup"))


def process_state(pid: int) -> str:
    """'gone', 'stopped' or 'running' for a process of THIS host, from /proc/<pid>/stat. A SIGKILLed worker stays a
    zombie until its launcher reaps it: that counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"
    return {"Z": "gone", "X": "gone", "x": "gone", "T": "stopped", "t": "stopped"}.get(state, "running")


def peer_table() -> list[tuple[str, int, int | None]]:
    """(hostname, pid, liveness port) of every rank, in rank order; a collective, called once at start so that a
    survivor can later tell which peer is gone: through /proc on its own host, through the peer's liveness responder
    (pixart_ds/train/liveness.py) on another."""
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return [(socket.gethostname(), os.getpid(), None)]
    me = (socket.gethostname(), os.getpid(), liveness.serve())
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, me)
    return out


def describe_peers(peers: list[tuple], rank: int, settle_s: float = 3.0) -> tuple[list[int], str]:
    """(ranks seen lost, a sentence about them) after a failed collective. Peers on this host are checked through
    /proc; peers on other hosts through their liveness responder (the sentence names the host and its ranks).

    A peer's sockets close while it is still exiting: for a moment its /proc entry still runs and its responder
    still accepts connections without answering. So the check is repeated for up to `settle_s` while it sees no lost
    peer, or a remote one that does not answer, and the last view is reported."""
    deadline = time.monotonic() + settle_s
    while True:
        lost, parts, unsettled = _describe_peers_once(peers, rank)
        if (lost and not unsettled) or time.monotonic() >= deadline:
            return lost, "; ".join(parts)
        time.sleep(0.2)


def _describe_peers_once(peers: list[tuple], rank: int) -> tuple[list[int], list[str], bool]:
    """One look: (lost ranks, phrases, whether a remote peer accepted but did not answer)."""
    host = socket.gethostname()
    lost, parts, remote = [], [], {}
    for r, (h, pid, *port) in enumerate(peers):
        if r == rank:
            continue
        if h != host:
            remote[r] = (h, port[0] if port else None)
            continue
        state = process_state(pid)
        if state == "gone":
            lost.append(r)
            parts.append(f"rank {r} (pid {pid}) has exited")
        elif state == "stopped":
            lost.append(r)
            parts.append(f"rank {r} (pid {pid}) is stopped and does not answer")
    unknown = sorted(r for r, (_, port) in remote.items() if port is None)
    states = liveness.probe_peers({r: hp for r, hp in remote.items() if hp[1] is not None})
    remote_lost, remote_parts = liveness.describe_remote(states, {r: h for r, (h, _) in remote.items()})
    lost = sorted(lost + remote_lost)
    parts += remote_parts
    if unknown:
        parts.append(f"rank(s) {liveness.ranges(unknown)} run on other hosts (see the launcher's log for which one "
                     f"failed)")
    if not parts:
        parts.append("every other rank is still running (one of them may hang)")
    return lost, parts, liveness.NO_ANSWER in states.values()


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def destroy() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def lost_rank_message(e: Optional[BaseException], peers: list[tuple], rank: int, step: int,
                      timeout_s: float, latest: str) -> tuple[list[int], str]:
    """(lost ranks, one line) for a collective that failed with `e` after `step`, or (e is None) for a batch that
    did not come within `timeout_s`."""
    lost, who = describe_peers(peers, rank) if len(peers) > 1 else ([], "")
    if e is None:
        if not lost:
            who = (who + "; " if who else "") + "the data loader itself may be stuck (a hung filesystem or remote " \
                                                "source)"
        return lost, (f"rank {rank} waited more than train.collective_timeout_s={timeout_s} s for the data of step "
                      f"{step + 1}: {who}; latest checkpoint: {latest}; run the same command to resume from it")
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return lost, (f"rank {rank} lost contact with the other ranks after step {step} ({type(e).__name__}: {first}): "
                  f"{who}; train.collective_timeout_s={timeout_s}; latest checkpoint: {latest}; run the same command "
                  f"to resume from it")
