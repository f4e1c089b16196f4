"""Checkpoints, the training loop (numpy backend) and the train / generate command line."""
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.cli import main
from model.config import ModelConfig, preset
from model.data import ByteTokenizer, Corpus, stdlib_files
from model.numpy_backend import NumpyBackend
from model.optim import AdamWSettings, lr_at
from model.params import init_params, param_shapes
from model.train import TrainSettings, train

MICRO = ModelConfig(vocab_size=256, hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=2,
                    intermediate_size=24, rope_theta=1e4, rms_norm_eps=1e-6, qkv_bias=True,
                    tie_word_embeddings=False, max_position_embeddings=64)
SETTINGS = TrainSettings(steps=20, batch_size=2, seq_len=16, lr=1e-2, warmup=4, eval_every=10,
                         eval_batches=2)


@pytest.fixture(scope="module")
def corpus():
    return Corpus.from_files(stdlib_files()[:60], ByteTokenizer())


def run(corpus, out, **kw):
    return train(MICRO, kw.pop("settings", SETTINGS), AdamWSettings(), corpus, NumpyBackend, out,
                 log=lambda m: None, progress=False, **kw)


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    lrs = [lr_at(s, 100, 1.0, 10, 0.1) for s in range(1, 101)]
    assert lrs[:10] == pytest.approx([0.1 * k for k in range(1, 11)])
    assert lrs[54] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_random_init_val_loss_is_within_005_of_ln_vocab():
    corpus = Corpus.from_files(stdlib_files()[:200], ByteTokenizer())
    config = preset("tiny")
    settings = TrainSettings(steps=1, batch_size=8, seq_len=128, eval_batches=8)
    result = train(config, settings, AdamWSettings(), corpus, NumpyBackend, None, log=lambda m: None,
                   progress=False)
    assert abs(result.val_losses[0] - math.log(config.vocab_size)) <= 0.05


def test_training_lowers_the_loss_and_two_runs_are_bit_identical(corpus, tmp_path):
    a, b = run(corpus, tmp_path / "a"), run(corpus, tmp_path / "b")
    assert a.train_losses == b.train_losses and a.val_losses == b.val_losses
    assert a.val_losses[20] < a.val_losses[0] - 1.0
    wa, wb = (load_file(str(r.checkpoint / "model.safetensors")) for r in (a, b))
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_a_run_resumed_at_step_10_matches_the_uninterrupted_run_bit_for_bit(corpus, tmp_path):
    full = run(corpus, tmp_path / "full", settings=dataclasses.replace(SETTINGS, checkpoint_every=10))
    # stopped at step 10: a fresh run directory whose latest checkpoint is the run's step 10
    resumed_dir = tmp_path / "resumed"
    save_checkpoint(resumed_dir, 10, *_state(tmp_path / "full" / "step-0000010"))
    resumed = run(corpus, resumed_dir, resume=True)
    assert resumed.train_losses == full.train_losses[10:]
    assert resumed.val_losses[20] == full.val_losses[20]
    wa, wb = (load_file(str(r.checkpoint / "model.safetensors")) for r in (full, resumed))
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)


def _state(path):
    c = load_checkpoint(path)
    return c.config, c.params, c.optimizer, c.trainer


def test_checkpoint_round_trips_with_hf_names_and_atomic_latest(tmp_path):
    params = init_params(MICRO, seed=3)
    opt = {f"{m}.{k}": np.abs(v) + 1 for k, v in params.items() for m in ("exp_avg", "exp_avg_sq")}
    p1 = save_checkpoint(tmp_path, 5, MICRO, params, opt, {"step": 5, "data_position": 7})
    p2 = save_checkpoint(tmp_path, 6, MICRO, params, opt, {"step": 6, "data_position": 9})
    p3 = save_checkpoint(tmp_path, 7, MICRO, params, opt, {"step": 7, "data_position": 11})
    assert not p1.exists() and p2.exists() and (tmp_path / "latest").read_text().strip() == p3.name
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temporaries left
    back = load_checkpoint(tmp_path)
    assert back.path == p3 and back.config == MICRO and back.trainer["data_position"] == 11
    assert set(back.params) == set(param_shapes(MICRO))
    assert all(np.array_equal(back.params[k], params[k]) for k in params)
    assert all(np.array_equal(back.optimizer[k], opt[k]) for k in opt)
    assert json.loads((p3 / "config.json").read_text())["model_type"] == "qwen2"
    assert "model.layers.0.self_attn.q_proj.bias" in load_file(str(p3 / "model.safetensors"))


