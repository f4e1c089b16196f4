import dataclasses
import os
import tempfile
from pathlib import Path

from ptxgen.keyaudit import check_completeness, check_purity, check_source, scan_source
from ptxgen.spec import spec_key

ROOT = Path(__file__).resolve().parents[1]


def test_every_field_that_changes_the_ptx_changes_the_key():
    assert check_completeness() == []


def test_a_key_function_that_drops_theta_is_caught():
    def key_without_theta(spec, target):
        if hasattr(spec, "theta"):
            spec = dataclasses.replace(spec, theta=1e4)
        return spec_key(spec, target)

    findings = check_completeness(key_fn=key_without_theta, only=["rope", "rmsnorm"])
    assert findings and all("theta" in str(f) for f in findings if "rope." in f.subject)
    assert any(f.subject == "rope.theta" for f in findings)


def test_a_key_function_that_drops_eps_is_caught():
    def key_without_eps(spec, target):
        if hasattr(spec, "eps"):
            spec = dataclasses.replace(spec, eps=1e-5)
        return spec_key(spec, target)

    assert any(f.subject == "rmsnorm.eps" for f in check_completeness(key_fn=key_without_eps, only=["rmsnorm", "rope"]))


def test_emission_is_pure_across_environment_and_processes(tmp_path, monkeypatch):
    """The child process runs in the temp dir: it imports the tree's ptxgen, not a stray one there."""
    (tmp_path / "ptxgen").mkdir()
    (tmp_path / "ptxgen" / "__init__.py").write_text("raise ImportError('a stray ptxgen in the temp dir')\n")
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    assert check_purity() == []


def test_the_tree_builds_no_key_by_hand():
    assert check_source(ROOT) == []


def test_a_hand_built_key_is_reported(tmp_path):
    planted = tmp_path / "runtime" / "rogue.py"
    planted.parent.mkdir()
    planted.write_text(
        "import hashlib\n"
        "def module_key(heads, head_dim):\n"
        "    return f'rope_{heads}_{head_dim}'\n"
        "cache_key = 'rmsnorm_%d' % 896\n"
        "lookup(key='-'.join(['a', 'b']))\n")
    findings = scan_source(planted, Path("runtime/rogue.py"))
    messages = "\n".join(map(str, findings))
    assert "hashlib used outside" in messages
    assert "module_key() returns a hand-formatted string" in messages
    assert "'cache_key' is built by string formatting" in messages
    assert "'key' is built by string formatting" in messages


def test_an_emitter_reading_any_environment_variable_is_caught(monkeypatch):
    """Not only the variables the audit sets: a name it has never heard of, unset while it runs."""
    from ptxgen.kernels.rmsnorm import RMSNormSpec

    build = RMSNormSpec.build

    def build_reading_the_environment(self, b):
        if os.getenv("PTXGEN_RMS_UNROLL"):  # unset: the text is the same, only the read betrays it
            raise AssertionError("the audit set a variable it was not asked to")
        build(self, b)

    monkeypatch.delenv("PTXGEN_RMS_UNROLL", raising=False)
    monkeypatch.setattr(RMSNormSpec, "build", build_reading_the_environment)
    findings = check_purity()
    assert findings and all(f.subject.startswith("RMSNormSpec(") for f in findings)
    assert {f.message.split(":")[0] for f in findings} == {"emission read the environment variable 'PTXGEN_RMS_UNROLL'"}
    assert len(findings) == len(RMSNormSpec.examples())


def test_the_generator_reading_the_environment_is_reported(tmp_path):
    planted = tmp_path / "ptxgen" / "kernels" / "rogue.py"
    planted.parent.mkdir(parents=True)
    planted.write_text(
        "import os\n"
        "from os import getenv\n"
        "TILE = int(os.environ.get('PTXGEN_TILE', '64'))\n"
        "def unroll():\n"
        "    return getenv('PTXGEN_UNROLL')\n")
    findings = scan_source(planted, Path("ptxgen/kernels/rogue.py"))
    assert [f.subject for f in findings if "reads the environment" in f.message] == \
        ["ptxgen/kernels/rogue.py:2", "ptxgen/kernels/rogue.py:3"]
    # the runtime reads PTXGEN_CACHE_DIR: where the cache lives, not what a kernel is
    assert scan_source(planted, Path("runtime/rogue.py")) == []
