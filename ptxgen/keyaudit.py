"""The CPU half of the cache audit: key completeness, emitter purity, and no hand-built keys.

Each check returns findings; an empty list is a pass. The key function is a parameter so a test
can plant a defective one (say, one that drops theta) and see the audit catch it.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import enum
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .registry import kinds
from .spec import KernelSpec, SpecError, Target, sha256_hex, spec_key

KeyFn = Callable[[KernelSpec, Target], str]


@dataclass(frozen=True)
class Finding:
    check: str
    subject: str
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.subject}: {self.message}"


def candidate_values(value: Any) -> list[Any]:
    """Nearby values of the same type; the spec's validation decides which are legal."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value + 2, value * 2, value - 1, max(1, value // 2), value + 32, value * 4]
    if isinstance(value, float):
        return [value * 2, value / 2, math.nextafter(value, math.inf), -value, value + 1.0, value * 10]
    if isinstance(value, enum.Enum):
        return [m for m in type(value) if m is not value]
    if isinstance(value, str):
        return [value + "_"]
    if isinstance(value, tuple):
        return [value[:-1], value + value[-1:]] if value else []
    return []


def neighbours(spec: KernelSpec, name: str) -> list[KernelSpec]:
    out = []
    for v in candidate_values(getattr(spec, name)):
        try:
            out.append(dataclasses.replace(spec, **{name: v}))
        except SpecError:
            continue
    return out


def check_completeness(target: Target = Target(), key_fn: KeyFn = spec_key,
                       random_specs: int = 64, seed: int = 0, only: Iterable[str] | None = None) -> list[Finding]:
    """For every kind (or the kinds named in ``only``) and field: a perturbation that changes the
    PTX must change the key.

    Then random walks from each example: any two specs with different text need different keys.
    A field whose perturbations change the text of no example is not an emit parameter: a finding.
    """
    findings: list[Finding] = []
    rng = random.Random(seed)
    selected = kinds() if only is None else {k: kinds()[k] for k in only}
    for kind, cls in selected.items():
        perturbed: dict[str, bool] = {}
        moves_text: dict[str, bool] = {}
        for base in cls.examples():
            text, key = base.emit(target), key_fn(base, target)
            for f in dataclasses.fields(base):
                variants = neighbours(base, f.name)
                perturbed[f.name] = perturbed.get(f.name, False) or bool(variants)
                moves_text.setdefault(f.name, False)
                for v in variants:
                    if v.emit(target) != text:
                        moves_text[f.name] = True
                        if key_fn(v, target) == key:
                            findings.append(Finding("completeness", f"{kind}.{f.name}",
                                                    f"{base} -> {f.name}={getattr(v, f.name)!r} changes "
                                                    f"the PTX but not the key"))
        for name, moved in moves_text.items():
            if not perturbed[name]:
                findings.append(Finding("completeness", f"{kind}.{name}",
                                        "no example has a legal perturbation of this field"))
            elif not moved:
                findings.append(Finding("completeness", f"{kind}.{name}", "no change of this field changes "
                                                                          "the PTX of any example: not an emit parameter"))
        findings += _random_collisions(kind, cls, target, key_fn, random_specs, rng)
    return findings


def _random_collisions(kind: str, cls: type[KernelSpec], target: Target, key_fn: KeyFn,
                       n: int, rng: random.Random) -> list[Finding]:
    texts_by_key: dict[str, tuple[KernelSpec, str]] = {}
    findings = []
    for i in range(n):
        spec = rng.choice(cls.examples())
        for _ in range(rng.randint(1, 4)):
            name = rng.choice([f.name for f in dataclasses.fields(spec)])
            spec = rng.choice(neighbours(spec, name) or [spec])
        text, key = spec.emit(target), key_fn(spec, target)
        seen = texts_by_key.setdefault(key, (spec, text))
        if seen[1] != text:
            findings.append(Finding("completeness", kind, f"{seen[0]} and {spec} share a key but "
                                                          f"emit different PTX"))
    return findings


def _example_specs() -> list[KernelSpec]:
    return [s for cls in kinds().values() for s in cls.examples()]


def emit_digests(target: Target) -> dict[str, str]:
    """spec key -> sha256 of its PTX, for every example spec (also run in a child process)."""
    return {s.key(target): sha256_hex(s.emit(target)) for s in _example_specs()}


def numpy_dispatched_features() -> list[str]:
    """numpy's runtime-dispatched SIMD targets this CPU has (AVX2 or AVX-512 on x86, SVE on Arm):
    disabling them in a child makes it compute as a smaller host would."""
    try:
        from numpy._core import _multiarray_umath as umath  # type: ignore[attr-defined]
    except ImportError:  # numpy 1.x
        from numpy.core import _multiarray_umath as umath  # type: ignore[no-redef]
    return [f for f in getattr(umath, "__cpu_dispatch__", []) if getattr(umath, "__cpu_features__", {}).get(f)]


