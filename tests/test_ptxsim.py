"""The interpreter (tests/ptxsim.py) reads the special functions' ``.ftz`` forms as the GPU does:
subnormal inputs and results are zeros of their sign (ptxgen/fastmath.py relies on it)."""
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ptxgen.builder import Addr, KernelBuilder, T
from ptxgen.spec import KernelSpec
from ptxsim import launch

TINY = np.finfo(np.float32).tiny  # 2^-126, the smallest normal f32


@dataclass(frozen=True)
class _Functions(KernelSpec):
    """Not a kernel of the library: each thread's x through ex2, rcp and lg2, with and without .ftz."""

    kind: ClassVar[str] = "ftz_functions"
    FORMS: ClassVar[tuple[tuple[str, str], ...]] = tuple((f, m) for f in ("ex2", "rcp", "lg2")
                                                         for m in ("approx", "approx.ftz"))

    def params(self):
        return (("x", T.U64), ("out", T.U64))

    def outputs(self):
        return ("out",)

    def build(self, b: KernelBuilder) -> None:
        tid = b.special("%tid.x")
        x = b.ld("global", T.F32, Addr(b.add(b.cvta_global(b.ld_param("x")), b.mul_wide(tid, 4))))
        out = b.add(b.cvta_global(b.ld_param("out")), b.mul_wide(tid, 4 * len(self.FORMS)))
        for i, (name, mode) in enumerate(self.FORMS):
            b.st("global", Addr(out, 4 * i), b.fn(name, x, mode))

    @classmethod
    def examples(cls):
        return [cls()]


def test_ftz_forms_flush_subnormal_inputs_and_results_to_zeros_of_their_sign():
    x = np.array([-127.5, -(2.0 ** -127), 2.0 ** -127, 2.0 ** 127, -(2.0 ** 127)], np.float32)
    out = launch(_Functions(), ((1, 1, 1), len(x)), x, np.zeros((len(x), 6), np.float32))[1]
    ex2, ex2_ftz, rcp, rcp_ftz, lg2, lg2_ftz = out.T
    assert 0 < ex2[0] < TINY and ex2_ftz[0] == 0 and not np.signbit(ex2_ftz[0])  # 2^-127.5: a subnormal result
    assert rcp[1] == -(2.0 ** 127) and rcp_ftz[1] == -np.inf  # a subnormal input is a zero of its sign ...
    assert np.isnan(lg2[1]) and lg2_ftz[1] == -np.inf  # ... whose log is -inf, not NaN
    assert rcp_ftz[2] == np.inf
    assert 0 < rcp[3] < TINY and rcp_ftz[3] == 0 and not np.signbit(rcp_ftz[3])  # 2^-127: flushed
    assert rcp_ftz[4] == 0 and np.signbit(rcp_ftz[4])  # keeping its sign
