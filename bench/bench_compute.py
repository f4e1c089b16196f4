"""GEMM and attention benchmark (GPU machine): our kernels beside torch in the same process.

    PYTHONPATH=$PWD python3 bench/bench_compute.py [--json FILE] [--only SECTION ...]

fp32 GEMM is compared with torch.matmul with TF32 disabled (the same arithmetic), the bf16/fp16
tensor-core GEMM (fp32 accumulate) with torch.matmul in that type; attention with
F.scaled_dot_product_attention in fp32 (causal, GQA through repeated K/V heads). Figures are
TFLOP/s of the useful work: 2*M*N*K for a GEMM; for causal attention forward 4*B*H*S^2*D/2,
backward 2.5x that (the convention FlashAttention's benchmarks use).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from harness import time_ms, write_json
from model.kernels import WGMMA_TILE
from ptxgen.kernels.attention import AttentionBackwardKVSpec, AttentionBackwardQSpec, AttentionSpec
from ptxgen.kernels.cast import CastSpec
from ptxgen.kernels.attention_tc import AttentionTCBackwardKVSpec, AttentionTCBackwardQSpec, AttentionTCSpec
from ptxgen.kernels.attention_wgmma import AttentionWgmmaBackwardKVSpec, AttentionWgmmaBackwardQSpec, AttentionWgmmaSpec
from ptxgen.kernels.gemm import GemmSpec
from ptxgen.kernels.gemm_tc import GemmTCSpec, MmaType
from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
from ptxgen.kernels.rope import RopeSpec
from ptxgen.spec import SpecError
from ptxgen.vecio import DType
from runtime import ModuleCache
from runtime.tensormap import gemm_c_tensor_map, gemm_tensor_maps

TOKENS = 16384  # Qwen2-0.5B layer shapes: M = batch * seq tokens
LAYERS = [("qkv (q, k and v as one)", 896, 1152), ("o_proj", 896, 896),
          ("gate_up (gate and up as one)", 896, 9728), ("down", 4864, 896), ("lm_head", 896, 151936)]
TILES = [dict(), dict(block_m=128, block_n=64), dict(block_m=64, block_n=128),
         dict(block_m=64, block_n=64, thread_m=4, thread_n=8)]


@dataclass
class Row:
    name: str
    flops: float
    ours_ms: float
    torch_ms: float

    def as_dict(self) -> dict:
        return {**self.__dict__, "ours_TFLOPs": self.flops / self.ours_ms / 1e9,
                "torch_TFLOPs": self.flops / self.torch_ms / 1e9, "ratio_vs_torch": self.torch_ms / self.ours_ms}


TC_TILES = [dict(), dict(min_blocks=2), dict(block_k=64, stages=3), dict(block_k=64, stages=3, min_blocks=2),
            dict(block_n=256), dict(block_n=256, stages=3), dict(block_n=256, block_k=64, stages=3),
            dict(block_m=256, warps_m=4, warps_n=2)]
TORCH_16 = {MmaType.BF16: torch.bfloat16, MmaType.F16: torch.float16, MmaType.TF32: torch.float32}


WGMMA_TILES = [dict(), dict(block_n=128), dict(tma=True), dict(tma=True, stages=3), dict(tma=True, group_m=16),
               dict(tma=True, block_n=128, stages=6), dict(tma=True, pingpong=True, block_n=128, stages=6),
               dict(tma=True, pingpong=True, block_n=128, stages=4)]
LAYOUT_NAMES = {(False, True): "NT", (False, False): "NN", (True, False): "TN", (True, True): "TT"}


def time_gemm(cache: ModuleCache, spec: GemmTCSpec | GemmWgmmaSpec, a: torch.Tensor, b: torch.Tensor,
              c: torch.Tensor, m: int, n: int, k: int, tail_parts: int | None = None, **arguments: int) -> float:
    """Milliseconds of one launch of ``spec`` on A, B into C (``arguments``: its other pointers, say
    ``stats``). A tma kernel reads the operands through tensor maps (and, ``tma_store``, writes C
    through one), and its blocks persist; a ``split_tail`` one cuts its tail into ``tail_parts``
    (default: as the spec picks) through a workspace of its own."""
    maps: list = []
    try:
        if spec.tma:
            maps += gemm_tensor_maps(spec, a.data_ptr(), b.data_ptr(), m, n, k)
        if spec.tma_store:
            maps.append(gemm_c_tensor_map(spec, c.data_ptr(), m, n))
        operands = tuple(x.ptr for x in maps[:2]) or (a.data_ptr(), b.data_ptr())
        c_arg = maps[2].ptr if spec.tma_store else c.data_ptr()
        kernel = cache.get(spec)
        dims = spec.launch_dims(m, n, resident=kernel.resident_blocks(spec.threads))
        if spec.split_tail:
            blocks = dims[0][0]
            partial_bytes, flag_bytes = spec.tail_workspace(blocks)
            partials = torch.empty(partial_bytes // 4, device="cuda")
            flags = torch.zeros(flag_bytes // 4, device="cuda", dtype=torch.int32)
            parts = spec.tail_parts(m, n, k, blocks) if tail_parts is None else tail_parts
            arguments = dict(arguments, partials=partials.data_ptr(), flags=flags.data_ptr(), tail_parts=parts,
                             blocks=blocks)
        return time_ms(kernel.bind(*dims, *spec.arguments(*operands, c_arg, m, n, k, **arguments)),
                       reps=10, warmup=2)
    finally:
        for x in maps:
            x.free()


def gemm_tc(cache: ModuleCache, rows: list, dtype: MmaType, m: int, n: int, k: int, wgmma: bool = False,
            trans_a: bool = False, trans_b: bool = True, label: str = "") -> None:
    """C = op(A) op(B) on tensor cores (mma.sync, or ``wgmma``) at its fastest tile, beside
    torch.matmul (cuBLAS) in the same type. The cp.async wgmma kernel serves only NT."""
    a = torch.randn(*((k, m) if trans_a else (m, k)), device="cuda", dtype=TORCH_16[dtype])
    b = torch.randn(*((n, k) if trans_b else (k, n)), device="cuda", dtype=TORCH_16[dtype])
    c = torch.empty(m, n, device="cuda")
    best = None
    for tile in WGMMA_TILES if wgmma else TC_TILES:
        try:
            spec = (GemmWgmmaSpec if wgmma else GemmTCSpec)(dtype=dtype, trans_a=trans_a, trans_b=trans_b, **tile)
        except SpecError:
            continue
        ms = time_gemm(cache, spec, a, b, c, m, n, k)
        print(f"  {spec.kind} {dtype.value} {m}x{n}x{k} {tile or 'default'}: {2e-9 * m * n * k / ms:.1f} TFLOP/s")
        best = min(best or (ms, spec), (ms, spec), key=lambda t: t[0])
    at, bt = (a.t() if trans_a else a), (b.t() if trans_b else b)
    torch.backends.cuda.matmul.allow_tf32 = dtype is MmaType.TF32  # cuBLAS TF32 beside ours
    theirs = time_ms(lambda: torch.matmul(at, bt), reps=10, warmup=2)
    torch.backends.cuda.matmul.allow_tf32 = False
    s = best[1]
    feed = (", tma" if s.tma else "") + (", pingpong" if getattr(s, "pingpong", False) else "")
    rows.append(Row(f"{label}{s.kind} {dtype.value} {LAYOUT_NAMES[trans_a, trans_b]} {m}x{n}x{k} "
                    f"[{s.block_m}x{s.block_n}x{s.k_elems}, {s.stages} st{feed}]", 2.0 * m * n * k, best[0], theirs))


def lm_head_row_stats(cache: ModuleCache, rows: list) -> None:
    """An LM head forward with each 128-column tile's row (max, sum of exp) for the cross-entropy
    (``row_stats``), its logits in f32 (the bf16 model's own stores them in bf16 through shared
    memory: ``model-gemms`` times that one), beside the same GEMM without them and cuBLAS, at the
    model's tile. cuBLAS is torch.matmul in bf16: its C is bf16, half the bytes."""
    m, n, k = TOKENS, 151936, 896
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(m, n, device="cuda")
    stats = torch.empty(-(-n // WGMMA_TILE["block_n"]), m, 2, device="cuda")
    theirs = time_ms(lambda: torch.matmul(a, b.t()), reps=10, warmup=2)
    for row_stats in (False, True):
        spec = GemmWgmmaSpec(tma=True, **WGMMA_TILE, row_stats=row_stats)
        ms = time_gemm(cache, spec, a, b, c, m, n, k, **({"stats": stats.data_ptr()} if row_stats else {}))
        rows.append(Row(f"lm_head fwd: gemm_wgmma bf16 NT {m}x{n}x{k} f32 C{' + row stats' if row_stats else ''}",
                        2.0 * m * n * k, ms, theirs))


ATTN_LAYOUTS = [dict(lanes=1, block=64), dict(lanes=2, block=128), dict(lanes=2, block=256),
                dict(lanes=4, block=128), dict(lanes=4, block=256)]


def attention(cache: ModuleCache, rows: list, bsz: int, s: int, h: int, hkv: int, d: int) -> None:
    """Forward and backward, each at its fastest (lanes, block) layout, beside SDPA in fp32."""
    p = lambda t: t.data_ptr()  # noqa: E731
    q = torch.randn(bsz, s, h, d, device="cuda")
    k, v = torch.randn(bsz, s, hkv, d, device="cuda"), torch.randn(bsz, s, hkv, d, device="cuda")
    o, do, dq = torch.empty_like(q), torch.randn_like(q), torch.empty_like(q)
    lse, delta = torch.empty(bsz, h, s, device="cuda"), torch.empty(bsz, h, s, device="cuda")
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    fwd_best, bwd_best = None, None
    for layout in ATTN_LAYOUTS:
        try:
            fwd, bq, bkv = (cls(heads=h, kv_heads=hkv, head_dim=d, **layout)
                            for cls in (AttentionSpec, AttentionBackwardQSpec, AttentionBackwardKVSpec))
        except SpecError:
            continue
        run_fwd = cache.get(fwd).bind(*fwd.launch_dims(bsz, s), p(q), p(k), p(v), p(o), p(lse), s, s, s, 0)
        run_bq = cache.get(bq).bind(*bq.launch_dims(bsz, s), p(q), p(k), p(v), p(o), p(do), p(lse), p(dq),
                                    p(delta), s)
        run_bkv = cache.get(bkv).bind(*bkv.launch_dims(bsz, s), p(q), p(k), p(v), p(do), p(lse), p(delta),
                                      p(dk), p(dv), s)
        tf = (time_ms(run_fwd, reps=5, warmup=1), layout)
        tb = (time_ms(lambda: (run_bq(), run_bkv()), reps=3, warmup=1), layout)
        fwd_best = min(fwd_best or tf, tf, key=lambda t: t[0])
        bwd_best = min(bwd_best or tb, tb, key=lambda t: t[0])
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k.repeat_interleave(h // hkv, 2),
                                                         v.repeat_interleave(h // hkv, 2)))
    flops = 4.0 * bsz * h * s * s * d / 2
    tag = f"f32 b{bsz} h{h}/{hkv} s{s} d{d}"
    rows.append(Row(f"attention fwd {tag} [lanes {fwd_best[1]['lanes']}, block {fwd_best[1]['block']}]", flops,
                    fwd_best[0], time_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
                                         reps=5, warmup=1)))
    qg, kg, vg = (x.detach().requires_grad_() for x in (qt, kt, vt))
    out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
    gt = torch.randn_like(out)
    rows.append(Row(f"attention bwd {tag} [lanes {bwd_best[1]['lanes']}, block {bwd_best[1]['block']}]",
                    2.5 * flops, bwd_best[0],
                    time_ms(lambda: torch.autograd.grad(out, (qg, kg, vg), gt, retain_graph=True), reps=3, warmup=1)))


TC_ATTN_LAYOUTS = [dict(), dict(warps=8), dict(tile=128), dict(warps=8, tile=128), dict(tile=32)]
WGMMA_ATTN_LAYOUTS = [dict(), dict(tile=128), dict(warps=8), dict(warps=8, tile=128)]
TC_ATTN_BWD_LAYOUTS = [dict(), dict(tile=32), dict(warps=8, tile=32), dict(warps=2, tile=32)]
WGMMA_ATTN_BWD_LAYOUTS = [dict(), dict(tile=32), dict(tile=128), dict(warps=8), dict(warps=8, tile=32),
                          dict(warps=8, tile=128)]
# the dK/dV kernel's also: two warpgroups sharing 64 keys, taking the query tiles in turn
WGMMA_ATTN_KV_LAYOUTS = WGMMA_ATTN_BWD_LAYOUTS + [dict(warps=8, teams=2, tile=t) for t in (32, 64, 128)]


def teams(spec) -> str:
    """A dK/dV layout's teams, for its row's name."""
    return f" {spec.teams} teams" if getattr(spec, "teams", 1) > 1 else ""


def attention_tc(cache: ModuleCache, rows: list, bsz: int, s: int, h: int, hkv: int, d: int) -> None:
    """Tensor-core forward and backward in bf16, each at its fastest layout, beside SDPA in bf16 (causal,
    GQA through repeated K/V heads)."""
    p = lambda t: t.data_ptr()  # noqa: E731
    q = torch.randn(bsz, s, h, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(bsz, s, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    o, lse = torch.empty_like(q), torch.empty(bsz, h, s, device="cuda")
    do = torch.randn_like(q)
    dq, delta = torch.empty(bsz, s, h, d, device="cuda"), torch.empty(bsz, h, s, device="cuda")
    dk, dv = (torch.empty(bsz, s, hkv, d, device="cuda") for _ in range(2))
    def fastest(cls, layouts: list[dict]) -> tuple[float, AttentionTCSpec | AttentionWgmmaSpec]:
        best = None
        for layout in layouts:
            spec = cls(heads=h, kv_heads=hkv, head_dim=d, **layout)
            launch = cache.get(spec).bind(*spec.launch_dims(bsz, s), p(q), p(k), p(v), p(o), p(lse), s, s, s, 0)
            ms = time_ms(launch, reps=10, warmup=2)
            print(f"  {spec.kind} bf16 b{bsz} h{h}/{hkv} s{s} d{d} {layout or 'default'}: "
                  f"{4.0 * bsz * h * s * s * d / 2 / ms / 1e9:.1f} TFLOP/s")
            best = min(best or (ms, spec), (ms, spec), key=lambda t: t[0])
        return best

    best = fastest(AttentionTCSpec, TC_ATTN_LAYOUTS)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k.repeat_interleave(h // hkv, 2),
                                                         v.repeat_interleave(h // hkv, 2)))
    theirs = time_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), reps=10, warmup=2)
    for ms, spec in (best, fastest(AttentionWgmmaSpec, WGMMA_ATTN_LAYOUTS)):
        rows.append(Row(f"{spec.kind} bf16 b{bsz} h{h}/{hkv} s{s} d{d} [{spec.warps} warps, tile {spec.tile}]",
                        4.0 * bsz * h * s * s * d / 2, ms, theirs))
    spec = best[1]
    launch = cache.get(spec).bind(*spec.launch_dims(bsz, s), p(q), p(k), p(v), p(o), p(lse), s, s, s, 0)
    launch()  # o and lse for the backward
    bwd_best = None
    for layout in TC_ATTN_BWD_LAYOUTS:
        try:
            bq, bkv = (cls(heads=h, kv_heads=hkv, head_dim=d, **layout)
                       for cls in (AttentionTCBackwardQSpec, AttentionTCBackwardKVSpec))
        except SpecError:
            continue
        run_q = cache.get(bq).bind(*bq.launch_dims(bsz, s), p(q), p(k), p(v), p(o), p(do), p(lse), p(dq),
                                   p(delta), s)
        run_kv = cache.get(bkv).bind(*bkv.launch_dims(bsz, s), p(q), p(k), p(v), p(do), p(lse), p(delta),
                                     p(dk), p(dv), s)
        ms = time_ms(lambda: (run_q(), run_kv()), reps=5, warmup=1)
        print(f"  attention_tc bwd bf16 b{bsz} h{h}/{hkv} s{s} d{d} {layout or 'default'}: "
              f"{2.5 * 4.0 * bsz * h * s * s * d / 2 / ms / 1e9:.1f} TFLOP/s")
        bwd_best = min(bwd_best or (ms, layout), (ms, layout), key=lambda t: t[0])
    qg, kg, vg = (x.detach().requires_grad_() for x in (qt, kt, vt))
    out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
    gt = torch.randn_like(out)
    bwd_flops = 2.5 * 4.0 * bsz * h * s * s * d / 2
    theirs_bwd = time_ms(lambda: torch.autograd.grad(out, (qg, kg, vg), gt, retain_graph=True), reps=5, warmup=1)
    rows.append(Row(f"attention_tc bwd bf16 b{bsz} h{h}/{hkv} s{s} d{d} {bwd_best[1] or 'default'}",
                    bwd_flops, bwd_best[0], theirs_bwd))

    # the wgmma backward: the dQ and the dK/dV kernel each at its fastest layout (delta, which the
    # dK/dV kernel reads, is the same bits from every dQ layout), then the two timed together
    tensors = dict(q=q, k=k, v=v, o=o, do=do, lse=lse, dq=dq, delta=delta, dk=dk, dv=dv)

    def bind(spec: AttentionWgmmaBackwardQSpec | AttentionWgmmaBackwardKVSpec):
        return cache.get(spec).bind_named(*spec.launch_dims(bsz, s),
                                          {**{n: p(tensors[n]) for n in spec.pointers}, "seq": s})

    chosen = []
    for cls, layouts in ((AttentionWgmmaBackwardQSpec, WGMMA_ATTN_BWD_LAYOUTS),  # dQ first: it writes delta
                         (AttentionWgmmaBackwardKVSpec, WGMMA_ATTN_KV_LAYOUTS)):
        best = None
        for layout in layouts:
            try:
                spec = cls(heads=h, kv_heads=hkv, head_dim=d, **layout)
            except SpecError:  # e.g. two teams' 128-query stages at d128: past shared memory
                continue
            ms = time_ms(bind(spec), reps=5, warmup=1)
            print(f"  {spec.kind} bf16 b{bsz} h{h}/{hkv} s{s} d{d} {layout or 'default'}: {ms:.3f} ms")
            best = min(best or (ms, spec), (ms, spec), key=lambda t: t[0])
        chosen.append(best[1])
    run_q, run_kv = (bind(spec) for spec in chosen)
    rows.append(Row(f"attention_wgmma bwd bf16 b{bsz} h{h}/{hkv} s{s} d{d} "
                    + ", ".join(f"[{what} {spec.warps}w t{spec.tile}{teams(spec)}]"
                                for what, spec in zip(("dq", "dkv"), chosen)),
                    bwd_flops, time_ms(lambda: (run_q(), run_kv()), reps=5, warmup=1), theirs_bwd))


def k_sweep(cache: ModuleCache, m: int = 8192, n: int = 9728) -> None:
    """Where the model's GEMM loses to cuBLAS on short contractions: the gate/up forward's M and N
    (its K is 896) over K from 128 to 8192, ours (the model's tile, f32 C, and bf16 C through TMA
    stores, each as the model stores it) beside cuBLAS; then a least-squares line through our time
    per tile on one SM against the tile's K slices:
    its intercept is what every tile costs whatever its K (epilogue, hand-over, pipeline start),
    its slope the time a slice takes against the tensor cores' own (a tile's FLOP of one slice at
    the rated 989 TFLOP/s shared by the SMs)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tile = GemmWgmmaSpec(tma=True, **WGMMA_TILE)
    tiles = -(-m // tile.block_m) * -(-n // tile.block_n)
    print(f"\n== K sweep, bf16 {m}x{n}xK, {tile.block_m} x {tile.block_n} tiles ({tiles} of them, "
          f"{tiles / sms:.1f} a SM)")
    print(f"  {'K':>6} {'C':>5} {'ours ms':>9} {'ours TFLOP/s':>13} {'cuBLAS TFLOP/s':>15} {'us a tile a SM':>15}")
    for bf16_out in (False, True):
        points = []
        for k in (128, 256, 512, 896, 1792, 3584, 8192):
            a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            c = torch.empty(m, n, device="cuda", dtype=torch.bfloat16 if bf16_out else torch.float32)
            spec = dataclasses.replace(tile, bf16_out=bf16_out, tma_store=bf16_out)  # as the model stores each
            ms = time_gemm(cache, spec, a, b, c, m, n, k)
            theirs = time_ms(lambda: torch.matmul(a, b.t()), reps=10, warmup=2)
            per_tile = ms * 1e3 / (tiles / sms)
            points.append((k // tile.k_elems, per_tile))
            flops = 2.0 * m * n * k
            print(f"  {k:>6} {'bf16' if bf16_out else 'f32':>5} {ms:9.3f} {flops / ms / 1e9:13.1f} "
                  f"{flops / theirs / 1e9:15.1f} {per_tile:15.2f}")
        slope, intercept = np.polyfit(*zip(*points), 1)
        bound = 2.0 * tile.block_m * tile.block_n * tile.k_elems / (989e12 / sms) * 1e6
        print(f"  {'bf16' if bf16_out else 'f32'} C: {intercept:.2f} us a tile whatever its K, {slope:.3f} us a "
              f"slice (the tensor cores' own: {bound:.3f})")


def model_gemms(cache: ModuleCache, rows: list) -> None:
    """The bf16 model's own GEMM specs (qwen2-0.5b, 8192 tokens: the 8 x 1024 step's) as it launches
    them, beside cuBLAS in bf16 (its C in bf16 where ours is); where the spec cuts its tail along
    K (``split_tail``), also the same launch with the tail whole."""
    from model.config import preset
    from model.kernels import ModelKernels
    from model.optim import AdamWSettings
    from model.precision import Precision
    kernels = ModelKernels.of(preset("qwen2-0.5b"), AdamWSettings(), -100, Precision.BF16)
    tokens, sms = 8192, torch.cuda.get_device_properties(0).multi_processor_count
    print(f"\n== the model's bf16 GEMMs at {tokens} tokens: tail cut along K (parts) against whole")
    for lname, k_in, n_out in LAYERS:
        short = lname.split()[0]
        linear = kernels.linear({"qkv": "qkv_proj", "gate_up": "gate_up_proj", "down": "down_proj"}.get(short, short))
        for what, (spec, m, n, k) in zip(("fwd", "dX", "dW"), linear.gemms(tokens, k_in, n_out)):
            a = torch.randn(*((k, m) if spec.trans_a else (m, k)), device="cuda", dtype=torch.bfloat16)
            b = torch.randn(*((n, k) if spec.trans_b else (k, n)), device="cuda", dtype=torch.bfloat16)
            bf16_c = spec.c_dtype.value == "bf16"
            c = torch.empty(m, 2 * n if spec.swiglu_grad else n, device="cuda",
                            dtype=torch.bfloat16 if bf16_c else torch.float32)
            bias = torch.randn(n, device="cuda") if spec.bias else None
            extra = {"bias": bias.data_ptr()} if bias is not None else {}
            maps = []
            if spec.swiglu_grad:  # its gate and up, read through a tensor map of C's geometry
                gate_up = torch.randn(m, 2 * n, device="cuda", dtype=torch.bfloat16)
                maps.append(gemm_c_tensor_map(spec, gate_up.data_ptr(), m, n))
                extra["gate_up"] = maps[-1].ptr
            if spec.swiglu_act:  # its act, stored through a tensor map of its own
                act = torch.empty(m, n // 2, device="cuda", dtype=torch.bfloat16)
                maps.append(gemm_c_tensor_map(spec, act.data_ptr(), m, n, act=True))
                extra["act"] = maps[-1].ptr
            if spec.residual:  # the residual stream it adds, brought in as C leaves (a map of C's geometry)
                residual = torch.randn(m, n, device="cuda")
                if spec.tma_store:
                    maps.append(gemm_c_tensor_map(spec, residual.data_ptr(), m, n))
                extra["residual"] = maps[-1].ptr if spec.tma_store else residual.data_ptr()
            if spec.rope_heads:  # q (C), k and v, each a matrix of its own, at the 1024-token rows' positions
                widths = [w * spec.rope_head_dim for w in (spec.rope_heads, spec.rope_kv_heads)]
                c = torch.empty(m, widths[0], device="cuda", dtype=torch.bfloat16)
                kv = [torch.empty(m, widths[1], device="cuda", dtype=torch.bfloat16) for _ in range(2)]
                positions = torch.arange(m, device="cuda", dtype=torch.int32) % 1024
                table_spec = kernels.rope_table
                table = torch.empty(m, spec.rope_head_dim // 2, 2, device="cuda")
                table_ms = time_ms(cache.get(table_spec).bind(*table_spec.launch_dims(m), positions.data_ptr(),
                                                              table.data_ptr(), m), reps=10, warmup=2)
                extra["rope"] = (kv[0].data_ptr(), kv[1].data_ptr(), table.data_ptr())
            ms = time_gemm(cache, spec, a, b, c, m, n, k, **extra)
            parts = spec.tail_parts(m, n, k, sms)
            whole = time_gemm(cache, spec, a, b, c, m, n, k, tail_parts=1, **extra) if parts > 1 else ms
            for x in maps:
                x.free()
            at, bt = (a.t() if spec.trans_a else a), (b.t() if spec.trans_b else b)
            theirs = time_ms(lambda: torch.matmul(at, bt), reps=10, warmup=2)
            print(f"  {short} {what} {m}x{n}x{k}: tail in {parts}: {ms:.3f} ms, whole: {whole:.3f} ms")
            if spec.swiglu_grad or spec.swiglu_act or spec.residual:  # against the product alone, stored as before
                plain = dataclasses.replace(spec, swiglu_grad=False, swiglu_act=False, residual=False,
                                            tma_store=spec.bf16_out, stages=WGMMA_TILE["stages"])
                product = torch.empty(m, n, device="cuda", dtype=torch.bfloat16 if plain.bf16_out else torch.float32)
                alone = time_gemm(cache, plain, a, b, product, m, n, k)
                what_else = "the residual's add" if spec.residual else \
                    f"the SwiGLU{' backward' if spec.swiglu_grad else ''}"
                print(f"    with {what_else} in its epilogue; the product alone "
                      f"({'bf16' if plain.bf16_out else 'f32'} C): {alone:.3f} ms")
            if spec.rope_heads:  # against the f32 product, RoPE's kernels on q and k and v's cast, as before
                plain = dataclasses.replace(spec, rope_heads=0, rope_kv_heads=0, rope_head_dim=0, **WGMMA_TILE)
                product = torch.empty(m, n, device="cuda")
                alone = time_gemm(cache, plain, a, b, product, m, n, k, bias=extra["bias"]) if spec.bias else \
                    time_gemm(cache, plain, a, b, product, m, n, k)
                after = 0.0
                for start, heads in ((0, spec.rope_heads), (widths[0], spec.rope_kv_heads)):
                    rope = RopeSpec(heads=heads, head_dim=spec.rope_head_dim, theta=table_spec.theta, bf16_out=True,
                                    strided=True)
                    out = c if start == 0 else kv[0]
                    after += time_ms(cache.get(rope).bind(*rope.launch_dims(m), *rope.arguments(
                        product.data_ptr() + 4 * start, out.data_ptr(), positions.data_ptr(), m, n, out.shape[1])),
                        reps=10, warmup=2)
                cast = CastSpec(dst=DType.BF16, strided=True)
                after += time_ms(cache.get(cast).bind(*cast.launch_dims(m * widths[1]), *cast.arguments(
                    product.data_ptr() + 4 * (widths[0] + widths[1]), kv[1].data_ptr(), m, widths[1], n, widths[1])),
                    reps=10, warmup=2)
                print(f"    with RoPE in its epilogue (its angles' table, made once for every layer: {table_ms:.3f} "
                      f"ms); the f32 product alone: {alone:.3f} ms, + RoPE's kernels and v's cast: "
                      f"{alone + after:.3f} ms")
            rows.append(Row(f"model {short} {what} {m}x{n}x{k} [tail in {parts}"
                            f"{', bf16 C' if spec.bf16_out else ''}{' + SwiGLU bwd' if spec.swiglu_grad else ''}"
                            f"{' + SwiGLU' if spec.swiglu_act else ''}{' + RoPE' if spec.rope_heads else ''}"
                            f"{' + residual' if spec.residual else ''}]",
                            2.0 * m * n * k, ms, theirs))


SECTIONS = ["fp32", "mma", "wgmma", "layers", "bf16-layers", "attention", "k-sweep", "model-gemms"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=SECTIONS, help="the sections to run")
    ns = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cache = ModuleCache()
    rows: list[Row] = []

    def gemm(name: str, m: int, n: int, k: int, trans_a: bool, trans_b: bool) -> None:
        a = torch.randn(*((k, m) if trans_a else (m, k)), device="cuda")
        b = torch.randn(*((n, k) if trans_b else (k, n)), device="cuda")
        c = torch.empty(m, n, device="cuda")
        best = None
        for tile in TILES:
            spec = GemmSpec(trans_a=trans_a, trans_b=trans_b, **tile)
            launch = cache.get(spec).bind(*spec.launch_dims(m, n),
                                          *spec.arguments(a.data_ptr(), b.data_ptr(), c.data_ptr(), m, n, k))
            ms = time_ms(launch, reps=10, warmup=2)
            best = min(best or (ms, spec), (ms, spec), key=lambda t: t[0])
        at, bt = (a.t() if trans_a else a), (b.t() if trans_b else b)
        theirs = time_ms(lambda: torch.matmul(at, bt, out=c), reps=10, warmup=2)
        s = best[1]
        rows.append(Row(f"{name} {m}x{n}x{k} [{s.block_m}x{s.block_n}/{s.thread_m}x{s.thread_n}]",
                        2.0 * m * n * k, best[0], theirs))

    if "fp32" in ns.only:
        for size in (4096, 8192):
            gemm("gemm NT (Y = X W^T)", size, size, size, False, True)
    if "mma" in ns.only:
        for dtype in (MmaType.BF16, MmaType.F16):
            for size in (4096, 8192):
                gemm_tc(cache, rows, dtype, size, size, size)
        gemm_tc(cache, rows, MmaType.BF16, TOKENS, 9728, 896)  # the gate/up forward at Qwen2-0.5B shapes
    if "wgmma" in ns.only:
        for size in (4096, 8192):
            gemm_tc(cache, rows, MmaType.BF16, size, size, size, wgmma=True)
        gemm_tc(cache, rows, MmaType.BF16, TOKENS, 9728, 896, wgmma=True)
        for size in (4096, 8192):
            gemm_tc(cache, rows, MmaType.TF32, size, size, size, wgmma=True)
    if "layers" in ns.only:
        for lname, k_in, n_out in LAYERS:
            gemm(f"{lname} fwd", TOKENS, n_out, k_in, False, True)
            gemm(f"{lname} dX", TOKENS, k_in, n_out, False, False)
            gemm(f"{lname} dW", n_out, k_in, TOKENS, True, False)
    if "bf16-layers" in ns.only:  # the same shapes in bf16 on both tensor-core paths
        for lname, k_in, n_out in LAYERS:
            for what, (m, n, k), layout in (("fwd", (TOKENS, n_out, k_in), (False, True)),
                                            ("dX", (TOKENS, k_in, n_out), (False, False)),
                                            ("dW", (n_out, k_in, TOKENS), (True, False))):
                for wgmma in (False, True):
                    gemm_tc(cache, rows, MmaType.BF16, m, n, k, wgmma, *layout, label=f"{lname} {what}: ")
        lm_head_row_stats(cache, rows)
    if "k-sweep" in ns.only:
        k_sweep(cache)
    if "model-gemms" in ns.only:
        model_gemms(cache, rows)
    if "attention" in ns.only:
        for d in (64, 128):
            attention(cache, rows, 8, 2048, 14, 2, d)
            attention_tc(cache, rows, 8, 2048, 14, 2, d)
        attention_tc(cache, rows, 8, 1024, 14, 2, 64)  # the model's at 8 x 1024

    print("\n== compute-bound kernels vs torch (fp32 rows with TF32 off; gemm_tc and attention_tc rows in bf16/f16)")
    print(f"  {'kernel':<64} {'ours ms':>9} {'ours TFLOP/s':>13} {'torch TFLOP/s':>14} {'ours/torch':>10}")
    for r in rows:
        x = r.as_dict()
        print(f"  {r.name:<64} {r.ours_ms:9.3f} {x['ours_TFLOPs']:13.1f} {x['torch_TFLOPs']:14.1f} "
              f"{x['ratio_vs_torch']:9.2f}x")
    write_json(ns.json, {"rows": [r.as_dict() for r in rows]})


if __name__ == "__main__":
    main()
