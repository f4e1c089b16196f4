"""Constants a kernel bakes in, computed so that the spec alone fixes every bit.

An immediate derived from a field (RoPE frequencies from theta, 1/sqrt(head_dim), 1/hidden,
1 - beta, log2 e) must be the same on every host. numpy's vector transcendentals are not (SVML on
AVX-512 CPUs gives other last bits than the scalar loops), and neither is a libm's ``exp``/``log``
across builds. So the value is computed exactly (``Fraction``) or in 60-digit ``decimal`` with an
explicit context (exp, ln and sqrt are correctly rounded there, in pure software, whatever the
CPU or the caller's decimal settings), then rounded once, to nearest even, to f32 or f64 by
integer arithmetic.
"""
from __future__ import annotations

import decimal
import math
from decimal import Decimal
from fractions import Fraction

# Explicit, never the thread's current context: a caller's getcontext().prec cannot reach a kernel.
_CTX = decimal.Context(prec=60, rounding=decimal.ROUND_HALF_EVEN, Emin=-999999, Emax=999999)

Exact = Fraction | Decimal | int


def _round_binary(x: Exact, mantissa: int, emin: int, emax: int, name: str) -> float:
    """x rounded once, to nearest even, to a binary float with ``mantissa`` bits (subnormals below
    2**emin); OverflowError beyond the largest finite value."""
    q = Fraction(x)
    if q == 0:
        return 0.0
    n, d = abs(q.numerator), q.denominator
    e = n.bit_length() - d.bit_length()  # 2**e <= |x| < 2**(e+1) after the correction
    if (n << max(0, -e)) < (d << max(0, e)):
        e -= 1
    shift = mantissa - 1 - max(e, emin)  # subnormals keep the quantum of 2**emin
    num, den = (n << shift, d) if shift >= 0 else (n, d << -shift)
    m, r = divmod(num, den)
    if 2 * r > den or (2 * r == den and m & 1):
        m += 1
    if m.bit_length() + (-shift) - 1 > emax:
        raise OverflowError(f"{float(q)!r} overflows {name}")
    value = math.ldexp(m, -shift)  # exact: m has at most ``mantissa`` + 1 bits
    return -value if q < 0 else value


def f64(x: Exact) -> float:
    """The f64 nearest to x (ties to even)."""
    return _round_binary(x, 53, -1022, 1023, "f64")


def f32(x: Exact) -> float:
    """The f32 nearest to x (ties to even), as a Python float that holds it exactly."""
    return _round_binary(x, 24, -126, 127, "f32")


def dec(x: float | int | Fraction) -> Decimal:
    """A float or int exactly; a fraction to 60 digits."""
    if isinstance(x, Fraction):
        return _CTX.divide(Decimal(x.numerator), Decimal(x.denominator))
    return Decimal(x)


def power(base: float, exponent: Fraction) -> Decimal:
    """base ** exponent for base > 0, to 60 digits."""
    if exponent == 0:
        return Decimal(1)
    return _CTX.exp(_CTX.multiply(dec(exponent), _CTX.ln(dec(base))))


def rsqrt(n: int) -> Decimal:
    """1 / sqrt(n), to 60 digits."""
    return _CTX.divide(Decimal(1), _CTX.sqrt(Decimal(n)))


def product(*xs: Decimal | Fraction | int | float) -> Decimal:
    out = Decimal(1)
    for x in xs:
        out = _CTX.multiply(out, x if isinstance(x, Decimal) else dec(x))
    return out


LN2 = _CTX.ln(Decimal(2))
LOG2E = _CTX.divide(Decimal(1), LN2)
PI = Decimal("3.14159265358979323846264338327950288419716939937510582097494459")

F32_MIN_NORMAL = math.ldexp(1.0, -126)
LN2_F32 = f32(LN2)
LOG2E_F32 = f32(LOG2E)

