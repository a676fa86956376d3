"""Every DPM-Solver update as float64 numbers: ``x_t = a * x + sum_j c[j] * m_j + noise * z`` (docs/math.md).

This file is the one place where the solver formulas live in Python. Each function takes the points of
the trajectory (alpha, sigma, lambda of each time) and returns an `Update`; the fused kernels only ever
see the resulting numbers. ``c[0]`` multiplies the newest model output, ``c[1]`` the one before, and so on.

Vectorized: a point's fields may be float64 scalars or numpy arrays (one entry per step of a trajectory, or per
sample of a batch with per-sample times), which broadcast; the update's fields then are arrays too. Control
flow (the order, the algorithm) is per call; everything that depends on the values is elementwise.

Points are generic (alpha, sigma) pairs with ``lam = log(alpha) - log(sigma)``: VP points from a noise
schedule, or k-diffusion's VE points (alpha = 1, sigma = sigma_k) -- the formulas only use ratios and lambda,
so both work. A point with sigma = 0 (the end of a trajectory that denoises completely) has lam = +inf;
only first-order steps may end there, and they are computed by their finite limits, never as 0 * inf.

A step of zero length (|h| <= ZERO_STEP: repeated times or sigmas) is the identity, a = 1 and every c and the
noise 0; nothing divides by its h.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
SOLVER_TYPES = ("dpmsolver", "taylor")
# diffusers' names for the same two variants.
_SOLVER_ALIASES = {"midpoint": "dpmsolver", "heun": "taylor", "dpmsolver": "dpmsolver", "taylor": "taylor"}
MULTISTEP3 = ("standard", "third_order")
# A step with |lambda_t - lambda_s| at or below this is zero-length: the identity. Real steps are many orders of
# magnitude longer (1000 steps over a lambda range of 20 are 0.02 each); a step this short moves x by ~1e-6 of
# its derivative at most, and divided differences over it would only amplify rounding.
ZERO_STEP = 1e-6


def _fast_any(c) -> bool:
    return bool(c.any()) if isinstance(c, np.ndarray) else bool(c)


def _where(c, a, b):
    """np.where, without its cost for scalars."""
    return np.where(c, a, b) if isinstance(c, np.ndarray) else (a if c else b)


def _f64(v):
    return v if isinstance(v, np.ndarray) else np.float64(v)


@dataclass(frozen=True)
class Point:
    """One time of a trajectory: alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t), float64 (scalars, or
    arrays of equal or broadcastable shape: several points at once)."""

    alpha: float | np.ndarray
    sigma: float | np.ndarray
    lam: float | np.ndarray

    def __post_init__(self):  # float64 scalars: a division by zero gives inf for the finiteness checks, not an error
        for name in ("alpha", "sigma", "lam"):
            object.__setattr__(self, name, _f64(getattr(self, name)))

    def __getitem__(self, idx) -> Point:
        """The points at `idx` of array fields."""
        a, s, lam = self.alpha, self.sigma, self.lam
        if type(a) is np.ndarray and type(s) is np.ndarray and type(lam) is np.ndarray and a.shape == s.shape == \
                lam.shape:  # the planner's case, without broadcasting's cost (a plan indexes points many times)
            return Point(a[idx], s[idx], lam[idx])
        shape = np.broadcast_shapes(np.shape(self.alpha), np.shape(self.sigma), np.shape(self.lam))
        return Point(*(np.broadcast_to(v, shape)[idx] for v in (self.alpha, self.sigma, self.lam)))

    @staticmethod
    @np.errstate(divide="ignore")
    def from_log_alpha(log_alpha) -> Point:
        """VP points from log(alpha_t); sigma_t = sqrt(1 - alpha_t^2) computed without cancellation (log_alpha = 0
        gives sigma = 0, lambda = inf)."""
        la = np.asarray(log_alpha, dtype=np.float64)
        log_sigma = 0.5 * np.log(-np.expm1(2.0 * la))
        return Point(np.exp(la), np.exp(log_sigma), la - log_sigma)

    @staticmethod
    @np.errstate(divide="ignore")
    def from_ve_sigma(sigma) -> Point:
        """k-diffusion's parameterisation x_ve = x / alpha: alpha = 1, sigma = sigma_ve."""
        s = np.asarray(sigma, dtype=np.float64)
        return Point(np.ones_like(s)[()], s[()], -np.log(s))

    @staticmethod
    @np.errstate(divide="ignore")
    def from_flow_sigma(sigma) -> Point:
        """A flow-matching point: alpha = 1 - sigma (diffusers' flow sigmas, NoiseScheduleFlow's t)."""
        s = np.asarray(sigma, dtype=np.float64)
        return Point((1.0 - s)[()], s[()], np.log1p(-s) - np.log(s))

    @staticmethod
    @np.errstate(divide="ignore")
    def from_vp_of_ve_sigma(sigma) -> Point:
        """diffusers' conversion of a VE sigma to VP: alpha = 1/sqrt(1 + s^2), sigma_vp = s * alpha."""
        s = np.asarray(sigma, dtype=np.float64)
        alpha = 1.0 / np.sqrt(1.0 + s * s)
        return Point(alpha, s * alpha, -np.log(s))


