#!/usr/bin/env python
"""The offline GPU kit: one folder of wheels that, installed with `pip install --no-index`, gives a GPU machine that
has torch everything the GPU benchmark and the GPU tests import (deepspeed, mosaicml-streaming, diffusers, ...).

    python benchmarks/gpu_kit.py build                          # gpu_kit/ for the H200 image (Python 3.12)
    python benchmarks/gpu_kit.py build --base torch --python-version 3.11 --out /tmp/kit   # a bare torch machine
    python benchmarks/gpu_kit.py install --kit gpu_kit --target /tmp/pixart_site            # on the GPU machine

`make gpu-kit` runs the first line. The kit folder is git-ignored; carry it to the GPU machine beside the repository
(benchmarks/README.md gives the exact command). `install` is what benchmarks/gpu_check.sh runs there: pip with
--no-index (nothing is fetched) and --no-deps (the machine's own torch, numpy and transformers stay), into a target
folder that goes on PYTHONPATH.

Two bases, i.e. what the GPU machine is assumed to have already:
- `h200-image` (default): the image of the H200 machines this project is lent (its package list is IMAGE_PACKAGES
  below: torch 2.11, torchvision, numpy 2.5, transformers 5.17, safetensors, pyyaml, psutil, einops, msgpack,
  ninja, ...). The kit holds only what that image lacks (IMAGE_LACKS). About 15 MiB.
- `torch`: a machine with torch and torchvision (the torchvision build made for that torch) and pillow, nothing
  else. The kit adds numpy, transformers and the rest that our imports need, resolved by pip for the target Python.
  tests/test_gpu_kit.py builds this one for the local Python and imports everything the GPU script imports from a
  clean virtual environment holding only torch + the kit.

Pins that are bypassed on purpose: mosaicml-streaming 0.13 declares numpy<2.2 and transformers<5 and setup.py
declares transformers<5; the GPU image has numpy 2.5 and transformers 5.17. The kit installs streaming with
--no-deps so the image's versions stay; tests/test_gpu_kit.py runs the imports against numpy >= 2.2 and
transformers 5 (the image's major version).

DeepSpeed publishes only an sdist. It is built here into a pure-Python wheel with DS_BUILD_OPS=0: no op is
compiled ahead; the ones a run needs are JIT-built on first use (the benchmark uses torch's fused AdamW and needs
none). The build imports torch, so it runs with this machine's torch (--no-build-isolation); the wheel is
py3-none-any and does not depend on the torch it was built with.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "gpu_kit")
LIMIT_BYTES = 64 * 2**20  # what the device tool carries beside the repository, in all

DEEPSPEED = "deepspeed==0.19.8"
STREAMING = "mosaicml-streaming==0.13.0"

# What `import deepspeed`, `import streaming` and `import diffusers` need that the H200 image lacks (found by
# importing each in an environment holding only the image's packages; streaming imports brotli, snappy (cramjam),
# zstd and catalogue at import time; boto3, paramiko and the cloud SDKs only when a remote source is used).
IMAGE_LACKS = (
    "hjson==3.1.0", "pydantic==2.13.4", "pydantic-core==2.46.4", "annotated-types==0.7.0",
    "typing-inspection==0.4.2",  # deepspeed
    "brotli==1.2.1", "python-snappy==0.7.3", "cramjam==2.14.0", "zstd==1.5.7.3", "catalogue==2.0.10",  # streaming
    "diffusers==0.39.0", "importlib-metadata==8.7.0",  # diffusers (model export, the reference comparison)
    "torch-fidelity==0.4.0",  # pixart-ds eval (Inception-v3 feature extractor; torchmetrics and scipy are there)
)

# The H200 image's packages (the device documentation's list, read 2026-11-17), for `--base h200-image` checks.
IMAGE_PACKAGES = (
    "absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi "
    "charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core "
    "cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock "
    "flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx "
    "huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin "
    "jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax "
    "llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack "
    "multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro "
    "nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft "
    "nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py "
    "nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript "
    "opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec "
    "patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo "
    "pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout "
    "pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors "
    "scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools "
    "shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server "
    "tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric "
    "torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 "
    "uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
).split()

# `--base torch`: resolved with their dependencies by pip for the target Python (none of them depends on torch).
# transformers is pinned at the image's version so the kit's test imports against the same major version.
BARE_TORCH_RESOLVED = (
    "numpy", "pyyaml", "safetensors", "tqdm", "einops", "msgpack", "ninja", "psutil", "py-cpuinfo", "xxhash",
    "transformers==5.17.0", "hjson", "pydantic", "brotli", "python-snappy", "zstd", "catalogue", "diffusers==0.39.0",
)
# Provided by the bare machine itself (torch's requirements + torchvision + pillow): never put into the kit.
BARE_TORCH_PROVIDED = ("torch", "torchvision", "pillow", "filelock", "typing-extensions", "sympy", "mpmath",
                       "networkx", "jinja2", "markupsafe", "fsspec", "setuptools", "triton")

# pip matches manylinux tags exactly: list the ones the wheels above are published with.
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64",
             "manylinux1_x86_64", "manylinux2010_x86_64", "manylinux_2_12_x86_64", "manylinux_2_5_x86_64")


def _canon(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def wheel_name(path: str) -> str:
    """The distribution name of a wheel file, canonicalised (pydantic_core-2.46.4-... -> pydantic-core)."""
    return _canon(os.path.basename(path).split("-")[0])


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"gpu_kit: error: {' '.join(cmd[3:5])} ... failed: {' | '.join(tail)}")


def _download(dest: str, specs, python_version: str, deps: bool) -> None:
    plat = [x for p in PLATFORMS for x in ("--platform", p)]
    _pip("download", "-q", "--disable-pip-version-check", "--only-binary=:all:", "--python-version", python_version,
         "--implementation", "cp", *plat, *([] if deps else ["--no-deps"]), "-d", dest, *specs)


def _deepspeed_wheel(dest: str, cache: str) -> None:
    """DeepSpeed's pure-Python wheel (DS_BUILD_OPS=0), built once per version and kept in `cache`."""
    version = DEEPSPEED.split("==")[1]
    cached = glob.glob(os.path.join(cache, f"deepspeed-{version}-py3-none-any.whl"))
    if not cached:
        os.makedirs(cache, exist_ok=True)
        env = dict(os.environ, DS_BUILD_OPS="0")
        cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
               "--no-build-isolation", "-w", cache, DEEPSPEED]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        cached = glob.glob(os.path.join(cache, f"deepspeed-{version}-py3-none-any.whl"))
        if p.returncode != 0 or not cached:
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            raise SystemExit(f"gpu_kit: error: building the {DEEPSPEED} wheel failed: {' | '.join(tail)}")
    shutil.copy2(cached[0], dest)