def test_a_checkpoint_is_on_disk_before_latest_names_it_and_before_older_ones_go(tmp_path, monkeypatch):
    """A power cut must never leave ``latest`` naming files the disk does not hold yet, with the
    older checkpoints already rotated away: every file of the step is fsynced, then the run
    directory (the step's name), then ``latest`` and the directory again, and only then rotation."""
    import os

    events = []
    fsync, replace, rmtree = os.fsync, os.replace, __import__("shutil").rmtree
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), replace(a, b))[1])
    monkeypatch.setattr("model.checkpoint.shutil.rmtree",
                        lambda p, **kw: (events.append(("rmtree", str(p))), rmtree(p, **kw))[1])
    params = init_params(MICRO, seed=3)
    save_checkpoint(tmp_path, 1, MICRO, params, {}, {"step": 1}, keep=1)
    events.clear()
    final = save_checkpoint(tmp_path, 2, MICRO, params, {}, {"step": 2}, keep=1)
    named = next(i for i, e in enumerate(events) if e == ("replace", str(final)))
    synced = {Path(p).name for kind, p in events[:named] if kind == "fsync"}
    assert {f.name for f in final.iterdir()} <= synced  # (the files, under the temporary's name)
    latest = next(i for i, e in enumerate(events) if e == ("replace", str(tmp_path / "latest")))
    assert ("fsync", str(tmp_path)) in events[named:latest] and ("fsync", str(tmp_path)) in events[latest:]
    gone = next(i for i, e in enumerate(events) if e[0] == "rmtree" and e[1].endswith("step-0000001"))
    assert latest < events.index(("fsync", str(tmp_path)), latest) < gone


def test_a_file_system_without_fsync_still_saves_but_a_failed_write_back_is_an_error(tmp_path, monkeypatch):
    import errno
    import os

    def refuse(code):
        def fsync(fd):
            raise OSError(code, os.strerror(code))
        return fsync

    monkeypatch.setattr(os, "fsync", refuse(errno.EINVAL))  # (some network and FUSE file systems)
    path = save_checkpoint(tmp_path / "a", 1, MICRO, init_params(MICRO), {}, {"step": 1, "data_position": 0})
    assert load_checkpoint(path).trainer["step"] == 1
    monkeypatch.setattr(os, "fsync", refuse(errno.EIO))
    with pytest.raises(OSError, match="cannot sync to disk"):
        save_checkpoint(tmp_path / "b", 1, MICRO, init_params(MICRO), {}, {"step": 1, "data_position": 0})
    assert not (tmp_path / "b" / "latest").exists()


@pytest.mark.parametrize("key, name, value", [("adamw", "beta2", 0.99999999),  # the GPU's AdamW cannot bake it
                                             ("settings", "lr", 1e-40)])  # subnormal in f32: refused since
def test_a_run_saved_with_a_setting_refused_now_is_told_so_not_called_damaged(tmp_path, key, name, value):
    from model.train import saved_settings
    trainer = {"settings": dataclasses.asdict(TrainSettings()), "step": 1, "data_position": 0,
               "adamw": dataclasses.asdict(AdamWSettings())}
    trainer[key][name] = value  # what an older release accepted and saved
    params = init_params(MICRO)
    opt = {f"{m}.{k}": np.zeros_like(v) for k, v in params.items() for m in ("exp_avg", "exp_avg_sq")}
    ckpt = load_checkpoint(save_checkpoint(tmp_path, 1, MICRO, params, opt, trainer))
    with pytest.raises(CheckpointError, match=f"saved with a setting this version refuses .*--{name}.*train --init") \
            as e:
        saved_settings(ckpt)
    assert "damaged" not in str(e.value)


def test_a_checkpoint_is_made_as_the_umask_says_like_the_runs_other_files(tmp_path):
    """(Its folder was mkdtemp's 0700, its safetensors files 0600, whatever the umask.)"""
    old = os.umask(0o027)
    try:
        path = save_checkpoint(tmp_path, 1, MICRO, init_params(MICRO),
                               {f"{m}.{k}": np.zeros(s, np.float32) for k, s in param_shapes(MICRO).items()
                                for m in ("exp_avg", "exp_avg_sq")}, {"step": 1, "data_position": 0},
                               save_dtype="bf16")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (path, *path.iterdir(), tmp_path / "latest")}
    assert {"model.safetensors", "master.safetensors", "optimizer.safetensors", "trainer.json"} <= set(modes)
    assert modes == {name: 0o750 if name == path.name else 0o640 for name in modes}


def test_a_bias_free_model_is_saved_as_llama_without_biases_and_loads_back(tmp_path):
    config = MICRO.replace(qkv_bias=False)
    path = save_checkpoint(tmp_path, 1, config, init_params(config), {}, {})
    hf = json.loads((path / "config.json").read_text())
    assert hf["model_type"] == "llama" and hf["attention_bias"] is False
    assert not any(k.endswith(".bias") for k in load_file(str(path / "model.safetensors")))
    assert load_checkpoint(path).config == config


