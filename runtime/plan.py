"""A launch plan: an ordered, inspectable list of prepared launches with named arguments.

``plan.add(spec, dims, label=..., **args)`` binds a kernel by its spec's own parameter names (a
missing, unknown or mistyped argument is an error when the plan is built, not a wrong launch). An
argument or grid dimension that changes between runs (a learning rate, a KV cache's length, the
address its new rows go to) is an expression over the plan's named values, declared once with
``plan.value(name, initial)`` and set together with ``plan.set(name=...)`` before a run: every
launch that reads one follows it. Each step records which buffers it reads and writes (the
kernels name their outputs, ``KernelSpec.outputs``), so a profile, a graph capture (``graph()``)
or a communication hook can walk the plan. A step may also be a call on the host (``host``: a
collective between launches); a graph run launches the launches between host steps as graphs of
their own. Steps are grouped into named sections (say forward, backward, optimizer) that run, or
are captured, alone or together.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from ptxgen.builder import T
from ptxgen.spec import KernelSpec

from .cache import ModuleCache
from .graph import Graph
from .launch import Launch
from .memory import DeviceArray, View, fill_u32

Number = int | float


@dataclass(frozen=True)
class Expr:
    """``base``'s address (if any) + ``const`` + the sum of ``coefficient * value`` over named values."""

    const: Number = 0
    terms: tuple[tuple[str, Number], ...] = ()
    base: View | None = None

    def names(self) -> set[str]:
        return {name for name, _ in self.terms}

    def evaluate(self, values: dict[str, Number]) -> Number:
        total = self.const + sum(k * values[name] for name, k in self.terms)
        return total + self.base.ptr if self.base is not None else total

    def __add__(self, other: "Expr | Number") -> "Expr":
        if isinstance(other, Expr):
            if self.base is not None and other.base is not None:
                raise TypeError("cannot add two addresses")
            terms: dict[str, Number] = dict(self.terms)
            for name, k in other.terms:
                terms[name] = terms.get(name, 0) + k
            return Expr(self.const + other.const, tuple(terms.items()), self.base or other.base)
        if isinstance(other, numbers.Real) and not isinstance(other, bool):
            return Expr(self.const + other, self.terms, self.base)
        return NotImplemented

    __radd__ = __add__

    def __mul__(self, k: Number) -> "Expr":
        if not isinstance(k, numbers.Real) or isinstance(k, bool):
            return NotImplemented
        if self.base is not None:
            raise TypeError("cannot scale an address")
        return Expr(self.const * k, tuple((name, c * k) for name, c in self.terms))

    __rmul__ = __mul__

    def __str__(self) -> str:
        parts = ([self.base.name] if self.base is not None else []) + \
                [f"{k}*{name}" if k != 1 else name for name, k in self.terms]
        return " + ".join(parts + ([str(self.const)] if self.const or not parts else []))


Arg = View | DeviceArray | Expr | Number


def offset(view: View, byte_offset: Expr | int) -> View | Expr:
    """The address ``byte_offset`` bytes into ``view``: a plain view when the offset is fixed."""
    if isinstance(byte_offset, Expr):
        return Expr(base=view) + byte_offset
    return view.shifted(byte_offset)


def _resolve(arg: Arg, values: dict[str, Number]) -> Any:
    if isinstance(arg, Expr):
        return arg.evaluate(values)
    return arg.ptr if isinstance(arg, (View, DeviceArray)) else arg


_EVERYWHERE = (0, 1 << 64)  # a bare address: the whole address space


def _extent(arg: Arg, values: dict[str, Number]) -> tuple[int, int]:
    """(address, bytes) a pointer argument reaches: a view's bytes; an expression's, up to the end
    of the buffer it is based on; a bare address, unknown, so the whole address space."""
    if isinstance(arg, Expr):
        at = int(arg.evaluate(values))
        return (at, arg.base.ptr + arg.base.nbytes - at) if arg.base is not None else (at, 0)
    if isinstance(arg, (View, DeviceArray)):
        return arg.ptr, arg.nbytes
    return _EVERYWHERE