@dataclass(frozen=True)
class Update:
    """``x_t = a * x + sum_j c[j] * m_j + noise * z``: c[0] for the newest model output."""

    a: float | np.ndarray
    c: tuple
    noise: float | np.ndarray = 0.0


def normalize_solver_type(solver_type: str) -> str:
    if solver_type not in _SOLVER_ALIASES:
        raise ValueError(f"solver_type: expected 'dpmsolver' or 'taylor' (or 'midpoint'/'heun'), got {solver_type!r}")
    return _SOLVER_ALIASES[solver_type]


def is_data_prediction(algorithm_type: str) -> bool:
    """True when the solver's history holds x0 (DPM-Solver++), False when it holds eps."""
    if algorithm_type not in ALGORITHMS:
        raise ValueError(f"algorithm_type: expected one of {ALGORITHMS}, got {algorithm_type!r}")
    return algorithm_type.endswith("++")


def is_zero_step(h):
    """True where a step of lambda-length h is zero-length (also NaN: from sigma = 0 to sigma = 0)."""
    return ~(np.abs(h) > ZERO_STEP)


def _step_length(ps: Point, pt: Point):
    """(zero, h): where the step is zero-length, and h with 1 standing in there, so that nothing divides by 0."""
    h = pt.lam - ps.lam
    zero = is_zero_step(h)
    return zero, _where(zero, 1.0, h)


def _identity_where(zero, u: Update) -> Update:
    """u, with the identity (a = 1, no model or noise term) where the step is zero-length."""
    if not _fast_any(zero):
        return u
    return Update(_where(zero, 1.0, u.a), tuple(_where(zero, 0.0, c) for c in u.c), _where(zero, 0.0, u.noise))


def _sigma_expm1_h(pt: Point, ps: Point, h):
    """sigma_t * expm1(lambda_t - lambda_s), finite also when sigma_t = 0 (then it is alpha_t sigma_s / alpha_s)."""
    return _where(pt.sigma == 0.0, pt.alpha * ps.sigma / ps.alpha, pt.sigma * np.expm1(h))


def _check_finite_step(order: int, pt: Point) -> None:
    if order > 1 and _fast_any(pt.sigma == 0.0):
        raise ValueError("order: a step that ends at sigma = 0 must be first order (higher orders divide by h = inf)")


def _check_order(order: int, n_prev: int) -> None:
    if order not in (1, 2, 3) or n_prev < order:
        raise ValueError(f"order: need 1..3 and as many previous points, got order={order} with {n_prev}")


def _d_weights(r0, r1, d2_weight_scale: float) -> tuple[tuple, tuple]:
    """Weights of (m0, m1, m2) in D1 and in d2_weight_scale * D2 (docs/math.md, multistep 3).

    D1 = h x0' + O(h^3) and D2 = h^2 x0''/2 + O(h^3) for smooth outputs; the exact update needs
    h^2 x0'' = 2 D2 in front of phi3, hence the scale 2 of the "third_order" variant.
    """
    w = r0 / (r0 + r1)
    d1_0 = (1.0 / r0, -1.0 / r0, 0.0)
    d1_1 = (0.0, 1.0 / r1, -1.0 / r1)
    d1 = tuple((1.0 + w) * p - w * q for p, q in zip(d1_0, d1_1, strict=True))
    d2 = tuple(d2_weight_scale * (p - q) / (r0 + r1) for p, q in zip(d1_0, d1_1, strict=True))
    return d1, d2


def _d2_scale(multistep3: str) -> float:
    if multistep3 not in MULTISTEP3:
        raise ValueError(f"multistep3: expected one of {MULTISTEP3}, got {multistep3!r}")
    return 1.0 if multistep3 == "standard" else 2.0


