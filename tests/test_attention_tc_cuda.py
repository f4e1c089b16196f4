"""Tensor-core attention against the float64 masked softmax of the same 16-bit inputs.

Tolerance: S = Q K^T is exact products summed in fp32, so the log-sum-exp is within 1e-4; P is
rounded to 16 bits before P V (as FlashAttention does), so O is within 1e-2 absolute for inputs of
unit scale (|O| stays below the largest |V|), with 16-bit output rounding on top. The backward
rounds P and dS to 16 bits for its products and takes delta from the 16-bit O: dQ, dK and dV are
within 2e-2 of each one's largest reference magnitude (at least 0.1), delta within 1e-4 of
rowsum(dO * O).
"""
import numpy as np
import pytest

from cudacall import call, poison, sixteen, values
from ptxgen.kernels.attention import attention_backward_reference, attention_reference
from ptxgen.kernels.attention_tc import AttentionTCBackwardKVSpec, AttentionTCBackwardQSpec, AttentionTCSpec
from ptxgen.kernels.attention_wgmma import AttentionWgmmaSpec
from ptxgen.hw import MmaType
from runtime import ModuleCache

pytestmark = pytest.mark.cuda
rng = np.random.default_rng(11)


@pytest.fixture(scope="module")
def cache():
    return ModuleCache(use_disk=False)


def run(cache, spec: AttentionTCSpec | AttentionWgmmaSpec, bsz: int, s: int, kv_len: int | None = None,
        q_start: int = 0):
    """Queries at q_start.. over kv_len keys (a KV cache of kv_len rows when q_start > 0)."""
    kv_len = kv_len or s
    shape_q, shape_kv = (bsz, s, spec.heads, spec.head_dim), (bsz, kv_len, spec.kv_heads, spec.head_dim)
    (q, q64), (k, k64), (v, v64) = (sixteen(rng.standard_normal(sh).astype(np.float32), spec.dtype)
                                    for sh in (shape_q, shape_kv, shape_kv))
    o, lse = call(cache, spec, spec.launch_dims(bsz, s), q, k, v, poison(shape_q, np.uint16),
                  poison((bsz, spec.heads, s)), s, kv_len, kv_len, q_start)[3:]
    o_ref, _, lse_ref = attention_reference(q64, k64, v64, q_start, spec.causal)
    return values(o, spec.dtype), o_ref, lse, lse_ref


def check(o, o_ref, lse, lse_ref):
    assert np.isfinite(o).all() and np.isfinite(lse).all(), "an output was never written"
    assert np.abs(o - o_ref).max() <= 1e-2
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bsz, s, h, hkv, d", [(1, 1, 2, 1, 64), (2, 37, 4, 2, 64), (1, 130, 14, 2, 64),
                                               (2, 1000, 14, 2, 64), (1, 77, 14, 2, 128), (2, 100, 4, 4, 32)])
def test_causal_forward_matches_the_masked_softmax(cache, bsz, s, h, hkv, d):
    check(*run(cache, AttentionTCSpec(heads=h, kv_heads=hkv, head_dim=d), bsz, s))


@pytest.mark.parametrize("layout", [dict(warps=8, tile=128), dict(warps=2, tile=32),
                                    dict(warps=4, tile=16), dict(dtype=MmaType.F16)])
def test_other_layouts_and_fp16(cache, layout):
    check(*run(cache, AttentionTCSpec(heads=6, kv_heads=2, head_dim=64, **layout), 2, 203))


@pytest.mark.parametrize("bsz, s, h, hkv, d, layout", [
    (1, 1, 2, 1, 64, dict()), (2, 37, 4, 2, 64, dict()), (2, 1000, 14, 2, 64, dict()),
    (1, 77, 14, 2, 128, dict()), (2, 203, 6, 2, 64, dict(warps=8, tile=128)),
    (1, 300, 4, 2, 128, dict(warps=8)), (2, 130, 6, 2, 64, dict(dtype=MmaType.F16, tile=128))])
