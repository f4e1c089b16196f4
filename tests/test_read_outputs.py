"""A kernel's ``read_outputs`` (the outputs whose contents from before the launch it reads) are
exactly the outputs its PTX loads from, for every registered kernel at its examples: a launch
plan's readers (``Plan.readers``) then include the steps that update a buffer in place (an
accumulating GEMM, AdamW, the tied embedding's backward, the counts a kernel's blocks hand on).

The loads are found by following each pointer parameter through the registers computed from it
(every instruction's destination takes its sources' parameters) to the addresses of global loads,
atomics, cp.async and TMA loads."""
import re

import pytest

from ptxgen.registry import kinds
from ptxgen.spec import Target
from ptxsim import Program

CASES = [(kind, spec) for kind, cls in sorted(kinds().items()) for spec in cls.examples()]
# outputs written and read back by the same launch (a cut tail's parts, the column sums' chunk
# partials): what was there before it is never read
WORKSPACES = {("gemm_wgmma", "partials"), ("colsum", "partials")}
NO_DESTINATION = ("st", "red", "bar", "bra", "fence", "ret", "cp", "mbarrier", "wgmma", "prefetch")
# the copies the kernels emit (a new form fails the test until it is read here)
COPIES = ("cp.async.cg.shared.global", "cp.async.commit_group", "cp.async.wait_group", "cp.async.bulk.tensor",
          "cp.async.bulk.commit_group", "cp.async.bulk.wait_group")


def loaded_parameters(ptx: str) -> set[str]:
    """The parameters whose pointers reach a load's address."""
    program = Program(ptx)
    taint: dict[str, set[str]] = {}
    changed = True
    while changed:  # to a fixed point: loops carry registers backwards
        changed = False
        for _, op, ops in program.instrs:
            regs = [re.findall(r"%\w+", o) for o in ops]
            if op[:2] == ["ld", "param"]:
                sources = {re.search(r"_param_(\w+)\]", ops[1])[1]}
            elif op[0] in NO_DESTINATION or not regs:
                continue
            else:
                sources = set().union(*(taint.get(r, set()) for rs in regs[1:] for r in rs))
            for r in regs[0]:
                if not sources <= taint.setdefault(r, set()):
                    taint[r] |= sources
                    changed = True
    loaded: set[str] = set()
    for _, op, ops in program.instrs:
        name = ".".join(op)
        if op[0] in ("ld", "atom", "red"):  # a state space this test reads (not a generic address)
            assert {"global", "shared", "param"} & set(op), f"a memory access this test does not read: {name}"
        elif op[0] in ("cp", "prefetch"):
            assert name.startswith(COPIES), f"a memory access this test does not read: {name}"
        if op[0] in ("ld", "atom") and "global" in op or name.startswith("cp.async.cg.shared.global"):
            address = ops[1]
        elif op[0] == "red":
            address = ops[0]
        elif name.startswith("cp.async.bulk") and "shared::cluster.global" in name:
            address = ops[1]  # a bulk / TMA load (shared <- global): [tensor map, {coordinates}]
        else:
            continue
        for r in re.findall(r"%\w+", address):
            loaded |= taint.get(r, set())
    return loaded


def test_the_walk_finds_a_tma_kernels_operand_maps_and_a_plain_kernels_pointers():
    from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
    from ptxgen.kernels.rmsnorm import RMSNormSpec
    tma = GemmWgmmaSpec(tma=True, block_n=128, pingpong=True, tma_store=True, bf16_out=True)
    assert {"tmap_a", "tmap_b"} <= loaded_parameters(tma.emit(Target("sm_90"))) and tma.c_param not in \
        loaded_parameters(tma.emit(Target("sm_90")))  # stored by TMA, never loaded
    assert "x" in loaded_parameters(RMSNormSpec(hidden=64, eps=1e-6).emit(Target("sm_90")))


@pytest.mark.parametrize("kind, spec", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_read_outputs_are_the_outputs_a_kernel_loads_from(kind, spec):
    loaded = loaded_parameters(spec.emit(Target("sm_90"))) & set(spec.outputs())
    assert set(spec.read_outputs()) <= set(spec.outputs())
    assert loaded - {name for k, name in WORKSPACES if k == kind} == set(spec.read_outputs()), spec
