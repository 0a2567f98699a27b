"""GPU-days per training stage from measured throughput, side by side with the paper's Table 4.

Rule (DESIGN.md principle 10: derived, never typed in):
  images     = train.total_steps x train.global_batch_size                       (the recipe)
  GPU-days   = images / (measured images/s per GPU) / 86,400                     (benchmarks/throughput.py JSON)
  MFU        = images/s per GPU x model FLOPs per image / peak FLOP/s             (pixart_ds.model.flops; no recompute)
  A100-days  = images x model FLOPs per image / (MFU x 312 TFLOP/s) / 86,400     ("FLOP rule": the same MFU on an A100;
                                                                                  = GPU-days x peak / 312)
The paper converts V100-days to A100-days by dividing by 2.2 (PixArt-α §2.4 / Table 4 footnote; 1,656 / 2.2 = 753).
For comparison the report also gives that rule applied to our numbers ("paper rule": V100-equivalent days at the
same MFU, GPU-days x peak / 125, then / 2.2). A stage without a matching measurement is projected from its FLOPs at
an MFU (the mean measured MFU on that hardware, or one given) and its cells say "projected at MFU x%".
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from pixart_ds.config import Config, to_dict
from pixart_ds.hardware import A100_PEAK_TFLOPS, GPU_PEAKS, V100_PEAK_TFLOPS
from pixart_ds.model.flops import image_flops

SECONDS_PER_DAY = 86_400
PAPER_V100_TO_A100 = 2.2  # the paper's assumed A100-over-V100 speed-up
SD15_A100_DAYS = 6_250  # Stable Diffusion v1.5, the paper's comparison row
PAPER_A100_DAYS = 753  # ICLR version: "12% of SD v1.5's training time (753 vs 6,250 A100 GPU days)"
PAPER_V1_A100_DAYS = 675  # arXiv v1: "10.8% (675 vs 6,250)"
PAPER_PERCENT = 12.0
PAPER_V1_PERCENT = 10.8


@dataclass(frozen=True)
class PaperStage:
    """One row of the paper's Table 4 (Appendix A.5), V100 GPUs."""

    recipe: str  # our recipe file stem for this stage
    stage: str
    data: str
    resolution: int
    steps: int
    per_gpu_batch: int
    gpus: int
    v100_days: float

    @property
    def global_batch(self) -> int:
        return self.per_gpu_batch * self.gpus

    @property
    def images(self) -> int:
        return self.steps * self.global_batch

    @property
    def implied_images_per_s_per_gpu(self) -> float:
        """The per-V100 throughput that the paper's own V100-days imply."""
        return self.images / (self.v100_days * SECONDS_PER_DAY)


PAPER_TABLE4: tuple[PaperStage, ...] = (
    PaperStage("stage1_imagenet256", "1 pixel dependency", "1M ImageNet", 256, 300_000, 128, 8, 88),
    PaperStage("stage2_sam256", "2 text-image alignment", "10M SAM-LLaVA", 256, 150_000, 178, 64, 672),
    PaperStage("stage3_hq256", "3 high aesthetics", "14M HQ", 256, 90_000, 178, 64, 416),
    PaperStage("stage3_hq512", "3 high aesthetics", "14M HQ", 512, 100_000, 40, 64, 320),
    PaperStage("stage3_hq1024", "3 high aesthetics", "14M HQ", 1024, 16_000, 12, 32, 160),
)
PAPER_BY_RECIPE = {p.recipe: p for p in PAPER_TABLE4}


def stage_images(cfg: Config) -> int:
    return cfg.train.total_steps * cfg.train.global_batch_size


def gpu_days(images: float, images_per_s_per_gpu: float) -> float:
    return images / images_per_s_per_gpu / SECONDS_PER_DAY


def model_signature(model: dict, resolution: int) -> tuple:
    """What must match for a throughput measurement to stand for a recipe's stage."""
    keys = ("depth", "hidden_size", "num_heads", "patch_size", "adaln", "condition", "multi_scale", "pred_sigma",
            "caption_channels", "max_text_tokens")
    return tuple(model.get(k) for k in keys) + (resolution,)


def _cfg_signature(cfg: Config) -> tuple:
    return model_signature(to_dict(cfg.model), cfg.data.resolution)


def record_signature(rec: dict) -> tuple:
    return model_signature(rec["config"]["model"], rec["config"]["data"]["resolution"])


