"""The numpy model is the ground truth: its gradients are checked against finite differences."""
import numpy as np
import pytest

from model.config import ModelConfig, preset
from model.params import init_params
from model.reference import KVCache, ReferenceModel
from ptxgen.kernels.attention import attention_reference

MICRO = ModelConfig(vocab_size=11, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=12, rope_theta=1e4, rms_norm_eps=1e-6, qkv_bias=True,
                    tie_word_embeddings=True, max_position_embeddings=64)


def model_and_batch(config=MICRO, seed=0):
    params = init_params(config, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed)
    for name in params:  # move off the init point so every path carries gradient
        params[name] = params[name] + 0.3 * rng.standard_normal(params[name].shape)
    ids = rng.integers(0, config.vocab_size, (2, 5))
    targets = rng.integers(0, config.vocab_size, (2, 5))
    targets[1, 2] = -100
    return ReferenceModel(config, params), ids, targets


@pytest.mark.parametrize("config", [MICRO, MICRO.replace(qkv_bias=False, tie_word_embeddings=False)])
def test_gradients_match_finite_differences(config):
    model, ids, targets = model_and_batch(config)
    _, grads = model.loss_and_grads(ids, targets)
    rng = np.random.default_rng(1)
    h = 1e-6
    for name, param in model.p.items():
        for idx in [tuple(rng.integers(0, n) for n in param.shape) for _ in range(3)]:
            old = param[idx]
            param[idx] = old + h
            up = model.loss(ids, targets)
            param[idx] = old - h
            down = model.loss(ids, targets)
            param[idx] = old
            assert grads[name][idx] == pytest.approx((up - down) / (2 * h), abs=1e-7, rel=1e-5), name


def test_incremental_decoding_with_kv_cache_matches_full_forward():
    model, ids, _ = model_and_batch()
    full = model.forward(ids)
    cache = KVCache()
    steps = [model.forward(ids[:, :3], cache)] + [model.forward(ids[:, t:t + 1], cache) for t in range(3, 5)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-12)


def test_attention_is_causal():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 4, 2, 8)), rng.standard_normal((1, 4, 1, 8)), rng.standard_normal((1, 4, 1, 8))
    out, _, _ = attention_reference(q, k, v)
    v2 = v.copy()
    v2[:, 3] += 100.0  # the last key/value must not reach earlier queries
    out2, _, _ = attention_reference(q, k, v2)
    np.testing.assert_allclose(out[:, :3], out2[:, :3])
    assert not np.allclose(out[:, 3], out2[:, 3])


def test_random_init_loss_is_near_ln_vocab():
    config = preset("tiny")
    model = ReferenceModel(config, init_params(config, seed=0))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (2, 32))
    loss = model.loss(ids, np.roll(ids, -1, axis=1))
    assert abs(loss - np.log(256)) <= 0.05


def test_bias_theta_and_eps_each_change_the_logits():
    model, ids, _ = model_and_batch()
    base = model.forward(ids)
    no_bias = {k: v for k, v in model.p.items() if not k.endswith(".bias")}
    assert not np.allclose(ReferenceModel(MICRO.replace(qkv_bias=False), no_bias).forward(ids), base)
    assert not np.allclose(ReferenceModel(MICRO.replace(rope_theta=1e6), model.p).forward(ids), base)
    assert not np.allclose(ReferenceModel(MICRO.replace(rms_norm_eps=1e-2), model.p).forward(ids), base)


def test_bf16_precision_rounds_the_linear_layers_operands_only():
    from model.precision import Precision
    config = preset("tiny")
    params = init_params(config, seed=3)
    ids = np.random.default_rng(4).integers(0, 256, (2, 9))
    targets = np.roll(ids, -1, axis=1)
    fp32 = ReferenceModel(config, params)
    bf16 = ReferenceModel(config, params, Precision.BF16)
    l32, g32 = fp32.loss_and_grads(ids, targets)
    l16, g16 = bf16.loss_and_grads(ids, targets)
    assert l16 != l32 and l16 == pytest.approx(l32, rel=1e-2)  # rounded, and close
    for name in g32:
        assert np.abs(g16[name] - g32[name]).max() <= 0.05 * np.abs(g32[name]).max() + 1e-7, name
    x = np.array([1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -3.1415926])  # two ties to even, then plain rounding
    assert list(Precision.BF16.round(x)) == [1.0, 1.0 + 2.0 ** -6, -3.140625]
    assert Precision.FP32.round(x) is x
