"""Choosing the next token as transformers does, and generation_config.json through a closed table."""
import json

import numpy as np
import pytest

from model.config import ConfigError
from model.generate import choose
from model.generation_config import KEYS, Sampling, read_generation_config


def test_temperature_zero_is_argmax_and_top_k_1_is_argmax_at_any_temperature():
    logits = np.random.default_rng(0).standard_normal(300)
    rng = np.random.default_rng(1)
    assert choose(logits, 0.0, 0, rng) == int(np.argmax(logits))
    assert all(choose(logits, 2.0, 1, rng) == int(np.argmax(logits)) for _ in range(20))


@pytest.mark.parametrize("temperature", [1e-320, 5e-324, 1e-300])
def test_a_tiny_temperature_samples_the_best_tokens_never_nan(temperature):
    """(Dividing the scores first sent them to +-inf, and inf - inf to NaN probabilities.)"""
    logits = np.array([3.0, 7.5, -2.0, 7.5, 1e3 - 1e3])
    rng = np.random.default_rng(0)
    with np.errstate(invalid="raise"):  # (NaN made anywhere raises)
        drawn = {choose(logits, temperature, 0, rng) for _ in range(100)}
        assert drawn == {1, 3}  # the two best, tied
        assert choose(logits, temperature, 2, rng, top_p=0.9) in (1, 3)


def test_top_p_keeps_the_smallest_set_holding_p_of_the_mass():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    drawn = {choose(logits, 1.0, 0, rng, top_p=0.7) for _ in range(400)}
    assert drawn == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: the first two; never the tail
    assert {choose(logits, 1.0, 0, rng, top_p=0.5) for _ in range(100)} == {0}


def test_the_repetition_penalty_divides_positive_scores_and_multiplies_negative_ones():
    logits = np.array([2.0, 1.9, -1.0, -1.1])
    rng = np.random.default_rng(0)
    assert choose(logits, 0.0, 0, rng) == 0
    assert choose(logits, 0.0, 0, rng, history=np.array([0]), repetition_penalty=1.1) == 1  # 2/1.1 < 1.9
    assert choose(np.array([-1.0, -1.05]), 0.0, 0, rng, history=np.array([0]), repetition_penalty=1.1) == 1


def write(tmp_path, data) -> object:
    (tmp_path / "generation_config.json").write_text(json.dumps(data))
    return tmp_path / "generation_config.json"


def test_qwen2_5_instruct_generation_config_is_read_with_transformers_meaning(tmp_path):
    released = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                "transformers_version": "4.37.0"}  # Qwen/Qwen2.5-0.5B-Instruct, as published
    s = read_generation_config(write(tmp_path, released))
    assert s == Sampling(True, 0.7, 20, 0.8, 1.05, None, None, (151645, 151643))


def test_without_the_file_generation_is_greedy_with_the_configs_eos(tmp_path):
    assert read_generation_config(tmp_path / "missing.json", (2,)) == Sampling(eos_token_ids=(2,))
    assert read_generation_config(write(tmp_path, {"do_sample": True}), (2,)).top_k == 50  # transformers' default


@pytest.mark.parametrize("data, key", [
    ({"num_beams": 4}, "num_beams"), ({"no_repeat_ngram_size": 3}, "no_repeat_ngram_size"),
    ({"min_p": 0.1}, "min_p"), ({"do_sample": "true"}, "do_sample"), ({"top_p": 0}, "top_p"),
    ({"temperature": -1}, "temperature"), ({"watermarking_config": {}}, "watermarking_config"),
    ({"eos_token_id": -1}, "eos_token_id"), ({"top_k": 1.5}, "top_k"),
    ({"top_k": None}, "top_k = None: transformers 4.x reads null as no top-k filter, 5.x as 50"),
])
def test_decoding_features_not_implemented_here_are_refused_with_one_line(tmp_path, data, key):
    with pytest.raises(ConfigError) as e:
        read_generation_config(write(tmp_path, data))
    assert key in str(e.value) and "\n" not in str(e.value)