def _span(arg: Arg) -> tuple[int, int]:
    """(address, bytes) a pointer argument may reach at any values: a view's bytes; an
    expression's whole base buffer; a bare address (or one computed from values alone), anywhere."""
    if isinstance(arg, (View, DeviceArray)):
        return arg.ptr, arg.nbytes
    if isinstance(arg, Expr) and arg.base is not None:
        return arg.base.ptr, arg.base.nbytes
    return _EVERYWHERE


def _label(arg: Arg) -> str:
    if isinstance(arg, (View, DeviceArray)):
        return getattr(arg, "name", "") or repr(arg)
    return str(arg)


def _names(args: Sequence[Arg]) -> set[str]:
    return set().union(*(a.names() for a in args if isinstance(a, Expr)))


class Step:
    """One kernel launch of a plan: the spec, the grid, the arguments by name, what it reads and writes."""

    def __init__(self, label: str, section: str, spec: KernelSpec, launch: Launch, grid: tuple[Arg, ...],
                 args: dict[str, Arg], operands: dict[str, Arg]):
        self.label, self.section, self.spec, self.launch = label, section, spec, launch
        self.grid_args, self.args = grid, args
        self.operands = operands  # what pointer arguments stand for, e.g. a tensor map's matrix
        self.values = _names([*grid, *args.values()])

    kind = property(lambda self: self.spec.kind)
    kernel = property(lambda self: self.launch.kernel)
    grid = property(lambda self: self.launch.grid)

    def pointers(self) -> dict[str, str]:
        types = dict(self.spec.params())
        return {name: _label(self.operands.get(name, arg)) for name, arg in self.args.items()
                if types[name] is T.U64}

    def writes(self) -> dict[str, str]:
        """Parameter -> the buffer it names, for every pointer the kernel writes through."""
        return {n: b for n, b in self.pointers().items() if n in self.spec.outputs()}

    def reads(self) -> dict[str, str]:
        """Parameter -> the buffer it names, for every pointer the kernel reads what was there
        before it through: its inputs, and the outputs it also reads (``read_outputs``)."""
        outputs, updated = self.spec.outputs(), self.spec.read_outputs()
        return {n: b for n, b in self.pointers().items() if n not in outputs or n in updated}

    def extents(self, values: dict[str, Number], reads: bool = False) -> list[tuple[int, int]]:
        """(address, bytes) of every region the step writes (``reads``: reads, ``reads()``'s), at
        ``values``: each such buffer (a tensor map: its matrix), from its address to the end of the
        buffer the expression is based on."""
        return [_extent(arg, values) for arg in self._touched(reads)]

    def spans(self, reads: bool = False) -> list[tuple[int, int]]:
        """``extents`` at any values (``_span``): what a graph's dependencies are made from."""
        return [_span(arg) for arg in self._touched(reads)]

    def _touched(self, reads: bool) -> list[Arg]:
        """The arguments the step writes through (``reads``: reads through), a tensor map's as its matrix."""
        names = list(self.reads()) if reads else self.spec.outputs()
        return [self.operands.get(name, self.args[name]) for name in names]

    def resolve(self, values: dict[str, Number]) -> None:
        for name, arg in self.args.items():
            if isinstance(arg, Expr) and arg.names() & self.values:
                self.launch.set(name, arg.evaluate(values))
        if _names(self.grid_args):
            self.launch.set_grid(tuple(int(_resolve(g, values)) for g in self.grid_args))

    def __call__(self) -> None:
        self.launch()

    def describe(self) -> str:
        scalars = {n: str(a) for n, a in self.args.items() if n not in self.pointers()}
        return (f"{self.section:>9} {self.label:<44} {self.kind:<20} grid {self.launch.grid} "
                f"reads {self.reads()} writes {self.writes()} {scalars}")


