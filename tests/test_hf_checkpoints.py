"""Checkpoints as transformers writes them, and HF config.json through the closed key table.

The fixtures in tests/fixtures/hf were saved by transformers 5.17 itself (make_fixtures.py beside
them): Qwen2 in f32, bf16 (sharded) and f16, in the 5.x config layout and rewritten into the 4.x
one, and a bias-free Llama; each with the logits transformers computed for a fixed input.
Tolerance: our float64 numpy forward within 1e-4 of transformers' float32 logits (measured: 7.7e-7).
"""
import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.cli import main
from model.config import ConfigError, ModelConfig
from model.hf_config import KEYS, parse_hf_config
from model.params import init_params
from model.reference import ReferenceModel

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAMES = sorted(d.name for d in FIXTURES.iterdir() if d.is_dir())
LOGITS_TOL = 1e-4


def fixture_copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def hf_config(name: str = "qwen2-v5-f32-tied") -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_our_forward_gives_the_logits_transformers_computed_from_its_own_checkpoint(name):
    ckpt = load_checkpoint(FIXTURES / name)
    ids = np.load(FIXTURES / name / "input_ids.npy")
    theirs = np.load(FIXTURES / name / "logits.npy")
    ours = ReferenceModel(ckpt.config, ckpt.params).forward(ids)
    assert np.abs(ours - theirs).max() <= LOGITS_TOL
    assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))


def test_the_4x_and_5x_config_layouts_describe_the_same_model():
    v5 = load_checkpoint(FIXTURES / "qwen2-v5-f32-tied").config
    v4 = load_checkpoint(FIXTURES / "qwen2-v4-f16-tied").config
    assert v4 == v5 and v5.rope_theta == 1e6 and v5.rms_norm_eps == 1e-6 and v5.qkv_bias


def test_llama_configs_load_without_qkv_biases():
    config = load_checkpoint(FIXTURES / "llama-v5-f32").config
    assert not config.qkv_bias and config.rope_theta == 1e4 and config.rms_norm_eps == 1e-5


@pytest.mark.parametrize("name, dtype", [("qwen2-v4-bf16-tied", ml_dtypes.bfloat16),
                                         ("qwen2-v4-f16-tied", np.float16)])
def test_narrow_weights_are_widened_exactly(name, dtype):
    params = load_checkpoint(FIXTURES / name).params
    stored = load_file(str(FIXTURES / name / "model.safetensors"))  # (ml_dtypes registers bfloat16)
    for key, p in params.items():
        assert p.dtype == np.float32 and stored[key].dtype == dtype
        assert np.array_equal(p, stored[key].astype(np.float32))


def test_generation_config_gives_the_stop_tokens():
    assert load_checkpoint(FIXTURES / "qwen2-v5-f32-tied").eos_token_ids == (300, 299)


def rewrite(path: Path, change) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_a_tied_checkpoint_may_store_the_head_only_if_it_equals_the_embedding(tmp_path):
    path = fixture_copy("qwen2-v5-f32-tied", tmp_path)
    file = path / "model.safetensors"
    rewrite(file, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].copy()))
    assert "lm_head.weight" not in load_checkpoint(path).params
    rewrite(file, lambda t: t.__setitem__("lm_head.weight", t["lm_head.weight"] + 1))
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        load_checkpoint(path)


@pytest.mark.parametrize("change, message", [
    ({"vocab_size": 321}, "model.embed_tokens.weight has shape \\(320, 64\\), config says \\(321, 64\\)"),
    ({"tie_word_embeddings": False}, "missing lm_head.weight"),
    ({"num_key_value_heads": 4}, "k_proj.weight has shape \\(32, 64\\), config says \\(64, 64\\)"),
])
def test_weights_that_do_not_fit_the_config_are_refused_naming_the_checkpoint(tmp_path, change, message):
    path = fixture_copy("qwen2-v5-f32-tied", tmp_path)
    (path / "config.json").write_text(json.dumps({**hf_config(), **change}))
    with pytest.raises(CheckpointError, match=f"config/weights mismatch in {re.escape(str(path))}: .*{message}"):
        load_checkpoint(path)


def test_a_stored_rope_buffer_must_say_the_configs_theta(tmp_path):
    """Llama checkpoints of older transformers carry each layer's inv_freq: a second statement of theta."""
    from ptxgen.kernels.rope import inverse_frequencies
    path = fixture_copy("llama-v5-f32", tmp_path)
    name = "model.layers.1.self_attn.rotary_emb.inv_freq"
    as_torch_computed_it = (1.0 / 1e4 ** (np.arange(0, 16, 2, dtype=np.float32) / 16)).astype(np.float32)
    rewrite(path / "model.safetensors", lambda t: t.__setitem__(name, as_torch_computed_it))
    assert name not in load_checkpoint(path).params
    rewrite(path / "model.safetensors", lambda t: t.__setitem__(name, inverse_frequencies(16, 1e6).astype(np.float32)))
    with pytest.raises(CheckpointError, match="not the RoPE frequencies of rope_theta 10000"):
        load_checkpoint(path)


def duplicate_key(file: Path, key: str) -> None:
    """Write ``key`` a second time, first in the object, with another value (``{}``)."""
    text = file.read_text()
    file.write_text(text.replace("{", "{" + json.dumps(key) + ": {}, ", 1))


