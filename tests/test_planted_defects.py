"""Planted defects: each falsifier's check, at its stated tolerance, catches the bug it guards.

A falsifier that could never fail proves nothing. These tests plant the defects this project
exists for (theta, eps or biases lost on the way to the GPU; a resume that drops state; a
nondeterministic reduction) and show the comparison each falsifier makes would see them.
"""

import numpy as np
import pytest

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.data import ByteTokenizer, Corpus, stdlib_files
from model.numpy_backend import NumpyBackend
from model.optim import AdamWSettings
from model.params import init_params
from model.reference import ReferenceModel
from model.train import TrainSettings, train
from ptxgen.kernels.rmsnorm import rmsnorm_reference
from ptxgen.kernels.rope import rope_reference

LOGITS_TOL = 1e-4   # FALSIFY-FWD-001
RMS_TOL = 1e-4      # FALSIFY-NORM-001
QWEN_LIKE = ModelConfig(vocab_size=256, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=352, rope_theta=1e6, rms_norm_eps=1e-6, qkv_bias=True,
                        tie_word_embeddings=True, max_position_embeddings=512)


def live_params(config):
    params = init_params(config, seed=0)
    rng = np.random.default_rng(1)
    for name, p in params.items():
        if name.endswith(".bias"):
            params[name] = (0.1 * rng.standard_normal(p.shape)).astype(np.float32)
    return params


@pytest.mark.parametrize("defect", ["qkv biases dropped", "eps defaulted to 1e-5", "Llama theta 1e4 served"])
def test_a_gpu_path_with_a_seed_defect_fails_the_logits_parity_check(defect):
    params = live_params(QWEN_LIKE)
    ids = np.random.default_rng(0).integers(0, 256, (2, 37))
    truth = ReferenceModel(QWEN_LIKE, params).forward(ids)
    if defect == "qkv biases dropped":
        # (as a path that drops them computes: every backend takes exactly the config's tensors)
        wrong = ReferenceModel(QWEN_LIKE, {k: np.zeros_like(v) if k.endswith(".bias") else v for k, v in params.items()})
    elif defect == "eps defaulted to 1e-5":
        wrong = ReferenceModel(QWEN_LIKE.replace(rms_norm_eps=1e-5), params)
    else:
        wrong = ReferenceModel(QWEN_LIKE.replace(rope_theta=1e4), params)
    assert np.abs(wrong.forward(ids) - truth).max() > LOGITS_TOL


def test_an_rmsnorm_with_the_wrong_eps_fails_the_eps_parity_check():
    rng = np.random.default_rng(0)  # the falsifier's inputs: 4x896, std 0.02, gamma around 1
    x = (0.02 * rng.standard_normal((4, 896))).astype(np.float32)
    gamma = (1 + 0.1 * rng.standard_normal(896)).astype(np.float32)
    right, _ = rmsnorm_reference(x, gamma, 1e-6)
    wrong, _ = rmsnorm_reference(x, gamma, 1e-5)
    assert np.abs(wrong - right).max() > RMS_TOL


def test_a_cache_serving_the_other_theta_fails_the_rope_check():
    rng = np.random.default_rng(1)  # the falsifier's inputs: 257 tokens x 14 heads x 64, positions to 4096
    x = rng.standard_normal((257, 14, 64))
    positions = np.arange(257) * 16
    assert np.abs(rope_reference(x, positions, 1e4) - rope_reference(x, positions, 1e6)).max() > 1e-3


@pytest.fixture(scope="module")
def corpus():
    return Corpus.from_files(stdlib_files()[:40], ByteTokenizer())


@pytest.mark.parametrize("defect", ["optimizer moments lost", "data position lost"])
def test_a_resume_that_drops_state_fails_the_bit_equality_check(corpus, tmp_path, defect):
    settings = TrainSettings(steps=12, batch_size=2, seq_len=16, lr=1e-2, warmup=2, eval_every=6,
                             eval_batches=1, checkpoint_every=6)
    config = QWEN_LIKE.replace(hidden_size=16, intermediate_size=24, num_layers=1)

    def run(out, resume=False):
        return train(config, settings, AdamWSettings(), corpus, NumpyBackend, out, resume=resume,
                     log=lambda m: None, progress=False)

    full = run(tmp_path / "full")
    ckpt = load_checkpoint(tmp_path / "full" / "step-0000006")
    optimizer, trainer = ckpt.optimizer, dict(ckpt.trainer)
    if defect == "optimizer moments lost":
        optimizer = {k: np.zeros_like(v) for k, v in optimizer.items()}
    else:
        trainer["data_position"] = 0
    save_checkpoint(tmp_path / "broken", 6, ckpt.config, ckpt.params, optimizer, trainer)
    assert run(tmp_path / "broken", resume=True).train_losses != full.train_losses[6:]


def test_a_reduction_in_another_order_changes_the_bits_the_determinism_check_compares():
    values = np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 1e-3
    forward = np.float32(0)
    for v in values:
        forward += v
    backward = np.float32(0)
    for v in values[::-1]:
        backward += v
    assert forward != backward  # so atomics (arrival-order sums) would show up as differing losses


# -- real checkpoints (issue 13) -------------------------------------------------------------------
HF_FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "hf"


