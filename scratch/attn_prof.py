"""Times (or launches once, for ncu) the model's three attention kernels at qwen2-0.5b shapes.

python3 scratch/attn_prof.py time            # both shapes, us and TFLOP/s per kernel
python3 scratch/attn_prof.py once 8 1024     # each kernel once (ncu)
ATTN_VARIANT='{"fwd": {...}, "q": {...}, "kv": {...}}' replaces spec fields.
"""
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, "bench")
from harness import time_ms  # noqa: E402

from model.config import preset  # noqa: E402
from model.kernels import ModelKernels  # noqa: E402
from model.optim import AdamWSettings  # noqa: E402
from model.precision import Precision  # noqa: E402
from runtime import ModuleCache  # noqa: E402

cache = ModuleCache()
k = ModelKernels.of(preset("qwen2-0.5b"), AdamWSettings(), -100, Precision.BF16)
variant = json.loads(os.environ.get("ATTN_VARIANT", "{}"))
specs = {"fwd": k.attention, "q": k.attention_bwd_q, "kv": k.attention_bwd_kv}
specs = {n: dataclasses.replace(s, **variant.get(n, {})) for n, s in specs.items()}


D128 = {"fwd": dataclasses.replace(k.attention, heads=12, head_dim=128, warps=8),
        "q": dataclasses.replace(k.attention_bwd_q, heads=12, head_dim=128),
        "kv": dataclasses.replace(k.attention_bwd_kv, heads=12, head_dim=128, warps=4, teams=1)}


def launches(b, s, h=14, hk=2, d=64, specs=specs):
    T, W = b * s, (h + 2 * hk) * d
    bf = dict(device="cuda", dtype=torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, do = (torch.randn(b, s, h, d, generator=g, **bf) for _ in range(2))
    kk, v = (torch.randn(b, s, hk, d, generator=g, **bf) for _ in range(2))
    o = torch.empty(b, s, h, d, **bf)
    lse = torch.empty(b, h, s, device="cuda")
    delta = torch.empty(b, h, s, device="cuda")
    rows, rows16 = torch.empty(T, W, device="cuda"), torch.empty(T, W, **bf)
    angles = torch.randn(T, d // 2, 2, device="cuda", generator=g)
    p = lambda t: t.data_ptr()  # noqa: E731
    fs, qs, ks = specs["fwd"], specs["q"], specs["kv"]
    keep = (q, do, kk, v, o, lse, delta, rows, rows16, angles)
    lf = cache.get(fs).bind(*fs.launch_dims(b, s), p(q), p(kk), p(v), p(o), p(lse), s, s, s, 0)
    extra = (p(angles),) if qs.qkv_rows else ()
    out = p(rows16) if qs.qkv_rows else p(rows)  # (qkv_rows: the bf16 rows only)
    lq = cache.get(qs).bind(*qs.launch_dims(b, s), p(q), p(kk), p(v), p(o), p(do), p(lse), out, p(delta), s, *extra)
    lk = cache.get(ks).bind(*ks.launch_dims(b, s), p(q), p(kk), p(v), p(do), p(lse), p(delta), out, out, s,
                            *extra)
    return keep, {"fwd": lf, "q": lq, "kv": lk}


def main():
    mode = sys.argv[1]
    if mode == "once":
        b, s = int(sys.argv[2]), int(sys.argv[3])
        keep, ls = launches(b, s)
        for name in ("fwd", "q", "kv"):
            ls[name]()
        torch.cuda.synchronize()
        return
    print({n: str(s) for n, s in specs.items()})
    for b, s, h, d, sp in ((8, 1024, 14, 64, specs), (4, 2048, 14, 64, specs), (4, 2048, 12, 128, D128)):
        keep, ls = launches(b, s, h, 2, d, sp)
        ls["fwd"]()
        flop = 4 * b * h * s * s * d / 2  # one causal product
        outs = []
        for name, products in (("fwd", 2), ("q", 3), ("kv", 4)):
            t = min(time_ms(ls[name], reps=50) for _ in range(3))
            outs.append(f"{name} {t * 1e3:.1f} us ({products * flop / 2 / t / 1e9:.0f} TF)")
        print(f"{b}x{s} h{h} d{d}: " + ", ".join(outs))


main()
