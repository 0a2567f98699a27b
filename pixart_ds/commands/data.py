"""`pixart-ds data imagenet|sam|journeydb|folder|synthetic ... --out OUT`: raw datasets -> raw MDS shards
(pixart_ds.data.convert)."""
from __future__ import annotations

from pixart_ds.data import convert as dconv


def main(a) -> int:
    kw = dict(out=a.out, workers=a.workers, shard_size_limit=a.shard_size_limit)
    if a.kind == "imagenet":
        dconv.imagenet(a.root, **kw)
    elif a.kind == "sam":
        dconv.sam(a.root, captions=a.captions, **kw)
    elif a.kind == "journeydb":
        dconv.journeydb(a.root, annotations=a.annotations, text=a.text, **kw)
    elif a.kind == "folder":
        dconv.folder(a.root, index=a.index, **kw)
    elif a.kind == "synthetic":
        dconv.synthetic(num_samples=a.num_samples, resolution=a.resolution, seed=a.seed, **kw)
    else:
        raise ValueError(f"unknown data kind {a.kind}")
    return 0
