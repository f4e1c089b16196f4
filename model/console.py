"""The console scripts, ``ptxgen`` and ``ptxgen-audit`` (and ``python -m model.cli``): Ctrl-C at any
point is one line and exit 130.

A command's imports take a while (numpy, the generator, the runtime), and an interrupt during them
came before any handler of the command's own: a traceback. This module imports none of them until
its handler holds. A command that says more when interrupted (``train``: the checkpoint it leaves)
handles the interrupt itself, and this one never sees it.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

INTERRUPTED = 128 + 2  # as a shell reports a process that SIGINT ended


def _interruptible(prog: str, module: str, argv: Sequence[str] | None) -> int:
    try:
        return importlib.import_module(module).main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """``ptxgen``: the generator's commands and the model's (``model.cli``)."""
    return _interruptible("ptxgen", "model.cli", argv)


def audit(argv: Sequence[str] | None = None) -> int:
    """``ptxgen-audit`` (``runtime.audit``)."""
    return _interruptible("ptxgen-audit", "runtime.audit", argv)
