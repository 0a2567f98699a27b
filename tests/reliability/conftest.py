"""Reliability suite: shared tiny shards, the uninterrupted reference run, and the fault/sample figures printed at
the end of the session and written to <pytest basetemp>/reliability_summary.json (or $PIXART_DS_RELIABILITY_SUMMARY).
"""
import json
import os
import tempfile

import pytest

from pixart_ds.testing import TINY_TEXT, describe, read_metrics, run_train, write_text_shards

from .faults import SUMMARY, overrides


@pytest.fixture(scope="session")
def rel_shards(tmp_path_factory):
    """64 text samples in 5 shards (16, 14, 16, 16, 2 samples), xxh64 hashes recorded in index.json."""
    return write_text_shards(str(tmp_path_factory.mktemp("rel_shards") / "text"), n=64)


@pytest.fixture(scope="session")
def reference(tmp_path_factory, rel_shards):
    """The uninterrupted 30-step, 2-rank run every faulted run is compared with: {step: record}."""
    run = str(tmp_path_factory.mktemp("rel_reference") / "run")
    p = run_train(TINY_TEXT, overrides(run, rel_shards), launcher="torchrun")
    assert p.returncode == 0, describe(p)
    recs, _ = read_metrics(run)
    assert sorted(recs) == list(range(1, 31))
    ids = [i for s in range(1, 17) for i in recs[s]["sample_idx"]]
    assert sorted(ids) == list(range(64))  # epoch 1 = steps 1-16: every sample exactly once
    return {"run": run, "recs": recs}


def pytest_sessionfinish(session, exitstatus):
    if not SUMMARY["tests"]:
        return
    factory = getattr(session.config, "_tmp_path_factory", None)  # pytest's tmp_path_factory, set by its tmpdir plugin
    base = str(factory.getbasetemp()) if factory is not None else tempfile.gettempdir()
    path = os.environ.get("PIXART_DS_RELIABILITY_SUMMARY") or os.path.join(base, "reliability_summary.json")
    with open(path, "w") as f:
        json.dump(SUMMARY, f, indent=1)
    SUMMARY["_path"] = path


def pytest_terminal_summary(terminalreporter):
    if not SUMMARY["tests"]:
        return
    tr = terminalreporter
    tr.section("reliability figures")
    faults = SUMMARY["faults_injected"]
    tr.write_line(f"faults injected: {sum(faults.values())} ({', '.join(f'{k} {v}' for k, v in faults.items())})")
    for key in ("runs_resumed", "samples_lost", "duplicate_samples", "steps_recomputed", "nonfinite_steps_skipped",
                "corrupt_samples_skipped", "recipes_fuzzed"):
        tr.write_line(f"{key.replace('_', ' ')}: {SUMMARY[key]}")
    for name, t in SUMMARY["tests"].items():
        tr.write_line(f"  {name}: {json.dumps(t)}")
    if "_path" in SUMMARY:
        tr.write_line(f"written to {SUMMARY['_path']}")
