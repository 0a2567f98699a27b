#!/usr/bin/env python
"""GPU-days per training stage from measured throughput, beside the paper's Table 4 and its 12% of SD v1.5.

    python benchmarks/gpu_days.py                                   # every throughput JSON in benchmarks/results
    python benchmarks/gpu_days.py --hardware h100                   # report on one card's measurements
    python benchmarks/gpu_days.py --hardware a100 --mfu 0.40        # a pure projection (every cell says so)

Inputs: the stage recipes (default: the five of Table 4 in recipes/) and the JSONs that benchmarks/throughput.py
wrote. A measurement counts for a stage when its recipe name, model architecture and resolution match the recipe's;
other stages are projected from their FLOPs at an MFU (the mean measured one on that hardware, or --mfu) and their
cells say "projected at MFU x%". The rule is in pixart_ds/bench/gpu_days.py's docstring and in the report.
Writes benchmarks/results/gpu_days_<hardware>_<yyyymm>.{md,json,png}.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile

from pixart_ds import config as C
from pixart_ds.bench import gpu_days as gd
from pixart_ds.bench import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", action="append", default=None,
                   help="folder(s) or JSON files of throughput results (default benchmarks/results)")
    p.add_argument("--recipes", nargs="+", default=None, help="stage recipes in stage order (default: Table 4's)")
    p.add_argument("--hardware", default=None, help="hardware slug to report on (default: the most measured)")
    p.add_argument("--mfu", type=float, default=None, help="MFU (0-1) for stages without a measurement")
    p.add_argument("--out", action="append", default=None, help="output folder (repeatable)")
    a = p.parse_args(argv)
    if a.mfu is not None and not 0 < a.mfu <= 1:
        print(f"gpu_days: error: --mfu {a.mfu}: must be in (0, 1]", file=sys.stderr)
        return 2

    recipe_paths = a.recipes or [os.path.join(REPO, "recipes", f"{s.recipe}.yaml") for s in gd.PAPER_TABLE4]
    try:
        recipes = [(os.path.splitext(os.path.basename(r))[0], C.load(r)) for r in recipe_paths]
    except (C.ConfigError, FileNotFoundError) as e:
        print(f"gpu_days: error: {e}", file=sys.stderr)
        return 2
    paths = []
    for src in a.results or [report.DEFAULT_RESULTS]:
        paths += sorted(glob.glob(os.path.join(src, "*.json"))) if os.path.isdir(src) else [src]
    records = gd.load_records(paths)
    plan = gd.plan(recipes, records, hardware=a.hardware, mfu=a.mfu)
    if plan["hardware"] is None:
        print("gpu_days: error: no throughput results found and no --hardware given; run benchmarks/throughput.py "
              "first or give --hardware a100 --mfu 0.4 for a projection", file=sys.stderr)
        return 2
    md = gd.render_markdown(plan, title=f"GPU-days per stage — {plan['hardware_name'] or plan['hardware']}")
    base = report.stem("gpu_days", plan["hardware"])
    with tempfile.TemporaryDirectory() as d:
        png = os.path.join(d, "chart.png")
        gd.plot(plan, png)
        with open(png, "rb") as f:
            blob = f.read()
    md = md.replace("\n## Rule", f"\n![GPU-days per stage]({base}.png)\n\n## Rule", 1)
    outs = a.out or [report.DEFAULT_RESULTS]
    report.write_outputs(outs, base, md, {"schema": "pixart_ds.gpu_days/1", "timestamp": report.now().isoformat(),
                                          **plan}, {f"{base}.png": blob})
    t = plan["totals"]
    tot = "—" if t["a100_days"] is None else f"{t['a100_days']:,.0f} A100-days " \
                                             f"({t['a100_days_percent_of_sd15']:.1f}% of SD v1.5)"
    print(f"gpu_days on {plan['hardware_name'] or plan['hardware']}: total {tot}; paper 753 (12%) "
          f"-> {os.path.join(outs[0], base + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
