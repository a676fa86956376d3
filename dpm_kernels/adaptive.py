"""Adaptive step size DPM-Solver-12 / -23 (the paper's Algorithm 4; docs/math.md "Adaptive step size").

Each attempt evaluates a lower- and a higher-order singlestep solution sharing model evaluations, and
accepts when the RMS error ``E = max_b rms((x_high - x_low) / max(atol, rtol * max(|x_low|, |x_prev|)))``
is <= 1; then ``h <- min(theta * h * E^(-1/order), lambda_0 - lambda_s)``. Accept/reject needs E on the
host: one sync per attempt, inherent to the method. Every update runs as a fused step, through the solver's
public building blocks (`DPMSolver.prediction`, `DPMSolver.combine`).
"""

from __future__ import annotations

import torch

from . import coefficients as C
from . import planner as P


def run_adaptive(solver, x, order, t_T, t_0, h_init, atol, rtol, theta, t_err, solver_type):
    ns = solver.noise_schedule
    alg = solver.algorithm_type

    def at_lambda(lam):
        t = float(ns.inverse_lambda64(lam))
        return t, P.point(ns, t)

    s = float(t_T)
    ps = P.point(ns, s)
    lambda_0 = float(ns.lambda64(t_0))
    h = float(h_init)
    x_prev = x
    nfe = 0
    r1, r2 = (0.5, None) if order == 2 else (1.0 / 3.0, 2.0 / 3.0)
    while abs(s - t_0) > t_err:
        t, pt = at_lambda(ps.lam + h)
        hh = pt.lam - ps.lam
        m_s = solver.prediction(x, s)
        t1, p1 = at_lambda(ps.lam + r1 * hh)
        if order == 2:
            x_low = solver.combine(C.multistep(alg, solver_type, 1, [ps], pt), x, [m_s])
            ups = C.singlestep(alg, solver_type, 2, ps, [p1], pt)
            m_s1 = solver.prediction(solver.combine(ups[0], x, [m_s]), t1)
            x_high = solver.combine(ups[1], x, [m_s1, m_s])
        else:
            low = C.singlestep(alg, solver_type, 2, ps, [p1], pt)
            m_s1 = solver.prediction(solver.combine(low[0], x, [m_s]), t1)
            x_low = solver.combine(low[1], x, [m_s1, m_s])
            t2, p2 = at_lambda(ps.lam + r2 * hh)
            high = C.singlestep(alg, solver_type, 3, ps, [p1, p2], pt)
            m_s2 = solver.prediction(solver.combine(high[1], x, [m_s1, m_s]), t2)
            x_high = solver.combine(high[2], x, [m_s2, m_s1, m_s])
        delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
        err = ((x_high - x_low) / delta).reshape(x.shape[0], -1)
        e = float(torch.sqrt(torch.square(err).mean(dim=-1)).max())
        if e <= 1.0:
            x, s, ps, x_prev = x_high, t, pt, x_low
        h = min(theta * h * (e ** (-1.0 / order) if e > 0 else float("inf")), lambda_0 - float(ps.lam))
        nfe += order
    solver.last_nfe = nfe
    return x
