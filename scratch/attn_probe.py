"""A/B in one process: the attention backward with and without qkv_rows at qwen2-0.5b 8x1024 (H200 probe)."""
import sys
import torch
sys.path.insert(0, "bench")
from harness import time_ms
from runtime import ModuleCache
from ptxgen.kernels.attention_wgmma import AttentionWgmmaBackwardQSpec as QS, AttentionWgmmaBackwardKVSpec as KS
from ptxgen.kernels.rope import RopeSpec
from ptxgen.kernels.cast import CastSpec
from ptxgen.vecio import DType
cache = ModuleCache()
b, s, h, hk, d = 8, 1024, 14, 2, 64
T, W = b * s, (h + 2 * hk) * d
bf = dict(device="cuda", dtype=torch.bfloat16)
q, o, do = (torch.randn(b, s, h, d, **bf) for _ in range(3))
k, v = (torch.randn(b, s, hk, d, **bf) for _ in range(2))
lse = torch.randn(b, h, s, device="cuda"); delta = torch.randn(b, h, s, device="cuda")
dq, dk, dv = torch.empty(T, h * d, device="cuda"), torch.empty(T, hk * d, device="cuda"), torch.empty(T, hk * d, device="cuda")
rows, rows16 = torch.empty(T, W, device="cuda"), torch.empty(T, W, **bf)
angles = torch.randn(T, d // 2, 2, device="cuda")
pos = torch.arange(T, device="cuda", dtype=torch.int32) % s
p = lambda t: t.data_ptr()
for rep in range(2):
    res = {}
    for rows_on in (False, True):
        qs = QS(heads=h, kv_heads=hk, head_dim=d, qkv_rows=rows_on)
        ks = KS(heads=h, kv_heads=hk, head_dim=d, warps=8, teams=2, tile=64, qkv_rows=rows_on)
        extra = (p(rows16), p(angles)) if rows_on else ()
        lq = cache.get(qs).bind(*qs.launch_dims(b, s), p(q), p(k), p(v), p(o), p(do), p(lse),
                                p(rows) if rows_on else p(dq), p(delta), s, *extra)
        lk = cache.get(ks).bind(*ks.launch_dims(b, s), p(q), p(k), p(v), p(do), p(lse), p(delta),
                                p(rows) if rows_on else p(dk), p(rows) if rows_on else p(dv), s, *extra)
        res[rows_on] = (time_ms(lq), time_ms(lk))
    rq = RopeSpec(heads=h, head_dim=d, theta=1e6, inverse=True, strided=True, bf16_copy=True)
    rk = RopeSpec(heads=hk, head_dim=d, theta=1e6, inverse=True, strided=True, bf16_copy=True)
    cv = CastSpec(dst=DType.F32, strided=True, bf16_copy=True)
    t_rq = time_ms(cache.get(rq).bind(*rq.launch_dims(T), *rq.arguments(p(dq), p(rows), p(pos), T, h * d, W, y16=p(rows16))))
    t_rk = time_ms(cache.get(rk).bind(*rk.launch_dims(T), *rk.arguments(p(dk), p(rows) + 4 * h * d, p(pos), T, hk * d, W, y16=p(rows16) + 2 * h * d)))
    t_cv = time_ms(cache.get(cv).bind(*cv.launch_dims(T * hk * d), *cv.arguments(p(dv), p(rows) + 4 * (h + hk) * d, T, hk * d, hk * d, W, dst16=p(rows16) + 2 * (h + hk) * d)))
    print(f"plain: dq {res[False][0]*1e3:.1f} us, dkdv {res[False][1]*1e3:.1f} us; + rope q {t_rq*1e3:.1f} k {t_rk*1e3:.1f} dv copy {t_cv*1e3:.1f}"
          f" = {(sum(res[False]) + t_rq + t_rk + t_cv)*1e3:.1f} us | qkv_rows: dq {res[True][0]*1e3:.1f} dkdv {res[True][1]*1e3:.1f} = {sum(res[True])*1e3:.1f} us")
