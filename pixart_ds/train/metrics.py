"""Training observability on rank 0: a progress bar, RUN_DIR/metrics.jsonl, TensorBoard, and W&B when installed.

One JSON object per line. Step records (every `log.every_steps` steps, and every step that was skipped):

    {"step": 120, "loss": ..., "mse": ..., "vb": ..., "grad_norm": ..., "lr": ..., "loss_avg": ...,
     "images_seen": ..., "images_per_s_per_gpu": ..., "mfu": ... (GPU with a known peak only),
     "peak_mem_gib": ..., "skipped": 0.0, "skipped_total": 0, "time": unix seconds,
     "data_skipped": corrupt samples replaced in this step's global batch (data.on_corrupt=skip; every step that
     has one is recorded), "data_skipped_total": ... since the run began,
     "sample_idx": [...] (only with log.sample_ids)}

loss/mse/vb/grad_norm/lr are those of the step itself (global-batch means); loss_avg averages the steps since the
previous record; images/s per GPU counts only time spent in data loading + train_step (not checkpoints or
sample grids). Event records carry "event": "start" | "resume" | "checkpoint" | "sample" | "stop" | "nonfinite" |
"corrupt_data" | "rank_lost".
A resumed run appends: a step may appear twice (before the kill and after the resume); readers keep the last.

MFU = model FLOPs per image (pixart_ds.model.flops) x images/s per GPU / the GPU's peak (pixart_ds.hardware). The
counters (images seen, skipped steps and samples) are the run's TrainState (train/state.py); this module reports them.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from typing import Optional

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pixart_ds import config as C
from pixart_ds.hardware import peak_for_name
from pixart_ds.model.flops import train_flops_per_image
from pixart_ds.train.state import TrainState


def _flops_per_image(cfg) -> Optional[float]:
    try:
        return float(train_flops_per_image(cfg))
    except Exception:  # an architecture the counter does not know: MFU is optional
        return None


def _peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    _, peak_tflops, _ = peak_for_name(torch.cuda.get_device_name(device))
    return peak_tflops * 1e12 if peak_tflops else None


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _clean(v):
    """JSON has no NaN/inf: write them as strings so a bad step stays visible."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class Metrics:
    """Rank 0 writes; on other ranks every method is a no-op."""

    def __init__(self, cfg: C.Config, run_dir: str, rank: int, world_size: int, device: torch.device,
                 start_step: int):
        self.cfg = cfg
        self.enabled = rank == 0
        self.world_size = world_size
        self.every = max(1, int(cfg.log.every_steps))
        self._interval_loss: list[float] = []
        self._interval_images = 0.0
        self._interval_seconds = 0.0
        self.device = device
        self.flops_per_image = _flops_per_image(cfg) if self.enabled else None
        self.peak_flops = _peak_flops(device) if self.enabled else None
        self.last: dict = {}
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._bar = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard is a separate package

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError as e:  # tensorboard is a dependency; tolerate its absence but say so
                print(f"pixart-ds train: TensorBoard disabled ({e})", file=sys.stderr)
        if cfg.log.wandb:
            try:
                import wandb  # noqa: F401  (optional: `pip install pixart_ds[wandb]`)
            except ImportError:
                print("pixart-ds train: log.wandb is true but wandb is not installed; skipping W&B",
                      file=sys.stderr)
            else:
                self._wandb = self._init_wandb(run_dir)
        if cfg.log.progress_bar:
            tty = sys.stderr.isatty()
            self._bar = tqdm(total=cfg.train.total_steps, initial=start_step, desc=cfg.name, unit="step",
                             dynamic_ncols=True, mininterval=0.5 if tty else 30.0, file=sys.stderr)

    def _init_wandb(self, run_dir):
        import wandb  # optional (see __init__)

        id_path = os.path.join(run_dir, "wandb_id")
        if os.path.exists(id_path):
            run_id = open(id_path).read().strip()
        else:
            run_id = wandb.util.generate_id()
            with open(id_path, "w") as f:
                f.write(run_id)
        return wandb.init(project="pixart_ds", name=self.cfg.name, id=run_id, resume="allow", dir=run_dir,
                          config=C.to_dict(self.cfg))

    # ------------------------------------------------------------------------------------------------------------
    def write(self, record: dict) -> None:
        if self._jsonl is not None:
            record = {k: _clean(v) for k, v in record.items()}
            self._jsonl.write(json.dumps(record) + "\n")

    def event(self, kind: str, step: int, **fields) -> None:
        if not self.enabled:
            return
        self.write({"event": kind, "step": step, "time": time.time(), **fields})
        if self._bar is not None and kind in ("checkpoint", "resume", "stop", "nonfinite"):
            self._bar.write(f"[step {step}] {kind}: " + ", ".join(f"{k}={v}" for k, v in fields.items()))

    def step(self, state: TrainState, out: dict, seconds: float, sample_idx: Optional[list] = None) -> None:
        """Record optimizer step `state.step` (`out` from train_step; `seconds` of data loading + compute)."""
        step = state.step
        data_skipped = int(out.get("data_skipped", 0))
        if not self.enabled:
            return
        self._interval_loss.append(out["loss"])
        self._interval_images += out["images"]
        self._interval_seconds += seconds
        if self._bar is not None:
            self._bar.update(1)
        if step % self.every and not out["skipped"] and not data_skipped and sample_idx is None and \
                step != self.cfg.train.total_steps:
            return
        ips = self._interval_images / max(self._interval_seconds, 1e-9) / self.world_size
        rec = {"step": step, "loss": out["loss"], "mse": out["mse"], "vb": out["vb"], "grad_norm": out["grad_norm"],
               "lr": out["lr"], "loss_avg": sum(self._interval_loss) / len(self._interval_loss),
               "images_seen": state.images_seen, "images_per_s_per_gpu": ips,
               "peak_mem_gib": peak_memory_gib(self.device), "skipped": out["skipped"],
               "skipped_total": state.skipped_total, "data_skipped": data_skipped,
               "data_skipped_total": state.data_skipped_total, "time": time.time()}
        if "loss_scale" in out:
            rec["loss_scale"] = out["loss_scale"]
        if self.flops_per_image and self.peak_flops:
            rec["mfu"] = self.flops_per_image * ips / self.peak_flops
        if sample_idx is not None:
            rec["sample_idx"] = sample_idx
        self.write(rec)
        self.last = rec
        if self._tb is not None:
            for k in ("loss", "mse", "vb", "grad_norm", "lr", "loss_avg", "images_per_s_per_gpu", "peak_mem_gib",
                      "skipped_total", "data_skipped_total", "mfu", "loss_scale"):
                if k in rec and isinstance(rec[k], (int, float)) and math.isfinite(rec[k]):
                    self._tb.add_scalar(f"train/{k}", rec[k], step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in rec.items() if k != "sample_idx"}, step=step)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{rec['loss_avg']:.4f}", lr=f"{rec['lr']:.2e}", img_s=f"{ips:.1f}",
                                  refresh=False)
        self._interval_loss.clear()
        self._interval_images = 0.0
        self._interval_seconds = 0.0

    def scalars(self, group: str, values: dict, step: int) -> None:
        """Finite scalars as TensorBoard `group/name` (and W&B) at `step` (the evaluation's metrics)."""
        vals = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self._tb is not None:
            for k, v in vals.items():
                self._tb.add_scalar(f"{group}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{group}/{k}": v for k, v in vals.items()}, step=step)

    def image(self, tag: str, path: str, step: int) -> None:
        if self._tb is not None:
            try:
                self._tb.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
            except Exception as e:  # a grid that cannot be shown must not stop training
                print(f"pixart-ds train: could not log {path} to TensorBoard: {e}", file=sys.stderr)
        if self._wandb is not None:
            import wandb  # optional (see __init__)

            self._wandb.log({tag: wandb.Image(path)}, step=step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def read_metrics(path: str) -> tuple[dict[int, dict], list[dict]]:
    """(last step record per step, events) from a metrics.jsonl (a resumed run repeats the steps it redid)."""
    steps, events = {}, []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            if "event" in rec:
                events.append(rec)
            else:
                steps[int(rec["step"])] = rec
    return steps, events