class Fill:
    """Set ``words`` 32-bit words of ``target`` to ``bits`` (a memset: zeroing a gradient)."""

    kind = "fill"

    def __init__(self, label: str, section: str, target: View, words: int, bits: int):
        self.label, self.section, self.target, self.words, self.bits = label, section, target, words, bits
        self.values: set[str] = set()
        self.grid = (1, 1, 1)

    def writes(self) -> dict[str, str]:
        return {"dst": self.target.name}

    def reads(self) -> dict[str, str]:
        return {}

    def extents(self, values: dict[str, Number], reads: bool = False) -> list[tuple[int, int]]:
        return [] if reads else [(self.target.ptr, 4 * self.words)]

    def spans(self, reads: bool = False) -> list[tuple[int, int]]:
        return self.extents({}, reads)

    def resolve(self, values: dict[str, Number]) -> None:
        pass

    def __call__(self) -> None:
        fill_u32(self.target.ptr, self.bits, self.words)

    def describe(self) -> str:
        return f"{self.section:>9} {self.label:<44} fill {self.words} words of {self.target.name} with 0x{self.bits:x}"


class Host:
    """A call on the host between launches (a collective over the GPUs: it enqueues its work on the
    stream the plan runs on, or stages through the host), with the buffers it reads and writes."""

    kind = "host"

    def __init__(self, label: str, section: str, fn: Any, reads: Sequence[View], writes: Sequence[View],
                 sets: Sequence[str] = ()):
        self.label, self.section, self.fn = label, section, fn
        self._reads, self._writes = tuple(reads), tuple(writes)
        self.values: set[str] = set()
        self.sets = frozenset(sets)  # the plan values it sets for the launches after it
        self.grid = (1, 1, 1)

    def writes(self) -> dict[str, str]:
        return {f"out{i}": v.name for i, v in enumerate(self._writes)}

    def reads(self) -> dict[str, str]:
        return {f"in{i}": v.name for i, v in enumerate(self._reads)}

    def extents(self, values: dict[str, Number], reads: bool = False) -> list[tuple[int, int]]:
        return [(v.ptr, v.nbytes) for v in (self._reads if reads else self._writes)]

    def resolve(self, values: dict[str, Number]) -> None:
        pass

    def __call__(self) -> None:
        self.fn()

    def describe(self) -> str:
        return f"{self.section:>9} {self.label:<44} host: writes {', '.join(v.name for v in self._writes)}"


