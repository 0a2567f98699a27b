#!/usr/bin/env python
"""GPU-days of every Table-4 stage from benchmarks/gpu_mfu.py records, beside the paper's 753 A100-days (12%).

    python benchmarks/gpu_days_report.py benchmarks/results/gpu_mfu_h200.jsonl --variant shipped
    python benchmarks/gpu_days_report.py RECORDS.jsonl --variant gpu --out benchmarks/results

Writes benchmarks/results/gpu_days_<card>.{md,json} (with --variant other than shipped: gpu_days_<card>_<variant>).
Every stage must be measured: each Table-4 recipe needs an `ok` record of the chosen variant on the one card, at
the recipe's model and resolution (a GPU variant's record, recipes/gpu/<stage>_gpu.yaml, counts for its stage). The
report refuses records of two cards or two variants unless --card / --variant picks one, and names any stage without
a measurement instead of projecting it. `--as-measured` reports the configurations the records measured (e.g. the
tiny model of a --dry-run) instead of the stage recipes. The arithmetic is pixart_ds/bench/gpu_days.py's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from pixart_ds import config as C
from pixart_ds.bench import gpu_days as gd
from pixart_ds.bench import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def fail(msg: str) -> int:
    print(f"gpu_days_report: error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("records", nargs="+", help="JSON-lines files written by benchmarks/gpu_mfu.py")
    p.add_argument("--variant", default=None, help="the variant to report (required when the records hold several)")
    p.add_argument("--card", default=None, help="hardware slug (required when the records hold several cards)")
    p.add_argument("--as-measured", action="store_true", help="stages as the records measured them, not the recipes")
    p.add_argument("--out", default=report.DEFAULT_RESULTS)
    a = p.parse_args(argv)
    recs = []
    for path in a.records:
        try:
            with open(path) as f:
                recs += [json.loads(line) for line in f if line.strip()]
        except (OSError, json.JSONDecodeError) as e:
            return fail(f"{path}: {e}")
    recs = [r for r in recs if r.get("schema") == "pixart_ds.gpu_mfu/1" and r.get("status") == "ok"]
    cards = sorted({r["hardware"]["slug"] for r in recs})
    if a.card:
        recs = [r for r in recs if r["hardware"]["slug"] == a.card]
    elif len(cards) > 1:
        return fail(f"the records hold {len(cards)} cards ({', '.join(cards)}): choose one with --card")
    variants = sorted({r["variant"] for r in recs})
    if a.variant:
        recs = [r for r in recs if r["variant"] == a.variant]
    elif len(variants) > 1:
        return fail(f"the records hold variants {', '.join(variants)}: choose one with --variant")
    if not recs:
        return fail("no ok record of that card and variant")
    card, variant = recs[0]["hardware"]["slug"], recs[0]["variant"]
    stages = [s.recipe for s in gd.PAPER_TABLE4]
    if a.as_measured:
        recipes = []
        for s in stages:
            mine = [r for r in recs if r["recipe_name"] == s]
            if mine:  # the measured model and resolution, the stage's images (steps x global batch)
                t = C.load(os.path.join(REPO, "recipes", f"{s}.yaml")).train
                recipes.append((s, C.replace(C.from_dict(mine[-1]["config"], "record"), **{
                    "train.total_steps": t.total_steps, "train.global_batch_size": t.global_batch_size})))
    else:
        recipes = [(s, C.load(os.path.join(REPO, "recipes", f"{s}.yaml"))) for s in stages]
    # gd.plan matches a record to a stage by recipe name, model and resolution; it reads the throughput schema.
    for r in recs:
        r.setdefault("report", f"{r['name']} ({r['variant']}, {r['timestamp']})")
    plan = gd.plan(recipes, recs, hardware=card, mfu=None)
    missing = [row["recipe"] for row in plan["rows"] if row["source"] != "measured"]
    missing += [s for s in stages if s not in dict(recipes)]
    if missing:
        return fail(f"no {variant} record on {card} for {', '.join(missing)}: every Table-4 stage must be measured "
                    f"(run benchmarks/gpu_mfu.py until these rows finish)")
    commits = sorted({str(r["versions"].get("pixart_ds_commit")) for r in recs})
    extra = (f"Variant **{variant}** on `{card}`, records of commit(s) {', '.join(commits)} "
             f"({'dry run: tiny model, not the recipes' if any(r.get('dry_run') for r in recs) else 'the recipes'}); "
             f"images/s per GPU = the production train_step with the real loader, optimizer and EMA "
             f"(benchmarks/gpu_mfu.py). Paper: 753 A100-days, 12% of SD v1.5.")
    title = f"GPU-days per stage — {plan['hardware_name']} ({variant})"
    md = gd.render_markdown(plan, title=title, extra=extra)
    base = f"gpu_days_{card}" + ("" if variant == "shipped" else f"_{variant}")
    report.write_outputs([a.out], base, md, {"schema": "pixart_ds.gpu_days/1", "variant": variant, **plan})
    t = plan["totals"]
    tot = "no vendor peak, no A100-days" if t["a100_days"] is None else \
        f"{t['a100_days']:,.0f} A100-days ({t['a100_days_percent_of_sd15']:.1f}% of SD v1.5; paper 753, 12%)"
    print(f"gpu_days_report: {variant} on {card}: {t['gpu_days']:,.1f} GPU-days, {tot} -> "
          f"{os.path.join(a.out, base + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
