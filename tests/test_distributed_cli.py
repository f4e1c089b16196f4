"""``ptxgen train --gpus N`` (and a torchrun / srun launch) checked before any work: one line and
exit 2 for a missing NCCL (naming the extra to install), too few GPUs, a numpy device, a bad
launch environment, a batch that does not split among the GPUs. With all of that in order,
``--gpus N`` starts N ranks of the same command (tests/test_distributed_spawn.py: how they are
watched), and a rank pins its GPU. One GPU, or no launcher, trains as before. What each rank was
given is digested for the rendezvous to compare."""
import argparse
import dataclasses
import sys

import numpy as np
import pytest

import model.parallel.nccl as nccl_module
import runtime.driver
from model.checkpoint import load_checkpoint, save_checkpoint
from model.cli import check_data_parallel, main, run_inputs
from model.config import preset
from model.data import ByteTokenizer, Corpus
from model.optim import AdamWSettings
from model.params import init_params
from model.train import TrainSettings

TORCHRUN_2 = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def train(capsys, monkeypatch, *argv, environ=None):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                 "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "PTXGEN_LAUNCHER", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (environ or {}).items():
        monkeypatch.setenv(name, value)
    code = main(["train", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def work_started(monkeypatch):
    """Fails the test if the run gets as far as reading its model config."""
    def refuse(*a, **k):
        raise AssertionError("work started before --gpus was checked")
    monkeypatch.setattr("model.cli.preset", refuse)
    monkeypatch.setattr("model.cli.default_run", refuse)


def test_without_nccl4py_gpus_2_names_the_extra_to_install(capsys, monkeypatch, work_started):
    monkeypatch.setattr(nccl_module, "nccl_missing", lambda: "multi-GPU training needs NCCL (ModuleNotFoundError: "
                        "No module named 'nccl'); install it with pip install -e '.[distributed]'")
    code, out, err = train(capsys, monkeypatch, "--gpus", "2")
    assert code == 2 and out == ""
    assert err == ("ptxgen train: error: --gpus 2: multi-GPU training needs NCCL (ModuleNotFoundError: No module "
                   "named 'nccl'); install it with pip install -e '.[distributed]'\n")


def test_nccl_missing_says_what_to_install_when_nccl4py_cannot_be_imported(monkeypatch):
    monkeypatch.setitem(sys.modules, "nccl", None)  # as if not installed, whether it is or not
    monkeypatch.setitem(sys.modules, "nccl.core", None)
    line = nccl_module.nccl_missing()
    assert line.startswith("multi-GPU training needs NCCL (ModuleNotFoundError")
    assert line.endswith("install it with pip install -e '.[distributed]'") and "\n" not in line


def test_more_gpus_than_visible_is_one_line(capsys, monkeypatch, work_started):
    monkeypatch.setattr(nccl_module, "nccl_missing", lambda: None)
    monkeypatch.setattr(runtime.driver, "device_count", lambda: 2)
    code, _, err = train(capsys, monkeypatch, "--gpus", "4")
    assert code == 2 and err == "ptxgen train: error: --gpus 4: needs 4 GPUs on this host, 2 visible\n"
    monkeypatch.setattr(runtime.driver, "device_count", lambda: 0)  # torchrun's rank 1 on a 1-GPU host
    code, _, err = train(capsys, monkeypatch, environ={**TORCHRUN_2, "RANK": "1", "LOCAL_RANK": "1"})
    assert code == 2 and err == ("ptxgen train: error: torchrun with 2 ranks: rank 1 (local rank 1) has no GPU "
                                 "(CUDA_VISIBLE_DEVICES=1: none visible)\n")


def test_a_rank_sees_only_its_own_gpu(monkeypatch):
    monkeypatch.setattr(nccl_module, "nccl_missing", lambda: None)
    monkeypatch.setattr(runtime.driver, "device_count", lambda: 1)
    environ = {**TORCHRUN_2, "RANK": "1", "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "2,3"}
    env = check_data_parallel(None, "auto", environ)
    assert (env.rank, env.world, env.local_rank) == (1, 2, 1) and environ["CUDA_VISIBLE_DEVICES"] == "3"


@pytest.fixture
def gpu_host(monkeypatch):
    """NCCL installed and 8 GPUs, as far as the checks ask; the run's own checks of the GPU pass."""
    monkeypatch.setattr(nccl_module, "nccl_missing", lambda: None)
    monkeypatch.setattr(runtime.driver, "device_count", lambda: 8)
    monkeypatch.setattr("model.cli.select_backend", lambda device, precision: ("device: cuda (stand-in)", object))
    monkeypatch.setattr("model.cli.check_gpu_kernels", lambda *a: None)
    monkeypatch.setattr("model.cli.check_model_fits", lambda *a: None)
    started = []
    monkeypatch.setattr("model.parallel.spawn.spawn_ranks", lambda world, command, environ: started.append(
        (world, command)) or 0)
    return started


def test_gpus_n_checks_the_run_then_starts_n_ranks_of_the_same_command(capsys, monkeypatch, tmp_path, gpu_host):
    (tmp_path / "data.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    argv = ["--gpus", "2", "--preset", "tiny", "--data", str(tmp_path / "data.txt"), "--steps", "2",
            "--batch-size", "4", "--seq-len", "16", "--out", str(tmp_path / "run")]
    code, out, err = train(capsys, monkeypatch, *argv)
    assert (code, out, err) == (0, "", "")
    assert gpu_host == [(2, [sys.executable, "-m", "model.cli", "train", *argv])]
    assert not (tmp_path / "run").exists()  # rank 0 makes the run directory, not the parent


def test_a_batch_that_does_not_split_among_the_gpus_is_one_line_before_any_rank_starts(capsys, monkeypatch, tmp_path,
                                                                                       gpu_host):
    (tmp_path / "data.txt").write_text("x = 1\n" * 500)
    code, out, err = train(capsys, monkeypatch, "--gpus", "3", "--preset", "tiny", "--data", str(tmp_path / "data.txt"),
                           "--batch-size", "4", "--seq-len", "16", "--out", str(tmp_path / "run"))
    assert code == 2 and out == "" and gpu_host == []
    assert err == "ptxgen train: error: --batch-size 4 does not split evenly among 3 GPUs (use a multiple of 3)\n"


def test_gpus_n_under_a_one_task_launch_starts_its_own_ranks(capsys, monkeypatch):
    """An sbatch script that exports MASTER_ADDR/MASTER_PORT, or torchrun of one process, around
    ptxgen train --gpus 4: the one-task launch does not make it one rank; --gpus starts the four."""
    monkeypatch.setattr(nccl_module, "nccl_missing", lambda: None)
    monkeypatch.setattr(runtime.driver, "device_count", lambda: 4)
    one_task = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_LOCALID": "0", "MASTER_ADDR": "node1",
                "MASTER_PORT": "29500"}
    for environ in (one_task, {**TORCHRUN_2, "WORLD_SIZE": "1"}):
        assert check_data_parallel(4, "auto", dict(environ)) == 4


def test_a_rank_of_gpus_n_takes_its_parents_flag_and_refuses_another(capsys, monkeypatch, work_started):
    monkeypatch.setattr(nccl_module, "nccl_missing", lambda: None)
    spawned = {**TORCHRUN_2, "PTXGEN_LAUNCHER": "--gpus"}
    code, _, err = train(capsys, monkeypatch, "--gpus", "4", environ=spawned)
    assert code == 2 and err == "ptxgen train: error: --gpus 4 in a rank that ptxgen train --gpus 2 started\n"


@pytest.mark.parametrize("argv, environ, line", [
    (["--gpus", "0"], {}, "--gpus must be at least 1, got 0"),
    (["--gpus", "2", "--comm-timeout", "0"], {}, "--comm-timeout must be a positive number of seconds, got 0"),
    (["--comm-timeout", "nan"], {}, "--comm-timeout must be a positive number of seconds, got nan"),
    (["--gpus", "-3"], {}, "--gpus must be at least 1, got -3"),
    (["--gpus", "2", "--device", "numpy"], {}, "--gpus 2 trains on GPUs; --device numpy trains on the CPU"),
    (["--comm-timeout", "5"], {}, "--comm-timeout is for data-parallel runs (--gpus N, torchrun, srun); this "
                                  "one trains on one device"),  # (it was accepted and unused)
    (["--gpus", "2"], TORCHRUN_2, "--gpus starts its own processes; under torchrun leave it out (the launcher "
                                  "started 2)"),
    ([], {**TORCHRUN_2, "MASTER_PORT": "http"}, "torchrun: MASTER_PORT='http' is not a non-negative integer"),
    ([], {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1"},
     "slurm: MASTER_ADDR and MASTER_PORT must be set"),
])
def test_bad_data_parallel_input_is_one_line_and_exit_2(capsys, monkeypatch, work_started, argv, environ, line):
    code, out, err = train(capsys, monkeypatch, *argv, environ=environ)
    assert code == 2 and out == "" and err.startswith(f"ptxgen train: error: {line}") and err.count("\n") == 1


def test_one_gpu_or_no_launcher_passes_the_check():
    for gpus, environ in ((None, {}), (1, {}), (None, {**TORCHRUN_2, "WORLD_SIZE": "1"})):
        assert check_data_parallel(gpus, "auto", environ) is None  # the one-device run goes on as before


@pytest.mark.parametrize("argv, available, line", [
    (["--gpus", "1", "--device", "numpy"], (True, ""), "--gpus 1 trains on GPUs; --device numpy trains on the CPU"),
    (["--gpus", "1"], (False, "cuInit failed: CUDA_ERROR_NO_DRIVER"), "--gpus 1: no CUDA GPU found (driver not "
                                                                      "installed)"),
])
def test_one_gpu_asked_for_is_never_a_cpu_run_in_its_place(capsys, monkeypatch, work_started, argv, available, line):
    """(``--gpus 1`` with --device numpy, or on a host without a GPU, trained on the CPU: the flag was
    accepted and ignored, where ``--gpus 2`` was refused.)"""
    monkeypatch.setattr(runtime.driver, "available", lambda: available)
    code, out, err = train(capsys, monkeypatch, *argv)
    assert (code, out, err) == (2, "", f"ptxgen train: error: {line}\n")


def test_planted_a_cli_that_checks_gpus_late_is_caught_by_the_before_any_work_fixture(capsys, monkeypatch,
                                                                                       work_started):
    monkeypatch.setattr("model.cli.check_data_parallel", lambda *a: None)  # the check skipped
    with pytest.raises(AssertionError, match="work started before --gpus was checked"):
        train(capsys, monkeypatch, "--gpus", "2")


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_whose_peers_never_come_says_so_in_one_line_and_rank_0_alone_made_the_run_directory(
        capsys, monkeypatch, tmp_path, gpu_host, rank):
    from model.parallel.launch import LaunchEnv
    from model.parallel.rendezvous import RendezvousError

    env = LaunchEnv(rank, 2, rank, "127.0.0.1", 29500, "torchrun")
    monkeypatch.setattr("model.cli.check_data_parallel", lambda *a: env)

    def never_met(launch, timeout, inputs):
        assert set(inputs) == {"data", "settings", "checkpoint", "init"}  # held against rank 0's at the rendezvous
        raise RendezvousError(f"rank {launch.rank}: rank 0 did not answer on 127.0.0.1:29500 within {timeout:g} s")
    monkeypatch.setattr(nccl_module, "NcclCommunicator", never_met)
    (tmp_path / "data.txt").write_text("x = 1\n" * 500)
    code, out, err = train(capsys, monkeypatch, "--preset", "tiny", "--data", str(tmp_path / "data.txt"),
                           "--batch-size", "4", "--seq-len", "16", "--out", str(tmp_path / "run"),
                           "--comm-timeout", "5")
    assert code == 1 and out == ""
    assert err == f"ptxgen train: error: rank {rank}: rank 0 did not answer on 127.0.0.1:29500 within 5 s\n"
    assert (tmp_path / "run").exists() == (rank == 0)


def test_what_a_rank_was_given_is_digested_by_name_and_follows_each_input(tmp_path):
    """The rendezvous holds every rank's run_inputs against rank 0's (tests/test_distributed_launch.py)."""
    files = []
    for name, text in (("a.py", "def f():\n    return 1\n" * 50), ("b.py", "x = [i for i in range(9)]\n" * 50)):
        files.append(tmp_path / name)
        files[-1].write_text(text)
    corpus, other = (Corpus.from_files(f, ByteTokenizer()) for f in (files, files[:1]))
    config, settings, adamw = preset("tiny"), TrainSettings(), AdamWSettings()
    ns = argparse.Namespace(precision="bf16", save_dtype="fp32")
    init = argparse.Namespace(params=init_params(config, seed=0))  # the part of a Checkpoint digested

    def given(**change):
        args = dict(corpus=corpus, config=config, settings=settings, adamw=adamw, ns=ns, ckpt=None, init=None)
        return run_inputs(**{**args, **change})

    base = given()
    assert set(base) == {"data", "settings", "checkpoint", "init"} and base == given()
    differ = lambda got: {k for k in base if got[k] != base[k]}  # noqa: E731
    assert differ(given(corpus=other)) == {"data"}
    assert differ(given(settings=dataclasses.replace(settings, lr=settings.lr / 2))) == {"settings"}
    assert differ(given(ns=argparse.Namespace(precision="fp32", save_dtype="fp32"))) == {"settings"}
    # a checkpoint by every file its manifest lists: the same step and trainer state with other
    # weights (another host's copy of the run directory) is another checkpoint
    saved = [load_checkpoint(save_checkpoint(tmp_path / f"run{i}", 40, config, params, {},
                                             {"step": 40, "data_position": 0}))
             for i, params in enumerate((init.params, {**init.params, "lm_head.weight": -init.params["lm_head.weight"]}))]
    assert saved[0].trainer == saved[1].trainer
    assert differ(given(ckpt=saved[0])) == differ(given(ckpt=saved[1])) == {"checkpoint"}
    assert given(ckpt=saved[0])["checkpoint"] != given(ckpt=saved[1])["checkpoint"]
    assert differ(given(init=init)) == {"init"}
    nudged = {**init.params, "model.norm.weight": init.params["model.norm.weight"] + np.float32(1e-3)}
    assert given(init=argparse.Namespace(params=nudged))["init"] != given(init=init)["init"]
