"""A spec's identity is its bits, everywhere: ==, sets, dedup, the memoized key, pickling, copying,
spec classes defined outside the generator, and what validation lets through."""
import copy
import dataclasses
import pickle
import runpy
import shutil
import signal
import subprocess
import sys

import pytest

from model.config import preset
from model.kernels import ModelKernels
from model.optim import AdamWSettings
from model.reference import IGNORE_INDEX
from ptxgen.builder import PtxBuildError
from ptxgen.kernels.adamw import AdamWSpec, GradNormFinalSpec
from ptxgen.kernels.attention import AttentionSpec
from ptxgen.kernels.cross_entropy import CrossEntropySpec
from ptxgen.kernels.rmsnorm import RMSNormSpec
from ptxgen.kernels.rope import RopeSpec
from ptxgen.registry import kinds
from ptxgen.spec import PACKAGE_ROOT, SpecError, Target
from ptxgen.specdiff import explain_miss, field_differences
from runtime.cache import KeyCollisionError, record_text

TARGET = Target()
ADAMW = dict(beta1=0.9, beta2=0.95, eps=1e-8)


# -- 2. compare and deduplicate by bits ----------------------------------------------------------
def test_specs_python_calls_equal_but_whose_bits_differ_are_different_specs():
    decay, no_decay = AdamWSpec(**ADAMW, weight_decay=-0.0), AdamWSpec(**ADAMW, weight_decay=0.0)
    assert decay.key(TARGET) != no_decay.key(TARGET)
    assert decay != no_decay and no_decay not in [decay] and len({decay, no_decay}) == 2
    assert AdamWSpec(**ADAMW, weight_decay=0.0) == no_decay and hash(AdamWSpec(**ADAMW, weight_decay=0.0)) == hash(no_decay)


def unprewarmed(kernels: ModelKernels, prewarm_list) -> list:
    """The specs the model runs (every field of its kernel set) whose key is not pre-warmed."""
    prewarmed = {s.key(TARGET) for s in prewarm_list}
    runs = [s for f in dataclasses.fields(kernels) for v in [getattr(kernels, f.name)]
            for s in (v.specs() if hasattr(v, "specs") else [v] if v is not None else [])]
    return [s for s in runs if s.key(TARGET) not in prewarmed]


def test_weight_decay_minus_zero_keeps_both_adamw_specs_in_the_prewarm_set():
    """`ptxgen train --weight-decay -0.0`: every spec the model runs is in what it pre-warms."""
    kernels = ModelKernels.of(preset("tiny"), AdamWSettings(weight_decay=-0.0), IGNORE_INDEX)
    assert unprewarmed(kernels, kernels.specs()) == []
    assert len({s.key(TARGET) for s in kernels.specs()}) == len(kernels.specs())


def test_a_prewarm_set_deduplicated_by_python_equality_is_caught():
    """Planted: the old dedup (Python == on the field values: -0.0 == 0.0) drops a spec the model runs."""
    kernels = ModelKernels.of(preset("tiny"), AdamWSettings(weight_decay=-0.0), IGNORE_INDEX)
    by_equality = []
    for s in kernels.specs():
        if not any(type(s) is type(t) and tuple(s.fields().values()) == tuple(t.fields().values()) for t in by_equality):
            by_equality.append(s)
    assert unprewarmed(kernels, by_equality) == [kernels.adamw_no_decay]


# -- 3. the memoized key never disagrees with the fields -----------------------------------------
def key_matches_fields(spec, key_of) -> bool:
    """Whether ``key_of(spec)`` is the key of a spec freshly built from ``spec``'s current fields."""
    return key_of(spec) == type(spec)(**spec.fields()).key(TARGET)


def test_a_key_memo_is_caught_when_the_fields_change_under_it():
    """Planted: a field changed under a memoized key (through the instance dict, which only
    deliberate tampering reaches now) leaves the old memo stale, and the check sees it."""
    spec = RMSNormSpec(hidden=896, eps=1e-6)
    memo = {}
    key_of = lambda s: memo.setdefault(id(s), s.key(TARGET))  # noqa: E731 - the old memo, per instance
    assert key_matches_fields(spec, key_of)
    spec.__dict__["eps"] = 1e-5
    assert not key_matches_fields(spec, key_of)


def test_a_spec_cannot_be_changed_behind_the_frozen_dataclass():
    """`object.__setattr__(spec, "eps", 1e-5)` after key() used to leave the old key with the new eps."""
    spec = RMSNormSpec(hidden=896, eps=1e-6)
    key, text = spec.key(TARGET), spec.emit(TARGET)
    for name, value in (("eps", 1e-5), ("eps", -0.0), ("hidden", 64), ("dtype", "bf16")):
        with pytest.raises(AttributeError, match="a spec is immutable once built"):
            object.__setattr__(spec, name, value)
    with pytest.raises(AttributeError):
        object.__delattr__(spec, "eps")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.eps = 1e-5
    assert spec.eps == 1e-6 and spec.key(TARGET) == key and spec.emit(TARGET) == text
    assert key_matches_fields(spec, lambda s: s.key(TARGET))
    assert RMSNormSpec.block_size == 256  # the class attribute is still the default


