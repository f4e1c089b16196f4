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


def test_bf16_precision_rounds_to_nearest_even_and_keeps_loss_and_gradients_near_fp32():
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


def test_bf16_precision_rounds_the_gradients_the_backward_stores_as_the_gpu_does(monkeypatch):
    """bf16: the CUDA model stores these in bf16 (as torch's autocast does), so the reference rounds
    them too: the dy each RMSNorm backward reads (the LM head's dX, gate/up's dX, the q/k/v dX's
    three products summed) and the q/k/v projection's output gradient rows, whose column sums are
    the biases' gradients."""
    import model.reference as reference
    from model.params import layer_prefix
    from model.precision import Precision
    from ptxgen.kernels.attention import attention_backward_reference
    from ptxgen.kernels.rmsnorm import rmsnorm_backward_reference
    from ptxgen.kernels.rope import rope_reference
    from ptxgen.vecio import DType, round_to
    dys, rows = [], []  # rows: each layer's (last first) dv, then dq and dk after RoPE's backward

    def norm_backward(x, gamma, dy, eps):
        dys.append(dy)
        return rmsnorm_backward_reference(x, gamma, dy, eps)

    def attention_backward(*args):
        grads = attention_backward_reference(*args)
        rows.append(grads[2])
        return grads

    def rope(x, positions, theta, inverse=False):
        y = rope_reference(x, positions, theta, inverse=inverse)
        if inverse:
            rows.append(y)
        return y

    monkeypatch.setattr(reference, "rmsnorm_backward_reference", norm_backward)
    monkeypatch.setattr(reference, "attention_backward_reference", attention_backward)
    monkeypatch.setattr(reference, "rope_reference", rope)
    fp32, ids, targets = model_and_batch()
    _, g = ReferenceModel(MICRO, fp32.p, Precision.BF16).loss_and_grads(ids, targets)
    assert len(dys) == 2 * MICRO.num_layers + 1
    for dy in dys:
        assert dy.any() and np.array_equal(round_to(dy, DType.BF16), dy)
    assert len(rows) == 3 * MICRO.num_layers
    for i, (dv, dq, dk) in zip(reversed(range(MICRO.num_layers)), zip(*[iter(rows)] * 3)):
        for name, d in (("q_proj", dq), ("k_proj", dk), ("v_proj", dv)):
            d, bias = d.reshape(ids.size, -1), g[layer_prefix(i) + f"self_attn.{name}.bias"]
            np.testing.assert_array_equal(bias, round_to(d, DType.BF16).sum(0))
            assert not np.array_equal(bias, d.sum(0))  # (which the rounding moves)