def duplicate_tensor(file: Path) -> None:
    """The header names its first tensor twice, the second time over the same bytes in another dtype."""
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].decode()
    name, info = next((k, v) for k, v in json.loads(header).items() if k != "__metadata__")
    twin = dict(info, dtype="F16" if info["dtype"] == "BF16" else "BF16")
    header = header.replace("{", "{" + json.dumps(name) + ": " + json.dumps(twin) + ", ", 1).encode()
    header += b" " * (-len(header) % 8)
    file.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + n:])


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "model-00002-of-00004.safetensors").unlink(), "model-00002-of-00004.safetensors is missing"),
    (lambda p: (p / "model-00003-of-00004.safetensors").write_bytes(b"\0" * 64), "cannot read"),
    (lambda p: (p / "model.safetensors.index.json").write_text("{"), "cannot read"),
    (lambda p: (p / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../x"}}'), "not a file name"),
    (lambda p: rewrite(p / "model-00004-of-00004.safetensors", lambda t: t.__setitem__("extra", np.zeros(2, np.float32))),
     "does not hold what"),
    (lambda p: rewrite(p / "model-00001-of-00004.safetensors",
                       lambda t: t.__setitem__("model.embed_tokens.weight", t["model.embed_tokens.weight"].astype(np.float64))),
     "stored as F64"),
    (lambda p: rewrite(p / "model-00001-of-00004.safetensors",
                       lambda t: t["model.embed_tokens.weight"].__setitem__((3, 5), np.nan)), "non-finite"),
    (lambda p: rewrite(p / "model-00004-of-00004.safetensors", lambda t: t.popitem()), "does not hold what"),
    (lambda p: rewrite(p / "model-00004-of-00004.safetensors", lambda t: t.__setitem__(
        "model.embed_tokens.weight", load_file(str(p / "model-00001-of-00004.safetensors"))["model.embed_tokens.weight"])),
     "does not hold what"),
    # one file, two values for one name (json and safetensors keep the last, other readers the first or refuse)
    (lambda p: duplicate_key(p / "model.safetensors.index.json", "weight_map"), "index.json: key 'weight_map' appears twice"),
    (lambda p: duplicate_key(p / "config.json", "rope_parameters"), "config.json: key 'rope_parameters' appears twice"),
    (lambda p: duplicate_key(p / "generation_config.json", "eos_token_id"),
     "generation_config.json: key 'eos_token_id' appears twice"),
    (lambda p: duplicate_tensor(p / "model-00002-of-00004.safetensors"), "00002-of-00004.safetensors: key '.*' appears twice"),
])
def test_damaged_sharded_checkpoints_are_refused_with_one_line(tmp_path, damage, message):
    path = fixture_copy("qwen2-v5-bf16-sharded", tmp_path)
    damage(path)
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_a_bf16_save_loads_in_bf16_and_keeps_f32_masters_for_an_exact_resume(tmp_path):
    config = ModelConfig.from_hf(hf_config())
    params = init_params(config, seed=3)
    path = save_checkpoint(tmp_path, 1, config, params, {}, {}, save_dtype="bf16")
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    stored = load_file(str(path / "model.safetensors"))
    assert all(t.dtype == ml_dtypes.bfloat16 for t in stored.values())
    for name, p in load_checkpoint(path).params.items():
        assert np.array_equal(p, params[name])  # the f32 masters
    (path / "master.safetensors").unlink()    # what transformers sees: the bf16 weights
    (path / "manifest.json").unlink()         # (the manifest would refuse the checkpoint without its masters)
    for name, p in load_checkpoint(path).params.items():
        assert np.array_equal(p, params[name].astype(ml_dtypes.bfloat16).astype(np.float32))


# -- the closed key table, key by key ----------------------------------------------------------
# Each key of the table: a value it accepts and one it refuses (None: every well-typed value is fine).
KEY_CASES = {
    "vocab_size": (320, 0), "hidden_size": (64, 64.0), "intermediate_size": (96, -1),
    "num_hidden_layers": (2, True), "num_attention_heads": (4, "4"), "num_key_value_heads": (2, 0),
    "head_dim": (16, 32), "rms_norm_eps": (1e-6, 1e39), "rope_theta": (1e6, float("inf")),
    "rope_parameters": ({"rope_type": "default", "rope_theta": 1e6}, {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}),
    "rope_scaling": (None, {"type": "linear", "factor": 2.0}), "tie_word_embeddings": (True, "false"),
    "max_position_embeddings": (128, 0), "attention_bias": (True, False), "ptxgen_qkv_bias": (True, "true"),
    "model_type": ("qwen2", "mistral"), "architectures": (["Qwen2ForCausalLM"], ["LlamaForCausalLM"]),
    "hidden_act": ("swish", "gelu"), "mlp_bias": (False, True), "attention_dropout": (0.1, 1.5),
    "partial_rotary_factor": (1.0, 0.5),
    "use_sliding_window": (False, True), "layer_types": (["full_attention"] * 2, ["full_attention", "sliding_attention"]),
    "use_mrope": (False, True), "is_encoder_decoder": (False, True), "eos_token_id": ([1, 2], "eos"),
    "dtype": ("bfloat16", "float8"), "torch_dtype": ("float32", "int8"), "sliding_window": (4096, None),
    "max_window_layers": (28, None), "bos_token_id": (1, -1), "pad_token_id": (None, 1.5), "use_cache": (True, "yes"),
    "initializer_range": (0.02, None), "transformers_version": ("4.43.1", None), "_name_or_path": ("x", None),
    "pretraining_tp": (1, 0), "output_attentions": (False, None), "output_hidden_states": (False, None),
    "return_dict": (True, None), "chunk_size_feed_forward": (0, None), "id2label": ({}, None),
    "label2id": ({}, None), "problem_type": (None, None), "_attn_implementation_autoset": (True, None),
    "attn_implementation": ("sdpa", None),
}


def test_every_key_of_the_table_has_a_case():
    assert set(KEY_CASES) == set(KEYS)


