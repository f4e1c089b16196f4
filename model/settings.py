"""The one check every settings dataclass runs on construction (CLI flags, a resumed run's saved
settings, a test's own values): each field has the type its hint names and a finite value.

Range rules stay beside the fields they belong to (``TrainSettings``, ``AdamWSettings``,
``GenerateSettings``); this module makes sure none of them ever sees NaN, an infinity, a bool for a
number or a float for a count.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any


class SettingsError(ValueError):
    """A setting out of its type or range; one line naming the flag."""


class OutOfRange(SettingsError):
    """A value of the right type outside the range this version takes: a run an older release saved
    may hold one, which is not damage."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_types(obj: Any) -> None:
    """Refuse a field whose value does not match its hint (int: an integer; float: a finite number,
    stored as float)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v, hint = getattr(obj, f.name), hints[f.name]
        if hint is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise SettingsError(f"{flag(f.name)} must be an integer, got {v!r}")
        if hint is float:
            try:
                ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            except OverflowError:  # an integer too large for a float
                ok = False
            if not ok:
                raise SettingsError(f"{flag(f.name)} must be a finite number, got {v!r}")
            object.__setattr__(obj, f.name, float(v))


def require(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise OutOfRange(f"{flag(name)} must be {rule}, got {value!r}")