def test_a_pickled_or_copied_spec_carries_no_key():
    spec = RopeSpec(heads=2, head_dim=64, theta=1e6)
    key = spec.key(TARGET)
    blob = pickle.dumps(spec)
    assert key.encode() not in blob and key[:16].encode() not in blob
    for other in (pickle.loads(blob), copy.copy(spec), copy.deepcopy(spec)):
        assert other == spec and other._keys == {} and other._keys is not spec._keys
        assert other.key(TARGET) == key
    with pytest.raises(AttributeError, match="immutable"):
        object.__setattr__(copy.copy(spec), "theta", 1e4)


# -- 4. spec classes outside the generator have their source in the key --------------------------
SCRIPT = '''
from dataclasses import dataclass
from typing import ClassVar
from ptxgen.builder import T
from ptxgen.spec import KernelSpec

@dataclass(frozen=True)
class Peak(KernelSpec):
    kind: ClassVar[str] = "peak"
    n: int = 1

    def params(self):
        return (("out", T.U64),)

    def build(self, b):
        b.mov({value}, T.U32)

SPEC = Peak()
'''


def test_two_scripts_defining_main_peak_get_different_keys(tmp_path):
    specs = []
    for value in (1, 2):
        path = tmp_path / f"script{value}.py"
        path.write_text(SCRIPT.format(value=value))
        specs.append(runpy.run_path(str(path), run_name="__main__")["SPEC"])
    a, b = specs
    assert type(a).__qualname__ == type(b).__qualname__ == "Peak" and type(a).__module__ == "__main__"
    assert a.emit(TARGET) != b.emit(TARGET)
    assert a.key(TARGET) != b.key(TARGET)


def keys_and_texts(tmp_path, monkeypatch, script_text: str, module: str) -> list[tuple[str, str]]:
    """(key, PTX) of the script's SPEC with ``module``.VALUE set to 1, then to 2 (the module re-imported)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    script = tmp_path / f"{module}_script.py"
    script.write_text(script_text)
    seen = []
    for value in (1, 2):
        (tmp_path / f"{module}.py").write_text(f"VALUE = {value}\n")
        monkeypatch.delitem(__import__("sys").modules, module, raising=False)
        spec = runpy.run_path(str(script), run_name="__main__")["SPEC"]
        seen.append((spec.key(TARGET), spec.emit(TARGET)))
    return seen


def test_a_helper_module_the_build_calls_is_in_the_key(tmp_path, monkeypatch):
    (k1, text1), (k2, text2) = keys_and_texts(
        tmp_path, monkeypatch, SCRIPT.replace("b.mov({value}, T.U32)", "b.mov(peak_helper_mod.VALUE, T.U32)")
        .replace("from ptxgen.spec import KernelSpec", "from ptxgen.spec import KernelSpec\nimport peak_helper_mod"),
        "peak_helper_mod")
    assert text1 != text2 and k1 != k2


def test_what_a_class_outside_the_generator_reads_at_build_time_is_in_its_key(tmp_path, monkeypatch):
    """A constant of another module, an import inside build(), a class made by type(): nothing a
    source fingerprint sees. Such a class's key carries the digest of its text, so one key is one text."""
    (k1, text1), (k2, text2) = keys_and_texts(
        tmp_path, monkeypatch,
        SCRIPT.replace("b.mov({value}, T.U32)", "from late_table import VALUE\n        b.mov(VALUE, T.U32)"),
        "late_table")
    assert text1 != text2 and k1 != k2
    from ptxgen.builder import T
    from ptxgen.spec import KernelSpec
    made = [dataclasses.dataclass(frozen=True)(type("Peak", (KernelSpec,), {
        "__module__": __name__, "kind": "peak", "params": lambda self: (("out", T.U64),),
        "build": lambda self, b, v=v: b.mov(v, T.U32)}))() for v in (1, 2)]
    assert made[0].emit(TARGET) != made[1].emit(TARGET) and made[0].key(TARGET) != made[1].key(TARGET)


def test_a_float_subclass_in_a_field_is_stored_as_the_float_it_is():
    class Liar(float):
        def hex(self):
            return (1e-5).hex()
    spec = RMSNormSpec(hidden=64, eps=Liar(1e-3))
    assert type(spec.eps) is float and spec.key(TARGET) != RMSNormSpec(hidden=64, eps=1e-5).key(TARGET)


