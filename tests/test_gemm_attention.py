"""GEMM and attention specs without a GPU: argument checks, validation, the references."""
import math

import numpy as np
import pytest

from ptxgen.kernels.attention import AttentionSpec, attention_backward_reference, attention_reference
from ptxgen.kernels.attention_tc import AttentionTCBackwardKVSpec, AttentionTCBackwardQSpec
from ptxgen.kernels.attention_wgmma import AttentionWgmmaBackwardKVSpec, AttentionWgmmaBackwardQSpec
from ptxgen.kernels.gemm import Batch, GemmSpec, Strides, widest_vec
from ptxgen.spec import SpecError, Target


def test_gemm_refuses_shapes_its_vectors_cannot_serve():
    with pytest.raises(ValueError, match="K=6 is not a multiple of 4"):
        GemmSpec().arguments(0, 0, 0, 8, 8, 6)
    with pytest.raises(ValueError, match="M \\(A transposed\\)=1"):
        GemmSpec(trans_a=True, trans_b=False).arguments(0, 0, 0, 1, 8, 8)
    with pytest.raises(ValueError, match="needs a bias"):
        GemmSpec(bias=True).arguments(0, 0, 0, 8, 8, 8)
    with pytest.raises(ValueError, match="batch stride"):
        GemmSpec().arguments(0, 0, 0, 8, 8, 8, batch=Batch(2, 1, a=Strides(6)))
    assert GemmSpec(vec=1).arguments(1, 2, 3, 1, 5, 7)[:9] == (1, 2, 3, 1, 5, 7, 7, 7, 5)


def test_a_residual_is_added_to_one_f32_product_apart_from_c():
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    pingpong = dict(tma=True, pingpong=True, block_n=128, stages=5)
    for bad in (lambda: GemmSpec(residual=True, accumulate=True),
                lambda: GemmWgmmaSpec(**pingpong, residual=True, accumulate=True),
                lambda: GemmWgmmaSpec(**pingpong, residual=True, tma_store=True, bf16_out=True),
                lambda: GemmWgmmaSpec(**pingpong, residual=True, row_stats=True)):
        with pytest.raises(SpecError):
            bad()
    spec = GemmSpec(residual=True)
    with pytest.raises(ValueError, match="needs a residual"):
        spec.arguments(0, 0, 1 << 20, 8, 8, 8)
    with pytest.raises(ValueError, match="takes no residual"):
        GemmSpec().arguments(0, 0, 1 << 20, 8, 8, 8, residual=1 << 30)
    with pytest.raises(ValueError, match="one product"):
        spec.arguments(0, 0, 1 << 20, 8, 8, 8, residual=1 << 30, splits=2)
    with pytest.raises(ValueError, match="overlaps C"):
        spec.arguments(0, 0, 1 << 20, 8, 8, 8, residual=(1 << 20) + 128)
    assert spec.arguments(0, 0, 1 << 20, 8, 8, 8, residual=1 << 30)[3] == 1 << 30  # after a, b, c
    staged = GemmWgmmaSpec(**pingpong, residual=True, tma_store=True)
    assert [p for p, _ in staged.params()][:4] == ["tmap_a", "tmap_b", "tmap_c", "tmap_residual"]
    assert "residual" in [p for p, _ in GemmWgmmaSpec(**pingpong, residual=True).params()]


def test_gemm_tiles_must_split_into_thread_vectors():
    with pytest.raises(SpecError, match="does not split"):
        GemmSpec(block_m=64, block_n=64, thread_m=4, thread_n=4)
    with pytest.raises(SpecError, match="multiples of 4"):
        GemmSpec(thread_m=6)
    assert widest_vec(896, 4864) == 4 and widest_vec(6, 8) == 2 and widest_vec(7) == 1


def test_attention_specs_validate_heads_and_head_dim():
    with pytest.raises(SpecError, match="multiple of kv_heads"):
        AttentionSpec(heads=14, kv_heads=3, head_dim=64)
    with pytest.raises(SpecError, match="use more lanes"):
        AttentionSpec(heads=2, kv_heads=1, head_dim=256, lanes=2)
    with pytest.raises(SpecError, match="multiple of 16"):
        AttentionSpec(heads=2, kv_heads=1, head_dim=24, lanes=4)
    assert AttentionSpec(heads=2, kv_heads=1, head_dim=256, lanes=4).launch_dims(1, 5) == ((1, 2, 1), 128)
    # two lanes per row: 64 rows of a 128-thread block
    assert AttentionSpec(heads=14, kv_heads=2, head_dim=64).launch_dims(2, 1000) == ((16, 14, 2), 128)


