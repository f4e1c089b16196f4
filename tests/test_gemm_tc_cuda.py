"""bf16/fp16 tensor-core GEMM on the GPU against float64 numpy of the same 16-bit inputs.

Tolerance: products of 16-bit inputs are exact in fp32, the sums are fp32 (mma accumulates in f32):
within 1e-4 of the largest reference magnitude (at least 1e-4 absolute).
"""
import dataclasses

import numpy as np
import pytest

from cudacall import call, poison
from ptxgen.kernels.cross_entropy import row_stats_reference
from ptxgen.kernels.gemm import gemm_reference
from ptxgen.kernels.gemm_tc import GemmTCSpec, MmaType
from ptxgen.vecio import DType
from runtime import DeviceArray, ModuleCache, from_bf16, to_bf16
from runtime.driver import synchronize

pytestmark = pytest.mark.cuda
rng = np.random.default_rng(3)


@pytest.fixture(scope="module")
def cache():
    return ModuleCache(use_disk=False)


def sixteen(x, dtype):
    """(device bits, the values they hold as float64)."""
    if dtype is MmaType.F16:
        h = x.astype(np.float16)
        return h.view(np.uint16), h.astype(np.float64)
    bits = to_bf16(x.astype(np.float32))
    return bits, from_bf16(bits).astype(np.float64)


def run(cache, spec, a, b, m, n, k, bias=None, c=None):
    a_bits, a64 = sixteen(a, spec.dtype)
    b_bits, b64 = sixteen(b, spec.dtype)
    arrays = [DeviceArray.from_numpy(a_bits, "bf16"), DeviceArray.from_numpy(b_bits, "bf16"),
              DeviceArray.from_numpy(c if c is not None else np.full((m, n), np.nan, np.float32))]
    extra = [DeviceArray.from_numpy(bias)] if bias is not None else []
    try:
        args = spec.arguments(*(x.ptr for x in arrays), m, n, k, bias=extra[0].ptr if extra else None)
        cache.get(spec)(*spec.launch_dims(m, n), *args)
        synchronize()
        out = arrays[2].to_numpy()
    finally:
        for x in arrays + extra:
            x.free()
    return out, gemm_reference(a64, b64, spec.trans_a, spec.trans_b, bias=bias, c=c)


def assert_close(actual, ref, rel=1e-4):
    assert np.isfinite(actual).all(), "an output element was never written"
    err = np.abs(actual - ref).max()
    assert err <= rel * max(1.0, np.abs(ref).max()), f"max error {err:.3g}, max |ref| {np.abs(ref).max():.3g}"


LAYOUTS = [(False, True), (False, False), (True, False), (True, True)]
SHAPES = [(8, 8, 16), (72, 136, 40), (128, 128, 32), (264, 4864, 896), (1000, 128, 4864)]


@pytest.mark.parametrize("trans_a, trans_b", LAYOUTS)
@pytest.mark.parametrize("m, n, k", SHAPES)
def test_layouts_match_float64(cache, trans_a, trans_b, m, n, k):
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    assert_close(*run(cache, GemmTCSpec(trans_a=trans_a, trans_b=trans_b), a, b, m, n, k))


@pytest.mark.parametrize("m", [1, 3, 77])
def test_rows_that_are_not_a_tile_multiple(cache, m):
    n, k = 136, 72
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    assert_close(*run(cache, GemmTCSpec(), a, b, m, n, k))


def test_fp16_bias_and_accumulate(cache):
    m, n, k = 130, 200, 64
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    assert_close(*run(cache, GemmTCSpec(dtype=MmaType.F16, bias=True), a, b, m, n, k, bias=bias))
    old = rng.standard_normal((m, n)).astype(np.float32)
    assert_close(*run(cache, GemmTCSpec(accumulate=True), a, b, m, n, k, c=old))


@pytest.mark.parametrize("tile", [dict(block_m=64, block_n=64, warps_m=2, warps_n=2, block_k=64),
                                  dict(block_k=16, stages=4), dict(stages=2), dict(block_n=256, stages=3),
                                  dict(min_blocks=2), dict(block_n=256, block_k=64, stages=3),
                                  dict(block_m=256, warps_m=4, warps_n=2, block_k=64, stages=3, group_m=1)])