def build(out: str, base: str = "h200-image", python_version: str = "3.12", cache: str | None = None) -> dict:
    """Fill `out` (replaced atomically) with the kit's wheels and a kit.json manifest; returns the manifest."""
    cache = cache or os.path.join(os.path.expanduser("~"), ".cache", "pixart_ds", "gpu_kit")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".gpu_kit.", dir=parent)
    try:
        if base == "h200-image":
            _download(tmp, IMAGE_LACKS, python_version, deps=False)
        elif base == "torch":
            _download(tmp, BARE_TORCH_RESOLVED, python_version, deps=True)
            provided = {_canon(n) for n in BARE_TORCH_PROVIDED}
            for w in glob.glob(os.path.join(tmp, "*.whl")):
                if wheel_name(w) in provided:
                    os.remove(w)
        else:
            raise SystemExit(f"gpu_kit: error: --base {base!r}: one of h200-image, torch")
        _download(tmp, [STREAMING], python_version, deps=False)  # --no-deps: its numpy/transformers pins stay unmet
        _deepspeed_wheel(tmp, cache)
        wheels = sorted(os.path.basename(w) for w in glob.glob(os.path.join(tmp, "*.whl")))
        names = [wheel_name(w) for w in wheels]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:  # two versions of one package stop `pip install` on the GPU machine
            raise SystemExit(f"gpu_kit: error: two versions of {', '.join(dup)} in the kit")
        if base == "h200-image":
            clash = sorted(set(names) & {_canon(n) for n in IMAGE_PACKAGES})
            if clash:  # would shadow the image's own build on PYTHONPATH
                raise SystemExit(f"gpu_kit: error: {', '.join(clash)} is already in the H200 image")
        size = sum(os.path.getsize(os.path.join(tmp, w)) for w in wheels)
        manifest = {"base": base, "python_version": python_version, "wheels": wheels, "bytes": size,
                    "install": "python benchmarks/gpu_kit.py install --kit DIR --target SITE (pip --no-index "
                               "--no-deps --target SITE DIR/*.whl), then PYTHONPATH=SITE"}
        with open(os.path.join(tmp, "kit.json"), "w") as f:
            json.dump(manifest, f, indent=2)
        if size > LIMIT_BYTES:
            raise SystemExit(f"gpu_kit: error: the kit is {size / 2**20:.1f} MiB, over the "
                             f"{LIMIT_BYTES / 2**20:.0f} MiB the device tool carries")
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install_command(kit: str, target: str, python: str = sys.executable) -> list[str]:
    """The one install command (gpu_check.sh and the kit's test run exactly this): no index, no dependencies."""
    wheels = sorted(glob.glob(os.path.join(kit, "*.whl")))
    if not wheels:
        raise SystemExit(f"gpu_kit: error: {kit}: no wheels (build the kit first: make gpu-kit)")
    return [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps",
            "--no-compile", "--no-cache-dir", "--upgrade", "--target", target, *wheels]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("build", help="download/build the wheels into a folder")
    b.add_argument("--out", default=DEFAULT_OUT, help="kit folder (default gpu_kit/ in the repository, ignored)")
    b.add_argument("--base", default="h200-image", choices=["h200-image", "torch"],
                   help="what the GPU machine already has (default: the H200 image)")
    b.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    i = sub.add_parser("install", help="install a kit with pip --no-index into a target folder")
    i.add_argument("--kit", default=DEFAULT_OUT)
    i.add_argument("--target", required=True)
    a = p.parse_args(argv)
    if a.verb == "build":
        m = build(a.out, a.base, a.python_version)
        print(f"gpu_kit: {len(m['wheels'])} wheels, {m['bytes'] / 2**20:.1f} MiB for Python {m['python_version']} "
              f"(base {m['base']}) -> {a.out}")
        return 0
    p2 = subprocess.run(install_command(a.kit, a.target))
    return p2.returncode


if __name__ == "__main__":
    sys.exit(main())
