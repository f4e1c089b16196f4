"""AdamW over a flat f32 parameter buffer, and the gradient global norm with clip-by-scale.

Betas, eps and weight decay are baked in; lr and the bias corrections (1 - beta^step) are
arguments, so one module serves every step. The gradient is multiplied by a device-side clip
scale written by the norm kernels, so clipping needs no host round trip. The norm is two fixed-
order stages (per-block partial sums of squares, then one block), hence deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import numpy as np

from .. import exact
from ..builder import Addr, KernelBuilder, T
from ..reductions import block_allreduce, tree_sum
from ..registry import register
from ..spec import KernelSpec, SpecError
from ..vecio import DType, flat_elementwise, flat_grid, load_f32, offset, store_f32
from .common import MAX_LOOP_BOUND, check_at_most, check_block_size, check_f32, check_positive

VEC = 4
UNROLL = 4  # independent accumulators (and loads in flight) per thread; fixed, so the sum is too
MAX_UNROLLED_LOADS = 64  # grad_norm_final: partials per thread
NORM_EPS = 1e-6  # clip scale = min(1, max_norm / (norm + NORM_EPS)), as torch's clip_grad_norm_


@register
@dataclass(frozen=True)
class AdamWSpec(KernelSpec):
    kind: ClassVar[str] = "adamw"
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    block_size: int = 256
    bf16_copy: bool = False  # also write the updated parameters in bf16 (param16): the GEMMs' copy

    def validate(self) -> None:
        for name in ("beta1", "beta2"):
            beta = getattr(self, name)
            if not 0.0 <= beta < 1.0:
                raise SpecError(f"{name} must be in [0, 1), got {beta!r}")
            if check_f32(name, beta) == 1.0:  # the kernel bakes beta and 1 - beta as f32
                raise SpecError(f"{name} {beta!r} rounds to 1 in f32: the moment would never decay")
            check_f32(f"1 - {name}", float(exact.f32(1 - Fraction(beta))))
        check_f32("eps", self.eps, positive=True)
        if self.weight_decay < 0:
            raise SpecError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        check_f32("weight_decay", self.weight_decay)
        check_block_size(self.block_size)

    def launch_dims(self, n: int) -> tuple[int, int]:
        return flat_grid(n, VEC, self.block_size), self.block_size

    def params(self) -> tuple[tuple[str, T], ...]:
        return (("param", T.U64),) + ((("param16", T.U64),) if self.bf16_copy else ()) + (
            ("grad", T.U64), ("exp_avg", T.U64), ("exp_avg_sq", T.U64), ("clip", T.U64), ("n", T.U32),
            ("lr", T.F32), ("bias_correction1", T.F32), ("bias_correction2", T.F32))

    def outputs(self) -> tuple[str, ...]:
        return ("param",) + (("param16",) if self.bf16_copy else ()) + ("exp_avg", "exp_avg_sq")

    def read_outputs(self) -> tuple[str, ...]:
        return ("param", "exp_avg", "exp_avg_sq")

    def build(self, b: KernelBuilder) -> None:
        ptr = {n: b.cvta_global(b.ld_param(n)) for n, t in self.params() if t is T.U64}
        lr = b.ld_param("lr")
        step_size = b.div(lr, b.ld_param("bias_correction1"))
        bc2_sqrt = b.fn("sqrt", b.ld_param("bias_correction2"), "rn")
        decay = b.sub(1.0, b.mul(lr, self.weight_decay), T.F32)
        clip = b.ld("global", T.F32, Addr(ptr["clip"]), nc=True)

        def body(e, width, guard):
            at = {n: Addr(offset(b, ptr[n], e, 4)) for n in ("param", "grad", "exp_avg", "exp_avg_sq")}
            p, g, m, v = (load_f32(b, DType.F32, at[n], width, guard=guard)
                          for n in ("param", "grad", "exp_avg", "exp_avg_sq"))
            outs = {"param": [], "exp_avg": [], "exp_avg_sq": []}
            for pk, gk, mk, vk in zip(p, g, m, v):
                gk = b.mul(gk, clip)
                mk = b.fma(mk, self.beta1, b.mul(gk, exact.f32(1 - Fraction(self.beta1))))
                vk = b.fma(vk, self.beta2, b.mul(b.mul(gk, gk), exact.f32(1 - Fraction(self.beta2))))
                denom = b.add(b.div(b.fn("sqrt", vk, "rn"), bc2_sqrt), self.eps)
                pk = b.fma(b.neg(step_size), b.div(mk, denom), b.mul(pk, decay))
                outs["param"].append(pk)
                outs["exp_avg"].append(mk)
                outs["exp_avg_sq"].append(vk)
            for n, vals in outs.items():
                store_f32(b, DType.F32, at[n], vals, guard=guard)
            if self.bf16_copy:
                store_f32(b, DType.BF16, Addr(offset(b, ptr["param16"], e, 2)), outs["param"], guard=guard)

        flat_elementwise(b, b.ld_param("n"), VEC, self.block_size, body)

    @classmethod
    def examples(cls) -> list["AdamWSpec"]:
        return [cls(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1),
                cls(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, block_size=512),
                cls(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, bf16_copy=True)]


@register
@dataclass(frozen=True)
class GradNormPartialSpec(KernelSpec):
    """Stage 1: block k writes the sum of squares of its grid-stride share of a flat f32 buffer.

    The buffer is read as 16-byte vectors (its base must be 16-byte aligned); the last n % 4
    elements are added by thread 0 of block 0.
    """

    kind: ClassVar[str] = "grad_norm_partial"
    blocks: int = 1056  # the grid, baked: the partition (and so the sum) never depends on the device
    block_size: int = 256

    def validate(self) -> None:
        check_positive("blocks", self.blocks)
        check_at_most("blocks", self.blocks, MAX_LOOP_BOUND, "the grid stride stays in 32-bit math")
        check_block_size(self.block_size)

    def launch_dims(self) -> tuple[int, int]:
        return self.blocks, self.block_size

    def params(self) -> tuple[tuple[str, T], ...]:
        return (("grad", T.U64), ("partial", T.U64), ("n", T.U32))

    def outputs(self) -> tuple[str, ...]:
        return ('partial',)

    def build(self, b: KernelBuilder) -> None:
        grad, partial = (b.cvta_global(b.ld_param(n)) for n in ("grad", "partial"))
        n = b.ld_param("n")
        tid, block = b.special("%tid.x"), b.special("%ctaid.x")
        stride = self.blocks * self.block_size  # in vectors of VEC elements
        n_vec = b.shr(n, 2)
        trips = b.div(b.add(n_vec, UNROLL * stride - 1), UNROLL * stride)
        v = b.mad(block, self.block_size, tid)
        accs = [b.mov(0.0, T.F32) for _ in range(UNROLL)]
        with b.loop(trips, "vectors"):
            for u, acc in enumerate(accs):
                vi = b.add(v, u * stride)
                for x in load_f32(b, DType.F32, Addr(offset(b, grad, vi, 4 * VEC)), VEC,
                                  guard=b.setp("lt", vi, n_vec)):
                    b.fma(x, x, acc, out=acc)
            b.add(v, UNROLL * stride, out=v)
        # the last n % 4 elements: thread 0 of block 0
        tail = b.add(b.shl(n_vec, 2), tid)
        last = b.and_(b.setp("lt", tail, n), b.setp("eq", block, 0))
        x = load_f32(b, DType.F32, Addr(offset(b, grad, tail, 4)), 1, guard=last)[0]
        b.fma(x, x, accs[0], out=accs[0])
        total = block_allreduce(b, tree_sum(b, accs), "add", self.block_size, tid)
        b.st("global", Addr(offset(b, partial, block, 4)), total, guard=b.setp("eq", tid, 0))

    @classmethod
    def examples(cls) -> list["GradNormPartialSpec"]:
        return [cls(), cls(blocks=1, block_size=32)]


@register
@dataclass(frozen=True)
class GradNormFinalSpec(KernelSpec):
    """Stage 2 (one block): out[0] = sqrt(sum of partials), out[1] = min(1, max_norm / (norm + 1e-6))."""

    kind: ClassVar[str] = "grad_norm_final"
    partials: int = 1056
    block_size: int = 256

    def validate(self) -> None:
        check_positive("partials", self.partials)
        check_block_size(self.block_size)
        check_at_most("partials", self.partials, MAX_UNROLLED_LOADS * self.block_size,
                      f"each thread's loads are unrolled, at most {MAX_UNROLLED_LOADS}")

    def launch_dims(self) -> tuple[int, int]:
        return 1, self.block_size

    def params(self) -> tuple[tuple[str, T], ...]:
        return (("partial", T.U64), ("out", T.U64), ("max_norm", T.F32))

    def outputs(self) -> tuple[str, ...]:
        return ('out',)

    def build(self, b: KernelBuilder) -> None:
        partial, out = (b.cvta_global(b.ld_param(n)) for n in ("partial", "out"))
        tid = b.special("%tid.x")
        acc = b.mov(0.0, T.F32)
        for k in range(0, self.partials, self.block_size):  # fixed order per thread
            i = b.add(tid, k)
            has = b.setp("lt", i, self.partials)
            v = load_f32(b, DType.F32, Addr(offset(b, partial, i, 4)), 1, guard=has)[0]
            b.add(acc, v, out=acc)
        norm = b.fn("sqrt", block_allreduce(b, acc, "add", self.block_size, tid), "rn")
        scale = b.min(b.div(b.ld_param("max_norm"), b.add(norm, NORM_EPS)), 1.0)
        b.st("global", Addr(out), [norm, scale], guard=b.setp("eq", tid, 0))

    @classmethod
    def examples(cls) -> list["GradNormFinalSpec"]:
        return [cls(), cls(partials=3, block_size=32), cls(partials=5000, block_size=1024)]


def adamw_reference(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay, step,
                    clip=1.0):
    """float64 torch.optim.AdamW step (decoupled weight decay); returns (param, exp_avg, exp_avg_sq)."""
    p, g, m, v = (np.asarray(a, dtype=np.float64) for a in (param, grad, exp_avg, exp_avg_sq))
    g = g * clip
    p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denom = np.sqrt(v) / np.sqrt(1 - beta2 ** step) + eps
    return p - lr / (1 - beta1 ** step) * m / denom, m, v


def grad_norm_reference(grad: np.ndarray, max_norm: float) -> tuple[float, float]:
    norm = float(np.sqrt(np.sum(np.asarray(grad, dtype=np.float64) ** 2)))
    return norm, min(1.0, max_norm / (norm + NORM_EPS))
