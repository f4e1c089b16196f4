"""Kernel library parity on the GPU: every kernel against its numpy reference at odd and Qwen2 shapes.

Tolerances (stated once, used below):
* f32 elementwise: rtol 1e-5 (ex2/sin/cos .approx after exact range reduction, rn elsewhere).
* f32 reductions: max error <= 1e-5 x max |reference| (and RMSNorm <= 1e-4 absolute at model scale).
* bf16 storage: the reference is computed from the bf16-rounded inputs in float64; the output
  differs by one bf16 rounding: rtol 2^-8 (plus f32 arithmetic), atol 1e-6.
"""
import numpy as np
import pytest

from cudacall import call, poison
from ptxgen.kernels.adamw import (AdamWSpec, GradNormFinalSpec, GradNormPartialSpec, adamw_reference,
                                  grad_norm_reference)
from ptxgen.kernels.bias import BiasAddSpec
from ptxgen.kernels.cast import CastSpec
from ptxgen.kernels.colsum import ColumnSumSpec, PartsSumSpec
from ptxgen.kernels.cross_entropy import CrossEntropySpec, cross_entropy_reference, row_stats_reference
from ptxgen.kernels.embedding import (EmbeddingBackwardSpec, EmbeddingSpec, embedding_backward_plan,
                                      embedding_backward_reference)
from ptxgen.kernels.rmsnorm import RMSNormBackwardSpec, RMSNormSpec, rmsnorm_backward_reference, rmsnorm_reference
from ptxgen.kernels.rope import RopeSpec, rope_reference
from ptxgen.kernels.swiglu import SwiGLUBackwardSpec, SwiGLUSpec, swiglu_backward_reference, swiglu_reference
from ptxgen.vecio import DType
from runtime import DeviceArray, ModuleCache, from_bf16, to_bf16

pytestmark = pytest.mark.cuda
BF16_RTOL = 2.0 ** -8 + 1e-5
rng = np.random.default_rng(7)


@pytest.fixture(scope="module")
def cache():
    return ModuleCache(use_disk=False)


def f32(*shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def bf16_round(x):
    return from_bf16(to_bf16(x))


def assert_rel(actual, ref, rel=1e-5):
    assert np.isfinite(actual).all(), "an output element was never written"
    err = np.abs(np.asarray(actual, np.float64) - ref).max()
    assert err <= rel * max(1.0, np.abs(ref).max()), f"max error {err:.3g}"


# -- RMSNorm ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows, hidden", [(1, 896), (3, 897), (4, 896), (2, 4864)])
def test_rmsnorm_bf16_with_fused_residual(cache, rows, hidden):
    x, res = bf16_round(f32(rows, hidden, scale=0.02)), bf16_round(f32(rows, hidden, scale=0.02))
    gamma = 1 + f32(hidden, scale=0.1)
    spec = RMSNormSpec(hidden=hidden, eps=1e-6, dtype=DType.BF16, residual=True, save_rstd=True)
    _, _, _, y, h, rstd = call(cache, spec, spec.launch_dims(rows), to_bf16(x), to_bf16(res), gamma,
                               poison((rows, hidden), np.uint16), poison((rows, hidden), np.uint16),
                               poison(rows), rows)
    h_ref = bf16_round(x + res)
    np.testing.assert_array_equal(from_bf16(h), h_ref)
    y_ref, rstd_ref = rmsnorm_reference(h_ref, gamma, 1e-6)
    np.testing.assert_allclose(from_bf16(y), y_ref, rtol=BF16_RTOL, atol=1e-6)
    np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-5)


@pytest.mark.parametrize("rows, hidden", [(1, 896), (5, 897), (16, 64)])
def test_rmsnorm_writes_its_bf16_output_as_a_cast_of_its_f32_output_would(cache, rows, hidden):
    """bf16_out: the GEMM operand written by the norm itself, bit for bit the f32 output rounded
    to nearest even (what the cast kernel it replaces wrote)."""
    x, res, gamma = f32(rows, hidden, scale=0.5), f32(rows, hidden, scale=0.5), 1 + f32(hidden, scale=0.1)
    outs = []
    for bf16_out, dtype in ((False, np.float32), (True, np.uint16)):
        spec = RMSNormSpec(hidden=hidden, eps=1e-6, residual=True, save_rstd=True, bf16_out=bf16_out)
        _, _, _, y, h, rstd = call(cache, spec, spec.launch_dims(rows), x, res, gamma, poison((rows, hidden), dtype),
                                   poison((rows, hidden)), poison(rows), rows)
        outs.append((y, h, rstd))
    (y32, h32, rstd32), (y16, h16, rstd16) = outs
    np.testing.assert_array_equal(y16, to_bf16(y32))
    np.testing.assert_array_equal(h16, h32)
    np.testing.assert_array_equal(rstd16, rstd32)


