"""Probe (device): does the driver's JIT honor setmaxnreg (a producer warpgroup giving its registers to the
consumers), where nvJitLink (and the driver's linker, cuLink) warn C7504 and ignore it? The swiglu_grad
GEMM's PTX with 384 threads, setmaxnreg.dec 40 on the producer warpgroup and .inc 232 on the consumers,
loaded (1) as the runtime does (cuLink -> cubin) and (2) as PTX straight to cuModuleLoadDataEx (no
link step); each one's JIT log, registers, local bytes, time, and bits against the GEMM + swiglu_bwd."""
import ctypes, sys
import torch
sys.path.insert(0, "bench")
import ptxgen.kernels.gemm_wgmma as gw
from ptxgen.kernels.swiglu import SwiGLUBackwardSpec
from ptxgen.vecio import DType
import runtime.cache as rc
from runtime import ModuleCache
from runtime.tensormap import gemm_c_tensor_map
from bench_compute import time_gemm, time_ms

THREADS = 384


def with_setmaxnreg(ptx: str, threads: int) -> str:
    lines = ptx.splitlines()
    out = []
    for line in lines:
        if line.startswith(".maxntid"):
            line = f".maxntid {THREADS}, 1, 1"
        out.append(line)
        if "bra $L_consumer_" in line:  # only the producer warpgroup's 4 warps fall through here
            out.append("\tsetmaxnreg.dec.sync.aligned.u32 40;")
        if line.startswith("$L_consumer_"):
            out.append("\tsetmaxnreg.inc.sync.aligned.u32 232;")
    return "\n".join(out) + "\n"


libcuda = ctypes.CDLL("libcuda.so.1")


def jit_log(ptx: str, link: bool) -> str:
    """The driver's JIT info log (verbose) for ``ptx``: through cuLink (link=True) or cuModuleLoadDataEx."""
    info, err = ctypes.create_string_buffer(1 << 16), ctypes.create_string_buffer(1 << 16)
    opts = (ctypes.c_int * 5)(3, 4, 5, 6, 12)  # INFO_LOG_BUFFER, _SIZE, ERROR_LOG_BUFFER, _SIZE, LOG_VERBOSE
    vals = (ctypes.c_void_p * 5)(ctypes.cast(info, ctypes.c_void_p), ctypes.c_void_p(1 << 16),
                                 ctypes.cast(err, ctypes.c_void_p), ctypes.c_void_p(1 << 16), ctypes.c_void_p(1))
    data = ptx.encode() + b"\0"
    if link:
        state = ctypes.c_void_p()
        opts7 = (ctypes.c_int * 6)(3, 4, 5, 6, 12, 9)  # + CU_JIT_TARGET
        vals7 = (ctypes.c_void_p * 6)(*list(vals), ctypes.c_void_p(rc.cu.CUjit_target.CU_TARGET_COMPUTE_90A.value))
        r = libcuda.cuLinkCreate_v2(6, opts7, vals7, ctypes.byref(state))
        r2 = libcuda.cuLinkAddData_v2(state, 1, data, len(data), b"k.ptx", 0, None, None)  # CU_JIT_INPUT_PTX = 1
        img, size = ctypes.c_void_p(), ctypes.c_size_t()
        r3 = libcuda.cuLinkComplete(state, ctypes.byref(img), ctypes.byref(size))
        libcuda.cuLinkDestroy(state)
        return f"[cuLink rc {r},{r2},{r3}] " + info.value.decode(errors="replace") + err.value.decode(errors="replace")
    module = ctypes.c_void_p()
    r = libcuda.cuModuleLoadDataEx(ctypes.byref(module), data, 5, opts, vals)
    return f"[cuModuleLoadDataEx rc {r}] " + info.value.decode(errors="replace") + err.value.decode(errors="replace")


torch.manual_seed(0)
m, n, k = 8192, 4864, 896
a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
gate_up = (torch.randn(m, 2 * n, device="cuda") * 3).to(torch.bfloat16)
c32 = torch.empty(m, n, device="cuda")
cache = ModuleCache(use_disk=False)
time_gemm(cache, gw.GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, trans_b=False, stages=6), a, b, c32, m, n, k)
bwd = SwiGLUBackwardSpec(dtype=DType.BF16, out_dtype=DType.BF16)
ref = torch.empty(m, 2 * n, device="cuda", dtype=torch.bfloat16)
cache.get(bwd).bind(*bwd.launch_dims(m, n), *bwd.arguments(gate_up.data_ptr(), c32.data_ptr(), ref.data_ptr(), m, n))()
torch.cuda.synchronize()

spec = gw.GemmWgmmaSpec(tma=True, pingpong=True, block_n=128, trans_b=False, stages=5, tma_store=True, swiglu_grad=True)
from ptxgen.spec import Target
text = with_setmaxnreg(spec.emit(Target("sm_90")), THREADS)
for link in (True, False):
    log = jit_log(text, link)
    print("JIT log", "cuLink" if link else "cuModuleLoadDataEx", ":", " | ".join(l for l in log.splitlines() if l.strip())[:1500], flush=True)

orig_emit, orig_compile = gw.GemmWgmmaSpec.emit, ModuleCache._compile
orig_threads = gw.GemmWgmmaSpec.threads
for label, patch_emit, raw_ptx in (("as is (320 threads)", False, False), ("setmaxnreg via cuLink cubin", True, False),
                                   ("setmaxnreg, PTX to the driver", True, True), ("as is, PTX to the driver", False, True)):
    cache = ModuleCache(use_disk=False)
    rc._TEXTS.clear()
    if patch_emit:
        gw.GemmWgmmaSpec.emit = lambda self, target: with_setmaxnreg(orig_emit(self, target), THREADS)
    if raw_ptx:
        ModuleCache._compile = lambda self, spec, ptx: ptx.encode() + b"\0"
    try:
        kernel = cache.get(spec)
        if patch_emit:
            gw.GemmWgmmaSpec.threads = property(lambda self: THREADS)
        regs = kernel.registers
        local = rc.call("cuFuncGetAttribute", rc.cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, kernel.function)
        out = torch.full((m, 2 * n), float("nan"), device="cuda", dtype=torch.bfloat16)
        gmap = gemm_c_tensor_map(spec, gate_up.data_ptr(), m, n)
        times = [time_gemm(cache, spec, a, b, out, m, n, k, gate_up=gmap.ptr) for _ in range(3)]
        gmap.free()
        same = torch.equal(out.view(torch.int16), ref.view(torch.int16))
        print(f"{label}: registers {regs}, local bytes {local}, {' / '.join(f'{t:.4f}' for t in times)} ms, "
              f"bit-equal: {same}", flush=True)
    except Exception as e:
        print(f"{label}: failed: {type(e).__name__}: {str(e)[:600]}", flush=True)
    finally:
        gw.GemmWgmmaSpec.emit, ModuleCache._compile, gw.GemmWgmmaSpec.threads = orig_emit, orig_compile, orig_threads