def choose_hardware(records: list[dict], recipes: list[tuple[str, Config]]) -> str | None:
    """The hardware slug with the most stages measured at the recipe's own model; ties go to one with a peak."""
    sigs = {name: _cfg_signature(cfg) for name, cfg in recipes}
    score: dict[str, tuple[int, int, int]] = {}
    for r in records:
        hw = r["hardware"]["slug"]
        matched = int(sigs.get(r.get("recipe_name")) == record_signature(r))
        m, p, n = score.get(hw, (0, 0, 0))
        score[hw] = (m + matched, int(r["hardware"].get("peak_tflops") is not None), n + 1)
    return max(score, key=lambda k: score[k]) if score else None


def plan(recipes: list[tuple[str, Config]], records: list[dict], hardware: str | None = None,
         mfu: float | None = None) -> dict:
    """Rows of the GPU-days report.

    recipes: (recipe stem, Config) per stage, in stage order. records: throughput JSON dicts (benchmarks/throughput.py).
    hardware: a hardware slug to report on (default: `choose_hardware`). mfu: the MFU (0..1) used for stages without a
    matching measurement (default: the mean measured MFU on that hardware, else the mean MFU of any run on it).
    """
    hardware = hardware or choose_hardware(records, recipes)
    on_hw = [r for r in records if r["hardware"]["slug"] == hardware]
    hw_name = on_hw[0]["hardware"]["name"] if on_hw else None
    peak = on_hw[0]["hardware"].get("peak_tflops") if on_hw else None
    if not on_hw and hardware:  # a pure projection onto a device in the peak table (e.g. --hardware a100 --mfu 0.4)
        hw_name, peak = hardware, next((pk for _, slug, pk, _ in GPU_PEAKS if slug == hardware), None)
    measured: dict[str, dict] = {}
    for r in on_hw:  # the latest matching record per recipe wins
        name = r.get("recipe_name")
        cfg = dict(recipes).get(name)
        if cfg is not None and record_signature(r) == _cfg_signature(cfg):
            if name not in measured or r.get("timestamp", "") >= measured[name].get("timestamp", ""):
                measured[name] = r
    mfu_source = "given"
    if mfu is None:
        vals = [r["results"]["mfu"] for r in measured.values() if r["results"].get("mfu")]
        mfu_source = "mean measured MFU of the stages above"
        if not vals:
            vals = [r["results"]["mfu"] for r in on_hw if r["results"].get("mfu")]
            mfu_source = "mean MFU of the runs on this hardware (other model sizes)"
        mfu = sum(vals) / len(vals) if vals else None
        if mfu is None:
            mfu_source = "none"

    rows = []
    for name, cfg in recipes:
        f = image_flops(cfg)
        images = stage_images(cfg)
        paper = PAPER_BY_RECIPE.get(name)
        row = {
            "recipe": name, "stage": cfg.stage, "resolution": cfg.data.resolution, "steps": cfg.train.total_steps,
            "global_batch": cfg.train.global_batch_size, "images": images, "model_flops_per_image": f.train,
            "paper": None,
        }
        if paper is not None:
            ips = paper.implied_images_per_s_per_gpu
            row["paper"] = {
                "v100_days": paper.v100_days, "a100_days": paper.v100_days / PAPER_V100_TO_A100,
                "images": paper.images, "implied_images_per_s_per_v100": ips,
                "implied_mfu_v100": ips * f.train / (V100_PEAK_TFLOPS * 1e12),
            }
        rec = measured.get(name)
        if rec is not None:
            res = rec["results"]
            ips = res["images_per_s_per_device"]
            row_mfu = res.get("mfu")
            row.update(source="measured", images_per_s_per_gpu=ips, mfu=row_mfu, gpu_days=gpu_days(images, ips),
                       measurement=rec.get("report"))
        elif mfu and peak:
            ips = mfu * peak * 1e12 / f.train
            row.update(source="projected", images_per_s_per_gpu=ips, mfu=mfu, gpu_days=gpu_days(images, ips))
        else:
            row.update(source="projected" if mfu else "missing", images_per_s_per_gpu=None, mfu=mfu, gpu_days=None)
        m = row["mfu"]
        row["a100_days"] = images * f.train / (m * A100_PEAK_TFLOPS * 1e12) / SECONDS_PER_DAY if m else None
        if row["gpu_days"] is not None and peak:
            v100_eq = row["gpu_days"] * peak / V100_PEAK_TFLOPS
            row["v100_equivalent_days"] = v100_eq
            row["a100_days_paper_rule"] = v100_eq / PAPER_V100_TO_A100
        else:
            row["v100_equivalent_days"] = row["a100_days_paper_rule"] = None
        rows.append(row)

    def total(key, sub=None):
        vals = [(r[sub][key] if sub else r[key]) for r in rows if (r[sub] if sub else r) is not None]
        return sum(vals) if vals and all(v is not None for v in vals) else None

    totals = {
        "images": sum(r["images"] for r in rows),
        "gpu_days": total("gpu_days"),
        "a100_days": total("a100_days"),
        "a100_days_paper_rule": total("a100_days_paper_rule"),
        "paper_v100_days": total("v100_days", "paper"),
        "paper_a100_days": total("a100_days", "paper"),
    }
    for k in ("a100_days", "a100_days_paper_rule", "paper_a100_days"):
        totals[f"{k}_percent_of_sd15"] = 100 * totals[k] / SD15_A100_DAYS if totals[k] is not None else None
    return {
        "hardware": hardware, "hardware_name": hw_name, "peak_tflops": peak, "projection_mfu": mfu,
        "projection_mfu_source": mfu_source, "rows": rows, "totals": totals,
        "constants": {"sd15_a100_days": SD15_A100_DAYS, "paper_a100_days": PAPER_A100_DAYS,
                      "paper_percent": PAPER_PERCENT, "paper_v1_a100_days": PAPER_V1_A100_DAYS,
                      "paper_v1_percent": PAPER_V1_PERCENT, "v100_to_a100": PAPER_V100_TO_A100,
                      "a100_peak_tflops": A100_PEAK_TFLOPS, "v100_peak_tflops": V100_PEAK_TFLOPS},
    }