@pytest.mark.parametrize("heads, head_dim", [(14, 64), (2, 64), (4, 32), (2, 128)])
def test_rope_writes_its_bf16_output_as_a_cast_of_its_f32_output_would(cache, heads, head_dim):
    tokens = 37
    x, pos = f32(tokens, heads, head_dim), np.arange(5, 5 + tokens, dtype=np.int32)
    outs = []
    for bf16_out, dtype in ((False, np.float32), (True, np.uint16)):
        spec = RopeSpec(heads=heads, head_dim=head_dim, theta=1e6, bf16_out=bf16_out)
        _, y, _ = call(cache, spec, spec.launch_dims(tokens), x, poison((tokens, heads, head_dim), dtype), pos,
                       tokens)
        outs.append(y)
    np.testing.assert_array_equal(outs[1], to_bf16(outs[0]))


@pytest.mark.parametrize("rows, hidden", [(1, 896), (37, 897), (64, 896)])
def test_rmsnorm_backward_writes_its_bf16_copy_as_a_cast_of_its_dx_would(cache, rows, hidden):
    x, dy, dres, gamma = f32(rows, hidden, scale=0.5), f32(rows, hidden), f32(rows, hidden), 1 + f32(hidden, scale=0.1)
    _, rstd = rmsnorm_reference(x, gamma, 1e-6)
    spec = RMSNormBackwardSpec(hidden=hidden, residual=True, bf16_copy=True)
    *_, dx, dx16, _ = call(cache, spec, spec.launch_dims(rows), x, gamma, dy, rstd.astype(np.float32), dres,
                           poison((rows, hidden)), poison((rows, hidden), np.uint16),
                           poison((spec.partial_rows(rows), hidden)), rows)
    np.testing.assert_array_equal(dx16, to_bf16(dx))
    ref, _ = rmsnorm_backward_reference(x, gamma, dy, 1e-6)
    assert_rel(dx, ref + dres, rel=1e-4)


@pytest.mark.parametrize("rows, hidden", [(1, 896), (37, 897), (64, 896)])
def test_rmsnorm_backward_reads_a_bf16_dy_as_the_f32_kernel_reads_its_values(cache, rows, hidden):
    """A dX GEMM stores the norm's dy in bf16 (bf16 precision): the kernel reading it gives the f32
    kernel's dx, copy and dgamma partials of the same (exactly widened) values, bit for bit."""
    x, dres, gamma = f32(rows, hidden, scale=0.5), f32(rows, hidden), 1 + f32(hidden, scale=0.1)
    dy16 = to_bf16(f32(rows, hidden))
    _, rstd = rmsnorm_reference(x, gamma, 1e-6)
    outs = []
    for dy, dtype in ((dy16, DType.BF16), (from_bf16(dy16), DType.F32)):
        spec = RMSNormBackwardSpec(hidden=hidden, residual=True, bf16_copy=True, rows_per_block=8, dy_dtype=dtype)
        outs.append(call(cache, spec, spec.launch_dims(rows), x, gamma, dy, rstd.astype(np.float32), dres,
                         poison((rows, hidden)), poison((rows, hidden), np.uint16),
                         poison((spec.partial_rows(rows), hidden)), rows)[-3:])
    for ours, f32s in zip(*outs):
        np.testing.assert_array_equal(ours, f32s)


