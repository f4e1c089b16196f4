"""Bad input to `ptxgen train | generate` is one line on stderr and exit 2, before any work, and never
changes a file of an existing run; and the ways a run used to lose work stay fixed.

The CLI runs in-process (``model.cli.main``) against one tiny trained run shared by the module; each
case that damages a file does it in a fresh copy of that run.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from safetensors.numpy import load_file, save_file

from model import rundir
from model.checkpoint import load_checkpoint, save_checkpoint, write_manifest
from model.cli import main
from model.config import ModelConfig
from model.params import init_params

MICRO = ModelConfig(vocab_size=256, hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=2,
                    intermediate_size=24, rope_theta=1e4, rms_norm_eps=1e-6, qkv_bias=True,
                    tie_word_embeddings=False, max_position_embeddings=64)
FEW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FILES = ["config.json", "model.safetensors", "optimizer.safetensors", "trainer.json", "tokenizer.json",
         "manifest.json"]


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def refused(result: tuple[int, str, str], *words: str) -> str:
    """Exit 2 with exactly one line on stderr, no traceback; the line names ``words``."""
    code, _, err = result
    assert code == 2, err
    assert err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    assert all(w in err for w in words), err
    return err


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` by relative name -> sha256 (and every directory)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(Path(path).rglob("*"))}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A run of 4 steps (checkpoints at 2 and 4) with an HF tokenizer; ``latest`` names step 2, as if
    the run had stopped there, so ``--resume`` has work left."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("robust")
    words = ["def", "add", "return", "(", ")", ":", "a", "b", "+", ","]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))
    (root / "data").mkdir()
    (root / "data" / "a.py").write_text("def add ( a , b ) : return a + b\n" * 200)
    MICRO.save(root / "config.json")
    common = ["--data", root / "data", "--device", "numpy", "--batch-size", "2", "--seq-len", "16",
              "--eval-batches", "1", "--lr", "0.01"]
    code, out, err = cli("train", "--config", root / "config.json", "--tokenizer", root / "tokenizer.json",
                         "--out", root / "run", *common, "--steps", "4", "--checkpoint-every", "2")
    assert code == 0, err
    final = hashlib.sha256((root / "run" / "step-0000004" / "model.safetensors").read_bytes()).hexdigest()
    (root / "run" / "latest").write_text("step-0000002\n")
    return {"root": root, "run": root / "run", "common": common, "final": final}


@pytest.fixture
def run_copy(base, tmp_path) -> Path:
    shutil.copytree(base["run"], tmp_path / "run")
    return tmp_path / "run"


def given_once(defaults: list, more: tuple) -> list:
    """Flag-value pairs: ``defaults`` with ``more``'s values in place of their own (an option is given once)."""
    pairs = dict(zip(defaults[::2], defaults[1::2]))
    pairs.update(zip(more[::2], more[1::2]))
    return [x for pair in pairs.items() for x in pair]


def common(base, *more: str) -> list:
    return given_once(base["common"], more)


def generate_on(run: Path, *more: str):
    return cli("generate", "--checkpoint", run, "--prompt", "def add",
               *given_once(["--max-new-tokens", "2", "--device", "numpy"], more))


def resume_on(run: Path, *more: str):
    return cli("train", "--resume", "--out", run, "--device", "numpy", *more)


# -- argument values ----------------------------------------------------------------------------
def _bad_float(flag: str, v: float) -> bool:
    """The documented range of each float flag (independent of the code under test)."""
    finite = np.isfinite(v)
    with np.errstate(over="ignore"):
        ok = {"--lr": finite and v > 0, "--beta1": finite and 0 <= v < 1, "--beta2": finite and 0 <= v < 1,
              "--eps": finite and 0 < np.float32(v) < np.inf, "--weight-decay": finite and 0 <= np.float32(v) < np.inf,
              "--max-grad-norm": finite and 0 <= np.float32(v) < np.inf, "--min-lr-ratio": finite and 0 <= v <= 1}[flag]
    return not ok


@pytest.mark.parametrize("flag, value", [("--weight-decay", "1e300"), ("--max-grad-norm", "1e300"),
                                         ("--beta2", "0.99999999"), ("--beta1", "1e-40"), ("--eps", "1e-40"),
                                         ("--weight-decay", "1e-40"), ("--lr", "1e-320"), ("--lr", "1e39")])
def test_an_optimizer_setting_the_gpu_cannot_take_in_f32_is_refused_on_the_cpu_too(base, tmp_path, flag, value):
    """(A checkpoint's settings go on with it; the CPU took a weight decay of 1e300 and diverged, and a
    beta2 that rounds to 1 in f32, or a subnormal, trained on the CPU and was a traceback on the GPU; an
    --lr of 1e-320, 0 in f32, trained on the CPU and left the GPU's weights as they were.)"""
    refused(cli("train", "--out", tmp_path / "new", *common(base, flag, value)), flag, "f32")
    assert not (tmp_path / "new").exists()


FLOAT_FLAGS = ["--lr", "--beta1", "--beta2", "--eps", "--weight-decay", "--max-grad-norm", "--min-lr-ratio"]
INT_FLAGS = {"--steps": 1, "--batch-size": 1, "--seq-len": 1, "--eval-every": 1, "--eval-batches": 1,
             "--warmup": 0, "--checkpoint-every": 0, "--seed": 0}


@FEW
@given(flag=st.sampled_from(FLOAT_FLAGS), value=st.floats(allow_nan=True, allow_infinity=True, width=64))
def test_every_out_of_range_float_flag_is_refused_before_any_work(base, tmp_path, flag, value):
    assume(_bad_float(flag, value))
    refused(cli("train", "--out", tmp_path / "new", *common(base, flag, repr(value))), flag)
    assert not (tmp_path / "new").exists()


