"""The model's kernel set comes from its config alone: eps and theta reach every spec that uses them."""

import dataclasses

import numpy as np
import pytest

from model.config import PRESETS, preset
from model.cuda_buffers import ParamLayout
from model.kernels import LinearKernels, ModelKernels, rope_in_gemm
from model.optim import AdamWSettings, decays
from model.precision import Precision
from ptxgen.kernels.adamw import AdamWSpec
from ptxgen.kernels.attention import AttentionBackwardKVSpec, AttentionBackwardQSpec, AttentionSpec
from ptxgen.kernels.attention_tc import AttentionTCBackwardKVSpec, AttentionTCBackwardQSpec, AttentionTCSpec
from ptxgen.kernels.attention_wgmma import AttentionWgmmaBackwardKVSpec, AttentionWgmmaBackwardQSpec, AttentionWgmmaSpec
from ptxgen.kernels.cast import CastSpec
from ptxgen.kernels.colsum import ColumnSumSpec
from ptxgen.kernels.cross_entropy import CrossEntropySpec
from ptxgen.kernels.gemm import GemmSpec
from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
from ptxgen.kernels.rmsnorm import RMSNormBackwardSpec, RMSNormSpec
from ptxgen.kernels.rope import RopeSpec, RopeTableSpec
from ptxgen.kernels.swiglu import SwiGLUBackwardSpec, SwiGLUSpec
from ptxgen.vecio import DType


@pytest.mark.parametrize("precision", list(Precision))
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_eps_and_theta_from_the_config_reach_every_spec(name, precision):
    config = preset(name)
    for eps, theta in ((1e-5, 1e4), (1e-6, 1e6), (3e-7, 5e5)):
        specs = ModelKernels.of(config.replace(rms_norm_eps=eps, rope_theta=theta), AdamWSettings(), -100,
                                precision).specs()
        norms = [s for s in specs if isinstance(s, RMSNormSpec)]
        ropes = [s for s in specs if isinstance(s, RopeSpec)]
        tables = [s for s in specs if isinstance(s, RopeTableSpec)]  # the q/k/v GEMM's RoPE's angles
        assert norms and all(s.eps == eps for s in norms)
        assert all(s.theta == theta for s in ropes + tables)
        # RoPE forward and backward by its kernels, or by the table's angles in the q/k/v GEMM's
        # epilogue and the attention backward's (qkv_rows)
        assert {s.inverse for s in ropes} == (set() if tables else {False, True})
        assert len(tables) == rope_in_gemm(config, precision)
        assert all(s.qkv_rows == bool(tables) for s in specs if hasattr(s, "qkv_rows"))


def test_a_config_change_changes_the_spec_set_and_every_affected_key():
    base = ModelKernels.of(preset("qwen2-0.5b"), AdamWSettings(), -100)
    other = ModelKernels.of(preset("qwen2-0.5b").replace(rope_theta=1e4), AdamWSettings(), -100)
    changed = set(base.specs()) ^ set(other.specs())
    assert {type(s) for s in changed} == {RopeSpec}


def test_biases_gqa_and_optimizer_settings_are_carried():
    qwen = ModelKernels.of(preset("qwen2-0.5b"), AdamWSettings(weight_decay=0.05), -100)
    assert qwen.qkv.forward.bias and not qwen.o.forward.bias
    assert not ModelKernels.of(preset("llama-style"), AdamWSettings(), -100).qkv.forward.bias
    attn = next(s for s in qwen.specs() if isinstance(s, AttentionSpec))
    assert (attn.heads, attn.kv_heads, attn.head_dim) == (14, 2, 64)
    adamw = [s for s in qwen.specs() if isinstance(s, AdamWSpec)]
    assert sorted(s.weight_decay for s in adamw) == [0.0, 0.05]
    for s in qwen.specs():  # every GEMM's vector width divides the model's dimensions
        if isinstance(s, GemmSpec):
            assert 896 % s.vec == 0 and 128 % s.vec == 0


def test_parameter_layout_is_aligned_and_puts_decayed_tensors_first():
    layout = ParamLayout(preset("tiny"))
    assert all(off % 8 == 0 for off in layout.offsets.values())  # 16 bytes in bf16 too
    for name, off in layout.offsets.items():
        assert (off < layout.decay_end) == decays(name)
    import numpy as np
    from model.params import init_params
    params = init_params(preset("tiny"), seed=1)
    back = layout.unflatten(layout.flatten(params))
    assert all(np.array_equal(back[k], params[k]) for k in params)


