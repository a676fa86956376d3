"""The planner: times, orders and float64 coefficients of every model evaluation of a trajectory.

A plan is a list of `Eval`s. Each is one model evaluation followed by one fused step: evaluate the model
at x (or at the intermediate point u of a singlestep solver), convert its output, store it in a ring slot,
and combine the block-start x with stored outputs into x (end of a solver step) or into u. The plan is
computed once per trajectory in float64 on the host; the executor copies its coefficient table to the
device once and never syncs. Everything a backend needs per step is one coefficient row plus slot indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import coefficients as C
from .schedule import NoiseScheduleVP

SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic", "karras", "exponential", "uniform_lambda")
METHODS = ("multistep", "singlestep", "singlestep_fixed", "adaptive")


def time_steps(ns: NoiseScheduleVP, skip_type: str, t_T: float, t_0: float, n: int,
               karras_rho: float = 7.0) -> np.ndarray:
    """n + 1 times from t_T to t_0 (float64), spaced by `skip_type`.

    - "time_uniform": uniform in t; "time_quadratic": uniform in sqrt(t) (the authors' three types);
    - "logSNR" (aliases "uniform_lambda", "exponential"): uniform in lambda, i.e. log-uniform in the VE sigma
      (diffusers' exponential sigmas and "lu lambdas" are this spacing);
    - "karras": sigma_i = (sigma_max^(1/rho) + i/n (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho in the VE
      sigma = sigma_t / alpha_t = exp(-lambda), rho = 7 (Karras et al. 2022).
    """
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"skip_type: expected one of {SKIP_TYPES}, got {skip_type!r}")
    if n < 1:
        raise ValueError(f"steps: need at least 1 step, got {n}")
    if skip_type == "time_uniform":
        ts = np.linspace(t_T, t_0, n + 1)
    elif skip_type == "time_quadratic":
        ts = np.linspace(math.sqrt(t_T), math.sqrt(t_0), n + 1) ** 2
    elif skip_type in ("logSNR", "uniform_lambda", "exponential"):
        lam = np.linspace(float(ns.lambda64(t_T)), float(ns.lambda64(t_0)), n + 1)
        ts = ns.inverse_lambda64(lam)
    else:
        s_max, s_min = math.exp(-float(ns.lambda64(t_T))), math.exp(-float(ns.lambda64(t_0)))
        ramp = np.linspace(0.0, 1.0, n + 1)
        inv = s_max ** (1.0 / karras_rho) + ramp * (s_min ** (1.0 / karras_rho) - s_max ** (1.0 / karras_rho))
        ts = ns.inverse_lambda64(-np.log(inv**karras_rho))
    # The end points are exact; interior points from an inverse map keep their order but may round.
    ts[0], ts[-1] = t_T, t_0
    return ts


def multistep_orders(steps: int, order: int, lower_order_final: bool, threshold: int) -> list[int]:
    """Order of each of the `steps` multistep updates.

    Warm-up: update i (1-based) has order min(order, i). With lower_order_final and steps < threshold the
    last updates drop to min(order, steps + 1 - i) (the authors use threshold 10, diffusers 15).
    """
    out = []
    for i in range(1, steps + 1):
        o = min(order, i)
        if lower_order_final and steps < threshold:
            o = min(o, steps + 1 - i)
        out.append(o)
    return out


def singlestep_orders(steps: int, order: int) -> list[int]:
    """The authors' "DPM-Solver-fast" combination of singlestep orders using exactly `steps` evaluations."""
    if order == 3:
        k = steps // 3 + 1
        if steps % 3 == 0:
            orders = [3] * (k - 2) + [2, 1]
        elif steps % 3 == 1:
            orders = [3] * (k - 1) + [1]
        else:
            orders = [3] * (k - 1) + [2]
    elif order == 2:
        orders = [2] * (steps // 2) + ([1] if steps % 2 else [])
    else:
        orders = [1] * steps
    return [o for o in orders if o > 0]


@dataclass(frozen=True)
class Eval:
    """One model evaluation and the fused step that consumes it."""

    t: float  # time of the evaluation
    point: C.Point  # alpha/sigma/lambda at t (for the output conversion)
    source: str  # "x": evaluate at x; "u": at the intermediate point u
    update: C.Update  # x_new = a * x + c[0] * m_new + c[1] * hist1 + c[2] * hist2 + noise * z
    write_slot: int | None  # ring slot receiving the converted output (None: not needed later)
    read_slots: tuple[int, ...]  # ring slots of hist1, hist2 (newest first)
    dest: str  # "x" (a solver step ends here) or "u"
    order: int  # the solver order of the step this evaluation belongs to
    step: int  # 1-based index of that solver step
    t_next: float  # the time the result belongs to


@dataclass
class Plan:
    evals: list[Eval]
    n_slots: int
    times: np.ndarray  # the solver-step boundaries t_0 = t_start, ..., t_end
    orders: list[int]  # order of each solver step
    needs_u: bool = False
    kind: str = "multistep"  # "multistep" | "singlestep"

    @property
    def nfe(self) -> int:
        return len(self.evals)


def _pt(ns: NoiseScheduleVP, t: float) -> C.Point:
    return C.Point.from_log_alpha(float(ns.log_alpha64(t)))


def plan_multistep(ns, algorithm_type, solver_type, times, orders, eta=0.0, s_noise=1.0,
                   multistep3="standard", points: list[C.Point] | None = None) -> Plan:
    """Multistep: evaluation i at times[i] feeds update i -> i+1 (a ring of max(orders) slots).

    times: the n + 1 step boundaries (the model is evaluated at the first n); orders: n orders.
    points: the (alpha, sigma, lambda) of each boundary when they are not those of `ns` at `times` --
    e.g. a last point with sigma = 0 (complete denoising, which no finite t of a VP schedule reaches).
    """
    n = len(times) - 1
    if len(orders) != n:
        raise ValueError(f"orders: expected {n} orders for {n + 1} times, got {len(orders)}")
    pts = list(points) if points is not None else [_pt(ns, t) for t in times]
    if len(pts) != n + 1:
        raise ValueError(f"points: expected {n + 1} points, got {len(pts)}")
    k = max(orders)
    evals = []
    sde = algorithm_type.startswith("sde")
    for i in range(n):
        o = orders[i]
        prev = [pts[i - j] for j in range(o)]
        if sde:
            upd = C.sde_multistep(algorithm_type, solver_type, o, prev, pts[i + 1], eta, s_noise, multistep3)
        else:
            upd = C.multistep(algorithm_type, solver_type, o, prev, pts[i + 1], multistep3)
        # the output of evaluation i is needed by later updates only if some later order reaches back to it
        needed = any(orders[j] > j - i for j in range(i + 1, n))
        evals.append(Eval(
            t=float(times[i]), point=pts[i], source="x", update=upd,
            write_slot=(i % k) if needed else None,
            read_slots=tuple((i - j) % k for j in range(1, o)),
            dest="x", order=o, step=i + 1, t_next=float(times[i + 1]),
        ))
    return Plan(evals, k, np.asarray(times, dtype=np.float64), list(orders))


def plan_singlestep(ns, algorithm_type, solver_type, outer, orders, skip_type="time_uniform", u2_form="taylor",
                    inner_times: list[list[float]] | None = None) -> Plan:
    """Singlestep blocks outer[i] -> outer[i+1] of orders[i].

    Intermediate times are spaced by `skip_type` inside each block (the authors' rule), or given per block
    in `inner_times` (orders[i] - 1 times each; diffusers' singlestep scheduler uses its own timesteps).
    """
    if len(outer) != len(orders) + 1:
        raise ValueError(f"orders: expected {len(outer) - 1} block orders, got {len(orders)}")
    evals = []
    for b, o in enumerate(orders):
        s, t = float(outer[b]), float(outer[b + 1])
        if inner_times is not None:
            inner_t = np.asarray(inner_times[b], dtype=np.float64)
            if inner_t.shape != (o - 1,):
                raise ValueError(f"inner_times: block {b} of order {o} needs {o - 1} times, got {inner_t.shape}")
        else:
            inner_t = time_steps(ns, skip_type, s, t, o)[1:-1] if o > 1 else np.zeros(0)
        ps, pt = _pt(ns, s), _pt(ns, t)
        inner = [_pt(ns, v) for v in inner_t]
        ups = C.singlestep(algorithm_type, solver_type, o, ps, inner, pt, u2_form)
        eval_t = [s] + [float(v) for v in inner_t]
        eval_p = [ps] + inner
        for j in range(o):
            last = j == o - 1
            evals.append(Eval(
                t=eval_t[j], point=eval_p[j], source="x" if j == 0 else "u", update=ups[j],
                write_slot=None if last else j,
                read_slots=tuple(range(j - 1, -1, -1)),
                dest="x" if last else "u", order=o, step=b + 1,
                t_next=t if last else float(inner_t[j]),
            ))
    return Plan(evals, 2, np.asarray(outer, dtype=np.float64), list(orders), needs_u=max(orders) > 1,
                kind="singlestep")


def coefficient_table(plan: Plan, model_type: str, algorithm_type: str, guidance_scale: float = 1.0,
                      thresholding: bool = False) -> np.ndarray:
    """[nfe, NCOEF] float64 rows for the fused op (see `dpm_kernels.layout`).

    With thresholding the output is converted to x0 (px, pm), thresholded, then to the solver's
    prediction (qx, qm); without, straight to the solver's prediction.
    """
    from . import layout as L

    target = "x0" if C.is_data_prediction(algorithm_type) else "eps"
    rows = np.zeros((len(plan.evals), L.NCOEF), dtype=np.float64)
    for i, ev in enumerate(plan.evals):
        p = ev.point
        rows[i, L.GUIDE] = guidance_scale
        if thresholding:
            rows[i, L.PX], rows[i, L.PM] = C.conversion(model_type, "x0", p.alpha, p.sigma)
            rows[i, L.QX], rows[i, L.QM] = C.conversion("x_start", target, p.alpha, p.sigma)
        else:
            rows[i, L.PX], rows[i, L.PM] = C.conversion(model_type, target, p.alpha, p.sigma)
            rows[i, L.QX], rows[i, L.QM] = 0.0, 1.0
        u = ev.update
        rows[i, L.A] = u.a
        for j, c in enumerate(u.c):
            rows[i, L.C0 + j] = c
        rows[i, L.CN] = u.noise
    if not np.all(np.isfinite(rows)):
        bad = sorted({L.NAMES[j] for j in np.nonzero(~np.isfinite(rows))[1]})
        raise ValueError(f"t_end: the plan has non-finite coefficients ({', '.join(bad)}); check the time range")
    return rows