def test_a_spec_class_made_by_a_factory_is_refused_at_key_time():
    from ptxgen.builder import T
    from ptxgen.spec import KernelSpec

    def make(value):
        @dataclasses.dataclass(frozen=True)
        class Made(KernelSpec):
            kind = "made"

            def params(self):
                return (("out", T.U64),)

            def build(self, b):
                b.mov(value, T.U32)

        return Made()

    one, two = make(1), make(2)
    assert one.emit(TARGET) != two.emit(TARGET)
    with pytest.raises(SpecError, match="inside a function"):
        one.key(TARGET)


# -- 5. validation lets through only values whose PTX means the field ---------------------------
@pytest.mark.parametrize("make, message", [
    (lambda: RMSNormSpec(hidden=896, eps=1e-50), "smallest normal f32"),      # f32 zero
    (lambda: RMSNormSpec(hidden=896, eps=1e-40), "smallest normal f32"),      # f32 subnormal
    (lambda: RMSNormSpec(hidden=896, eps=1e39), "overflows f32"),
    (lambda: AdamWSpec(beta1=0.9, beta2=0.95, eps=1e-50, weight_decay=0.1), "smallest normal f32"),
    (lambda: AdamWSpec(beta1=0.9, beta2=1 - 1e-10, eps=1e-8, weight_decay=0.1), "rounds to 1 in f32"),
    (lambda: AdamWSpec(beta1=1e-45, beta2=0.95, eps=1e-8, weight_decay=0.1), "smallest normal f32"),
    (lambda: AdamWSpec(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=1e-45), "smallest normal f32"),
    (lambda: RopeSpec(heads=2, head_dim=2**20, theta=1e6), "head_dim must be <="),
    (lambda: RopeSpec(heads=2, head_dim=64, theta=0.5), "theta must be in"),
    (lambda: RopeSpec(heads=2, head_dim=64, theta=1e308), "theta must be in"),
    (lambda: GradNormFinalSpec(partials=2**20), "partials must be <="),
    (lambda: AttentionSpec(heads=2**17, kv_heads=1, head_dim=64), "heads must be <="),
    (lambda: CrossEntropySpec(vocab=2**31), "vocab must be <="),
    (lambda: CrossEntropySpec(vocab=256, ignore_index=2**31), "ignore_index"),
])
def test_values_whose_ptx_would_not_mean_the_field_are_refused(make, message):
    with pytest.raises(SpecError, match=message):
        make()


class _Slow(Exception):
    pass


def test_every_size_field_of_every_kind_is_bounded():
    """Huge values of every int field of every kind: refused by validation, or emitted quickly and
    without the builder finding an immediate out of range (the validation's job)."""

    def alarm(*_):
        raise _Slow

    previous = signal.signal(signal.SIGALRM, alarm)
    slow = []
    try:
        for kind, cls in kinds().items():
            base = cls.examples()[0]
            for f in dataclasses.fields(base):
                value = getattr(base, f.name)
                if type(value) is not int:
                    continue
                for huge in sorted({value * 4096, 2**31, 2**40}):
                    try:
                        spec = dataclasses.replace(base, **{f.name: huge})
                    except SpecError:
                        continue
                    signal.setitimer(signal.ITIMER_REAL, 2.0)
                    try:
                        spec.emit(TARGET)
                    except _Slow:
                        slow.append(f"{kind}.{f.name}={huge}: emit takes over 2 s")
                    except PtxBuildError as e:
                        slow.append(f"{kind}.{f.name}={huge}: accepted, then {e}")
                    finally:
                        signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert not slow, "\n".join(slow)


# -- 6 and the miss explainer ---------------------------------------------------------------------
def test_two_texts_under_one_key_in_one_process_are_a_collision():
    spec = RMSNormSpec(hidden=896, eps=1e-6)
    key = "f" * 63 + "0"
    record_text(key, "a" * 64, spec)
    record_text(key, "a" * 64, spec)  # the same text again: fine
    with pytest.raises(KeyCollisionError, match="impure or the key misses a parameter"):
        record_text(key, "b" * 64, spec)


def test_a_strict_miss_names_the_nearest_prewarmed_spec_and_the_fields_that_differ():
    prewarmed = [RMSNormSpec(hidden=896, eps=1e-6), RMSNormSpec(hidden=64, eps=1e-5, block_size=32),
                 AdamWSpec(**ADAMW, weight_decay=0.0), RopeSpec(heads=2, head_dim=64, theta=1e6)]
    message = explain_miss(AdamWSpec(**ADAMW, weight_decay=-0.0), prewarmed)
    assert "nearest pre-warmed adamw" in message and "weight_decay 0.0 -> -0.0" in message
    message = explain_miss(RMSNormSpec(hidden=896, eps=1e-5), prewarmed)
    assert "hidden=896, eps=1e-06" in message and "differs in eps 1e-06 -> 1e-05" in message
    assert explain_miss(CrossEntropySpec(vocab=256), prewarmed) == "no cross_entropy spec was pre-warmed"
    assert field_differences(prewarmed[0], prewarmed[0]) == []


