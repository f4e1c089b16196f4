"""Where a short-K GEMM's per-tile time goes: the model's gate/up forward shape (8192 x 9728 x K,
the model's tile) with its epilogue as it is, stored only when n == 1 (never: the same mainloop, no
stores), or through shared memory by TMA (tma_store). One variant a process (the cache refuses
one key with two PTX texts in a process)."""
import dataclasses, sys
sys.path.insert(0, "bench")
import torch
from harness import time_ms
from model.kernels import WGMMA_TILE
from ptxgen.kernels import gemm_wgmma as G
from runtime import ModuleCache
from runtime.tensormap import gemm_c_tensor_map, gemm_tensor_maps

variant = sys.argv[1]
m, n, k = 8192, 9728, int(sys.argv[2]) if len(sys.argv) > 2 else 896
if variant.startswith("nostore"):
    orig = G.store

    def store(spec, b, acc, c_ptr, m_, n_, *rest, **kw):
        skip = b.new_label("skip_store")
        b.bra(skip, guard=b.setp("ne", n_, 1))
        orig(spec, b, acc, c_ptr, m_, n_, *rest, **kw)
        b.place(skip)

    G.store = store
bf16 = "bf16" in variant
fields = dict(WGMMA_TILE, bf16_out=bf16, tma_store=variant.startswith("tma"))
if "5st" in variant:
    fields["stages"] = 5
spec = G.GemmWgmmaSpec(tma=True, trans_b=True, **fields)
a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
c = torch.empty(m, n, device="cuda", dtype=torch.bfloat16 if bf16 else torch.float32)
cache = ModuleCache(use_disk=False)
maps = gemm_tensor_maps(spec, a.data_ptr(), b.data_ptr(), m, n, k)
c_arg = gemm_c_tensor_map(spec, c.data_ptr(), m, n) if spec.tma_store else None
kernel = cache.get(spec)
dims = spec.launch_dims(m, n, resident=kernel.resident_blocks(spec.threads))
ms = time_ms(kernel.bind(*dims, *spec.arguments(maps[0].ptr, maps[1].ptr, c_arg.ptr if c_arg else c.data_ptr(),
                                                 m, n, k)), reps=10, warmup=2)
tiles = -(-m // 128) * -(-n // 128)
print(f"{variant:16} K={k}: {ms:.3f} ms, {2e-9 * m * n * k / ms:.1f} TFLOP/s, {ms * 1e3 / (tiles / 132):.2f} us a tile a SM")
if spec.tma_store:  # the same C as the threads store
    ref = torch.empty_like(c)
    plain = dataclasses.replace(spec, tma_store=False, stages=6)
    k2 = ModuleCache(use_disk=False).get(plain)
    k2(*plain.launch_dims(m, n, resident=k2.resident_blocks(plain.threads)),
       *plain.arguments(maps[0].ptr, maps[1].ptr, ref.data_ptr(), m, n, k))
    torch.cuda.synchronize()
    print("  equal to the threads' C:", torch.equal(ref.view(torch.int16) if bf16 else ref, c.view(torch.int16) if bf16 else c))