@contextlib.contextmanager
def environment_reads() -> Iterator[list[str]]:
    """The names of the environment variables this thread reads inside the block (``os.environ``
    and ``os.getenv``; ``"*"`` for a walk over all of them). Changing a list of variables between
    two emissions finds only the variables on the list; a read of any name is seen here."""
    environ_class, thread, names = type(os.environ), threading.get_ident(), []
    getitem, iterate = environ_class.__getitem__, environ_class.__iter__

    def traced_getitem(self: Any, key: str) -> Any:
        if threading.get_ident() == thread:
            names.append(key)
        return getitem(self, key)

    def traced_iter(self: Any) -> Iterator[str]:
        if threading.get_ident() == thread:
            names.append("*")
        return iterate(self)

    environ_class.__getitem__, environ_class.__iter__ = traced_getitem, traced_iter  # type: ignore[method-assign]
    try:
        yield names
    finally:
        environ_class.__getitem__, environ_class.__iter__ = getitem, iterate  # type: ignore[method-assign]


def check_purity(target: Target = Target()) -> list[Finding]:
    """The same spec emitted twice, with the environment changed between, gives the same text.

    In process: the first emission must read no environment variable at all (whatever its name),
    then environment variables, working directory and random seeds are changed. Then a child
    process with another hash seed, a polluted environment and numpy's SIMD dispatch turned off
    must emit the same digests.
    """
    specs = _example_specs()
    before, findings = [], []
    for s in specs:
        with environment_reads() as names:
            before.append(s.emit(target))
        findings += [Finding("purity", repr(s), f"emission read the environment variable {name!r}: a kernel's "
                                                f"text depends on its spec alone (make the value a field)")
                     for name in dict.fromkeys(names)]
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    try:
        os.environ.update({"PTXGEN_EPS": "1e-5", "ROPE_THETA": "10000", "CUDA_VISIBLE_DEVICES": "7",
                           "LC_ALL": "C", "PTXGEN_CACHE_DIR": "/nonexistent"})
        random.seed(12345)
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            after = [s.emit(target) for s in specs]
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    findings += [Finding("purity", repr(s), "text changed when the environment changed")
                 for s, a, b in zip(specs, before, after) if a != b]

    env = dict(os.environ, PYTHONHASHSEED="4242", PTXGEN_EPS="1e-5", ROPE_THETA="10000",
               NPY_DISABLE_CPU_FEATURES=" ".join(numpy_dispatched_features()))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")])
    code = ("import json,sys; from ptxgen.keyaudit import emit_digests; from ptxgen.spec import Target; "
            f"print(json.dumps(emit_digests(Target({target.arch!r}, {tuple(target.ptx_version)!r}))))")
    # -P: the temp dir it runs in is not on its path (a stray ptxgen/ there would be imported instead)
    child = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True,
                           cwd=tempfile.gettempdir())
    if child.returncode != 0:
        return findings + [Finding("purity", "child process", child.stderr.strip().splitlines()[-1])]
    theirs, ours = json.loads(child.stdout), emit_digests(target)
    findings += [Finding("purity", key[:16], "a child process with another hash seed and environment "
                                             "emitted different text or keys")
                 for key in set(ours) ^ set(theirs) | {k for k in ours if theirs.get(k) != ours[k]}]
    return findings


# -- source: no cache key built by hand ----------------------------------------------------------
KEY_MODULE = Path("ptxgen") / "spec.py"  # the only module that may hash or build keys


