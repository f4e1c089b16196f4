"""The model's own planned RoPE and strided-cast launches, run through the PTX interpreter
(tests/ptxsim.py) on the CPU over a made-up device memory: q, k and v read out of the fused q/k/v
projection's rows land where the attention reads them (training: layer 0's q and K/V; decoding: the
cache rows after ``cached``), and the backward's dq, dk, dv land in every column of the fused
gradient's rows as the q/k/v projection's GEMMs and bias read them. The plan is the one the GPU runs
(built on the dry device); only its arithmetic kernels' inputs are made up here."""
import numpy as np
import pytest

from dry_device import DryCache, dry_device
from fake_memory import FakeMemory
from model.config import preset
from model.cuda_model import CudaBackend
from model.optim import AdamWSettings
from model.params import param_shapes
from model.precision import Precision
from ptxgen.kernels.rope import rope_reference
from ptxgen.vecio import from_bf16, to_bf16

CONFIG = preset("tiny")


def _values(memory: FakeMemory, view, bf16: bool) -> np.ndarray:
    x = memory.get(view)
    return from_bf16(x) if bf16 else x


def _strided(steps) -> list:
    """The first layer's RoPE on q and k and v's copy (the backward's: the last layer's)."""
    return [s for s in steps if s.kind in ("rope", "cast") and getattr(s.spec, "strided", False)][:3]


