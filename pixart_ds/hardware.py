"""What a benchmark ran on: the device, its peak FLOP/s, the software versions and the code revision.

Peak FLOP/s are the vendors' dense tensor-core numbers for the training precision (no 2:4 sparsity):
  A100 (SXM and PCIe) 312 TFLOP/s bf16; H100 SXM 989, H100 PCIe 756, H100 NVL 835; H200 989; H800 989;
  V100 125 TFLOP/s fp16 (V100 has no bf16; the paper trained on V100 in fp16).
Unknown GPUs and CPUs have no table entry: MFU against a vendor peak is then "n/a", and the reports use the
measured matrix-product rate of the same device instead (`measure_matmul_tflops`), labelled as such.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import time

import torch

# (pattern on torch.cuda.get_device_name, slug used in file names, dense TFLOP/s, what the number is)
# Order matters: the first match wins, so specific names come before general ones.
GPU_PEAKS: list[tuple[str, str, float, str]] = [
    (r"H200", "h200", 989.0, "bf16 dense (H200 SXM datasheet)"),
    (r"H100.*PCIe", "h100-pcie", 756.0, "bf16 dense (H100 PCIe datasheet)"),
    (r"H100.*NVL", "h100-nvl", 835.0, "bf16 dense (H100 NVL datasheet)"),
    (r"H100", "h100", 989.0, "bf16 dense (H100 SXM datasheet)"),
    (r"H800", "h800", 989.0, "bf16 dense (H800 SXM datasheet)"),
    (r"A100", "a100", 312.0, "bf16 dense (A100 datasheet)"),
    (r"A800", "a800", 312.0, "bf16 dense (A800 datasheet)"),
    (r"V100", "v100", 125.0, "fp16 tensor dense (V100 SXM2 datasheet)"),
]

A100_PEAK_TFLOPS = 312.0
V100_PEAK_TFLOPS = 125.0


def peak_for_name(name: str) -> tuple[str, float | None, str]:
    """(slug, peak TFLOP/s or None, note) for a device name such as 'NVIDIA H100 80GB HBM3'."""
    for pattern, slug, peak, note in GPU_PEAKS:
        if re.search(pattern, name, re.IGNORECASE):
            return slug, peak, note
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-") or "gpu"
    return slug, None, "no peak on record for this device"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_record(device: torch.device | str | None = None) -> dict:
    """Everything a report needs to name the hardware. `slug` is the file-name part (`h100`, `cpu-2core`)."""
    device = torch.device(device) if device is not None else default_device()
    rec: dict = {"type": device.type, "cpu_model": cpu_model(), "cpu_cores": cpu_cores(), "host": platform.node()}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        slug, peak, note = peak_for_name(props.name)
        rec.update(name=props.name, slug=slug, peak_tflops=peak, peak_rule=note, count=torch.cuda.device_count(),
                   memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
                   multiprocessors=props.multi_processor_count, driver=_nvidia_driver())
    else:
        cores = rec["cpu_cores"]
        rec.update(name=f"{cores}-core CPU ({rec['cpu_model']})", slug=f"cpu-{cores}core", peak_tflops=None,
                   peak_rule="no vendor peak for CPUs: MFU is against the measured fp32 matrix-product rate",
                   count=1, memory_gib=_mem_total_gib())
    return rec


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    """Library versions (from package metadata; nothing heavy is imported) and the code revision."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    for dist in ("deepspeed", "diffusers", "transformers", "mosaicml-streaming", "flash-attn", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    out["pixart_ds_commit"] = git_revision()
    return out


def git_revision() -> str | None:
    """`<sha>` or `<sha>-dirty` of the source tree this package runs from, None outside a checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # pixart_ds/hardware.py -> the checkout
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=20)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "pixart_ds"],
                               cwd=root, capture_output=True, text=True, timeout=20)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_tflops(device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                          n: int | None = None, seconds: float = 1.0) -> float:
    """Achieved TFLOP/s of a square n x n x n matrix product on random data: the practical ceiling of the device.

    Defaults: bf16 with n = 8192 on a GPU, fp32 with n = 1024 on a CPU. Runs for about `seconds` after one warm-up.
    """
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    torch.mm(a, b)
    synchronize(device)
    iters, t0 = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        iters += 1
        if iters % 4 == 0:
            synchronize(device)
            if time.perf_counter() - t0 >= seconds:
                break
    dt = time.perf_counter() - t0
    return 2 * n**3 * iters / dt / 1e12
