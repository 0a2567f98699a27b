"""MDS column sets. Raw shards hold encoded images; feature shards hold what training reads.

Raw shards (written by `pixart-ds data ...`): the image's encoded bytes (JPEG/PNG, kept as `bytes` so a corrupt
image is caught and named by our decoder rather than failing inside Streaming), its caption or class label, the
original size and a stable id.
"""

RAW_COLUMNS: dict[str, str] = {
    "id": "str",  # stable sample id, e.g. "sa_1234" or "n01440764/n01440764_10026"
    "image": "bytes",  # encoded image file bytes
    "caption": "str",  # "" when the source has none (ImageNet)
    "label": "int",  # class index; -1 when the source has none
    "width": "int",  # original width in pixels
    "height": "int",  # original height in pixels
    "source": "str",  # "imagenet" | "sam" | "journeydb" | "folder" | "synthetic"
}

# Feature shards (written by `pixart-ds features`): what training reads. Shapes are stored per sample
# (`ndarray:float16` without a fixed shape) so one schema serves every resolution and aspect-ratio bucket.
FEATURE_COLUMNS: dict[str, str] = {
    "id": "str",
    "vae_mean": "ndarray:float16",  # [C, h, w] VAE posterior mean (unscaled)
    "vae_std": "ndarray:float16",  # [C, h, w] VAE posterior std; the loader samples mean + std * eps, x 0.18215
    "t5": "ndarray:float16",  # [n, D] T5 tokens, unpadded (n = real tokens <= 120, incl. </s>); mask = n ones
    "caption": "str",
    "label": "int",  # class index; -1 for text data
    "height": "int",  # original image size in pixels
    "width": "int",
    "aspect_ratio": "float32",  # bucket key (rounded h / w, as official InternalData_ms feeds it); 1.0 single-scale
}

# Stage-1 (class-conditional) feature shards carry no text: MDS cannot encode an empty ndarray, so the "t5" column
# is absent rather than [0, D]. Readers branch on the model's condition (text | class), never on the column.
CLASS_FEATURE_COLUMNS: dict[str, str] = {k: v for k, v in FEATURE_COLUMNS.items() if k != "t5"}

# Multi-scale feature roots hold one stream (sub-directory, own index.json) per aspect-ratio bucket, named by
# pixart_ds.data.buckets.bucket_dirname(h, w) = "h{H}_w{W}" in pixels, e.g. "h256_w1024"; no index.json at the root.
