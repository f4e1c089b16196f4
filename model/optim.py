"""The optimizer settings and learning-rate schedule shared by every training backend."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ptxgen.kernels.adamw import NORM_EPS, AdamWSpec
from ptxgen.spec import SpecError

from .settings import OutOfRange, check_types, flag, require

BAKED = ("beta1", "beta2", "eps", "weight_decay")  # the AdamW kernel's immediates (AdamWSpec's fields)


@dataclass(frozen=True)
class AdamWSettings:
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0  # global-norm clipping; 0 disables it

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("beta1", "beta2"):
            require(0 <= getattr(self, name) < 1, name, "in [0, 1)", getattr(self, name))
        # the GPU optimizer takes them in f32 (eps must not round to 0 there), whichever backend runs now:
        # a checkpoint's settings go on with it (the CPU took a weight decay of 1e300 and diverged)
        with np.errstate(over="ignore"):
            eps32, decay32, norm32 = (np.float32(v) for v in (self.eps, self.weight_decay, self.max_grad_norm))
        require(0 < eps32 < np.inf, "eps", "> 0 and representable in f32", self.eps)
        require(0 <= decay32 < np.inf, "weight_decay", ">= 0 and representable in f32", self.weight_decay)
        require(0 <= norm32 < np.inf, "max_grad_norm", ">= 0 (0 turns clipping off) and representable in f32",
                self.max_grad_norm)
        # and what the GPU kernel bakes is refused here by the kernel's own rules (a beta that rounds to
        # 1 in f32, a subnormal), each setting alone (the others at their defaults) so the line names it
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in BAKED}
        for name in BAKED:
            try:
                AdamWSpec(**{**defaults, name: getattr(self, name)})
            except SpecError as e:
                raise OutOfRange(f"{flag(name)}: {e} (the GPU optimizer bakes it so, whichever device trains)") \
                    from None


def clip_scale(norm: float, max_norm: float) -> float:
    """What global-norm clipping multiplies the gradients by (``max_norm`` 0: no clipping), as
    torch's clip_grad_norm_ and the GPU's norm kernel."""
    return min(1.0, max_norm / (norm + NORM_EPS)) if max_norm > 0 else 1.0


def decays(name: str) -> bool:
    """Weight decay applies to matrices only, not to norm weights or biases."""
    return not (name.endswith(".bias") or name.endswith("norm.weight"))


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps to ``peak``, then cosine decay to ``peak * min_ratio``.

    ``step`` counts from 1 (the step about to be taken).
    """
    if warmup and step <= warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
