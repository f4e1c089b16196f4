"""What a run leaves for its user: metrics.jsonl (every field, every step) and loss.png."""
import json
import shutil

import pytest

from model.config import ModelConfig
from model.data import ByteTokenizer, Corpus
from model.metrics import FIELDS, METRICS, PLOT, read_metrics
from model.numpy_backend import NumpyBackend
from model.optim import AdamWSettings
from model.train import TrainSettings, train

MICRO = ModelConfig(vocab_size=256, hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=2,
                    intermediate_size=24, rope_theta=1e4, rms_norm_eps=1e-6, qkv_bias=True,
                    tie_word_embeddings=False, max_position_embeddings=64)
SETTINGS = TrainSettings(steps=6, batch_size=2, seq_len=16, lr=1e-2, warmup=2, eval_every=3, eval_batches=1,
                         checkpoint_every=3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    for i in range(3):
        (data / f"m{i}.py").write_text(f"def f{i}(a, b):\n    return a * b + {i}\n" * 40)
    return Corpus.from_files(sorted(data.iterdir()), ByteTokenizer())


def run(corpus, out, **kw):
    return train(MICRO, kw.pop("settings", SETTINGS), AdamWSettings(), corpus, NumpyBackend, out,
                 log=lambda m: None, progress=False, **kw)


def test_a_run_writes_a_metrics_row_for_every_step_with_every_field(corpus, tmp_path):
    result = run(corpus, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(7)) and all(tuple(r) == FIELDS for r in rows)
    assert rows[0]["val_loss"] == result.val_losses[0] and rows[0]["train_loss"] is None
    assert [r["train_loss"] for r in rows[1:]] == result.train_losses
    assert {r["step"] for r in rows if r["val_loss"] is not None} == {0, 3, 6}
    assert all(r["lr"] > 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in rows[1:])
    assert all(a["elapsed_s"] <= b["elapsed_s"] for a, b in zip(rows, rows[1:]))


def test_a_resumed_run_keeps_the_rows_up_to_its_checkpoint_and_appends(corpus, tmp_path):
    full = run(corpus, tmp_path / "full")
    run(corpus, tmp_path / "r")  # then as if it had died after step 3's checkpoint: rows 4.. are redone
    (tmp_path / "r" / "step-0000006").rename(tmp_path / "r" / "gone")
    (tmp_path / "r" / "latest").write_text("step-0000003\n")
    run(corpus, tmp_path / "r", resume=True)
    rows = read_metrics(tmp_path / "r" / METRICS)
    assert [r["step"] for r in rows] == list(range(7))
    assert [r["train_loss"] for r in rows[1:]] == full.train_losses


def test_loss_png_is_drawn_when_matplotlib_is_installed(corpus, tmp_path):
    pytest.importorskip("matplotlib")
    run(corpus, tmp_path)
    assert (tmp_path / PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def cli_train(tmp_path, *extra):
    from model.cli import main
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "a.py").write_text("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 100)
    return main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--device", "numpy",
                 "--steps", "30", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1", "--lr", "1e-2",
                 *extra])


def test_a_bare_train_says_its_plan_and_ends_with_a_sample_it_saves(tmp_path, capsys):
    assert cli_train(tmp_path) == 0
    out = capsys.readouterr().out
    assert "plan: the default run here, --preset tiny --precision fp32 --steps 30 --batch-size 4" in out
    assert "the time measured for the plan as it stands no longer applies" in out  # --steps etc. given
    sample = (tmp_path / "run" / "sample.txt").read_text()
    assert sample.startswith("def ") and len(sample) > 100 and f"sample ({tmp_path / 'run' / 'sample.txt'}):\n{sample}" in out
    gen = json.loads((tmp_path / "run" / "step-0000030" / "generation_config.json").read_text())
    assert gen == {"do_sample": True, "temperature": 0.8, "top_k": 40}
    assert (tmp_path / "run" / METRICS).is_file()


def test_generate_samples_by_the_checkpoints_generation_config_and_does_not_repeat_one_token(tmp_path, capsys):
    from model.cli import main
    assert cli_train(tmp_path) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "def ", "--max-new-tokens", "60",
                 "--device", "numpy"]) == 0
    captured = capsys.readouterr()
    assert "sampling at temperature 0.8, top-k 40" in captured.err
    new = captured.out[len("def "):].rstrip("\n")
    assert len(set(new)) > 5  # not one token (or two) over and over
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "def ", "--max-new-tokens", "8",
                 "--device", "numpy", "--temperature", "0"]) == 0
    assert "greedy" in capsys.readouterr().err  # a flag given wins over the file


def test_resume_keeps_the_runs_save_dtype_and_refuses_another(tmp_path, capsys):
    from model.cli import main
    assert cli_train(tmp_path, "--save-dtype", "bf16", "--checkpoint-every", "10") == 0
    run = tmp_path / "run"
    shutil.rmtree(run / "step-0000030")
    (run / "latest").write_text("step-0000020\n")  # as if stopped after step 20
    capsys.readouterr()
    common = ["train", "--resume", "--out", str(run), "--device", "numpy"]
    assert main([*common, "--save-dtype", "fp32"]) == 2
    assert "--save-dtype fp32 contradicts the run's saved bf16" in capsys.readouterr().err
    assert main(common) == 0
    assert json.loads((run / "step-0000030" / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_run_never_lands_inside_a_checkpoint(tmp_path, capsys):
    from model.cli import main
    assert cli_train(tmp_path) == 0
    capsys.readouterr()
    nested = tmp_path / "run" / "step-0000030" / "nested"
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(nested), "--device", "numpy",
                 "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1"]) == 2
    assert "is in a checkpoint" in capsys.readouterr().err and not nested.exists()


def test_a_checkpoint_of_ours_whose_manifest_was_removed_is_refused(tmp_path, capsys):
    from model.cli import main
    assert cli_train(tmp_path) == 0
    (tmp_path / "run" / "step-0000030" / "manifest.json").unlink()
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "x", "--device", "numpy"]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err
