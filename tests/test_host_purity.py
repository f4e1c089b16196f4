"""Emission is fixed by the spec alone: the same PTX on every host (golden digests), whatever numpy's
CPU dispatch, the decimal context or the libm; immediates derived from fields are exactly rounded."""
import decimal
import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from model import golden as model_golden
from ptxgen import exact, golden
from ptxgen.kernels import rope
from ptxgen.kernels.attention import AttentionSpec
from ptxgen.kernels.rope import RopeSpec, frequency_table
from ptxgen.keyaudit import check_source, numpy_dispatched_features, scan_source
from ptxgen.spec import Target

ROOT = Path(__file__).resolve().parents[1]


def changed_specs(findings):
    return "\n".join(str(f) for f in findings)


def test_every_golden_digest_matches_this_host():
    findings = golden.check()
    assert not findings, f"PTX differs from the golden digests for:\n{changed_specs(findings)}"


def test_the_golden_file_covers_every_example_and_every_preset_kernel():
    findings = model_golden.coverage()
    assert not findings, changed_specs(findings)


def test_a_host_dependent_frequency_table_fails_the_golden_check(monkeypatch):
    """Planted: one frequency off by an ulp, as numpy's SVML power gave on the AVX-512 GPU host."""
    exact_table = rope.frequency_table

    def one_ulp_off(head_dim, theta):
        t = list(exact_table(head_dim, theta))
        t[-1] = math.nextafter(t[-1], math.inf)
        return tuple(t)

    monkeypatch.setattr(rope, "frequency_table", one_ulp_off)
    findings = golden.check()
    # every spec that bakes the table: the RoPE kernels and the angles' table of the q/k/v GEMM's RoPE
    assert findings and all(f.subject.startswith(("RopeSpec", "RopeTableSpec")) for f in findings)
    ropes = [e for e in golden.read() if e["kind"].endswith(("RopeSpec", "RopeTableSpec"))]
    assert len(findings) == len(ropes)


def correctly_rounded_power(value: float, theta: float, num: int, den: int) -> bool:
    """value is the f64 nearest theta**(num/den): the exact root of value's rounding interval ends
    bracket it. Pure rational arithmetic, independent of exact.power."""
    if num == 0:
        return value == 1.0
    lo = (Fraction(math.nextafter(value, 0)) + Fraction(value)) / 2
    hi = (Fraction(math.nextafter(value, math.inf)) + Fraction(value)) / 2
    t = Fraction(theta)
    # value ~ t**(num/den)  <=>  value**den ~ t**num (den > 0; both sides positive and monotone)
    return lo ** den < t ** num < hi ** den