def test_wgmma_forward_matches_the_masked_softmax(cache, bsz, s, h, hkv, d, layout):
    """The forward with both products on wgmma: Q and K (and V, transposed) read from shared memory
    by descriptors, P from registers."""
    check(*run(cache, AttentionWgmmaSpec(heads=h, kv_heads=hkv, head_dim=d, **layout), bsz, s))


def test_wgmma_forward_non_causal_and_over_a_kv_cache(cache):
    check(*run(cache, AttentionWgmmaSpec(heads=4, kv_heads=2, head_dim=64, causal=False), 1, 91))
    check(*run(cache, AttentionWgmmaSpec(heads=4, kv_heads=2, head_dim=64), 2, 5, kv_len=45, q_start=40))
    check(*run(cache, AttentionWgmmaSpec(heads=4, kv_heads=2, head_dim=128), 1, 1, kv_len=300, q_start=299))


def test_non_causal_and_over_a_kv_cache(cache):
    check(*run(cache, AttentionTCSpec(heads=4, kv_heads=2, head_dim=64, causal=False), 1, 91))
    # 5 new queries at positions 40..44 over a cache holding 45 keys; then one decoding step
    check(*run(cache, AttentionTCSpec(heads=4, kv_heads=2, head_dim=64), 2, 5, kv_len=45, q_start=40))
    check(*run(cache, AttentionTCSpec(heads=4, kv_heads=2, head_dim=128), 1, 1, kv_len=300, q_start=299))


@pytest.mark.parametrize("bsz, s, h, hkv, d, tile, kv_layout", [
    (1, 1, 2, 1, 64, 64, dict()), (2, 37, 4, 2, 64, 64, dict()), (2, 1000, 14, 2, 64, 64, dict()),
    (1, 77, 14, 2, 128, 32, dict()), (2, 100, 4, 4, 32, 32, dict()),
    # the dK/dV block's warps in two teams taking the query tiles in turn
    (2, 1000, 14, 2, 64, 64, dict(warps=8, teams=2)), (1, 77, 14, 2, 128, 32, dict(warps=8, teams=2))])
def test_backward_matches_the_reference_gradients(cache, bsz, s, h, hkv, d, tile, kv_layout):
    layout = dict(heads=h, kv_heads=hkv, head_dim=d, tile=tile)
    fwd = AttentionTCSpec(**layout)
    dtype = fwd.dtype
    (q, q64), (k, k64), (v, v64), (do, do64) = (
        sixteen(rng.standard_normal(shape).astype(np.float32), dtype)
        for shape in ((bsz, s, h, d), (bsz, s, hkv, d), (bsz, s, hkv, d), (bsz, s, h, d)))
    o, lse = call(cache, fwd, fwd.launch_dims(bsz, s), q, k, v, poison(q.shape, np.uint16), poison((bsz, h, s)),
                  s, s, s, 0)[3:]
    _, p, _ = attention_reference(q64, k64, v64)
    dq_ref, dk_ref, dv_ref = attention_backward_reference(q64, k64, v64, p, do64)
    bq = AttentionTCBackwardQSpec(**layout)
    dq, delta = call(cache, bq, bq.launch_dims(bsz, s), q, k, v, o, do, lse, poison(q.shape),
                     poison((bsz, h, s)), s)[6:]
    np.testing.assert_allclose(delta, np.einsum("bshd,bshd->bhs", do64, values(o, dtype)), rtol=1e-4, atol=1e-4)
    bkv = AttentionTCBackwardKVSpec(**layout, **kv_layout)
    dk, dv = call(cache, bkv, bkv.launch_dims(bsz, s), q, k, v, do, lse, delta, poison(k.shape), poison(v.shape),
                  s)[6:]
    for name, ours, ref in (("dq", dq, dq_ref), ("dk", dk, dk_ref), ("dv", dv, dv_ref)):
        assert np.isfinite(ours).all(), f"{name}: an element was never written"
        err = np.abs(ours - ref).max() / max(np.abs(ref).max(), 0.1)  # one query alone has dq = 0
        assert err <= 2e-2, f"{name}: {err:.3g} of the largest |{name}|"