def test_weight_gradients_split_their_token_contraction_when_it_pays():
    from model.kernels import split_k
    fp32 = ModelKernels.of(preset("qwen2-0.5b"), AdamWSettings(), -100)
    bf16 = ModelKernels.of(preset("qwen2-0.5b"), AdamWSettings(), -100, Precision.BF16)
    # 38 x 7 = 266 tiles of 128 on 264 (fp32) or 132 (bf16) slots: a second wave all but idle
    assert split_k(fp32.gate_up.grad_weight, 4864, 896, 8192, wave=264) == 8
    assert split_k(fp32.gate_up.grad_weight, 4864, 896, 8192, wave=266) == 1   # one full wave: leave it
    # tensor cores are 10x faster for the same partial-sum traffic: fewer parts pay
    assert split_k(bf16.gate_up.grad_weight, 4864, 896, 8192, wave=132) == 2
    # (which the model's bf16 GEMM, running alone on the GPU, does not need: it cuts its tail)
    assert bf16.gate_up.grad_weight.tail_parts(4864, 896, 8192, 132) > 1
    # a narrow weight, [128, 896] (qwen2-0.5b's k or v alone)
    kv16, kv32 = (LinearKernels.of(896, 128, precision=p) for p in (Precision.BF16, Precision.FP32))
    assert split_k(kv16.grad_weight, 128, 896, 8192, wave=132) == 16      # 7 tiles on 132 blocks
    # a TMA-fed part must be a whole number of 64-long slices: 8320 tokens = 2 x 4160 = 65 x 64 x 2
    assert split_k(kv16.grad_weight, 128, 896, 8320, wave=132) == 2
    assert split_k(kv32.grad_weight, 128, 896, 8320, wave=792) == 16
    assert split_k(kv32.grad_weight, 128, 896, 8192, wave=792) == 16        # 28 tiles of 64
    assert split_k(kv32.grad_weight, 128, 896, 87, wave=792) == 1           # odd token count: no split
    assert split_k(kv32.grad_weight, 128, 896, 512, wave=792) == 2          # parts stay >= 256 tokens