def test_other_tiles_and_pipeline_depths(cache, tile):
    m, n, k = 200, 264, 168
    a = rng.standard_normal((k, m)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    assert_close(*run(cache, GemmTCSpec(trans_a=True, trans_b=False, **tile), a, b, m, n, k))


@pytest.mark.parametrize("group_m", [1, 3, 8])
def test_grouped_tile_order_covers_every_tile_once(cache, group_m):
    """8 x 5 tiles of 128: bands of group_m tile rows, the last one short (3 -> 3, 3, 2)."""
    m, n, k = 1000, 600, 40
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    assert_close(*run(cache, GemmTCSpec(group_m=group_m), a, b, m, n, k))


def test_split_k_cuts_a_weight_gradient_into_token_chunks(cache):
    """dW = dy^T x as 4 parts of 96 tokens each (the model's split-K), one partial dW per part."""
    tokens, m, n, parts = 384, 136, 200, 4
    rows = tokens // parts
    dy, x = rng.standard_normal((tokens, m)).astype(np.float32), rng.standard_normal((tokens, n)).astype(np.float32)
    spec = GemmTCSpec(trans_a=True, trans_b=False)
    (dy_bits, dy64), (x_bits, x64) = sixteen(dy, spec.dtype), sixteen(x, spec.dtype)
    arrays = [DeviceArray.from_numpy(dy_bits, "bf16"), DeviceArray.from_numpy(x_bits, "bf16"),
              DeviceArray.from_numpy(np.full((parts, m, n), np.nan, np.float32))]
    try:
        cache.get(spec)(*spec.launch_dims(m, n, parts),
                        *spec.arguments(*(a.ptr for a in arrays), m, n, rows, splits=parts))
        synchronize()
        out = arrays[2].to_numpy()
    finally:
        for a in arrays:
            a.free()
    for z in range(parts):
        chunk = slice(z * rows, (z + 1) * rows)
        assert_close(out[z], gemm_reference(dy64[chunk], x64[chunk], True, False))


WGMMA_CASES = [(dict(), (77, 136, 40)), (dict(), (1, 264, 896)), (dict(), (1000, 4864, 896)),
               (dict(block_n=128, stages=3), (300, 200, 200)), (dict(warpgroups=1, block_n=64), (70, 72, 136)),
               (dict(dtype=MmaType.F16), (130, 256, 64))]


@pytest.mark.parametrize("fields, shape", WGMMA_CASES)
def test_wgmma_gemm_matches_float64(cache, fields, shape):
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    m, n, k = shape
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    assert_close(*run(cache, GemmWgmmaSpec(**fields), a, b, m, n, k))


def test_wgmma_gemm_bias_and_accumulate(cache):
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    m, n, k = 130, 200, 72
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    assert_close(*run(cache, GemmWgmmaSpec(bias=True), a, b, m, n, k, bias=bias))
    old = rng.standard_normal((m, n)).astype(np.float32)
    assert_close(*run(cache, GemmWgmmaSpec(accumulate=True, block_n=128), a, b, m, n, k, c=old))


def tf32_truncated(x: np.ndarray) -> np.ndarray:
    """fp32 values with the 13 low mantissa bits cleared (what the TF32 tensor-core path reads)."""
    return (np.ascontiguousarray(x, np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


@pytest.mark.parametrize("m, n, k", [(77, 136, 44), (1000, 896, 896)])
def test_wgmma_tf32_gemm_reads_fp32_with_a_tf32_mantissa(cache, m, n, k):
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    spec = GemmWgmmaSpec(dtype=MmaType.TF32, block_n=128)
    arrays = [DeviceArray.from_numpy(x) for x in (a, b, np.full((m, n), np.nan, np.float32))]
    try:
        cache.get(spec)(*spec.launch_dims(m, n), *spec.arguments(*(x.ptr for x in arrays), m, n, k))
        synchronize()
        out = arrays[2].to_numpy()
    finally:
        for x in arrays:
            x.free()
    # measured on the H100: 1.8e-7 / 2.6e-6 of the largest |C| from the truncated inputs' product,
    # 8e-4 from the exact fp32 inputs' (what TF32 costs)
    assert_close(out, gemm_reference(tf32_truncated(a).astype(np.float64), tf32_truncated(b).astype(np.float64),
                                     False, True))
    assert_close(out, gemm_reference(a.astype(np.float64), b.astype(np.float64), False, True), rel=2e-3)


def tma_operands(spec, m, n, k, splits=1):
    """Random A, B (and bias) of ``spec``'s layout for ``splits`` parts of ``k``."""
    a = rng.standard_normal((k * splits, m) if spec.trans_a else (m, k * splits)).astype(np.float32)
    b = rng.standard_normal((n, k * splits) if spec.trans_b else (k * splits, n)).astype(np.float32)
    return a, b, rng.standard_normal(n).astype(np.float32) if spec.bias else None


def run_tma(cache, spec, m, n, k, splits=1, resident=None, operands=None, tail_parts=None, gate_up=None,
            angles=None, residual=None):
    """A tma-fed wgmma GEMM (``spec``'s layout, bias, accumulate and C type) on random operands
    (or ``operands``) through the tensor maps of ``gemm_tensor_maps``, beside its float64
    reference; ``splits`` parts of ``k`` each give consecutive partial C matrices; ``resident``
    caps the persistent blocks. A bf16 C comes back as its bits. A ``split_tail`` spec cuts its
    tail tiles into ``tail_parts`` (default: as ``tail_parts`` picks) through a fresh workspace,
    whose flags must all be down again after the launch. A RoPE epilogue's (``rope_heads``, by
    the table ``angles``) C comes back as (q, k, v), each's bits. A ``residual`` spec adds
    ``residual`` (f32 [m, n]) to its product."""
    from runtime.tensormap import gemm_tensor_maps
    dtype = spec.dtype
    a, b, bias = operands or tma_operands(spec, m, n, k, splits)
    if dtype is MmaType.TF32:
        (a_dev, a64), (b_dev, b64) = ((x, tf32_truncated(x).astype(np.float64)) for x in (a, b))
    else:
        (a_dev, a64), (b_dev, b64) = sixteen(a, dtype), sixteen(b, dtype)
    old = rng.standard_normal((splits, m, n)) if spec.accumulate else np.full((splits, m, n), np.nan)
    bf16_c = spec.c_dtype.value == "bf16"
    widths = [w * spec.rope_head_dim for w in (spec.rope_heads, spec.rope_kv_heads, spec.rope_kv_heads)]
    c_width = widths[0] if spec.rope_heads else 2 * n if spec.swiglu_grad else n
    old = np.full((splits, m, c_width), 0xFFFF, np.uint16) if bf16_c else old.astype(np.float32)
    arrays = [DeviceArray.from_numpy(x) for x in (a_dev, b_dev)] + \
        [DeviceArray.from_numpy(old, "bf16" if bf16_c else "f32")]
    extra = [DeviceArray.from_numpy(bias)] if spec.bias else []
    gate_up_dev = DeviceArray.from_numpy(gate_up, "bf16") if spec.swiglu_grad else None
    extra += [gate_up_dev] if gate_up_dev is not None else []
    stats = DeviceArray.from_numpy(np.full((-(-n // spec.block_n), m, 2), np.nan, np.float32)) \
        if spec.row_stats else None
    extra += [stats] if stats is not None else []
    act = DeviceArray.from_numpy(np.full((m, n // 2), 0xFFFF, np.uint16), "bf16") if spec.swiglu_act else None
    extra += [act] if act is not None else []
    rope = [DeviceArray.from_numpy(np.full((m, w), 0xFFFF, np.uint16), "bf16") for w in widths[1:]] + \
        [DeviceArray.from_numpy(angles)] if spec.rope_heads else []
    extra += rope
    r_dev = DeviceArray.from_numpy(np.asarray(residual, np.float32)) if spec.residual else None
    extra += [r_dev] if r_dev is not None else []
    maps = gemm_tensor_maps(spec, arrays[0].ptr, arrays[1].ptr, m, n, k * splits)
    if spec.tma_store:  # C is stored through its own tensor map (gate_up read, act stored through ones like it)
        from runtime.tensormap import gemm_c_tensor_map
        maps = (*maps, gemm_c_tensor_map(spec, arrays[2].ptr, m, n, splits=splits))
        maps += (gemm_c_tensor_map(spec, gate_up_dev.ptr, m, n),) if gate_up_dev is not None else ()
        maps += (gemm_c_tensor_map(spec, act.ptr, m, n, act=True),) if act is not None else ()
        maps += (gemm_c_tensor_map(spec, r_dev.ptr, m, n),) if r_dev is not None else ()
    if spec.split_tail and resident is None:  # every block resident, as the model launches it
        resident = cache.get(spec).resident_blocks(spec.threads)
    dims = spec.launch_dims(m, n, splits, resident=resident)
    cut = {}
    if spec.split_tail:
        blocks = dims[0][0]
        partial_bytes, flag_bytes = spec.tail_workspace(blocks)
        workspace = [DeviceArray.from_numpy(np.full(partial_bytes // 4, np.nan, np.float32)),
                     DeviceArray.from_numpy(np.zeros(flag_bytes // 4, np.int32))]
        extra += workspace
        parts = spec.tail_parts(m, n, k, blocks) if tail_parts is None else tail_parts
        cut = dict(partials=workspace[0].ptr, flags=workspace[1].ptr, tail_parts=parts, blocks=blocks)
    try:
        cache.get(spec)(*dims,
                        *spec.arguments(maps[0].ptr, maps[1].ptr, maps[2].ptr if spec.tma_store else arrays[2].ptr,
                                        m, n, k,
                                        bias=extra[0].ptr if spec.bias else None, splits=splits,
                                        **({"stats": stats.ptr} if stats is not None else {}),
                                        **({"gate_up": maps[3].ptr} if gate_up_dev is not None else {}),
                                        **({"act": maps[3].ptr} if act is not None else {}),
                                        **({"rope": tuple(x.ptr for x in rope)} if rope else {}),
                                        **({"residual": (maps[3] if spec.tma_store else r_dev).ptr}
                                           if r_dev is not None else {}), **cut))
        synchronize()
        out = arrays[2].to_numpy()
        if spec.split_tail:
            assert not workspace[1].to_numpy().any(), "a tail part's flag was left up"
        if stats is not None:  # a row_stats spec's statistics come back beside C
            out = (out, stats.to_numpy())
        if act is not None:  # a swiglu_act spec's act too
            out = (out, act.to_numpy())
        if rope:  # a RoPE epilogue's q, k and v
            out = (out[0], *(x.to_numpy() for x in rope[:2]))
    finally:
        for x in arrays + extra + list(maps):
            x.free()
    part = lambda x, z, k_axis: np.take(x, range(z * k, (z + 1) * k), axis=k_axis)  # noqa: E731
    ref = np.stack([gemm_reference(part(a64, z, 0 if spec.trans_a else 1), part(b64, z, 1 if spec.trans_b else 0),
                                   spec.trans_a, spec.trans_b, bias=bias,
                                   c=old[z] if spec.accumulate else residual if spec.residual else None)
                    for z in range(splits)])
    return out, ref


@pytest.mark.parametrize("fields, shape, resident", [
    (dict(), (77, 136, 40), None), (dict(bias=True), (1, 264, 896), None),
    (dict(), (1000, 4864, 896), 7),             # 8 x 19 tiles over 7 blocks: the rings go on across tiles
    (dict(block_n=128, stages=3), (300, 520, 1000), 5),
    (dict(accumulate=True, block_n=128), (130, 200, 72), 2),
    (dict(dtype=MmaType.F16, warpgroups=1, block_n=64), (70, 72, 136), None),
    (dict(dtype=MmaType.TF32, block_n=128, bias=True), (130, 200, 44), 1)])
def test_tma_wgmma_gemm_matches_float64(cache, fields, shape, resident):
    """The warp-specialized persistent kernel (a TMA producer warpgroup, full/empty mbarriers, blocks
    each walking several tiles), zeros past every edge."""
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    assert_close(*run_tma(cache, GemmWgmmaSpec(tma=True, **fields), *shape, resident=resident))


@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("fields, shape", [(dict(), (80, 136, 40)), (dict(block_n=128), (304, 520, 1000)),
                                           (dict(warpgroups=1, block_n=64, dtype=MmaType.F16), (72, 72, 136))])
def test_tma_wgmma_gemm_reads_operands_stored_m_or_n_contiguous(cache, trans_a, trans_b, fields, shape):
    """dX = dY W (B [K, N]) and dW = dY^T X (A [K, M]): MN-major boxes, wgmma's transpose flags.
    (A stored [K, M] needs M a multiple of 8: its rows are 16-byte aligned.)"""
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    spec = GemmWgmmaSpec(tma=True, trans_a=trans_a, trans_b=trans_b, **fields)
    assert_close(*run_tma(cache, spec, *shape, resident=3))


@pytest.mark.parametrize("fields, shape, resident", [
    (dict(), (77, 136, 40), None),                 # one tile: warpgroup 1 has none
    (dict(bias=True), (300, 520, 1000), 5),        # 3 x 5 tiles over 5 blocks: 3 each, turns of 2 and 1
    (dict(accumulate=True), (1000, 4864, 896), 7),
    (dict(trans_b=False), (304, 520, 1000), 4),
    (dict(trans_a=True, trans_b=False, stages=4), (304, 520, 1000), 3),
    (dict(dtype=MmaType.F16, block_n=64), (130, 200, 72), 1)])
def test_pingpong_wgmma_gemm_matches_float64(cache, fields, shape, resident):
    """Two warpgroups taking whole tiles in turn, handing the tensor cores over at named barriers."""
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    spec = GemmWgmmaSpec(tma=True, pingpong=True, **{"block_n": 128, "stages": 6, **fields})
    assert_close(*run_tma(cache, spec, *shape, resident=resident))


@pytest.mark.parametrize("fields", [dict(trans_a=True, trans_b=False), dict(trans_a=True, trans_b=False,
                                                                            accumulate=True, block_n=128),
                                    dict(trans_a=True, trans_b=False, pingpong=True, block_n=128)])
def test_tma_wgmma_split_k_writes_each_parts_product(cache, fields):
    """A dW-shaped GEMM with its 4 x 192-long contraction split in four: four partial matrices."""
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    assert_close(*run_tma(cache, GemmWgmmaSpec(tma=True, **fields), 200, 136, 192, splits=4, resident=5))


@pytest.mark.parametrize("fields, shape, resident", [
    (dict(pingpong=True, block_n=128, stages=6), (300, 520, 1000), 5),  # the model's gate/up projections
    (dict(pingpong=True, block_n=128, stages=6, trans_b=False), (300, 520, 1000), 5),  # o_proj's dX
    (dict(block_n=128, bias=True), (77, 136, 40), None)])
def test_wgmma_gemm_stores_bf16_as_its_f32_result_rounded(cache, fields, shape, resident):
    """``bf16_out``: the same accumulators, rounded to nearest even as they are stored, bit for bit
    what a cast of the f32 C gives (what the bf16 model's gate and up were before)."""
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    spec = GemmWgmmaSpec(tma=True, **fields)
    operands = tma_operands(spec, *shape)
    c32, ref = run_tma(cache, spec, *shape, resident=resident, operands=operands)
    c16, _ = run_tma(cache, GemmWgmmaSpec(tma=True, bf16_out=True, **fields), *shape, resident=resident,
                     operands=operands)
    assert_close(c32, ref)
    np.testing.assert_array_equal(c16, to_bf16(c32))


LOSS_HEAD = dict(pingpong=True, block_n=128, stages=6, bf16_out=True, tma_store=True)  # the bf16 model's


@pytest.mark.parametrize("fields, shape, resident", [
    (dict(pingpong=True, block_n=128, stages=6), (300, 1000, 896), 5),  # 1000: a last tile of 104
    (dict(block_n=128), (77, 136, 40), None),                         # both warpgroups on each tile
    (dict(pingpong=True, block_n=64, stages=6), (130, 264, 72), 2),
    (LOSS_HEAD, (300, 1000, 896), 5),                                  # the LM head's in the loss: bf16 C
    (dict(LOSS_HEAD, split_tail=True), (1000, 1000, 896), 5),          # its tail tiles cut along K
    (dict(block_n=128, bf16_out=True), (77, 136, 40), None)])          # bf16 C stored by the threads
def test_wgmma_gemm_row_stats_are_each_tiles_max_and_sum_of_exp(cache, fields, shape, resident):
    """``row_stats``: C bit for bit as the plain kernel stores it, and per block_n columns of each
    row (the last tile's below n only) the max of the stored C (a bf16 C: of its rounded values)
    and the sum of exp(c - max): the cross-entropy's first pass. The max is exact; the sum within
    ex2.approx's 2 ulp a term."""
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    spec = GemmWgmmaSpec(tma=True, row_stats=True, **fields)
    operands = tma_operands(spec, *shape)
    (c, stats), ref = run_tma(cache, spec, *shape, resident=resident, operands=operands)
    plain, _ = run_tma(cache, GemmWgmmaSpec(tma=True, **fields), *shape, resident=resident, operands=operands)
    np.testing.assert_array_equal(c, plain)
    if spec.bf16_out:
        c = from_bf16(c)
        assert_close(c, ref, rel=2 ** -8)  # within bf16's rounding of the f32 product
    else:
        assert_close(c, ref)
    ref_stats = row_stats_reference(c[0], spec.block_n)
    assert stats.shape == ref_stats.shape
    np.testing.assert_array_equal(stats[..., 0], ref_stats[..., 0])
    np.testing.assert_allclose(stats[..., 1], ref_stats[..., 1], rtol=1e-5)


@pytest.mark.parametrize("heads, kv_heads, head_dim, bias, m, resident", [
    (14, 2, 64, True, 300, 5),     # Qwen2-0.5B's heads; ragged last rows; blocks walk many tiles
    (14, 2, 64, True, 1000, None),  # every block resident
    (8, 4, 32, False, 77, None),   # four heads a tile, no bias
    (4, 1, 128, True, 130, 3)])    # one head a tile
def test_wgmma_rope_epilogue_stores_q_k_v_as_the_rope_kernels_and_the_cast_make_them(
        cache, heads, kv_heads, head_dim, bias, m, resident):
    """``rope_heads``: the q/k/v projection's [q | k | v] leaves the epilogue as bf16 q, k and v,
    q and k rotated by the angles' table (``RopeTableSpec``, against float64): bit for bit what
    the RoPE kernels (bf16_out) make of the plain GEMM's f32 C, and v that C's cast, at positions
    up to Qwen2's 32768; nothing written past m."""
    from ptxgen.kernels.cast import CastSpec
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    from ptxgen.kernels.rope import RopeSpec, RopeTableSpec, rope_table_reference
    tile = dict(tma=True, pingpong=True, block_n=128, stages=6, bias=bias)
    spec = GemmWgmmaSpec(**tile, rope_heads=heads, rope_kv_heads=kv_heads, rope_head_dim=head_dim)
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    n, k = q_width + 2 * kv_width, 896
    positions = rng.integers(0, 32768, m).astype(np.int32)
    table = RopeTableSpec(head_dim=head_dim, theta=1e6)
    _, angles = call(cache, table, table.launch_dims(m), positions, poison((m, head_dim // 2, 2)), m)
    np.testing.assert_allclose(angles, rope_table_reference(positions, head_dim, 1e6), atol=2e-6, rtol=0)
    operands = tma_operands(spec, m, n, k)
    (q, keys, values), ref = run_tma(cache, spec, m, n, k, resident=resident, operands=operands, angles=angles)
    c, _ = run_tma(cache, GemmWgmmaSpec(**tile), m, n, k, resident=resident, operands=operands)
    assert_close(c, ref)
    c = c[0]
    for out, start, count in ((q, 0, heads), (keys, q_width, kv_heads)):
        rope = RopeSpec(heads=count, head_dim=head_dim, theta=1e6, bf16_out=True, strided=True)
        args = rope.arguments(np.ascontiguousarray(c.reshape(-1)[start:]), poison((m, count * head_dim), np.uint16),
                              positions, m, n, count * head_dim)
        _, expected, *_ = call(cache, rope, rope.launch_dims(m), *args)
        np.testing.assert_array_equal(out, expected)
    cast = CastSpec(dst=DType.BF16, strided=True)
    _, expected, *_ = call(cache, cast, cast.launch_dims(m * kv_width),
                           *cast.arguments(np.ascontiguousarray(c[:, q_width + kv_width:]),
                                           poison((m, kv_width), np.uint16), m, kv_width, kv_width, kv_width))
    np.testing.assert_array_equal(values, expected)


@pytest.mark.parametrize("fields, shape, splits, resident", [
    (dict(bf16_out=True), (300, 520, 1000), 1, 5),           # the gate/up forward's: ragged rows and columns
    (dict(bias=True, stages=5), (77, 136, 40), 1, None),     # f32 with bias, one tile
    (dict(stages=5), (1000, 4864, 896), 1, 7),               # the LM head's / down's shape, many tiles a block
    (dict(trans_a=True, trans_b=False, stages=5), (200, 136, 192), 4, 5)])  # a split dW: [splits][m][n]
def test_tma_store_writes_c_bit_for_bit_as_the_threads_do(cache, fields, shape, splits, resident):
    """``tma_store``: C staged in shared memory (128-byte swizzle) and written by TMA bulk tensor
    stores, bit for bit what the pingpong kernel's threads store, nothing past m or n written."""
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    base = dict(tma=True, pingpong=True, block_n=128, stages=6)
    plain_spec = GemmWgmmaSpec(**{**base, **fields})
    m, n, k = shape
    operands = tma_operands(plain_spec, m, n, k, splits)
    plain, ref = run_tma(cache, plain_spec, m, n, k, splits=splits, resident=resident, operands=operands)
    staged, _ = run_tma(cache, GemmWgmmaSpec(**{**base, **fields, "tma_store": True}), m, n, k, splits=splits,
                        resident=resident, operands=operands)
    if not plain_spec.bf16_out:
        assert_close(plain, ref)
    np.testing.assert_array_equal(staged, plain)


@pytest.mark.parametrize("fields, shape, resident, tail_parts", [
    (dict(tma_store=True, stages=5), (1000, 896, 896), 7, None),  # the o projection's: R staged, many tiles a block
    (dict(tma_store=True, stages=5, split_tail=True), (1000, 520, 1000), 7, 2),  # a cut tail: parts summed, then R
    (dict(tma_store=True, stages=5, split_tail=True), (1000, 520, 1000), 12, 4),
    (dict(tma_store=True, block_n=64, bias=True), (300, 200, 136), 5, None),  # ragged, one slot a tile, bias then R
    (dict(bias=True), (300, 200, 136), 5, None),  # R read by the threads that store C
    (dict(pingpong=False, block_n=256, stages=4), (300, 520, 200), 3, None)])  # both warpgroups on a tile
def test_residual_adds_r_to_what_the_plain_gemm_stores(cache, fields, shape, resident, tail_parts):
    """``residual`` (the o and down projections' forward: the residual stream's add): C = R + the
    product, bit for bit R plus the f32 C the plain kernel stores (the f32 add the separate norm
    kernel made), every element written."""
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    base = dict(tma=True, pingpong=True, block_n=128, stages=6)
    spec = GemmWgmmaSpec(**{**base, **fields, "residual": True})
    plain_spec = dataclasses.replace(spec, residual=False, tma_store=False)
    m, n, k = shape
    operands = tma_operands(spec, m, n, k)
    r = rng.standard_normal((m, n)).astype(np.float32)
    plain, _ = run_tma(cache, plain_spec, m, n, k, resident=resident, operands=operands, tail_parts=tail_parts)
    fused, ref = run_tma(cache, spec, m, n, k, resident=resident, operands=operands, tail_parts=tail_parts,
                         residual=r)
    assert_close(fused, ref)
    np.testing.assert_array_equal(fused, plain + r)


@pytest.mark.parametrize("fields", [
    dict(), dict(bias=True), dict(accumulate=True), dict(bf16_out=True, tma_store=True, stages=5),
    dict(bias=True, tma_store=True, stages=5), dict(trans_b=False), dict(trans_a=True, trans_b=False),
    dict(row_stats=True), dict(dtype=MmaType.F16, block_n=64)])
@pytest.mark.parametrize("shape, resident, tail_parts", [
    ((1000, 520, 1000), 7, 2),    # 40 tiles of 16 slices: 5 past five waves, halved: 10 pairs
    ((1000, 520, 1000), 12, 4),   # 4 past three waves, quartered: 16 pairs, parts 1-3 first
    ((304, 520, 1000), 6, 4),     # ragged rows and columns: 3 tail tiles in quarters
    ((136, 128, 200), 8, 4),      # 2 tiles (4 of 64 columns) on 8 blocks, all tail: a slice a part
    ((1000, 520, 4096), 12, None)])  # as tail_parts picks: 4 tail tiles of 64 slices on 12 blocks, halved
def test_a_split_tail_sums_its_parts_in_a_fixed_order(cache, fields, shape, resident, tail_parts):
    """``split_tail``: the tiles past the last full wave cut along K, parts past 0 handed to part 0
    through the workspace (flags down again after), C within the float64 tolerance and the same
    bits launch after launch; C's statistics (row_stats) are those of the C stored."""
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    spec = GemmWgmmaSpec(tma=True, pingpong=True, split_tail=True, **{"block_n": 128, "stages": 6, **fields})
    operands = tma_operands(spec, *shape)
    first, ref = run_tma(cache, spec, *shape, resident=resident, operands=operands, tail_parts=tail_parts)
    again, _ = run_tma(cache, spec, *shape, resident=resident, operands=operands, tail_parts=tail_parts)
    if spec.row_stats:
        (first, stats), (again, stats_again) = first, again
        np.testing.assert_array_equal(stats, stats_again)
        np.testing.assert_array_equal(stats[..., 0], row_stats_reference(first[0], spec.block_n)[..., 0])
    if not spec.accumulate:  # (run_tma draws a new C to accumulate into each run)
        np.testing.assert_array_equal(first, again)
    assert_close(from_bf16(first) if spec.bf16_out else first, ref, rel=1e-2 if spec.bf16_out else 1e-4)


@pytest.mark.parametrize("bf16_out", [False, True])
def test_tma_store_writes_only_the_m_by_n_corner_of_a_wider_c(cache, bf16_out):
    """C's rows ldc > n apart inside a taller buffer, every element poisoned: after the launch the
    [m, n] corner holds the product (as the threads' store gives it) and every other element (past
    n in each row, and the rows past m) still holds the poison."""
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    from runtime.tensormap import gemm_c_tensor_map, gemm_tensor_maps
    spec = GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=5, bf16_out=bf16_out, tma_store=True)
    m, n, k, ldc, extra_rows = 300, 200, 136, 264, 3
    operands = tma_operands(spec, m, n, k)
    plain, _ = run_tma(cache, GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6, bf16_out=bf16_out),
                       m, n, k, resident=5, operands=operands)
    a_bits, b_bits = (sixteen(x, spec.dtype)[0] for x in operands[:2])
    poison = np.full((m + extra_rows, ldc), 0x7FC1 if bf16_out else 0x7FC00001, np.uint16 if bf16_out else np.uint32)
    arrays = [DeviceArray.from_numpy(a_bits, "bf16"), DeviceArray.from_numpy(b_bits, "bf16"),
              DeviceArray.from_numpy(poison if bf16_out else poison.view(np.float32), "bf16" if bf16_out else "f32")]
    maps = [*gemm_tensor_maps(spec, arrays[0].ptr, arrays[1].ptr, m, n, k),
            gemm_c_tensor_map(spec, arrays[2].ptr, m, n, ldc=ldc)]
    try:
        cache.get(spec)(*spec.launch_dims(m, n, resident=5), *spec.arguments(*(x.ptr for x in maps), m, n, k, ldc=ldc))
        synchronize()
        out = arrays[2].to_numpy().view(poison.dtype)
    finally:
        for x in arrays + maps:
            x.free()
    np.testing.assert_array_equal(out[:m, :n].view(plain.dtype), plain[0])
    untouched = np.ones(out.shape, bool)
    untouched[:m, :n] = False
    assert (out[untouched] == poison[untouched]).all(), "a store reached past n or past m"


@pytest.mark.parametrize("fields, shape, resident", [
    (dict(), (300, 520, 1000), 5),                     # ragged rows and columns, 3 x 5 tiles over 5 blocks
    (dict(block_n=64), (130, 200, 72), 1),             # one block: both warpgroups' buffers in turn, n % 64 != 0
    (dict(split_tail=True), (1000, 520, 1000), 7),     # 5 tail tiles cut along K, summed before the epilogue
    (dict(split_tail=True), (1000, 4864, 896), None)])  # the down projection's dX shape, every block resident
def test_swiglu_grad_stores_what_the_swiglu_backward_makes_of_the_f32_product(cache, fields, shape, resident):
    """``swiglu_grad`` (the down projection's dX): C = [dgate | dup] in bf16, bit for bit what the
    swiglu_bwd kernel (bf16 gate and up, f32 dout, bf16 out) makes of the plain kernel's f32 C,
    itself within the float64 tolerance; every element of the [m][2n] C written (dgate's last
    column tile clipped at n, not spilling into dup's columns)."""
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    from ptxgen.kernels.swiglu import SwiGLUBackwardSpec
    m, n, k = shape
    base = {"tma": True, "pingpong": True, "block_n": 128, "trans_b": False, **fields}
    plain_spec = GemmWgmmaSpec(**base, stages=6)
    operands = tma_operands(plain_spec, m, n, k)
    gate_up = to_bf16(rng.standard_normal((m, 2 * n)).astype(np.float32) * 3)
    dout, ref = run_tma(cache, plain_spec, m, n, k, resident=resident, operands=operands)
    assert_close(dout, ref)
    fused, _ = run_tma(cache, GemmWgmmaSpec(**base, stages=5, tma_store=True, swiglu_grad=True), m, n, k,
                       resident=resident, operands=operands, gate_up=gate_up)
    bwd = SwiGLUBackwardSpec(dtype=DType.BF16, out_dtype=DType.BF16)
    *_, expected = call(cache, bwd, bwd.launch_dims(m, n), gate_up, dout[0],
                        np.full((m, 2 * n), 0xFFFF, np.uint16), *bwd.arguments(0, 0, 0, m, n)[3:])
    assert np.isfinite(from_bf16(fused)).all(), "an element of [dgate | dup] was never written"
    np.testing.assert_array_equal(fused[0], expected)


@pytest.mark.parametrize("fields, shape, resident", [
    (dict(), (300, 528, 1000), 5),                     # ragged rows, a half (264 columns) not a tile multiple
    (dict(), (1000, 9728, 896), None),                 # the gate/up forward's shape (4864 of each)
    (dict(split_tail=True), (1000, 1040, 1000), 7)])   # 5 tail tiles cut along K, summed before the epilogue
def test_swiglu_act_stores_gate_and_up_and_what_the_swiglu_makes_of_them(cache, fields, shape, resident):
    """``swiglu_act`` (the gate/up forward, B = [W_gate; W_up]): each tile's columns are 64 of gate
    and the same 64 of up, so C = [gate | up] is bit for bit the plain bf16 kernel's product of
    the same B, and act bit for bit the SwiGLU kernel's (bf16 in and out) of that C; every element
    of both written."""
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    from ptxgen.kernels.swiglu import SwiGLUSpec
    m, n, k = shape
    base = dict(tma=True, pingpong=True, block_n=128, bf16_out=True, tma_store=True, **fields)
    plain_spec = GemmWgmmaSpec(**base, stages=6)
    operands = tma_operands(plain_spec, m, n, k)
    plain, ref = run_tma(cache, plain_spec, m, n, k, resident=resident, operands=operands)
    assert_close(from_bf16(plain), ref, rel=1e-2)
    (fused, act), _ = run_tma(cache, GemmWgmmaSpec(**base, stages=5, swiglu_act=True), m, n, k, resident=resident,
                              operands=operands)
    np.testing.assert_array_equal(fused, plain)
    swiglu = SwiGLUSpec(dtype=DType.BF16, out_dtype=DType.BF16)
    *_, expected = call(cache, swiglu, swiglu.launch_dims(m, n // 2), plain[0], np.full((m, n // 2), 0xFFFF, np.uint16),
                        *swiglu.arguments(0, 0, m, n // 2)[2:])
    assert np.isfinite(from_bf16(act)).all(), "an element of act was never written"
    np.testing.assert_array_equal(act, expected)


def test_the_lm_heads_row_stats_feed_the_cross_entropy(cache):
    """The loss's chain at a ragged vocabulary (1000 = 7 tiles + 104 columns): the GEMM's logits
    and statistics, then the cross-entropy from them, against the float64 loss and gradient of the
    GEMM's own logits."""
    from ptxgen.kernels.cross_entropy import CrossEntropySpec, cross_entropy_reference
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    spec = GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6, row_stats=True)
    rows, vocab = 300, 1000
    (logits, stats), _ = run_tma(cache, spec, rows, vocab, 896, resident=5)
    targets = rng.integers(0, vocab, rows).astype(np.int32)
    targets[7] = -100
    ce = CrossEntropySpec(vocab=vocab, grad_dtype=DType.BF16, stats_block=128)
    _, _, loss, grad, _ = call(cache, ce, ce.launch_dims(rows), logits[0], targets, np.full(rows, np.nan, np.float32),
                               np.full((rows, vocab), 0x7FC0, np.uint16), stats, np.float32(1 / 299))
    loss_ref, grad_ref = cross_entropy_reference(logits[0], targets, -100, 1 / 299)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(from_bf16(grad), grad_ref, rtol=1e-2, atol=1e-7)

