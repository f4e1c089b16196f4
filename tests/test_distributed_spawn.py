"""``ptxgen train --gpus N``'s parent (model/parallel/spawn.py): N children of one command, each with
its rank's torchrun variables, watched as one run. A rank that fails stops the others at once (a
peer blocked in a collective would wait for ever) and the parent says which, in one line, with
that rank's exit code. Stand-in children (small Python scripts) play the ranks."""
import json
import os
import sys
import time

import pytest

from model.parallel.launch import from_environ
from model.parallel.spawn import spawn_ranks


def ranks(script: str) -> list[str]:
    return [sys.executable, "-c", script]


def run(world, script, environ=None, grace=5.0):
    said = []
    started = time.monotonic()
    code = spawn_ranks(world, ranks(script), environ if environ is not None else {"PATH": "/usr/bin:/bin"},
                       say=said.append, grace=grace)
    return code, said, time.monotonic() - started


def test_every_rank_gets_its_torchrun_variables_and_nvls_off(tmp_path):
    script = f"import json, os; json.dump(dict(os.environ), open(r'{tmp_path}/' + os.environ['RANK'], 'w'))"
    code, said, _ = run(3, script)
    assert (code, said) == (0, [])
    envs = [json.loads((tmp_path / str(r)).read_text()) for r in range(3)]
    launches = [from_environ(env) for env in envs]
    assert [(e.rank, e.world, e.local_rank, e.source) for e in launches] == [(r, 3, r, "--gpus") for r in range(3)]
    assert len({e.master_port for e in launches}) == 1 and all(env["NCCL_NVLS_ENABLE"] == "0" for env in envs)


def test_a_users_nccl_setting_is_kept(tmp_path):
    script = f"import os; open(r'{tmp_path}/nvls', 'w').write(os.environ['NCCL_NVLS_ENABLE'])"
    assert run(1, script, {"NCCL_NVLS_ENABLE": "1"})[0] == 0 and (tmp_path / "nvls").read_text() == "1"


def failing_rank_run(tmp_path):
    """Rank 1 exits 3 once ranks 0 and 2 are up (their pids written down: on a loaded host a rank
    can start after another has failed); they would sleep a minute."""
    script = (f"import os, sys, time\n"
              f"open(r'{tmp_path}/' + os.environ['RANK'] + '.tmp', 'w').write(str(os.getpid()))\n"
              f"os.replace(r'{tmp_path}/' + os.environ['RANK'] + '.tmp', r'{tmp_path}/' + os.environ['RANK'])\n"
              f"while os.environ['RANK'] == '1' and not all(os.path.exists(r'{tmp_path}/' + r) for r in '02'):\n"
              f"    time.sleep(0.01)\n"
              f"sys.exit(3) if os.environ['RANK'] == '1' else time.sleep(60)")
    code, said, took = run(3, script)
    alive = [r for r in (0, 2) if (tmp_path / str(r)).exists() and running(int((tmp_path / str(r)).read_text()))]
    return code, said, took, alive


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def check_failing_rank_run(code, said, took, alive) -> None:
    assert code == 3 and said == ["ptxgen train: rank 1 of 3 exited with code 3; stopped ranks 0, 2"]
    assert took < 30 and alive == []  # not the sleepers' 60 s, and no sleeper left behind


def test_a_failing_rank_stops_the_others_and_is_named_in_one_line(tmp_path):
    check_failing_rank_run(*failing_rank_run(tmp_path))


def test_planted_a_parent_that_leaves_the_others_running_is_caught(tmp_path, monkeypatch):
    """A parent that names the failed rank but does not stop the others returns as fast, with the
    same line; the check still catches it: the sleepers are alive."""
    import model.parallel.spawn as spawn
    monkeypatch.setattr(spawn, "_stop", lambda ranks, grace, sig=None: None)
    outcome = failing_rank_run(tmp_path)
    try:
        with pytest.raises(AssertionError):
            check_failing_rank_run(*outcome)
    finally:
        for r in outcome[3]:
            os.kill(int((tmp_path / str(r)).read_text()), 9)


def test_a_rank_that_ignores_the_stop_is_killed_after_the_grace():
    script = ("import os, signal, sys, time\n"
              "if os.environ['RANK'] == '0': sys.exit(1)\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "time.sleep(60)")
    code, said, took = run(2, script, grace=1.0)
    assert code == 1 and said == ["ptxgen train: rank 0 of 2 exited with code 1; stopped rank 1"] and took < 30


def test_a_rank_killed_by_a_signal_reports_128_plus_the_signal():
    script = "import os, signal, time; os.kill(os.getpid(), signal.SIGKILL) if os.environ['RANK'] == '0' else None"
    code, said, _ = run(2, script)
    assert code == 128 + 9 and said[0].startswith("ptxgen train: rank 0 of 2 exited with code 137")


@pytest.mark.parametrize("world", [1, 4])
def test_ranks_that_all_finish_are_a_finished_run(world):
    assert run(world, "pass")[:2] == (0, [])


PARENT = """
import sys
from model.parallel.spawn import spawn_ranks
script = ("import os, time\\n"
          "open(os.path.join({tmp!r}, os.environ['RANK']), 'w').write(str(os.getpid()))\\n"
          "time.sleep(60)")
sys.exit(spawn_ranks(2, [sys.executable, "-c", script], {{"PATH": "/usr/bin:/bin"}}, grace=2.0))
"""


def parent_of_sleepers(tmp_path):
    import subprocess
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(tmp=str(tmp_path))], stderr=subprocess.PIPE,
                              text=True)
    deadline = time.monotonic() + 30
    while not all((tmp_path / r).exists() and (tmp_path / r).read_text() for r in "01"):
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.05)
    return parent, [int((tmp_path / r).read_text()) for r in "01"]


def gone_within(pids, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(running(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP"])
def test_a_parent_told_to_stop_stops_its_ranks(tmp_path, how):
    import signal
    parent, pids = parent_of_sleepers(tmp_path)
    parent.send_signal(getattr(signal, how))
    _, err = parent.communicate(timeout=30)
    assert parent.returncode == 128 + getattr(signal, how)
    assert err.strip().splitlines()[-1] == f"ptxgen train: {how} received; stopped 2 ranks"
    assert gone_within(pids, 10)


def test_a_parent_killed_outright_takes_its_ranks_with_it(tmp_path):
    parent, pids = parent_of_sleepers(tmp_path)
    parent.kill()
    parent.wait()
    try:
        assert gone_within(pids, 10)
    finally:
        for pid in pids:
            if running(pid):
                os.kill(pid, 9)