@FEW
@given(flag=st.sampled_from(sorted(INT_FLAGS)), value=st.integers(-10**20, 10**20) | st.text(max_size=6))
def test_every_bad_int_flag_is_refused_before_any_work(base, tmp_path, flag, value):
    text = str(value)
    try:
        number = int(text)  # what argparse will read ("1_0" and " 7" are integers to it too)
    except ValueError:
        number = None
    assume(number is None or number < INT_FLAGS[flag])
    refused(cli("train", "--out", tmp_path / "new", *common(base, flag, text)), flag)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("argv, words", [
    (["--temperature", "nan"], ["--temperature"]), (["--temperature", "inf"], ["--temperature"]),
    (["--temperature", "-0.5"], ["--temperature"]), (["--top-k", "-1"], ["--top-k"]),
    (["--max-new-tokens", "-3"], ["--max-new-tokens"]), (["--seed", "-1"], ["--seed"]),
    (["--top-k", "2.5"], ["--top-k"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens must be at least 1, got 0"]),  # (it printed the prompt back)
])
def test_bad_generate_settings_are_refused(base, argv, words):
    before = tree(base["run"])
    refused(generate_on(base["run"], *argv), *words)
    assert tree(base["run"]) == before


def test_a_prompt_that_is_not_utf8_or_that_the_tokenizer_drops_is_said_so(base):
    bad = os.fsdecode(b"def \xff\xfe")  # as argv delivers bytes that are not UTF-8
    refused(cli("generate", "--checkpoint", base["run"], "--prompt", bad, "--device", "numpy"), "not valid UTF-8")
    refused(cli("generate", "--checkpoint", base["run"], "--prompt", "   ", "--device", "numpy"),
            "drops every character of --prompt")


def test_a_step_count_past_what_float64_holds_exactly_is_refused_before_any_work(base, tmp_path):
    """--steps 100000000000000000000000 was taken: a run that could never end, its learning rate never
    leaving warmup/peak; the limit is 2**53, past which lr_at and every reader of metrics.jsonl (JSON
    numbers, loss.png's axis) cannot tell one step from the next."""
    args = ["--config", base["root"] / "config.json", "--out", tmp_path / "new", *base["common"]]
    for steps in (10**23, 2**53 + 1):
        refused(cli("train", *args, "--steps", str(steps)), "--steps", str(steps), "2**53")
    assert not (tmp_path / "new").exists()


def test_an_out_that_is_a_file_is_refused_before_the_data_is_read(base, tmp_path, monkeypatch):
    """It was said by rundir.prepare, after the whole corpus was read and tokenized."""
    from model import cli as model_cli
    (tmp_path / "afile").write_text("mine\n")
    read = []
    monkeypatch.setattr(model_cli.Corpus, "from_files", classmethod(lambda cls, *a: read.append(a)))
    for out in (tmp_path / "afile", tmp_path / "afile" / "run"):
        refused(cli("train", "--config", base["root"] / "config.json", "--out", out, *base["common"],
                    "--steps", "2"), f"--out {out}", "not a directory")
    assert read == [] and (tmp_path / "afile").read_text() == "mine\n"


def test_a_warmup_longer_than_the_run_is_refused_before_any_work(base, tmp_path):
    """Its learning rate would never reach --lr; a warmup ending on the last step does."""
    args = ["--config", base["root"] / "config.json", "--out", tmp_path / "new", *base["common"]]
    refused(cli("train", *args, "--steps", "3", "--warmup", "4"), "--warmup 4", "--steps 3", "--lr 0.01")
    assert not (tmp_path / "new").exists()
    assert cli("train", *args, "--steps", "2", "--warmup", "2")[0] == 0


def test_a_default_warmup_longer_than_half_the_run_is_cut_to_half_and_said(base, tmp_path):
    """The default (50 steps) is meant for a longer run: on 4 steps the rate peaks on step 2, then decays."""
    code, out, err = cli("train", "--config", base["root"] / "config.json", "--out", tmp_path / "new",
                         *base["common"], "--steps", "4")
    assert code == 0, err
    assert "warmup 2 (the default 50 cut to half of --steps 4)" in out
    assert load_checkpoint(tmp_path / "new").trainer["settings"]["warmup"] == 2


def _eval_batches_held(base) -> int:
    """How many validation batches evaluation gives on the base run's data at 2 x 16, asked for any number."""
    from model.data import Corpus, HFTokenizer, expand_paths, val_batches

    corpus = Corpus.from_files(expand_paths([base["root"] / "data"]), HFTokenizer(base["root"] / "tokenizer.json"))
    return len(val_batches(corpus.val, 2, 16, 10 ** 6))


def _train_with_eval_batches(base, out: Path, *eval_batches: str):
    """A new run on the base run's data, with ``--eval-batches`` as given (none: its default)."""
    flags = dict(zip(base["common"][::2], base["common"][1::2]))
    del flags["--eval-batches"]
    return cli("train", "--config", base["root"] / "config.json", "--tokenizer", base["root"] / "tokenizer.json",
               "--out", out, *[x for pair in flags.items() for x in pair], "--steps", "2", *eval_batches)


def test_more_eval_batches_than_the_validation_split_holds_are_refused_before_any_work(base, tmp_path):
    """(The run evaluated the batches there were, and said nothing.) Refused as a --batch-size too large for the
    data is; as many as there are are taken, and said nowhere."""
    held = _eval_batches_held(base)
    refused(_train_with_eval_batches(base, tmp_path / "new", "--eval-batches", str(held + 1)),
            f"--eval-batches {held + 1}: the validation split's", f"hold {held} batches of 2x16", f"at most {held}")
    assert not (tmp_path / "new").exists()
    code, out, err = _train_with_eval_batches(base, tmp_path / "new", "--eval-batches", str(held))
    assert code == 0 and "eval batches" not in out + err, err


def test_a_default_eval_batches_above_what_the_validation_split_holds_is_cut_and_said(base, tmp_path, monkeypatch):
    """As a default warmup longer than half the run is: the run evaluates, and saves, what there is."""
    import model.train
    from model.train import TrainSettings

    held, evaluated, evaluate = _eval_batches_held(base), [], model.train.evaluate
    assert held < TrainSettings.eval_batches  # (the case under test)
    monkeypatch.setattr(model.train, "evaluate", lambda backend, batches, progress=None:
                        evaluated.append(len(batches)) or evaluate(backend, batches, progress))
    code, out, err = _train_with_eval_batches(base, tmp_path / "new")
    assert code == 0, err
    assert out.count("eval batches") == 1, out
    assert f"eval batches {held} (the default {TrainSettings.eval_batches} cut: the validation split's" in out
    assert evaluated == [held, held]  # steps 0 and 2
    assert load_checkpoint(tmp_path / "new").trainer["settings"]["eval_batches"] == held


def test_a_resumed_run_saved_with_more_eval_batches_than_its_data_holds_says_so_and_goes_on(base, run_copy):
    """(As an older release saved them: it cut them unsaid.) A resumed run keeps its saved settings."""
    held = _eval_batches_held(base)
    trainer = json.loads((run_copy / "step-0000002" / "trainer.json").read_text())
    trainer["settings"]["eval_batches"] = held + 5
    (run_copy / "step-0000002" / "trainer.json").write_text(json.dumps(trainer))
    write_manifest(run_copy / "step-0000002")  # rewritten to match: the setting itself is under test
    code, out, err = resume_on(run_copy)
    assert code == 0, err
    assert out.count("eval batches") == 1 and f"eval batches {held} (the saved {held + 5} cut: " in out, out
    assert load_checkpoint(run_copy).trainer["settings"]["eval_batches"] == held + 5


@pytest.mark.parametrize("batch, words", [("64", "training tokens"), ("2", "validation tokens")])
def test_data_too_small_for_a_batch_is_refused_before_the_run_directory_is_made(base, tmp_path, batch, words):
    """400 bytes: 380 to train on, 20 held out; a batch of 2 x 32 fits the first, not the second."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.py").write_bytes(b"x = 1\n" * 66 + b"y\n" * 2)
    refused(cli("train", "--config", base["root"] / "config.json", "--out", tmp_path / "new", "--data",
                tmp_path / "data", "--device", "numpy", "--batch-size", batch, "--seq-len", "32"), words)
    assert not (tmp_path / "new").exists()


def test_seq_len_above_the_models_positions_and_a_model_too_large_are_refused_with_figures(base, tmp_path):
    refused(cli("train", "--config", base["root"] / "config.json", "--out", tmp_path / "r",
                *common(base, "--seq-len", "65")), "--seq-len 65", "max_position_embeddings 64")
    huge = tmp_path / "huge.json"
    MICRO.replace(vocab_size=2**22, hidden_size=2**14, num_heads=256, num_kv_heads=2,  # (head_dim 64)
                  max_position_embeddings=4096).save(huge)
    err = refused(cli("train", "--config", huge, "--out", tmp_path / "r", *base["common"]), "needs about",
                  "GiB", "available memory")
    assert not (tmp_path / "r").exists(), err


@pytest.mark.parametrize("inside", [".", "runs/one"])
def test_a_run_inside_its_own_data_is_refused(base, tmp_path, inside):
    """(Its checkpoints became its data, so it could never be resumed: the data had changed.)"""
    data = tmp_path / "data"
    shutil.copytree(base["root"] / "data", data)
    refused(cli("train", "--config", base["root"] / "config.json", "--out", data / inside,
                *common(base, "--data", data)),
            "inside --data", str(data))
    assert sorted(p.name for p in data.iterdir()) == ["a.py"]


@pytest.mark.parametrize("where", ["out", "below out", "data", "data on resume"])
def test_a_symbolic_link_loop_for_a_path_is_one_line(base, run_copy, tmp_path, where):
    """(An --out through a loop was a RuntimeError traceback from Path.resolve; --data said 'no such file'.)"""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    before = tree(tmp_path)
    if where == "data on resume":
        result = resume_on(run_copy, "--data", loop)
    elif where == "data":
        result = _new_run(base, tmp_path / "new", "--data", loop)
    else:
        result = _new_run(base, loop if where == "out" else loop / "run")
    refused(result, str(loop), "symbolic link")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("argv", [["generate", "--checkpoint", "{bad}", "--prompt", "x"],
                                  ["train", "--data", "{bad}", "--device", "numpy"],
                                  ["dump", "rmsnorm", "--hidden", "896", "--eps", "1e-6", "-o", "{bad}/x.ptx"],
                                  ["contracts", "validate", "--dir", "{bad}"]])
def test_an_error_naming_a_path_with_a_line_break_is_still_one_line(tmp_path, argv):
    """(The path's line break split the error line in two.)"""
    bad = tmp_path / "two\nlines"
    refused(cli(*[a.format(bad=bad) for a in argv]), str(tmp_path / "two\\nlines"))
    assert not (tmp_path / "two\nlines").exists()


@pytest.mark.parametrize("argv", [
    ["train", "--data", ""], ["train", "--out", "", "--device", "numpy"], ["train", "--preset", ""],
    ["train", "--tokenizer", ""], ["generate", "--checkpoint", "", "--prompt", "def"],
    ["generate", "--checkpoint", "x", "--prompt", ""], ["dump", "rmsnorm", "--hidden", "896", "--eps", "1e-6", "-o", ""],
    ["cache", "--cache-dir", "", "ls"]])
def test_an_empty_value_is_refused_not_read_as_the_current_directory(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(cli(*argv), "an empty value")
    assert not any(tmp_path.iterdir())


def test_dump_to_a_file_writes_it_whole_or_leaves_the_old_one(tmp_path, monkeypatch):
    import errno

    import ptxgen.files

    old = tmp_path / "old.ptx"
    old.write_text("old\n")

    def full_disk(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ptxgen.files.os, "fsync", full_disk)
    refused(cli("dump", "rmsnorm", "--hidden", "896", "--eps", "1e-6", "-o", old), f"cannot write {old}",
            "No space left")
    assert old.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["old.ptx"]
    monkeypatch.undo()
    assert cli("dump", "rmsnorm", "--hidden", "896", "--eps", "1e-6", "-o", old)[0] == 0
    assert ".entry rmsnorm" in old.read_text()


@pytest.mark.parametrize("which", ["config", "tokenizer", "checkpoint tokenizer", "inspect", "golden", "contract"])
def test_a_named_pipe_for_a_file_is_refused_not_waited_on(base, tmp_path, which):
    """(Opening a FIFO to read it waits for a writer: the command hung.)"""
    fifo = tmp_path / ("fifo.yaml" if which == "contract" else "fifo.ptx" if which == "inspect" else "fifo")
    os.mkfifo(fifo)
    step = tmp_path / "step"
    if which == "checkpoint tokenizer":
        shutil.copytree(base["run"] / "step-0000004", step)
        for name in ("manifest.json", "trainer.json", "optimizer.safetensors", "tokenizer.json"):
            (step / name).unlink()  # as transformers writes a directory (a manifest would say it is missing)
        os.mkfifo(step / "tokenizer.json")
    root, common = base["root"], [str(a) for a in base["common"]]
    argv = {"config": ["-m", "model.cli", "train", "--config", fifo, "--out", tmp_path / "r", *common],
            "tokenizer": ["-m", "model.cli", "train", "--config", root / "config.json", "--tokenizer", fifo,
                          "--out", tmp_path / "r", *common],
            "checkpoint tokenizer": ["-m", "model.cli", "generate", "--checkpoint", step, "--prompt", "def",
                                     "--device", "numpy"],
            "inspect": ["-m", "model.cli", "inspect", fifo],
            "golden": ["-m", "runtime.audit", "--check", "golden", "--golden", fifo],
            "contract": ["-m", "model.cli", "contracts", "validate", "--dir", tmp_path]}[which]
    proc = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr, proc.stderr  # (read as empty: refused)
    assert not (tmp_path / "r").exists()


def test_a_pipe_with_a_writer_is_read_as_bash_passes_one_and_a_device_is_refused(tmp_path):
    """``--config <(...)`` reads its pipe whole; /dev/zero (which never ends) is refused at once."""
    import threading

    from ptxgen.files import read_file

    whole = b"{}" * 50000  # more than a pipe holds: read while it is written
    r, w = os.pipe()  # as bash's <(...) hands it over: /dev/fd/N, a pipe with its writer
    writer = threading.Thread(target=lambda: (os.write(w, whole) and None, os.close(w)))
    writer.start()
    try:
        assert read_file(f"/dev/fd/{r}") == whole
    finally:
        writer.join()
        os.close(r)
    with pytest.raises(OSError, match="a device, not a file"):
        read_file("/dev/zero")


def test_files_nested_past_the_parsers_depth_are_one_finding_not_a_traceback(tmp_path):
    from ptxgen import golden

    (tmp_path / "deep.yaml").write_text("[" * 5000 + "]" * 5000)
    code, out, err = cli("contracts", "validate", "--dir", tmp_path)
    assert code != 0 and "Traceback" not in out + err and "deep.yaml: not valid YAML here: nested too deep" in out + err
    (tmp_path / "golden.json").write_text("[" * 100000)
    with pytest.raises(golden.GoldenError, match="unreadable golden digest file"):
        golden.read(tmp_path / "golden.json")


def test_a_billion_layers_are_refused_at_once_not_after_naming_their_tensors(base, tmp_path):
    """(The estimates walked the layers: a config file saying 10^9 hung train and generate.)"""
    from model.footprint import n_params
    from model.params import param_shapes

    for layers in (1, 2, 7):
        config = MICRO.replace(num_layers=layers)
        assert n_params(config) == sum(int(np.prod(s)) for s in param_shapes(config).values())
    huge = tmp_path / "huge.json"
    MICRO.replace(num_layers=10**9).save(huge)
    refused(cli("train", "--config", huge, "--out", tmp_path / "r", *base["common"]), "needs about", "GiB")
    assert not (tmp_path / "r").exists()
    step = tmp_path / "step"
    shutil.copytree(base["run"] / "step-0000004", step)
    MICRO.replace(num_layers=10**9).save(step / "config.json")
    refused(generate_on(step), "needs about", "GiB")
    for name in ("manifest.json", "trainer.json", "optimizer.safetensors"):
        (step / name).unlink()  # as transformers writes a model: --init reads it before any estimate
    refused(cli("train", "--init", step, "--out", tmp_path / "r", *base["common"]), "config/weights mismatch",
            "1000000000 layers")


@pytest.mark.parametrize("where", ["a file", "under a file", "unwritable"])
def test_a_bad_out_is_found_before_the_first_step(base, tmp_path, monkeypatch, where):
    (tmp_path / "file").write_text("mine\n")
    out = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "run",
           "unwritable": tmp_path / "ro"}[where]
    if where == "unwritable":  # root ignores permissions: fail the probe write as a read-only folder does
        def deny(fd, data):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(rundir.os, "write", deny)
    code, out_text, err = cli("train", "--config", base["root"] / "config.json", "--out", out, *base["common"],
                              "--steps", "2")
    refused((code, out_text, err), "--out")
    assert "step 0" not in out_text and (tmp_path / "file").read_text() == "mine\n"


# -- damaged files: every kind the project reads -------------------------------------------------
def _flip(path: Path, index: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[index % len(data)] ^= 1 << bit
    path.write_bytes(bytes(data))


@FEW
@given(name=st.sampled_from(FILES), index=st.integers(0, 10**9), bit=st.integers(0, 7),
       verb=st.sampled_from(["generate", "resume"]))
def test_any_flipped_bit_in_any_checkpoint_file_is_refused_and_changes_nothing(base, name, index, bit, verb):
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(base["run"], run)
        _flip(run / "step-0000002" / name, index, bit)
        before = tree(run)
        refused(generate_on(run) if verb == "generate" else resume_on(run))
        assert tree(run) == before


@FEW
@given(name=st.sampled_from(FILES), cut=st.floats(0, 1), verb=st.sampled_from(["generate", "resume"]),
       manifest=st.booleans())
def test_a_truncated_checkpoint_file_is_refused_with_or_without_the_manifest(base, name, cut, verb, manifest):
    assume(not (name == "manifest.json" and not manifest))
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(base["run"], run)
        ckpt = run / "step-0000002"
        if not manifest:
            (ckpt / "manifest.json").unlink()
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[:int(cut * (len(data) - 2))])  # at least the closing brace / last byte
        before = tree(run)
        refused(generate_on(run) if verb == "generate" else resume_on(run))
        assert tree(run) == before


@FEW
@given(content=st.binary(max_size=24))
def test_a_damaged_latest_is_refused(base, content):
    assume(content.rstrip(b"\n") not in (b"step-0000002", b"step-0000004"))
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(base["run"], run)
        (run / "latest").write_bytes(content)
        before = tree(run)
        refused(generate_on(run))
        refused(resume_on(run))
        assert tree(run) == before


@pytest.mark.parametrize("what, says", [("missing", "which does not exist"),
                                        ("a file", "which is not a checkpoint folder"),
                                        ("a dangling link", "which is not a checkpoint folder")])
def test_latest_naming_what_is_not_a_checkpoint_folder_says_what_it_is(run_copy, what, says):
    """(A file of that name was said not to exist.)"""
    named = run_copy / "step-0000002"
    shutil.rmtree(named)
    if what == "a file":
        named.write_text("x")
    elif what == "a dangling link":
        named.symlink_to(run_copy / "gone")
    before = tree(run_copy)
    for result in (generate_on(run_copy), resume_on(run_copy)):
        refused(result, f"{run_copy / 'latest'} names step-0000002, {says}")
    assert tree(run_copy) == before


def _wrong_type(key: str, value) -> bool:
    """Values of a type the key cannot hold (a value of the right type is a legitimate edit)."""
    if key in ("step", "data_position", "settings.steps", "settings.batch_size"):
        return type(value) is not int
    if key in ("settings.lr", "adamw.eps"):
        return type(value) not in (int, float) or not np.isfinite(value)
    if key == "precision":
        return value is not None  # null: as a checkpoint from before precision was saved (fp32)
    return True  # settings, adamw, data, the whole file: any other value is refused


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(), st.text(max_size=3),
                        st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(),
                                                                              max_size=2))


@FEW
@given(key=st.sampled_from(["step", "data_position", "settings", "adamw", "settings.steps", "settings.lr",
                            "adamw.eps", "settings.batch_size", "data", "precision", "<root>"]),
       value=JSON_VALUES)
def test_trainer_json_with_wrong_types_is_refused_on_resume(base, key, value):
    """With the manifest rewritten to match (as if edited by hand, consistently): the types
    themselves are checked."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(base["run"], run)
        ckpt = run / "step-0000002"
        state = json.loads((ckpt / "trainer.json").read_text())
        if key == "<root>":
            state = value
        elif "." in key:
            outer, inner = key.split(".")
            state[outer][inner] = value
        else:
            state[key] = value
        original = json.loads((base["run"] / "step-0000002" / "trainer.json").read_text())
        assume(state != original and json.dumps(state) != json.dumps(original))
        assume(_wrong_type(key, value))
        (ckpt / "trainer.json").write_text(json.dumps(state))
        write_manifest(ckpt)
        before = tree(run)
        refused(resume_on(run))
        assert tree(run) == before


@pytest.mark.parametrize("damage", ["missing", "wrong shape", "f16", "nan", "negative second moment", "extra"])
def test_an_optimizer_state_that_does_not_fit_the_model_is_refused(run_copy, base, damage):
    ckpt = run_copy / "step-0000002"
    state = load_file(str(ckpt / "optimizer.safetensors"))
    name = "exp_avg_sq.model.norm.weight"
    if damage == "missing":
        del state[name]
    elif damage == "wrong shape":
        state[name] = np.ones(3, np.float32)
    elif damage == "f16":
        state[name] = state[name].astype(np.float16)
    elif damage == "nan":
        state[name][0] = np.nan
    elif damage == "negative second moment":
        state[name][0] = -1.0
    else:
        state["exp_avg.bogus"] = np.zeros(2, np.float32)
    save_file(state, str(ckpt / "optimizer.safetensors"))
    write_manifest(ckpt)  # rewritten to match: the tensors themselves are checked
    before = tree(run_copy)
    refused(resume_on(run_copy), "optimizer.safetensors")
    refused(generate_on(run_copy), "optimizer.safetensors")
    assert tree(run_copy) == before


@pytest.mark.parametrize("text", [b"null", b"[]", b"42", b'"x"', b"{", b"\xff\xfe", b"[" * 100000],
                         ids=["null", "list", "number", "string", "truncated", "not-utf8", "nested-too-deep"])
def test_a_config_json_that_is_not_an_object_is_refused(run_copy, base, tmp_path, text):
    """Each line names the file (generate's and --config's said 'config.json', whatever file it was)."""
    (run_copy / "step-0000002" / "config.json").write_bytes(text)
    write_manifest(run_copy / "step-0000002")  # rewritten to match: the config itself is checked
    before = tree(run_copy)
    refused(generate_on(run_copy), str(run_copy / "step-0000002"), "config.json")
    refused(resume_on(run_copy), str(run_copy / "step-0000002"), "config.json")
    (tmp_path / "c.json").write_bytes(text)
    refused(cli("train", "--config", tmp_path / "c.json", "--out", tmp_path / "new", *base["common"]),
            str(tmp_path / "c.json"))
    assert tree(run_copy) == before and not (tmp_path / "new").exists()


@FEW
@given(index=st.integers(0, 10**9), bit=st.integers(0, 7))
def test_a_damaged_tokenizer_or_data_path_given_to_train_is_one_line(base, index, bit):
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer.json"
        shutil.copyfile(base["root"] / "tokenizer.json", tok)
        _flip(tok, index, bit)
        code, _, err = cli("train", "--tokenizer", tok, "--out", Path(tmp) / "new", *base["common"], "--steps", "1")
        if code != 0:  # a flip the library still reads (a changed word) trains; any other is one line
            refused((code, "", err), "tokenizer")
    refused(cli("train", "--data", "/nonexistent", "--out", "/tmp/never", "--device", "numpy"), "/nonexistent")


def test_nan_and_flipped_bits_in_the_weights_are_detected(run_copy, base):
    weights = run_copy / "step-0000002" / "model.safetensors"
    _flip(weights, len(weights.read_bytes()) - 3, 6)  # inside the last tensor's data
    refused(generate_on(run_copy), "model.safetensors", "sha256")
    state = load_file(str(weights))
    state["model.norm.weight"][1] = np.nan
    save_file(state, str(weights), metadata={"format": "pt"})
    write_manifest(run_copy / "step-0000002")  # rewritten to match: the values themselves are checked
    refused(generate_on(run_copy), "model.norm.weight", "non-finite")


# -- work that used to be lost -------------------------------------------------------------------
def test_rotation_keeps_the_checkpoint_just_written_and_newer_ones(tmp_path, base):
    params = init_params(MICRO)
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, MICRO, params, {}, {"step": step, "data_position": 0})
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000030", "step-0000040"]
    written = save_checkpoint(tmp_path, 10, MICRO, params, {}, {"step": 10, "data_position": 0})
    assert written.is_dir() and (tmp_path / "latest").read_text() == "step-0000010\n"
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000010", "step-0000030", "step-0000040"]
    assert load_checkpoint(tmp_path).path == written
    # through the command line: a second run into the directory of another is refused, nothing changed
    code, out, err = cli("train", "--config", base["root"] / "config.json", "--out", tmp_path / "r",
                         *base["common"], "--steps", "4", "--checkpoint-every", "2")
    assert code == 0, err
    before = tree(tmp_path / "r")
    refused(cli("train", "--config", base["root"] / "config.json", "--out", tmp_path / "r",
                *base["common"], "--steps", "2"), "already holds a run")
    assert tree(tmp_path / "r") == before
    assert generate_on(tmp_path / "r")[0] == 0


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path, base):
    run = tmp_path / "r"
    run.mkdir()
    host = socket.gethostname().replace(".", "_")
    dead = run / f".step-0000002.{host}.{_dead_pid()}.abc123"
    live = run / f".step-0000002.{host}.1.abc123"          # pid 1 is alive
    foreign = run / f".step-0000002.otherhost.{_dead_pid()}.abc123"
    old_style = run / ".step-0000002.x7k2m9q_"               # from an older version, an hour old
    for d in (dead, live, foreign, old_style):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    os.utime(old_style, (time.time() - 7200,) * 2)
    (run / f".latest.{host}.{_dead_pid()}.zz").write_text("step-0000001\n")
    code, _, err = cli("train", "--config", base["root"] / "config.json", "--out", run, *base["common"],
                       "--steps", "2")
    assert code == 0, err
    hidden = sorted(p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock")
    assert hidden == sorted([live.name, foreign.name])


def test_a_checkpoint_moved_aside_by_a_writer_that_died_is_put_back(tmp_path):
    from model.checkpoint import remove_stale_temporaries

    host = socket.gethostname().replace(".", "_")
    aside = tmp_path / f".aside.step-0000002.{host}.{_dead_pid()}.q1w2e3"
    save_checkpoint(tmp_path, 2, MICRO, init_params(MICRO), {}, {"step": 2, "data_position": 0})
    os.replace(tmp_path / "step-0000002", aside)  # killed between moving it aside and renaming its successor
    assert remove_stale_temporaries(tmp_path) == []
    assert load_checkpoint(tmp_path).path == tmp_path / "step-0000002"


def test_a_resumed_run_restores_its_saved_settings_and_matches_the_uninterrupted_run(run_copy, base):
    code, out, err = resume_on(run_copy)  # no --steps, --lr, --data, --tokenizer: all from the run
    assert code == 0, err
    assert "resumed from" in out and "step 4" in out
    assert tree(run_copy)["step-0000004/model.safetensors"] == base["final"]


def test_a_resumed_run_keeps_its_tokenizer_after_the_checkpoint_it_came_from_is_rotated_out(base, tmp_path,
                                                                                           monkeypatch):
    import model.train

    def save_then_stop(*args, **kw):  # the run is interrupted right after its step-2 checkpoint
        save_checkpoint(*args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(model.train, "save_checkpoint", save_then_stop)
    args = ["--config", base["root"] / "config.json", "--tokenizer", base["root"] / "tokenizer.json",
            "--out", tmp_path / "r", *base["common"]]
    assert cli("train", *args, "--steps", "6", "--checkpoint-every", "2")[0] == 130
    monkeypatch.undo()
    code, _, err = resume_on(tmp_path / "r", "--checkpoint-every", "1")  # step 2 is rotated out at step 4
    assert code == 0, err
    assert not (tmp_path / "r" / "step-0000002").exists()
    assert (tmp_path / "r" / "step-0000006" / "tokenizer.json").read_bytes() == \
        (base["root"] / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("argv, words", [
    (["--lr", "0.02"], ["--lr 0.02", "saved 0.01"]),
    (["--batch-size", "4"], ["--batch-size 4", "saved 2"]),
    (["--seq-len", "8"], ["--seq-len 8", "saved 16"]),
    (["--steps", "8"], ["--steps 8", "saved 4"]),
    (["--beta2", "0.9"], ["--beta2 0.9", "saved 0.95"]),
    (["--steps", "2"], ["--steps 2 is at or below the checkpoint's step 2"]),
    (["--steps", "1"], ["at or below"]),
    (["--precision", "bf16"], ["--precision bf16", "saved fp32"]),
    (["--data", "/etc/hostname"], ["--data /etc/hostname", "contradicts"]),
    (["--tokenizer", "/etc/hostname"], ["--tokenizer"]),
])
def test_resume_refuses_flags_that_contradict_the_saved_run(run_copy, base, argv, words):
    before = tree(run_copy)
    refused(resume_on(run_copy, *argv), *words)
    assert tree(run_copy) == before


def test_resume_without_a_checkpoint_or_after_the_end_is_one_line(tmp_path, run_copy, base):
    refused(cli("train", "--resume", "--out", tmp_path / "none", "--device", "numpy"), "no checkpoint")
    (run_copy / "latest").write_text("step-0000004\n")
    refused(resume_on(run_copy), "already finished")


def test_a_second_run_into_a_held_directory_is_refused(run_copy, base):
    before = tree(run_copy)
    with rundir.hold(run_copy):
        refused(resume_on(run_copy), "another run", str(os.getpid()))
    assert {k: v for k, v in tree(run_copy).items() if k != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}


def test_the_device_line_says_plainly_why_there_is_no_gpu():
    from model.cli import _no_gpu

    assert _no_gpu('cuInit failed: CUDA_ERROR_NO_DRIVER: no CUDA driver found: "cuda" is ...') == \
        "no CUDA GPU found (driver not installed)"
    assert "--device cuda" in _no_gpu("cuInit failed: CUDA_ERROR_UNKNOWN: ...")


def test_a_diverging_run_is_one_line_and_keeps_only_finite_checkpoints(base, tmp_path):
    code, out, err = cli("train", "--config", base["root"] / "config.json", "--out", tmp_path / "r",
                         *common(base, "--lr", "1e30", "--warmup", "0", "--max-grad-norm", "0", "--steps", "30",
                                 "--checkpoint-every", "1"))
    refused((code, out, err), "not finite", "diverged")
    for ckpt in (tmp_path / "r").glob("step-*"):
        load_checkpoint(ckpt)  # every checkpoint left loads: finite weights and moments


def test_resume_with_its_saved_data_gone_says_it_is_the_runs_saved_data(base, tmp_path):
    """(It said 'no such file or directory: <path>', a path the user had not given on this command line.)"""
    shutil.copytree(base["root"] / "data", tmp_path / "data")
    assert cli("train", "--out", tmp_path / "r", *common(base, "--data", tmp_path / "data"), "--steps", "2",
               "--checkpoint-every", "1")[0] == 0
    (tmp_path / "r" / "latest").write_text("step-0000001\n")
    (tmp_path / "data").rename(tmp_path / "moved")
    refused(resume_on(tmp_path / "r"), "--resume: the run's saved --data: no such file or directory: "
            f"{tmp_path / 'data'}")


def test_resume_refuses_data_that_changed_since_the_checkpoint(base, tmp_path):
    shutil.copytree(base["root"] / "data", tmp_path / "data")
    args = ["--config", base["root"] / "config.json", "--out", tmp_path / "r", "--data", tmp_path / "data",
            "--device", "numpy", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1"]
    assert cli("train", *args, "--steps", "4", "--checkpoint-every", "2")[0] == 0
    (tmp_path / "r" / "latest").write_text("step-0000002\n")
    with open(tmp_path / "data" / "a.py", "a") as f:
        f.write("x = 1\n")
    before = tree(tmp_path / "r")
    refused(resume_on(tmp_path / "r"), "data", "changed")
    assert tree(tmp_path / "r") == before


@pytest.mark.cuda
def test_free_device_memory_is_read_and_a_model_too_large_for_it_is_refused():
    from model.footprint import MemoryTooSmall, check_fits, free_bytes
    from runtime.driver import call

    free = free_bytes(on_gpu=True)
    _, total = call("cuMemGetInfo")
    assert 0 < free <= total
    check_fits(1 << 20, on_gpu=True, what="a small run")
    with pytest.raises(MemoryTooSmall, match="free GPU memory"):
        check_fits(2 * total, on_gpu=True, what="a run twice the GPU")


def test_running_out_of_gpu_memory_is_one_line_and_another_driver_failure_is_not_hidden():
    """Out of device memory, or of the page-locked host memory a step's inputs are staged in: one
    line naming which; any other driver failure keeps its traceback."""
    from model import cli as model_cli
    from runtime.driver import CudaError

    def fails(result, call="cuMemAlloc"):
        def command(argv):
            raise CudaError(call, type("R", (), {"name": result})(), "driver message")
        return model_cli._guarded("train", command)

    for call, memory in (("cuMemAlloc", "out of GPU memory"), ("cuMemHostAlloc", "out of page-locked host memory")):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = fails("CUDA_ERROR_OUT_OF_MEMORY", call)([])
        refused((code, out.getvalue(), err.getvalue()), memory, "CUDA_ERROR_OUT_OF_MEMORY", "--batch-size")
    with pytest.raises(CudaError, match="CUDA_ERROR_ILLEGAL_ADDRESS"):
        fails("CUDA_ERROR_ILLEGAL_ADDRESS")([])


# -- what a run leaves, however it ends -----------------------------------------------------------
def _new_run(base, out: Path, *more: str):
    root = base["root"]
    return cli("train", "--config", root / "config.json", "--tokenizer", root / "tokenizer.json", "--out", out,
               *base["common"], "--steps", "2", *more)


def test_a_run_directory_whose_latest_is_gone_is_not_written_over(run_copy, base):
    (run_copy / "latest").unlink()
    before = tree(run_copy)
    refused(_new_run(base, run_copy), "step-0000004", "no latest file", "damaged run")
    assert tree(run_copy) == before


@pytest.mark.parametrize("name", ["metrics.jsonl", "sample.txt", "loss.png"])
def test_a_new_run_does_not_write_over_a_runs_files_left_without_checkpoints(base, tmp_path, name):
    """(A new run into a directory holding a metrics.jsonl, sample.txt or loss.png but no checkpoint
    wrote over them: the record of a run stopped before its first checkpoint, or a user's files.)
    Other files in --out are none of the run's business: a run beside them trains."""
    out = tmp_path / "new"
    out.mkdir()
    (out / name).write_text("mine\n")
    (out / "notes.txt").write_text("mine\n")
    before = tree(out)
    refused(_new_run(base, out), f"--out {out} holds {name}", "choose another --out")
    assert tree(out) == before
    (out / name).unlink()
    assert _new_run(base, out)[0] == 0 and (out / "notes.txt").read_text() == "mine\n"


def test_a_run_interrupted_before_its_first_checkpoint_says_how_to_start_over(base, tmp_path, monkeypatch):
    import model.train

    def interrupted(*args, **kwargs):  # after the metrics rows, before any checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(model.train, "save_checkpoint", interrupted)
    out = tmp_path / "new"
    code, _, err = _new_run(base, out)
    assert code == 130 and err.count("\n") == 1, err
    assert f"nothing to resume; remove {out / 'metrics.jsonl'} or choose another --out to start over" in err
    refused(_new_run(base, out), "metrics.jsonl")


def test_a_seed_with_init_is_refused_not_ignored(base, tmp_path):
    """(The seed draws a new model's weights, and nothing else; with --init it was accepted and unused.)"""
    refused(cli("train", "--init", base["run"], "--out", tmp_path / "new", *base["common"], "--seed", "3"),
            "--seed has no effect with --init")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("damage, line", [
    (lambda rows: bytes(range(256)) * 4, 1),  # not even UTF-8
    (lambda rows: rows[0] + b'{"step": 1}\n' + b"".join(rows[2:]), 2),  # a row short of its fields
    (lambda rows: b"".join(rows) + b"not a row\n", 6)],  # a whole last line: no crash writes its line break
    ids=["not UTF-8", "a row short of its fields", "a whole last line"])
def test_a_metrics_log_damaged_in_a_whole_line_is_refused_on_resume_before_the_checkpoint_loads(run_copy, monkeypatch,
                                                                                                damage, line):
    """(It was said once the checkpoint had loaded, and the run went on without the rows after the damage.)"""
    import model.cli

    path = run_copy / "metrics.jsonl"
    path.write_bytes(damage(path.read_bytes().splitlines(keepends=True)))
    monkeypatch.setattr(model.cli, "load_checkpoint", lambda path: pytest.fail("the checkpoint was loaded"))
    before = tree(run_copy)
    refused(resume_on(run_copy), f"{path} is damaged at line {line}", "move the file away")
    assert tree(run_copy) == before


def test_a_metrics_log_cut_off_mid_row_by_a_stopped_run_loses_that_line_alone_and_says_so_once(run_copy):
    path = run_copy / "metrics.jsonl"
    rows = path.read_text().splitlines(keepends=True)  # steps 0 to 4; latest names step 2
    path.write_text("".join(rows[:4]) + rows[4][:20])  # stopped while writing step 4's row
    code, out, err = resume_on(run_copy)
    assert code == 0 and err.count("\n") == 1, err
    assert f"warning: {path}: its last line (5) was cut off mid-row" in err and "dropped" in err
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("why", ["Too many levels of symbolic links", "Permission denied"])
def test_a_metrics_log_that_cannot_be_read_is_refused_on_resume_before_the_checkpoint_loads(run_copy, monkeypatch,
                                                                                             why):
    """(It was refused once the checkpoint had loaded.) A symbolic link loop is real; no read permission is
    the file system's answer monkeypatched: these tests run as root, whom no permission bits stop."""
    import errno

    import model.cli
    import model.metrics

    path = run_copy / "metrics.jsonl"
    if why == "Permission denied":
        read = model.metrics.read_file

        def denied(name):
            if Path(name) == path:
                raise PermissionError(errno.EACCES, why, str(name))
            return read(name)
        monkeypatch.setattr(model.metrics, "read_file", denied)
    else:
        path.unlink()
        path.symlink_to(path.name)
    monkeypatch.setattr(model.cli, "load_checkpoint", lambda path: pytest.fail("the checkpoint was loaded"))
    before = tree(run_copy)
    refused(resume_on(run_copy), f"cannot read {path}: {why}")
    assert tree(run_copy) == before


@pytest.mark.parametrize("name", ["metrics.jsonl", "loss.png", "sample.txt"])
def test_a_run_file_that_is_a_folder_is_refused_on_resume_before_the_checkpoint_loads(run_copy, monkeypatch, name):
    """(metrics.jsonl was refused once the checkpoint had loaded; loss.png and sample.txt after the last step.)"""
    import model.cli

    (run_copy / name).unlink(missing_ok=True)
    (run_copy / name).mkdir()
    monkeypatch.setattr(model.cli, "load_checkpoint", lambda path: pytest.fail("the checkpoint was loaded"))
    before = tree(run_copy)
    refused(resume_on(run_copy), f"{name} is a directory")
    assert tree(run_copy) == before


def test_a_metrics_log_cut_off_mid_row_keeps_the_rows_before_it(tmp_path):
    from model.metrics import FIELDS, MetricsError, read_for_resume, read_metrics
    rows = [json.dumps(dict.fromkeys(FIELDS, 0.5) | {"step": s}) for s in (1, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    path.write_text(rows[0] + "\n" + rows[1] + "\n" + rows[2][:9])
    kept, dropped = read_for_resume(path)
    assert [r["step"] for r in kept] == [1, 2] and dropped.startswith(f"{path}: its last line (3) was cut off")
    assert read_metrics(path) == kept and read_for_resume(tmp_path / "none.jsonl") == ([], None)
    path.write_text(rows[0] + "\n" + rows[1] + "\n" + rows[2])  # only the line break lost: the row is whole
    assert read_for_resume(path) == ([json.loads(r) for r in rows], None)
    path.write_text(rows[0] + "\n" + rows[1][:9] + "\n" + rows[2] + "\n")  # a cut before a whole line
    with pytest.raises(MetricsError, match="damaged at line 2"):
        read_for_resume(path)
    assert read_metrics(path) == [json.loads(rows[0])]  # (loss.png draws what it can)


def test_an_interrupted_run_says_what_it_leaves_to_resume_from(run_copy, base, tmp_path, monkeypatch):
    import model.cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model.cli, "train", interrupted)
    code, _, err = resume_on(run_copy)
    assert code == 130 and err.count("\n") == 1, err
    assert f"{run_copy / 'step-0000002'} stays; train --resume --out {run_copy} continues from it" in err
    code, _, err = _new_run(base, tmp_path / "new")
    assert code == 130 and "before its first checkpoint: nothing to resume" in err and "--resume" not in err


def _interrupt_on(monkeypatch, module, name: str, call: int, error: BaseException = KeyboardInterrupt()) -> None:
    """``module.name`` raises ``error`` on its ``call``-th call (counting from 1)."""
    original, calls = getattr(module, name), []

    def interrupted(*args, **kwargs):
        calls.append(None)
        if len(calls) == call:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)


def test_a_run_interrupted_before_latest_named_its_first_checkpoint_says_so_and_how_to_resume(base, tmp_path,
                                                                                                monkeypatch):
    """(Stopped after step-0000002 was renamed into place and before ``latest`` named it, the run said
    'nothing to resume; remove metrics.jsonl to start over', which a new run then refused, and --resume
    said 'no checkpoint'.) The pointer's temporary file is not left behind either."""
    import model.checkpoint
    out = tmp_path / "r"
    _interrupt_on(monkeypatch, model.checkpoint, "fsync_fd", 1)  # syncing latest's temporary, the step in place
    code, _, err = _new_run(base, out, "--checkpoint-every", "1")
    assert code == 130 and err.count("\n") == 1, err
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == [".lock", "metrics.jsonl", "step-0000001"]
    words = ["step-0000001", "no latest file", f"write latest (one line, the checkpoint's name) to --resume it"]
    assert all(w in err for w in words), err
    refused(resume_on(out), *words)
    refused(_new_run(base, out), *words)
    (out / "latest").write_text("step-0000001\n")
    assert resume_on(out)[0] == 0 and (out / "latest").read_text() == "step-0000002\n"


def test_a_full_disk_mid_run_is_one_line_saying_which_checkpoint_stays(base, tmp_path, monkeypatch):
    """(safetensors' own SafetensorError for a full disk was a traceback; an OSError said nothing of what stays.)"""
    import model.hf
    from safetensors import SafetensorError
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    _interrupt_on(monkeypatch, model.hf, "save_file", 3, full)  # the second checkpoint's model.safetensors
    out = tmp_path / "r"
    err = refused(_new_run(base, out, "--checkpoint-every", "1"), "No space left on device",
                  f"{out / 'step-0000001'} stays; train --resume --out {out} continues from it")
    assert sorted(p.name for p in out.iterdir()) == [".lock", "latest", "metrics.jsonl", "step-0000001"], err
    monkeypatch.undo()
    import errno
    import model.cli
    _interrupt_on(monkeypatch, model.cli, "write_atomic", 1, OSError(errno.ENOSPC, "No space left on device"))
    refused(_new_run(base, tmp_path / "s"), "No space left on device",  # sample.txt, once the run is done
            f"the run is done: {tmp_path / 's' / 'step-0000002'} is its last checkpoint")


def test_a_run_interrupted_after_its_last_checkpoint_says_it_is_done(base, tmp_path, monkeypatch):
    import model.checkpoint
    _interrupt_on(monkeypatch, model.checkpoint, "_rotate", 2)  # after the last (step 2) is named
    code, _, err = _new_run(base, tmp_path / "r", "--checkpoint-every", "1")
    assert code == 130 and err.count("\n") == 1, err
    assert f"the run is done: {tmp_path / 'r' / 'step-0000002'} is its last checkpoint" in err and "--resume" not in err


ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPTS = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
INTERRUPT_ON_IMPORT = """
import os, sys

class Interrupt:  # Ctrl-C, as the module named in PTXGEN_TEST_INTERRUPT is first imported
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["PTXGEN_TEST_INTERRUPT"]:
            raise KeyboardInterrupt

sys.meta_path.insert(0, Interrupt())
"""


def _interrupted_at_import(tmp_path: Path, module: str, command: list[str], *argv) -> subprocess.CompletedProcess:
    """``command`` (a console script's, or ``python -m model.cli``) with ``argv``, in a fresh interpreter whose
    first import of ``module`` raises KeyboardInterrupt (a sitecustomize: no real signal, no race)."""
    (tmp_path / "sitecustomize.py").write_text(INTERRUPT_ON_IMPORT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "PTXGEN_TEST_INTERRUPT": module}
    return subprocess.run([sys.executable, *command, *map(str, argv)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)


def _as_installed(name: str) -> list[str]:
    """What the installer writes for the console script ``name`` of pyproject.toml, as a ``python`` command."""
    module, function = CONSOLE_SCRIPTS[name].split(":")
    return ["-c", f"import sys\nfrom {module} import {function}\nsys.exit({function}())"]


@pytest.mark.parametrize("name, command", [*((name, _as_installed(name)) for name in CONSOLE_SCRIPTS),
                                           ("ptxgen", ["-m", "model.cli"])])
def test_ctrl_c_while_a_command_imports_is_one_line_and_exit_130(tmp_path, name, command):
    """(A traceback: the commands' own handlers are defined by the imports it stopped. `python -m model.cli`
    is how torchrun, srun and --gpus N start each rank, which a Ctrl-C in the terminal reaches too.)"""
    proc = _interrupted_at_import(tmp_path, "numpy", command, "--help")
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, f"{name}: interrupted\n", "")


def test_ctrl_c_in_a_run_says_what_it_leaves_through_the_console_script_as_in_process(base, tmp_path):
    """The train command's own message, naming the last checkpoint, is unchanged by the console script's handler:
    interrupted as it draws loss.png, after its last checkpoint."""
    out = tmp_path / "r"
    proc = _interrupted_at_import(tmp_path, "matplotlib", _as_installed("ptxgen"), "train", "--config",
                                  base["root"] / "config.json", "--tokenizer", base["root"] / "tokenizer.json",
                                  "--out", out, *base["common"], "--steps", "2")
    assert proc.returncode == 130
    assert proc.stderr == f"ptxgen train: interrupted (the run is done: {out / 'step-0000002'} is its last " \
                          "checkpoint)\n"


def test_progress_lines_whose_reader_has_gone_do_not_stop_the_run(monkeypatch):
    """`ptxgen train ... | head`: once the pipe's reader is gone, the lines go nowhere and the run
    goes on (its checkpoints, metrics and sample are in --out)."""
    from model.cli import _say
    read, write = os.pipe()
    os.close(read)
    stream = os.fdopen(write, "w")
    monkeypatch.setattr(sys, "stdout", stream)
    try:
        _say("step 1")  # EPIPE: no one reads; no exception
        _say("step 2")
    finally:
        stream.close()


def test_generate_refuses_more_new_tokens_than_the_models_positions_leave(base):
    refused(cli("generate", "--checkpoint", base["run"], "--prompt", "def add", "--max-new-tokens", "100",
                "--device", "numpy"), "--max-new-tokens 100", "leave 62 of the model's 64 positions")


@pytest.mark.parametrize("argv", [["train", "--lr", "1e-3", "--steps", "2", "--lr", "3e-3"],
                                  ["generate", "--checkpoint", "a", "--prompt", "x", "--checkpoint", "b"],
                                  ["dump", "rmsnorm", "--hidden", "896", "--eps", "1e-6", "--hidden", "512"],
                                  ["dump", "rmsnorm", "--hidden", "896", "--eps", "1e-6", "--block-size", "128",
                                   "--block_size", "64"],  # (one field, both spellings)
                                  ["inspect", "rmsnorm", "--hidden", "896", "--eps", "1e-6", "--arch", "sm_90",
                                   "--arch", "sm_80"],
                                  ["cache", "--cache-dir", "a", "--cache-dir", "b", "ls"]])
def test_an_option_given_twice_is_refused_not_taken_at_its_last_value(argv, tmp_path, monkeypatch):
    """(argparse kept the last value and dropped the first unsaid: --lr 1e-3 ... --lr 3e-3 trained at 3e-3.)"""
    monkeypatch.chdir(tmp_path)
    refused(cli(*argv), "given twice")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, prefix", [(["train", "--step", "3"], "--step"),
                                          (["generate", "--checkpoint", "a", "--prompt", "x", "--max-new", "5"],
                                           "--max-new"),
                                          (["contracts", "check", "--gpu"], "--gpu")])
