"""Inception-v3 pool features for FID / KID through torchmetrics (its NoTrainInceptionV3 = torch-fidelity's port of
the TensorFlow FID graph), with the weights read from a local file given once: nothing is downloaded.

Preprocessing is the standard one of the FID reference implementation (TTUR, torch-fidelity): images are quantised
to uint8 first (the PNG a user would save: pixart_ds.diffusion.sampling.to_pil's rounding), then resized to 299 x 299
with TensorFlow 1's bilinear resize (no antialias: torchmetrics' `antialias=False`), scaled to [-1, 1], and the 2,048
average-pool features are taken.

`save_random_inception` writes a randomly initialised network in the same file format (a state dict for
torch-fidelity's FeatureExtractorInceptionV3): the tests use it, and so do the CPU ablations, where no pretrained
weights can be had (benchmarks/results/ablation_*.md says what an FID on such features means).
"""
from __future__ import annotations

import hashlib
import os
import tempfile

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torchmetrics.image.fid import NoTrainInceptionV3

from pixart_ds.fsutil import atomic_write

FEATURE_DIM = 2048
INPUT_SIZE = 299


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def load_inception(path: str, what: str = "--inception"):
    """torchmetrics' NoTrainInceptionV3 (2,048 pool features, TF1 bilinear resize) with the weights in `path`."""
    if not path:
        raise FileNotFoundError(f"{what}: no Inception-v3 weights file given (FID/KID need one; nothing is "
                                f"downloaded: pass the pt_inception-2015-12-05 .pth that torch-fidelity uses)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: Inception-v3 weights file not found: {path}")
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(FEATURE_DIM)],
                                 feature_extractor_weights_path=path, antialias=False)
    except (RuntimeError, KeyError, EOFError, OSError, ValueError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"{what}: {path} is not an Inception-v3 state dict for torch-fidelity's "
                         f"FeatureExtractorInceptionV3 ({type(e).__name__}: {first})") from None
    return net.eval()


@torch.no_grad()
def inception_features(net, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """uint8 images [N, 3, H, W] -> float64 pool features [N, 2048] (float32 inside the network)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    dev = next(net.parameters()).device
    out = [net(images[i:i + batch_size].to(dev)).double().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM))


def save_random_inception(path: str, seed: int = 0) -> str:
    """A randomly initialised Inception-v3 in torch-fidelity's weight format, reproducible from `seed` (on a local
    generator: the global RNG is untouched). Convolutions are He-normal (fan-in, ReLU gain) and batch norms the
    identity, so activations keep their scale through the 94 layers and the pool features are not degenerate;
    the classifier is N(0, 0.01). Written atomically."""

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # skip the pretrained load in __init__
            return None

    with tempfile.TemporaryDirectory() as d:
        empty = os.path.join(d, "empty.pt")
        torch.save({}, empty)
        net = _Unloaded("inception-v3-compat", [str(FEATURE_DIM)], feature_extractor_weights_path=empty)
    g = torch.Generator().manual_seed(int(seed))
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.data = torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.fill_(1.0)
            m.bias.data.zero_()
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
        elif isinstance(m, torch.nn.Linear):
            m.weight.data = torch.randn(m.weight.shape, generator=g) * 0.01
            m.bias.data.zero_()
    sd = {k: v.float().contiguous() for k, v in net.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save(sd, tmp))
    return path
