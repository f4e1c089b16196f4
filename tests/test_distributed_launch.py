"""Who a process is (torchrun, SLURM, ``--gpus N``), checked into one dataclass with one-line
errors; and the TCP rendezvous that hands every rank rank 0's id bytes, with timeouts that name
who is missing."""
import multiprocessing
import socket
import struct
import threading
import time

import pytest

from model.parallel.launch import LaunchEnv, LaunchError, from_environ
from model.parallel.rendezvous import MAGIC, RendezvousError, share_id

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29500"}
SLURM = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
         "MASTER_ADDR": "node2", "MASTER_PORT": "12345"}


def test_torchrun_variables_and_slurm_variables_give_one_dataclass():
    assert from_environ(TORCHRUN) == LaunchEnv(3, 4, 1, "node7", 29500, "torchrun")
    assert from_environ(SLURM) == LaunchEnv(5, 8, 1, "node2", 12345, "slurm")
    assert from_environ({**SLURM, **TORCHRUN}).source == "torchrun"  # srun starting torchrun: the trainer's view
    assert from_environ({"HOME": "/root"}) is None
    assert from_environ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_LOCALID": "0"}) is None  # one task


def test_a_batch_scripts_own_shell_is_not_a_launch_only_an_srun_step_is():
    """sbatch --ntasks-per-node=8 sets SLURM_PROCID=0, SLURM_LOCALID=0 and SLURM_NTASKS=8 in the
    script itself: a ptxgen train there (or its --gpus 8) is one process, not rank 0 of 8 waiting
    for ranks nobody starts; srun's tasks carry the step's SLURM_STEP_NUM_TASKS."""
    batch_shell = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0",
                   "MASTER_ADDR": "node2", "MASTER_PORT": "12345"}
    assert from_environ(batch_shell) is None
    assert from_environ({**batch_shell, "SLURM_STEP_NUM_TASKS": "8"}) == LaunchEnv(0, 8, 0, "node2", 12345, "slurm",
                                                                                   batch_shell["SLURM_JOB_ID"])


def test_under_torchruns_agent_the_ranks_meet_on_the_port_after_its_store():
    agent = {**TORCHRUN, "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert from_environ(agent).master_port == 29501 and from_environ(TORCHRUN).master_port == 29500


def test_gpus_n_hands_its_children_torchrun_variables_that_parse_back():
    for rank in range(4):
        env = LaunchEnv.local(rank, 4, 40000)
        assert from_environ(env.environ()) == env  # source "--gpus": the child knows its --gpus is its parent's
        plain = {k: v for k, v in env.environ().items() if k != "PTXGEN_LAUNCHER"}
        assert from_environ(plain) == LaunchEnv(rank, 4, rank, "127.0.0.1", 40000, "torchrun")


@pytest.mark.parametrize("visible, local_rank, gpu", [(None, 0, "0"), (None, 3, "3"), ("4,5,6", 1, "5"),
                                                       ("GPU-a1b2, GPU-c3d4", 1, "GPU-c3d4"),
                                                       ("5", 0, "5")])
def test_each_rank_sees_only_its_local_rank_gpu(visible, local_rank, gpu):
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert LaunchEnv(local_rank, 4, local_rank, "h", 1, "torchrun").pin_gpu(environ) == gpu
    assert environ["CUDA_VISIBLE_DEVICES"] == gpu


def test_one_visible_gpu_is_each_srun_tasks_own_but_under_torchrun_local_rank_0s_alone():
    environ = {"CUDA_VISIBLE_DEVICES": "5"}  # srun --gpus-per-task=1: bound already, whatever the local rank
    assert LaunchEnv(3, 4, 3, "h", 1, "slurm").pin_gpu(environ) == "5" and environ["CUDA_VISIBLE_DEVICES"] == "5"
    with pytest.raises(LaunchError, match=r"^torchrun: local rank 3 has no GPU: CUDA_VISIBLE_DEVICES='5' lists 1$"):
        LaunchEnv(3, 4, 3, "h", 1, "torchrun").pin_gpu({"CUDA_VISIBLE_DEVICES": "5"})  # not 4 ranks on one GPU


def test_a_local_rank_past_the_visible_gpus_is_one_line():
    with pytest.raises(LaunchError, match=r"^torchrun: local rank 2 has no GPU: CUDA_VISIBLE_DEVICES='0,1' lists 2$"):
        LaunchEnv(2, 4, 2, "h", 1, "torchrun").pin_gpu({"CUDA_VISIBLE_DEVICES": "0,1"})


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "torchrun: LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"),
    ({**TORCHRUN, "RANK": "4"}, "torchrun: rank 4 is outside 0..3 (world size 4)"),
    ({**TORCHRUN, "RANK": "-1"}, "torchrun: RANK='-1' is not a non-negative integer"),
    ({**TORCHRUN, "WORLD_SIZE": "four"}, "torchrun: WORLD_SIZE='four' is not a non-negative integer"),
    ({**TORCHRUN, "WORLD_SIZE": "1" * 5000}, "torchrun: WORLD_SIZE='11111111111111111111... (5000 characters)' is "
     "not a non-negative integer below 10^9"),  # (past Python's 4300 digits int() raised its own ValueError)
    ({**TORCHRUN, "WORLD_SIZE": "0", "RANK": "0", "LOCAL_RANK": "0"}, "torchrun: the world size must be at least 1"),
    ({**TORCHRUN, "LOCAL_RANK": "4"}, "torchrun: local rank 4 is outside 0..3"),
    ({**TORCHRUN, "RANK": "0"}, "torchrun: local rank 1 is above rank 0"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, "torchrun: the master port 70000 is outside 1..65535"),
    ({**TORCHRUN, "MASTER_ADDR": ""}, "torchrun: the master address '' is not a host name or address"),
    ({k: v for k, v in SLURM.items() if k != "MASTER_ADDR"}, "slurm: MASTER_ADDR and MASTER_PORT must be set"),
    ({"SLURM_STEP_NUM_TASKS": "2"}, "slurm: SLURM_PROCID, SLURM_LOCALID not set"),
])
def test_a_bad_or_inconsistent_launch_is_one_line(env, message):
    with pytest.raises(LaunchError) as e:
        from_environ(env)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RUN = {"data": "9f2c", "settings": "41aa", "checkpoint": "none"}  # what each rank was given, by digest


