"""A launch plan's steps as one CUDA graph, built explicitly node by node through the driver API.

Each step becomes a kernel node (or a memset node) that depends on the steps its plan says it
must follow (``runtime.plan.dependencies``: what it reads or writes was last written, or read,
there), so that steps that touch none of the same memory may run at once (say, a bias's column sum
beside the next GEMM); without them, on the one before, in plan order, as the stream did. A node copies its launch's arguments when it is
made; a step whose named values change is ``touch``ed and its node updated in the instantiated
graph (``cuGraphExecKernelNodeSetParams``: arguments and grid) before the next launch.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

from cuda.bindings import driver as cu

from .driver import call, device
from .launch import Launch
from .memory import Stream, View


class _Kernel(Protocol):
    launch: Launch


class _Memset(Protocol):
    target: View
    words: int
    bits: int


def _kernel_params(launch: Launch) -> Any:
    p = cu.CUDA_KERNEL_NODE_PARAMS()
    p.func = launch.kernel.function
    p.gridDimX, p.gridDimY, p.gridDimZ = launch.grid
    p.blockDimX, p.blockDimY, p.blockDimZ = launch.block
    p.sharedMemBytes = launch.shared
    p.kernelParams = launch.params_address
    return p


def _memset_params(step: _Memset) -> Any:
    p = cu.CUDA_MEMSET_NODE_PARAMS()
    p.dst = step.target.ptr
    p.elementSize, p.value, p.width, p.height, p.pitch = 4, step.bits, step.words, 1, 0
    return p


class Graph:
    """The instantiated graph of ``steps`` (each a plan step with a ``launch``, or a fill), step j
    after the steps ``dependencies[j]`` names (by index; default: the one before it)."""

    def __init__(self, steps: Sequence[_Kernel | _Memset], dependencies: Sequence[Sequence[int]] | None = None):
        context = device().context
        self._graph = call("cuGraphCreate", 0)
        self._nodes: dict[int, tuple[Any, Any]] = {}
        nodes: list[Any] = []
        for j, step in enumerate(steps):
            before = [nodes[i] for i in dependencies[j]] if dependencies is not None else nodes[-1:]
            if hasattr(step, "launch"):
                node = call("cuGraphAddKernelNode", self._graph, before, len(before), _kernel_params(step.launch))
            else:
                node = call("cuGraphAddMemsetNode", self._graph, before, len(before), _memset_params(step), context)
            self._nodes[id(step)] = step, node
            nodes.append(node)
        self._exec = call("cuGraphInstantiate", self._graph, 0)
        self._stale: set[int] = set()

    def touch(self, step: object) -> None:
        """``step``'s arguments or grid changed: update its node before the next launch."""
        if id(step) in self._nodes:
            self._stale.add(id(step))

    def launch(self, stream: Stream | None = None) -> None:
        for key in self._stale:
            step, node = self._nodes[key]
            call("cuGraphExecKernelNodeSetParams", self._exec, node, _kernel_params(step.launch))
        self._stale.clear()
        call("cuGraphLaunch", self._exec, cu.CUstream(0) if stream is None else stream.handle)

    def destroy(self) -> None:
        if self._exec is not None:
            call("cuGraphExecDestroy", self._exec)
            call("cuGraphDestroy", self._graph)
            self._exec = None
