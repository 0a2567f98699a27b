"""Named model sizes. Pure data (no torch) so the config layer can read it.

PixArt-XL/2 is the paper's model (Chen et al. 2023, §2.4 / Appendix A.5): 28 blocks, hidden 1152, 16 heads,
patch 2. The L/B/S sizes follow DiT's table (Peebles & Xie 2023, Table 1). `tiny` is for tests and the demo.
"""

PRESETS: dict[str, dict] = {
    "PixArt-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),
    "PixArt-L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2),
    "PixArt-B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "PixArt-S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "tiny": dict(depth=2, hidden_size=48, num_heads=3, patch_size=2),
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})")
    return dict(PRESETS[name])