@pytest.mark.parametrize("head_dim, theta", [(6, 1e4), (64, 1e6), (128, 5e5), (64, 1e4), (96, 1234567.0), (2, 3.0)])
def test_rope_frequencies_are_the_nearest_f64_to_the_exact_power(head_dim, theta):
    for i, f in enumerate(frequency_table(head_dim, theta)):
        g = math.gcd(2 * i, head_dim)
        assert correctly_rounded_power(f, theta, -2 * i // g, head_dim // g), (head_dim, theta, i, f)


def test_derived_constants_are_rounded_once_from_the_exact_value():
    assert exact.f64(exact.LOG2E) == 1.4426950408889634 and exact.LN2_F32 == float(np.float32(math.log(2)))
    assert rope.TWO_PI == 2 * math.pi and rope.TWO_PI_LO == 2.4492935982947064e-16
    assert AttentionSpec(heads=2, kv_heads=1, head_dim=80).scale == float(np.float32(1 / math.sqrt(80)))
    # f32 rounding by integers: ties to even, subnormals, overflow
    assert exact.f32(Fraction(1) + Fraction(1, 2 ** 24)) == 1.0
    assert exact.f32(Fraction(1) + Fraction(3, 2 ** 24)) == 1.0 + 2 ** -22
    assert exact.f32(Fraction(1, 2 ** 149)) == 2.0 ** -149 and exact.f32(Fraction(1, 2 ** 151)) == 0.0
    with pytest.raises(OverflowError):
        exact.f32(2 ** 128)


def test_the_callers_decimal_context_cannot_reach_the_ptx():
    spec = RopeSpec(heads=2, head_dim=64, theta=1e6)
    before = spec.emit(Target())
    with decimal.localcontext(decimal.Context(prec=3, rounding=decimal.ROUND_DOWN)):
        assert RopeSpec(heads=2, head_dim=62, theta=1e6).emit(Target()) != before  # emits at all
        assert spec.emit(Target()) == before


@pytest.mark.parametrize("disable", ["none", "all dispatched", "the widest"])
def test_numpy_cpu_dispatch_cannot_change_the_text(disable):
    """A child process with numpy's SIMD dispatch cut down (as a 2-core CI host differs from an
    AVX-512 GPU host, where numpy's power goes through SVML) emits the golden digests for every
    RoPE, attention and RMSNorm spec."""
    features = numpy_dispatched_features()
    disabled = {"none": "", "all dispatched": " ".join(features), "the widest": " ".join(features[-1:])}[disable]
    code = ("import json; from ptxgen import golden; "
            "es=[e for e in golden.read() if e['kind'].rsplit('.',1)[1].startswith(('Rope','Attention','RMSNorm'))]; "
            "import ptxgen.spec as s; out=[]\n"
            "for e in es:\n  spec,t=golden.rebuild(e); out.append(s.sha256_hex(spec.emit(t))==e['ptx_sha256'])\n"
            "print(json.dumps([len(out), all(out)]))")
    env = dict(os.environ, NPY_DISABLE_CPU_FEATURES=disabled, PYTHONPATH=str(ROOT))
    child = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    n, same = json.loads(child.stdout.strip().splitlines()[-1])
    assert n > 10 and same


def test_the_generator_calls_no_host_dependent_math():
    assert [f for f in check_source(ROOT, packages=("ptxgen",)) if "host" in f.message] == []


def test_a_library_power_in_an_emitter_is_reported(tmp_path):
    """Planted: the RoPE table as it was (numpy's vector power), and a libm log; references may."""
    source = tmp_path / "ptxgen" / "kernels" / "bad.py"
    source.parent.mkdir(parents=True)
    source.write_text("import math\nimport numpy as np\n"
                      "def table(d, theta):\n    return theta ** -(np.arange(0, d, 2) / d)\n"
                      "LOG2E = 1.0 / math.log(2.0)\n"
                      "def bad_reference(x):\n    return np.exp(x) ** 2\n")
    findings = scan_source(source, source.relative_to(tmp_path))
    assert sorted(f.subject for f in findings) == ["ptxgen/kernels/bad.py:4", "ptxgen/kernels/bad.py:5"]


def test_the_other_spellings_of_a_library_power_are_reported_too(tmp_path):
    source = tmp_path / "ptxgen" / "kernels" / "evade.py"
    source.parent.mkdir(parents=True)
    source.write_text("from math import exp\nfrom numpy import power as pw\n"
                      "def a(theta, d):\n    return pow(theta, -2.0 / d)\n"
                      "def b(x):\n    return x.__pow__(0.5)\n")
    findings = scan_source(source, source.relative_to(tmp_path))
    assert sorted(int(f.subject.rsplit(":", 1)[1]) for f in findings) == [1, 2, 4, 6]


@pytest.mark.cuda
def test_golden_digests_hold_on_the_gpu_host():
    """The same check on the GPU machine (`pytest -m cuda` selects it): two hosts, one text."""
    findings = golden.check() + model_golden.coverage()
    assert not findings, f"PTX on the GPU host differs from the golden digests for:\n{changed_specs(findings)}"


def test_the_audit_golden_check_passes_and_catches_a_planted_host_dependence(monkeypatch, capsys):
    from runtime.audit import main as audit_main

    assert audit_main(["--check", "golden"]) == 0
    exact_table = rope.frequency_table
    monkeypatch.setattr(rope, "frequency_table",
                        lambda d, theta: tuple(math.nextafter(f, 0) for f in exact_table(d, theta)))
    capsys.readouterr()
    assert audit_main(["--check", "golden"]) == 1
    assert "[golden] RopeSpec(" in capsys.readouterr().out
