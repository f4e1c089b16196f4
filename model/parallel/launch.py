"""Who this process is in a data-parallel run: one dataclass from whichever launcher started it.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; srun sets SLURM_PROCID,
SLURM_STEP_NUM_TASKS and SLURM_LOCALID (the master's address and port come from MASTER_ADDR and
MASTER_PORT, which the batch script sets). A batch script's own shell is not a launch: sbatch sets
SLURM_PROCID and SLURM_LOCALID (0) and the allocation's SLURM_NTASKS there too, but only srun
starts a step (SLURM_STEP_NUM_TASKS, per Slurm's sbatch(1) and srun(1)). ``ptxgen train --gpus N``
starts its children with torchrun's variables (``LaunchEnv.environ``), so every process reads them
the same way, and with ``PTXGEN_LAUNCHER=--gpus`` so that a child knows its ``--gpus N`` is its
parent's, not a clash with a launcher. Under torchrun, whose agent already listens on MASTER_PORT
(its own store), rank 0 listens on MASTER_PORT + 1. A value that is missing, not an integer, out of
range or inconsistent is one line (``LaunchError``).

Each launch names its run (``run_id``: torchrun's TORCHELASTIC_RUN_ID, Slurm's job and step,
``--gpus N``'s PTXGEN_RUN_ID, which the parent draws): the rendezvous ignores a rank of another
run (another job on the same port) instead of letting it abort this one.

Every rank uses one GPU, its local rank's: ``pin_gpu`` narrows CUDA_VISIBLE_DEVICES to it before
CUDA starts, so the runtime's device 0 is that GPU (NCCL finds the peers by their bus ids).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")  # an srun step's
LOCALHOST = "127.0.0.1"
LAUNCHER = "PTXGEN_LAUNCHER"  # set to "--gpus" in the children of ``ptxgen train --gpus N``
RUN_ID = "PTXGEN_RUN_ID"  # the run ``ptxgen train --gpus N`` started, in its children


class LaunchError(ValueError):
    """A launch environment that cannot start a run; one line (the CLI exits 2)."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world: int
    local_rank: int  # the GPU this process uses on its host
    master_addr: str  # where rank 0 listens for the rendezvous
    master_port: int
    source: str  # "torchrun", "slurm" or "--gpus": named in errors
    run_id: str = ""  # which run: the launcher's name for it (the same on every rank of it)

    def __post_init__(self) -> None:
        if self.world < 1:
            raise LaunchError(f"{self.source}: the world size must be at least 1, got {self.world}")
        if not 0 <= self.rank < self.world:
            raise LaunchError(f"{self.source}: rank {self.rank} is outside 0..{self.world - 1} (world size {self.world})")
        if not 0 <= self.local_rank < self.world:
            raise LaunchError(f"{self.source}: local rank {self.local_rank} is outside 0..{self.world - 1}")
        if self.local_rank > self.rank:  # a local rank counts the same host's lower ranks: never more than the rank
            raise LaunchError(f"{self.source}: local rank {self.local_rank} is above rank {self.rank}")
        if not self.master_addr or any(c.isspace() for c in self.master_addr):
            raise LaunchError(f"{self.source}: the master address {self.master_addr!r} is not a host name or address")
        if not 1 <= self.master_port <= 65535:
            raise LaunchError(f"{self.source}: the master port {self.master_port} is outside 1..65535")

    @classmethod
    def local(cls, rank: int, world: int, port: int, run_id: str = "") -> "LaunchEnv":
        """Rank ``rank`` of ``ptxgen train --gpus world`` on this host."""
        return cls(rank, world, rank, LOCALHOST, port, "--gpus", run_id)

    def environ(self) -> dict[str, str]:
        """torchrun's variables for this rank: what ``--gpus N`` hands each child it starts."""
        env = dict(zip(TORCHRUN, (str(self.rank), str(self.world), str(self.local_rank), self.master_addr,
                                  str(self.master_port))))
        if self.source == "--gpus":
            env[LAUNCHER], env[RUN_ID] = "--gpus", self.run_id
        return env

    def pin_gpu(self, environ: dict[str, str]) -> str:
        """Narrow ``environ``'s CUDA_VISIBLE_DEVICES to this rank's GPU (the local rank's entry of
        the list it had, or the local rank's ordinal) and return it; call before CUDA starts. Under
        srun a list of one is the rank's own already (--gpus-per-task=1 binds one GPU per task);
        under torchrun it is the host's one GPU, local rank 0's alone."""
        listed = environ.get("CUDA_VISIBLE_DEVICES")
        choices = [d.strip() for d in listed.split(",") if d.strip()] if listed is not None else None
        if choices is not None and len(choices) == 1 and self.source == "slurm":
            environ["CUDA_VISIBLE_DEVICES"] = choices[0]
            return choices[0]
        if choices is not None and self.local_rank >= len(choices):
            raise LaunchError(f"{self.source}: local rank {self.local_rank} has no GPU: CUDA_VISIBLE_DEVICES="
                              f"{listed!r} lists {len(choices)}")
        gpu = choices[self.local_rank] if choices is not None else str(self.local_rank)
        environ["CUDA_VISIBLE_DEVICES"] = gpu
        return gpu


def _integer(env: Mapping[str, str], name: str, source: str) -> int:
    value = env[name].strip()
    if not value.isdigit() or not value.isascii() or len(value) > 9:  # no sign, no spaces inside, no '1e3'
        shown = env[name] if len(env[name]) <= 40 else env[name][:20] + f"... ({len(env[name])} characters)"
        raise LaunchError(f"{source}: {name}={shown!r} is not a non-negative integer below 10^9")
    return int(value)


def _require(env: Mapping[str, str], names: tuple[str, ...], source: str) -> None:
    missing = [n for n in names if n not in env]
    if missing:
        raise LaunchError(f"{source}: {', '.join(missing)} not set (a {source} launch sets {', '.join(names)})")


def from_environ(env: Mapping[str, str]) -> LaunchEnv | None:
    """The launch this environment describes, or None for a plain single process.

    torchrun's variables win when both are present (srun starting torchrun sets both, and then
    SLURM's describe the launcher, not the trainer)."""
    if any(n in env for n in TORCHRUN[:3]):
        source = "torchrun"
        _require(env, TORCHRUN, source)
        rank, world, local = (_integer(env, n, source) for n in TORCHRUN[:3])
    elif "SLURM_STEP_NUM_TASKS" in env:  # a step srun started (not a batch script's own shell)
        source = "slurm"
        _require(env, SLURM, source)
        rank, world, local = (_integer(env, n, source) for n in SLURM)
        if world == 1 and rank == 0 and "MASTER_ADDR" not in env:
            return None  # a one-task job: nobody to meet
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise LaunchError("slurm: MASTER_ADDR and MASTER_PORT must be set (say, the first host of "
                              "$SLURM_JOB_NODELIST and a free port) for the ranks to meet")
    else:
        return None
    if source == "torchrun" and env.get(LAUNCHER) == "--gpus":
        source = "--gpus"
    port = _integer(env, "MASTER_PORT", source)
    if source == "torchrun" and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        port += 1  # torchrun's agent serves its own store on MASTER_PORT: the ranks meet on the next port
    run_id = {"torchrun": env.get("TORCHELASTIC_RUN_ID", ""), "--gpus": env.get(RUN_ID, ""),
              "slurm": ".".join(env[n] for n in ("SLURM_JOB_ID", "SLURM_STEP_ID") if n in env)}[source]
    return LaunchEnv(rank, world, local, env["MASTER_ADDR"].strip(), port, source, run_id)
