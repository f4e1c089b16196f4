"""The numpy references, checked against independent formulas."""
import numpy as np

from ptxgen.kernels.rmsnorm import rmsnorm_reference
from ptxgen.kernels.rope import inverse_frequencies, rope_reference


def test_rmsnorm_reference_matches_norm_formula():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 97))
    gamma = 1 + 0.1 * rng.standard_normal(97)
    eps = 1e-6
    y, rstd = rmsnorm_reference(x, gamma, eps)
    norms = np.linalg.norm(x, axis=1)
    expected = x / np.sqrt(norms[:, None] ** 2 / 97 + eps) * gamma
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(norms ** 2 / 97 + eps), rtol=1e-12)


def test_rmsnorm_output_has_unit_rms_with_unit_gamma():
    x = np.random.default_rng(1).standard_normal((3, 896)) * 0.02
    y, _ = rmsnorm_reference(x, np.ones(896), 1e-12)
    np.testing.assert_allclose(np.sqrt(np.mean(y ** 2, axis=1)), 1.0, rtol=1e-8)


def test_rope_reference_is_complex_rotation_of_half_pairs():
    rng = np.random.default_rng(2)
    tokens, heads, dim, theta = 7, 3, 16, 1e6
    x = rng.standard_normal((tokens, heads, dim))
    pos = rng.integers(0, 4096, tokens)
    half = dim // 2
    z = x[..., :half] + 1j * x[..., half:]
    freqs = np.array([theta ** (-2 * i / dim) for i in range(half)])
    rotated = z * np.exp(1j * pos[:, None, None] * freqs[None, None, :])
    y = rope_reference(x, pos, theta)
    np.testing.assert_allclose(y[..., :half], rotated.real, atol=1e-12)
    np.testing.assert_allclose(y[..., half:], rotated.imag, atol=1e-12)


def test_rope_preserves_pair_norms_and_inverts_with_negative_positions():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 2, 8))
    pos = np.array([0, 1, 100, 5000])
    y = rope_reference(x, pos, 1e4)
    np.testing.assert_allclose(rope_reference(y, -pos, 1e4), x, atol=1e-10)
    np.testing.assert_allclose(y[..., :4] ** 2 + y[..., 4:] ** 2, x[..., :4] ** 2 + x[..., 4:] ** 2, rtol=1e-10)
    np.testing.assert_allclose(y[0], x[0])  # position 0 is the identity


def test_inverse_frequencies_start_at_one_and_follow_theta():
    f = inverse_frequencies(64, 1e6)
    assert f[0] == 1.0 and len(f) == 32
    np.testing.assert_allclose(f[1], 1e6 ** (-2 / 64), rtol=1e-15)
