"""What every command line here shares: the argument parser, its error, and how an error and stdout
are written. Its own module so that a command needing only these (the contracts', the benchmarks')
does not import the generator with them (``ptxgen.cli``: numpy, the PTX parser, the assembler).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import typing
from typing import Any, Sequence


class UsageError(Exception):
    """Bad command-line input: its entry point prints it as one line and exits 2."""


class _StoreOnce(argparse._StoreAction):
    """An option's value, given once: argparse keeps the last of two and drops the first unsaid
    (``--lr 1e-3 ... --lr 3e-3`` trained at 3e-3). An option that collects its values (--data) is
    another action."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if option_string is not None:
            if self.dest in parser.given:
                parser.error(f"argument {'/'.join(self.option_strings)}: given twice; give it once")
            parser.given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


class Parser(argparse.ArgumentParser):
    """The argparse parser of every command line here (ptxgen's and its commands', ptxgen-audit,
    the contracts', the benchmarks'): bad arguments raise UsageError, one line for the entry point
    to print, not argparse's usage block and exit; an option that takes a value is given once, by its
    whole name (argparse's prefixes read ``--step 3`` as ``--steps 3``, and a prefix that is whole today
    would name another option once one is added that it also begins)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)
        self.given: set[str] = set()

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        self.given = set()  # (a parser may parse more than once)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        """An empty value is refused, whatever the option: '' as a path is the current directory
        (``--data ''`` trained on it, ``--out ''`` wrote a run into it), as a name it reads as not given."""
        if "" in arg_strings and action.nargs not in (argparse.PARSER, argparse.REMAINDER):  # (a subcommand's own)
            self.error(f"argument {'/'.join(action.option_strings) or action.metavar or action.dest}: an empty value")
        return super()._get_values(action, arg_strings)


def print_error(line: str) -> None:
    """An error on stderr as the one line it is: a line break in it (a path may hold one) shown as \\n."""
    print(line.replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)


def silence_stdout() -> None:
    """Point stdout at /dev/null once its reader has gone, so that nothing written later (nor what
    is still buffered, flushed at exit) fails again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def paths_as_named() -> None:
    """Let stdout print a path as the file system names it: Python reads a name that is not UTF-8
    with its bytes as lone surrogates, which a strict UTF-8 stdout refuses (a traceback, mid-listing);
    written back as those bytes, as ``ls`` writes them."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="surrogateescape")