def test_bf16_precision_puts_gemms_and_attention_on_tensor_cores_and_adds_the_cast():
    fp32 = ModelKernels.of(preset("qwen2-0.5b"), AdamWSettings(), -100)
    bf16 = ModelKernels.of(preset("qwen2-0.5b"), AdamWSettings(), -100, Precision.BF16)
    gemms = lambda kernels: [s for s in kernels.specs() if isinstance(s, (GemmSpec, GemmWgmmaSpec))]  # noqa
    assert all(isinstance(s, GemmSpec) for s in gemms(fp32)) and fp32.to_bf16 is None
    # every bf16 GEMM, all three layouts, on the TMA-fed warpgroup MMA kernel
    assert all(isinstance(s, GemmWgmmaSpec) and s.tma for s in gemms(bf16))
    # forward (with bias, without, adding the residual stream, bf16 out, the loss's LM head), dX
    # (bf16: o_proj's, the attention backward's operand, the others' a norm backward's dy, and
    # down's, which stores SwiGLU's backward of it), dW
    assert len(gemms(bf16)) == 8 and all(bf16.linear(m).grad_input.bf16_out for m in ("o_proj", "qkv_proj",
                                                                                      "gate_up_proj", "lm_head"))
    assert bf16.norm_bwd.dy_dtype is bf16.norm_bwd_residual.dy_dtype is DType.BF16
    assert fp32.norm_bwd.dy_dtype is fp32.norm_bwd_residual.dy_dtype is DType.F32
    # the q/k/v bias's gradient sums its output gradient as the GEMMs read it
    assert bf16.bias_sum.dtype is bf16.bias_sum_chunks.dtype is DType.BF16 and fp32.bias_sum == fp32.colsum
    assert bf16.down.grad_input.swiglu_grad and bf16.swiglu_bwd is None and fp32.swiglu_bwd is not None
    assert [s for s in gemms(bf16) if s.swiglu_grad] == [bf16.down.grad_input]
    # a bf16 C (gate/up's forward, o_proj's dX, the loss's logits) leaves through shared memory by
    # TMA, and so does the residual stream's sum, R brought into the staging by TMA first; another
    # f32 C by the threads (and q, k, v by the RoPE epilogue's)
    assert all(s.tma_store == (s.bf16_out or s.swiglu_grad or s.residual) for s in gemms(bf16))
    assert bf16.gate_up.forward.tma_store
    # the o and down projections add the residual stream in their forward GEMM, in both precisions
    for kernels in (fp32, bf16):
        assert kernels.o.forward.residual and kernels.down.forward.residual
        assert not (kernels.qkv.forward.residual or kernels.gate_up.forward.residual or kernels.head.forward.residual)
    # the loss's LM head stores its logits in bf16 and makes the cross-entropy's row statistics of them
    assert bf16.head_logits == dataclasses.replace(bf16.head.forward, row_stats=True, bf16_out=True, tma_store=True)
    assert fp32.head_logits is None and bf16.cross_entropy.dtype is DType.BF16 and fp32.cross_entropy.dtype is DType.F32
    # the q/k/v projection's forward applies RoPE and stores q, k and v (no RoPE kernel, no v copy)
    assert (bf16.qkv.forward.rope_heads, bf16.qkv.forward.rope_kv_heads, bf16.qkv.forward.rope_head_dim) == (14, 2, 64)
    assert bf16.rope_q is bf16.rope_k is bf16.v_copy is None and fp32.rope_q is not None
    assert bf16.cross_entropy.stats_block == bf16.head_logits.block_n and fp32.cross_entropy.stats_block == 0
    assert {(s.trans_a, s.trans_b) for s in gemms(bf16)} == {(False, True), (False, False), (True, False)}
    assert bf16.to_bf16 == CastSpec() and CastSpec() in bf16.specs() and CastSpec() not in fp32.specs()
    assert bf16.qkv.forward.bias and not bf16.o.forward.bias
    # one tile everywhere, the fastest at every layer shape on the H200: 128 x 128, 6 stages, pingpong
    # (5 where the SwiGLU's or the residual's staged operands take the shared memory of one)
    staged = {bf16.down.grad_input, bf16.gate_up.forward, bf16.o.forward}
    assert {(s.block_n, s.stages, s.pingpong) for s in gemms(bf16) if s not in staged} == {(128, 6, True)}
    assert {(s.block_n, s.stages, s.pingpong) for s in staged} == {(128, 5, True)}
    assert bf16.gate_up.forward.swiglu_act and bf16.swiglu is None and fp32.swiglu is not None
    assert isinstance(bf16.attention, AttentionWgmmaSpec)  # forward and backward on wgmma
    assert isinstance(bf16.attention_bwd_q, AttentionWgmmaBackwardQSpec)
    assert isinstance(bf16.attention_bwd_kv, AttentionWgmmaBackwardKVSpec) and bf16.attention_bwd_kv.teams == 2
    # dK/dV in two teams at head_dim 64; at 128 (896 / 7 heads) one warpgroup a block, 64-query tiles
    d128 = ModelKernels.of(preset("qwen2-0.5b").replace(num_heads=7, num_kv_heads=1), AdamWSettings(), -100,
                           Precision.BF16).attention_bwd_kv
    assert (d128.head_dim, d128.teams, d128.warps, d128.tile) == (128, 1, 4, 64)
    tiny = ModelKernels.of(preset("tiny"), AdamWSettings(), -100, Precision.BF16)  # head_dim 32: mma.sync
    assert isinstance(tiny.attention, AttentionTCSpec) and tiny.attention.head_dim == 32
    assert isinstance(tiny.attention_bwd_kv, AttentionTCBackwardKVSpec)
    # (no qkv_rows at head_dim 32: RoPE's backward and dv's copy write the projection's gradient
    # rows, in bf16, as its GEMMs and its bias's column sum read them)
    assert not tiny.attention_bwd_q.qkv_rows and tiny.rope_q_bwd.bf16_out and tiny.rope_k_bwd.bf16_out
    assert tiny.dv_copy == CastSpec(dst=DType.BF16, strided=True)
    assert (bf16.attention.heads, bf16.attention.kv_heads, bf16.attention.head_dim) == (14, 2, 64)
    # everything else is the same kernel in both precisions
    assert fp32.swiglu.out_dtype is DType.F32
    assert bf16.cross_entropy.grad_dtype is DType.BF16 and fp32.cross_entropy.grad_dtype is DType.F32
    assert bf16.norm.bf16_out and not fp32.norm.bf16_out  # q/k/v, MLP, head inputs
    # a warp a norm's row where it fits (896: 28 values a lane), a block where it does not (3584: 112)
    assert bf16.norm.warp_per_row and fp32.norm.warp_per_row
    wide = ModelKernels.of(preset("qwen2-0.5b").replace(hidden_size=3584, num_heads=28, num_kv_heads=4),
                           AdamWSettings(), -100, Precision.BF16)
    assert not wide.norm.warp_per_row
    assert fp32.rope_q is not None and not fp32.rope_q.bf16_out and not fp32.rope_q_bwd.bf16_out
    # ... and the attention backward writes the projection's gradient rows, rotated back (qkv_rows)
    assert bf16.rope_q_bwd is bf16.rope_k_bwd is bf16.dv_copy is None
    assert bf16.attention_bwd_q.qkv_rows and bf16.attention_bwd_kv.qkv_rows
    assert bf16.norm_bwd.bf16_copy and bf16.norm_bwd_residual.bf16_copy and not fp32.norm_bwd.bf16_copy
    assert bf16.adamw_decay.bf16_copy and not fp32.adamw_decay.bf16_copy  # the matrices' bf16 copy
    assert bf16.adamw_no_decay == fp32.adamw_no_decay
    differ = (AdamWSpec, RMSNormSpec, RMSNormBackwardSpec, RopeSpec, RopeTableSpec, GemmSpec, GemmWgmmaSpec, CastSpec, AttentionSpec, AttentionBackwardQSpec, AttentionBackwardKVSpec,
              AttentionTCSpec, AttentionWgmmaSpec, AttentionTCBackwardQSpec, AttentionTCBackwardKVSpec,
              AttentionWgmmaBackwardQSpec, AttentionWgmmaBackwardKVSpec, SwiGLUSpec,
              SwiGLUBackwardSpec, CrossEntropySpec)
    same = lambda kernels: {s for s in kernels.specs() if not isinstance(s, differ)}  # noqa: E731
    # embeddings, column sums, grad norm (bf16 adds the bias's column sums of bf16 rows)
    assert same(fp32) == same(bf16) - {bf16.bias_sum, bf16.bias_sum_chunks} and len(same(fp32)) >= 6


