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
