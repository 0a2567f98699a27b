"""`pixart-ds keys [--markdown] [--grep TEXT]`: every recipe key, its default and its one-line description (the
docstrings of pixart_ds/config.py's dataclasses)."""
from __future__ import annotations

from pixart_ds import config


def main(a) -> int:
    if a.markdown:
        print(config.keys_markdown(), end="")
        return 0
    rows = [r for r in config.describe_keys() if not a.grep or a.grep in r[0]]
    if not rows:
        raise ValueError(f"--grep {a.grep!r}: no recipe key contains it")
    width = max(len(k) for k, _, _ in rows)
    for key, default, doc in rows:
        print(f"{key:<{width}}  {default:<14} {doc}")
    return 0
