"""Every registered kernel, at its representative specs, assembles to an sm_90 cubin (no GPU needed)."""
import pytest

from ptxgen.assemble import AssemblyError, assemble
from ptxgen.registry import kinds
from ptxgen.spec import Target

CASES = [(kind, spec) for kind, cls in kinds().items() for spec in cls.examples()]


@pytest.mark.parametrize("kind, spec", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_registered_kernel_assembles_for_sm90(kind, spec):
    """A cubin, no spills, and no "Potential Performance Loss" from ptxas: e.g. C7509, every wgmma
    of the kernel serialized because it has a call (rcp.rn's and div.rn's slow paths are calls).
    (The model's own specs: tests/test_model_kernels.py.)"""
    result = assemble(spec.emit(Target("sm_90")), spec.arch(Target("sm_90")))
    assert result.cubin[:4] == b"\x7fELF", "nvJitLink did not return an ELF cubin"
    assert result.registers and result.registers > 0
    assert result.spill_stores == 0 and result.spill_loads == 0, result.log
    assert "Potential Performance Loss" not in result.log, result.log


def test_every_registered_kind_is_covered():
    assert {k for k, _ in CASES} == set(kinds())


def test_ptxas_errors_carry_the_log():
    text = kinds()["rope"].examples()[0].emit(Target()).replace("ret;", "bogus.instruction %r1;\n\tret;")
    with pytest.raises(AssemblyError, match="ptxas failed for sm_90"):
        assemble(text, "sm_90")