def test_an_option_is_named_whole_not_by_a_prefix(argv, prefix, tmp_path, monkeypatch):
    """(argparse took --step 3 as --steps 3: a prefix that is whole today names another option once one
    is added that it also begins.)"""
    monkeypatch.chdir(tmp_path)
    refused(cli(*argv), prefix)
    assert not any(tmp_path.iterdir())


def test_data_given_twice_reads_both_lists(base, tmp_path):
    """A later flag overrides an earlier one (`ptxgen train $COMMON --steps 9`), but a second --data
    adds to the first rather than dropping its paths."""
    more = tmp_path / "more"
    more.mkdir()
    (more / "b.py").write_text("def add ( b , a ) : return b + a\n" * 200)
    code, out, err = _new_run(base, tmp_path / "new", "--data", more)
    assert code == 0, err
    assert "data: 2 files" in out


def test_greedy_decoding_that_a_flag_asked_for_says_so(base):
    refused(generate_on(base["run"], "--temperature", "0", "--top-p", "0.5"), "--top-p", "(--temperature 0)")


def test_a_model_vocabulary_past_the_byte_tokenizer_trains_and_writes_its_sample(base, tmp_path):
    """A model may have more ids than its tokenizer (Qwen2's vocabulary is padded past its
    tokenizer's); what it samples there decodes as U+FFFD, never a failure after training."""
    from model.data import ByteTokenizer
    assert ByteTokenizer().decode([104, 105, 300, 0xE2, 0x82, 0xAC, 256]) == "hi\ufffd\u20ac\ufffd"
    config = tmp_path / "config.json"
    ModelConfig(**{**MICRO.__dict__, "vocab_size": 1000}).save(config)
    code, _, err = cli("train", "--config", config, "--out", tmp_path / "run", *base["common"], "--steps", "1")
    assert code == 0 and (tmp_path / "run" / "sample.txt").is_file(), err