class Plan:
    """An ordered list of steps over named values; see the module docstring."""

    def __init__(self, cache: ModuleCache):
        self.cache = cache
        self.steps: list[Step | Fill | Host] = []
        self.section = "main"  # the section the next steps join
        self._values: dict[str, Number] = {}
        self._unset: set[str] = set()
        self._kept: list[DeviceArray] = []
        self._graphs: dict[tuple[tuple[str, ...], int], Graph] = {}  # (sections, segment)
        self._split: dict[tuple[str, ...], list] = {}  # sections -> their segments, for graph runs
        self._readers: tuple[int, dict[str, list]] = (0, {})  # (steps indexed, value name -> steps reading it)

    def value(self, name: str, initial: Number) -> Expr:
        """A named per-run value; ``initial`` only shapes the launches until the first ``set``."""
        if name in self._values:
            raise ValueError(f"plan value {name!r} is declared twice")
        self._values[name] = initial
        self._unset.add(name)
        return Expr(terms=((name, 1),))

    def keep(self, array: DeviceArray) -> DeviceArray:
        """An array the plan's launches use (a tensor map), freed with the plan."""
        self._kept.append(array)
        return array

    def add(self, spec: KernelSpec, dims: tuple[Any, Any], *, label: str,
            operands: dict[str, Arg] | None = None, **args: Arg) -> Step:
        grid, block = dims
        grid = (grid,) if not isinstance(grid, tuple) else grid
        unknown = _names([*grid, *args.values()]) - set(self._values)
        if unknown:
            raise ValueError(f"{label}: plan values {', '.join(sorted(unknown))} were never declared")
        kernel = self.cache.get(spec)
        launch = kernel.bind_named(tuple(int(_resolve(g, self._values)) for g in grid), block,
                                   {n: _resolve(a, self._values) for n, a in args.items()})
        step = Step(label, self.section, spec, launch, grid, args, operands or {})
        self.steps.append(step)
        return step

    def fill(self, target: View, words: int, bits: int = 0, *, label: str) -> Fill:
        step = Fill(label, self.section, target, words, bits)
        self.steps.append(step)
        return step

    def host(self, fn: Any, *, label: str, reads: Sequence[View] = (), writes: Sequence[View] = (),
             sets: Sequence[str] = ()) -> Host:
        """``fn()`` on the host at this point of every run (a graph run launches the launches
        between host steps as graphs of their own, each as soon as the host reaches it: a host
        step runs while the GPU still runs the launches before it). ``sets``: the plan values
        ``fn`` sets (``set``) for the launches after it, which a run then need not be given."""
        unknown = set(sets) - set(self._values)
        if unknown:
            raise ValueError(f"{label}: plan values {', '.join(sorted(unknown))} were never declared")
        step = Host(label, self.section, fn, reads, writes, sets)
        self.steps.append(step)
        return step

    def insert_host(self, after: Step | Fill | Host, fn: Any, *, label: str, reads: Sequence[View] = (),
                    writes: Sequence[View] = ()) -> Host:
        """A host step in ``after``'s section, run just after it (and after host steps already
        placed there: several placed after one step run in the order placed). Before any run:
        graphs already built would not know of it."""
        if self._graphs:
            raise RuntimeError(f"{label}: a host step inserted after the plan's graphs were built")
        at = next(i for i, s in enumerate(self.steps) if s is after) + 1
        while at < len(self.steps) and isinstance(self.steps[at], Host):
            at += 1
        step = Host(label, after.section, fn, reads, writes)
        self.steps.insert(at, step)
        self._split.clear()
        return step

    def set(self, **values: Number) -> None:
        """Set named values; every step that reads one that changes is updated (and so is every
        graph of it: a replay's node updates are the host's work before the GPU's)."""
        unknown = set(values) - set(self._values)
        if unknown:
            raise ValueError(f"no plan value {', '.join(sorted(unknown))}")
        values = {k: v for k, v in values.items() if k in self._unset or self._values[k] != v}
        self._values.update(values)
        self._unset -= set(values)
        if self._readers[0] != len(self.steps):  # (steps are only ever added)
            readers: dict[str, list] = {}
            for step in self.steps:
                for name in step.values:
                    readers.setdefault(name, []).append(step)
            self._readers = (len(self.steps), readers)
        for step in dict.fromkeys(s for name in values for s in self._readers[1].get(name, ())):
            step.resolve(self._values)
            for graph in self._graphs.values():
                graph.touch(step)

    def of(self, *sections: str) -> list[Step | Fill | Host]:
        """The steps of ``sections`` (all when none is named), in plan order."""
        return [s for s in self.steps if not sections or s.section in sections]

    def __iter__(self) -> Iterator[Step | Fill | Host]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def run(self, *sections: str, graph: bool = False) -> None:
        """Launch the steps of ``sections`` one by one, or as their CUDA graph (built once)."""
        steps = self.of(*sections)
        needed, set_before = set(), set()  # (a host step sets its values for the launches after it)
        for step in steps:
            needed |= (step.values - set_before) & self._unset
            set_before |= step.sets if isinstance(step, Host) else set()
        if needed:
            raise RuntimeError(f"plan values {', '.join(sorted(needed))} must be set before a run")
        if not graph:
            for step in steps:
                step()
            return
        for i, segment in enumerate(self._segments_of(sections, steps)):
            if isinstance(segment, Host):
                segment()
            else:
                self.graph(*sections, segment=i).launch()

    def _segments_of(self, sections: tuple[str, ...], steps: list[Step | Fill | Host]) -> list:
        """``_segments(steps)``, kept per ``sections`` (the plan's steps are fixed once it runs)."""
        if sections not in self._split:
            self._split[sections] = _segments(steps)
        return self._split[sections]

    def graph(self, *sections: str, segment: int | None = None) -> Graph:
        """The launches of ``sections`` as one CUDA graph, kept up to date by ``set``; where host
        steps split them, the ``segment``-th part of ``_segments`` (which must be named)."""
        if segment is not None and (sections, segment) in self._graphs:  # a graph run's every segment, every step
            return self._graphs[(sections, segment)]
        steps = self.of(*sections)
        if segment is None:
            if any(isinstance(s, Host) for s in steps):
                raise ValueError(f"{sections or 'the plan'} has host steps: name the segment to capture")
            part, segment = steps, 0
        else:
            part = _segments(steps)[segment]
            if isinstance(part, Host):
                raise ValueError(f"segment {segment} of {sections or 'the plan'} is a host step")
        if (sections, segment) not in self._graphs:
            self._graphs[(sections, segment)] = Graph(part, dependencies(part))
        return self._graphs[(sections, segment)]

    def last_writer(self, start: int, size: int, *sections: str) -> int | None:
        """The index in ``of(*sections)`` of the last step that writes into [start, start + size)
        (None: no step does): after it, the region is final (say, a bucket of gradients that a
        communication hook may send)."""
        writers = [i for i, step in enumerate(self.of(*sections)) if self._touches(step, start, size)]
        return writers[-1] if writers else None

    def readers(self, start: int, size: int, *sections: str) -> list[Step | Fill | Host]:
        """The steps of ``of(*sections)`` that read from [start, start + size) (say, to prove that
        none reads a buffer left stale there)."""
        return [step for step in self.of(*sections) if self._touches(step, start, size, reads=True)]

    def _touches(self, step: Step | Fill | Host, start: int, size: int, reads: bool = False) -> bool:
        """Whether ``step`` writes (``reads``: reads) any of [start, start + size)."""
        return any(at < start + size and start < at + n for at, n in step.extents(self._values, reads))

    def describe(self) -> list[str]:
        return [step.describe() for step in self.steps]

    def free(self) -> None:
        for graph in self._graphs.values():
            graph.destroy()
        self._graphs.clear()
        for array in self._kept:
            array.free()
        self._kept.clear()


