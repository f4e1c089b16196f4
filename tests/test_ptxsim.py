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
class _Products(KernelSpec):
    """Not a kernel of the library: each warpgroup's two wgmmas of a 64 x 16 A and a 16 x 8 B of
    ones from shared memory (the 128-byte swizzle), each in its own group, accumulator 0 of each
    stored; ``case`` breaks one rule of wgmma's (or keeps them all: "ok", "refill")."""

    case: str = "ok"
    kind: ClassVar[str] = "wgmma_rules"

    def params(self):
        return (("out", T.U64),)

    def outputs(self):
        return ("out",)

    def arch(self, target):
        return "sm_90a"

    def dynamic_shared_bytes(self) -> int:
        return 2 * SWIZZLE_ATOM * 8  # A's 64 rows of 128 bytes, then B's 8 rows (row 8k of each, bf16 1.0)

    def build(self, b: KernelBuilder) -> None:
        tid, case = b.special("%tid.x"), self.case
        smem = b.addr_of(b.dynamic_shared("tiles", align=SWIZZLE_ATOM))
        out = b.add(b.cvta_global(b.ld_param("out")), b.mul_wide(tid, 8))
        first = b.setp("lt", tid, 128)
        for i in range(self.dynamic_shared_bytes() // (128 * 4)):  # every element 1.0, by warpgroup 0
            b.st("shared", Addr(b.add(smem, b.shl(tid, 2)), 512 * i), b.mov(0x3F803F80, T.B32), guard=first)
        if case == "not_landed":  # a copy onto A, not waited for
            b.cp_async(b.add(smem, b.shl(tid, 4)), out, b.mov(0, T.U32))
            b.cp_async_commit()
        b.fence_proxy_async()
        b.bar_sync()
        bits, overwrite = descriptor_bits(False), b.setp("ne", b.mov(0, T.U32), 0)
        accs = [[b.reg(T.F32) for _ in range(4)] for _ in range(2)]
        b.wgmma_fence()
        for acc in accs:
            if case == "unfenced" and acc is accs[1]:
                b.mov(0.0, T.F32, out=acc[0])
            b.wgmma(acc, descriptor(b, smem, bits), descriptor(b, b.add(smem, 8 * SWIZZLE_ATOM), bits), "bf16", 8,
                    overwrite)
            b.wgmma_commit()
        if case == "written":
            b.st("shared", Addr(smem), b.mov(0, T.B32))
        if case != "exit":
            b.wgmma_wait(1)  # the first group is done, the second may not be
            b.st("global", Addr(out), accs[0][0])
            if case == "early":
                b.st("global", Addr(out, 4), accs[1][0])
            b.wgmma_wait(0)
            b.st("global", Addr(out, 4), accs[1][0])
        if case.startswith("refill"):  # warpgroup 0 writes A again, which warpgroup 1's wgmmas read
            if case == "refill":
                b.bar_sync()
            b.st("shared", Addr(smem), b.mov(0, T.B32), guard=first)

    @classmethod
    def examples(cls):
        return [cls()]


@pytest.mark.parametrize("case, error", [
    ("early", "names .* while a wgmma of warpgroup 0 is in flight"),  # an accumulator read before its wait
    ("unfenced", "touched since the warpgroup's last wgmma.fence"),
    ("written", "a shared write onto bytes a wgmma of warpgroup 0 in flight reads"),
    ("not_landed", "a wgmma reads shared bytes a cp.async has not landed"),
    ("exit", "warpgroup 0 ends with a wgmma in flight"),
    # its own wait does not order another warpgroup's wgmma: a barrier between them does
    ("refill_unsynced", "a shared write onto bytes a wgmma of warpgroup 1 read, with no barrier between them")])
def test_a_wgmma_runs_at_its_wait_and_what_the_hardware_leaves_undefined_before_it_is_refused(case, error):
    threads = 256 if case.startswith("refill") else 128
    ok = "refill" if case.startswith("refill") else "ok"
    out = launch(_Products(ok), ((1, 1, 1), threads), np.zeros((threads, 2), np.float32))[0]
    assert (out == 16).all()  # sixteen products of ones, each group once its wait let it run
    with pytest.raises(AssertionError, match=error):
        launch(_Products(case), ((1, 1, 1), threads), np.zeros((threads, 2), np.float32))
