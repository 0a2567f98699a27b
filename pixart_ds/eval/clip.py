"""CLIP score with a local CLIP (a transformers `from_pretrained` folder: CLIPModel + CLIPProcessor; nothing is
downloaded), per image-caption pair, the way torchmetrics' CLIPScore computes it (functional/multimodal/clip_score.py):
the processor gets the uint8 image tensors and the captions (padded; captions longer than the text model's
positions are cut to them), the embeddings are L2-normalised and the pair's score is 100 x their dot product.
Kept per pair so shards can be merged in index order; pixart_ds.eval.metrics.clip_score averages them.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from transformers import CLIPModel, CLIPProcessor


def load_clip(path: str, device="cpu", what: str = "--clip"):
    """(CLIPModel in eval mode, CLIPProcessor) from a local folder."""
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{what}: {path}: not a CLIP folder (config.json missing; a transformers "
                                f"CLIPModel + CLIPProcessor saved with save_pretrained)")
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"{what}: {path}: cannot load a CLIPModel + CLIPProcessor ({first})") from None
    return model.to(device).eval().requires_grad_(False), processor


@torch.no_grad()
def clip_pair_scores(model, processor, images: torch.Tensor, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """uint8 images [N, 3, H, W] and N captions -> float64 [N]: 100 x cos(image embedding, caption embedding)."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} captions")
    dev = next(model.parameters()).device
    max_pos = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", None)
    out = []
    for i in range(0, len(texts), batch_size):
        imgs = [im.cpu() for im in images[i:i + batch_size]]
        px = processor(images=imgs, return_tensors="pt", padding=True)["pixel_values"].to(dev)
        fi = model.get_image_features(px)
        tok = processor(text=list(texts[i:i + batch_size]), return_tensors="pt", padding=True)
        ids, mask = tok["input_ids"], tok["attention_mask"]
        if max_pos is not None and ids.shape[-1] > max_pos:
            warnings.warn(f"captions longer than CLIP's {max_pos} positions are cut to them")
            ids, mask = ids[..., :max_pos], mask[..., :max_pos]
        ft = model.get_text_features(ids.to(dev), mask.to(dev))
        fi = fi / fi.norm(p=2, dim=-1, keepdim=True)
        ft = ft / ft.norm(p=2, dim=-1, keepdim=True)
        out.append((100 * (fi * ft).sum(-1)).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)