@np.errstate(all="ignore")
def multistep(algorithm_type: str, solver_type: str, order: int, prev: list[Point], pt: Point,
              multistep3: str = "standard") -> Update:
    """Multistep DPM-Solver(++) of ``order`` from ``prev[0]`` (newest) to ``pt``; prev[1], prev[2] older.

    ODE algorithms only; see `sde_multistep` for the SDE variants. Order 3 comes in two variants:
    "standard" is the update of the authors' code, diffusers and k-diffusion (docs/math.md): its D2 term carries
    half the weight a Taylor expansion asks for, so its local error is O(h^3) and the method is second
    order globally; "third_order" doubles the D2 term, giving local error O(h^4) (third order globally).
    """
    solver_type = normalize_solver_type(solver_type)
    _check_order(order, len(prev))
    scale = _d2_scale(multistep3)
    plus = is_data_prediction(algorithm_type)
    if algorithm_type.startswith("sde"):
        raise ValueError("algorithm_type: use sde_multistep for SDE algorithms")
    _check_finite_step(order, pt)
    s0 = prev[0]
    zero, h = _step_length(s0, pt)
    if plus:
        a = pt.sigma / s0.sigma
        phi1 = np.expm1(-h)  # -1 when h = inf
        k = pt.alpha  # x_t = a x - k*phi1*m0 + ...
    else:
        a = pt.alpha / s0.alpha
        phi1 = np.expm1(h)
        k = pt.sigma
    if order == 1:
        c0 = -k * phi1 if plus else -_sigma_expm1_h(pt, s0, h)
        return _identity_where(zero, Update(a, (c0,)))
    s1 = prev[1]
    r0 = (s0.lam - s1.lam) / h
    if order == 2:
        # D1 = (m0 - m1) / r0; x_t = a x - k phi1 m0 + e * D1.
        if solver_type == "dpmsolver":
            e = -0.5 * k * phi1
        else:
            e = k * (phi1 / h + 1.0) if plus else -k * (phi1 / h - 1.0)
        return _identity_where(zero, Update(a, (-k * phi1 + e / r0, -e / r0)))
    r1 = (s1.lam - prev[2].lam) / h
    if plus:
        phi2 = phi1 / h + 1.0
        phi3 = phi2 / h - 0.5
        e1, e2 = k * phi2, -k * phi3  # + e1 * D1 + e2 * D2
    else:
        phi2 = phi1 / h - 1.0
        phi3 = phi2 / h - 0.5
        e1, e2 = -k * phi2, -k * phi3
    d1, d2 = _d_weights(r0, r1, scale)
    c = [e1 * d1[j] + e2 * d2[j] for j in range(3)]
    c[0] = c[0] - k * phi1
    return _identity_where(zero, Update(a, tuple(c)))


