"""The CUDA model's fp32 training step on the CPU: ``CudaBackend.train_step`` end to end on the
interpreted device (tests/fake_memory.py: the plan the GPU runs, every kernel's PTX in the
interpreter, uploads and downloads in a made-up device memory) against the numpy backend on the
same batches. Every kernel, argument, buffer and launch of the fp32 step is exercised in CI; the
bf16 step's TMA-fed GEMMs are not interpreted (their tests need the GPU).

Tolerance: the kernels' fp32 arithmetic against float64, as the GPU parity tests state it: loss
rtol 1e-6, gradients within 1e-5 of their largest. Weights after two AdamW steps: all but 1e-3 of
them within rtol 1e-5, atol 1e-6, and none more than the two steps (2 lr) away: where a gradient is
tiny, AdamW's step m / sqrt(v) turns its 1e-6 relative difference into a visible part of lr, and
the k biases' gradients are zero but for rounding (a softmax ignores a shift of its scores), so
their steps' signs are the rounding's (measured: 2 of 45056 elements of an up_proj 1.5e-5 off, 1
of 64 k_proj.bias elements)."""
import numpy as np
import pytest

from fake_memory import interpreted_device
from model.config import preset
from model.cuda_model import CudaBackend
from model.numpy_backend import NumpyBackend
from model.optim import AdamWSettings
from model.params import init_params
from model.reference import IGNORE_INDEX, ReferenceModel

CONFIG = preset("tiny")
ADAMW = AdamWSettings(max_grad_norm=0.5)
LR = 3e-3


def batch(seed: int, b: int = 1, s: int = 16):
    rng = np.random.default_rng(seed)
    ids, targets = (rng.integers(0, CONFIG.vocab_size, (b, s)) for _ in range(2))
    targets[0, :3] = IGNORE_INDEX
    return ids, targets


def interpreted_backend(params):
    from dry_device import DryCache
    return CudaBackend(CONFIG, params, ADAMW, cache=DryCache())


def test_the_fp32_loss_and_every_gradient_match_the_reference(monkeypatch):
    params, (ids, targets) = init_params(CONFIG, seed=0), batch(0)
    with interpreted_device(monkeypatch):
        model = interpreted_backend(params)
        loss, grads = model.loss_and_grads(ids, targets)
        model.close()
    ref_loss, ref_grads = ReferenceModel(CONFIG, params).loss_and_grads(ids, targets)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, g in ref_grads.items():
        assert np.abs(grads[name] - g).max() <= 1e-5 * np.abs(g).max(), name


def test_two_fp32_training_steps_match_the_numpy_backend(monkeypatch):
    params = init_params(CONFIG, seed=1)
    numpy = NumpyBackend(CONFIG, params, ADAMW)
    expected = [numpy.train_step(*batch(seed), LR) for seed in (1, 2)]
    with interpreted_device(monkeypatch):
        model = interpreted_backend(params)
        got = [model.train_step(*batch(seed), LR) for seed in (1, 2)]
        weights = model.params
        model.close()
    for (loss, norm), (loss1, norm1) in zip(got, expected):
        assert loss == pytest.approx(loss1, rel=1e-6) and norm == pytest.approx(norm1, rel=1e-5)
    ours, theirs = (np.concatenate([p[n].reshape(-1) for n in sorted(p)]) for p in (weights, numpy.params))
    assert (~np.isclose(ours, theirs, rtol=1e-5, atol=1e-6)).mean() <= 1e-3
    assert np.abs(ours - theirs).max() <= 2 * LR


@pytest.mark.parametrize("field, value", [("eps", 1e-5), ("theta", 1e6)], ids=["eps-1e-5", "theta-1e6"])
def test_planted_a_kernel_built_with_a_default_instead_of_the_configs_value_is_caught(monkeypatch, field, value):
    """The bug this project exists for: the GPU path's RMSNorm at eps 1e-5 (config 1e-6) or RoPE at
    theta 1e6 (config 1e4); the reference keeps the config's. The loss check above fails."""
    import dataclasses

    import model.kernels as kernels
    from ptxgen.kernels.rmsnorm import RMSNormSpec
    from ptxgen.kernels.rope import RopeSpec
    honest, kind = kernels.ModelKernels.of, {"eps": RMSNormSpec, "theta": RopeSpec}[field]

    def planted(*args, **kwargs):
        k = honest(*args, **kwargs)
        return dataclasses.replace(k, **{f.name: dataclasses.replace(getattr(k, f.name), **{field: value})
                                         for f in dataclasses.fields(k) if isinstance(getattr(k, f.name), kind)})

    monkeypatch.setattr(kernels.ModelKernels, "of", staticmethod(planted))
    with pytest.raises(AssertionError):
        test_the_fp32_loss_and_every_gradient_match_the_reference(monkeypatch)


def test_fp32_decoding_with_a_kv_cache_matches_the_full_reference_forward(monkeypatch):
    """CudaDecoder on the interpreted device: a prefill of 9 tokens, then 3 single-token steps that
    write their keys and values where the cache ends; each step's logits are the full forward's at
    that position (1e-4, as the GPU test)."""
    from model.cuda_decoder import CudaDecoder
    params = init_params(CONFIG, seed=2)
    ids = np.random.default_rng(5).integers(0, CONFIG.vocab_size, 12)
    with interpreted_device(monkeypatch):
        model = interpreted_backend(params)
        decoder = CudaDecoder(model, max_len=16)
        steps = [decoder.prefill(ids[:9])] + [decoder.decode(int(t)) for t in ids[9:]]
        decoder.close()
        model.close()
    full = ReferenceModel(CONFIG, params).forward(ids[None, :])[0]
    for n, logits in zip(range(9, 13), steps):
        assert np.abs(logits - full[n - 1]).max() <= 1e-4


def test_both_decoders_refuse_a_cache_past_max_len_alike(monkeypatch):
    """The numpy decoder ignored ``max_len``: a KV cache the CUDA decoder refuses (a prompt plus a
    continuation past it, a size outside [1, max_position_embeddings]) grew on the CPU. Both now run
    one contract: the same ValueError at the same call, and the cache still usable after it."""
    from model.cuda_decoder import CudaDecoder
    from model.numpy_backend import NumpyDecoder
    params = init_params(CONFIG, seed=2)
    ids = np.random.default_rng(5).integers(0, CONFIG.vocab_size, 4)
    top = CONFIG.max_position_embeddings

    def contract(make):
        for size in (0, top + 1):
            with pytest.raises(ValueError, match=rf"max_len must be in \[1, {top}\], got {size}"):
                make(size)
        decoder = make(3)
        try:
            with pytest.raises(ValueError, match="the KV cache holds 3 positions; 4 needed"):
                decoder.prefill(ids)
            with pytest.raises(ValueError, match="a token id is outside"):
                decoder.prefill(np.array([1, CONFIG.vocab_size]))
            first = decoder.prefill(ids[:2])
            last = decoder.decode(int(ids[2]))  # the third position: the last
            with pytest.raises(ValueError, match="the KV cache holds 3 positions; 4 needed"):
                decoder.decode(int(ids[3]))
            return first, last, decoder.prefill(ids[:1])  # a refused step leaves the cache usable
        finally:
            getattr(decoder, "close", lambda: None)()

    ours = contract(lambda n: NumpyDecoder(CONFIG, params, max_len=n))
    with interpreted_device(monkeypatch):
        model = interpreted_backend(params)
        try:
            theirs = contract(lambda n: CudaDecoder(model, max_len=n))
        finally:
            model.close()
    for a, b in zip(ours, theirs):
        assert np.abs(a - b).max() <= 1e-4