def meet(world: int, port: int, timeout: float = 10.0, ranks=None, worlds=None, inputs=None, run_id: str = "job-1"
         ) -> dict[int, object]:
    """share_id on ``ranks`` (default all) of run ``run_id`` as threads, each given ``inputs.get(rank,
    RUN)``; rank -> the bytes, or the error raised."""
    out: dict[int, object] = {}

    def one(rank: int) -> None:
        env = LaunchEnv(rank, (worlds or {}).get(rank, world), 0, "127.0.0.1", port, "torchrun", run_id)
        try:
            out[rank] = share_id(env, lambda: b"id-" + bytes(range(125)), timeout, (inputs or {}).get(rank, RUN))
        except RendezvousError as e:
            out[rank] = e

    threads = [threading.Thread(target=one, args=(r,)) for r in (ranks if ranks is not None else range(world))]
    for t in reversed(threads):  # the others first: they wait for rank 0 to listen
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join()
    return out


def test_every_rank_receives_rank_0s_id_bytes():
    got = meet(4, free_port())
    assert set(got) == {0, 1, 2, 3}
    assert all(v == b"id-" + bytes(range(125)) for v in got.values())


def _process_rank(rank: int, port: int, queue) -> None:
    queue.put((rank, share_id(LaunchEnv(rank, 3, 0, "127.0.0.1", port, "torchrun"), lambda: b"\x00\xffid", 10.0)))


def test_ranks_in_separate_processes_meet_too():
    ctx = multiprocessing.get_context("fork")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_process_rank, args=(r, port, queue)) for r in range(3)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=20) for _ in procs)
    for p in procs:
        p.join(10)
    assert got == {0: b"\x00\xffid", 1: b"\x00\xffid", 2: b"\x00\xffid"}


def test_a_rank_that_never_comes_is_named_by_rank_0_and_the_others_hear_it():
    started = time.monotonic()
    port = free_port()
    got = meet(3, port, timeout=0.5, ranks=[0, 1])
    assert time.monotonic() - started < 3.0
    assert str(got[0]) == f"rendezvous on 127.0.0.1:{port}: rank(s) 2 did not arrive within 0.5 s"
    assert isinstance(got[1], RendezvousError) and "rank(s) 2 did not arrive" in str(got[1])


def test_without_rank_0_the_others_give_up_with_one_line():
    port = free_port()
    got = meet(2, port, timeout=0.4, ranks=[1])
    assert str(got[1]) == f"rank 1: rank 0 did not answer on 127.0.0.1:{port} within 0.4 s"


def test_a_rank_with_another_world_size_is_refused_on_both_sides():
    got = meet(2, free_port(), worlds={1: 3})
    assert "rank 1 has world size 3, rank 0 has 2" in str(got[0])
    assert "refused by rank 0" in str(got[1]) and "rank 1 has world size 3" in str(got[1])


def test_a_rank_given_other_data_or_settings_is_refused_on_both_sides_naming_what_differs():
    """Each rank reads its own --data and settings: ranks on two hosts could read other files under
    one path, and the all-gathered weights would hide it (the replicas' digests agree)."""
    got = meet(3, free_port(), inputs={2: {**RUN, "data": "0bad", "settings": "7e57"}})
    line = "rank 2 was given another data and settings than rank 0 (each rank reads its own: give every rank the same)"
    assert line in str(got[0]) and "refused by rank 0" in str(got[2]) and line in str(got[2])
    assert isinstance(got[1], RendezvousError)  # the rank already there hears it at once
    assert "was given another checkpoint" in str(meet(2, free_port(), inputs={1: {"data": "9f2c"}})[0])