def _is_string_building(node: ast.AST) -> bool:
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mod, ast.Add)):
        return any(isinstance(side, (ast.JoinedStr, ast.Constant)) and
                   isinstance(getattr(side, "value", ""), str) for side in (node.left, node.right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr in ("format", "join") and isinstance(node.func.value, (ast.Constant, ast.JoinedStr))
    return False


def _names(target: ast.AST) -> Iterable[str]:
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, ast.Attribute):
        yield target.attr
    elif isinstance(target, ast.Subscript):
        yield from _names(target.value)
    elif isinstance(target, (ast.Tuple, ast.List)):
        for t in target.elts:
            yield from _names(t)


# Library functions whose last bit depends on the CPU, its vector extensions, the libm or numpy's
# build: an emitter that bakes one of their results into PTX emits other text on another host.
HOST_DEPENDENT = {"exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "pow", "power", "float_power",
                  "sqrt", "rsqrt", "cbrt", "sin", "cos", "tan", "arcsin", "arccos", "arctan", "asin", "acos",
                  "atan", "atan2", "arctan2", "sinh", "cosh", "tanh", "erf", "erfc", "gamma", "lgamma", "hypot",
                  "logaddexp", "logaddexp2", "reciprocal"}
LIBRARIES = {"math", "np", "numpy", "cmath"}


def _host_dependent_math(tree: ast.AST, rel: Path) -> list[Finding]:
    """Transcendental library calls and non-integer powers in the generator, outside the numpy
    references (functions named ``*reference*``, which never reach PTX): baked constants come
    from ptxgen.exact."""
    findings = []

    def visit(node: ast.AST, in_reference: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_reference = in_reference or "reference" in node.name
        if not in_reference:
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in LIBRARIES
                    and node.func.attr in HOST_DEPENDENT):
                findings.append(Finding("source", f"{rel}:{node.lineno}",
                                        f"{node.func.value.id}.{node.func.attr}() in the generator: its last bit "
                                        f"depends on the host; compute baked values with ptxgen.exact"))
            if isinstance(node, ast.ImportFrom) and node.module in LIBRARIES | {"numpy"} and any(
                    a.name in HOST_DEPENDENT or a.name == "*" for a in node.names):
                findings.append(Finding("source", f"{rel}:{node.lineno}",
                                        f"from {node.module} import of a host-dependent function in the generator; "
                                        f"compute baked values with ptxgen.exact"))
            if isinstance(node, ast.Call) and (
                    (isinstance(node.func, ast.Name) and node.func.id == "pow" and len(node.args) == 2)
                    or (isinstance(node.func, ast.Attribute) and node.func.attr in ("__pow__", "__rpow__"))):
                findings.append(Finding("source", f"{rel}:{node.lineno}",
                                        "pow() in the generator: a float power is host-dependent; use ptxgen.exact"))
            if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow)
                    and not (isinstance(node.left, ast.Constant) and type(node.left.value) is int)):
                findings.append(Finding("source", f"{rel}:{node.lineno}",
                                        "a power of a non-integer-constant base in the generator: numpy's and "
                                        "libm's pow are host-dependent; use ptxgen.exact"))
        for child in ast.iter_child_nodes(node):
            visit(child, in_reference)

    visit(tree, False)
    return findings


ENVIRONMENT = {"environ", "environb", "getenv", "getenvb"}
AUDIT_MODULE = Path("ptxgen") / "keyaudit.py"  # the one generator module that sets the environment (to vary it)


def _environment_reads(tree: ast.AST, rel: Path) -> list[Finding]:
    """The environment read anywhere in the generator, at import time too (``check_purity`` sees
    only what an emission reads): a value that reaches PTX from there bypasses the spec and its key."""
    found = [node.lineno for node in ast.walk(tree)
             if (isinstance(node, ast.Attribute) and node.attr in ENVIRONMENT
                 and isinstance(node.value, ast.Name) and node.value.id in ("os", "posix"))
             or (isinstance(node, ast.ImportFrom) and node.module in ("os", "posix")
                 and any(a.name in ENVIRONMENT | {"*"} for a in node.names))]
    return [Finding("source", f"{rel}:{line}", "the generator reads the environment: a value that reaches the "
                                               "PTX must be a spec field, or the key cannot cover it")
            for line in found]


def scan_source(path: Path, rel: Path) -> list[Finding]:
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (SyntaxError, UnicodeDecodeError) as e:
        return [Finding("source", str(rel), f"cannot parse: {e}")]
    findings = _host_dependent_math(tree, rel) if rel.parts[0] == "ptxgen" else []
    if rel.parts[0] == "ptxgen" and rel != AUDIT_MODULE:
        findings += _environment_reads(tree, rel)
    allowed_hashing = rel == KEY_MODULE
    for node in ast.walk(tree):
        line = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not allowed_hashing:
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m.split(".")[0] == "hashlib" for m in mods):
                findings.append(Finding("source", line, "hashlib used outside ptxgen/spec.py: digests and "
                                                        "keys come from ptxgen.spec"))
        targets: list[ast.AST] = []
        value = None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets, value = [node.target], node.value
        elif isinstance(node, ast.keyword) and node.arg:
            targets, value = [ast.Name(node.arg)], node.value
        if value is not None and _is_string_building(value):
            for name in (n for t in targets for n in _names(t)):
                if "key" in name.lower():
                    findings.append(Finding("source", line, f"{name!r} is built by string formatting: "
                                                            f"cache keys come only from spec.key()"))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "key" in node.name.lower():
            for ret in (n for n in ast.walk(node) if isinstance(n, ast.Return) and n.value is not None):
                if _is_string_building(ret.value):
                    findings.append(Finding("source", f"{rel}:{ret.lineno}",
                                            f"{node.name}() returns a hand-formatted string"))
    return findings


def check_source(root: Path, packages: Iterable[str] = ("ptxgen", "runtime", "model")) -> list[Finding]:
    findings = []
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            findings += scan_source(path, path.relative_to(root))
    return findings
