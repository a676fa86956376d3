"""The planner's expanded coefficients equal the D-form formulas of docs/math.md / the authors' code.

The expected values are written here independently, literally in the D-difference form of docs/math.md,
and evaluated on random scalars in float64.
"""

from __future__ import annotations

import math
import random

import pytest

from dpm_kernels import coefficients as C
from dpm_kernels.schedule import NoiseScheduleVP

NS = NoiseScheduleVP("linear")


def pt(t):
    return C.Point.from_log_alpha(float(NS.log_alpha64(t)))


def apply(u: C.Update, x, ms, z=0.0):
    return u.a * x + sum(c * m for c, m in zip(u.c, ms, strict=True)) + u.noise * z


def times(rng, k):
    return sorted((rng.uniform(0.05, 0.95) for _ in range(k)), reverse=True)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("alg", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("st", ["dpmsolver", "taylor"])
def test_multistep(seed, alg, st):
    rng = random.Random(seed)
    t2, t1, t0, t = times(rng, 4)
    s2, s1, s0, tt = pt(t2), pt(t1), pt(t0), pt(t)
    x, m0, m1, m2 = (rng.gauss(0, 1) for _ in range(4))
    h = tt.lam - s0.lam
    plus = alg == "dpmsolver++"
    if plus:
        phi1 = math.expm1(-h)
        base = tt.sigma / s0.sigma * x - tt.alpha * phi1 * m0
    else:
        phi1 = math.expm1(h)
        base = tt.alpha / s0.alpha * x - tt.sigma * phi1 * m0
    assert apply(C.multistep(alg, st, 1, [s0], tt), x, [m0]) == pytest.approx(base, rel=1e-12, abs=1e-12)
    r0 = (s0.lam - s1.lam) / h
    d1 = (m0 - m1) / r0
    if plus:
        e = -0.5 * tt.alpha * phi1 if st == "dpmsolver" else tt.alpha * (phi1 / h + 1)
    else:
        e = -0.5 * tt.sigma * phi1 if st == "dpmsolver" else -tt.sigma * (phi1 / h - 1)
    want2 = base + e * d1
    assert apply(C.multistep(alg, st, 2, [s0, s1], tt), x, [m0, m1]) == pytest.approx(want2, rel=1e-10, abs=1e-10)
    r1 = (s1.lam - s2.lam) / h
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    dd1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    dd2 = (d1_0 - d1_1) / (r0 + r1)
    if plus:
        phi2 = phi1 / h + 1
        phi3 = phi2 / h - 0.5
        want3 = base + tt.alpha * phi2 * dd1 - tt.alpha * phi3 * dd2
    else:
        phi2 = phi1 / h - 1
        phi3 = phi2 / h - 0.5
        want3 = base - tt.sigma * phi2 * dd1 - tt.sigma * phi3 * dd2
    got3 = apply(C.multistep(alg, st, 3, [s0, s1, s2], tt), x, [m0, m1, m2])
    assert got3 == pytest.approx(want3, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("alg", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("st", ["dpmsolver", "taylor"])
def test_singlestep(seed, alg, st):
    rng = random.Random(100 + seed)
    ts, t = times(rng, 2)
    s, tt = pt(ts), pt(t)
    h = tt.lam - s.lam
    r1, r2 = sorted((rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)))
    if r2 - r1 < 0.05:
        r2 = r1 + 0.1
    p1 = pt(float(NS.inverse_lambda64(s.lam + r1 * h)))
    p2 = pt(float(NS.inverse_lambda64(s.lam + r2 * h)))
    x, ms, ms1, ms2 = (rng.gauss(0, 1) for _ in range(4))
    plus = alg == "dpmsolver++"
    # order 2 with intermediate r1
    ups = C.singlestep(alg, st, 2, s, [p1], tt)
    if plus:
        u = p1.sigma / s.sigma * x - p1.alpha * math.expm1(-r1 * h) * ms
        phi1 = math.expm1(-h)
        base = tt.sigma / s.sigma * x - tt.alpha * phi1 * ms
        if st == "dpmsolver":
            want = base - (0.5 / r1) * tt.alpha * phi1 * (ms1 - ms)
        else:
            want = base + (1 / r1) * tt.alpha * (phi1 / h + 1) * (ms1 - ms)
    else:
        u = p1.alpha / s.alpha * x - p1.sigma * math.expm1(r1 * h) * ms
        phi1 = math.expm1(h)
        base = tt.alpha / s.alpha * x - tt.sigma * phi1 * ms
        if st == "dpmsolver":
            want = base - (0.5 / r1) * tt.sigma * phi1 * (ms1 - ms)
        else:
            want = base - (1 / r1) * tt.sigma * (phi1 / h - 1) * (ms1 - ms)
    assert apply(ups[0], x, [ms]) == pytest.approx(u, rel=1e-10, abs=1e-10)
    assert apply(ups[1], x, [ms1, ms]) == pytest.approx(want, rel=1e-10, abs=1e-10)
    # order 3 with r1, r2 (the authors' code: u2 in taylor form whatever solver_type)
    ups = C.singlestep(alg, st, 3, s, [p1, p2], tt)
    if plus:
        phi12 = math.expm1(-r2 * h)
        phi22 = phi12 / (r2 * h) + 1
        u2 = p2.sigma / s.sigma * x - p2.alpha * phi12 * ms + r2 / r1 * p2.alpha * phi22 * (ms1 - ms)
        phi2 = phi1 / h + 1
        phi3 = phi2 / h - 0.5
        if st == "dpmsolver":
            want = base + (1 / r2) * tt.alpha * phi2 * (ms2 - ms)
        else:
            d10, d11 = (ms1 - ms) / r1, (ms2 - ms) / r2
            d1 = (r2 * d10 - r1 * d11) / (r2 - r1)
            d2 = 2 * (d11 - d10) / (r2 - r1)
            want = base + tt.alpha * phi2 * d1 - tt.alpha * phi3 * d2
    else:
        phi12 = math.expm1(r2 * h)
        phi22 = phi12 / (r2 * h) - 1
        u2 = p2.alpha / s.alpha * x - p2.sigma * phi12 * ms - r2 / r1 * p2.sigma * phi22 * (ms1 - ms)
        phi2 = phi1 / h - 1
        phi3 = phi2 / h - 0.5
        if st == "dpmsolver":
            want = base - (1 / r2) * tt.sigma * phi2 * (ms2 - ms)
        else:
            d10, d11 = (ms1 - ms) / r1, (ms2 - ms) / r2
            d1 = (r2 * d10 - r1 * d11) / (r2 - r1)
            d2 = 2 * (d11 - d10) / (r2 - r1)
            want = base - tt.sigma * phi2 * d1 - tt.sigma * phi3 * d2
    assert apply(ups[0], x, [ms]) == pytest.approx(u, rel=1e-10, abs=1e-10)
    assert apply(ups[1], x, [ms1, ms]) == pytest.approx(u2, rel=1e-10, abs=1e-10)
    assert apply(ups[2], x, [ms2, ms1, ms]) == pytest.approx(want, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("st", ["dpmsolver", "taylor"])
def test_sde_plus_plus(seed, st):
    """docs/math.md's SDE-DPM-Solver++ 2M (eta = 1) and k-diffusion's eta generalisation."""
    rng = random.Random(200 + seed)
    t2, t1, t0, t = times(rng, 4)
    s2, s1, s0, tt = pt(t2), pt(t1), pt(t0), pt(t)
    x, m0, m1, m2, z = (rng.gauss(0, 1) for _ in range(5))
    h = tt.lam - s0.lam
    r0 = (s0.lam - s1.lam) / h
    d1 = (m0 - m1) / r0
    want = (tt.sigma / s0.sigma * math.exp(-h) * x + tt.alpha * (1 - math.exp(-2 * h)) * (m0 + 0.5 * d1)
            + tt.sigma * math.sqrt(1 - math.exp(-2 * h)) * z)
    if st == "dpmsolver":
        got = apply(C.sde_multistep("sde-dpmsolver++", st, 2, [s0, s1], tt, eta=1.0), x, [m0, m1], z)
        assert got == pytest.approx(want, rel=1e-10, abs=1e-10)
    # eta = 0 is the ODE solver (taylor form at order 3)
    for order in (1, 2, 3):
        prev = [s0, s1, s2][:order]
        ms = [m0, m1, m2][:order]
        ode_st = st if order < 3 else "taylor"
        ode = apply(C.multistep("dpmsolver++", ode_st, order, prev, tt), x, ms)
        sde0 = apply(C.sde_multistep("sde-dpmsolver++", st, order, prev, tt, eta=0.0), x, ms, z)
        assert sde0 == pytest.approx(ode, rel=1e-10, abs=1e-10)


def test_step_to_sigma_zero_is_finite_and_denoises():
    s0 = pt(0.3)
    zero = C.Point(1.0, 0.0, math.inf)
    for alg in ("dpmsolver++", "dpmsolver"):
        u = C.multistep(alg, "dpmsolver", 1, [s0], zero)
        assert all(math.isfinite(v) for v in (u.a, *u.c))
    u = C.multistep("dpmsolver++", "dpmsolver", 1, [s0], zero)
    assert (u.a, u.c) == (0.0, (1.0,))  # x_t = x0
    # noise prediction: x_t = (x - sigma_s eps) / alpha_s, i.e. the x0 implied by eps
    u = C.multistep("dpmsolver", "dpmsolver", 1, [s0], zero)
    assert u.a == pytest.approx(1 / s0.alpha) and u.c[0] == pytest.approx(-s0.sigma / s0.alpha)
    with pytest.raises(ValueError, match="order"):
        C.multistep("dpmsolver++", "dpmsolver", 2, [s0, pt(0.5)], zero)


def test_conversion_round_trips():
    p = pt(0.4)
    x, eps = 0.7, -1.3
    x0 = (x - p.sigma * eps) / p.alpha
    v = p.alpha * eps - p.sigma * x0
    score = -eps / p.sigma
    for mt, out in (("noise", eps), ("x_start", x0), ("v", v), ("score", score)):
        px, pm = C.conversion(mt, "x0", p.alpha, p.sigma)
        assert px * x + pm * out == pytest.approx(x0, rel=1e-12)
        px, pm = C.conversion(mt, "eps", p.alpha, p.sigma)
        assert px * x + pm * out == pytest.approx(eps, rel=1e-12)
