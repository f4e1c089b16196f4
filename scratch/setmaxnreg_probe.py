"""Does ptxas give the consumers 232 registers after setmaxnreg.inc (a producer warpgroup that gives
its registers back)? Assemble the pingpong GEMM both ways and compare registers / spills (CPU only)."""
import sys
from ptxgen.kernels import gemm_wgmma, tma_pipeline
from ptxgen.kernels.gemm_wgmma import GemmWgmmaSpec
from ptxgen.spec import Target
from ptxgen.assemble import assemble
from ptxgen.builder import T

PRODUCER_WG = "wg" in sys.argv
if PRODUCER_WG:
    GemmWgmmaSpec.threads = property(lambda self: 128 * self.warpgroups + 128 * self.tma)
    orig_build = tma_pipeline.TmaPipeline.build

    def build(self, consume):
        spec, b = self.spec, self.b
        self.consumers = spec.threads - 128
        real_emit_bra = None

        def consume_inc(p, tid):
            b._emit("setmaxnreg.inc.sync.aligned.u32 232")
            consume(p, tid)
        orig_produce = self.produce

        def produce():
            orig_produce()
        self.produce = produce
        # patch: emit dec for the whole producer warpgroup before its first thread produces
        orig_bra = b.bra
        state = {"n": 0}

        def bra(label, guard=None):
            orig_bra(label, guard=guard)
            state["n"] += 1
            if state["n"] == 1:  # after 'bra consumer': only producer warps here
                b._emit("setmaxnreg.dec.sync.aligned.u32 40")
        b.bra = bra
        try:
            orig_build(self, consume_inc)
        finally:
            b.bra = orig_bra
    tma_pipeline.TmaPipeline.build = build

GemmWgmmaSpec._validate_rope = lambda self: None  # the tail-cut RoPE epilogue spills at 168: the test case
base = dict(tma=True, pingpong=True, block_n=128, stages=6)
for extra in [dict(), dict(bias=True, rope_heads=14, rope_kv_heads=2, rope_head_dim=64),
              dict(bf16_out=True, tma_store=True, swiglu_act=True, stages=5),
              dict(trans_b=False, tma_store=True, swiglu_grad=True, stages=5, split_tail=True),
              dict(bias=True, split_tail=True, rope_heads=14, rope_kv_heads=2, rope_head_dim=64)]:
    try:
        s = GemmWgmmaSpec(**{**base, **extra})
    except Exception as e:
        print(extra, "refused:", e); continue
    r = assemble(s.emit(Target("sm_90")), "sm_90a")
    print("producer WG" if PRODUCER_WG else "producer warp", extra, r.registers, r.spill_stores, r.spill_loads)
if PRODUCER_WG and "log" in sys.argv:
    s = GemmWgmmaSpec(**{**base, "bias": True, "split_tail": True, "rope_heads": 14, "rope_kv_heads": 2, "rope_head_dim": 64})
    text = s.emit(Target("sm_90"))
    print([l for l in text.splitlines() if "setmaxnreg" in l or "maxntid" in l or "minnctapersm" in l])
    print(assemble(text, "sm_90a").log)
