"""The interpreter (tests/ptxsim.py) reads the special functions' ``.ftz`` forms as the GPU does:
subnormal inputs and results are zeros of their sign (ptxgen/fastmath.py relies on it); and it
runs a wgmma no earlier than its wait lets it, refusing any use of its registers before then."""
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from ptxgen.builder import Addr, KernelBuilder, T
from ptxgen.hw import SWIZZLE_ATOM
from ptxgen.kernels.gemm_wgmma import descriptor, descriptor_bits
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


@dataclass(frozen=True)
class _OneProduct(KernelSpec):
    """Not a kernel of the library: one warpgroup's wgmma of a 64 x 16 A and a 16 x 8 B from shared
    memory (the 128-byte swizzle), its accumulator 0 stored; ``early``: read before the wait."""

    early: bool = False
    kind: ClassVar[str] = "one_wgmma"

    def params(self):
        return (("out", T.U64),)

    def outputs(self):
        return ("out",)

    def arch(self, target):
        return "sm_90a"

    def dynamic_shared_bytes(self) -> int:
        return 2 * SWIZZLE_ATOM * 8  # A's 64 rows of 128 bytes, then B's 8 rows (row 8k of each, bf16 1.0)

    def build(self, b: KernelBuilder) -> None:
        tid = b.special("%tid.x")
        smem = b.addr_of(b.dynamic_shared("tiles", align=SWIZZLE_ATOM))
        for i in range(self.dynamic_shared_bytes() // (128 * 4)):  # every element 1.0
            b.st("shared", Addr(b.add(smem, b.shl(tid, 2)), 512 * i), b.mov(0x3F803F80, T.B32))
        b.fence_proxy_async()
        b.bar_sync()
        acc = [b.reg(T.F32) for _ in range(4)]
        bits = descriptor_bits(False)
        b.wgmma_fence()
        b.wgmma(acc, descriptor(b, smem, bits), descriptor(b, b.add(smem, 8 * SWIZZLE_ATOM), bits), "bf16", 8,
                b.setp("ne", b.mov(0, T.U32), 0))
        b.wgmma_commit()
        if not self.early:
            b.wgmma_wait(0)
        b.st("global", Addr(b.add(b.cvta_global(b.ld_param("out")), b.mul_wide(tid, 4))), acc[0])
        if self.early:
            b.wgmma_wait(0)

    @classmethod
    def examples(cls):
        return [cls()]


def test_a_wgmma_accumulator_read_before_its_wait_is_an_error():
    out = launch(_OneProduct(), ((1, 1, 1), 128), np.zeros(128, np.float32))[0]
    assert (out == 16).all()  # sixteen products of ones, once the wait let it run
    with pytest.raises(AssertionError, match="while a wgmma of warpgroup 0 is in flight"):
        launch(_OneProduct(early=True), ((1, 1, 1), 128), np.zeros(128, np.float32))
