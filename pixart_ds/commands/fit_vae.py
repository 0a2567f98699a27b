"""`pixart-ds fit-vae --out DIR`: fit the demo's small AutoencoderKL to the embedded dataset
(pixart_ds.data.synthetic_vae; the shipped one is pixart_ds/data/assets/synthetic_vae)."""
from __future__ import annotations

import json
import os

from pixart_ds.data.synthetic_vae import fit


def main(a) -> int:
    stats = fit(a.out, steps=a.steps, batch_size=a.batch_size, num_images=a.num_images,
                workers=a.workers or os.cpu_count() or 2)
    print(json.dumps(stats))
    return 0
