"""The wgmma attention backward (attention_wgmma_bwd_q, then attention_wgmma_bwd_kv) against the
float64 reference gradients, with the tensor-core backward's tolerances (test_attention_tc_cuda):
P and dS are rounded to 16 bits for their products and delta comes from the 16-bit O, so dQ, dK
and dV are within 2e-2 of each one's largest reference magnitude (at least 0.1), delta within 1e-4
of rowsum(dO * O). O and the log-sum-exp come from the mma.sync forward (attention_tc_fwd).

delta is the same fp32 sum of the same products in the same order as attention_tc_bwd_q's (only
where the staged rows sit in shared memory differs), so the two agree bit for bit. The kernels use
no atomics: a second run gives the same bits.
"""
from __future__ import annotations

import numpy as np
import pytest

from cudacall import call, poison, sixteen, values
from qkv_rows import projection_rows
from ptxgen.hw import MmaType
from ptxgen.kernels.attention import attention_backward_reference, attention_reference
from ptxgen.kernels.attention_tc import AttentionTCBackwardKVSpec, AttentionTCBackwardQSpec, AttentionTCSpec
from ptxgen.kernels.attention_wgmma import AttentionWgmmaBackwardKVSpec, AttentionWgmmaBackwardQSpec
from runtime import ModuleCache

pytestmark = pytest.mark.cuda
rng = np.random.default_rng(23)


@pytest.fixture(scope="module")
def cache():
    return ModuleCache(use_disk=False)


class Problem:
    """Random 16-bit q, k, v, do of one shape, O and lse from the tensor-core forward, and the
    float64 reference gradients."""

    def __init__(self, cache, bsz: int, s: int, h: int, hkv: int, d: int, causal: bool, dtype: MmaType):
        self.s, self.dtype = s, dtype
        (self.q, q64), (self.k, k64), (self.v, v64), (self.do, do64) = (
            sixteen(rng.standard_normal(shape).astype(np.float32), dtype)
            for shape in ((bsz, s, h, d), (bsz, s, hkv, d), (bsz, s, hkv, d), (bsz, s, h, d)))
        fwd = AttentionTCSpec(heads=h, kv_heads=hkv, head_dim=d, causal=causal, dtype=dtype)
        self.o, self.lse = call(cache, fwd, fwd.launch_dims(bsz, s), self.q, self.k, self.v,
                                poison(self.q.shape, np.uint16), poison((bsz, h, s)), s, s, s, 0)[3:]
        _, p, _ = attention_reference(q64, k64, v64, 0, causal)
        self.dq, self.dk, self.dv = attention_backward_reference(q64, k64, v64, p, do64)
        self.delta = np.einsum("bshd,bshd->bhs", do64, values(self.o, dtype))

    def backward_q(self, cache, spec) -> tuple[np.ndarray, np.ndarray]:
        """(dq, delta) from a dQ kernel."""
        bsz, s = self.q.shape[0], self.s
        return tuple(call(cache, spec, spec.launch_dims(bsz, s), self.q, self.k, self.v, self.o, self.do, self.lse,
                          poison(self.q.shape), poison(self.lse.shape), s)[6:])

    def backward_kv(self, cache, spec, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dk, dv) from a dK/dV kernel."""
        bsz, s = self.q.shape[0], self.s
        return tuple(call(cache, spec, spec.launch_dims(bsz, s), self.q, self.k, self.v, self.do, self.lse, delta,
                          poison(self.k.shape), poison(self.v.shape), s)[6:])


def wgmma_backward(cache, bsz: int, s: int, h: int, hkv: int, d: int, causal: bool = True,
                   dtype: MmaType = MmaType.BF16, teams: int = 1, **layout) -> tuple[Problem, dict[str, np.ndarray]]:
    """``teams``: the dK/dV kernel's alone."""
    problem = Problem(cache, bsz, s, h, hkv, d, causal, dtype)
    fields = dict(heads=h, kv_heads=hkv, head_dim=d, causal=causal, dtype=dtype, **layout)
    dq, delta = problem.backward_q(cache, AttentionWgmmaBackwardQSpec(**fields))
    dk, dv = problem.backward_kv(cache, AttentionWgmmaBackwardKVSpec(**fields, teams=teams), delta)
    return problem, dict(dq=dq, delta=delta, dk=dk, dv=dv)


def check(problem: Problem, ours: dict[str, np.ndarray]) -> None:
    for name, out in ours.items():
        assert np.isfinite(out).all(), f"{name}: an element was never written"
    np.testing.assert_allclose(ours["delta"], problem.delta, rtol=1e-4, atol=1e-4)
    for name in ("dq", "dk", "dv"):
        ref = getattr(problem, name)
        err = np.abs(ours[name] - ref).max() / max(np.abs(ref).max(), 0.1)  # one query alone has dq = 0
        assert err <= 2e-2, f"{name}: {err:.3g} of the largest |{name}|"


