"""Exponential moving average of the weights, kept outside the ZeRO optimizer.

PixArt (official train.py, `update_ema(model_ema, model, 0.9999)`, following DiT) samples with EMA weights:
ema <- decay * ema + (1 - decay) * theta after every optimizer update, starting from a copy of the initial weights.

Under ZeRO-2 the module's parameters are replicated on every rank (only gradients and optimizer state are
partitioned: docs/stack.md), so the EMA is a plain fp32 copy of the module's state. It is kept on rank 0 only (the
rank that writes the checkpoint's client state and the sample grids), which saves its memory (4 bytes/parameter,
2.4 GB at XL/2) on every other rank. With bf16 training the module holds bf16 weights (the fp32 masters live in
the optimizer partitions); averaging the bf16-rounded weights in fp32 adds rounding noise of zero mean that the
average itself smooths out.

Buffers (e.g. the null caption y_embedding [120, 4096], a buffer as in the official code) are copied, not averaged.
"""
from __future__ import annotations

from typing import Optional

import torch


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float, enabled: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"train.ema_decay: must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.enabled = enabled
        self.num_updates = 0
        self.params: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        self._stage: Optional[list[torch.Tensor]] = None  # fp32 staging for non-fp32 module weights (update())
        if enabled:
            self.reset(module)

    @torch.no_grad()
    def reset(self, module: torch.nn.Module, state_dict: Optional[dict] = None) -> None:
        """Start from the module's current weights, or from `state_dict` (same keys, e.g. an earlier stage's EMA)."""
        if not self.enabled:
            return
        own = module.state_dict()
        src = state_dict if state_dict is not None else own
        self.params = {n: src[n].detach().to(device=p.device, dtype=torch.float32).clone()
                       for n, p in module.named_parameters()}
        self.buffers = {n: src[n].detach().to(device=b.device).clone()
                        for n, b in module.named_buffers() if n in own}
        self.num_updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * theta over all parameters with multi-tensor (foreach) kernels: one
        foreach copy casts bf16/fp16 weights into preallocated fp32 staging tensors (instead of one allocation and
        one cast kernel per parameter), one foreach lerp updates the EMA. Same arithmetic as a per-tensor
        `ema.lerp_(theta.float(), 1 - decay)` (tests/test_speed.py checks bit equality)."""
        if not self.enabled:
            return
        named = dict(module.named_parameters())
        ema = list(self.params.values())
        cur = [named[n].detach() for n in self.params]
        src = list(cur)
        low = [i for i, c in enumerate(cur) if c.dtype != torch.float32]
        if low:
            st = self._stage
            if st is None or len(st) != len(low) or any(t.shape != cur[i].shape or t.device != cur[i].device
                                                         for t, i in zip(st, low)):
                st = self._stage = [torch.empty(cur[i].shape, dtype=torch.float32, device=cur[i].device)
                                    for i in low]
            torch._foreach_copy_(st, [cur[i] for i in low])
            for t, i in zip(st, low):
                src[i] = t
        torch._foreach_lerp_(ema, src, 1.0 - self.decay)
        bufs = dict(module.named_buffers())
        pairs = [(t, bufs[n]) for n, t in self.buffers.items() if n in bufs]
        if pairs:
            torch._foreach_copy_([d for d, _ in pairs], [x for _, x in pairs])
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A module state_dict (fp32 parameters + buffers), on CPU: what `load_state_dict` of the model takes."""
        out = {n: t.detach().cpu().clone() for n, t in self.buffers.items()}
        out.update({n: t.detach().cpu().clone() for n, t in self.params.items()})
        return out

    def checkpoint_state(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "state_dict": self.state_dict()}

    def load_checkpoint_state(self, module: torch.nn.Module, state: dict) -> None:
        if not self.enabled:
            return
        self.reset(module, state["state_dict"])
        self.num_updates = int(state.get("num_updates", 0))

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Load the EMA weights into `module` (e.g. a separate copy used for sampling)."""
        module.load_state_dict(self.state_dict(), strict=True)