def dependencies(steps: Sequence[Step | Fill]) -> list[list[int]]:
    """For each step, the earlier steps it must run after, so that a graph of them may run the
    others at once: the last to write what it reads or writes, and those that read what it writes
    since (each region as ``spans`` gives it: at any values); and, for a launch whose blocks wait
    for one another (``KernelSpec.blocks_wait``), the last such launch. None implied by another
    (a step that one of the others already runs after is left out)."""
    writes, reads = [s.spans() for s in steps], [s.spans(reads=True) for s in steps]
    ancestors: list[int] = []  # bit i: step i runs before
    out: list[list[int]] = []
    waiting = None
    for j, step in enumerate(steps):
        direct = {i for i in range(j) if _overlap(writes[i], reads[j] + writes[j]) or _overlap(reads[i], writes[j])}
        if getattr(step, "spec", None) is not None and step.spec.blocks_wait():
            if waiting is not None:
                direct.add(waiting)
            waiting = j
        implied = 0
        for i in direct:
            implied |= ancestors[i]
        kept = sorted(i for i in direct if not implied >> i & 1)
        for i in kept:
            implied |= 1 << i
        ancestors.append(implied)
        out.append(kept)
    return out


def _overlap(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> bool:
    return any(x < y + m and y < x + n for x, n in a for y, m in b if n and m)


def _segments(steps: list[Step | Fill | Host]) -> list[list[Step | Fill] | Host]:
    """The runs of launches between host steps, and the host steps, in order."""
    out: list[list[Step | Fill] | Host] = []
    for step in steps:
        if isinstance(step, Host):
            out.append(step)
        elif out and isinstance(out[-1], list):
            out[-1].append(step)
        else:
            out.append([step])
    return out
