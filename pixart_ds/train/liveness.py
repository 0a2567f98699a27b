"""Is a rank on another host still there? Asked over the network, so a survivor of a failed collective can name the
host and the ranks that are gone, not only the ranks that shared its own /proc.

Every rank serves a tiny TCP responder (`serve()`, a daemon thread): a connection gets one line, the rank's pid, and
is closed. The responder's port goes into the peer table gathered at start (pixart_ds.train.dist.peer_table). After a
failure, `probe()` asks a peer's responder and reads the answer the way a kernel gives it:

- a reply: the process is alive and its Python threads run;
- connection refused: the host answers but nothing listens any more -- the process has exited (killed, OOM, crashed;
  the kernel closed its socket);
- connected but no reply: the kernel accepted the connection on the process's behalf but the process does not run
  (stopped, or hung with the GIL held);
- no connection within the timeout (or no route): the host itself is down or unreachable.

`probe_peers()` checks one rank per host first and skips the rest of a host that is unreachable, so a report about a
lost node costs one timeout, not one per rank. Standard library only; no collective (the process group is broken by
the time it is used).
"""
from __future__ import annotations

import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

ALIVE, EXITED, NO_ANSWER, UNREACHABLE = "alive", "exited", "no answer", "unreachable"

_server: Optional[socket.socket] = None
_lock = threading.Lock()


def serve() -> int:
    """Start this process's responder once (later calls return the same port); returns its TCP port."""
    global _server
    with _lock:
        if _server is None:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("", 0))  # every interface: peers reach it at the address their hostname lookup gives
            s.listen(64)
            threading.Thread(target=_answer, args=(s,), name="pixart-liveness", daemon=True).start()
            _server = s
        return _server.getsockname()[1]


def _answer(s: socket.socket) -> None:
    reply = f"{os.getpid()}\n".encode()
    while True:
        try:
            conn, _ = s.accept()
        except OSError:
            return  # closed
        try:
            conn.sendall(reply)
        except OSError:
            pass
        finally:
            conn.close()


def probe(host: str, port: int, timeout: float = 2.0) -> str:
    """ALIVE, EXITED, NO_ANSWER or UNREACHABLE for the responder at host:port (see the module docstring)."""
    try:
        conn = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        return EXITED
    except (TimeoutError, socket.timeout, OSError):
        return UNREACHABLE  # no route, name lookup failed, or no answer to the connection at all
    try:
        conn.settimeout(timeout)
        return ALIVE if conn.recv(64) else EXITED  # closed without a word: exiting as we asked
    except (TimeoutError, socket.timeout):
        return NO_ANSWER
    except OSError:
        return EXITED  # reset by the peer's kernel
    finally:
        conn.close()


def probe_peers(peers: dict[int, tuple[str, int]], timeout: float = 2.0) -> dict[int, str]:
    """{rank: state} for peers given as {rank: (host, port)}; one rank per host first, then the other ranks of the
    hosts that answered (an unreachable host's ranks are all UNREACHABLE)."""
    by_host: dict[str, list[int]] = {}
    for r, (h, _) in sorted(peers.items()):
        by_host.setdefault(h, []).append(r)
    out: dict[int, str] = {}
    if not peers:
        return out
    with ThreadPoolExecutor(max_workers=min(32, len(peers))) as pool:
        first = {h: pool.submit(probe, h, peers[rs[0]][1], timeout) for h, rs in by_host.items()}
        rest = {}
        for h, fut in first.items():
            rs = by_host[h]
            out[rs[0]] = fut.result()
            if out[rs[0]] == UNREACHABLE:
                out.update({r: UNREACHABLE for r in rs[1:]})
            else:
                rest.update({r: pool.submit(probe, h, peers[r][1], timeout) for r in rs[1:]})
        out.update({r: fut.result() for r, fut in rest.items()})
    return out


def ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, start = [], None
    ranks = sorted(ranks)
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out)


def describe_remote(states: dict[int, str], hosts: dict[int, str]) -> tuple[list[int], list[str]]:
    """(lost ranks, one phrase per host with lost ranks) from probe_peers' states and each rank's host, e.g.
    "ranks 2-3 on host node2 have exited" or "host node2 (ranks 2-3) does not answer on the network (down or
    unreachable)"."""
    lost, parts = [], []
    by_host: dict[str, dict[str, list[int]]] = {}
    for r, st in sorted(states.items()):
        if st != ALIVE:
            lost.append(r)
            by_host.setdefault(hosts[r], {}).setdefault(st, []).append(r)
    for h, kinds in by_host.items():
        for st, rs in kinds.items():
            which = f"rank {rs[0]}" if len(rs) == 1 else f"ranks {ranges(rs)}"
            if st == UNREACHABLE:
                parts.append(f"host {h} ({which}) does not answer on the network (down or unreachable)")
            elif st == EXITED:
                parts.append(f"{which} on host {h} {'has' if len(rs) == 1 else 'have'} exited")
            else:
                parts.append(f"{which} on host {h} {'is' if len(rs) == 1 else 'are'} stopped or hung "
                             f"(connected, no reply)")
    return lost, parts
