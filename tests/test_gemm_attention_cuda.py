"""GEMM and fused attention on the GPU against float64 numpy.

Tolerances: fp32 GEMM within 1e-4 of the largest reference magnitude (fp32 accumulation over K);
attention within 1e-4 of the largest reference magnitude (base-2 exponentials by ex2.approx);
both at least 1e-4 absolute, the inputs being O(1).
"""
import numpy as np
import pytest

from cudacall import call, poison
from ptxgen.kernels.attention import (AttentionBackwardKVSpec, AttentionBackwardQSpec, AttentionSpec,
                                      attention_backward_reference, attention_reference)
from ptxgen.kernels.gemm import Batch, GemmSpec, Strides, gemm_reference, widest_vec
from runtime import DeviceArray, ModuleCache
from runtime.driver import synchronize

pytestmark = pytest.mark.cuda
rng = np.random.default_rng(11)
SMALL = dict(block_m=32, block_n=32, thread_m=4, thread_n=4)


@pytest.fixture(scope="module")
def cache():
    return ModuleCache(use_disk=False)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def assert_close(actual, ref, rel=1e-4):
    """Within ``rel`` of the largest reference magnitude (inputs are O(1); an all-zero reference,
    as dq for a single key, is held to ``rel`` absolute)."""
    assert np.isfinite(actual).all(), "an output element was never written"
    err = np.abs(np.asarray(actual, np.float64) - ref).max()
    assert err <= rel * max(1.0, np.abs(ref).max()), f"max error {err:.3g} vs max |ref| {np.abs(ref).max():.3g}"


def run_gemm(cache, spec, a, b, m, n, k, bias=None, c=None, batch=None, c_shape=None, residual=None):
    """Upload, launch with spec.arguments, download C."""
    arrays = [DeviceArray.from_numpy(np.ascontiguousarray(x)) for x in
              (a, b, c if c is not None else poison(c_shape or (m, n)))]
    bias_dev, r_dev = (DeviceArray.from_numpy(x) if x is not None else None for x in (bias, residual))
    try:
        args = spec.arguments(*(x.ptr for x in arrays), m, n, k, bias=bias_dev.ptr if bias_dev else None,
                              batch=batch, residual=r_dev.ptr if r_dev else None)
        grid, block = spec.launch_dims(m, n, batch.count if batch else 1)
        cache.get(spec)(grid, block, *args)
        synchronize()
        return arrays[2].to_numpy()
    finally:
        for x in arrays + [x for x in (bias_dev, r_dev) if x is not None]:
            x.free()


LAYOUTS = [(False, True), (False, False), (True, False), (True, True)]
SHAPES = [(1, 4, 4), (3, 8, 12), (130, 68, 36), (257, 4864, 896), (1000, 128, 4864)]


@pytest.mark.parametrize("trans_a, trans_b", LAYOUTS)
@pytest.mark.parametrize("m, n, k", SHAPES)
def test_gemm_layouts_match_float64(cache, trans_a, trans_b, m, n, k):
    a = f32(k, m) if trans_a else f32(m, k)
    b = f32(n, k) if trans_b else f32(k, n)
    spec = GemmSpec(trans_a=trans_a, trans_b=trans_b, vec=widest_vec(m, n, k))
    assert_close(run_gemm(cache, spec, a, b, m, n, k), gemm_reference(a, b, trans_a, trans_b))


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (5, 7, 3), (33, 65, 17)])
def test_gemm_any_shape_with_scalar_accesses(cache, m, n, k):
    a, b = f32(m, k), f32(n, k)
    spec = GemmSpec(vec=1, **SMALL)
    assert_close(run_gemm(cache, spec, a, b, m, n, k), gemm_reference(a, b, False, True))


def test_gemm_fused_bias(cache):
    m, n, k = 77, 132, 40
    x, w, bias = f32(m, k), f32(n, k), f32(n)
    out = run_gemm(cache, GemmSpec(bias=True), x, w, m, n, k, bias=bias)
    assert_close(out, gemm_reference(x, w, False, True, bias=bias))


def test_gemm_adds_a_residual_to_its_product(cache):
    """C = R + x W^T (+ bias): bit for bit R plus what the plain GEMM stores (the model's residual
    stream add, made by the o and down projections)."""
    m, n, k = 77, 132, 40
    x, w, bias, r = f32(m, k), f32(n, k), f32(n), f32(m, n)
    plain = run_gemm(cache, GemmSpec(bias=True), x, w, m, n, k, bias=bias)
    out = run_gemm(cache, GemmSpec(bias=True, residual=True), x, w, m, n, k, bias=bias, residual=r)
    np.testing.assert_array_equal(out, plain + r)
    assert_close(out, gemm_reference(x, w, False, True, bias=bias, c=r))


def test_gemm_accumulates_into_the_output(cache):
    m, n, k = 61, 36, 44
    dy, x, old = f32(m, n), f32(m, k), f32(n, k)
    out = run_gemm(cache, GemmSpec(trans_a=True, trans_b=False, accumulate=True), dy, x, n, k, m, c=old)
    assert_close(out, gemm_reference(dy, x, True, False, c=old))


