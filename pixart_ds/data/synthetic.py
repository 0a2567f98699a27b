"""The embedded dataset: procedurally drawn shapes with exact captions, class labels and a pixel-level judge.

Every image shows one shape (circle, square, triangle or cross) of one palette colour, small or large, centred in one
cell of a 3x3 grid (with a little jitter), on a plain background of another palette colour. Everything is a
deterministic function of (seed, index), so the demo and the tests rebuild the same data anywhere:

    attrs = attributes(index, seed)   # {"shape", "color", "background", "size", "position", "jitter"}
    img = render(attrs, 256)          # PIL RGB, 4x supersampled then box-filtered (anti-aliased edges)
    caption(attrs)                    # "a small red circle in the top left on a blue background"
    label(attrs)                      # shape x colour class index in [0, NUM_CLASSES) for stage 1
    parse_prompt(caption(attrs))      # the attributes back (without jitter)
    judge(img, attrs)                 # {"shape": bool, "color": bool, "background": bool, "ok": bool, ...}

`held_out_prompts` gives captions whose (shape, colour, background) triple never occurs in training, to score
compositional generalisation. The judge reads pixels only, so it scores generated images as well as rendered ones:
background = nearest palette colour to the median of the border pixels; object = the largest connected region of
pixels far from the background; colour = nearest palette colour to the object's eroded median; shape = the template
(drawn into the object's bounding box exactly as `render` draws it) with the highest IoU against the object mask.
"""
from __future__ import annotations

import random
import re
from typing import Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Palette chosen far apart in RGB (smallest pairwise distance ~190 of 441), so blur, noise and a VAE round trip do
# not move a colour to a neighbour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 200, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SIZES: dict[str, float] = {"small": 0.2, "large": 0.32}  # bounding-box side / image side
_ROWS = ("top", "center", "bottom")
_COLS = ("left", "center", "right")


def _pos_name(r: int, c: int) -> str:
    if r == 1 and c == 1:
        return "center"
    return f"{_ROWS[r]} {_COLS[c]}"


POSITIONS: tuple[str, ...] = tuple(_pos_name(r, c) for r in range(3) for c in range(3))
_POS_RC = {_pos_name(r, c): (r, c) for r in range(3) for c in range(3)}
NUM_CLASSES = len(SHAPES) * len(COLORS)  # stage-1 class = shape x colour
_JITTER = 0.04  # max centre offset from the cell centre, as a fraction of the image side