@pytest.mark.parametrize("precision", list(Precision))
def test_the_bias_sums_are_made_only_for_a_model_with_q_k_v_biases(precision):
    """They sum the q/k/v biases' gradients and nothing else: without biases nothing launches them,
    so they are neither built nor pre-warmed (in bf16, the only column sums of bf16 rows)."""
    biased, plain = (ModelKernels.of(preset(name), AdamWSettings(), -100, precision)
                     for name in ("qwen2-0.5b", "llama-style"))
    assert {biased.bias_sum, biased.bias_sum_chunks} <= set(biased.specs())
    assert plain.bias_sum is None and plain.bias_sum_chunks is None
    assert not any(isinstance(s, ColumnSumSpec) and s.dtype is DType.BF16 for s in plain.specs())


def test_every_kernel_a_preset_runs_assembles_without_spilling():
    """The exact specs the model launches (not only the registry's examples; alone on a GPU and as
    a data-parallel rank): each assembles for sm_90 with nvJitLink, its registers within budget (a
    spill would be slow, not wrong), with no performance note from ptxas."""
    from model.config import PRESETS
    from ptxgen.assemble import assemble
    from ptxgen.spec import Target
    specs = {s for config in PRESETS.values() for precision in Precision for cut in (True, False)
             for s in ModelKernels.of(config, AdamWSettings(), -100, precision, cut_tails=cut).specs()}
    assert len(specs) >= 40
    for spec in specs:
        result = assemble(spec.emit(Target()), spec.arch(Target()))
        assert result.spill_stores == 0 and result.spill_loads == 0, (spec, result.log)
        # e.g. C7509: a call (rcp.rn's slow path) serializes every wgmma of the kernel
        assert "Potential Performance Loss" not in result.log, (spec, result.log)


@pytest.mark.parametrize("changes, precision, words", [
    (dict(hidden_size=120, num_heads=4, num_kv_heads=2), Precision.FP32, "head_dim a multiple of 4, got 30"),
    (dict(hidden_size=120, num_heads=4, num_kv_heads=2), Precision.BF16, "head_dim must be 32, 64 or 128"),
    (dict(intermediate_size=350), Precision.BF16,
     "gate_up_proj .*intermediate_size 350.*N=700 must be a multiple of 16"),
    (dict(vocab_size=250), Precision.BF16, "K=250 is not a multiple of 8")])
