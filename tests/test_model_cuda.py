"""The CUDA model against the numpy reference (and HF transformers) on the same weights, fp32.

Tolerances: logits within 1e-4 absolute with the same argmax at every position; the loss within
1e-5 relative; gradients within 1e-4 of each tensor's largest reference magnitude.
"""
import functools
import math

import numpy as np
import pytest

from model.config import ModelConfig, preset
from model.data import ByteTokenizer, Corpus, stdlib_files
from model.optim import AdamWSettings
from model.params import init_params
from model.precision import Precision
from model.reference import ReferenceModel
from model.train import TrainSettings, train
from runtime import ModuleCache

pytestmark = pytest.mark.cuda
QWEN_SHAPED = preset("qwen2-0.5b").replace(num_layers=2)
# the default GPU run's attention (small: 8 query heads on 4 KV heads, head_dim 64: wgmma), 2 layers
SMALL_SHAPED = preset("small").replace(num_layers=2)
CONFIGS = {"tiny": preset("tiny"), "qwen2-shaped-2-layer": QWEN_SHAPED}


@pytest.fixture(scope="module")
def cache():
    return ModuleCache(use_disk=False)


def live_params(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Init weights with nonzero biases and norm weights away from 1, so every path carries signal."""
    params = init_params(config, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for name, p in params.items():
        if name.endswith(".bias"):
            params[name] = (0.1 * rng.standard_normal(p.shape)).astype(np.float32)
        elif name.endswith("norm.weight"):
            params[name] = (1 + 0.1 * rng.standard_normal(p.shape)).astype(np.float32)
    return params


def backend(cache, config, params, precision=Precision.FP32, **adamw):
    from model.cuda_model import CudaBackend
    return CudaBackend(config, params, AdamWSettings(**adamw), cache=cache, precision=precision)


def gpu_logits(cache, config, params, ids, precision=Precision.FP32):
    """The CUDA model's logits for ``ids`` from a backend built for this call alone."""
    model = backend(cache, config, params, precision)
    try:
        return model.logits(ids)
    finally:
        model.close()


def batch(config, b=2, s=37, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config.vocab_size, (b, s))
    targets = rng.integers(0, config.vocab_size, (b, s))
    targets[0, 3] = -100
    return ids, targets


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_numpy_with_the_same_argmax_everywhere(cache, name):
    config = CONFIGS[name]
    params = live_params(config)
    ids, _ = batch(config)
    ours = gpu_logits(cache, config, params, ids)
    ref = ReferenceModel(config, params).forward(ids)
    assert np.abs(ours - ref).max() <= 1e-4
    assert np.array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("config, shape", [
    (preset("tiny"), (3, 29)),
    (preset("tiny").replace(qkv_bias=False, tie_word_embeddings=True), (3, 29)),
    (preset("tiny"), (4, 128)),  # 512 tokens: the small dW GEMMs split their contraction
])
def test_loss_and_every_gradient_match_numpy(cache, config, shape):
    params = live_params(config)
    ids, targets = batch(config, *shape)
    model = backend(cache, config, params)
    try:
        loss, grads = model.loss_and_grads(ids, targets)
    finally:
        model.close()
    ref_loss, ref_grads = ReferenceModel(config, params).loss_and_grads(ids, targets)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        scale = np.abs(ref_grads[name]).max()
        assert np.abs(g - ref_grads[name]).max() <= 1e-4 * max(scale, 1e-3), name


def test_biases_theta_and_eps_each_change_the_gpu_logits(cache):
    config = preset("tiny")
    params = live_params(config)
    ids, _ = batch(config)

    def logits(cfg, p):
        return gpu_logits(cache, cfg, p, ids)

    base = logits(config, params)
    no_bias = {k: v for k, v in params.items() if not k.endswith(".bias")}
    assert np.abs(logits(config.replace(qkv_bias=False), no_bias) - base).max() > 1e-3
    assert np.abs(logits(config.replace(rope_theta=1e6), params) - base).max() > 1e-3
    assert np.abs(logits(config.replace(rms_norm_eps=1e-2), params) - base).max() > 1e-3


def test_steps_run_in_strict_mode_with_no_compiles_after_construction(cache):
    config = preset("tiny")
    model = backend(cache, config, live_params(config))
    try:
        before = (cache.stats.jit_compiles, cache.stats.disk_hits)
        ids, targets = batch(config)
        model.train_step(ids, targets, 1e-3)
        model.loss(ids, targets)
        assert (cache.stats.jit_compiles, cache.stats.disk_hits) == before
        assert all(spec in cache for spec in model.kernels.specs())
    finally:
        model.close()


@pytest.fixture(scope="module")
def corpus():
    return Corpus.from_files(stdlib_files()[:80], ByteTokenizer())


def train_run(cache, corpus, out, resume=False, config=preset("tiny"), precision=Precision.FP32, seq_len=64):
    from model.cuda_model import CudaBackend
    settings = TrainSettings(steps=20, batch_size=4, seq_len=seq_len, lr=3e-3, warmup=5, eval_every=10,
                             eval_batches=2, checkpoint_every=10)
    return train(config, settings, AdamWSettings(), corpus,
                 lambda c, p, a: CudaBackend(c, p, a, cache=cache, precision=precision), out, log=lambda m: None,
                 progress=False, resume=resume)


@pytest.mark.parametrize("shape", [dict(), dict(config=SMALL_SHAPED, precision=Precision.BF16, seq_len=200)],
                         ids=["tiny-fp32", "small-shaped-bf16-wgmma-attention"])
def test_two_runs_are_bit_identical_and_a_resumed_run_matches(cache, corpus, tmp_path, shape):
    """Also in the default GPU run's precision and attention kernels (bf16; wgmma at head_dim 64,
    several 64- and 128-row tiles a sequence)."""
    from model.checkpoint import load_checkpoint, save_checkpoint
    run = functools.partial(train_run, **shape)
    a = run(cache, corpus, tmp_path / "a")
    b = run(cache, corpus, tmp_path / "b")
    assert a.train_losses == b.train_losses and len(a.train_losses) == 20
    assert abs(a.val_losses[0] - math.log(256)) <= 0.05
    assert a.val_losses[20] < a.val_losses[0] - 0.5
    ckpt = load_checkpoint(tmp_path / "a" / "step-0000010")
    save_checkpoint(tmp_path / "r", 10, ckpt.config, ckpt.params, ckpt.optimizer, ckpt.trainer)
    resumed = run(cache, corpus, tmp_path / "r", resume=True)
    assert resumed.train_losses == a.train_losses[10:]


def test_the_fused_loss_and_the_dk_dv_teams_train_as_the_kernels_they_replace(cache, corpus, tmp_path, monkeypatch):
    """bf16, 20 steps: the LM head's row statistics feeding the cross-entropy, and the dK/dV kernel's
    two teams of a warpgroup, against the kernels before them (the cross-entropy's own two passes
    over the logits, stored in bf16 as the LM head stores them; one warpgroup a block over
    128-query tiles). The same function summed in another
    f32 order: the first steps' losses agree to ~1e-6 of their size (measured on an H200: at most
    1.1e-6 over steps 0-3, 6.5e-6 by step 6), after which bf16 rounding of slightly different values
    moves the runs apart as any other summation order would (4.7% at step 16 there); the last 10
    steps' mean loss agrees to 2% (0.3% there). A wrong statistic or a lost team's sum is off from
    step 0 or 1."""
    import dataclasses
    from model.kernels import ModelKernels
    shape = dict(config=SMALL_SHAPED, precision=Precision.BF16, seq_len=200)
    fused = train_run(cache, corpus, tmp_path / "fused", **shape)
    made = ModelKernels.of.__func__

    def unfused(cls, *args, **kwargs):
        k = made(cls, *args, **kwargs)
        assert k.head_logits is not None and k.attention_bwd_kv.teams == 2  # what this test replaces
        head = dataclasses.replace(k.head, forward=dataclasses.replace(k.head.forward, bf16_out=True, tma_store=True))
        return dataclasses.replace(
            k, head_logits=None, head=head, cross_entropy=dataclasses.replace(k.cross_entropy, stats_block=0),
            attention_bwd_kv=dataclasses.replace(k.attention_bwd_kv, warps=4, teams=1, tile=128))

    monkeypatch.setattr(ModelKernels, "of", classmethod(unfused))
    before = train_run(cache, corpus, tmp_path / "unfused", **shape)
    ours, theirs = np.array(fused.train_losses), np.array(before.train_losses)
    assert len(ours) == 20 and np.isfinite(ours).all()
    np.testing.assert_allclose(ours[:4], theirs[:4], rtol=2e-5)
    assert abs(ours[10:].mean() - theirs[10:].mean()) <= 0.02 * theirs[10:].mean()


def test_the_swiglu_in_the_gate_up_and_down_gemms_trains_bit_for_bit_as_its_own_kernels(cache, corpus, tmp_path,
                                                                                      monkeypatch):
    """bf16, 20 steps: the gate/up projection's GEMM also storing silu(gate) * up (``swiglu_act``)
    and the down projection's dX GEMM storing SwiGLU's backward of its product (``swiglu_grad``),
    against the GEMMs storing their products and the swiglu and swiglu_bwd kernels reading them:
    the same arithmetic on the same values, so every loss is the same, bit for bit."""
    import dataclasses
    from model.kernels import ModelKernels
    from ptxgen.kernels.swiglu import SwiGLUBackwardSpec, SwiGLUSpec
    from ptxgen.vecio import DType
    shape = dict(config=SMALL_SHAPED, precision=Precision.BF16, seq_len=200)
    fused = train_run(cache, corpus, tmp_path / "fused", **shape)
    made = ModelKernels.of.__func__

    def unfused(cls, *args, **kwargs):
        k = made(cls, *args, **kwargs)
        fwd, dx = k.gate_up.forward, k.down.grad_input
        assert fwd.swiglu_act and dx.swiglu_grad and k.swiglu is None and k.swiglu_bwd is None  # what this replaces
        fwd = dataclasses.replace(fwd, swiglu_act=False, stages=6)
        dx = dataclasses.replace(dx, swiglu_grad=False, tma_store=False, stages=6)
        bf16 = dict(dtype=DType.BF16, out_dtype=DType.BF16)
        return dataclasses.replace(k, gate_up=dataclasses.replace(k.gate_up, forward=fwd),
                                   down=dataclasses.replace(k.down, grad_input=dx), swiglu=SwiGLUSpec(**bf16),
                                   swiglu_bwd=SwiGLUBackwardSpec(**bf16))

    monkeypatch.setattr(ModelKernels, "of", classmethod(unfused))
    before = train_run(cache, corpus, tmp_path / "unfused", **shape)
    assert len(fused.train_losses) == 20 and np.isfinite(fused.train_losses).all()
    assert fused.train_losses == before.train_losses


def test_rope_in_the_qkv_gemm_trains_bit_for_bit_as_the_rope_kernels(cache, corpus, tmp_path, monkeypatch):
    """bf16, 20 steps: the q/k/v projection's GEMM storing q, k (rotated) and v in bf16 itself and
    the attention backward writing the projection's gradient rows rotated back (``rope_in_gemm``,
    ``qkv_rows``), against the path they replace: the GEMM's f32 [q | k | v], the RoPE kernels and
    v's cast reading it; dq, dk, dv, the RoPE backward kernels and dv's copy. The same arithmetic
    on the same values: every loss bit for bit."""
    import model.kernels
    shape = dict(config=SMALL_SHAPED, precision=Precision.BF16, seq_len=200)
    assert model.kernels.rope_in_gemm(SMALL_SHAPED, Precision.BF16)  # what this test replaces
    fused = train_run(cache, corpus, tmp_path / "fused", **shape)
    # the kernels as if no tile held whole heads (the buffers follow the kernels)
    monkeypatch.setattr(model.kernels, "rope_in_gemm", lambda config, precision: False)
    before = train_run(cache, corpus, tmp_path / "unfused", **shape)
    assert len(fused.train_losses) == 20 and np.isfinite(fused.train_losses).all()
    assert fused.train_losses == before.train_losses and fused.val_losses == before.val_losses


def test_training_from_populated_weights_starts_well_below_ln_vocab_on_the_gpu(cache, corpus, tmp_path):
    """FALSIFY-INIT-002: the GPU backend takes populated weights (train --init), not a fresh init."""
    from model.checkpoint import load_checkpoint
    from model.cuda_model import CudaBackend
    settings = TrainSettings(steps=150, batch_size=8, seq_len=64, lr=3e-3, warmup=10, eval_every=150,
                             eval_batches=2)
    factory = lambda c, p, a: CudaBackend(c, p, a, cache=cache)  # noqa: E731
    trained = train(preset("tiny"), settings, AdamWSettings(), corpus, factory, tmp_path, log=lambda m: None,
                    progress=False)
    again = train(preset("tiny"), TrainSettings(steps=1, batch_size=8, seq_len=64, eval_batches=2),
                  AdamWSettings(), corpus, factory, None, log=lambda m: None, progress=False,
                  initial=load_checkpoint(tmp_path).params)
    assert again.val_losses[0] == trained.val_losses[150]
    assert again.val_losses[0] < math.log(256) - 2


@pytest.mark.parametrize("qkv_bias, save_dtype", [(True, "fp32"), (False, "fp32"), (True, "bf16")])
def test_hf_transformers_gives_the_same_logits_from_our_checkpoint(cache, tmp_path, qkv_bias, save_dtype):
    """Qwen2 with biases, Llama without; a bf16 save is compared on the bf16-rounded weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import ml_dtypes
    from model.checkpoint import save_checkpoint
    config = ModelConfig(vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=96, rope_theta=1e6, rms_norm_eps=1e-6, qkv_bias=qkv_bias,
                         tie_word_embeddings=False, max_position_embeddings=128)
    params = live_params(config)
    path = save_checkpoint(tmp_path, 1, config, params, {}, {}, save_dtype=save_dtype)
    if save_dtype == "bf16":
        params = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in params.items()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM")
    ids, _ = batch(config)
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(gpu_logits(cache, config, params, ids) - theirs).max() <= 1e-4


def test_gpu_decoding_with_a_kv_cache_matches_the_full_numpy_forward(cache):
    from model.cuda_decoder import CudaDecoder
    from model.generate import generate
    from model.numpy_backend import NumpyDecoder
    config = preset("tiny")
    params = live_params(config)
    ids = np.random.default_rng(5).integers(0, 256, 23)
    model = backend(cache, config, params)
    decoder = CudaDecoder(model, max_len=40)
    try:
        steps = [decoder.prefill(ids[:17])] + [decoder.decode(int(t)) for t in ids[17:]]
        full = ReferenceModel(config, params).forward(ids[None, :])[0]
        for n, logits in zip(range(17, 24), steps):
            assert np.abs(logits - full[n - 1]).max() <= 1e-4
        ours = list(generate(decoder, ids[:5], 30))
        assert ours == list(generate(NumpyDecoder(config, params), ids[:5], 30))
        with pytest.raises(ValueError, match="KV cache holds 40"):
            decoder.prefill(np.zeros(41, np.int64))
    finally:
        decoder.close()
        model.close()


def test_cli_generates_on_the_gpu(cache, tmp_path, capsys):
    from model.checkpoint import save_checkpoint
    from model.cli import main
    config = preset("tiny")
    save_checkpoint(tmp_path, 1, config, live_params(config), {}, {})
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "def f(", "--max-new-tokens", "12",
                 "--device", "cuda"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def f(") and "device: cuda" in captured.err


def test_weight_decay_minus_zero_trains_in_strict_mode_on_a_fresh_cache():
    """`ptxgen train --weight-decay -0.0`: AdamW's decay (-0.0) and no-decay (0.0) specs are equal to
    Python but not to the key; both must be pre-warmed, so a strict step finds both."""
    config = preset("tiny")
    fresh = ModuleCache(use_disk=False)
    model = backend(fresh, config, live_params(config), weight_decay=-0.0)
    try:
        ids, targets = batch(config)
        with fresh.strict_mode():
            model.train_step(ids, targets, 1e-3)
        assert model.kernels.adamw_decay in fresh and model.kernels.adamw_no_decay in fresh
    finally:
        model.close()
