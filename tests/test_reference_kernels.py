"""numpy references of the kernel library, checked against finite differences and independent forms."""
import numpy as np
import pytest

from ptxgen.kernels.adamw import adamw_reference, grad_norm_reference
from ptxgen.kernels.cross_entropy import cross_entropy_reference
from ptxgen.kernels.embedding import embedding_backward_plan, embedding_backward_reference
from ptxgen.kernels.rmsnorm import rmsnorm_backward_reference, rmsnorm_reference
from ptxgen.kernels.rope import rope_reference
from ptxgen.kernels.swiglu import swiglu_backward_reference, swiglu_reference

rng = np.random.default_rng(0)


def numeric_grad(f, x, h=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        up = f()
        x[i] = old - h
        down = f()
        x[i] = old
        g[i] = (up - down) / (2 * h)
    return g


def test_rmsnorm_backward_matches_finite_differences():
    x, g, dy = rng.standard_normal((3, 7)), 1 + 0.1 * rng.standard_normal(7), rng.standard_normal((3, 7))
    loss = lambda: np.sum(rmsnorm_reference(x, g, 1e-6)[0] * dy)  # noqa: E731
    dx, dgamma = rmsnorm_backward_reference(x, g, dy, 1e-6)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), atol=1e-7)
    np.testing.assert_allclose(dgamma, numeric_grad(loss, g), atol=1e-7)


def test_swiglu_backward_matches_finite_differences():
    gate, up, dout = (rng.standard_normal(11) * 3 for _ in range(3))
    loss = lambda: np.sum(swiglu_reference(gate, up) * dout)  # noqa: E731
    dgate, dup = swiglu_backward_reference(gate, up, dout)
    np.testing.assert_allclose(dgate, numeric_grad(loss, gate), atol=1e-7)
    np.testing.assert_allclose(dup, numeric_grad(loss, up), atol=1e-7)


def test_rope_inverse_undoes_forward():
    x = rng.standard_normal((5, 2, 8))
    pos = np.array([0, 3, 17, 900, 4095])
    np.testing.assert_allclose(rope_reference(rope_reference(x, pos, 1e4), pos, 1e4, inverse=True), x, atol=1e-12)


def test_cross_entropy_matches_log_softmax_and_its_gradient():
    logits = rng.standard_normal((4, 9)) * 3
    targets = np.array([2, -100, 8, 0])
    loss, grad = cross_entropy_reference(logits, targets, -100, grad_scale=1 / 3)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(loss, [-logp[0, 2], 0.0, -logp[2, 8], -logp[3, 0]], rtol=1e-12)
    mean_loss = lambda: cross_entropy_reference(logits, targets, -100, 1.0)[0].sum() / 3  # noqa: E731
    np.testing.assert_allclose(grad, numeric_grad(mean_loss, logits), atol=1e-7)
    assert not grad[1].any()  # the ignored row has no gradient


def test_embedding_backward_plan_groups_positions_by_id_in_order():
    ids = np.array([5, 1, 5, 3, 1, 5])
    order, seg_start, seg_id = embedding_backward_plan(ids)
    assert seg_id.tolist() == [1, 3, 5] and seg_start.tolist() == [0, 2, 3, 6]
    assert order.tolist() == [1, 4, 3, 0, 2, 5]  # stable: positions of each id ascending
    dout = rng.standard_normal((6, 4))
    expected = np.zeros((7, 4))
    for t, i in enumerate(ids):
        expected[i] += dout[t]
    np.testing.assert_allclose(embedding_backward_reference(ids, dout, 7), expected)


def test_adamw_first_step_moves_each_weight_by_lr_times_sign():
    p, g = rng.standard_normal(100), rng.standard_normal(100)
    new_p, m, v = adamw_reference(p, g, np.zeros(100), np.zeros(100), lr=1e-3, beta1=0.9, beta2=0.999,
                                  eps=1e-12, weight_decay=0.0, step=1)
    np.testing.assert_allclose(new_p - p, -1e-3 * np.sign(g), rtol=1e-6)
    np.testing.assert_allclose(m, 0.1 * g) and np.testing.assert_allclose(v, 0.001 * g * g)


def test_adamw_weight_decay_is_decoupled():
    p = np.full(3, 2.0)
    new_p, _, _ = adamw_reference(p, np.zeros(3), np.zeros(3), np.zeros(3), lr=0.1, beta1=0.9,
                                  beta2=0.999, eps=1e-8, weight_decay=0.5, step=1)
    np.testing.assert_allclose(new_p, 2.0 * (1 - 0.1 * 0.5))


@pytest.mark.parametrize("max_norm, scale", [(1e9, 1.0), (0.5, None)])
def test_grad_norm_and_clip_scale(max_norm, scale):
    g = rng.standard_normal(1000)
    norm, s = grad_norm_reference(g, max_norm)
    assert norm == pytest.approx(np.linalg.norm(g))
    assert s == pytest.approx(scale if scale is not None else max_norm / (norm + 1e-6))