def test_gemm_batches_address_grouped_heads(cache):
    # scores[b, h] = q[b, :, h] @ k[b, :, h // 2]^T over a [B, S, H, D] layout: the attention views
    bsz, s, h, hkv, d = 2, 19, 4, 2, 8
    q, k = f32(bsz, s, h, d), f32(bsz, s, hkv, d)
    batch = Batch(count=bsz * h, inner=h, a=Strides(s * h * d, d, 1), b=Strides(s * hkv * d, d, 2),
                  c=Strides(h * s * s, s * s, 1))
    spec = GemmSpec(vec=widest_vec(s, d), **SMALL)  # rows of 19 scores: scalar accesses
    arrays = [DeviceArray.from_numpy(x) for x in (q, k, poison((bsz, h, s, s)))]
    args = spec.arguments(*(x.ptr for x in arrays), s, s, d, lda=h * d, ldb=hkv * d, ldc=s, batch=batch)
    cache.get(spec)(*spec.launch_dims(s, s, batch.count), *args)
    out = arrays[2].to_numpy()
    ref = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), np.repeat(k, 2, axis=2).astype(np.float64))
    assert_close(out, ref)
    for x in arrays:
        x.free()


ATTN_SHAPES = [(1, 1, 2, 1, 8, 2), (2, 37, 4, 2, 32, 1), (1, 130, 14, 2, 64, 2), (2, 1000, 14, 2, 64, 2),
               (1, 77, 14, 2, 128, 4), (2, 100, 4, 4, 64, 8)]


@pytest.mark.parametrize("bsz, s, h, hkv, d, lanes", ATTN_SHAPES)
def test_attention_forward_and_backward_match_the_masked_softmax(cache, bsz, s, h, hkv, d, lanes):
    q, k, v, do = f32(bsz, s, h, d), f32(bsz, s, hkv, d), f32(bsz, s, hkv, d), f32(bsz, s, h, d)
    layout = dict(heads=h, kv_heads=hkv, head_dim=d, lanes=lanes, block=256 if lanes > 2 else 128)
    fwd = AttentionSpec(**layout)
    *_, o, lse = call(cache, fwd, fwd.launch_dims(bsz, s), q, k, v, poison(q.shape), poison((bsz, h, s)),
                      s, s, s, 0)
    o_ref, p, lse_ref = attention_reference(q, k, v)
    assert_close(o, o_ref)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-5, atol=1e-5)

    dq_ref, dk_ref, dv_ref = attention_backward_reference(q, k, v, p, do)
    bq = AttentionBackwardQSpec(**layout)
    *_, dq, delta = call(cache, bq, bq.launch_dims(bsz, s), q, k, v, o, do, lse, poison(q.shape),
                         poison((bsz, h, s)), s)
    assert_close(dq, dq_ref)
    np.testing.assert_allclose(delta, np.einsum("bshd,bshd->bhs", do.astype(np.float64), o), rtol=1e-4, atol=1e-5)
    bkv = AttentionBackwardKVSpec(**layout)
    *_, dk, dv = call(cache, bkv, bkv.launch_dims(bsz, s), q, k, v, do, lse, delta, poison(k.shape),
                      poison(v.shape), s)
    assert_close(dk, dk_ref)
    assert_close(dv, dv_ref)


def test_non_causal_attention(cache):
    bsz, s, h, hkv, d = 1, 21, 3, 3, 8
    q, k, v = f32(bsz, s, h, d), f32(bsz, s, hkv, d), f32(bsz, s, hkv, d)
    spec = AttentionSpec(heads=h, kv_heads=hkv, head_dim=d, causal=False, block=32, tile=8)
    *_, o, _ = call(cache, spec, spec.launch_dims(bsz, s), q, k, v, poison(q.shape), poison((bsz, h, s)),
                    s, s, s, 0)
    assert_close(o, attention_reference(q, k, v, causal=False)[0])


@pytest.mark.parametrize("q_start, new", [(0, 7), (9, 1), (40, 3)])
def test_attention_forward_over_a_kv_cache_for_decoding(cache, q_start, new):
    """New queries at positions q_start.. attend to the first q_start + new rows of a larger cache."""
    bsz, capacity, h, hkv, d = 2, 64, 4, 2, 16
    k_cache, v_cache = f32(bsz, capacity, hkv, d), f32(bsz, capacity, hkv, d)
    q = f32(bsz, new, h, d)
    kv_len = q_start + new
    spec = AttentionSpec(heads=h, kv_heads=hkv, head_dim=d)
    *_, o, _ = call(cache, spec, spec.launch_dims(bsz, new), q, k_cache, v_cache, poison(q.shape),
                    poison((bsz, h, new)), new, kv_len, capacity, q_start)
    ref, _, _ = attention_reference(q, k_cache[:, :kv_len], v_cache[:, :kv_len], start=q_start)
    assert_close(o, ref)
