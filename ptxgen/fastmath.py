"""The special-function unit's one-instruction forms, for the exponentials of softmax, the
cross-entropy and SiLU's sigmoid.

``ex2.approx.ftz`` and ``rcp.approx.ftz`` are one MUFU operation each; the forms without ``.ftz``
add instructions around it for subnormal inputs and results, which SwiGLU's and the attention's
epilogues pay per element (on the H200, 2026-12-02: the down projection's dX with SwiGLU's backward
4.61 -> 4.04 ms over the 8x1024 step's 24 layers, the step's attention 7.04 -> 6.72 ms). What the
flush changes is below 1e-36 absolute: a 2^x under 2^-126 becomes 0, which a sum of exponentials
holding its maximum's 1 cannot see, and so does a reciprocal past 2^126 (SiLU's sigmoid at
g < -87: silu(g) = g * sigmoid(g) becomes 0 instead of about -1e-36)."""
from __future__ import annotations

from .builder import KernelBuilder, Reg


def exp2(b: KernelBuilder, x: Reg) -> Reg:
    """2^x (f32), within 2 ulp; below 2^-126, 0."""
    return b.fn("ex2", x, "approx.ftz")


def reciprocal(b: KernelBuilder, x: Reg) -> Reg:
    """1 / x (f32), within 1 ulp; past 2^126, 0."""
    return b.fn("rcp", x, "approx.ftz")