@pytest.mark.parametrize("rows, hidden, per_block", [(1, 896, 16), (37, 897, 5), (64, 896, 16), (9, 4864, 4)])
def test_rmsnorm_backward_dx_and_deterministic_dgamma(cache, rows, hidden, per_block):
    x, dy, gamma = f32(rows, hidden, scale=0.02), f32(rows, hidden), 1 + f32(hidden, scale=0.1)
    _, rstd = rmsnorm_reference(x, gamma, 1e-6)
    spec = RMSNormBackwardSpec(hidden=hidden, rows_per_block=per_block)
    chunks = spec.partial_rows(rows)
    colsum = ColumnSumSpec()

    def run():
        *_, dx, partial = call(cache, spec, spec.launch_dims(rows), x, gamma, dy, rstd.astype(np.float32),
                               poison((rows, hidden)), poison((chunks, hidden)), rows)
        _, dgamma = call(cache, colsum, colsum.launch_dims(chunks, hidden, chunks), partial,
                         poison(hidden), chunks, hidden, chunks)
        return dx, dgamma

    (dx, dgamma), (dx2, dgamma2) = run(), run()
    dx_ref, dgamma_ref = rmsnorm_backward_reference(x, gamma, dy, 1e-6)
    assert_rel(dx, dx_ref)
    assert_rel(dgamma, dgamma_ref)
    assert np.array_equal(dgamma, dgamma2) and np.array_equal(dx, dx2)


@pytest.mark.parametrize("rows, hidden", [(3, 897), (40, 896)])
def test_rmsnorm_backward_adds_the_residual_gradient_in_place(cache, rows, hidden):
    x, dy, dres = f32(rows, hidden, scale=0.02), f32(rows, hidden), f32(rows, hidden)
    gamma = 1 + f32(hidden, scale=0.1)
    _, rstd = rmsnorm_reference(x, gamma, 1e-6)
    spec = RMSNormBackwardSpec(hidden=hidden, residual=True, rows_per_block=4)
    arrays = [DeviceArray.from_numpy(a) for a in (x, gamma, dy, rstd.astype(np.float32), dres,
                                                   poison((spec.partial_rows(rows), hidden)))]
    x_d, g_d, dy_d, r_d, res_d, part_d = arrays
    cache.get(spec)(*spec.launch_dims(rows), x_d, g_d, dy_d, r_d, res_d, res_d, part_d, rows)  # dx over dres
    dx = res_d.to_numpy()
    for a in arrays:
        a.free()
    assert_rel(dx, rmsnorm_backward_reference(x, gamma, dy, 1e-6)[0] + dres)