@np.errstate(all="ignore")
def sde_multistep(
    algorithm_type: str,
    solver_type: str,
    order: int,
    prev: list[Point],
    pt: Point,
    eta: float = 1.0,
    s_noise: float = 1.0,
    multistep3: str = "standard",
) -> Update:
    """SDE-DPM-Solver(++) multistep of ``order`` 1..3 with noise scale ``eta`` (k-diffusion's generalisation).

    ``sde-dpmsolver++`` (data prediction), with H = (1 + eta) h:
        x_t = (sigma_t/sigma_s0) e^{-eta h} x + alpha_t (1 - e^{-H}) m0 + [D terms]
              + sigma_t sqrt(1 - e^{-2 eta h}) s_noise z
    order 2: midpoint adds 0.5 alpha_t (1 - e^{-H}) D1, taylor adds alpha_t phi2(H) D1 with
    phi2(H) = expm1(-H)/H + 1; order 3 adds alpha_t phi2(H) D1 - alpha_t phi3(H) D2 with phi3 = phi2/H - 1/2
    (k-diffusion's 3M; ``multistep3="third_order"`` doubles the D2 term as for the ODE, see `multistep`).
    ``multistep3="diffusers"`` reproduces diffusers' third-order branch, whose D2 coefficient is
    -alpha_t (phi3(2h) + 1) with eta = 1 (k-diffusion's is -alpha_t phi3(2h): diffusers writes the 1/2 of phi3 with
    the wrong sign, giving local error O(h^2) instead of O(h^3));
    only the diffusers drop-in scheduler uses it.
    ``sde-dpmsolver`` (noise prediction, diffusers' semantics, eta = 1 only): orders 1 and 2.
    With eta = 0, ``sde-dpmsolver++`` equals the ODE solver of the same order (taylor form at order 3).
    """
    solver_type = normalize_solver_type(solver_type)
    _check_order(order, len(prev))
    if eta < 0 or s_noise < 0:
        raise ValueError("eta: eta and s_noise must be >= 0")
    _check_finite_step(order, pt)
    s0 = prev[0]
    zero, h = _step_length(s0, pt)
    if _fast_any(h < 0):
        raise ValueError("t: SDE steps must go towards the data (lambda increasing); SDE inversion is not defined")
    end = pt.sigma == 0.0
    if algorithm_type == "sde-dpmsolver++":
        big_h = (1.0 + eta) * h
        psi = -np.expm1(-big_h)  # 1 - e^{-H}, = 1 at sigma_t = 0
        a = _where(end, 0.0, pt.sigma / s0.sigma * np.exp(-eta * h))
        noise = _where(end, 0.0, pt.sigma * np.sqrt(-np.expm1(-2.0 * eta * h)) * s_noise)
        c = [pt.alpha * psi, 0.0, 0.0]
        if order >= 2:
            s1 = prev[1]
            r0 = (s0.lam - s1.lam) / h
            phi2 = -psi / big_h + 1.0
            if order == 2:
                e1 = 0.5 * pt.alpha * psi if solver_type == "dpmsolver" else pt.alpha * phi2
                c[0] = c[0] + e1 / r0
                c[1] = c[1] - e1 / r0
            else:
                s2 = prev[2]
                r1 = (s1.lam - s2.lam) / h
                phi3 = phi2 / big_h - 0.5
                e1 = pt.alpha * phi2
                if multistep3 == "diffusers":
                    if eta != 1.0:
                        raise ValueError("eta: the diffusers third-order SDE variant is defined for eta = 1 only")
                    e2, scale = pt.alpha * ((psi - 2.0 * h) / (2.0 * h) ** 2 - 0.5), 1.0  # = -alpha_t (phi3(2h) + 1)
                else:
                    e2, scale = -pt.alpha * phi3, _d2_scale(multistep3)
                d1, d2 = _d_weights(r0, r1, scale)
                for j in range(3):
                    c[j] = c[j] + e1 * d1[j] + e2 * d2[j]
        return _identity_where(zero, Update(a, tuple(c[:order]), noise))
    if algorithm_type == "sde-dpmsolver":
        if eta != 1.0:
            raise ValueError("eta: 'sde-dpmsolver' is defined for eta = 1 only")
        if _fast_any(end):
            raise ValueError("t: 'sde-dpmsolver' cannot end at sigma = 0")
        if order == 3:
            raise ValueError("order: 'sde-dpmsolver' supports orders 1 and 2")
        phi1 = np.expm1(h)
        a = pt.alpha / s0.alpha
        noise = pt.sigma * np.sqrt(np.expm1(2.0 * h)) * s_noise
        c = [-2.0 * pt.sigma * phi1, 0.0]
        if order == 2:
            r0 = (s0.lam - prev[1].lam) / h
            e1 = -pt.sigma * phi1 if solver_type == "dpmsolver" else -2.0 * pt.sigma * (phi1 / h - 1.0)
            c[0] = c[0] + e1 / r0
            c[1] = c[1] - e1 / r0
        return _identity_where(zero, Update(a, tuple(c[:order]), noise))
    is_data_prediction(algorithm_type)  # an unknown name: the error lists the algorithms
    raise ValueError(f"algorithm_type: {algorithm_type!r} is not an SDE algorithm")


def singlestep_intermediate(algorithm_type: str, ps: Point, pu: Point) -> Update:
    """First-order step from the block start ``ps`` to an intermediate point ``pu`` (uses m_s only)."""
    return multistep(algorithm_type, "dpmsolver", 1, [ps], pu)


@np.errstate(all="ignore")
def singlestep(
    algorithm_type: str,
    solver_type: str,
    order: int,
    ps: Point,
    inner: list[Point],
    pt: Point,
    u2_form: str = "taylor",
) -> list[Update]:
    """Singlestep DPM-Solver(++) of ``order`` from ``ps`` to ``pt`` through the intermediate points ``inner``.

    Returns one `Update` per model evaluation: for order 3, [u1, u2, x_t]; order 2, [u1, x_t]; order 1, [x_t].
    The updates of a block combine the block-start x with the block's model outputs, newest first:
    u2 uses (m_s1, m_s), x_t of order 3 uses (m_s2, m_s1, m_s). ``r1, r2`` are the lambda fractions of the
    intermediate points. ``u2_form`` picks the second-order formula for u2: "taylor" is the authors' code
    (whatever the solver_type), "solver_type" follows ``solver_type`` (diffusers' singlestep scheduler).
    A zero-length block is the identity at every evaluation.
    """
    solver_type = normalize_solver_type(solver_type)
    if order not in (1, 2, 3) or len(inner) != order - 1:
        raise ValueError(f"order: singlestep order {order} needs {order - 1} intermediate points, got {len(inner)}")
    if u2_form not in ("taylor", "solver_type"):
        raise ValueError(f"u2_form: expected 'taylor' or 'solver_type', got {u2_form!r}")
    plus = is_data_prediction(algorithm_type)
    if algorithm_type.startswith("sde"):
        raise ValueError("algorithm_type: singlestep solvers are ODE solvers; use method='multistep' for SDE")
    _check_finite_step(order, pt)
    if order == 1:
        return [multistep(algorithm_type, solver_type, 1, [ps], pt)]
    zero, h = _step_length(ps, pt)
    r = [(p.lam - ps.lam) / h for p in inner]
    updates = [singlestep_intermediate(algorithm_type, ps, inner[0])]
    if order == 2:
        updates.append(_single2_final(plus, solver_type, ps, pt, h, r[0]))
    else:
        r1, r2 = r
        # u2: second order from s to s2 via s1; its own r is r1 / r2
        u2_type = "taylor" if u2_form == "taylor" else solver_type
        h2 = _where(zero, 1.0, inner[1].lam - ps.lam)
        updates.append(_single2_final(plus, u2_type, ps, inner[1], h2, r1 / r2))
        updates.append(_single3_final(plus, solver_type, ps, pt, h, r1, r2))
    return [_identity_where(zero, u) for u in updates]


