"""What a bare ``ptxgen train`` does on the machine it finds: a run that ends, in about two minutes,
with a model worth sampling from.

The figures beside each plan were measured on the machines named (start-up included); a flag given
on the command line always wins over the plan's value for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DefaultRun:
    preset: str
    precision: str
    settings: dict[str, Any]   # TrainSettings fields
    expect: str                # what the user should expect, said before the first step


GPU = DefaultRun(
    preset="small", precision="bf16",
    settings=dict(steps=6000, batch_size=32, seq_len=512, lr=2e-3, warmup=100, eval_every=500, eval_batches=8),
    expect="about 1.5 minutes on an H200 (val_loss about 0.82 nats per byte there, 0.72 to 0.87 as runs vary)")
CPU = DefaultRun(
    preset="tiny", precision="fp32",
    settings=dict(steps=400, batch_size=8, seq_len=128, lr=3e-3, warmup=50, eval_every=100, eval_batches=4),
    expect="about 1.5 minutes on 2 CPU cores (val_loss about 2.5 nats per byte there)")


def default_run(gpu: bool) -> DefaultRun:
    return GPU if gpu else CPU
