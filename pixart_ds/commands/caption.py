"""`pixart-ds caption --in RAW --out DIR --model LLAVA`: LLaVA re-captioning, one slice per rank
(pixart_ds.data.recaption)."""
from __future__ import annotations

from pixart_ds.data.recaption import caption_mds
from pixart_ds.train.faults import Faults


def main(a) -> int:
    return caption_mds(inp=a.inp, out=a.out, model=a.model, prompt=a.prompt, batch_size=a.batch_size,
                       max_new_tokens=a.max_new_tokens,
                       kill_after_batches=Faults.from_env().caption_kill_after_batches)