def _single2_final(plus: bool, solver_type: str, ps: Point, pt: Point, h, r1) -> Update:
    """x_t from m_s and m_s1 (h: the step's lambda length, r1: the lambda fraction of s1); c = (c_s1, c_s)."""
    if plus:
        a = pt.sigma / ps.sigma
        phi1 = np.expm1(-h)
        base = -pt.alpha * phi1
        e = -(0.5 / r1) * pt.alpha * phi1 if solver_type == "dpmsolver" else (1.0 / r1) * pt.alpha * (phi1 / h + 1.0)
    else:
        a = pt.alpha / ps.alpha
        phi1 = np.expm1(h)
        base = -pt.sigma * phi1
        e = -(0.5 / r1) * pt.sigma * phi1 if solver_type == "dpmsolver" else -(1.0 / r1) * pt.sigma * (phi1 / h - 1.0)
    # x_t = a x + base m_s + e (m_s1 - m_s)
    return Update(a, (e, base - e))


def _single3_final(plus: bool, solver_type: str, ps: Point, pt: Point, h, r1, r2) -> Update:
    if plus:
        a = pt.sigma / ps.sigma
        phi1 = np.expm1(-h)
        phi2 = phi1 / h + 1.0
        phi3 = phi2 / h - 0.5
        k, g1, g2, g3 = pt.alpha, -1.0, 1.0, -1.0  # x_t = a x + k(g1 phi1 m_s + g2 phi2 D1 + g3 phi3 D2)
    else:
        a = pt.alpha / ps.alpha
        phi1 = np.expm1(h)
        phi2 = phi1 / h - 1.0
        phi3 = phi2 / h - 0.5
        k, g1, g2, g3 = pt.sigma, -1.0, -1.0, -1.0
    # coefficients on (m_s, m_s1, m_s2)
    c = [k * g1 * phi1, 0.0, 0.0]
    if solver_type == "dpmsolver":
        # + k g2 phi2 (m_s2 - m_s) / r2
        g = k * g2 * phi2 / r2
        c[0] = c[0] - g
        c[2] = c[2] + g
    else:
        d1_0 = (-1.0 / r1, 1.0 / r1, 0.0)
        d1_1 = (-1.0 / r2, 0.0, 1.0 / r2)
        for j in range(3):
            d1 = (r2 * d1_0[j] - r1 * d1_1[j]) / (r2 - r1)
            d2 = 2.0 * (d1_1[j] - d1_0[j]) / (r2 - r1)
            c[j] = c[j] + k * g2 * phi2 * d1 + k * g3 * phi3 * d2
    return Update(a, (c[2], c[1], c[0]))