def memory_only_cache(strict=True):
    """A ModuleCache's in-memory half without a device: what get() does before any driver call."""
    from runtime.cache import CacheStats, ModuleCache

    cache = ModuleCache.__new__(ModuleCache)
    cache.target, cache.strict, cache.stats, cache._kernels = TARGET, strict, CacheStats(), {}
    return cache


def test_the_cache_serves_no_kernel_of_another_class_under_one_key():
    from types import SimpleNamespace

    cache = memory_only_cache()
    spec = RMSNormSpec(hidden=896, eps=1e-6)
    cache._kernels[spec.key(TARGET)] = SimpleNamespace(spec=RopeSpec(heads=2, head_dim=64, theta=1e6))
    with pytest.raises(KeyCollisionError, match="holds a RopeSpec kernel"):
        cache.get(spec)


def test_a_strict_miss_in_the_cache_explains_itself_and_prewarm_goes_by_key():
    from types import SimpleNamespace

    from runtime.cache import StrictMissError

    cache = memory_only_cache()
    no_decay = AdamWSpec(**ADAMW, weight_decay=0.0)
    cache._kernels[no_decay.key(TARGET)] = SimpleNamespace(spec=no_decay)
    assert cache.get(AdamWSpec(**ADAMW, weight_decay=0.0)).spec is no_decay and cache.stats.memory_hits == 1
    with pytest.raises(StrictMissError, match=r"not pre-warmed; nearest pre-warmed adamw: .*weight_decay 0.0 -> -0.0"):
        cache.get(AdamWSpec(**ADAMW, weight_decay=-0.0))


def test_strict_mode_holds_on_the_thread_that_opened_it_only():
    """Ranks as threads share one cache: one rank's strict block neither makes another's lookups
    strict nor, on leaving, turns strictness off (or on) for the other."""
    import threading

    from runtime.cache import StrictMissError

    cache = memory_only_cache(strict=False)
    cache._load = lambda spec, key: f"loaded {key[:8]}"  # a miss outside strict mode loads
    spec = RopeSpec(heads=2, head_dim=64, theta=1e6)
    seen = []
    with cache.strict_mode():
        with pytest.raises(StrictMissError):
            cache.get(spec)
        other = threading.Thread(target=lambda: seen.append(cache.get(spec)))
        other.start()
        other.join()
    assert seen and seen[0].startswith("loaded")  # the other thread was not in strict mode
    assert cache.get(RopeSpec(heads=4, head_dim=64, theta=1e6)).startswith("loaded")  # and strictness ended here


# a process that imported the generator, then the tree changing before its first key (a checkout, a pull):
# the running emitters are the old ones, and so must be the fingerprint their keys carry
GENERATOR_EDITED_AFTER_IMPORT = """
import pathlib, sys
import ptxgen.kernels
from ptxgen.kernels.rmsnorm import RMSNormSpec
from ptxgen.spec import Target, generator_fingerprint
if sys.argv[1] == "edit":
    source = pathlib.Path(ptxgen.kernels.rmsnorm.__file__)
    source.write_text(source.read_text().replace("def build(self, b: KernelBuilder) -> None:",
                      "def build(self, b: KernelBuilder) -> None:\\n        b.special('%laneid')", 1))
spec = RMSNormSpec(hidden=896, eps=1e-6)
print(generator_fingerprint(), spec.key(Target()), spec.emit(Target()).count("%laneid"))
"""


def test_the_generator_fingerprint_is_of_the_files_the_emitters_were_loaded_from(tmp_path):
    shutil.copytree(PACKAGE_ROOT, tmp_path / "ptxgen", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "probe.py").write_text(GENERATOR_EDITED_AFTER_IMPORT)

    def probe(edit: str) -> list[str]:
        out = subprocess.run([sys.executable, "-P", str(tmp_path / "probe.py"), edit], cwd=tmp_path, check=True,
                             capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path)}).stdout
        return out.split()

    before = probe("no")
    edited_under_it = probe("edit")
    after = probe("no")
    assert (tmp_path / "ptxgen" / "kernels" / "rmsnorm.py").read_text().count("%laneid") == 1
    assert before[2] == edited_under_it[2] == "0" and after[2] != "0"  # the edit changes the text of new processes
    assert edited_under_it[:2] == before[:2]  # the old emitters keep the old tree's key
    assert after[:2] != before[:2]