def test_mismatched_damaged_and_missing_checkpoints_are_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, MICRO, init_params(MICRO), {}, {})
    MICRO.replace(intermediate_size=32).save(path / "config.json")
    with pytest.raises(CheckpointError, match="config.json is damaged: its sha256 differs"):
        load_checkpoint(path)
    (path / "manifest.json").unlink()  # as a checkpoint another tool wrote: the config is still checked
    with pytest.raises(CheckpointError, match="config/weights mismatch"):
        load_checkpoint(path)
    MICRO.save(path / "config.json")
    (path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing")


def micro_run_args(tmp_path) -> list[str]:
    """``train`` arguments for the micro config on a one-file corpus, numpy, into tmp_path / run."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.py").write_text("def add(a, b):\n    return a + b\n" * 200)
    cfg = tmp_path / "config.json"
    MICRO.save(cfg)
    return ["--config", str(cfg), "--data", str(data), "--out", str(tmp_path / "run"), "--device", "numpy",
            "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1"]


def test_cli_trains_resumes_and_generates(tmp_path, capsys):
    common = micro_run_args(tmp_path)
    assert main(["train", *common, "--steps", "6", "--checkpoint-every", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("device: numpy") and "val_loss" in out and "step-0000006" in out
    final = (tmp_path / "run" / "step-0000006" / "model.safetensors").read_bytes()
    (tmp_path / "run" / "latest").write_text("step-0000004\n")  # as if stopped after step 4
    assert main(["train", *common, "--resume"]) == 0  # steps and the rest from the saved run
    assert "resumed from" in capsys.readouterr().out
    assert (tmp_path / "run" / "step-0000006" / "model.safetensors").read_bytes() == final
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "def", "--max-new-tokens", "5",
                 "--device", "numpy"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def") and len(text.encode()) >= 4
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "x", "--max-new-tokens", "3",
                 "--temperature", "0.8", "--top-k", "5", "--device", "numpy"]) == 0


def test_cli_trains_and_generates_with_bf16_gemm_operands(tmp_path, capsys):
    assert main(["train", *micro_run_args(tmp_path), "--precision", "bf16", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("device: numpy") and "bf16 GEMMs (fp32 master weights)" in out
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "def", "--max-new-tokens", "3",
                 "--device", "numpy", "--precision", "bf16"]) == 0
    assert capsys.readouterr().out.startswith("def")


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "huge"], "unknown preset 'huge'"),
    (["train", "--data", "/nonexistent/dir", "--device", "numpy"], "no such file or directory"),
    (["train", "--steps", "0"], "steps must be at least 1"),
    (["generate", "--checkpoint", "/nonexistent", "--prompt", "x"], "no checkpoint at"),
    (["generate", "--prompt", "x"], "required: --checkpoint"),
    (["bogus"], "unknown command 'bogus'"),
    (["train", "--precision", "fp8"], "invalid choice: 'fp8'"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_empty_corpus_is_refused(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "empty.txt").write_text("")
    assert main(["train", "--data", str(tmp_path / "data"), "--device", "numpy", "--out", str(tmp_path / "r")]) == 2
    assert "corpus is empty" in capsys.readouterr().err


def test_a_run_with_an_hf_tokenizer_keeps_it_with_the_checkpoint(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["def", "return", "self", "(", ")", ":", "a", "b", "+", ","]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.py").write_text("def add ( a , b ) : return a + b\n" * 300)
    cfg = tmp_path / "config.json"
    MICRO.save(cfg)
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--data", str(data), "--tokenizer", str(tmp_path / "tokenizer.json"),
                 "--out", str(run), "--device", "numpy", "--steps", "3", "--batch-size", "2", "--seq-len", "8",
                 "--eval-batches", "1"]) == 0
    assert "(tokenizer.json)" in capsys.readouterr().out
    assert (run / "step-0000003" / "tokenizer.json").exists()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "def add", "--max-new-tokens", "4",
                 "--device", "numpy"]) == 0
    assert capsys.readouterr().out.startswith("def add")


def test_resuming_with_another_config_is_refused(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.py").write_text("x = 1\n" * 500)
    cfg, other = tmp_path / "config.json", tmp_path / "other.json"
    MICRO.save(cfg)
    MICRO.replace(intermediate_size=32).save(other)
    common = ["--data", str(data), "--out", str(tmp_path / "run"), "--device", "numpy", "--batch-size", "2",
              "--seq-len", "8", "--eval-batches", "1"]
    assert main(["train", "--config", str(cfg), *common, "--steps", "2"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(other), *common, "--steps", "4", "--resume"]) == 2
    assert "another config" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "--device", "cuda", "--steps", "1"],
                                  ["generate", "--checkpoint", "x", "--prompt", "y", "--device", "cuda"]])
def test_asking_for_the_gpu_without_one_is_a_clear_error(argv, capsys, tmp_path):
    from runtime.driver import available
    if available()[0]:
        pytest.skip("a GPU is present")
    if argv[0] == "generate":
        save_checkpoint(tmp_path, 1, MICRO, init_params(MICRO), {}, {})
        argv = [a if a != "x" else str(tmp_path) for a in argv]
    assert main(argv) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