@np.errstate(all="ignore")
def singlestep_sde_diffusers(solver_type: str, order: int, ps: Point, inner: list[Point], pt: Point) -> list[Update]:
    """diffusers' singlestep SDE-DPM-Solver++ (eta = 1): the updates of `singlestep`, one per evaluation.

    With h = lambda_q - lambda_s for a target q, diffusers' update is the ODE DPM-Solver++ singlestep update with
    every exponential factor taken at 2h (phi_k(2h)), x scaled by (sigma_q/sigma_s) e^{-h}, the D differences kept
    at the real lambda fractions r, plus sigma_q sqrt(1 - e^{-2h}) z. Hence the ODE formulas on "stretched" points
    (lambda' = lambda_s + 2h, sigma' = sigma_q e^{-h}). Order 3 taylor ("heun"): diffusers' D2 coefficient is
    -alpha_t (phi3(2h) + 1), the sign slip of its multistep branch (`sde_multistep`, multistep3="diffusers").
    """
    solver_type = normalize_solver_type(solver_type)

    def stretch(q: Point) -> Point:
        dh = q.lam - ps.lam
        return Point(q.alpha, _where(q.sigma == 0.0, 0.0, q.sigma * np.exp(-dh)), ps.lam + 2.0 * dh)

    ups = singlestep("dpmsolver++", solver_type, order, ps, [stretch(q) for q in inner], stretch(pt), "solver_type")
    out = []
    for q, u in zip(list(inner) + [pt], ups, strict=True):
        noise = _where(q.sigma == 0.0, 0.0, q.sigma * np.sqrt(-np.expm1(-2.0 * (q.lam - ps.lam))))
        out.append(Update(u.a, u.c, noise))
    zero, h = _step_length(ps, pt)
    if order == 3 and solver_type == "taylor":
        r1, r2 = ((q.lam - ps.lam) / h for q in inner)
        # D2 = 2 (D1_1 - D1_0) / (r2 - r1), D1_0 = (m_s1 - m_s) / r1, D1_1 = (m_s2 - m_s) / r2; c newest first
        w = (2.0 / r2, -2.0 / r1, 2.0 / r1 - 2.0 / r2)
        c = tuple(cj - pt.alpha * wj / (r2 - r1) for cj, wj in zip(out[-1].c, w, strict=True))
        out[-1] = Update(out[-1].a, c, out[-1].noise)
    return [_identity_where(zero, u) for u in out]


@np.errstate(all="ignore")
def ancestral(ps: Point, pt: Point, eta=1.0) -> tuple[Point, float | np.ndarray]:
    """An ancestral step s -> t split as k-diffusion's `get_ancestral_step` does, in the VE sigma exp(-lambda):
    sigma_up = min(sigma_t, eta sigma_t sqrt(1 - sigma_t^2 / sigma_s^2)), sigma_down = sqrt(sigma_t^2 - sigma_up^2).

    Returns (q, noise): q is the point a deterministic update goes to (lambda = -log sigma_down, alpha = alpha_t;
    sigma_down = 0 gives sigma = 0, lambda = inf), noise = alpha_t sigma_up the scale of the Gaussian added there.
    eta = 0 gives (pt, 0). A step that goes up in sigma has no ancestral form (ValueError).
    """
    h = pt.lam - ps.lam
    if _fast_any(h < -ZERO_STEP):
        raise ValueError("sigmas: an ancestral (eta > 0) step must not increase the noise level")
    h = np.maximum(h, 0.0)
    frac = np.minimum(1.0, eta * eta * -np.expm1(-2.0 * h))  # (sigma_up / sigma_t)^2
    s_t = _where(pt.sigma == 0.0, 0.0, np.exp(-pt.lam))
    up = s_t * np.sqrt(frac)
    down_over_t = np.sqrt(1.0 - frac)
    lam = pt.lam - np.log(down_over_t)
    q = Point(pt.alpha, pt.sigma * down_over_t, _where(down_over_t == 0.0, np.inf, lam))
    return q, pt.alpha * up


MODEL_TYPES = ("noise", "x_start", "v", "score", "flow", "flow_ve", "edm_noise", "edm_v")


