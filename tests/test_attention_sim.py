"""The tensor-core attention kernels' math on the CPU (wgmma's, and mma.sync's where wgmma's 64-wide
chunks do not fit a head), through the PTX interpreter (ptxsim), against the float64 references
with the GPU tests' tolerances (test_attention_tc_cuda, test_attention_wgmma_bwd_cuda).

The forwards pass their GPU tests on an H200: running them here checks the interpreter's reading of
wgmma and mma.sync (fragment layouts, descriptors, ldmatrix, the swizzles) against the hardware. The backward's GPU tests
are the word on the backward; these catch a wrong index, stage or mask without a GPU, and (the
interpreter refusing what the hardware leaves undefined) a stage read before it landed, refilled
while a wgmma may still read it, or a wgmma's registers touched before its wait. Small shapes (a
Python interpreter): every tile size, both head_dims, one and two warpgroups, a ragged last tile.
"""
from __future__ import annotations

import numpy as np
import pytest

from ptxgen.hw import MmaType
from ptxgen.kernels.attention import attention_backward_reference, attention_reference
from ptxgen.kernels.attention_tc import AttentionTCBackwardKVSpec, AttentionTCBackwardQSpec, AttentionTCSpec
from ptxgen.kernels.attention_wgmma import AttentionWgmmaBackwardKVSpec, AttentionWgmmaBackwardQSpec, AttentionWgmmaSpec
from ptxgen.vecio import from_bf16, to_bf16
from ptxsim import launch

rng = np.random.default_rng(3)


def sixteen(shape: tuple[int, ...], dtype: MmaType) -> tuple[np.ndarray, np.ndarray]:
    """Random 16-bit values: (their bits, their float64 values)."""
    x = rng.standard_normal(shape).astype(np.float32)
    if dtype is MmaType.F16:
        return x.astype(np.float16).view(np.uint16), x.astype(np.float16).astype(np.float64)
    bits = to_bf16(x)
    return bits, from_bf16(bits).astype(np.float64)


def values(bits: np.ndarray, dtype: MmaType) -> np.ndarray:
    return bits.view(np.float16).astype(np.float64) if dtype is MmaType.F16 else from_bf16(bits).astype(np.float64)


def nan(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    return np.full(shape, 0x7FC0 if dtype == np.uint16 else np.nan, dtype)


WGMMA = (AttentionWgmmaSpec, AttentionWgmmaBackwardQSpec, AttentionWgmmaBackwardKVSpec)
MMA_SYNC = (AttentionTCSpec, AttentionTCBackwardQSpec, AttentionTCBackwardKVSpec)


@pytest.mark.parametrize("kernels, s, d, layout", [
    (WGMMA, 37, 64, dict()), (WGMMA, 77, 128, dict(warps=8, tile=128)), (WGMMA, 70, 64, dict(dtype=MmaType.F16, tile=128)),
    (MMA_SYNC, 37, 32, dict(warps=2, tile=32)), (MMA_SYNC, 70, 64, dict(dtype=MmaType.F16, tile=16))])
def test_the_forward_runs_in_the_interpreter_as_on_the_gpu(kernels, s, d, layout):
    spec = kernels[0](heads=2, kv_heads=1, head_dim=d, **layout)
    (q, q64), (k, k64), (v, v64) = (sixteen(shape, spec.dtype) for shape in ((1, s, 2, d), (1, s, 1, d), (1, s, 1, d)))
    o, lse = launch(spec, spec.launch_dims(1, s), q, k, v, nan(q.shape, np.uint16), nan((1, 2, s)), s, s, s, 0)[3:]
    o_ref, _, lse_ref = attention_reference(q64, k64, v64)
    assert np.abs(values(o, spec.dtype) - o_ref).max() <= 1e-2
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernels, bsz, s, h, hkv, d, layout", [
    (WGMMA, 2, 37, 4, 2, 64, dict()), (WGMMA, 1, 77, 2, 1, 128, dict(tile=32)),
    (WGMMA, 1, 70, 3, 3, 64, dict(warps=8, tile=128)),
    (WGMMA, 1, 40, 2, 1, 128, dict(causal=False, dtype=MmaType.F16, warps=8, tile=32)),
    # two teams: 3 key tiles, 5 query tiles taken in turn, the last keys' single tile team 0's alone
    (WGMMA, 1, 150, 2, 1, 64, dict(warps=8, tile=32, teams=2)),
    (WGMMA, 1, 77, 2, 1, 128, dict(causal=False, warps=8, tile=64, teams=2)),
    (MMA_SYNC, 2, 37, 4, 2, 32, dict(warps=2, tile=32)),
    (MMA_SYNC, 1, 40, 2, 1, 32, dict(causal=False, dtype=MmaType.F16, warps=2, tile=16)),
    (MMA_SYNC, 1, 150, 2, 1, 32, dict(warps=4, tile=32, teams=2))])
