"""Shared fixtures: tiny encoders built once per session and loaded through the real from_pretrained paths."""
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory):
    from pixart_ds.model.encoders import make_tiny_t5

    return make_tiny_t5(str(tmp_path_factory.mktemp("tiny_t5")))


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    from pixart_ds.testing import make_tiny_vae

    return make_tiny_vae(str(tmp_path_factory.mktemp("tiny_vae")))


@pytest.fixture
def run_cli():
    """Run `pixart-ds ARGS...` as a user would, in a subprocess; returns CompletedProcess."""
    import subprocess

    def _run(*args, timeout=600, env=None, cwd=None, check=False):
        e = dict(os.environ)
        if env:
            e.update(env)
        p = subprocess.run([sys.executable, "-m", "pixart_ds.cli", *map(str, args)], capture_output=True, text=True,
                           timeout=timeout, env=e, cwd=cwd or REPO)
        if check and p.returncode != 0:
            raise AssertionError(f"pixart-ds {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    return _run