def test_a_rank_of_another_run_on_the_port_is_ignored_and_named_if_its_own_never_come():
    """Two jobs on one port: a rank of the other (its hello valid in every other way) neither
    aborts this run nor takes the place of its rank 1; rank 0 names it if its own rank 1 never comes."""
    port = free_port()
    result = {}
    server = threading.Thread(target=lambda: result.update(meet(2, port, ranks=[0])))
    server.start()
    stranger = meet(2, port, timeout=2.0, ranks=[1], run_id="job-2")
    got = meet(2, port, ranks=[1])
    server.join()
    assert result[0] == got[1] == b"id-" + bytes(range(125))
    assert str(stranger[1]) == (f"rank 1: refused by rank 0 on 127.0.0.1:{port}: rank 0 on 127.0.0.1:{port} is run "
                                "'job-1''s, this rank is run 'job-2''s (another job on this port: give each its "
                                "own MASTER_PORT)")
    port = free_port()
    server = threading.Thread(target=lambda: result.update(meet(2, port, timeout=1.5, ranks=[0])))
    server.start()
    meet(2, port, timeout=0.5, ranks=[1], run_id="job-2")
    server.join()
    assert str(result[0]) == (f"rendezvous on 127.0.0.1:{port}: rank(s) 1 did not arrive within 1.5 s (ranks of "
                              "another run came: 'job-2')")


def test_each_launcher_names_its_run():
    assert from_environ({**TORCHRUN, "TORCHELASTIC_RUN_ID": "abc"}).run_id == "abc"
    assert from_environ({**SLURM, "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "3"}).run_id == "77.3"
    env = LaunchEnv.local(1, 2, 40000, "123-beef")
    assert from_environ(env.environ()).run_id == "123-beef"


def knock(port: int, junk: bytes) -> None:
    """Connect to rank 0's port (once it listens), send ``junk`` and hang up: a stranger."""
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(junk)
            return
        except OSError:
            time.sleep(0.02)


def test_a_connection_that_is_not_a_rank_is_ignored():
    port = free_port()
    result = {}
    server = threading.Thread(target=lambda: result.update(meet(2, port, ranks=[0])))
    server.start()
    for junk in (b"GET / HTTP/1.0\r\n\r\n", b""):  # another program, then a bare connect-and-close
        knock(port, junk)
    got = meet(2, port, ranks=[1])
    server.join()
    assert result[0] == got[1] == b"id-" + bytes(range(125))


def test_rank_0_of_a_launcher_listens_on_every_interface_and_of_gpus_n_on_this_host_alone(monkeypatch):
    """A launcher's MASTER_ADDR may resolve to a loopback address on rank 0's own host (Debian's
    /etc/hosts: 127.0.1.1): listening there would leave the other hosts' ranks knocking until
    their timeout."""
    asked = []

    def refuse(address, **_):
        asked.append(address)
        raise OSError("not for this test")

    monkeypatch.setattr(socket, "create_server", refuse)
    for source in ("torchrun", "slurm", "--gpus"):
        with pytest.raises(RendezvousError, match="^rank 0 cannot listen on 127.0.0.1:29500"):
            share_id(LaunchEnv(0, 8, 0, "127.0.0.1", 29500, source), lambda: b"id", 1.0)
    assert asked == [("", 29500), ("", 29500), ("127.0.0.1", 29500)]


def test_a_master_address_that_is_not_rank_0s_host_is_one_line_at_once():
    started = time.monotonic()
    with pytest.raises(RendezvousError, match=r"^rank 0 cannot listen on 192\.0\.2\.1:29500: 192\.0\.2\.1 is not an "
                                              r"address of this host"):
        share_id(LaunchEnv(0, 2, 0, "192.0.2.1", 29500, "torchrun"), lambda: b"id", 30.0)  # TEST-NET-1
    assert time.monotonic() - started < 5


def test_a_rank_of_another_protocol_version_is_refused_on_both_sides_and_a_stranger_cannot_stop_the_run():
    port = free_port()
    result = {}
    server = threading.Thread(target=lambda: result.update(meet(2, port, ranks=[0])))
    server.start()
    deep = b"[" * 2000 + b"]" * 2000  # valid magic, JSON nested past the parser's recursion limit
    for junk in (MAGIC + struct.pack("!III", 2, 1, len(deep)) + deep, MAGIC + struct.pack("!III", 2, 1, 2) + b"[]"):
        knock(port, junk)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as old:  # a rank of the first protocol
        old.sendall(b"PTXR1" + struct.pack("!II", 2, 1))
        status, size = struct.unpack("!BI", old.recv(5))
        answer = old.recv(size).decode()
    server.join()
    line = f"a rank speaks rendezvous PTXR1, rank 0 {MAGIC.decode()} (another version of ptxgen on its host)"
    assert status == 1 and answer.endswith(line) and str(result[0]).endswith(line)