def test_the_backward_matches_the_reference_gradients(kernels, bsz, s, h, hkv, d, layout):
    fields = dict(heads=h, kv_heads=hkv, head_dim=d, **layout)
    teams = fields.pop("teams", 1)
    bq, bkv = kernels[1](**fields), kernels[2](**fields, teams=teams)
    dtype = bq.dtype
    (q, q64), (k, k64), (v, v64), (do, do64) = (sixteen(shape, dtype) for shape in
                                                ((bsz, s, h, d), (bsz, s, hkv, d), (bsz, s, hkv, d), (bsz, s, h, d)))
    o_ref, p, lse = attention_reference(q64, k64, v64, 0, bq.causal)
    o = to_bf16(o_ref.astype(np.float32)) if dtype is MmaType.BF16 else o_ref.astype(np.float16).view(np.uint16)
    lse = lse.astype(np.float32)
    dq, delta = launch(bq, bq.launch_dims(bsz, s), q, k, v, o, do, lse, nan(q.shape), nan(lse.shape), s)[6:]
    dk, dv = launch(bkv, bkv.launch_dims(bsz, s), q, k, v, do, lse, delta, nan(k.shape), nan(v.shape), s)[6:]
    np.testing.assert_allclose(delta, np.einsum("bshd,bshd->bhs", do64, values(o, dtype)), rtol=1e-4, atol=1e-4)
    for name, ours, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), attention_backward_reference(q64, k64, v64, p, do64)):
        assert np.isfinite(ours).all(), f"{name}: an element was never written"
        err = np.abs(ours - ref).max() / max(np.abs(ref).max(), 0.1)
        assert err <= 2e-2, f"{name}: {err:.3g} of the largest |{name}|"


@pytest.mark.parametrize("layout", [dict(), dict(warps=8, tile=32, teams=2)])
def test_qkv_rows_write_the_projections_gradient_as_the_rope_backward_and_the_copy_do(layout):
    """``qkv_rows`` in the interpreter (the GPU test's check, test_attention_wgmma_bwd_cuda): dq, dk
    and dv into the fused projection's [q | k | v] gradient rows (bf16), dq and dk rotated back by
    the angles' table, bit for bit the RoPE backward kernels' and dv's strided copy's bf16 copies of
    the plain kernels' outputs (the interpreter's sin and cos are numpy's, the same in both paths)."""
    from ptxgen.kernels.rope import RopeTableSpec
    from qkv_rows import projection_rows
    bsz, s, h, hkv, d, theta = 1, 70, 2, 1, 64, 1e6
    fields = dict(heads=h, kv_heads=hkv, head_dim=d)
    kv_fields = {**fields, **layout}
    (q, q64), (k, k64), (v, v64), (do, do64) = (sixteen(shape, MmaType.BF16) for shape in
                                                ((bsz, s, h, d), (bsz, s, hkv, d), (bsz, s, hkv, d), (bsz, s, h, d)))
    o_ref, _, lse = attention_reference(q64, k64, v64)
    o, lse = to_bf16(o_ref.astype(np.float32)), lse.astype(np.float32)
    tokens, width = bsz * s, (h + 2 * hkv) * d
    positions = rng.integers(0, 32768, tokens).astype(np.int32)
    table = RopeTableSpec(head_dim=d, theta=theta)
    flat = lambda dims: ((dims[0], 1, 1), dims[1])  # noqa: E731  (a 1-D grid, as the interpreter takes it)
    angles = launch(table, flat(table.launch_dims(tokens)), positions, nan((tokens, d // 2, 2)), tokens)[1]

    bq, bkv = AttentionWgmmaBackwardQSpec(**fields), AttentionWgmmaBackwardKVSpec(**kv_fields)
    dq, delta = launch(bq, bq.launch_dims(bsz, s), q, k, v, o, do, lse, nan(q.shape), nan(lse.shape), s)[6:]
    dk, dv = launch(bkv, bkv.launch_dims(bsz, s), q, k, v, do, lse, delta, nan(k.shape), nan(v.shape), s)[6:]
    rows16 = projection_rows(lambda spec, dims, *a: launch(spec, flat(dims), *a), dict(dq=dq, dk=dk, dv=dv),
                                   positions, h, hkv, d, theta)

    fq, fkv = AttentionWgmmaBackwardQSpec(**fields, qkv_rows=True), AttentionWgmmaBackwardKVSpec(**kv_fields,
                                                                                                 qkv_rows=True)
    out_q = launch(fq, fq.launch_dims(bsz, s), q, k, v, o, do, lse, nan((tokens, width), np.uint16), nan(lse.shape),
                   s, angles)
    np.testing.assert_array_equal(out_q[7], delta)
    out_kv = launch(fkv, fkv.launch_dims(bsz, s), q, k, v, do, lse, delta, nan((tokens, width), np.uint16),
                    nan((tokens, width), np.uint16), s, angles)
    columns = (slice(0, h * d), slice(h * d, (h + hkv) * d), slice((h + hkv) * d, width))
    for got16, cols in zip((out_q[6], out_kv[6], out_kv[7]), columns):  # (bf16 only: no f32 rows)
        np.testing.assert_array_equal(got16[:, cols], rows16[:, cols])