@np.errstate(divide="ignore", invalid="ignore")
def conversion(model_type: str, target: str, alpha, sigma, sigma_data: float = 0.5) -> tuple:
    """(px, pm) with ``target = px * x + pm * model_output`` (docs/math.md, "Notation").

    model_type: "noise" | "x_start" | "v" | "score" | "flow" (a flow-matching velocity v = eps - x0 on a path with
    alpha + sigma = 1: x0 = x - sigma v) | "flow_ve" (diffusers' flow_prediction on a VP path from VE sigmas:
    x0 = x - (sigma / alpha) v) | "edm_noise", "edm_v" (EDM's preconditioned network F on a VE path, alpha = 1:
    x0 = c_skip x + c_out F with c_skip = sd^2 / (sigma^2 + sd^2), c_out = +-sigma sd / sqrt(sigma^2 + sd^2), sd =
    sigma_data, + for the epsilon form, - for the v form, as diffusers' EDM and cosine schedulers); target: "x0" |
    "eps".
    """
    if target not in ("x0", "eps"):
        raise ValueError(f"target: expected 'x0' or 'eps', got {target!r}")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type: expected one of {MODEL_TYPES}, got {model_type!r}")
    if model_type in ("edm_noise", "edm_v"):
        sd2 = sigma_data * sigma_data
        c_skip = sd2 / (sigma * sigma + sd2)
        c_out = (1.0 if model_type == "edm_noise" else -1.0) * sigma * sigma_data / np.sqrt(sigma * sigma + sd2)
        if target == "x0":
            return c_skip, c_out
        if _fast_any(sigma == 0.0):
            raise ValueError("t: cannot convert to a noise prediction at sigma = 0")
        return (1.0 - c_skip) / sigma, -c_out / sigma  # eps = (x - x0) / sigma on the VE path
    if target == "x0":
        if model_type == "noise":
            return 1.0 / alpha, -sigma / alpha
        if model_type == "x_start":
            return 0.0, 1.0
        if model_type == "v":
            return alpha, -sigma
        if model_type == "flow":
            return 1.0, -sigma
        if model_type == "flow_ve":
            return 1.0, -sigma / alpha
        return 1.0 / alpha, sigma * sigma / alpha  # score
    if model_type in ("x_start", "v", "flow_ve") and _fast_any(sigma == 0.0):
        raise ValueError("t: cannot convert to a noise prediction at sigma = 0")
    if model_type == "noise":
        return 0.0, 1.0
    if model_type == "x_start":
        return 1.0 / sigma, -alpha / sigma
    if model_type == "v":
        return sigma, alpha
    if model_type == "flow":
        return 1.0, alpha  # eps = x + alpha v
    if model_type == "flow_ve":
        return (1.0 - alpha) / sigma, 1.0  # eps = (x - alpha x0) / sigma with x0 = x - (sigma / alpha) v
    return 0.0, -sigma  # score


# ---- UniPC (Zhao et al. 2023), as diffusers' UniPCMultistepScheduler computes it (docs/math.md, "UniPC") ----

UNIPC_VARIANTS = ("bh1", "bh2")
_PHI_SERIES_TERMS = 24  # |x| < 1: the series' remainder is below 1/25!, far under float64 rounding


def _x_phi(x, k: int):
    """x * phi_{k+1}(x) for k = 1..3, with phi_1(x) = expm1(x)/x and phi_{j+1}(x) = (phi_j(x) - 1/j!)/x.

    The recursion loses ~(k+1)/|x| of its digits per level for small |x| (1000 steps: |x| ~ 0.01, so ~1e-10 left of
    phi_4 in float64); there the Taylor series sum_j x^(j+1)/(j+k+1)! is used instead, by Horner's rule."""
    x = _f64(x)
    with np.errstate(all="ignore"):
        rec = np.expm1(x) / x
        fact = 1.0
        for j in range(1, k + 1):
            fact *= j
            rec = rec - 1.0 / fact if j == k else (rec - 1.0 / fact) / x
        ser = 0.0
        for j in range(_PHI_SERIES_TERMS, -1, -1):
            ser = ser * x + 1.0 / _factorial(j + k + 1)
        ser = ser * x
    return _where(np.abs(x) < 1.0, ser, rec)


def _factorial(n: int) -> float:
    out = 1.0
    for j in range(2, n + 1):
        out *= j
    return out


def _vandermonde_solve(nodes: list, rhs: list) -> list:
    """The solution rho of sum_i nodes[i]^j rho_i = rhs[j], j = 0..m-1 (diffusers' R rho = b), per broadcast
    element (np.linalg.solve on a stack of m x m systems)."""
    m = len(nodes)
    shape = np.broadcast_shapes(*(np.shape(v) for v in nodes + rhs))
    cols = [np.broadcast_to(np.asarray(v, dtype=np.float64), shape) for v in nodes]
    mat = np.stack([np.stack([c**j for c in cols], -1) for j in range(m)], -2)
    vec = np.stack([np.broadcast_to(np.asarray(v, dtype=np.float64), shape) for v in rhs], -1)[..., None]
    sol = np.linalg.solve(mat, vec)[..., 0]
    return [sol[..., i][()] for i in range(m)]


def _unipc_setup(variant: str, predict_x0: bool, order: int, prev: list[Point], pt: Point):
    """What UniP and UniC share over one interval prev[0] -> pt: (zero, a, k, hh, B(h), h_phi_1, r, b)."""
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"solver_type: expected one of {UNIPC_VARIANTS}, got {variant!r}")
    _check_order(order, len(prev))
    s0 = prev[0]
    zero, h = _step_length(s0, pt)
    hh = -h if predict_x0 else h
    a, k = (pt.sigma / s0.sigma, pt.alpha) if predict_x0 else (pt.alpha / s0.alpha, pt.sigma)
    big_b = hh if variant == "bh1" else np.expm1(hh)
    r = [(p.lam - s0.lam) / h for p in prev[1:order]]
    b = [_x_phi(hh, j) * _factorial(j) / big_b for j in range(1, order + 1)]
    return zero, a, k, big_b, np.expm1(hh), r, b


