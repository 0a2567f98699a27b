"""FID, KID and CLIP score from per-image features, computed by torchmetrics itself.

Features are extracted once per image (pixart_ds.eval.inception, pixart_ds.eval.clip) and kept per shard, so a
sharded, resumable evaluation only has to hand the library the features in index order: `fid` and `kid` feed them
to torchmetrics' FrechetInceptionDistance / KernelInceptionDistance through an identity "feature extractor" (the
metrics' documented custom-feature path), so the statistics, the matrix square root (torchmetrics' eigenvalue form)
and the KID estimator are the library's. Cached reference statistics (mean and covariance, with or without the
features) are loaded into the metric's own sums.

KID draws random subsets (torchmetrics uses torch.randperm on the global generator): it runs under
torch.random.fork_rng with a fixed seed, so the number is reproducible and the caller's RNG state is untouched.

CLIP score follows torchmetrics' CLIPScore: 100 x cosine of the image and caption embeddings per pair, averaged,
and the average clamped at 0.
"""
from __future__ import annotations

import numpy as np
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

# Every metric here sees this process's features only: ranks meet through the feature shards on disk
# (pixart_ds.eval.shards), and in training only rank 0 evaluates. torchmetrics would otherwise all-gather its states
# across the process group at compute() and wait forever for ranks that are training.
LOCAL = {"sync_on_compute": False, "dist_sync_on_step": False}


class _Precomputed(torch.nn.Module):
    """The identity on [N, D] feature rows: the 'network' torchmetrics runs when the features are already there."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = int(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _fid_metric(dim: int):
    return FrechetInceptionDistance(feature=_Precomputed(dim), reset_real_features=False, **LOCAL)


def load_reference_into(metric, ref: dict) -> None:
    """Set a FrechetInceptionDistance's real-image sums from reference statistics {n, mu, sigma} (or features):
    sum = n mu, cov_sum = (n - 1) sigma + n mu mu^T, which its compute() turns back into mu and sigma exactly."""
    if ref.get("features") is not None:
        metric.update(torch.from_numpy(np.asarray(ref["features"], dtype=np.float64)), real=True)
        return
    n = int(ref["n"])
    mu = torch.from_numpy(np.asarray(ref["mu"], dtype=np.float64))
    sigma = torch.from_numpy(np.asarray(ref["sigma"], dtype=np.float64))
    metric.real_features_sum = n * mu
    metric.real_features_cov_sum = (n - 1) * sigma + n * torch.outer(mu, mu)
    metric.real_features_num_samples = torch.tensor(n, dtype=torch.long)


def fid(gen_features: np.ndarray, ref: dict) -> float:
    """FID between generated features [N, D] and reference statistics (see load_reference_into)."""
    feats = np.asarray(gen_features, dtype=np.float64)
    if len(feats) < 2:
        raise ValueError(f"FID needs at least 2 generated images, got {len(feats)}")
    m = _fid_metric(feats.shape[1])
    load_reference_into(m, ref)
    m.update(torch.from_numpy(feats), real=False)
    return float(m.compute())


def stats(features: np.ndarray) -> dict:
    """{n, mu, sigma} of features [N, D] as torchmetrics computes them (float64, unbiased covariance)."""
    m = _fid_metric(features.shape[1])
    f = torch.from_numpy(np.asarray(features, dtype=np.float64))
    m.update(f, real=True)
    n = int(m.real_features_num_samples)
    mu = m.real_features_sum / n
    sigma = (m.real_features_cov_sum - n * torch.outer(mu, mu)) / (n - 1)
    return {"n": n, "mu": mu.numpy(), "sigma": sigma.numpy()}


def kid(gen_features: np.ndarray, ref_features: np.ndarray | None, subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> dict | None:
    """{"mean", "std", "subsets", "subset_size"} of torchmetrics' KID (polynomial kernel of degree 3), or None
    without reference features. subset_size is lowered to the smaller set's size."""
    if ref_features is None:
        return None
    g = np.asarray(gen_features, dtype=np.float64)
    r = np.asarray(ref_features, dtype=np.float64)
    size = int(min(subset_size, len(g), len(r)))
    if size < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {len(g)} generated and {len(r)} reference")
    m = KernelInceptionDistance(feature=_Precomputed(g.shape[1]), subsets=int(subsets), subset_size=size,
                                reset_real_features=False, **LOCAL)
    m.update(torch.from_numpy(r), real=True)
    m.update(torch.from_numpy(g), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        mean, std = m.compute()
    return {"mean": float(mean), "std": float(std), "subsets": int(subsets), "subset_size": size}


def clip_score(per_image: np.ndarray) -> float:
    """torchmetrics' CLIPScore from per-pair scores (100 x cosine): max(mean, 0)."""
    s = np.asarray(per_image, dtype=np.float64)
    return float(max(s.mean(), 0.0)) if len(s) else float("nan")


def alignment(verdicts: list[dict]) -> dict:
    """The embedded dataset's judge (pixart_ds.data.synthetic.judge) over a set: the fraction of images whose
    shape, colour and background all match ("alignment"), and each attribute's fraction."""
    n = len(verdicts)
    out = {"n": n, "alignment": sum(bool(v["ok"]) for v in verdicts) / n if n else float("nan")}
    for k in ("shape", "color", "background", "size", "position"):
        out[k] = sum(bool(v[k]) for v in verdicts) / n if n else float("nan")
    return out
