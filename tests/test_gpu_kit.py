"""The offline GPU kit (benchmarks/gpu_kit.py): built by its one command, under the 64 MiB the device tool carries,
installed with `pip install --no-index` into a clean virtual environment that holds only torch, and then everything
the GPU benchmark imports imports (deepspeed, streaming, diffusers, pixart_ds, benchmarks/gpu_mfu.py).

How "a clean venv holding only torch" is made cheaply and honestly: `python -m venv --without-pip` (no system site
packages), plus one .pth file naming a folder of symlinks to exactly the installed distributions of torch and its
own requirements (the closure of torch's Requires-Dist, evaluated for this machine), torchvision (the build made for
that torch, which no kit can carry for an unknown torch) and pillow (torchvision's requirement). Nothing else of this
machine's site-packages is visible: numpy, transformers, deepspeed, streaming, pyyaml, ... must come from the kit.
Installing torch into a fresh venv instead would copy a 5.5 GB CUDA build for every run; symlinks expose the same
files in well under a second. The kit is built for this machine's Python (`--base torch --python-version 3.11`,
the same command as the GPU kit), and installed by `gpu_kit.install_command`, the line gpu_check.sh runs on the GPU.
It brings numpy >= 2.2 and transformers 5.17 (the GPU image's versions are numpy 2.5.2 and transformers 5.17), past
the numpy<2.2 / transformers<5 pins of mosaicml-streaming 0.13 that --no-deps bypasses.

The H200 kit itself (Python 3.12 wheels) is built too and checked for size and content; its wheels cannot be
imported here (no Python 3.12 torch on this machine).
"""
import glob
import importlib.metadata as md
import json
import os
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import gpu_kit  # noqa: E402


def _closure(roots) -> dict:
    seen, todo = {}, list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional requirement this machine does not have
        seen[name] = dist
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _expose(dists: dict, dest: str) -> None:
    """Symlink every top-level file or folder of each distribution (its .dist-info included) into `dest`."""
    os.makedirs(dest, exist_ok=True)
    for dist in dists.values():
        base = str(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or []}:
            src, dst = os.path.join(base, top), os.path.join(dest, top)
            if top not in ("..", "__pycache__") and not top.endswith(".data") and os.path.exists(src) \
                    and not os.path.lexists(dst):
                os.symlink(src, dst)


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    root = tmp_path_factory.mktemp("kits")
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    bare = gpu_kit.build(str(root / "bare"), base="torch", python_version=pyver)
    h200 = gpu_kit.build(str(root / "h200"), base="h200-image", python_version="3.12")
    return root, bare, h200


def test_h200_kit_is_small_and_complete(kits):
    root, _, m = kits
    names = {gpu_kit.wheel_name(w) for w in m["wheels"]}
    assert {"deepspeed", "mosaicml-streaming", "diffusers", "hjson", "pydantic", "pydantic-core", "zstd",
            "python-snappy", "brotli"} <= names
    assert not names & {gpu_kit._canon(n) for n in gpu_kit.IMAGE_PACKAGES}  # nothing that would shadow the image
    assert all("cp312" in w or "py3-none" in w or "abi3" in w or "py2.py3" in w for w in m["wheels"]), m["wheels"]
    size = sum(os.path.getsize(p) for p in glob.glob(str(root / "h200" / "*.whl")))
    assert size == m["bytes"] and size < gpu_kit.LIMIT_BYTES
    assert json.load(open(root / "h200" / "kit.json"))["base"] == "h200-image"
    ds = next(w for w in m["wheels"] if w.startswith("deepspeed-"))
    assert ds.endswith("-py3-none-any.whl")  # DS_BUILD_OPS=0: no compiled op inside


def test_clean_venv_with_only_torch_imports_everything_from_the_kit(kits, tmp_path):
    root, m, _ = kits
    assert m["bytes"] < gpu_kit.LIMIT_BYTES
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    host = tmp_path / "host_torch"
    dists = _closure(["torch"])  # torch and its own requirements
    dists.update({n: md.distribution(n) for n in ("torchvision", "pillow")})  # not torchvision's numpy
    _expose(dists, str(host))
    with open(os.path.join(site, "_host_torch.pth"), "w") as f:
        f.write(str(host) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONNOUSERSITE="1")
    # Before the kit: torch imports, numpy does not (the venv really is clean; torchvision needs the kit's numpy).
    p = subprocess.run([py, "-c", "import torch\ntry:\n import numpy\nexcept ImportError: print('clean')"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0 and p.stdout.strip() == "clean", p.stdout + p.stderr
    target = tmp_path / "site"
    # pip itself is this machine's (the venv has none); it only unpacks the kit's wheels into the target
    subprocess.run(gpu_kit.install_command(str(root / "bare"), str(target)), check=True, env=env)
    env["PYTHONPATH"] = f"{target}:{REPO}"
    code = ("import torchvision, deepspeed, streaming, diffusers, numpy, transformers\n"
            "import pixart_ds.train.zero, pixart_ds.data.loader, pixart_ds.train.trainer, pixart_ds.model.encoders\n"
            "print(deepspeed.__version__, streaming.__version__, numpy.__version__, transformers.__version__)")
    p = subprocess.run([py, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    ds_v, st_v, np_v, tf_v = p.stdout.split()[-4:]
    assert (ds_v, st_v) == ("0.19.8", "0.13.0")
    assert tuple(int(x) for x in np_v.split(".")[:2]) >= (2, 2) and tf_v.startswith("5.")  # past streaming's pins
    # Everything the GPU benchmark imports, checked by the script itself.
    p = subprocess.run([py, os.path.join(REPO, "benchmarks", "gpu_mfu.py"), "--check-imports"], capture_output=True,
                       text=True, env=env, cwd=str(tmp_path))
    assert p.returncode == 0 and "imports ok" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]