# (shape, colour, background) triples kept out of training: 10% of the 120, fixed for every seed so a model trained
# on one seed's data is scored on combinations it never saw.
_TRIPLES = [(s, c, b) for s in SHAPES for c in COLORS for b in COLORS if b != c]
HELD_OUT: frozenset = frozenset(random.Random(20231004).sample(_TRIPLES, len(_TRIPLES) // 10))
TRAIN_TRIPLES: tuple = tuple(t for t in _TRIPLES if t not in HELD_OUT)

Attrs = dict


def _sample(rng: np.random.Generator, triples) -> Attrs:
    shape, color, background = triples[int(rng.integers(len(triples)))]
    return {
        "shape": shape,
        "color": color,
        "background": background,
        "size": ("small", "large")[int(rng.integers(2))],
        "position": POSITIONS[int(rng.integers(len(POSITIONS)))],
        "jitter": (float(rng.uniform(-_JITTER, _JITTER)), float(rng.uniform(-_JITTER, _JITTER))),
    }


def attributes(index: int, seed: int = 0) -> Attrs:
    """The attributes of training sample `index` of dataset `seed` (a pure function of both)."""
    rng = np.random.default_rng([int(seed), int(index), 0x5A17])
    return _sample(rng, TRAIN_TRIPLES)


def label(attrs: Attrs) -> int:
    return SHAPES.index(attrs["shape"]) * len(COLORS) + COLORS.index(attrs["color"])


def label_name(index: int) -> str:
    return f"{COLORS[index % len(COLORS)]} {SHAPES[index // len(COLORS)]}"


def caption(attrs: Attrs) -> str:
    return (f"a {attrs['size']} {attrs['color']} {attrs['shape']} in the {attrs['position']} "
            f"on a {attrs['background']} background")


_PROMPT_RE = re.compile(
    r"^\s*an?\s+(?P<size>\w+)\s+(?P<color>\w+)\s+(?P<shape>\w+)\s+in\s+the\s+(?P<position>[a-z ]+?)\s+"
    r"on\s+an?\s+(?P<background>\w+)\s+background\s*\.?\s*$", re.IGNORECASE)


def parse_prompt(text: str) -> Attrs:
    """Attributes of a caption written by `caption` (jitter 0); ValueError naming the text if it is not one."""
    m = _PROMPT_RE.match(text)
    if not m:
        raise ValueError(f"not a synthetic-shapes prompt: {text!r}")
    a = {k: v.lower() for k, v in m.groupdict().items()}
    a["position"] = " ".join(a["position"].split())
    for key, allowed in (("size", SIZES), ("color", PALETTE), ("shape", SHAPES), ("position", POSITIONS),
                         ("background", PALETTE)):
        if a[key] not in allowed:
            raise ValueError(f"not a synthetic-shapes prompt: {text!r} ({key} {a[key]!r} not in {list(allowed)})")
    a["jitter"] = (0.0, 0.0)
    return a


def held_out_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` captions whose (shape, colour, background) triple is in HELD_OUT, i.e. never in training."""
    rng = np.random.default_rng([int(seed), 0x4E1D])
    triples = sorted(HELD_OUT)
    return [caption(_sample(rng, triples)) for _ in range(n)]


# ------------------------------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------------------------------

_SS = 4  # supersampling factor: draw at 4x, box-filter down -> anti-aliased edges like a real image


def _box(attrs: Attrs, resolution: int) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) of the shape in pixels."""
    r, c = _POS_RC[attrs["position"]]
    side = SIZES[attrs["size"]]
    half = side / 2
    jx, jy = attrs.get("jitter", (0.0, 0.0))
    cx = min(max((c + 0.5) / 3 + jx, half + 0.01), 1 - half - 0.01)
    cy = min(max((r + 0.5) / 3 + jy, half + 0.01), 1 - half - 0.01)
    return ((cx - half) * resolution, (cy - half) * resolution, (cx + half) * resolution, (cy + half) * resolution)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":  # apex up, base along the bottom of the box
        draw.polygon([(x0 + w / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":  # a plus sign with arms a third of the box wide
        draw.rectangle([x0, y0 + h / 3, x1, y1 - h / 3], fill=fill)
        draw.rectangle([x0 + w / 3, y0, x1 - w / 3, y1], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")


def render(attrs: Attrs, resolution: int = 256) -> Image.Image:
    """The RGB image of `attrs`, `resolution` x `resolution` pixels."""
    big = resolution * _SS
    im = Image.new("RGB", (big, big), PALETTE[attrs["background"]])
    box = tuple(v * _SS for v in _box(attrs, resolution))
    _draw_shape(ImageDraw.Draw(im), attrs["shape"], box, PALETTE[attrs["color"]])
    return im.resize((resolution, resolution), Image.BOX)


def _template(shape: str, hw: tuple[int, int], box) -> np.ndarray:
    """Boolean mask [H, W] of `shape` drawn into `box` (pixel coords, inclusive extent) as `render` would."""
    H, W = hw
    im = Image.new("L", (W * _SS, H * _SS), 0)
    _draw_shape(ImageDraw.Draw(im), shape, tuple(v * _SS for v in box), 255)
    return np.asarray(im.resize((W, H), Image.BOX)) >= 128


# ------------------------------------------------------------------------------------------------------------------
# Judge
# ------------------------------------------------------------------------------------------------------------------

_JUDGE_SIDE = 96  # judge at this size: enough for the smallest shape (19 px), fast for connected components
_PAL = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)


def _nearest_color(rgb: np.ndarray) -> str:
    return COLORS[int(np.argmin(((_PAL - rgb[None]) ** 2).sum(1)))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (min-label propagation; masks here are <= 96x96)."""
    if not mask.any():
        return mask
    H, W = mask.shape
    big = H * W + 1
    lab = np.where(mask, np.arange(H * W).reshape(H, W), big)
    while True:
        m = lab.copy()
        m[1:, :] = np.minimum(m[1:, :], lab[:-1, :])
        m[:-1, :] = np.minimum(m[:-1, :], lab[1:, :])
        m[:, 1:] = np.minimum(m[:, 1:], lab[:, :-1])
        m[:, :-1] = np.minimum(m[:, :-1], lab[:, 1:])
        m = np.where(mask, m, big)
        if np.array_equal(m, lab):
            break
        lab = m
    vals, counts = np.unique(lab[mask], return_counts=True)
    return lab == vals[np.argmax(counts)]


def _to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:  # [3, H, W] tensor layout
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float32)
        if arr.min() < -0.01:  # [-1, 1] (the VAE's range)
            arr = (arr + 1) * 127.5
        elif arr.max() <= 1.0 + 1e-6:  # [0, 1]
            arr = arr * 255
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def detect(image) -> dict:
    """What the image shows, read from pixels: {"shape", "color", "background", "size", "position"} (shape/colour/
    size/position None when no object stands out from the background)."""
    im = _to_pil(image).resize((_JUDGE_SIDE, _JUDGE_SIDE), Image.BOX).filter(ImageFilter.MedianFilter(3))
    arr = np.asarray(im, dtype=np.float32)
    H, W, _ = arr.shape
    b = 2
    border = np.concatenate([arr[:b].reshape(-1, 3), arr[-b:].reshape(-1, 3), arr[:, :b].reshape(-1, 3),
                             arr[:, -b:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    found = {"background": _nearest_color(bg), "shape": None, "color": None, "size": None, "position": None}
    dist = np.sqrt(((arr - bg[None, None]) ** 2).sum(-1))
    mask = _largest_component(dist > 60.0)  # palette colours are >= ~190 apart; edges blend half-way
    if mask.sum() < 0.01 * H * W:  # nothing there
        return found
    inner = mask.copy()
    inner[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    inner[[0, -1], :] = False
    inner[:, [0, -1]] = False
    px = arr[inner] if inner.sum() >= 4 else arr[mask]
    found["color"] = _nearest_color(np.median(px, axis=0))
    ys, xs = np.nonzero(mask)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    ious = {}
    for s in SHAPES:
        t = _template(s, (H, W), box)
        ious[s] = float((t & mask).sum()) / float((t | mask).sum())
    found["shape"] = max(ious, key=ious.get)
    side = max(box[2] - box[0], box[3] - box[1]) / W
    found["size"] = min(SIZES, key=lambda k: abs(SIZES[k] - side))
    cx, cy = (box[0] + box[2]) / 2 / W, (box[1] + box[3]) / 2 / H
    found["position"] = _pos_name(min(2, max(0, int(cy * 3))), min(2, max(0, int(cx * 3))))
    return found


def judge(image, attrs: Union[Attrs, str]) -> dict:
    """Does `image` (PIL, uint8 HxWx3, or a [3, H, W] tensor in [-1, 1]) show `attrs` (or a caption)?
    Returns {"shape", "color", "background", "ok" (all three), "size", "position": bools, "detected": dict}.
    `ok` scores prompt alignment as shape + colours; size and position are reported beside it."""
    if isinstance(attrs, str):
        attrs = parse_prompt(attrs)
    d = detect(image)
    r = {k: d[k] == attrs[k] for k in ("shape", "color", "background", "size", "position")}
    r["ok"] = r["shape"] and r["color"] and r["background"]
    r["detected"] = d
    return r
