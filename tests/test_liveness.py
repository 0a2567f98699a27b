"""Liveness of peers on other hosts (pixart_ds.train.liveness): a survivor of a failed collective tells an exited
rank from a stopped one and from an unreachable host, and names the host and the ranks. Real sockets and processes;
the multi-host case on the local cluster is tests/test_multinode.py::test_host_killed_survivors_name_host_and_ranks.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from pixart_ds.train import liveness
from pixart_ds.train.resilience import describe_peers, process_state

SERVE = "from pixart_ds.train import liveness; import sys, time; print(liveness.serve(), flush=True); time.sleep(600)"


@pytest.fixture
def peer():
    """Start a process serving its liveness port; returns (Popen, port). Killed at the end."""
    procs = []

    def start():
        p = subprocess.Popen([sys.executable, "-c", SERVE], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        return p, int(p.stdout.readline())

    yield start
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
        except ProcessLookupError:
            pass
        p.wait()


def _wait_stopped(pid: int) -> None:
    """SIGSTOP takes effect asynchronously: wait until /proc says the process is stopped."""
    deadline = time.time() + 10
    while process_state(pid) != "stopped":
        assert time.time() < deadline, f"pid {pid} did not stop"
        time.sleep(0.02)


def test_probe_tells_alive_exited_stopped_and_unreachable(peer):
    assert liveness.probe("127.0.0.1", liveness.serve()) == liveness.ALIVE
    assert liveness.serve() == liveness.serve()  # one responder per process
    p, port = peer()
    assert liveness.probe("127.0.0.1", port) == liveness.ALIVE
    os.kill(p.pid, signal.SIGSTOP)
    _wait_stopped(p.pid)
    assert liveness.probe("127.0.0.1", port, timeout=0.5) == liveness.NO_ANSWER
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert liveness.probe("127.0.0.1", port) == liveness.EXITED
    # A name that does not resolve: unreachable (a host that is down: tests/test_liveness.py's namespace test).
    assert liveness.probe("no-such-host.invalid", 9, timeout=0.3) == liveness.UNREACHABLE


def test_probe_peers_skips_the_rest_of_an_unreachable_host(peer):
    p, port = peer()
    states = liveness.probe_peers({1: ("127.0.0.1", port), 2: ("no-such-host.invalid", 9),
                                   3: ("no-such-host.invalid", 10)}, timeout=0.3)
    assert states == {1: liveness.ALIVE, 2: liveness.UNREACHABLE, 3: liveness.UNREACHABLE}


def test_describe_remote_names_hosts_and_ranks():
    states = {2: "exited", 3: "exited", 4: "unreachable", 5: "unreachable", 6: "no answer", 7: "alive"}
    hosts = {2: "node2", 3: "node2", 4: "node3", 5: "node3", 6: "node4", 7: "node4"}
    lost, parts = liveness.describe_remote(states, hosts)
    assert lost == [2, 3, 4, 5, 6]
    assert parts == ["ranks 2-3 on host node2 have exited",
                     "host node3 (ranks 4-5) does not answer on the network (down or unreachable)",
                     "rank 6 on host node4 is stopped or hung (connected, no reply)"]
    assert liveness.ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"


def test_describe_peers_checks_other_hosts_over_the_network(peer):
    """The peer table of a 4-rank job: rank 0 is us; ranks 1-3 'run on another host' (localhost by name, so the
    /proc check does not apply and the responders are asked): one exited, one stopped, one alive."""
    dead, dead_port = peer()
    stopped, stopped_port = peer()
    alive, alive_port = peer()
    dead.kill()
    dead.wait()
    os.kill(stopped.pid, signal.SIGSTOP)
    _wait_stopped(stopped.pid)
    assert socket.gethostname() != "localhost"
    peers = [(socket.gethostname(), os.getpid(), liveness.serve()), ("localhost", dead.pid, dead_port),
             ("localhost", stopped.pid, stopped_port), ("localhost", alive.pid, alive_port)]
    lost, msg = describe_peers(peers, 0)
    assert lost == [1, 2]
    assert "rank 1 on host localhost has exited" in msg and "rank 2 on host localhost is stopped or hung" in msg
    assert "rank 3" not in msg


@pytest.mark.slurm
def test_probe_from_a_simulated_host_tells_a_missing_host_from_an_exited_process():
    """On the local cluster's bridge (slurm/local-cluster.sh): from pixnode1, an address where no host answers is
    UNREACHABLE (a machine that is down), pixnode2 with nothing on the port is EXITED (host up, process gone)."""
    if not shutil.which("scontrol") or not os.path.exists("/run/netns/pixnode1"):
        pytest.fail("no simulated hosts: run `make slurm-up` (slurm/local-cluster.sh up) as root")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    nobody = os.environ.get("PIXART_SLURM_NET", "10.77.0") + ".99"  # on the bridge's subnet, no host there
    code = ("from pixart_ds.train import liveness as L; "
            f"print(L.probe('{nobody}', 9, timeout=1.0), L.probe('pixnode2', 9, timeout=1.0))")
    p = subprocess.run(["bash", os.path.join(repo, "slurm", "local-cluster.sh"), "exec", "pixnode1", "--", "env",
                        f"PYTHONPATH={repo}", sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [liveness.UNREACHABLE, liveness.EXITED], p.stdout