# ------------------------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------------------------


def _n(x, fmt="{:,.0f}"):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _cell(row, key, fmt="{:,.1f}"):
    v = row.get(key)
    if v is None:
        return "no measurement" if row["source"] == "missing" else "—"
    s = fmt.format(v)
    if row["source"] == "projected":
        s += f" (projected at MFU {100 * row['mfu']:.0f}%)"
    return s


def render_markdown(p: dict, title: str = "GPU-days per stage", extra: str = "") -> str:
    hw = p["hardware_name"] or p["hardware"] or "no hardware"
    peak = f"{p['peak_tflops']:g} TFLOP/s" if p["peak_tflops"] else "no vendor peak"
    lines = [f"# {title}", "", f"Hardware: **{hw}** (`{p['hardware']}`, peak {peak}).", ""]
    lines += [
        "| stage | recipe | px | steps | global batch | images | paper V100-days | paper A100-days (/2.2) "
        "| paper img/s/V100 (implied MFU) | ours img/s/GPU | ours MFU | ours GPU-days | ours A100-days (FLOP rule) "
        "| ours A100-days (paper rule) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in p["rows"]:
        pp = r["paper"] or {}
        implied = (f"{pp['implied_images_per_s_per_v100']:.2f} ({100 * pp['implied_mfu_v100']:.0f}%)"
                   if pp else "—")
        mfu = "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%" + (" (projected)" if r["source"] == "projected"
                                                                         else "")
        lines.append(
            f"| {r['stage']} | {r['recipe']} | {r['resolution']} | {r['steps']:,} | {r['global_batch']:,} "
            f"| {r['images'] / 1e6:,.1f}M | {_n(pp.get('v100_days'))} | {_n(pp.get('a100_days'), '{:,.1f}')} "
            f"| {implied} | {_cell(r, 'images_per_s_per_gpu', '{:,.2f}')} | {mfu} | {_cell(r, 'gpu_days')} "
            f"| {_cell(r, 'a100_days')} | {_cell(r, 'a100_days_paper_rule')} |")
    t = p["totals"]
    lines.append(
        f"| **total** | | | | | {t['images'] / 1e6:,.1f}M | **{_n(t['paper_v100_days'])}** "
        f"| **{_n(t['paper_a100_days'], '{:,.1f}')}** | | | | **{_n(t['gpu_days'], '{:,.1f}')}** "
        f"| **{_n(t['a100_days'], '{:,.1f}')}** | **{_n(t['a100_days_paper_rule'], '{:,.1f}')}** |")
    c = p["constants"]
    lines += [
        "",
        "Against Stable Diffusion v1.5's 6,250 A100-days:",
        "",
        "| | A100-days | % of SD v1.5 |",
        "|---|---|---|",
        f"| paper (ICLR): 1,656 V100-days / 2.2 | {c['paper_a100_days']:,} | {c['paper_percent']}% |",
        f"| paper (arXiv v1) | {c['paper_v1_a100_days']:,} | {c['paper_v1_percent']}% |",
        f"| Table 4 as printed, / 2.2 | {_n(t['paper_a100_days'], '{:,.1f}')} "
        f"| {_n(t['paper_a100_days_percent_of_sd15'], '{:.2f}')}% |",
        f"| ours, FLOP rule | {_n(t['a100_days'], '{:,.1f}')} | {_n(t['a100_days_percent_of_sd15'], '{:.2f}')}% |",
        f"| ours, paper rule | {_n(t['a100_days_paper_rule'], '{:,.1f}')} "
        f"| {_n(t['a100_days_paper_rule_percent_of_sd15'], '{:.2f}')}% |",
        "",
        "## Rule",
        "",
        "- images = train.total_steps x train.global_batch_size of each recipe; GPU-days = images / (images/s per GPU)"
        " / 86,400, with images/s per GPU measured by `benchmarks/throughput.py` on the production `train_step` at the"
        " recipe's model, resolution and per-GPU batch (one GPU; data loading and inter-GPU communication excluded).",
        "- MFU = model FLOPs per image (`pixart_ds.model.flops`: matrix products, forward + backward = 3 x forward,"
        " no recomputation) x images/s / the device's dense bf16 peak.",
        f"- A100-days, FLOP rule: the same images and FLOPs at the same MFU on an A100's {c['a100_peak_tflops']:g}"
        " TFLOP/s peak.",
        f"- A100-days, paper rule: V100-equivalent days at the same MFU ({c['v100_peak_tflops']:g} TFLOP/s fp16)"
        f" divided by the paper's {c['v100_to_a100']} A100-over-V100 speed-up.",
        "- paper img/s/V100 is what Table 4's V100-days imply (images / V100-days / 86,400); implied MFU is that"
        " throughput x our model FLOPs / 125 TFLOP/s.",
    ]
    if p["projection_mfu"] is not None:
        lines.append(f"- Projected cells use MFU {100 * p['projection_mfu']:.1f}% ({p['projection_mfu_source']}).")
    lines.append("- Excluded, as in the paper: VAE/T5 feature extraction, LLaVA captioning, VAE training.")
    measured = [r for r in p["rows"] if r["source"] == "measured" and r.get("measurement")]
    if measured:
        lines += ["", "Measurements: " + ", ".join(f"`{r['measurement']}`" for r in measured) + "."]
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"


def plot(p: dict, path: str) -> None:
    """Grouped bars per stage (paper V100-days, paper A100-days, ours GPU-days, ours A100-days) and totals vs SD v1.5."""
    import matplotlib  # heavy: only the report plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy (see above); after use("Agg"), so no display is needed

    rows = p["rows"]
    labels = [f"{r['recipe']}\n{r['resolution']} px" for r in rows]
    series = [
        ("paper V100-days", [(r["paper"] or {}).get("v100_days") for r in rows], "#9e9e9e", None),
        ("paper A100-days (/2.2)", [(r["paper"] or {}).get("a100_days") for r in rows], "#616161", None),
        (f"ours GPU-days ({p['hardware_name'] or p['hardware']})", [r["gpu_days"] for r in rows], "#1f77b4", None),
        ("ours A100-days (FLOP rule)", [r["a100_days"] for r in rows], "#ff7f0e", None),
    ]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 1.3]})
    width = 0.2
    for i, (name, vals, color, _) in enumerate(series):
        for j, v in enumerate(vals):
            if v is None:
                continue
            proj = rows[j]["source"] == "projected" and name.startswith("ours")
            ax.bar(j + (i - 1.5) * width, v, width, color=color, hatch="//" if proj else None,
                   edgecolor="white" if proj else None, label=name if j == next(
                       (k for k, x in enumerate(vals) if x is not None), None) else None)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("GPU-days")
    ax.set_title("per stage (hatched: projected)")
    ax.legend(fontsize=8)
    t = p["totals"]
    names = ["SD v1.5", "paper (753)", "Table 4 / 2.2", "ours (FLOP rule)", "ours (paper rule)"]
    vals = [SD15_A100_DAYS, PAPER_A100_DAYS, t["paper_a100_days"], t["a100_days"], t["a100_days_paper_rule"]]
    keep = [(n, v) for n, v in zip(names, vals) if v is not None]
    ax2.barh([n for n, _ in keep], [v for _, v in keep], color=["#d62728", "#616161", "#9e9e9e", "#ff7f0e",
                                                                 "#2ca02c"][: len(keep)])
    for k, (_, v) in enumerate(keep):
        ax2.text(v, k, f" {v:,.0f} ({100 * v / SD15_A100_DAYS:.1f}%)", va="center", fontsize=8)
    ax2.set_xlabel("A100-days (total)")
    ax2.set_xlim(0, SD15_A100_DAYS * 1.35)
    ax2.set_title("total vs SD v1.5")
    fig.suptitle("PixArt-α training cost" + (f" — {p['hardware_name']}" if p["hardware_name"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_records(paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        with open(path) as f:
            rec = json.load(f)
        if rec.get("schema") != "pixart_ds.throughput/1":
            continue  # other JSONs in benchmarks/results (vs_reference, ablation, gpu-days)
        out.append(rec)
    return out
