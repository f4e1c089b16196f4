"""A CUDA graph runs a plan's steps as their declared memory orders them (runtime.plan.dependencies):
a kernel that read memory outside its step's ``spans`` could run beside that memory's writer. Here
every global load of every kernel of the fp32 training step and of decoding (a KV cache's rows at
a moving address) is run in the PTX interpreter and found inside the step's spans (its writes are
held to them by tests/fake_memory.py)."""
import numpy as np

import fake_memory
import ptxsim
from dry_device import DryCache
from fake_memory import interpreted_device
from model.cuda_model import CudaBackend
from model.params import init_params
from ptxgen.builder import T
from runtime.plan import Fill, Host, _resolve
from test_model_sim import ADAMW, CONFIG, batch


def test_every_load_of_the_fp32_step_and_of_decoding_is_inside_its_steps_spans(monkeypatch):
    loads, puts, outside, checked = [], [], {}, [0]
    ld, put, run = ptxsim.Block._ld, ptxsim.Memory.put, fake_memory.FakeMemory.run

    def logged_ld(self, op, ops, mask):
        if "global" in op[1:]:
            loads.append(self._address(ops[1], "global")[np.ones(self.threads, bool) if mask is None else mask])
        return ld(self, op, ops, mask)

    def logged_put(self, array, writable):  # the launch's arrays, in parameter order
        puts.append((put(self, array, writable), np.asarray(array).nbytes))
        return puts[-1][0]

    def checked_run(self, step, values):
        loads.clear(), puts.clear()
        run(self, step, values)
        if isinstance(step, (Host, Fill)):
            return
        pointers = [int(_resolve(step.args[n], values)) for n, t in step.spec.params() if t is T.U64]
        spans = step.spans() + step.spans(reads=True)
        for w in np.unique(np.concatenate(loads)) if loads else ():
            for (at, n), ptr in zip(puts, pointers):
                if at <= w < at + n:
                    checked[0] += 1
                    if not any(s <= ptr + w - at < s + m for s, m in spans):
                        outside.setdefault(step.label, hex(ptr + w - at))
                    break

    monkeypatch.setattr(ptxsim.Block, "_ld", logged_ld)
    monkeypatch.setattr(ptxsim.Memory, "put", logged_put)
    monkeypatch.setattr(fake_memory.FakeMemory, "run", checked_run)
    with interpreted_device(monkeypatch):
        backend = CudaBackend(CONFIG, init_params(CONFIG, seed=0), ADAMW, cache=DryCache())
        ids, targets = batch(0)
        backend.train_step(ids, targets, 1e-3)
        decoder = backend.decoder(32)
        decoder.prefill(ids[0, :5])
        decoder.decode(int(ids[0, 5]))
    assert checked[0] > 100_000  # (the loads were seen)
    assert outside == {}