@pytest.mark.parametrize("key", sorted(KEY_CASES))
def test_each_key_is_consumed_or_refused_with_a_line_naming_key_and_value(key):
    ok, bad = KEY_CASES[key]
    parse_hf_config({**hf_config(), key: ok})
    if bad is None:
        return
    with pytest.raises(ConfigError) as e:
        parse_hf_config({**hf_config(), key: bad})
    assert key in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling_factor": 2.0}, "unknown key"),
    ({"quantization_config": {"bits": 4}}, "unknown key"),
    ({"rope_theta": 1e4}, "disagrees with rope_parameters"),
    ({"rope_parameters": None}, "lacks 'rope_theta'"),
    ({"layer_types": ["full_attention"] * 3}, "names 3 layers"),
    # transformers 5.x takes rope_scaling's theta over rope_parameters', 4.x the top-level one: all must agree
    ({"rope_scaling": {"type": "default", "rope_theta": 1e4}}, "rope_parameters.rope_theta = 1000000.0: disagrees "
                                                               "with rope_scaling.rope_theta = 10000.0"),
    ({"rope_scaling": {"type": "default", "factor": 8.0}}, "rope_scaling.factor = 8.0: a scaling factor other than 1"),
    ({"rope_scaling": {"factor": 32.0, "rope_type": "llama3"}}, "rope_scaling.rope_type = 'llama3': RoPE scaling is not"),
    ({"rope_scaling": {"factor": 1.0, "type": "default", "original_max_position_embeddings": 8192}},
     "original_max_position_embeddings = 8192: unknown RoPE parameter"),
    ({"rope_scaling": "default"}, "rope_scaling = 'default': must be an object"),
    ({"vocab_size": 10**400}, "vocab_size must be a positive integer below 2\\*\\*31 .*401 characters"),
    ({"rms_norm_eps": 10**400}, "rms_norm_eps = 1000000000000.* characters\\): must be a finite positive number"),
    # what no RoPE kernel bakes is refused for every device (it trained on the CPU, then no GPU ran it)
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0.5}}, "rope_theta 0.5 .*theta must be in"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e308}}, "theta must be in \\[1, 2\\*\\*1000\\]"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "attention_bias": True}, "o_proj bias"),
    # transformers 5.x reads dtype, 4.x torch_dtype: two that disagree are one file loaded two ways
    ({"dtype": "float32", "torch_dtype": "bfloat16"}, "^config.json: dtype = 'float32': disagrees with torch_dtype = "
                                                      "'bfloat16'"),
    ({"ptxgen_qkv_bias": False, "attention_bias": True}, "ptxgen_qkv_bias = False: disagrees with attention_bias = True"),
    # the model's own relations, named by the file's keys
    ({"num_key_value_heads": 3}, "^config.json: num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"num_key_value_heads": 8}, "^config.json: num_attention_heads 4 is not a multiple of num_key_value_heads 8"),
    ({"num_attention_heads": 3}, "^config.json: hidden_size 64 is not a multiple of num_attention_heads 3"),
    ({"hidden_size": 60}, "^config.json: head_dim 15 must be even"),
    ({"max_position_embeddings": 2**31}, "^config.json: max_position_embeddings must be a positive integer below"),
])
def test_configs_the_model_cannot_honour_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        parse_hf_config({**hf_config(), **change})


@pytest.mark.parametrize("dtypes", [{"dtype": "bfloat16", "torch_dtype": "bfloat16"}, {"dtype": None, "torch_dtype": "bfloat16"},
                                    {"dtype": "bfloat16", "torch_dtype": None}, {"torch_dtype": "bfloat16"}])
def test_dtype_and_torch_dtype_are_one_value_where_both_are_given(dtypes):
    hf = {k: v for k, v in hf_config().items() if k != "dtype"}
    assert parse_hf_config({**hf, **dtypes}).dtype == "bfloat16"


@pytest.mark.parametrize("scaling", [{"type": "default"}, {"rope_type": "default", "factor": 1.0}, "theta"])
def test_a_4x_rope_scaling_of_the_default_type_is_the_same_model(scaling):
    theta = hf_config()["rope_parameters"]["rope_theta"]
    scaling = {"type": "default", "rope_theta": theta} if scaling == "theta" else scaling
    assert parse_hf_config({**hf_config(), "rope_scaling": scaling}) == parse_hf_config(hf_config())


@pytest.mark.parametrize("text", ["null", "[]", '"qwen2"', "{", "\xff"])
def test_a_config_that_is_not_a_json_object_is_refused(tmp_path, text):
    (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError):
        ModelConfig.load(tmp_path / "config.json")


def test_a_missing_required_key_is_named_not_defaulted():
    for key in ("rms_norm_eps", "vocab_size", "num_key_value_heads"):
        hf = {k: v for k, v in hf_config().items() if k != key}
        with pytest.raises(ConfigError, match=key):
            parse_hf_config(hf)


def test_our_export_reads_back_through_the_table_for_every_preset():
    from model.config import PRESETS
    for config in PRESETS.values():
        assert parse_hf_config(config.to_hf()).config == config


def test_our_qwen2_export_states_that_no_layer_has_a_sliding_window():
    """transformers from 4.50 until transformers#38002 was fixed applied sliding_window (Qwen2Config's
    default 4096 where a file leaves it out) whatever use_sliding_window said: an export of the qwen2-0.5b preset
    (32768 positions) without the key was read there as attending to its last 4096 tokens only."""
    from model.config import preset
    hf = preset("qwen2-0.5b").to_hf()
    assert hf["model_type"] == "qwen2" and hf["use_sliding_window"] is False and hf["sliding_window"] is None


@pytest.mark.parametrize("change", [{"hidden_act": "gelu"}, {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}},
                                    {"use_sliding_window": True}, {"head_dim": 32}, {"tie_word_embeddings": "false"},
                                    {"rms_norm_eps": 1e-50}, {"attention_bias": False},
                                    {"rope_parameters": {"rope_type": "default", "rope_theta": 10**400}},
                                    {"torch_dtype": "bfloat16"}, {"num_key_value_heads": 3}])
