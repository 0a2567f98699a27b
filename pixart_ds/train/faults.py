"""Fault injection for the exact-resume and reliability tests (tests/test_resume.py, tests/reliability/).

The environment is read ONCE, by `Faults.from_env()` at the start of a command, and the resulting object is passed
to the code that injects the fault; no production module reads these variables. Unset variables inject nothing,
so `NO_FAULTS` is what every production run carries.

    PIXART_DS_TEST_KILL_AT_STEP=N              every rank SIGKILLs itself right after optimizer step N (1-based),
                                               before its checkpoint, as a node failure or `scancel -s KILL` would
    PIXART_DS_TEST_KILL_IN_SAVE_AT_STEP=N      every rank SIGKILLs itself inside the save of step N, after DeepSpeed
                                               wrote its files and before pixart_ds.json / `latest` are written
    PIXART_DS_TEST_STOP_RANK_BEFORE_STEP=N:R   rank R SIGSTOPs itself before fetching the data of step N, as a hung
                                               node would between two steps
    PIXART_DS_INJECT_NAN_AT_STEP=N | N-M | N,M rank 0's loss is NaN at those steps, so every rank's reduced
                                               gradients are non-finite
    PIXART_DS_CAPTION_KILL_AFTER_BATCHES=N     `pixart-ds caption` SIGKILLs itself after writing N batches
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Mapping, Optional

KILL_AT_STEP = "PIXART_DS_TEST_KILL_AT_STEP"
KILL_IN_SAVE_AT_STEP = "PIXART_DS_TEST_KILL_IN_SAVE_AT_STEP"
STOP_RANK_BEFORE_STEP = "PIXART_DS_TEST_STOP_RANK_BEFORE_STEP"
NAN_AT_STEP = "PIXART_DS_INJECT_NAN_AT_STEP"
CAPTION_KILL_AFTER_BATCHES = "PIXART_DS_CAPTION_KILL_AFTER_BATCHES"


def parse_steps(spec: str) -> frozenset[int]:
    """"3", "3-5", "3,7,9-10" -> the set of step numbers."""
    out: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.update(range(int(lo), int(hi) + 1))
        else:
            out.add(int(part))
    return frozenset(out)


def _int(environ: Mapping[str, str], name: str) -> int:
    raw = environ.get(name, "")
    try:
        return int(raw) if raw else 0
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a step number") from None


@dataclass(frozen=True)
class Faults:
    kill_at_step: int = 0
    kill_in_save_at_step: int = 0
    stop_rank_before_step: Optional[tuple[int, int]] = None  # (step, rank)
    nan_steps: frozenset[int] = frozenset()
    caption_kill_after_batches: int = 0

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Faults":
        env = os.environ if environ is None else environ
        stop = tuple(int(x) for x in env.get(STOP_RANK_BEFORE_STEP, "").split(":") if x)
        if stop and len(stop) != 2:
            raise ValueError(f"{STOP_RANK_BEFORE_STEP}={env[STOP_RANK_BEFORE_STEP]!r}: expected STEP:RANK")
        return cls(kill_at_step=_int(env, KILL_AT_STEP), kill_in_save_at_step=_int(env, KILL_IN_SAVE_AT_STEP),
                   stop_rank_before_step=stop or None, nan_steps=parse_steps(env.get(NAN_AT_STEP, "")),
                   caption_kill_after_batches=_int(env, CAPTION_KILL_AFTER_BATCHES))

    def before_fetch(self, step: int, rank: int) -> None:
        """Before the data of (1-based) `step` is fetched."""
        if self.stop_rank_before_step == (step, rank):
            os.kill(os.getpid(), signal.SIGSTOP)

    def poison_loss(self, step: int, rank: int) -> bool:
        """Whether rank `rank` makes the loss of `step` NaN."""
        return rank == 0 and step in self.nan_steps

    def after_step(self, step: int) -> None:
        if self.kill_at_step and step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def in_save(self, step: int) -> None:
        """Inside a save, with every file written and before the checkpoint is marked complete."""
        if self.kill_in_save_at_step and step == self.kill_in_save_at_step:
            os.kill(os.getpid(), signal.SIGKILL)


NO_FAULTS = Faults()
