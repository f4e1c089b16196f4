"""NCCL through nccl4py on the GPU (model/parallel/nccl.py), as one rank: the collectives on the
runtime's device buffers, and ``ptxgen train``'s rank path end to end (NcclCommunicator,
ZeroCudaRank, the training loop with a communicator, rank 0's consolidated checkpoint) against the
one-process run. One rank's reduce-scatter and all-gather are copies, so the weights and moments
must be the same bits; two ranks need two GPUs (the nvidia-h200-x2 machine)."""
import numpy as np
import pytest

from model.parallel.launch import LaunchEnv
from runtime.memory import DeviceArray

pytestmark = pytest.mark.cuda


@pytest.fixture
def nccl():
    pytest.importorskip("nccl.core", reason="nccl4py is not installed (pip install -e '.[distributed]')")
    from model.parallel.nccl import NcclCommunicator
    from model.parallel.spawn import free_port

    comm = NcclCommunicator(LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "torchrun"))
    yield comm
    comm.close()


def test_one_ranks_collectives_on_device_buffers(nccl):
    data = np.arange(1000, dtype=np.float32) * 0.5
    buf, out, half = DeviceArray.from_numpy(data), DeviceArray(1000), DeviceArray(64, "bf16")
    try:
        nccl.all_reduce(buf)
        nccl.reduce_scatter(buf, out)
        assert np.array_equal(out.to_numpy(), data)
        out.fill_u32(0)
        nccl.all_gather(buf.view("first half", 0, (500,)), out.view("first half", 0, (500,)))
        nccl.broadcast(buf, root=0)
        assert np.array_equal(out.to_numpy()[:500], data[:500]) and np.array_equal(buf.to_numpy(), data)
        nccl.barrier()
        with pytest.raises(ValueError, match="all_gather: 1000 elements against 1 x 500"):
            nccl.all_gather(buf.view("half", 0, (500,)), out)
        with pytest.raises(TypeError, match="one of f32, f16, bf16"):
            nccl.all_gather(buf.view("as many", 0, (64,)), half)
        bits = np.arange(64, dtype=np.uint16)  # bf16 travels as its bits
        half.upload(bits)
        nccl.broadcast(half, root=0)
        assert np.array_equal(half.to_numpy(), bits)
    finally:
        buf.free()
        out.free()
        half.free()


def test_train_as_one_rank_of_a_data_parallel_run_writes_the_one_process_checkpoint(tmp_path, monkeypatch):
    pytest.importorskip("nccl.core", reason="nccl4py is not installed (pip install -e '.[distributed]')")
    from model.checkpoint import load_checkpoint
    from model.cli import main
    from model.parallel.spawn import free_port

    (tmp_path / "data.txt").write_text("def add(a, b):\n    return a + b\n" * 400)
    args = ["--preset", "tiny", "--precision", "bf16", "--data", str(tmp_path / "data.txt"), "--steps", "6",
            "--batch-size", "4", "--seq-len", "64", "--eval-every", "3", "--lr", "3e-3"]
    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    rank = LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "torchrun")
    monkeypatch.setattr("model.cli.check_data_parallel", lambda *a: rank)  # as torchrun's only rank would be
    assert main(["train", *args, "--out", str(tmp_path / "rank")]) == 0
    one, ours = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "rank")
    assert ours.trainer["backend"] == "cuda-zero1" and ours.trainer["step"] == 6
    for name, w in one.params.items():
        assert np.array_equal(ours.params[name], w), name
    for name, m in one.optimizer.items():
        assert np.array_equal(ours.optimizer[name], m), name
    assert ours.trainer["val_loss"] == pytest.approx(one.trainer["val_loss"], rel=1e-6)