def test_a_refused_config_is_one_line_exit_2_and_builds_no_kernel(tmp_path, capsys, monkeypatch, change):
    from ptxgen.spec import KernelSpec
    built = []
    original = KernelSpec.__post_init__
    monkeypatch.setattr(KernelSpec, "__post_init__", lambda self: (built.append(self), original(self))[1])
    path = fixture_copy("qwen2-v5-f32-tied", tmp_path)
    (path / "config.json").write_text(json.dumps({**hf_config(), **change}))
    for argv in (["generate", "--checkpoint", str(path), "--prompt", "def"],
                 ["train", "--config", str(path / "config.json"), "--steps", "1"],
                 ["train", "--init", str(path), "--steps", "1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and next(iter(change)) in err and "Traceback" not in err
    assert built == []


# -- train --init ----------------------------------------------------------------------------
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.py").write_text("def add(a, b):\n    return a + b\n" * 200)
    return data


def test_train_init_fine_tunes_a_transformers_checkpoint_with_its_tokenizer(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--init", str(FIXTURES / "qwen2-v5-bf16-sharded"), "--data", str(data_dir(tmp_path)),
                 "--out", str(out), "--device", "numpy", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                 "--eval-batches", "1", "--save-dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "(tokenizer.json)" in printed and "init: weights from" in printed
    ckpt = load_checkpoint(out)
    assert ckpt.config == load_checkpoint(FIXTURES / "qwen2-v5-bf16-sharded").config
    assert ckpt.eos_token_ids == (300, 299) and ckpt.tokenizer_path is not None
    assert ckpt.trainer["step"] == 2
    assert main(["generate", "--checkpoint", str(out), "--prompt", "def add", "--max-new-tokens", "4",
                 "--device", "numpy"]) == 0
    assert capsys.readouterr().out.startswith("def add")


@pytest.mark.parametrize("extra, message", [
    (["--preset", "tiny"], "another config than the --preset"),
    (["--resume"], "not allowed with argument"),
    (["--tokenizer", str(FIXTURES / "llama-v5-f32" / "tokenizer.json")], "brings its own tokenizer.json"),
])
def test_train_init_refuses_what_contradicts_the_checkpoint(tmp_path, capsys, extra, message):
    assert main(["train", "--init", str(FIXTURES / "qwen2-v5-f32-tied"), "--device", "numpy",
                 "--out", str(tmp_path / "r"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("std", [0.05, "0.02", True])
def test_train_config_draws_a_new_model_only_at_the_std_its_initializer_range_names(tmp_path, capsys, std):
    """transformers draws a new model from a config.json at its initializer_range, this project at 0.02
    (model/params.py): another std was taken silently, the run starting from weights transformers would
    not have drawn from the same file. Loaded weights never read it."""
    hf = {**hf_config(), "initializer_range": std}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert main(["train", "--config", str(tmp_path / "config.json"), "--data", str(data_dir(tmp_path)),
                 "--out", str(tmp_path / "run"), "--device", "numpy", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"config.json: initializer_range = {std!r}: a new model here" in err
    assert not (tmp_path / "run").exists()
    parse_hf_config({k: v for k, v in hf.items() if k != "initializer_range"}).check_new_model()  # transformers' 0.02
    path = fixture_copy("qwen2-v5-f32-tied", tmp_path)
    (path / "config.json").write_text(json.dumps(hf))
    loaded, fixture = load_checkpoint(path).params, load_checkpoint(FIXTURES / "qwen2-v5-f32-tied").params
    assert all(np.array_equal(loaded[name], fixture[name]) for name in fixture)


def test_a_checkpoint_without_a_tokenizer_is_not_fed_bytes(tmp_path, capsys):
    path = fixture_copy("qwen2-v5-f32-tied", tmp_path)
    (path / "tokenizer.json").unlink()
    assert main(["generate", "--checkpoint", str(path), "--prompt", "x", "--device", "numpy"]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err


def greedy_text(path: Path, capsys) -> str:
    assert main(["generate", "--checkpoint", str(path), "--prompt", "def", "--max-new-tokens", "8",
                 "--device", "numpy"]) == 0
    return capsys.readouterr().out


def first_greedy_token(path: Path) -> tuple[int, str]:
    """The token greedy decoding gives first after "def" (greedy_text's prompt), and its text."""
    from model.data import HFTokenizer
    from model.generate import generate
    from model.numpy_backend import NumpyDecoder
    ckpt = load_checkpoint(path)
    tok = HFTokenizer(ckpt.tokenizer_path)
    first = next(generate(NumpyDecoder(ckpt.config, ckpt.params), tok.encode(b"def"), 8))
    return first, tok.decode([first])


def test_generation_stops_at_the_checkpoints_eos_tokens(tmp_path, capsys):
    path = fixture_copy("qwen2-v5-f32-tied", tmp_path)
    (path / "generation_config.json").write_text('{"eos_token_id": []}')
    full = greedy_text(path, capsys)
    first, text = first_greedy_token(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [first]}))
    stopped = greedy_text(path, capsys).rstrip("\n")
    assert stopped == "def" + text and full.startswith(stopped) and len(full) > len(stopped) + 1


def test_config_json_eos_ids_stop_generation_only_where_there_is_no_generation_config_json(tmp_path, capsys):
    """As transformers: it builds its generation config from config.json only when the file is missing
    (5.17, measured: a file without eos_token_id beside config.json's eos id generated that id five
    times over). Here config.json's ids were taken in the file's place: one checkpoint, two stops."""
    path = fixture_copy("qwen2-v5-f32-tied", tmp_path)
    first, text = first_greedy_token(path)
    (path / "config.json").write_text(json.dumps({**hf_config(), "eos_token_id": first}))
    (path / "generation_config.json").write_text('{"bos_token_id": 300}')
    assert load_checkpoint(path).eos_token_ids == ()
    assert len(greedy_text(path, capsys).rstrip("\n")) > len("def" + text)  # ran past config.json's eos id
    (path / "generation_config.json").unlink()
    assert load_checkpoint(path).eos_token_ids == (first,)
    assert greedy_text(path, capsys).rstrip("\n") == "def" + text


# -- populated weights (FALSIFY-INIT-001) ---------------------------------------------------------
def trained_then_initialised(tmp_path, capsys) -> tuple[float, float]:
    """Train a small model 60 steps, then start a new run from it with `train --init`: the first
    run's last val_loss and the second run's step-0 val_loss (both from their metrics.jsonl)."""
    from model.metrics import METRICS, read_metrics
    config = tmp_path / "config.json"
    ModelConfig(vocab_size=256, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=48,
                rope_theta=1e4, rms_norm_eps=1e-6, qkv_bias=True, tie_word_embeddings=False,
                max_position_embeddings=64).save(config)
    common = ["--data", str(data_dir(tmp_path)), "--device", "numpy", "--batch-size", "4", "--seq-len", "32",
              "--eval-batches", "1", "--lr", "1e-2"]
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "a"), "--steps", "60", "--warmup", "5",
                 *common]) == 0
    assert main(["train", "--init", str(tmp_path / "a"), "--out", str(tmp_path / "b"), "--steps", "1", *common]) == 0
    capsys.readouterr()
    return read_metrics(tmp_path / "a" / METRICS)[-1]["val_loss"], read_metrics(tmp_path / "b" / METRICS)[0]["val_loss"]


def test_training_from_populated_weights_starts_well_below_ln_vocab(tmp_path, capsys):
    trained, start = trained_then_initialised(tmp_path, capsys)
    assert start == trained                 # the same weights, the same loss
    assert start < math.log(256) - 2        # far from an untrained model's ln(vocab)


def test_the_config_qwen2_5_0_5b_instruct_ships_is_our_qwen2_0_5b_preset():
    from model.config import preset
    released = {  # Qwen/Qwen2.5-0.5B-Instruct config.json, as published (transformers 4.x layout)
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
        "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936}
    parsed = parse_hf_config(released)
    assert parsed.config == preset("qwen2-0.5b") and parsed.eos_token_ids == (151645,)


def test_f32_masters_must_round_to_the_model_weights_beside_them(tmp_path):
    config = ModelConfig.from_hf(hf_config())
    path = save_checkpoint(tmp_path, 1, config, init_params(config, seed=3), {}, {}, save_dtype="bf16")
    (path / "manifest.json").unlink()  # as if edited by hand: the weights themselves are compared
    rewrite(path / "model.safetensors", lambda t: t.__setitem__(
        "model.norm.weight", (t["model.norm.weight"].astype(np.float32) * 2).astype(ml_dtypes.bfloat16)))
    with pytest.raises(CheckpointError, match="master.safetensors and the model weights disagree at model.norm"):
        load_checkpoint(path)


def test_an_eos_id_outside_the_vocabulary_is_refused(tmp_path):
    path = fixture_copy("qwen2-v5-f32-tied", tmp_path)
    (path / "generation_config.json").write_text('{"eos_token_id": [2, 320]}')
    with pytest.raises(CheckpointError, match="eos token id 320 is outside the vocabulary of 320"):
        load_checkpoint(path)


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: p.symlink_to(p.parent / "nowhere.json")])
def test_a_generation_config_that_is_not_a_readable_file_is_refused_not_skipped(tmp_path, make):
    """(Skipped, it silently turned the checkpoint's sampling and stop tokens into greedy defaults.)"""
    path = fixture_copy("qwen2-v5-f32-tied", tmp_path)
    (path / "generation_config.json").unlink(missing_ok=True)
    make(path / "generation_config.json")
    with pytest.raises(CheckpointError, match="generation_config.json"):
        load_checkpoint(path)


def test_a_tokenizer_json_that_is_not_a_readable_file_is_refused_not_skipped(tmp_path, capsys):
    """(A dangling link read as no tokenizer: a model of 256 tokens was then fed bytes.)"""
    from model.config import preset
    ours = save_checkpoint(tmp_path / "run", 1, preset("tiny"), init_params(preset("tiny")), {}, {})
    path = tmp_path / "downloaded"
    path.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(ours / name, path / name)
    (path / "tokenizer.json").symlink_to(tmp_path / "nowhere.json")  # a download that never finished
    assert main(["generate", "--checkpoint", str(path), "--prompt", "ab", "--device", "numpy"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot load tokenizer" in err and "tokenizer.json" in err


def test_a_config_whose_eos_id_is_outside_the_vocabulary_is_refused_where_its_ids_are_used(tmp_path, capsys):
    hf = {**hf_config(), "eos_token_id": [2, 10**20]}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert main(["train", "--config", str(tmp_path / "config.json"), "--data", str(data_dir(tmp_path)),
                 "--out", str(tmp_path / "run"), "--device", "numpy", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "eos token id 100000000000000000000 is outside the vocabulary of 320" in err
    assert not (tmp_path / "run").exists()
    # a checkpoint whose generation_config.json names the stop tokens: config.json's are not used
    path = fixture_copy("qwen2-v5-f32-tied", tmp_path / "ckpt")
    (path / "config.json").write_text(json.dumps(hf))
    (path / "generation_config.json").write_text('{"eos_token_id": [2]}')
    assert load_checkpoint(path).eos_token_ids == (2,)
    (path / "generation_config.json").unlink()  # ... and without it, they are
    with pytest.raises(CheckpointError, match="eos token id 100000000000000000000 is outside the vocabulary"):
        load_checkpoint(path)


def test_train_from_a_config_keeps_its_eos_tokens_for_generation(tmp_path, capsys):
    """config.json's stop tokens are the trained model's (our sampling defaults beside them)."""
    small = ModelConfig(vocab_size=256, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                        intermediate_size=48, rope_theta=1e4, rms_norm_eps=1e-6, qkv_bias=True,
                        tie_word_embeddings=False, max_position_embeddings=64)
    (tmp_path / "config.json").write_text(json.dumps({**small.to_hf(), "eos_token_id": [10, 200]}))
    assert main(["train", "--config", str(tmp_path / "config.json"), "--data", str(data_dir(tmp_path)),
                 "--out", str(tmp_path / "run"), "--device", "numpy", "--steps", "2", "--warmup", "1",
                 "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1"]) == 0
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.eos_token_ids == (10, 200) and ckpt.sampling.temperature == 0.8


def test_a_rope_buffer_saved_in_f16_is_read_at_f16_precision(tmp_path):
    from ptxgen.kernels.rope import inverse_frequencies
    path = fixture_copy("qwen2-v4-f16-tied", tmp_path)
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    rewrite(path / "model.safetensors", lambda t: t.__setitem__(name, inverse_frequencies(16, 1e6).astype(np.float16)))
    assert name not in load_checkpoint(path).params
    rewrite(path / "model.safetensors", lambda t: t.__setitem__(name, inverse_frequencies(16, 1e4).astype(np.float16)))
    with pytest.raises(CheckpointError, match="rope_theta 1e\\+06"):
        load_checkpoint(path)
    rewrite(path / "model.safetensors", lambda t: (t.pop(name), t.__setitem__(
        "model.layers.7.self_attn.rotary_emb.inv_freq", inverse_frequencies(16, 1e6).astype(np.float16))))
    with pytest.raises(CheckpointError, match="belongs to no layer of a 2-layer model"):
        load_checkpoint(path)


@pytest.mark.parametrize("out", ["checkpoint", "other model's run"])
def test_a_new_run_never_writes_into_a_checkpoint_or_over_another_run(tmp_path, capsys, out):
    fixture = fixture_copy("qwen2-v5-f32-tied", tmp_path)
    target = fixture
    if out == "other model's run":
        target = tmp_path / "run"
        assert main(["train", "--init", str(fixture), "--out", str(target), "--device", "numpy", "--steps", "1",
                     "--data", str(data_dir(tmp_path)), "--batch-size", "2", "--seq-len", "16",
                     "--eval-batches", "1"]) == 0
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--preset", "tiny", "--out", str(target), "--device", "numpy", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert ("is a checkpoint" if out == "checkpoint" else "already holds a run") in err
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before


def test_a_fine_tune_keeps_the_stop_tokens_its_config_json_named(tmp_path, capsys):
    path = fixture_copy("llama-v5-f32", tmp_path)
    (path / "generation_config.json").unlink()  # its eos (2) now lives only in config.json
    assert main(["train", "--init", str(path), "--out", str(tmp_path / "run"), "--device", "numpy", "--steps", "1",
                 "--data", str(data_dir(tmp_path)), "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1"]) == 0
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.eos_token_ids == (2,) and not ckpt.sampling.do_sample


# -- tokenizers as transformers reads them -------------------------------------------------------
def with_tokenizer(tmp_path: Path, style: str, config: dict | None = None) -> Path:
    """The f32 fixture with its byte-level BPE made Llama- or Qwen2-like: "llama2" and "llama3" add a BOS
    through tokenizer.json's post-processor (a template; ByteLevel then a template), "qwen2" has the
    ByteLevel post-processor that adds nothing. ``config``: a tokenizer_config.json beside it."""
    from tokenizers import Tokenizer, processors
    path = fixture_copy("qwen2-v5-f32-tied", tmp_path / style)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    bos = tok.add_special_tokens(["<s>"]) and tok.token_to_id("<s>")
    template = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tok.post_processor = {"llama2": template, "qwen2": processors.ByteLevel(trim_offsets=False),
                          "llama3": processors.Sequence([processors.ByteLevel(trim_offsets=False), template])}[style]
    tok.save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


BOS = 301  # "<s>", added after the fixture's 300 BPE tokens and <|endoftext|>
TEXTS = [b"def add(a, b):\n    return a + b\n", "caf\u00e9 \u2192 \U0001f600".encode(), b"x<|endoftext|>y", b" "]


def plain_ids(path: Path, text: bytes) -> list[int]:
    """The text's own ids, as the tokenizers library gives them (nothing added, cut or padded)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok.encode(text.decode(), add_special_tokens=False).ids


@pytest.mark.parametrize("style, config", [("llama2", {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>"}),
                                           ("llama2", {"add_bos_token": True, "bos_token": {"content": "<s>"}}),
                                           ("llama3", None), ("llama3", {"bos_token": "<s>"})])
def test_a_tokenizer_whose_post_processor_adds_bos_starts_every_encoded_text_with_it(tmp_path, style, config):
    """As transformers' tokenizer(text): the BOS of a Llama 2 tokenizer.json (add_bos_token saying the same)
    or a Llama 3 one (no add_bos_token) was dropped, prompts and training files encoded without it."""
    from model.data import Corpus, HFTokenizer
    path = with_tokenizer(tmp_path, style, config)
    tok = HFTokenizer(path / "tokenizer.json")
    for text in TEXTS:
        assert tok.encode(text).tolist() == [BOS] + plain_ids(path, text)
    (tmp_path / "data").mkdir()
    for name in ("a.py", "b.py"):
        (tmp_path / "data" / name).write_bytes(TEXTS[0])
    stream = Corpus.from_files(sorted((tmp_path / "data").iterdir()), tok).train
    n = 1 + len(plain_ids(path, TEXTS[0]))
    assert stream[0] == BOS and stream[n] == BOS  # each file begins with it, as tokenizer(text) of each would


def prompts_fed_to_the_model(monkeypatch) -> list[list[int]]:
    import model.cli
    fed, real = [], model.cli.generate_as
    monkeypatch.setattr(model.cli, "generate_as", lambda decoder, prompt, *a: (fed.append(list(prompt)),
                                                                              real(decoder, prompt, *a))[1])
    return fed


def test_generate_and_train_init_encode_with_the_checkpoints_bos(tmp_path, capsys, monkeypatch):
    path = with_tokenizer(tmp_path, "llama2", {"add_bos_token": True, "bos_token": "<s>"})
    fed = prompts_fed_to_the_model(monkeypatch)
    assert main(["generate", "--checkpoint", str(path), "--prompt", "def add", "--max-new-tokens", "3",
                 "--device", "numpy"]) == 0
    assert capsys.readouterr().out.startswith("def add")  # the BOS is not printed
    out = tmp_path / "run"
    assert main(["train", "--init", str(path), "--data", str(data_dir(tmp_path)), "--out", str(out), "--device", "numpy",
                 "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1"]) == 0
    assert fed == [[BOS] + plain_ids(path, b"def add"), [BOS] + plain_ids(path, b"def ")]  # the prompt, the sample's
    assert "<s>" not in (out / "sample.txt").read_text()


@pytest.mark.parametrize("style, config", [("qwen2", {"bos_token": None, "eos_token": "<|endoftext|>",
                                                      "split_special_tokens": False, "chat_template": "{{ m }}"}),
                                           ("qwen2", None)])
def test_a_qwen2_tokenizer_encodes_exactly_as_before(tmp_path, style, config):
    """Qwen2's tokenizer.json has a ByteLevel post-processor that adds no token, and its tokenizer_config.json
    no add_bos_token: the ids are the text's own, as they were (add_special_tokens=False), for every fixture."""
    from model.data import HFTokenizer
    for path in [with_tokenizer(tmp_path, style, config), *(FIXTURES / name for name in NAMES)]:
        tok = HFTokenizer(path / "tokenizer.json")
        for text in TEXTS:
            assert tok.encode(text).tolist() == plain_ids(path, text)
        assert tok.encode(b"<|endoftext|>").tolist() == [300]


@pytest.mark.parametrize("style, config, said", [
    ("llama2", {"add_bos_token": False}, "add_bos_token = False"),          # 5.x drops the BOS, 4.x keeps it
    ("qwen2", {"add_bos_token": True, "bos_token": "<|endoftext|>"}, "add_bos_token = True"),
    ("llama2", {"add_bos_token": True}, "add_bos_token = True"),            # names no bos_token: 5.x adds none
    ("llama2", {"add_bos_token": True, "add_eos_token": True, "bos_token": "<s>", "eos_token": "<|endoftext|>"},
     "add_eos_token = True"),
    ("llama2", {"add_bos_token": True, "bos_token": "<bos>"}, "bos_token = '<bos>': is not a token of"),
    ("llama2", {"add_bos_token": "true"}, "add_bos_token = 'true': must be true or false"),
    ("qwen2", {"split_special_tokens": 1}, "split_special_tokens = 1: must be true or false"),
])
def test_a_tokenizer_config_that_contradicts_tokenizer_json_is_refused_before_any_work(tmp_path, capsys, style,
                                                                                      config, said):
    path = with_tokenizer(tmp_path, style, config)
    for argv in (["generate", "--checkpoint", str(path), "--prompt", "def"],
                 ["train", "--init", str(path), "--steps", "1", "--out", str(tmp_path / "run")]):
        assert main([*argv, "--device", "numpy"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and said in err and str(path / "tokenizer_config.json") in err
    assert not (tmp_path / "run").exists()


def test_a_stored_truncation_or_padding_does_not_cut_or_pad_text(tmp_path):
    """transformers' tokenizer(text) turns both off: kept, every training file was cut to 8 tokens."""
    from tokenizers import Tokenizer
    from model.data import HFTokenizer
    path = with_tokenizer(tmp_path, "qwen2")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.enable_truncation(8)
    tok.enable_padding(length=64, pad_id=300, pad_token="<|endoftext|>")
    tok.save(str(path / "tokenizer.json"))
    for text in TEXTS:
        assert HFTokenizer(path / "tokenizer.json").encode(text).tolist() == plain_ids(path, text)
    assert len(plain_ids(path, TEXTS[0])) > 8


def test_split_special_tokens_reads_special_token_text_as_text(tmp_path):
    from model.data import HFTokenizer
    path = with_tokenizer(tmp_path, "qwen2", {"split_special_tokens": True})
    ids = HFTokenizer(path / "tokenizer.json").encode(b"<|endoftext|>").tolist()
    assert 300 not in ids and len(ids) > 1


def with_model_tokenizer(tmp_path: Path, model) -> Path:
    """The f32 fixture with a tokenizer.json of ``model`` over the words "a", "b" (and "ab"), which drops
    or cannot encode any other text, and a Llama 2 BOS by its post-processor."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    path = fixture_copy("qwen2-v5-f32-tied", tmp_path / type(model).__name__)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    tok.save(str(path / "tokenizer.json"))
    return path


def test_a_text_whose_every_character_the_tokenizer_drops_is_no_text_though_a_bos_is_added(tmp_path, capsys):
    """With the post-processor's BOS, such a prompt was [BOS]: generation ran from no prompt at all; a folder of
    empty files was a corpus of BOS tokens, trained on (both were refused without it)."""
    from tokenizers import models
    path = with_model_tokenizer(tmp_path, models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    assert main(["generate", "--checkpoint", str(path), "--prompt", "zzz", "--device", "numpy"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the tokenizer drops every character of --prompt 'zzz'" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(400):  # (enough lone BOS tokens for a batch and the validation split)
        (empty / f"{i:03}.py").write_bytes(b"")
    assert main(["train", "--init", str(with_tokenizer(tmp_path, "llama2")), "--data", str(empty), "--device",
                 "numpy", "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--seq-len", "16"]) == 2
    assert capsys.readouterr().err.strip() == "ptxgen train: error: the corpus is empty: no tokens in the files given"
    assert not (tmp_path / "run").exists()


def test_a_text_the_tokenizer_cannot_encode_is_one_line_before_any_work(tmp_path, capsys):
    """A word-level tokenizer.json whose unknown token is not in its vocabulary raises on any other word: a
    traceback from generate, from train reading its data, and from train's sample once the run was done."""
    from tokenizers import models
    path = with_model_tokenizer(tmp_path, models.WordLevel(vocab={"a": 0, "b": 1}, unk_token="[UNK]"))
    said = f"{path / 'tokenizer.json'} cannot encode it: WordLevel error: Missing [UNK] token from the vocabulary"
    assert main(["generate", "--checkpoint", str(path), "--prompt", "a zz", "--device", "numpy"]) == 2
    assert capsys.readouterr().err.strip() == f"ptxgen generate: error: --prompt: {said}"
    data = tmp_path / "data"
    data.mkdir()
    for text, where in ((b"a zz b", str(data / "a.txt")), (b"a b " * 200, "the run's sample prompt 'def '")):
        (data / "a.txt").write_bytes(text)
        assert main(["train", "--init", str(path), "--data", str(data), "--out", str(tmp_path / "run"),
                     "--device", "numpy", "--steps", "1", "--batch-size", "2", "--seq-len", "4"]) == 2
        assert capsys.readouterr().err.strip() == f"ptxgen train: error: {where}: {said}"
        assert not (tmp_path / "run").exists()


SIDECARS = {"tokenizer_config.json": '{"add_bos_token": true, "bos_token": "<s>", "chat_template": "{{ m }}"}',
            "special_tokens_map.json": '{"bos_token": "<s>", "eos_token": "<|endoftext|>"}',
            "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}"}


@pytest.mark.parametrize("how", ["--init", "--tokenizer"])
def test_a_runs_checkpoints_carry_every_tokenizer_file_beside_its_tokenizer_json(tmp_path, capsys, how):
    """Only tokenizer.json was copied: the run's checkpoints lost the chat template and special tokens, and
    generate from them read the tokenizer without what tokenizer_config.json said."""
    source = with_tokenizer(tmp_path, "llama2")
    for name, text in SIDECARS.items():
        (source / name).write_text(text)
    start = ["--init", str(source)] if how == "--init" else \
        ["--config", str(source / "config.json"), "--tokenizer", str(source / "tokenizer.json")]
    out = tmp_path / "run"
    assert main(["train", *start, "--data", str(data_dir(tmp_path)), "--out", str(out), "--device", "numpy",
                 "--steps", "2", "--checkpoint-every", "1", "--batch-size", "2", "--seq-len", "16",
                 "--eval-batches", "1"]) == 0
    ckpt = load_checkpoint(out)  # (its manifest lists them: verified as it loads)
    for name in ("tokenizer.json", *SIDECARS):
        assert (ckpt.path / name).read_bytes() == (source / name).read_bytes()
    assert set(json.loads((ckpt.path / "manifest.json").read_text())["files"]) >= set(SIDECARS)
    shutil.rmtree(ckpt.path)  # the run as if stopped after step 1, to resume
    (out / "latest").write_text("step-0000001\n")
    (source / "tokenizer_config.json").write_text('{"add_bos_token": false}')  # another tokenizer now
    assert main(["train", "--resume", "--out", str(out), "--tokenizer", str(source / "tokenizer.json"),
                 "--device", "numpy"]) == 2
    assert "not the tokenizer the run was saved with" in capsys.readouterr().err


# -- configs transformers 5.x accepts for the same model --------------------------------------------
@pytest.mark.parametrize("change", [{"hidden_act": "swish"}, {"head_dim": None}, {"partial_rotary_factor": 1.0},
                                    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                         "partial_rotary_factor": 1.0}},
                                    {"rope_scaling": {"rope_type": "default", "partial_rotary_factor": 1}},
                                    {"attention_dropout": 0.1}])
def test_a_config_transformers_reads_as_the_same_model_loads_as_that_model(tmp_path, capsys, change):
    path = fixture_copy("qwen2-v5-f32-tied", tmp_path)
    (path / "config.json").write_text(json.dumps({**hf_config(), **change}))
    assert load_checkpoint(path).config == load_checkpoint(FIXTURES / "qwen2-v5-f32-tied").config
    assert greedy_text(path, capsys) == greedy_text(FIXTURES / "qwen2-v5-f32-tied", capsys)


@pytest.mark.parametrize("change, said", [
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor = 0.5: partial RoPE is not implemented"),
    ({"partial_rotary_factor": True}, "partial_rotary_factor = True: partial RoPE"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "factor": True}}, "rope_parameters.factor = True"),
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu': not implemented here"),
    ({"head_dim": 0}, "head_dim = 0: must be a positive integer"),
    ({"attention_dropout": -0.1}, "attention_dropout = -0.1: must be a probability"),
])
def test_what_would_change_the_math_is_still_refused(change, said):
    with pytest.raises(ConfigError, match=re.escape(said)):
        parse_hf_config({**hf_config(), **change})


def test_attention_dropout_is_generated_through_but_never_trained_through(tmp_path, capsys):
    """Dropout is off in generation (transformers' eval mode): a config with attention_dropout 0.1 generates.
    The trainer has none, so a run from it would train another model than the file asks for: refused."""
    path = fixture_copy("qwen2-v5-f32-tied", tmp_path)
    (path / "config.json").write_text(json.dumps({**hf_config(), "attention_dropout": 0.1}))
    assert main(["generate", "--checkpoint", str(path), "--prompt", "def", "--max-new-tokens", "2",
                 "--device", "numpy"]) == 0
    capsys.readouterr()
    data = data_dir(tmp_path)
    for argv in (["--init", str(path)], ["--config", str(path / "config.json")]):
        assert main(["train", *argv, "--data", str(data), "--out", str(tmp_path / "run"),
                     "--device", "numpy", "--steps", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "attention_dropout = 0.1: training here has no dropout" in err
        assert str(path) in err
    assert not (tmp_path / "run").exists()


# -- the config's dtype and the stored weights ------------------------------------------------------
@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_a_config_dtype_that_would_round_the_stored_weights_is_refused(tmp_path, key):
    """transformers 5.x casts the weights to config.json's dtype as it loads them (4.x read them as stored, as
    this project does): F32 weights under bfloat16 were read exactly here and rounded there, two models."""
    path = fixture_copy("qwen2-v5-f32-tied", tmp_path)
    hf = {k: v for k, v in hf_config().items() if k != "dtype"}
    (path / "config.json").write_text(json.dumps({**hf, key: "bfloat16"}))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value).startswith(f"{path / 'config.json'}: {key} = 'bfloat16': model.safetensors stores ")
    assert "in F32 with values bfloat16 cannot hold" in str(e.value) and "\n" not in str(e.value)


def test_a_config_dtype_whose_cast_is_exact_loads_the_stored_values(tmp_path):
    """Widening (BF16 stored, float32 said), or F32 values bf16 holds exactly: both readers see the same weights."""
    sharded = fixture_copy("qwen2-v5-bf16-sharded", tmp_path)
    (sharded / "config.json").write_text(json.dumps({**hf_config("qwen2-v5-bf16-sharded"), "dtype": "float32"}))
    for name, p in load_checkpoint(FIXTURES / "qwen2-v5-bf16-sharded").params.items():
        assert np.array_equal(load_checkpoint(sharded).params[name], p)
    path = fixture_copy("qwen2-v5-f32-tied", tmp_path)
    rewrite(path / "model.safetensors", lambda t: t.update(
        {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in t.items()}))
    (path / "config.json").write_text(json.dumps({**hf_config(), "dtype": "bfloat16"}))
    stored = load_file(str(path / "model.safetensors"))
    assert all(np.array_equal(p, stored[name]) for name, p in load_checkpoint(path).params.items())
