"""slurm.conf of the local test cluster (slurm/local-cluster.sh), written with slurmutils' slurm.conf model.

    python3 slurm/local_conf.py --out /etc/slurm/slurm.conf --scratch DIR --controller vm --cpus 2 --mem 20000 \
        [--host-node vm] [--ns-node pixnode1=10.77.0.11 ...]

Prints "wrote PATH" when the file changed (atomically replaced) and "unchanged PATH" when it already held exactly this
configuration; exit code 0 either way. Run by local-cluster.sh, which restarts the daemons only after "wrote".

slurmutils validates every key against the schema of a newer Slurm than Debian 12's 22.05. Three keys of a minimal
22.05 cluster have values that schema rejects: TaskPlugin=task/none, AccountingStorageType=accounting_storage/none
and SwitchType=switch/none. All three are 22.05's defaults (slurm.conf(5) of 22.05), so they are left out and Slurm
runs with them all the same; tests/test_slurm.py checks the values in effect with `scontrol show config`.
"""
from __future__ import annotations

import argparse
import os
import sys

from slurmutils import Node, Partition, SlurmConfig, slurmconfig


def build(scratch: str, controller: str, cpus: int, mem_mb: int, host_node: str | None,
          ns_nodes: list[tuple[str, str]]) -> SlurmConfig:
    """The cluster: `host_node` (this machine, partition `debug`, the default) and the namespace hosts
    (partition `multi`), one controller. Every value is explained where a test or a launcher depends on it."""
    conf = SlurmConfig(
        clustername="local",
        slurmctldhost=[controller],
        slurmuser="root",
        slurmduser="root",
        authtype="auth/munge",
        credtype="cred/munge",
        # A requeued job waits cred_expire seconds before it may start again (slurm.conf(5), AuthInfo); the
        # default 120 s would dominate the preemption tests.
        authinfo={"cred_expire": 10},
        statesavelocation=f"{scratch}/state",
        # %n: each node's slurmd (one per namespace host) keeps its own spool, pid and log file.
        slurmdspooldir=f"{scratch}/spool/%n",
        slurmctldpidfile=f"{scratch}/slurmctld.pid",
        slurmdpidfile=f"{scratch}/slurmd-%n.pid",
        slurmctldlogfile=f"{scratch}/log/slurmctld.log",
        slurmdlogfile=f"{scratch}/log/slurmd-%n.log",
        slurmctlddebug="info",
        slurmddebug="info",
        # No systemd, no cgroups: processes are tracked by /proc parentage.
        proctracktype="proctrack/linuxproc",
        jobacctgathertype="jobacct_gather/none",
        jobcomptype="jobcomp/none",
        mpidefault="none",
        schedulertype="sched/backfill",
        # Start pending jobs (a requeued one whose begin time has come, a dependency just satisfied) within seconds.
        schedulerparameters={"sched_interval": 2, "bf_interval": 2},
        selecttype="select/cons_tres",
        selecttypeparameters={"cr_core": True},
        grestypes=["gpu"],
        returntoservice=2,
        # No accounting daemon: finished jobs are visible only through scontrol/squeue, for MinJobAge seconds.
        minjobage=3600,
        killwait=10,
        inactivelimit=0,
    )
    if host_node:
        conf.nodes[host_node] = Node(nodename=host_node, cpus=cpus, realmemory=mem_mb, state="unknown")
        conf.partitions["debug"] = Partition(partitionname="debug", nodes=[host_node], default=True,
                                             maxtime="INFINITE", state="up", oversubscribe="yes")
    for name, addr in ns_nodes:
        # NodeAddr: the controller reaches this slurmd over the bridge; NodeHostname: what the host calls itself
        # (its own UTS namespace), which is how its slurmd finds its NodeName.
        conf.nodes[name] = Node(nodename=name, nodeaddr=addr, nodehostname=name, cpus=cpus, realmemory=mem_mb,
                                state="unknown")
    if ns_nodes:
        conf.partitions["multi"] = Partition(partitionname="multi", nodes=[n for n, _ in ns_nodes],
                                             default=not host_node, maxtime="INFINITE", state="up",
                                             oversubscribe="yes")
    return conf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--scratch", required=True)
    ap.add_argument("--controller", required=True)
    ap.add_argument("--cpus", type=int, required=True)
    ap.add_argument("--mem", type=int, required=True, help="RealMemory in MB (below what slurmd measures)")
    ap.add_argument("--host-node", default=None)
    ap.add_argument("--ns-node", action="append", default=[], metavar="NAME=ADDR")
    a = ap.parse_args(argv)
    ns_nodes = [tuple(s.split("=", 1)) for s in a.ns_node]
    conf = build(a.scratch, a.controller, a.cpus, a.mem, a.host_node, ns_nodes)
    try:
        with open(a.out) as f:
            if f.read() == slurmconfig.dumps(conf) + "\n":  # what dump() writes
                print(f"unchanged {a.out}")
                return 0
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    slurmconfig.dump(conf, a.out, mode=0o644)  # a swap file renamed over the target
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
