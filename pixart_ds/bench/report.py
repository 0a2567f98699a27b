"""Writing benchmark results: names, atomic files, the shared header of every report.

Naming (benchmarks/README.md): `benchmarks/results/<name>_<hardware>_<yyyymm>.{md,json,png}`, e.g.
`stage2_sam256_h100_202611.md`, `vs_reference_cpu-2core_202611.md`. <hardware> is hardware.device_record()'s slug,
so the card (or the CPU core count) is in every file name, and its full name is in every file.
"""
from __future__ import annotations

import datetime as _dt
import json
import os

import yaml

from pixart_ds.fsutil import atomic_write_bytes, atomic_write_text

DEFAULT_RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                               "benchmarks", "results")


def now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def stem(name: str, hardware_slug: str, when: _dt.datetime | None = None) -> str:
    when = when or now()
    safe = name.replace("/", "-").replace(" ", "-")
    return f"{safe}_{hardware_slug}_{when:%Y%m}"


def write_outputs(out_dirs: list[str], base: str, markdown: str | None = None, data: dict | None = None,
                  files: dict[str, bytes] | None = None) -> list[str]:
    """Write `<base>.md`, `<base>.json` and extra files (name -> bytes) into every folder of `out_dirs`."""
    written = []
    for d in out_dirs:
        if markdown is not None:
            atomic_write_text(os.path.join(d, f"{base}.md"), markdown)
            written.append(os.path.join(d, f"{base}.md"))
        if data is not None:
            atomic_write_text(os.path.join(d, f"{base}.json"), json.dumps(data, indent=2, default=_json_default) + "\n")
            written.append(os.path.join(d, f"{base}.json"))
        for name, blob in (files or {}).items():
            atomic_write_bytes(os.path.join(d, name), blob)
            written.append(os.path.join(d, name))
    return written


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def hardware_md(hw: dict) -> str:
    rows = [("device", hw.get("name")), ("type", hw.get("type")), ("count visible", hw.get("count"))]
    if hw.get("type") == "cuda":
        rows += [("memory", f"{hw.get('memory_gib')} GiB"), ("compute capability", hw.get("capability")),
                 ("multiprocessors", hw.get("multiprocessors")), ("driver", hw.get("driver"))]
    else:
        rows += [("memory", f"{hw.get('memory_gib')} GiB")]
    peak = hw.get("peak_tflops")
    rows += [("peak used for MFU", f"{peak:g} TFLOP/s, {hw.get('peak_rule')}" if peak else hw.get("peak_rule")),
             ("host CPU", f"{hw.get('cpu_model')}, {hw.get('cpu_cores')} cores")]
    return _kv_table(rows)


def versions_md(v: dict) -> str:
    return _kv_table([(k, v[k]) for k in v])


def _kv_table(rows) -> str:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {'—' if val is None else val} |" for k, val in rows]
    return "\n".join(lines)


def yaml_block(d: dict) -> str:
    return "```yaml\n" + yaml.safe_dump(d, sort_keys=False).rstrip() + "\n```"


def gib(nbytes: float | None) -> str:
    if nbytes is None:
        return "—"
    return f"{nbytes / 2**30:.2f} GiB" if abs(nbytes) >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def peak_rss_reset() -> bool:
    """Reset the process's peak resident set size (Linux >= 4.0: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes(field: str = "VmHWM") -> int | None:
    """VmHWM (peak resident set) or VmRSS (current) of this process in bytes, None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