def test_every_key_of_the_table_reads_at_its_off_value(tmp_path):
    off = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
           "max_new_tokens": 20, "eos_token_id": 2, "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None,
           "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "min_new_tokens": None, "min_length": 0,
           "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None, "diversity_penalty": 0.0,
           "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
           "forced_bos_token_id": None, "forced_eos_token_id": None, "guidance_scale": None,
           "renormalize_logits": False, "sequence_bias": None, "exponential_decay_length_penalty": None,
           "bos_token_id": 1, "pad_token_id": None, "decoder_start_token_id": None, "max_length": 20,
           "length_penalty": 1.0, "early_stopping": False, "num_return_sequences": 1, "use_cache": True,
           "transformers_version": "5.17.0", "_from_model_config": True, "output_scores": False,
           "output_logits": None, "output_attentions": False, "output_hidden_states": False,
           "return_dict_in_generate": False}
    assert set(off) == set(KEYS)
    assert read_generation_config(write(tmp_path, off)).greedy


def test_max_length_caps_prompt_and_continuation_together_as_in_transformers(tmp_path, capsys):
    import shutil
    from model.cli import main
    path = shutil.copytree(__import__("pathlib").Path(__file__).parent / "fixtures" / "hf" / "qwen2-v5-f32-tied",
                           tmp_path / "ckpt")
    # (the prompt is 6 tokens: a max_length of 6 passed here with 0 new tokens, now refused)
    (path / "generation_config.json").write_text('{"max_length": 8}')
    assert main(["generate", "--checkpoint", str(path), "--prompt", "def add", "--device", "numpy"]) == 0
    from model.data import HFTokenizer
    tok = HFTokenizer(path / "tokenizer.json")
    assert 6 < len(tok.encode(capsys.readouterr().out.rstrip("\n").encode())) <= 8


def test_a_sampling_flag_under_greedy_decoding_is_refused_not_ignored(capsys):
    from pathlib import Path
    from model.cli import main
    fixture = Path(__file__).parent / "fixtures" / "hf" / "qwen2-v5-f32-tied"  # greedy: no do_sample
    assert main(["generate", "--checkpoint", str(fixture), "--prompt", "def", "--top-k", "5",
                 "--device", "numpy"]) == 2
    assert "--top-k has no effect with greedy decoding" in capsys.readouterr().err


def test_max_new_tokens_0_in_the_file_is_refused_as_transformers_does(tmp_path):
    """It read as "not given" (the default 200 tokens, or max_length's room): a value silently replaced."""
    with pytest.raises(ConfigError) as e:
        read_generation_config(write(tmp_path, {"max_new_tokens": 0}))
    assert "generation_config.json" in str(e.value) and "max_new_tokens" in str(e.value)
    assert "\n" not in str(e.value)
    assert read_generation_config(write(tmp_path, {"max_new_tokens": 1})).max_new_tokens == 1


def test_a_prompt_that_already_reaches_the_files_max_length_is_refused_not_answered_with_nothing(tmp_path, capsys):
    import shutil
    from pathlib import Path
    from model.cli import main
    path = shutil.copytree(Path(__file__).parent / "fixtures" / "hf" / "qwen2-v5-f32-tied", tmp_path / "ckpt")
    (path / "generation_config.json").write_text('{"max_length": 1}')
    assert main(["generate", "--checkpoint", str(path), "--prompt", "def add", "--device", "numpy"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # the prompt is not printed back as if it had been continued
    err = captured.err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "max_length 1" in err and str(path / "generation_config.json") in err and "tokens" in err, err
    # --max-new-tokens overrides max_length (transformers' precedence): still generates
    assert main(["generate", "--checkpoint", str(path), "--prompt", "def add", "--device", "numpy",
                 "--max-new-tokens", "2"]) == 0
