"""`pixart-ds features --in RAW --out FEAT --vae VAE [--text-encoder T5]`: raw MDS -> feature MDS (VAE posterior +
T5 tokens), one slice per rank (pixart_ds.data.features)."""
from __future__ import annotations

from pixart_ds.data.features import extract_features


def main(a) -> int:
    return extract_features(inp=a.inp, out=a.out, vae=a.vae, text_encoder=a.text_encoder, resolution=a.resolution,
                            multi_scale=a.multi_scale, batch_size=a.batch_size, class_labels=a.class_labels)