def test_a_config_table_that_lets_rope_scaling_through_is_caught_by_the_refusal_check(monkeypatch):
    import json
    from model import hf_config
    yarn = {**json.loads((HF_FIXTURES / "qwen2-v5-f32-tied" / "config.json").read_text()),
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    # (a check that passes any value and reads no theta from it)
    monkeypatch.setitem(hf_config.KEYS, "rope_scaling", hf_config.Key(lambda k, v: None, "none", "planted"))
    hf_config.parse_hf_config(yarn)  # accepted: the refusal falsifier's pytest.raises would fail


def test_a_theta_reader_that_skips_rope_scaling_serves_1e6_where_transformers_5_runs_1e4(monkeypatch):
    """FALSIFY-CONFIG-003's defect: _theta as it was, reading rope_theta and rope_parameters only."""
    import json
    from model import hf_config
    both = {**json.loads((HF_FIXTURES / "qwen2-v5-f32-tied" / "config.json").read_text()),
            "rope_scaling": {"rope_type": "default", "rope_theta": 1e4}}
    monkeypatch.setattr(hf_config, "_theta", lambda v: v.get("rope_parameters") or v.get("rope_theta"))
    assert hf_config.parse_hf_config(both).config.rope_theta == 1e6  # accepted: the falsifier's raises fails


def test_a_reference_that_takes_any_tensor_computes_another_model_than_the_gpu(monkeypatch):
    """FALSIFY-FWD-007's defect: the reference without check_params adds a bias its config lacks,
    which the GPU's layout (config-driven) never uploads: two models from one (config, params)."""
    import model.reference
    monkeypatch.setattr(model.reference, "check_params", lambda config, params: None)
    config = QWEN_LIKE.replace(qkv_bias=False)
    params = live_params(config)
    with_bias = {**params, "model.layers.0.self_attn.q_proj.bias": np.full(128, 0.5, np.float32)}
    ids = np.random.default_rng(0).integers(0, 256, (1, 9))
    gap = ReferenceModel(config, with_bias).forward(ids) - ReferenceModel(config, params).forward(ids)
    assert np.abs(gap).max() > LOGITS_TOL  # and the falsifier's pytest.raises would fail


@pytest.mark.parametrize("defect", ["bf16 read as f16", "4.x rope_theta ignored (default 1e4)"])
def test_a_loader_defect_fails_the_transformers_logits_check(defect):
    import ml_dtypes
    name = "qwen2-v4-bf16-tied"
    ckpt = load_checkpoint(HF_FIXTURES / name)
    ids = np.load(HF_FIXTURES / name / "input_ids.npy")
    theirs = np.load(HF_FIXTURES / name / "logits.npy")
    config, params = ckpt.config, ckpt.params
    if defect == "bf16 read as f16":
        params = {k: v.astype(ml_dtypes.bfloat16).view(np.float16).astype(np.float32) for k, v in params.items()}
        params = {k: np.nan_to_num(v, posinf=0, neginf=0) for k, v in params.items()}
    else:
        config = config.replace(rope_theta=1e4)
    assert np.abs(ReferenceModel(config, params).forward(ids) - theirs).max() > LOGITS_TOL


def test_a_train_init_that_drops_the_weights_fails_the_populated_weights_check(tmp_path, capsys, monkeypatch):
    """The planted defect: the CLI passes --init's config and tokenizer on but starts from a fresh init."""
    import math
    from model import cli
    from test_hf_checkpoints import trained_then_initialised
    real_train = cli.train
    monkeypatch.setattr(cli, "train", lambda *a, **kw: real_train(*a, **{**kw, "initial": None}))
    trained, start = trained_then_initialised(tmp_path, capsys)
    assert not (start == trained and start < math.log(256) - 2)


def test_a_config_key_let_through_reaches_the_kernels_and_exits_0(tmp_path, capsys, monkeypatch):
    """FALSIFY-CONFIG-002's planted defect, through the command line: a table that lets yarn through."""
    import json
    import shutil
    from model import hf_config
    from model.cli import main
    path = shutil.copytree(HF_FIXTURES / "qwen2-v5-f32-tied", tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    monkeypatch.setitem(hf_config.KEYS, "rope_scaling", hf_config.Key(lambda k, v: None, "none", "planted"))
    assert main(["generate", "--checkpoint", str(path), "--prompt", "def", "--max-new-tokens", "2",
                 "--device", "numpy"]) == 0  # the falsifier's "exit 2" would fail


def test_a_decoder_that_loses_its_kv_cache_fails_the_greedy_token_equality_check():
    """Forward parity is not generation parity: this decoder's prefill is right, its decode steps
    see only the newest token (a KV cache reset at every step)."""
    from model.generate import generate
    from model.numpy_backend import NumpyDecoder
    ckpt = load_checkpoint(HF_FIXTURES / "qwen2-v5-f32-tied")
    prompt = np.load(HF_FIXTURES / "qwen2-v5-f32-tied" / "input_ids.npy")[0, :11]

    class CacheLost(NumpyDecoder):
        def decode(self, token):
            return self.prefill(np.array([token]))

    right = list(generate(NumpyDecoder(ckpt.config, ckpt.params), prompt, 64))
    assert list(generate(CacheLost(ckpt.config, ckpt.params), prompt, 64)) != right
