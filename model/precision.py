"""What the tensor-core work reads: fp32, or bf16 copies of its operands (mixed precision).

In bf16 the weights stay fp32 (the master copy AdamW updates) and the norms, RoPE, SwiGLU,
cross-entropy and optimizer compute in fp32; the operands of the linear layers' GEMMs (activations,
output gradients, weights) and of the attention (q, k, v, dO; it writes o in bf16) are rounded to
bf16, and every product is accumulated in fp32. ``round`` is that rounding for the references.
The gate and up projections' outputs are stored in bf16 too (``store``: what SwiGLU and its
backward read; torch's autocast stores every linear output so): at 8 x 1024 tokens of
Qwen2-0.5B their f32 copies were 7.6 GB, the largest activations. So are the backward's: the dX
GEMMs' outputs the norms' backward reads, and the q/k/v projection's output gradient (after the
attention's and RoPE's backward), which its bias's gradient sums (each f32 copy was written and
read back once a layer).
"""
from __future__ import annotations

import enum

import numpy as np

from ptxgen.vecio import DType, round_to


class Precision(enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"

    def round(self, x: np.ndarray) -> np.ndarray:
        """A GEMM operand as that GEMM reads it (float64 values)."""
        return round_to(x, DType.BF16) if self is Precision.BF16 else x

    def store(self, y: np.ndarray) -> np.ndarray:
        """A GEMM output (or gradient) as stored for the next kernel where the precision narrows it."""
        return self.round(y)

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.round(a) @ self.round(b)
