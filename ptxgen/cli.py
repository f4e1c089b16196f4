"""`ptxgen list | dump | inspect`: the generator's command line.

Bad input (unknown kind, unknown/missing/invalid field, unreadable file) prints one line to
stderr and exits 2, never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from .assemble import AssemblerUnavailable, AssemblyError, assemble
from .builder import PtxBuildError
# (paths_as_named and print_error are imported from here by runtime's command lines too)
from .cmdline import Parser, UsageError, paths_as_named, print_error, silence_stdout
from .files import read_file, write_atomic
from .ptxtext import parse
from .registry import get_kind, kinds
from .spec import KernelSpec, SpecError, Target, sha256_hex


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "{" + ",".join(str(m.value) for m in hint) + "}"
    return getattr(hint, "__name__", str(hint))


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    # (argparse names a ValueError's type by its function's name: "invalid _parse_bool value")
    raise argparse.ArgumentTypeError(f"invalid bool value: {text!r} (true/false, yes/no, on/off, 1/0)")


def _converter(hint: Any):
    if hint is bool:
        return _parse_bool
    if hint in (int, float, str):
        return hint
    return str  # enums and the rest: the spec's own coercion checks the value


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default=Target().arch, help="SM architecture (default %(default)s)")
    p.add_argument("--ptx-version", default="%d.%d" % Target().ptx_version,
                   help="PTX ISA version (default %(default)s)")


def spec_from_args(kind: str, argv: Sequence[str], command: str) -> tuple[KernelSpec, argparse.Namespace]:
    """Build a spec of ``kind`` from ``--field value`` arguments (``--block-size`` or ``--block_size``),
    and ``command``'s own flag (dump: ``-o``; inspect: ``--json``; the other's is refused, not ignored)."""
    cls = get_kind(kind)
    hints = typing.get_type_hints(cls)
    p = Parser(prog=f"ptxgen {kind}", add_help=False)
    for f in dataclasses.fields(cls):
        flags = sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"})
        required = f.default is dataclasses.MISSING
        p.add_argument(*flags, dest=f.name, required=required, type=_converter(hints[f.name]),
                       default=None if required else f.default)
    _add_target_args(p)
    if command == "dump":
        p.add_argument("-o", "--output")
    else:
        p.add_argument("--json", action="store_true")
    ns = p.parse_args(argv)
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}
    return cls(**values), ns


def _describe(kind: str) -> str:
    """A kind's line and its fields' flags, types and defaults (``list``, and ``dump KIND --help``)."""
    cls = get_kind(kind)
    hints = typing.get_type_hints(cls)
    doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
    lines = [f"{kind}: {doc}"]
    for f in dataclasses.fields(cls):
        shown = f.default.value if isinstance(f.default, enum.Enum) else f.default  # (as the flag takes it)
        default = "(required)" if f.default is dataclasses.MISSING else f"= {shown!r}"
        lines.append(f"  --{f.name.replace('_', '-'):<12} {_type_name(hints[f.name]):<6} {default}")
    return "\n".join(lines)


HELP = ("-h", "--help")


def _help(argv: Sequence[str]) -> bool:
    """Print the usage (``dump --help``, ``inspect FILE --help``) or a kind's fields (``dump KIND --help``)
    when asked: it read as an unknown kind '--help', or as a spec missing its required fields."""
    if not any(a in HELP for a in argv):
        return False
    print(_describe(argv[0]) if argv[0] in kinds() else USAGE)
    return True


def cmd_list(argv: Sequence[str]) -> int:
    if len(argv) == 1 and argv[0] in HELP:
        print(USAGE)
        return 0
    if argv:
        raise UsageError(f"list takes no arguments, got {' '.join(argv)}")
    print("\n".join(_describe(kind) for kind in kinds()))
    return 0


def cmd_dump(argv: Sequence[str]) -> int:
    if _help(argv):
        return 0
    if not argv:
        raise UsageError("dump needs a kernel kind (see `ptxgen list`)")
    spec, ns = spec_from_args(argv[0], argv[1:], "dump")
    text = spec.emit(Target.parse(ns.arch, ns.ptx_version))
    if ns.output:  # a file whole or not at all (a full disk leaves the old one); /dev/stdout and the like as they are
        out = Path(ns.output)
        if not out.parent.is_dir():  # (write_atomic would make the folders a mistyped path names)
            raise UsageError(f"cannot write {ns.output}: no such folder {out.parent}")
        try:
            if out.is_symlink() or (out.exists() and not out.is_file()):
                out.write_text(text)
            else:
                write_atomic(out, text.encode())
        except OSError as e:
            raise UsageError(f"cannot write {ns.output}: {e.strerror or e}") from None
    else:
        sys.stdout.write(text)
    return 0


def _ptxas_figures(text: str, arch: str) -> dict[str, Any]:
    try:
        a = assemble(text, arch)
    except AssemblerUnavailable as e:
        return {"unavailable": str(e)}
    return {"arch": arch, "registers": a.registers, "spill_stores": a.spill_stores,
            "spill_loads": a.spill_loads, "stack_bytes": a.stack_bytes}


def cmd_inspect(argv: Sequence[str]) -> int:
    if _help(argv):
        return 0
    if not argv:
        raise UsageError("inspect needs a kernel kind or a .ptx file")
    first = argv[0]
    # (a folder, a dangling link, a link loop: said so on reading)
    if first.endswith(".ptx") or (os.path.lexists(first) and first not in kinds()):
        p = Parser(prog="ptxgen inspect", add_help=False)
        p.add_argument("file")
        p.add_argument("--json", action="store_true")
        ns = p.parse_args(argv)
        try:
            text = read_file(ns.file).decode()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read {ns.file}: {getattr(e, 'strerror', None) or e}") from None
        report: dict[str, Any] = {"source": ns.file}
        arch = None
    else:
        spec, ns = spec_from_args(first, argv[1:], "inspect")
        target = Target.parse(ns.arch, ns.ptx_version)
        text = spec.emit(target)
        report = {"source": repr(spec), "key": spec.key(target), "dynamic_shared_bytes": spec.dynamic_shared_bytes()}
        arch = spec.arch(target)
    try:
        facts = parse(text)
    except ValueError as e:
        raise UsageError(f"{report['source']}: {e}") from None
    arch = arch or (facts.target or "").split(",")[0].strip() or Target().arch
    report.update({
        "version": facts.version, "target": facts.target,
        "entries": {name: [f"{n} .{t}" for n, t in ps] for name, ps in facts.entries.items()},
        "registers": facts.registers,
        "variables": [f".{v.space} .{v.type} {v.name}[{v.count}] ({v.bytes} bytes)" for v in facts.variables],
        "shared_bytes": facts.shared_bytes,
        "immediates": [dataclasses.asdict(i) for i in facts.immediates],
        "text_sha256": sha256_hex(text),
        "ptxas": _ptxas_figures(text, arch),
    })
    if ns.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 0


def _print_report(r: dict[str, Any]) -> None:
    print(f"source       {r['source']}")
    print(f"ptx          .version {r['version']}  .target {r['target']}")
    for name, params in r["entries"].items():
        print(f"entry        {name}({', '.join(params)})")
    print("registers    " + ", ".join(f".{t} x{n}" for t, n in r["registers"].items()))
    for v in r["variables"]:
        print(f"variable     {v}")
    dynamic = f", {r['dynamic_shared_bytes']} bytes dynamic" if r.get("dynamic_shared_bytes") else ""
    print(f"shared       {r['shared_bytes']} bytes (static){dynamic}")
    for i in r["immediates"]:
        print(f"immediate    {i['text']}  .{i['type']}  {i['value']}" + (f"  (x{i['count']})" if i["count"] > 1 else ""))
    if "key" in r:
        print(f"key          {r['key']}")
    print(f"text sha256  {r['text_sha256']}")
    px = r["ptxas"]
    if "unavailable" in px:
        print(f"ptxas        not run: {px['unavailable']}")
    else:
        print(f"ptxas        {px['arch']}: {px['registers']} registers, spill stores {px['spill_stores']} "
              f"bytes, spill loads {px['spill_loads']} bytes, stack {px['stack_bytes']} bytes")


COMMANDS = {"list": cmd_list, "dump": cmd_dump, "inspect": cmd_inspect}
USAGE = f"""usage: ptxgen COMMAND ...   (ptxgen {__version__})
  list                                  kernel kinds and their fields
  dump KIND --FIELD VALUE ... [--arch sm_90] [--ptx-version 8.5] [-o FILE]
  inspect (KIND --FIELD VALUE ... | FILE.ptx) [--json]"""


def main(argv: Sequence[str] | None = None, *, more: dict[str, Callable[[Sequence[str]], int]] | None = None,
         more_usage: str = "") -> int:
    """Run one command; ``more`` adds commands of packages built on this one (train, generate, ...)."""
    paths_as_named()
    commands = {**COMMANDS, **(more or {})}
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE + more_usage)
        return 0
    command = commands.get(argv[0])
    try:
        if command is None:
            raise UsageError(f"unknown command {argv[0]!r}; commands: {', '.join(commands)}")
        return command(argv[1:])
    except BrokenPipeError:  # stdout's reader went away (`ptxgen list | head -1`): no one to tell
        silence_stdout()
        return 128 + 13  # as a process SIGPIPE ended
    except (UsageError, SpecError, PtxBuildError, OSError) as e:
        print_error(f"ptxgen: error: {e}")
        return 2
    except AssemblyError as e:
        head, *log = str(e).splitlines() or [type(e).__name__]
        reason = next((ln.strip() for ln in log if "error" in ln.lower()), None)  # ptxas's first, after the header
        print_error(f"ptxgen: error: {head}" + (f": {reason}" if reason else ""))
        return 2


if __name__ == "__main__":
    sys.exit(main())