# -- column sums, bias -----------------------------------------------------------------------------
@pytest.mark.parametrize("rows, cols, per_chunk", [(1, 1, 1), (1000, 896, 1000), (16384, 128, 512), (77, 33, 10)])
def test_column_sums_in_one_or_two_stages(cache, rows, cols, per_chunk):
    x = f32(rows, cols)
    spec = ColumnSumSpec()
    chunks = -(-rows // per_chunk)
    _, partial = call(cache, spec, spec.launch_dims(rows, cols, per_chunk), x, poison((chunks, cols)),
                      rows, cols, per_chunk)
    _, total = call(cache, spec, spec.launch_dims(chunks, cols, chunks), partial, poison(cols), chunks, cols, chunks)
    assert np.abs(total - x.astype(np.float64).sum(0)).max() <= 1e-5 * np.abs(x).sum(0).max()
    # finished in one launch: the last block of each column block to be done (whichever, of blocks
    # running at once) adds the chunks' sums as the second launch did, and leaves the counts down
    counts = np.zeros(-(-cols // 32), np.int32)
    for one in (ColumnSumSpec(finish=True), ColumnSumSpec(finish=True), ColumnSumSpec(row_groups=4, finish=True)):
        _, partials, finished, counts = call(cache, one, one.launch_dims(rows, cols, per_chunk), x,
                                             poison((chunks, cols)), poison(cols), counts, rows, cols, per_chunk)
        if one.row_groups == spec.row_groups:  # the same order as the two launches'
            np.testing.assert_array_equal(finished.view(np.uint32), total.view(np.uint32))
        assert np.abs(finished - x.astype(np.float64).sum(0)).max() <= 1e-5 * np.abs(x).sum(0).max()
        assert not counts.any()


@pytest.mark.parametrize("parts, n", [(1, 4), (2, 4864 * 896), (16, 128 * 896 + 4), (3, 12)])
def test_parts_sum_adds_split_k_partials_in_order(cache, parts, n):
    x = f32(parts, n)
    spec = PartsSumSpec()
    _, total = call(cache, spec, spec.launch_dims(n), x, poison(n), *spec.arguments(0, 0, parts, n)[2:])
    expected = np.zeros(n, np.float32)
    for z in range(parts):  # the kernel's order, in f32: bit for bit
        expected += x[z]
    assert np.array_equal(total, expected)
    with pytest.raises(ValueError, match="multiple of 4"):
        spec.arguments(0, 0, 2, 6)


@pytest.mark.parametrize("rows, cols, dtype", [(3, 896, DType.F32), (5, 128, DType.BF16), (4, 7, DType.F32),
                                               (1000, 896, DType.BF16)])
def test_bias_add(cache, rows, cols, dtype):
    x, bias = f32(rows, cols), f32(cols)
    spec = BiasAddSpec(cols=cols, dtype=dtype)
    if dtype is DType.BF16:
        x = bf16_round(x)
        _, _, y = call(cache, spec, spec.launch_dims(rows), to_bf16(x), bias, poison((rows, cols), np.uint16), rows)
        np.testing.assert_allclose(from_bf16(y), x + bias.astype(np.float64), rtol=BF16_RTOL, atol=1e-6)
    else:
        _, _, y = call(cache, spec, spec.launch_dims(rows), x, bias, poison((rows, cols)), rows)
        np.testing.assert_array_equal(y, x + bias)  # one f32 rounding, same as numpy


# -- RoPE ------------------------------------------------------------------------------------------
def test_rope_for_q_and_k_with_gqa_head_counts_forward_and_backward(cache):
    tokens = 1000
    positions = rng.integers(0, 32768, tokens)
    for heads in (14, 2):  # Qwen2-0.5B: 14 query heads, 2 KV heads
        x = f32(tokens, heads, 64)
        fwd = RopeSpec(heads=heads, head_dim=64, theta=1e6)
        bwd = RopeSpec(heads=heads, head_dim=64, theta=1e6, inverse=True)
        _, y, _ = call(cache, fwd, fwd.launch_dims(tokens), x, poison(x.shape), positions.astype(np.int32), tokens)
        np.testing.assert_allclose(y, rope_reference(x, positions, 1e6), atol=1e-5, rtol=1e-5)
        _, dx, _ = call(cache, bwd, bwd.launch_dims(tokens), y, poison(x.shape), positions.astype(np.int32), tokens)
        np.testing.assert_allclose(dx, rope_reference(y, positions, 1e6, inverse=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bf16_out", [False, True])
def test_strided_rope_reads_q_and_k_from_the_fused_rows_and_writes_their_gradients_back(cache, bf16_out):
    """The fused q/k/v projection's [tokens, (14 + 2 + 2) x 64] rows: RoPE on q (columns 0..895) and
    k (896..1023) into dense outputs; the inverse from dense gradients into those columns, the
    other columns untouched."""
    tokens, d, heads, kv_heads = 300, 64, 14, 2
    width = (heads + 2 * kv_heads) * d
    qkv = f32(tokens, width)
    positions = rng.integers(0, 32768, tokens).astype(np.int32)
    for start, n in ((0, heads), (heads * d, kv_heads)):
        part = qkv[:, start:start + n * d].reshape(tokens, n, d)
        fwd = RopeSpec(heads=n, head_dim=d, theta=1e6, bf16_out=bf16_out, strided=True)
        # the pointer to the columns' first element: the buffer from there on
        args = fwd.arguments(np.ascontiguousarray(qkv.reshape(-1)[start:]), poison((tokens, n * d), np.uint16
                             if bf16_out else np.float32), positions, tokens, width, n * d)
        y = call(cache, fwd, fwd.launch_dims(tokens), *args)[1]
        ref = rope_reference(part, positions, 1e6).reshape(tokens, n * d)
        np.testing.assert_allclose(from_bf16(y) if bf16_out else y, ref, atol=1e-5, rtol=BF16_RTOL if bf16_out else 1e-5)

        bwd = RopeSpec(heads=n, head_dim=d, theta=1e6, inverse=True, strided=True)
        grad = f32(tokens, n * d)
        into = np.zeros(tokens * width - start, np.float32)  # d qkv from column ``start`` on
        args = bwd.arguments(grad, into, positions, tokens, n * d, width)
        out = call(cache, bwd, bwd.launch_dims(tokens), *args)[1]
        written = np.concatenate([out, np.zeros(start, np.float32)]).reshape(tokens, width)
        np.testing.assert_allclose(written[:, :n * d], rope_reference(grad.reshape(tokens, n, d), positions, 1e6,
                                                                      inverse=True).reshape(tokens, n * d),
                                   atol=1e-5, rtol=1e-5)
        assert not written[:, n * d:].any()  # the other columns of each row untouched


@pytest.mark.parametrize("dst", [DType.BF16, DType.F32])
def test_strided_cast_copies_v_out_of_the_fused_rows_and_dv_back(cache, dst):
    spec = CastSpec(dst=dst, strided=True)
    tokens, width, start, kv = 300, 1152, 1024, 128
    qkv = f32(tokens, width)
    out = call(cache, spec, spec.launch_dims(tokens * kv),
               *spec.arguments(np.ascontiguousarray(qkv.reshape(-1)[start:]),
                               poison((tokens, kv), np.uint16 if dst is DType.BF16 else np.float32),
                               tokens, kv, width, kv))[1]
    v = qkv[:, start:]
    np.testing.assert_array_equal(from_bf16(out) if dst is DType.BF16 else out,
                                  from_bf16(to_bf16(v)) if dst is DType.BF16 else v)
    if dst is DType.F32:  # dv into the gradient's columns, the rest untouched
        dv = f32(tokens, kv)
        into = call(cache, spec, spec.launch_dims(tokens * kv),
                    *spec.arguments(dv, np.zeros(tokens * width - start, np.float32), tokens, kv, kv, width))[1]
        written = np.concatenate([into, np.zeros(start, np.float32)]).reshape(tokens, width)
        np.testing.assert_array_equal(written[:, :kv], dv)
        assert not written[:, kv:].any()


@pytest.mark.parametrize("tokens, heads, dim", [(3, 3, 6), (257, 14, 64), (5, 2, 128)])
def test_rope_bf16(cache, tokens, heads, dim):
    x = bf16_round(f32(tokens, heads, dim))
    positions = np.arange(tokens, dtype=np.int32) * 7
    spec = RopeSpec(heads=heads, head_dim=dim, theta=1e4, dtype=DType.BF16)
    _, y, _ = call(cache, spec, spec.launch_dims(tokens), to_bf16(x), poison(x.shape, np.uint16), positions, tokens)
    np.testing.assert_allclose(from_bf16(y), rope_reference(x, positions, 1e4), rtol=BF16_RTOL, atol=2e-5)


# -- SwiGLU ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows, width", [(1, 8), (3, 16), (7, 4864), (5, 1408)])
def test_swiglu_forward_f32_and_bf16_and_backward(cache, rows, width):
    """Gate and up are the halves of each row of one tensor (the fused projection's output); the
    backward writes dgate and dup so too."""
    gate, up, dout = f32(rows, width, scale=3), f32(rows, width), f32(rows, width)
    g16, u16 = bf16_round(gate), bf16_round(up)
    pair = lambda a, b: np.concatenate([a, b], axis=1)  # noqa: E731
    halves = lambda x: (x[:, :width], x[:, width:])  # noqa: E731

    def run(spec, *arrays):
        return call(cache, spec, spec.launch_dims(rows, width), *spec.arguments(*arrays, rows, width))

    *_, out = run(SwiGLUSpec(), pair(gate, up), poison((rows, width)))
    np.testing.assert_allclose(out, swiglu_reference(gate, up), rtol=1e-5, atol=1e-7)
    *_, out16 = run(SwiGLUSpec(dtype=DType.BF16, out_dtype=DType.BF16), to_bf16(pair(g16, u16)),
                    poison((rows, width), np.uint16))
    np.testing.assert_allclose(from_bf16(out16), swiglu_reference(g16, u16), rtol=BF16_RTOL, atol=1e-6)

    *_, dgate_up = run(SwiGLUBackwardSpec(), pair(gate, up), dout, poison((rows, 2 * width)))
    dgate_ref, dup_ref = swiglu_backward_reference(gate, up, dout)
    for ours, ref in zip(halves(dgate_up), (dgate_ref, dup_ref)):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)

    # f32 in, bf16 out: the bf16 model's GEMM operands straight from the SwiGLU (no cast)
    *_, act16 = run(SwiGLUSpec(out_dtype=DType.BF16), pair(gate, up), poison((rows, width), np.uint16))
    np.testing.assert_allclose(from_bf16(act16), swiglu_reference(gate, up), rtol=BF16_RTOL, atol=1e-6)
    *_, d16 = run(SwiGLUBackwardSpec(out_dtype=DType.BF16), pair(gate, up), dout, poison((rows, 2 * width), np.uint16))
    for ours, ref in zip(halves(from_bf16(d16)), (dgate_ref, dup_ref)):
        np.testing.assert_allclose(ours, ref, rtol=BF16_RTOL, atol=1e-6)

    # bf16 gate and up in (the bf16 model stores them so), f32 dout, bf16 gradients out
    *_, d16 = run(SwiGLUBackwardSpec(dtype=DType.BF16, out_dtype=DType.BF16), to_bf16(pair(g16, u16)), dout,
                  poison((rows, 2 * width), np.uint16))
    for ours, ref in zip(halves(from_bf16(d16)), swiglu_backward_reference(g16, u16, dout)):
        np.testing.assert_allclose(ours, ref, rtol=BF16_RTOL, atol=1e-6)


# -- embedding -------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab, dim, tokens, dtype", [(151936, 896, 37, DType.F32), (256, 5, 3, DType.F32),
                                                      (1000, 896, 64, DType.BF16)])
def test_embedding_gather(cache, vocab, dim, tokens, dtype):
    table = f32(vocab, dim)
    ids = rng.integers(0, vocab, tokens).astype(np.int32)
    spec = EmbeddingSpec(dim=dim, dtype=dtype)
    if dtype is DType.BF16:
        _, _, out = call(cache, spec, spec.launch_dims(tokens), to_bf16(table), ids, poison((tokens, dim), np.uint16), tokens)
        np.testing.assert_array_equal(out, to_bf16(table)[ids])
    else:
        _, _, out = call(cache, spec, spec.launch_dims(tokens), table, ids, poison((tokens, dim)), tokens)
        np.testing.assert_array_equal(out, table[ids])


@pytest.mark.parametrize("accumulate", [False, True])
def test_embedding_backward_accumulates_duplicate_ids_deterministically(cache, accumulate):
    vocab, dim, tokens = 300, 896, 512
    ids = rng.integers(0, 20, tokens).astype(np.int32)  # heavy duplication
    dout = f32(tokens, dim)
    base = f32(vocab, dim) if accumulate else np.zeros((vocab, dim), np.float32)
    order, seg_start, seg_id = embedding_backward_plan(ids)
    spec = EmbeddingBackwardSpec(dim=dim, accumulate=accumulate)
    runs = [call(cache, spec, spec.launch_dims(len(seg_id)), dout, order, seg_start, seg_id, base.copy())[-1]
            for _ in range(2)]
    ref = embedding_backward_reference(ids, dout, vocab) + base
    assert_rel(runs[0], ref)
    assert np.array_equal(runs[0], runs[1])


# -- cross-entropy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("rows, vocab, dtype", [(3, 151936, DType.F32), (1, 256, DType.F32), (5, 1001, DType.F32),
                                                (4, 151936, DType.BF16)])
