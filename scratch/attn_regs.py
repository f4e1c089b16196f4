from ptxgen.kernels.attention_wgmma import AttentionWgmmaSpec
from ptxgen.spec import Target
from ptxgen.assemble import assemble
from model.config import preset
from model.kernels import ModelKernels
from model.optim import AdamWSettings
from model.precision import Precision
specs = list(AttentionWgmmaSpec.examples())
k = ModelKernels.of(preset("qwen2-0.5b"), AdamWSettings(), -100, Precision.BF16)
specs.append(k.attention)
for spec in specs:
    t = Target("sm_90")
    a = assemble(spec.emit(t), spec.arch(t))
    print(spec.head_dim, spec.tile, spec.warps, "regs", a.registers, "spills", a.spill_stores, a.spill_loads,
          [l for l in a.log.splitlines() if 'Performance' in l or 'arning' in l][:3])