def test_a_model_the_cuda_kernels_cannot_run_is_one_line_before_any_work(changes, precision, words):
    """What the plan would refuse at its first launch (or crash on: the fp32 attention's lanes at
    head_dim 30), said by train and generate before a file is written or a kernel built."""
    from model.cli import UsageError, check_gpu_kernels
    with pytest.raises(UsageError, match=f"the CUDA kernels cannot run this model: .*{words}"):
        check_gpu_kernels(preset("tiny").replace(**changes), precision, 8 * 128)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_runs_on_the_cuda_kernels_in_both_precisions(name):
    from model.cli import check_gpu_kernels
    for precision in Precision:
        check_gpu_kernels(preset(name), precision, 8 * 1024)


@pytest.mark.parametrize("changes", [{}, dict(hidden_size=12, num_heads=2, num_kv_heads=1, intermediate_size=7)],
                         ids=["tiny", "odd sizes"])
def test_a_fused_modules_parts_are_adjacent_and_every_module_starts_aligned(changes):
    """Gate and up follow each other unpadded (one GEMM reads both) even where intermediate x hidden
    is not a multiple of 8; the module after them starts 8-element aligned again; flatten and
    unflatten round-trip; the GEMMs' shapes are the fused ones."""
    from model.cuda_buffers import linear_shapes
    from model.params import init_params
    config = preset("tiny").replace(**changes)
    layout = ParamLayout(config)
    p = "model.layers.0.mlp."
    gate, up = (layout.offsets[p + n] for n in ("gate_proj.weight", "up_proj.weight"))
    I, H = config.intermediate_size, config.hidden_size
    assert up == gate + I * H and layout.offsets[p + "down_proj.weight"] % 8 == 0 and gate % 8 == 0
    assert layout.fused(p + "gate_up_proj") == (gate, (2 * I, H))
    shapes = linear_shapes(layout.shapes)
    assert shapes[p + "gate_up_proj"] == (2 * I, H) and p + "gate_proj" not in shapes and p + "up_proj" not in shapes
    params = init_params(config, seed=3)
    back = layout.unflatten(layout.flatten(params))
    assert all(np.array_equal(back[n], params[n]) for n in params)


def test_an_fp32_model_whose_intermediate_size_is_not_a_multiple_of_4_runs():
    """Its SwiGLU takes fewer elements a thread (the fp32 GEMMs do so too); bf16 refuses it (8 needed)."""
    from model.cli import UsageError, check_gpu_kernels
    config = preset("tiny").replace(intermediate_size=350)
    check_gpu_kernels(config, Precision.FP32, 8 * 128)
    assert ModelKernels.of(config, AdamWSettings(), -100).swiglu.vec == 2
    assert ModelKernels.of(preset("tiny"), AdamWSettings(), -100).swiglu.vec == 0  # 16 bytes: the default
    with pytest.raises(UsageError, match="intermediate_size 350"):
        check_gpu_kernels(config, Precision.BF16, 8 * 128)


def test_kernels_that_disagree_on_who_makes_what_are_refused():
    """A kernel set whose parts disagree (a fused epilogue and the kernel it replaces both there, or
    neither; logits stored in one dtype and read in another) is refused when it is made, before
    a plan runs it: each would be a silent wrong answer (the NaN loss of f32 logits read as bf16)."""
    k = ModelKernels.of(preset("qwen2-0.5b"), AdamWSettings(), -100, Precision.BF16)
    rope = RopeSpec(heads=14, head_dim=64, theta=1e6, bf16_out=True, strided=True)
    for changes, words in (
            (dict(head_logits=None, cross_entropy=dataclasses.replace(k.cross_entropy, stats_block=0)),
             "stores its logits in f32, the cross-entropy reads bf16"),
            (dict(cross_entropy=dataclasses.replace(k.cross_entropy, dtype=DType.F32)), "reads f32"),
            (dict(rope_q=rope), "disagree on who makes it"),
            (dict(rope_table=None), "disagree on the angles' table"),
            (dict(dv_copy=CastSpec(dst=DType.BF16, strided=True)), "q/k/v gradient rows"),
            (dict(attention_bwd_q=dataclasses.replace(k.attention_bwd_q, qkv_rows=False)), "q/k/v gradient rows")):
        with pytest.raises(ValueError, match=words):
            dataclasses.replace(k, **changes)