def test_cross_entropy_loss_and_dlogits_with_ignore_index(cache, rows, vocab, dtype):
    logits = f32(rows, vocab, scale=4)
    targets = rng.integers(0, vocab, rows).astype(np.int32)
    targets[rows // 2] = -100 if rows > 1 else targets[0]
    scale = 1.0 / max(1, int((targets != -100).sum()))
    spec = CrossEntropySpec(vocab=vocab, dtype=dtype, grad_dtype=dtype)
    if dtype is DType.BF16:
        logits = bf16_round(logits)
        _, _, loss, grad = call(cache, spec, spec.launch_dims(rows), to_bf16(logits), targets, poison(rows),
                                poison((rows, vocab), np.uint16), np.float32(scale))
        grad = from_bf16(grad)
    else:
        _, _, loss, grad = call(cache, spec, spec.launch_dims(rows), logits, targets, poison(rows),
                                poison((rows, vocab)), np.float32(scale))
    loss_ref, grad_ref = cross_entropy_reference(logits, targets, -100, scale)
    np.testing.assert_allclose(loss, loss_ref, atol=1e-4)
    tol = BF16_RTOL if dtype is DType.BF16 else 1e-5
    np.testing.assert_allclose(grad, grad_ref, rtol=tol, atol=1e-5 * scale)
    if dtype is DType.F32:  # f32 logits, bf16 dlogits (the LM head's operand)
        mixed = CrossEntropySpec(vocab=vocab, grad_dtype=DType.BF16)
        *_, grad16 = call(cache, mixed, mixed.launch_dims(rows), logits, targets, poison(rows),
                          poison((rows, vocab), np.uint16), np.float32(scale))
        np.testing.assert_allclose(from_bf16(grad16), grad_ref, rtol=BF16_RTOL, atol=1e-5 * scale)


def test_cross_entropy_from_the_gemms_row_statistics(cache):
    """``stats_block``: pass 1 from each 128-column tile's (max, sum of exp) pair, as the LM head's
    GEMM writes them ([tiles][rows]): the loss and the bf16 dlogits of the reference."""
    rows, vocab = 6, 151936
    logits = f32(rows, vocab, scale=4)
    targets = rng.integers(0, vocab, rows).astype(np.int32)
    targets[2] = -100
    stats = row_stats_reference(logits, 128).astype(np.float32)
    spec = CrossEntropySpec(vocab=vocab, grad_dtype=DType.BF16, stats_block=128)
    _, _, loss, grad, _ = call(cache, spec, spec.launch_dims(rows), logits, targets, poison(rows),
                               poison((rows, vocab), np.uint16), stats, np.float32(0.2))
    loss_ref, grad_ref = cross_entropy_reference(logits, targets, -100, 0.2)
    np.testing.assert_allclose(loss, loss_ref, atol=1e-4)
    np.testing.assert_allclose(from_bf16(grad), grad_ref, rtol=BF16_RTOL, atol=1e-5 * 0.2)


# -- AdamW and the gradient norm -------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 5, 1 << 20])
def test_grad_norm_clip_and_adamw_steps(cache, n):
    p, g = f32(n), f32(n)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    partial_spec, final_spec = GradNormPartialSpec(), GradNormFinalSpec()
    _, partial = call(cache, partial_spec, partial_spec.launch_dims(), g, poison(partial_spec.blocks), n)
    max_norm = 0.5 * float(np.linalg.norm(g))
    _, norm_out = call(cache, final_spec, final_spec.launch_dims(), partial, poison(2), np.float32(max_norm))
    norm_ref, clip_ref = grad_norm_reference(g, max_norm)
    assert norm_out[0] == pytest.approx(norm_ref, rel=1e-5)
    assert norm_out[1] == pytest.approx(clip_ref, rel=1e-5)

    spec = AdamWSpec(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    ref = (p.astype(np.float64), m.astype(np.float64), v.astype(np.float64))
    for step in (1, 2, 3):
        lr = 1e-3 * step
        p, _, m, v, _ = call(cache, spec, spec.launch_dims(n), p, g, m, v, norm_out[1:2].copy(), n, np.float32(lr),
                             np.float32(1 - 0.9 ** step), np.float32(1 - 0.95 ** step))
        ref = adamw_reference(*ref[:1], g, *ref[1:], lr=lr, beta1=0.9, beta2=0.95, eps=1e-8,
                              weight_decay=0.1, step=step, clip=float(norm_out[1]))
    np.testing.assert_allclose(p, ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m, ref[1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(v, ref[2], rtol=1e-5, atol=1e-9)


def test_adamw_writes_the_bf16_copy_a_cast_of_its_parameters_would(cache):
    """bf16_copy: the GEMMs' bf16 weights written by the optimizer step itself, bit for bit the
    updated f32 parameters rounded to nearest even; the f32 results are those without the copy."""
    n = 4099
    p, g, m, v = f32(n), f32(n), f32(n, scale=0.1), np.abs(f32(n, scale=0.01))
    clip, scalars = np.ones(1, np.float32), (n, np.float32(1e-3), np.float32(0.1), np.float32(0.05))
    plain = AdamWSpec(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    copy = AdamWSpec(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, bf16_copy=True)
    p1, _, m1, v1, _ = call(cache, plain, plain.launch_dims(n), p, g, m, v, clip, *scalars)
    p2, p16, _, m2, v2, _ = call(cache, copy, copy.launch_dims(n), p, poison(n, np.uint16), g, m, v, clip, *scalars)
    for a, b in ((p1, p2), (m1, m2), (v1, v2)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(p16, to_bf16(p1))