def _unipc_rhos(order: int, r: list, b: list, corrector: bool) -> list:
    """diffusers' rhos: UniP-p solves the leading (p-1) x (p-1) system (p = 2: exactly 1/2), UniC-p the full p x p
    one over (r_1 .. r_{p-1}, 1) (p = 1: exactly 1/2)."""
    if corrector:
        return [0.5] if order == 1 else _vandermonde_solve(r + [1.0], b)
    if order == 1:
        return []
    return [0.5] if order == 2 else _vandermonde_solve(r, b[:-1])


@np.errstate(all="ignore")
def unipc_predictor(variant: str, predict_x0: bool, order: int, prev: list[Point], pt: Point) -> Update:
    """UniP-``order`` (B(h) variant "bh1" | "bh2") from prev[0] to pt over the outputs at prev (newest first):
    x0 outputs when predict_x0 (hh = -h), eps outputs otherwise (hh = h),
        x_t = a x - k expm1(hh) m0 - k B(h) sum_l rho_l (m_l - m0) / r_l,
    a = sigma_t/sigma_s0, k = alpha_t (x0) or a = alpha_t/alpha_s0, k = sigma_t (eps). Order 1 is DDIM (also to
    sigma = 0, as its finite limit); higher orders cannot end at sigma = 0."""
    if order == 1:
        if variant not in UNIPC_VARIANTS:
            raise ValueError(f"solver_type: expected one of {UNIPC_VARIANTS}, got {variant!r}")
        return multistep("dpmsolver++" if predict_x0 else "dpmsolver", "dpmsolver", 1, prev, pt)
    _check_finite_step(order, pt)
    zero, a, k, big_b, phi1, r, b = _unipc_setup(variant, predict_x0, order, prev, pt)
    rho = _unipc_rhos(order, r, b, corrector=False)
    c = [-k * phi1 + k * big_b * sum(rl / rk for rl, rk in zip(rho, r, strict=True))]
    c += [-k * big_b * rl / rk for rl, rk in zip(rho, r, strict=True)]
    return _identity_where(zero, Update(a, tuple(c)))


def _check_corrector_end(pt: Point) -> None:
    if _fast_any(pt.sigma == 0.0):
        raise ValueError("t: a UniC corrector cannot end at sigma = 0 (its h is infinite)")


@np.errstate(all="ignore")
def unipc_corrector(variant: str, predict_x0: bool, order: int, prev: list[Point], pt: Point) -> Update:
    """UniC-``order``: the corrected sample at pt from the predictor's start (`last_sample`), over the outputs
    (m_t, m0, m_1, ..., m_{order-1}): m_t at pt, the others at prev (newest first), as `unipc_predictor`'s update
    with D_t = m_t - m0 (r = 1) added and the rhos of the full system."""
    _check_corrector_end(pt)
    zero, a, k, big_b, phi1, r, b = _unipc_setup(variant, predict_x0, order, prev, pt)
    rho = _unipc_rhos(order, r, b, corrector=True)
    terms = [rl / rk for rl, rk in zip(rho[:-1], r, strict=True)]
    c = [-k * big_b * rho[-1], -k * phi1 + k * big_b * (sum(terms) + rho[-1])] + [-k * big_b * t for t in terms]
    return _identity_where(zero, Update(a, tuple(c)))


@np.errstate(all="ignore")
def unipc_correction(variant: str, predict_x0: bool, order: int, prev: list[Point], pt: Point) -> Update:
    """UniC-``order`` relative to UniP-``order`` of the same interval: x_c = x_pred + sum_j d_j m_j over (m_t, m0,
    ..., m_{order-1}), returned as Update(1, d). UniC and UniP share the x coefficient, the m0 term and the
    differences D_l, so d is formed from the rhos' differences directly (no cancellation of the shared terms).
    A zero-length interval is no correction (d = 0)."""
    _check_corrector_end(pt)
    zero, a, k, big_b, phi1, r, b = _unipc_setup(variant, predict_x0, order, prev, pt)
    rc = _unipc_rhos(order, r, b, corrector=True)
    rp = _unipc_rhos(order, r, b, corrector=False) or [0.0] * (order - 1)
    diff = [c_ - p_ for c_, p_ in zip(rc[:-1], rp, strict=True)]
    d = [-k * big_b * rc[-1], k * big_b * (sum(dl / rk for dl, rk in zip(diff, r, strict=True)) + rc[-1])]
    d += [-k * big_b * dl / rk for dl, rk in zip(diff, r, strict=True)]
    return _identity_where(zero, Update(1.0, tuple(d)))
