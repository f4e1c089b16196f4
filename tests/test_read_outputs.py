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
        if op[0] in ("ld", "atom") and "global" in op or (op[0] == "cp" and "global" in name and "bulk" not in name):
            address = ops[1]
        elif op[0] == "red":
            address = ops[0]
        elif name.startswith("cp.async.bulk.tensor") and ".global.mbarrier" in name:
            address = ops[1]  # a TMA load (shared <- global): [tensor map, {coordinates}]
        else:
            continue
        for r in re.findall(r"%\w+", address):
            loaded |= taint.get(r, set())
    return loaded


@pytest.mark.parametrize("kind, spec", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_read_outputs_are_the_outputs_a_kernel_loads_from(kind, spec):
    loaded = loaded_parameters(spec.emit(Target("sm_90"))) & set(spec.outputs())
    assert set(spec.read_outputs()) <= set(spec.outputs())
    assert loaded - {name for k, name in WORKSPACES if k == kind} == set(spec.read_outputs()), spec
