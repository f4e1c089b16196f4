"""Test helper: the fused q/k/v projection's gradient rows as the unfused path makes them (the RoPE
backward kernels on dq and dk, dv's strided cast, all in bf16), what the attention backward's
``qkv_rows`` must write bit for bit; on a GPU (``cudacall.call``) or in the interpreter (``ptxsim.launch``)."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ptxgen.kernels.cast import CastSpec
from ptxgen.kernels.rope import RopeSpec
from ptxgen.vecio import DType


def projection_rows(run: Callable[..., list[np.ndarray]], grads: dict[str, np.ndarray], positions: np.ndarray,
                    heads: int, kv_heads: int, head_dim: int, theta: float) -> np.ndarray:
    """The rows' bf16 bits [tokens, (heads + 2 kv_heads) x head_dim] from the attention's
    own ``grads`` dq, dk, dv; ``run(spec, (grid, block), *args)`` launches a kernel on arrays."""
    tokens, d = positions.size, head_dim
    width = (heads + 2 * kv_heads) * d
    rows16 = np.zeros((tokens, width), np.uint16)
    for name, start, count in (("dq", 0, heads), ("dk", heads * d, kv_heads), ("dv", (heads + kv_heads) * d, kv_heads)):
        x, n = grads[name].reshape(tokens, count * d), count * d
        # the kernel's y from its first column on: the rows' other columns stay NaN
        y = np.full(tokens * width - start, 0x7FC0, np.uint16)
        spec: Any
        if name == "dv":
            spec = CastSpec(dst=DType.BF16, strided=True)
            y = run(spec, spec.launch_dims(tokens * n), *spec.arguments(x, y, tokens, n, n, width))[1]
        else:
            spec = RopeSpec(heads=count, head_dim=d, theta=theta, inverse=True, strided=True, bf16_out=True)
            y = run(spec, spec.launch_dims(tokens), *spec.arguments(x, y, positions, tokens, n, width))[1]
        rows16[:, start:start + n] = np.concatenate([np.zeros(start, y.dtype), y]).reshape(tokens, width)[
            :, start:start + n]
    return rows16