def test_attention_reference_is_an_explicit_loop_over_visible_keys():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 5, 4, 8)), rng.standard_normal((1, 5, 2, 8)), rng.standard_normal((1, 5, 2, 8))
    o, _, lse = attention_reference(q, k, v)
    for h in range(4):
        for i in range(5):
            s = np.array([q[0, i, h] @ k[0, j, h // 2] / math.sqrt(8) for j in range(i + 1)])
            w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            np.testing.assert_allclose(o[0, i, h], w @ v[0, :i + 1, h // 2], rtol=1e-12)
            assert lse[0, h, i] == pytest.approx(np.log(np.exp(s).sum()))


def test_attention_backward_reference_matches_finite_differences():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((1, 4, 2, 4)), rng.standard_normal((1, 4, 1, 4)), rng.standard_normal((1, 4, 1, 4))
    do = rng.standard_normal(q.shape)
    o, p, _ = attention_reference(q, k, v)
    grads = attention_backward_reference(q, k, v, p, do)
    h = 1e-6
    for x, g in zip((q, k, v), grads):
        for idx in [(0, 1, 0, 2), (0, 3, 0, 0)]:
            old = x[idx]
            x[idx] = old + h
            up = np.sum(attention_reference(q, k, v)[0] * do)
            x[idx] = old - h
            down = np.sum(attention_reference(q, k, v)[0] * do)
            x[idx] = old
            assert g[idx] == pytest.approx((up - down) / (2 * h), rel=1e-6, abs=1e-8)


def test_tensor_core_gemm_refuses_what_its_16_byte_copies_cannot_serve():
    from ptxgen.kernels.gemm_tc import GemmTCSpec
    from ptxgen.kernels.mma_tile import swizzle
    with pytest.raises(ValueError, match="K=12 is not a multiple of 8"):
        GemmTCSpec().arguments(0, 0, 0, 8, 8, 12)
    with pytest.raises(ValueError, match="N \\(B not transposed\\)=12"):
        GemmTCSpec(trans_b=False).arguments(0, 0, 0, 8, 12, 16)
    with pytest.raises(ValueError, match="must be even"):
        GemmTCSpec().arguments(0, 0, 0, 8, 7, 16)
    with pytest.raises(SpecError, match="shared memory"):
        GemmTCSpec(block_n=256, block_k=64, stages=8)
    assert GemmTCSpec().arguments(1, 2, 3, 1, 8, 16)[:9] == (1, 2, 3, 1, 8, 16, 16, 16, 8)
    with pytest.raises(ValueError, match="batch stride 0=12"):
        GemmTCSpec().arguments(0, 0, 0, 8, 8, 16, batch=Batch(count=2, a=Strides(outer=12)))
    # any 8 consecutive rows put a chunk into 8 different 16-byte bank groups
    for chunks in (2, 4, 8, 16):
        shift, mask = swizzle(chunks)
        for c in range(chunks):
            units = {(r * chunks + (c ^ ((r >> shift) & mask))) % 8 for r in range(8)}
            assert len(units) == 8, (chunks, c)


def test_split_k_is_batches_that_step_along_k():
    """splits=s: part z reads A and B z*k further along K and writes C z*m*ldc further on."""
    from ptxgen.kernels.gemm_tc import GemmTCSpec
    dw = GemmTCSpec(trans_a=True, trans_b=False)  # dW = dy^T x: A [K, M], B [K, N]
    explicit = Batch(count=4, a=Strides(outer=96 * 136), b=Strides(outer=96 * 200), c=Strides(outer=136 * 200))
    assert dw.arguments(1, 2, 3, 136, 200, 96, splits=4) == dw.arguments(1, 2, 3, 136, 200, 96, batch=explicit)
    fwd = GemmSpec(trans_a=False, trans_b=True)  # K contiguous in both: K itself is the stride
    assert fwd.arguments(1, 2, 3, 8, 8, 16, splits=2)[-9:] == (16, 0, 1, 16, 0, 1, 64, 0, 1)
    with pytest.raises(ValueError, match="cannot combine with batches"):
        dw.arguments(1, 2, 3, 136, 200, 96, splits=2, batch=explicit)


def test_tma_wgmma_gemm_describes_its_tensor_maps_and_refuses_what_they_cannot_serve():
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    from ptxgen.hw import MmaType
    nt, dw = GemmWgmmaSpec(tma=True), GemmWgmmaSpec(tma=True, trans_a=True, trans_b=False, block_n=128)
    # K-major: the stored [rows, K] matrix in [block rows, 64 K] boxes; MN-major: [K, cols] in [64 K, 64] boxes
    assert nt.tma_operands(300, 520, 1000) == ((300, 1000, 1000, (128, 64)), (520, 1000, 1000, (256, 64)))
    assert dw.tma_operands(136, 200, 384) == ((384, 136, 136, (64, 64)), (384, 200, 200, (64, 64)))
    assert nt.threads == 288 and nt.launch_dims(4096, 4096, resident=132) == ((132, 1), 288)  # + a producer warp
    assert nt.launch_dims(1000, 1000, resident=132) == ((32, 1), 288)  # 8 x 4 tiles: one block each
    assert dw.launch_dims(136, 200, 4) == ((16, 1), 288)  # 2 x 2 tiles x 4 splits, one block each
    assert dw.arguments(1, 2, 3, 136, 200, 192, splits=4) == (1, 2, 3, 136, 200, 192, 200, 4)
    with pytest.raises(ValueError, match="K=96 is not a multiple of 64"):
        dw.arguments(1, 2, 3, 136, 200, 96, splits=4)
    with pytest.raises(ValueError, match="no batch, lda, ldb"):
        nt.arguments(1, 2, 3, 8, 8, 16, lda=32)
    with pytest.raises(SpecError, match="only the tma feed"):
        GemmWgmmaSpec(trans_b=False)
    with pytest.raises(SpecError, match="tf32 operands must be stored with K contiguous"):
        GemmWgmmaSpec(tma=True, trans_a=True, dtype=MmaType.TF32)
    # a bf16 C: only the tma kernel (whose C is addressed by row alone), never accumulated, never split
    for refused in (dict(), dict(tma=True, accumulate=True)):
        with pytest.raises(SpecError, match="bf16_out needs tma and cannot accumulate"):
            GemmWgmmaSpec(bf16_out=True, **refused)
    with pytest.raises(ValueError, match="split-K partial sums are f32"):
        GemmWgmmaSpec(tma=True, trans_a=True, trans_b=False, bf16_out=True).arguments(1, 2, 3, 136, 200, 192, splits=4)



@pytest.mark.parametrize("tc, wgmma, layout", [
    (AttentionTCBackwardQSpec, AttentionWgmmaBackwardQSpec, dict(warps=8, tile=32)),
    (AttentionTCBackwardKVSpec, AttentionWgmmaBackwardKVSpec, dict(warps=8, tile=32)),
    (AttentionTCBackwardQSpec, AttentionWgmmaBackwardQSpec, dict()),
    (AttentionTCBackwardKVSpec, AttentionWgmmaBackwardKVSpec, dict())])
def test_the_wgmma_backward_takes_the_tensor_core_backwards_arguments(tc, wgmma, layout):
    """So a model switches between them by its choice of spec alone: the same parameters in the same
    order, the same outputs and the same launch grid for the same rows a block."""
    fields = dict(heads=14, kv_heads=2, head_dim=128, **layout)
    ours, theirs = wgmma(**fields), tc(**fields)
    assert ours.params() == theirs.params() and ours.outputs() == theirs.outputs()
    assert ours.launch_dims(3, 1000) == theirs.launch_dims(3, 1000)
    assert ours.arch(Target("sm_90")) == "sm_90a"


@pytest.mark.parametrize("cls", [AttentionWgmmaBackwardQSpec, AttentionWgmmaBackwardKVSpec])
@pytest.mark.parametrize("layout", [dict(warps=2), dict(head_dim=32), dict(tile=16)])
def test_the_wgmma_backward_takes_whole_warpgroups_and_64_wide_column_chunks(cls, layout):
    with pytest.raises(SpecError, match="warps 4 or 8 \\(whole warpgroups\\), tile 32, 64 or 128, head_dim 64 or 128"):
        cls(**{**dict(heads=4, kv_heads=2, head_dim=64), **layout})


def test_the_wgmma_dk_dv_stages_keep_the_swizzle_alignment():
    """Each query stage (Q, dO, then 2 x tile floats of lse and delta) starts on a 1024-byte boundary."""
    spec = AttentionWgmmaBackwardKVSpec(heads=4, kv_heads=2, head_dim=64)  # 64 x 64 K and V, 64-query stages
    assert spec.dynamic_shared_bytes() == 2 * 8192 + 2 * 17408  # 2 * 8192 + 512 rounded up to 17 * 1024


def test_row_stats_are_of_the_plain_whole_product_and_come_with_their_buffer():
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    for refused in (dict(bias=True), dict(accumulate=True), dict(tma=False),
                    dict(pingpong=True, block_n=128, bf16_out=True, tma_store=True, swiglu_act=True)):
        with pytest.raises(SpecError, match="row_stats needs tma and the plain product"):
            GemmWgmmaSpec(**{"tma": True, "row_stats": True, **refused})
    # the bf16 model's loss: its logits in bf16, staged and stored by TMA, their statistics beside
    GemmWgmmaSpec(tma=True, row_stats=True, pingpong=True, block_n=128, bf16_out=True, tma_store=True)
    spec = GemmWgmmaSpec(tma=True, row_stats=True)
    assert spec.params()[3][0] == "stats" and spec.outputs() == ("c", "stats")
    with pytest.raises(ValueError, match="stats is required by row_stats"):
        spec.arguments(1, 2, 3, 128, 256, 128)
    with pytest.raises(ValueError, match="stats needs row_stats"):
        GemmWgmmaSpec(tma=True).arguments(1, 2, 3, 128, 256, 128, stats=4)
    with pytest.raises(ValueError, match="row statistics are of whole products"):
        spec.arguments(1, 2, 3, 128, 256, 128, stats=4, splits=2)


def test_the_cross_entropy_reads_statistics_of_power_of_two_tiles():
    from ptxgen.kernels.cross_entropy import CrossEntropySpec
    spec = CrossEntropySpec(vocab=151936, stats_block=128)
    assert spec.stats_tiles == 1187 and [n for n, _ in spec.params()][-2:] == ["stats", "grad_scale"]
    assert CrossEntropySpec(vocab=151936).stats_tiles == 0
    for bad in (100, -128):
        with pytest.raises(SpecError, match="stats_block must be 0 or a power of two"):
            CrossEntropySpec(vocab=1000, stats_block=bad)


@pytest.mark.parametrize("cls", [AttentionTCBackwardKVSpec, AttentionWgmmaBackwardKVSpec])
def test_dk_dv_teams_split_the_warps_evenly(cls):
    fields = dict(heads=4, kv_heads=2, head_dim=64)
    spec = cls(**fields, warps=8, teams=2)
    assert (spec.rows_per_block, spec.team_threads) == (64, 128)
    assert spec.launch_dims(2, 1000) == ((16, 2, 2), 256)  # 64 keys a block, as one warpgroup alone
    with pytest.raises(SpecError, match="teams must be > 0"):
        cls(**fields, teams=0)
    with pytest.raises(SpecError, match="8 warps do not split into 3 teams"):
        cls(**fields, warps=8, teams=3)


def test_a_wgmma_dk_dv_team_is_whole_warpgroups():
    with pytest.raises(SpecError, match="a team is whole warpgroups, got 2 warps"):
        AttentionWgmmaBackwardKVSpec(heads=4, kv_heads=2, head_dim=64, warps=4, teams=2)


def test_a_tma_store_is_the_pingpong_kernels_and_its_c_map_refuses_what_it_cannot_describe():
    """``tma_store``: pingpong only, storing C (no accumulate); the staging fits
    beside the stages (f32 C: 5 stages, not 6); C's rows 16-byte aligned; the C tensor map only
    for such a spec, rows not overlapping."""
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    from runtime.tensormap import gemm_c_tensor_map
    tile = dict(tma=True, pingpong=True, block_n=128, stages=6)
    for refused in (dict(pingpong=False), dict(accumulate=True)):
        with pytest.raises(SpecError, match="tma_store is the pingpong kernel's"):
            GemmWgmmaSpec(**{**tile, "tma_store": True, **refused})
    with pytest.raises(SpecError, match="6 stages need .* bytes of shared memory"):
        GemmWgmmaSpec(**tile, tma_store=True)  # f32 C: 64 KB of staging beside 192 KB of stages
    spec = GemmWgmmaSpec(**tile, bf16_out=True, tma_store=True)
    assert spec.dynamic_shared_bytes() == 6 * (32768 + 16) + 2 * 64 * 128 * 2
    assert GemmWgmmaSpec(**{**tile, "stages": 5}, tma_store=True).staging_bytes() == 2 * 64 * 128 * 4
    with pytest.raises(ValueError, match="TMA store's C rows must be 16-byte aligned: ldc=12"):
        spec.arguments(1, 2, 3, 128, 12, 128)
    with pytest.raises(ValueError, match="tma_store spec's"):
        gemm_c_tensor_map(GemmWgmmaSpec(**tile, bf16_out=True), 0, 8, 8)
    with pytest.raises(ValueError, match="rows overlap"):
        gemm_c_tensor_map(spec, 0, 8, 16, ldc=8)
    with pytest.raises(ValueError, match="16-byte aligned rows"):
        gemm_c_tensor_map(spec, 0, 8, 12)