@pytest.mark.parametrize("bsz, s, h, hkv, d, layout", [
    (1, 1, 2, 1, 64, dict()),                    # one query: dq = 0, every other key tile empty
    (2, 37, 4, 2, 64, dict()),                   # seq not a multiple of any tile
    (2, 1000, 14, 2, 64, dict()),                # the model's heads (GQA 7), many tiles
    (1, 77, 14, 2, 128, dict()),                 # head_dim 128: two 64-wide column chunks
    (1, 77, 14, 2, 128, dict(tile=32)),
    (2, 203, 6, 2, 64, dict(warps=8, tile=128)),  # two warpgroups
    (1, 300, 4, 2, 128, dict(warps=8)),
    (1, 150, 8, 1, 64, dict(warps=8, tile=32)),   # GQA 8
    (2, 130, 6, 6, 64, dict(dtype=MmaType.F16, tile=32)),  # no grouping, fp16
    # two warpgroups sharing 64 keys, alternate query tiles, their sums added in shared memory
    (2, 1000, 14, 2, 64, dict(warps=8, teams=2, tile=64)),
    (2, 1000, 14, 2, 64, dict(warps=8, teams=2, tile=128)),
    (1, 150, 8, 1, 64, dict(warps=8, teams=2, tile=32)),   # the last keys' one query tile: team 1 has none
    (1, 300, 4, 2, 128, dict(warps=8, teams=2, tile=64)),
])
def test_backward_matches_the_reference_gradients(cache, bsz, s, h, hkv, d, layout):
    check(*wgmma_backward(cache, bsz, s, h, hkv, d, **layout))


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("teams", [1, 2])
def test_non_causal_backward(cache, d, teams):
    check(*wgmma_backward(cache, 1, 91, 4, 2, d, causal=False, teams=teams, warps=4 * teams))


@pytest.mark.parametrize("d", [64, 128])
def test_delta_is_the_tensor_core_kernels_bit_for_bit(cache, d):
    problem = Problem(cache, 2, 150, 6, 2, d, True, MmaType.BF16)
    fields = dict(heads=6, kv_heads=2, head_dim=d)
    _, ours = problem.backward_q(cache, AttentionWgmmaBackwardQSpec(**fields))
    _, theirs = problem.backward_q(cache, AttentionTCBackwardQSpec(**fields))
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("d, layout, teams", [(64, dict(), 1), (128, dict(warps=8, tile=32), 1),
                                              (64, dict(warps=8, tile=64), 2)])
def test_two_runs_give_the_same_bits(cache, d, layout, teams):
    problem, first = wgmma_backward(cache, 2, 333, 14, 2, d, teams=teams, **layout)
    fields = dict(heads=14, kv_heads=2, head_dim=d, **layout)
    dq, delta = problem.backward_q(cache, AttentionWgmmaBackwardQSpec(**fields))
    dk, dv = problem.backward_kv(cache, AttentionWgmmaBackwardKVSpec(**fields, teams=teams), delta)
    for name, again in (("dq", dq), ("delta", delta), ("dk", dk), ("dv", dv)):
        assert np.array_equal(first[name].view(np.uint32), again.view(np.uint32)), f"{name} differs between runs"


@pytest.mark.parametrize("kind, layout", [("wgmma", dict(warps=8, teams=2, tile=64)), ("wgmma", dict(tile=64)),
                                          ("tc", dict())])
def test_qkv_rows_write_the_projections_gradient_as_the_rope_backward_and_the_copy_do(cache, kind, layout):
    """``qkv_rows``: dq, dk and dv land in the fused q/k/v projection's gradient rows ([q | k | v]
    heads a token, in bf16: no f32 rows), dq and dk rotated back by RoPE by the forward's angles'
    table: bit for bit the bf16 copy the RoPE backward kernels and dv's strided copy make of the
    plain kernels' dq, dk, dv (positions up to Qwen2's 32768, ragged last query tile)."""
    from ptxgen.kernels.rope import RopeTableSpec
    bsz, s, h, hkv, d, theta = 2, 200, 4, 2, 64, 1e6
    problem = Problem(cache, bsz, s, h, hkv, d, True, MmaType.BF16)
    q_cls, kv_cls = ((AttentionWgmmaBackwardQSpec, AttentionWgmmaBackwardKVSpec) if kind == "wgmma" else
                     (AttentionTCBackwardQSpec, AttentionTCBackwardKVSpec))
    fields = dict(heads=h, kv_heads=hkv, head_dim=d)
    dq, delta = problem.backward_q(cache, q_cls(**fields))
    dk, dv = problem.backward_kv(cache, kv_cls(**fields, **layout), delta)
    tokens, width = bsz * s, (h + 2 * hkv) * d
    positions = rng.integers(0, 32768, tokens).astype(np.int32)
    table = RopeTableSpec(head_dim=d, theta=theta)
    _, angles = call(cache, table, table.launch_dims(tokens), positions, poison((tokens, d // 2, 2)), tokens)
    rows16 = projection_rows(lambda *a: call(cache, *a), dict(dq=dq, dk=dk, dv=dv), positions, h, hkv, d, theta)

    spec_q, spec_kv = q_cls(**fields, qkv_rows=True), kv_cls(**fields, **layout, qkv_rows=True)
    p = problem
    out_q = call(cache, spec_q, spec_q.launch_dims(bsz, s), p.q, p.k, p.v, p.o, p.do, p.lse,
                 poison((tokens, width), np.uint16), poison(p.lse.shape), s, angles)
    np.testing.assert_array_equal(out_q[7], delta)
    out_kv = call(cache, spec_kv, spec_kv.launch_dims(bsz, s), p.q, p.k, p.v, p.do, p.lse, delta,
                  poison((tokens, width), np.uint16), poison((tokens, width), np.uint16), s, angles)
    q_cols, k_cols, v_cols = slice(0, h * d), slice(h * d, (h + hkv) * d), slice((h + hkv) * d, width)
    # (dk and dv come back as two uploads of the one row buffer: each holds its own columns; bf16 only)
    for got16, cols in ((out_q[6], q_cols), (out_kv[6], k_cols), (out_kv[7], v_cols)):
        np.testing.assert_array_equal(got16[:, cols], rows16[:, cols])
