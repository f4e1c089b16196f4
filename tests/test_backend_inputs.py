"""Every backend takes the same parameters and the same batches, and refuses the same ones: the
numpy reference and the GPU's parameter layout share ``check_params``, the reference and the CUDA
backend ``check_tokens`` / ``check_targets`` (reference.py). Found by a review: the reference added
a q/k/v bias its config lacks (the GPU dropped it), and numpy indexing took token -1 as the last."""
import numpy as np
import pytest

from model.config import ModelConfig
from model.cuda_buffers import ParamLayout
from model.numpy_backend import NumpyBackend, NumpyDecoder
from model.optim import AdamWSettings
from model.params import init_params
from model.reference import ReferenceModel

TINY = ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=24,
                   rope_theta=1e4, rms_norm_eps=1e-6, qkv_bias=False, tie_word_embeddings=True,
                   max_position_embeddings=8)
BIAS = "model.layers.0.self_attn.q_proj.bias"


def takers(config, params):
    """Each way a backend takes its parameters."""
    return [lambda: ReferenceModel(config, params), lambda: NumpyBackend(config, params, AdamWSettings()).loss(
        np.zeros((1, 2), np.int64), np.zeros((1, 2), np.int64)), lambda: ParamLayout(config).flatten(params)]


@pytest.mark.parametrize("change, says", [
    (lambda p: p.__setitem__(BIAS, np.ones(32, np.float32)), f"{BIAS} is not a parameter of this config"),
    (lambda p: p.__setitem__("lm_head.weight", np.ones((64, 16), np.float32)), "lm_head.weight is not a parameter"),
    (lambda p: p.pop("model.norm.weight"), "the parameters lack model.norm.weight"),
    (lambda p: p.__setitem__("model.norm.weight", np.ones(17, np.float32)), "has shape \\(17,\\), the config's is"),
])
def test_parameters_that_are_not_the_configs_exactly_are_refused_by_every_backend(change, says):
    params = init_params(TINY)
    change(params)
    for take in takers(TINY, params):
        with pytest.raises(ValueError, match=says):
            take()


def test_a_config_with_biases_needs_them_given():
    with_bias = TINY.replace(qkv_bias=True)
    for take in takers(with_bias, init_params(TINY)):
        with pytest.raises(ValueError, match="lack model.layers.0.self_attn.q_proj.bias"):
            take()


@pytest.mark.parametrize("ids, targets, says", [
    ([[1, -1]], [[1, 2]], "token id is outside \\[0, 64\\)"),
    ([[1, 64]], [[1, 2]], "token id is outside"),
    ([[1, 2]], [[1, -5]], "target is outside \\[0, 64\\)"),
    ([[1, 2]], [[1, 64]], "target is outside"),
    ([[1] * 9], [[1] * 9], "sequence of 9 exceeds max_position_embeddings 8"),
    ([[1, 2]], [[1, 2, 3]], "targets must have the shape of ids"),
    ([[1, 2]], [[1.0, float("nan")]], "targets must be integers, got float64"),  # (NaN cast to int32: a -2**31 target)
    ([[1.0, 2.7]], [[1, 2]], "token ids must be integers, got float64"),
    ([[True, False]], [[1, 2]], "token ids must be integers, got bool"),  # (numpy: a mask, not ids)
    (np.zeros((2, 0), np.int64), np.zeros((2, 0), np.int64), "at least one token"),
    ([[1, 2]], None, "targets are None"),
])
def test_a_batch_the_gpu_refuses_is_refused_by_the_reference_too(ids, targets, says):
    model, backend = ReferenceModel(TINY, init_params(TINY)), NumpyBackend(TINY, init_params(TINY), AdamWSettings())
    for call in (lambda: model.loss(ids, targets), lambda: model.loss_and_grads(ids, targets),
                 lambda: backend.train_step(np.array(ids), None if targets is None else np.array(targets), 1e-3)):
        with pytest.raises(ValueError, match=says):
            call()


def test_ignored_targets_are_the_one_negative_taken():
    model = ReferenceModel(TINY, init_params(TINY))
    assert np.isfinite(model.loss([[1, 2]], [[-100, 3]]))


def test_decoding_stops_at_the_configs_last_position():
    decoder = NumpyDecoder(TINY, init_params(TINY))
    decoder.prefill(np.arange(7))
    decoder.decode(3)  # the 8th position: the last
    with pytest.raises(ValueError, match="the KV cache holds 8 positions; 9 needed"):  # (max_len: the model's)
        decoder.decode(3)
