"""Probe (device): SwiGLU's sigmoid with flush-to-zero ex2 / rcp (one MUFU op each, no subnormal fix-ups)
in the two fused GEMM epilogues (gate/up forward + act, down dX + SwiGLU backward), against as they are;
and how far the results move (max |diff| in bf16 ulps of the output, count of differing elements)."""
import contextlib, dataclasses, sys
import torch
sys.path.insert(0, "bench")
import ptxgen.builder as pb
import ptxgen.kernels.swiglu as sw
import ptxgen.kernels.gemm_wgmma as gw
from ptxgen.builder import T
from ptxgen.exact import LOG2E_F32
from runtime import ModuleCache
import runtime.cache as rc
from runtime.tensormap import gemm_c_tensor_map
from bench_compute import time_gemm

pb._FN_MODES[("rcp", T.F32)] = ("approx", "rn", "approx.ftz")
pb._FN_MODES[("ex2", T.F32)] = ("approx", "approx.ftz")
orig = sw.sigmoid


def sigmoid_ftz(ex2_mode, rcp_mode):
    return lambda b, g: b.fn("rcp", b.add(b.fn("ex2", b.mul(g, -LOG2E_F32), ex2_mode), 1.0), rcp_mode)


@contextlib.contextmanager
def using(fn):
    sw.sigmoid = fn
    try:
        yield
    finally:
        sw.sigmoid = orig


def t(spec, a, b, c, m, n, k, **kw):
    rc._TEXTS.clear()  # the patched emitters make other PTX under the same key: this probe's own doing
    return [time_gemm(ModuleCache(use_disk=False), spec, a, b, c, m, n, k, **kw) for _ in range(3)]


variants = [("as is", orig), ("ex2 ftz", sigmoid_ftz("approx.ftz", "approx")),
            ("rcp ftz", sigmoid_ftz("approx", "approx.ftz")), ("both ftz", sigmoid_ftz("approx.ftz", "approx.ftz"))]
torch.manual_seed(0)
# down dX + SwiGLU backward
m, n, k = 8192, 4864, 896
a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
gate_up = (torch.randn(m, 2 * n, device="cuda") * 4).to(torch.bfloat16)
spec = gw.GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=5, trans_b=False, tma_store=True, swiglu_grad=True)
gmap = gemm_c_tensor_map(spec, gate_up.data_ptr(), m, n)
ref = None
for label, fn in variants:
    out = torch.empty(m, 2 * n, device="cuda", dtype=torch.bfloat16)
    with using(fn):
        ms = t(spec, a, b, out, m, n, k, gate_up=gmap.ptr)
    ref = out.clone() if ref is None else ref
    diff = (out.float() - ref.float()).abs()
    print(f"down dX + SwiGLU bwd, {label}: {' / '.join(f'{x:.4f}' for x in ms)} ms; differing {int((out != ref).sum())}, "
          f"max |diff| {diff.max().item():.3g}", flush=True)
# gate/up forward + act
m, n, k = 8192, 9728, 896
a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
spec = gw.GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=5, bf16_out=True, tma_store=True, swiglu_act=True)
act = torch.empty(m, n // 2, device="cuda", dtype=torch.bfloat16)
amap = gemm_c_tensor_map(spec, act.data_ptr(), m, n, act=True)
c = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
plain = gw.GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, stages=6, bf16_out=True, tma_store=True)
print(f"gate/up fwd plain bf16 C: {' / '.join(f'{x:.4f}' for x in t(plain, a, b, c, m, n, k))} ms", flush=True)
ref = None
for label, fn in variants:
    with using(fn):
        ms = t(spec, a, b, c, m, n, k, act=amap.ptr)
    ref = act.clone() if ref is None else ref
    diff = (act.float() - ref.float()).abs()
    print(f"gate/up fwd + act, {label}: {' / '.join(f'{x:.4f}' for x in ms)} ms; act differing {int((act != ref).sum())}, "
          f"max |diff| {diff.max().item():.3g}", flush=True)
