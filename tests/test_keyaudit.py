import dataclasses
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
