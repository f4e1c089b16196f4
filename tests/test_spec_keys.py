import dataclasses
import os

import pytest

from ptxgen.kernels.rmsnorm import RMSNormSpec
from ptxgen.kernels.rope import RopeSpec, RopeTableSpec
from ptxgen.registry import get_kind, kinds
from ptxgen.spec import SpecError, Target, decode_fields, encode_value, generator_fingerprint, spec_key

TARGET = Target()


def test_eps_1e5_and_1e6_give_different_text_and_keys():
    a, b = RMSNormSpec(hidden=896, eps=1e-5), RMSNormSpec(hidden=896, eps=1e-6)
    assert a.emit(TARGET) != b.emit(TARGET)
    assert a.key(TARGET) != b.key(TARGET)
    assert "0f358637BD" in b.emit(TARGET) and "0f3727C5AC" in a.emit(TARGET)


def test_theta_10000_and_1000000_give_different_text_and_keys():
    """The RoPE kernel, and the angles' table the q/k/v GEMM and the attention backward rotate by."""
    for make in (lambda t: RopeSpec(heads=14, head_dim=64, theta=t), lambda t: RopeTableSpec(head_dim=64, theta=t)):
        llama, qwen = make(1e4), make(1e6)
        assert llama.emit(TARGET) != qwen.emit(TARGET)
        assert llama.key(TARGET) != qwen.key(TARGET)


def test_encoding_tells_apart_values_python_calls_equal():
    assert 0.0 == -0.0 and 1 == 1.0  # what a dict or == would conflate
    assert encode_value(0.0) != encode_value(-0.0)
    assert encode_value(1) != encode_value(1.0)
    assert encode_value(1e-5) != encode_value(1e-6)
    assert encode_value(True) != encode_value(1)


def test_an_int_given_for_a_float_field_is_stored_as_that_float():
    # theta=10000 (as HF configs often write it) is the same kernel as theta=10000.0: one key.
    a, b = RopeSpec(heads=2, head_dim=64, theta=10000), RopeSpec(heads=2, head_dim=64, theta=10000.0)
    assert type(a.theta) is float
    assert a.key(TARGET) == b.key(TARGET)


def test_nan_and_infinities_are_rejected():
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(SpecError, match="finite"):
            RMSNormSpec(hidden=896, eps=bad)
    with pytest.raises(SpecError, match="NaN"):
        encode_value(float("nan"))


@pytest.mark.parametrize("make, message", [
    (lambda: RMSNormSpec(hidden=896, eps=0.0), "eps must be > 0"),
    (lambda: RMSNormSpec(hidden=0, eps=1e-6), "hidden must be > 0"),
    (lambda: RMSNormSpec(hidden=896, eps=1e-6, block_size=100), "block_size must be a multiple of 32"),
    (lambda: RMSNormSpec(hidden=1 << 20, eps=1e-6), "values per thread"),
    (lambda: RopeSpec(heads=2, head_dim=63, theta=1e4), "head_dim must be even"),
    (lambda: RopeSpec(heads=2, head_dim=64, theta=-1.0), "theta must be in"),
    (lambda: RMSNormSpec(hidden=896.0, eps=1e-6), "hidden must be int"),
    (lambda: RMSNormSpec(hidden=True, eps=1e-6), "hidden must be int"),
    (lambda: RMSNormSpec(hidden=896, eps=1e-6, save_rstd=1), "save_rstd must be bool"),
])
def test_validation_gives_clear_messages(make, message):
    with pytest.raises(SpecError, match=message):
        make()


def test_key_covers_target_and_ptx_version():
    s = RMSNormSpec(hidden=896, eps=1e-6)
    keys = {s.key(Target("sm_90", (8, 5))), s.key(Target("sm_90a", (8, 5))), s.key(Target("sm_90", (8, 0)))}
    assert len(keys) == 3


def test_key_includes_the_generator_fingerprint(monkeypatch):
    s = RMSNormSpec(hidden=896, eps=1e-6)
    before = spec_key(s, TARGET)
    monkeypatch.setattr("ptxgen.spec.generator_fingerprint", lambda: "0.0.0+edited")
    assert spec_key(s, TARGET) != before


def test_fingerprint_has_version_and_source_digest():
    from ptxgen import __version__
    fp = generator_fingerprint()
    assert fp.startswith(__version__ + "+") and len(fp.split("+")[1]) == 16


def test_key_is_cached_on_the_instance():
    s = RopeSpec(heads=2, head_dim=64, theta=1e4)
    assert s.key(TARGET) is s.key(TARGET)


def test_every_field_of_every_kind_is_in_the_key():
    for kind, cls in kinds().items():
        base = cls.examples()[0]
        for f in dataclasses.fields(base):
            assert f.name in {name for name, _ in base.canonical()["fields"]}, (kind, f.name)


def test_stored_fields_decode_back_to_the_same_spec():
    for cls in kinds().values():
        for s in cls.examples():
            assert cls(**decode_fields(cls, s.canonical()["fields"])) == s


def test_registry_knows_kinds_and_rejects_unknown():
    assert get_kind("rmsnorm") is RMSNormSpec and get_kind("rope") is RopeSpec
    with pytest.raises(SpecError, match="unknown kernel kind 'nope'"):
        get_kind("nope")


def test_same_spec_emitted_twice_with_environment_changed_is_identical(monkeypatch, tmp_path):
    specs = [s for cls in kinds().values() for s in cls.examples()]
    first = [s.emit(TARGET) for s in specs]
    monkeypatch.setenv("PTXGEN_EPS", "1e-5")
    monkeypatch.setenv("ROPE_THETA", "10000")
    monkeypatch.chdir(tmp_path)
    assert [s.emit(TARGET) for s in specs] == first


def test_targets_are_validated():
    with pytest.raises(SpecError, match="arch"):
        Target("sm90")
    with pytest.raises(SpecError, match="PTX version"):
        Target.parse("sm_90", "8")
    assert Target("sm_90a").compute_capability == (9, 0)
    assert os.environ.get("PTXGEN_EPS") is None