def _operand(step, name: str):
    """The view ``step`` reads through its parameter ``name`` (a TMA-fed GEMM's: its tensor map's)."""
    return step.operands.get(f"tmap_{name}", step.args.get(name))


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16], ids=["fp32", "bf16"])
def test_q_k_v_and_their_gradients_move_between_the_fused_rows_and_the_attentions_buffers(monkeypatch, precision):
    rng = np.random.default_rng(0)
    c, bf16 = CONFIG, precision is Precision.BF16
    Q, KV = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    tokens = 64
    tolerance = 2.0 ** -8 if bf16 else 1e-5
    with dry_device(monkeypatch) as allocations:
        model = CudaBackend(c, {n: np.zeros(s, np.float32) for n, s in param_shapes(c).items()}, AdamWSettings(),
                            cache=DryCache(), precision=precision)
        plan = model.plan(1, tokens)
        shape = model._shapes[(1, tokens)]
        memory = FakeMemory(allocations)
        positions = rng.integers(0, 500, tokens).astype(np.int32)
        qkv = rng.standard_normal((tokens, Q + 2 * KV)).astype(np.float32)
        memory.put(shape.acts.pos, positions)
        memory.put(shape.acts.qkv, qkv)
        for step in _strided(plan.of("forward")):
            memory.run(step, plan._values)
        rope = lambda x, heads, inverse=False: rope_reference(  # noqa: E731
            x.reshape(tokens, heads, c.head_dim), positions, c.rope_theta, inverse=inverse).reshape(tokens, -1)
        q_ref, k_ref = rope(qkv[:, :Q], c.num_heads), rope(qkv[:, Q:Q + KV], c.num_kv_heads)
        v_ref = from_bf16(to_bf16(qkv[:, Q + KV:])) if bf16 else qkv[:, Q + KV:]
        np.testing.assert_allclose(_values(memory, shape.acts.layers[0].q, bf16), q_ref, rtol=tolerance, atol=1e-5)
        np.testing.assert_allclose(_values(memory, shape.kv[0].k, bf16), k_ref, rtol=tolerance, atol=1e-5)
        np.testing.assert_array_equal(_values(memory, shape.kv[0].v, bf16), v_ref)

        d = shape.bufs
        assert (d.d_qkv is None) == bf16  # bf16: the rows go into the backward's shared bf16 scratch
        grads = [rng.standard_normal((tokens, w)).astype(np.float32) for w in (Q, KV, KV)]
        for view, g in zip((d.dq, d.dk, d.dv), grads):
            memory.put(view, g)
        backward = plan.of("backward")
        writers = _strided(backward)
        for step in writers:
            memory.run(step, plan._values)
        # the rows as the q/k/v projection's dX and dW GEMMs and its bias's column sum read them, one view
        module = f"model.layers.{c.num_layers - 1}.self_attn.qkv_proj"
        read = [_operand(s, "a") for s in backward if s.label.startswith(f"{s.kind} {module} d")]
        read += [_operand(s, "src") for s in backward if s.kind == "colsum" and s.label.endswith(f"{module}.bias")]
        assert len(read) == 3 and len(set(read)) == 1, read
        rows = read[0]
        assert rows.dtype == ("bf16" if bf16 else "f32")
        # ... and all that RoPE's backward and dv's copy write is in them (no other rows, which nothing reads)
        for step in writers:
            for name in step.spec.outputs():
                assert rows.ptr <= step.args[name].ptr < rows.ptr + rows.nbytes, (step.label, name, rows.name)
        d_qkv = np.concatenate([rope(grads[0], c.num_heads, True), rope(grads[1], c.num_kv_heads, True), grads[2]], 1)
        np.testing.assert_allclose(_values(memory, rows, bf16), d_qkv, rtol=tolerance, atol=1e-5)  # every column

        decoder = model.decoder(80)  # new keys and values go after the cache's ``cached`` rows
        call = decoder._plan(tokens)
        call.plan.set(cached=7)
        memory = FakeMemory(allocations)
        kv = decoder._kv[0]
        for view in (kv.k, kv.v):
            memory.raw(view)[:] = 0
        memory.put(call.acts.pos, positions)
        memory.put(call.acts.qkv, qkv)
        for step in _strided(call.plan.of()):
            memory.run(step, call.plan._values)
        keys, values = _values(memory, kv.k, bf16), _values(memory, kv.v, bf16)
        assert not keys[:7].any() and not keys[7 + tokens:].any() and not values[:7].any() and not values[7 + tokens:].any()
        np.testing.assert_allclose(keys[7:7 + tokens], k_ref, rtol=tolerance, atol=1e-5)
        np.testing.assert_array_equal(values[7:7 + tokens], v_ref)
        decoder.close()
        model.close()


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.BF16], ids=["fp32", "bf16"])
def test_the_o_and_down_projections_add_the_residual_stream_and_refuse_one_that_is_not_apart(monkeypatch, precision):
    """reference.py's x_mid = x + o_proj(o) and x_out = x_mid + down(act) are the GEMMs' own adds:
    in the planned forward each reads its layer's residual stream (R) and writes the next one, and
    the norm after it reads the sum alone; a residual that overlaps C, or is not C's f32 shape, is
    refused before any launch."""
    from model.cuda_buffers import Arena
    from runtime.plan import Plan
    c, tokens = CONFIG, 64
    with dry_device(monkeypatch):
        model = CudaBackend(c, {n: np.zeros(s, np.float32) for n, s in param_shapes(c).items()}, AdamWSettings(),
                            cache=DryCache(), precision=precision)
        plan = model.plan(1, tokens)
        acts = model._shapes[(1, tokens)].acts
        steps = plan.of("forward")
        for i, a in enumerate(acts.layers):
            x_out = acts.layers[i + 1].x if i + 1 < len(acts.layers) else acts.x
            for module, r, out in (("self_attn.o_proj", a.x, a.x_mid),
                                   ("mlp.down_proj", a.x_mid, x_out)):
                step, = [s for s in steps if f"layers.{i}.{module} forward" in s.label]
                assert r.name in step.reads().values() and out.name in step.writes().values()
        norms = [s for s in steps if s.kind == "rmsnorm"]
        assert len(norms) == c.num_layers * 2 + 1 and not any(s.spec.residual for s in norms)
        ops = model.ops(Plan(model.cache), Arena(), tokens)
        a = acts.layers[0]
        for bad in (a.x_mid, a.x_mid.rows(1, tokens - 1), a.rstd1):  # C itself, overlapping C, not C's shape
            with pytest.raises(ValueError, match="residual"):
                ops.linear(a.o, "model.layers.0.self_attn.o_proj", out=a.x_mid, residual=bad)
