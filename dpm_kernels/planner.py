"""The planner: times, orders and float64 coefficients of every model evaluation -- the only code that writes
coefficient rows.

A trajectory (points on the schedule, orders, algorithm, solver type, SDE options) becomes a `Plan`: one `Eval` per
model evaluation (where the model is evaluated, which ring slots its fused step reads and writes) and the `Update`
of each (a, c, noise; arrays over the evaluations). `Plan.table(conversion)` adds how the raw model output becomes
the stored prediction (`Conversion`: model type, target, thresholding, guidance scales) and gives the [nfe, NCOEF]
float64 table; `DeviceTable` puts it on the sample's device once. A step is then a row of that table plus one op
call. `coefficient_rows` is the row writer itself, public for code that builds its own steps: vectorized, one row
per point (per step of a trajectory, or per sample with per-sample times).

History: the ring holds the converted outputs of distinct times only. A zero-length step (repeated times or sigmas)
is the identity and stores nothing -- the next evaluation, at the same time, stores its output instead -- and an
update's order is capped by the number of distinct earlier times, so no divided difference ever spans h = 0.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import numpy as np
import torch

from . import coefficients as C
from . import layout as L
from .schedule import NoiseSchedule

SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic", "karras", "exponential", "uniform_lambda",
              "time_uniform_flow")
METHODS = ("multistep", "singlestep", "singlestep_fixed", "adaptive")


def point(ns: NoiseSchedule, t) -> C.Point:
    """The schedule's point(s) at continuous time(s) t (a float or an array)."""
    return ns.point64(t)


class VELambdaTime:
    """Time t = lambda = -log sigma on VE points (alpha = 1), the time of k-diffusion's DPMSolver class: a stand-in
    for a schedule where the planner reads only `point64`."""

    @staticmethod
    def point64(t) -> C.Point:
        t = np.asarray(t, dtype=np.float64)
        return C.Point(np.ones_like(t)[()], np.exp(-t)[()], t[()])


def _check_times(ns, t, name: str) -> None:
    """The schedule's range rule (`NoiseSchedule.check_times`) where times are a schedule's (not VELambdaTime's)."""
    if isinstance(ns, NoiseSchedule):
        ns.check_times(t, name)


def stack_points(points) -> C.Point:
    """One `Point` of arrays from a list of points (or a `Point` already holding arrays)."""
    if isinstance(points, C.Point):
        return points
    pts = list(points)
    return C.Point(*(np.array([getattr(p, f) for p in pts], dtype=np.float64) for f in ("alpha", "sigma", "lam")))


def flow_shift_times(t, shift: float) -> np.ndarray:
    """The flow shift s*t / (1 + (s - 1)*t) (SD3's and SANA's `flow_shift`; diffusers' `shift`), float64."""
    t = np.asarray(t, dtype=np.float64)
    return shift * t / (1.0 + (shift - 1.0) * t)


def time_steps(ns: NoiseSchedule, skip_type: str, t_T: float, t_0: float, n: int,
               karras_rho: float = 7.0, shift: float = 1.0) -> np.ndarray:
    """n + 1 times from t_T to t_0 (float64), spaced by `skip_type`.

    - "time_uniform": uniform in t; "time_quadratic": uniform in sqrt(t) (the authors' three types);
    - "logSNR" (aliases "uniform_lambda", "exponential"): uniform in lambda, i.e. log-uniform in the VE sigma
      (diffusers' exponential sigmas and "lu lambdas" are this spacing);
    - "karras": sigma_i = (sigma_max^(1/rho) + i/n (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho in the VE
      sigma = sigma_t / alpha_t = exp(-lambda), rho = 7 (Karras et al. 2022);
    - "time_uniform_flow" (SANA's flow grid): u uniform from 1 - t_0 down to 1 - t_T, then shifted,
      t = s*u / (1 + (s - 1)*u) with s = `shift` (`flow_shift_times`). It does not run from t_T to t_0: with the
      defaults t_T = 1, t_0 = 1/N it starts at shift(1 - 1/N) and ends at t = 0 exactly (clean data, lambda = +inf).
    """
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"skip_type: expected one of {SKIP_TYPES}, got {skip_type!r}")
    _check_times(ns, t_T, "t_T")
    _check_times(ns, t_0, "t_0")
    if n < 1:
        raise ValueError(f"steps: need at least 1 step, got {n}")
    if skip_type == "time_uniform_flow":
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"flow_shift: must be a finite number > 0, got {shift}")
        return flow_shift_times(np.linspace(1.0 - t_0, 1.0 - t_T, n + 1), shift)
    if skip_type not in ("time_uniform", "time_quadratic") and not np.isfinite(
            [float(ns.lambda64(t_T)), float(ns.lambda64(t_0))]).all():
        raise ValueError(f"skip_type: {skip_type!r} spaces the steps in lambda, which is infinite at the ends "
                         f"t = {t_T}, {t_0} (pure noise or clean data); use time_uniform or time_quadratic, or move "
                         "the ends inside")
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


# ---- how a raw model output becomes the stored prediction, and the rows ----

@dataclass(frozen=True)
class Conversion:
    """The conversion part of a row: raw output of `model_type` -> the solver's `target` ("x0" | "eps").

    With thresholding the output goes to x0 first, is thresholded, then goes to the target. `guidance_scale` is
    the classifier-free guidance scale the kernel applies to (uncond, cond) pairs; `pag_scale` the perturbed-attention
    guidance scale it adds with the "stacked3" layout, ``+ pag_scale * (cond - perturbed)`` (diffusers' PAG pipelines,
    Sana's "classifier-free_PAG"); the other layouts ignore it.
    """

    model_type: str = "noise"
    target: str = "x0"
    thresholding: bool = False
    guidance_scale: float = 1.0
    sigma_data: float = 0.5  # EDM preconditioning only ("edm_noise", "edm_v")
    pag_scale: float = 0.0

    @staticmethod
    def for_algorithm(model_type: str, algorithm_type: str, thresholding: bool = False,
                      guidance_scale: float = 1.0) -> Conversion:
        target = "x0" if C.is_data_prediction(algorithm_type) else "eps"
        return Conversion(model_type, target, thresholding, guidance_scale)

    @staticmethod
    def identity(target: str) -> Conversion:
        """The model output already is the target (a denoiser's x0, an already converted prediction)."""
        return Conversion("x_start" if target == "x0" else "noise", target)


IDENTITY_X0 = Conversion.identity("x0")


def coefficient_rows(points: C.Point, conversion: Conversion, update: C.Update | None = None,
                     what: str = "t") -> np.ndarray:
    """Float64 coefficient rows [..., NCOEF] for model evaluations at `points` followed by `update`.

    points and update broadcast (scalars: one row [NCOEF]); update.c holds up to 4 weights, newest output first (m,
    hist1, hist2, hist3: `layout.C_SLOTS`). update None: no combination, the step's output is
    the converted prediction itself (a = 0, c0 = 1). Non-finite rows raise ValueError naming `what`, the caller's
    argument that determined them.
    """
    alpha, sigma = points.alpha, points.sigma
    fields = [alpha, sigma] + ([] if update is None else [update.a, update.noise, *update.c])
    shape = np.broadcast_shapes(*(np.shape(f) for f in fields))
    rows = np.zeros(shape + (L.NCOEF,), dtype=np.float64)
    rows[..., L.GUIDE] = conversion.guidance_scale
    rows[..., L.GUIDE2] = conversion.pag_scale
    sd = conversion.sigma_data
    if conversion.thresholding:
        rows[..., L.PX], rows[..., L.PM] = C.conversion(conversion.model_type, "x0", alpha, sigma, sd)
        rows[..., L.QX], rows[..., L.QM] = C.conversion("x_start", conversion.target, alpha, sigma)
    else:
        rows[..., L.PX], rows[..., L.PM] = C.conversion(conversion.model_type, conversion.target, alpha, sigma, sd)
        rows[..., L.QM] = 1.0
    if update is None:
        rows[..., L.C0] = 1.0
    else:
        if len(update.c) > len(L.C_SLOTS):
            raise ValueError(f"update: at most {len(L.C_SLOTS)} model outputs are combined, got {len(update.c)}")
        rows[..., L.A] = update.a
        for slot, c in zip(L.C_SLOTS, update.c, strict=False):
            rows[..., slot] = c
        rows[..., L.CN] = update.noise
    if not np.isfinite(rows).all():
        bad = sorted({L.NAMES[j] for j in np.nonzero(~np.isfinite(rows.reshape(-1, L.NCOEF)))[1]})
        raise ValueError(f"{what}: the step has non-finite coefficients ({', '.join(bad)}); check the times")
    return rows


class DeviceTable:
    """A float64 coefficient table uploaded to a device once (pinned, asynchronous on CUDA): ``rows[k]`` are views.

    The host copy stays referenced: a CUDA graph that captured the upload reads it again at every replay.
    """

    def __init__(self, rows: np.ndarray, device: torch.device):
        host = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float64))
        if device.type == "cuda":
            host = host.pin_memory()
            self.device_rows = host.to(device, non_blocking=True)
        else:
            self.device_rows = host.to(device)
        self.host = host
        self.rows: tuple[torch.Tensor, ...] = self.device_rows.unbind(0) if rows.ndim > 1 else (self.device_rows,)

    def __len__(self) -> int:
        return len(self.rows)


class Cache:
    """A small least-recently-used map for plans and uploaded tables: a trajectory run again (the next image, the
    same options) is planned and uploaded once. Thread-safe; `size` entries at most."""

    def __init__(self, size: int):
        self.size = size
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], object]):
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        value = make()
        with self._lock:
            self._d[key] = value
            if len(self._d) > self.size:
                self._d.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._d)


# ---- plans ----

@dataclass(frozen=True)
class Eval:
    """One model evaluation and the fused step that consumes it."""

    t: float  # time of the evaluation
    t_next: float  # the time the step's result belongs to
    source: str  # "x": evaluate at x; "u": at the intermediate point u
    dest: str  # "x" (a solver step ends here) or "u"
    write_slot: int | None  # ring slot receiving the converted output (None: not needed later)
    read_slots: tuple[int, ...]  # ring slots of hist1, hist2, hist3 (newest first)
    order: int  # the order of the update this evaluation feeds
    step: int  # 1-based index of the solver step it belongs to
    noisy: bool  # the update adds noise
    corrected: bool = False  # UniPC: the step first corrects the previous step's result, which must be its x
    reads_eval: bool = False  # the update reads x_eval itself as its first history entry (hist1), before read_slots


@dataclass
class Plan:
    evals: list[Eval]
    points: C.Point  # arrays [nfe]: where each evaluation happens (its conversion)
    update: C.Update  # arrays [nfe]: a, c (3 arrays, newest output first), noise
    n_slots: int
    times: np.ndarray  # the solver-step boundaries t_0 = t_start, ..., t_end
    orders: list[int]  # order of each solver step (multistep: as run, after the caps of zero-length steps)
    needs_u: bool = False
    kind: str = "multistep"  # "multistep" | "singlestep" | "unipc"
    # UniPC: per evaluation, the corrector's terms d (newest output first) with x_c = x + sum_j d_j m_j -- the
    # corrected sample diffusers keeps as `last_sample`, which the fused step never writes
    correction: np.ndarray | None = None
    _uploads: dict = field(default_factory=dict, repr=False, compare=False)  # (what, device, ...) -> device tensors

    @property
    def nfe(self) -> int:
        return len(self.evals)

    def table(self, conversion: Conversion, what: str = "t_end") -> np.ndarray:
        """[nfe, NCOEF] float64 rows for the fused op (`coefficient_rows`)."""
        return coefficient_rows(self.points, conversion, self.update, what)

    def device_table(self, conversion: Conversion, device: torch.device, what: str = "t_end",
                     combine: bool = True) -> DeviceTable:
        """`table` uploaded to `device`, once per (conversion, device) for this plan. combine=False: rows of the
        conversion alone (the step's output is the converted prediction)."""
        key = ("rows", conversion, device, combine)
        if key not in self._uploads:
            rows = self.table(conversion, what) if combine else coefficient_rows(self.points, conversion, None, what)
            self._uploads[key] = DeviceTable(rows, device)
        return self._uploads[key]

    def eval_times(self, device: torch.device, dtype: torch.dtype, batch: int) -> tuple[torch.Tensor, ...]:
        """Each evaluation's time as a [batch] tensor of `dtype` on `device` (views of one upload)."""
        key = ("times", device, dtype, batch)
        if key not in self._uploads:
            t = DeviceTable(np.array([ev.t for ev in self.evals]), device).device_rows.to(dtype)
            self._uploads[key] = t[:, None].expand(len(self.evals), batch).unbind(0)
        return self._uploads[key]


def _update_arrays(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.ones(n), np.zeros((n, 3)), np.zeros(n)


def _store(a, c, noise, idx, u: C.Update) -> None:
    a[idx] = u.a
    for j, cj in enumerate(u.c):
        c[idx, j] = cj
    noise[idx] = u.noise


class _History:
    """The ring of converted outputs a multistep trajectory keeps (module doc: distinct times only).

    Walks the n evaluations at lam[0..n-1] (step i goes to lam[i + 1]): a zero-length step has order 1 (its update is
    the identity) and stores nothing; any other step's order is orders[i] capped by the stored outputs + 1, and its
    output is stored, in a slot no read of the same step uses. Step i reads the first `reads` stored outputs, newest
    first: order - 1 of them (its update's history), or more where `extra_reads(i, orders so far)` asks (at most
    `depth`).
    Attributes, per step: zero, order, prev (evaluations whose outputs the update combines, its own first), reads
    (ring slots read), and the ring size n_slots = depth + 1; `write_slot(i)` is None where no later step reads it.
    """

    def __init__(self, lam: list[float], orders: list[int], depth: int, extra_reads=None):
        self.zero, self.order, self.prev, self.reads, self.n_slots = [], [], [], [], depth + 1
        self._slots, self._read = [], set()
        entries: list[tuple[int, int]] = []  # (evaluation, ring slot) of the stored outputs, newest first
        for i, want in enumerate(orders):
            z = not abs(lam[i + 1] - lam[i]) > C.ZERO_STEP
            o = 1 if z else min(want, len(entries) + 1)
            n_read = max(o - 1, extra_reads(i, self.order) if extra_reads is not None else 0)
            self.zero.append(z)
            self.order.append(o)
            self.prev.append([i] + [e for e, _ in entries[:o - 1]])
            self.reads.append(tuple(s for _, s in entries[:n_read]))
            self._read.update(e for e, _ in entries[:n_read])
            slot = None
            if not z:
                taken = {s for _, s in entries[:depth]}
                slot = next(s for s in range(self.n_slots) if s not in taken)
                entries = [(i, slot)] + entries[:depth]
            self._slots.append(slot)

    def write_slot(self, i: int) -> int | None:
        return self._slots[i] if i in self._read else None


def plan_multistep(ns, algorithm_type, solver_type, times, orders, eta=0.0, s_noise=1.0, multistep3="standard",
                   points=None) -> Plan:
    """Multistep: evaluation i at times[i] feeds update i -> i+1 (a ring of max(orders) slots).

    times: the n + 1 step boundaries (the model is evaluated at the first n); orders: n requested orders.
    points: the (alpha, sigma, lambda) of each boundary when they are not those of `ns` at `times` (a list of
    points or one `Point` of arrays) -- e.g. a last point with sigma = 0 (complete denoising, which no finite t
    of a VP schedule reaches), or k-diffusion's VE points. Zero-length steps are the identity and store nothing;
    an order is capped by the distinct earlier times (module doc), and a step into sigma = 0 (lambda = +inf) is
    first order: the only update with a finite limit there (the data prediction itself; a higher order's divided
    differences grow like h).
    """
    n = len(times) - 1
    if len(orders) != n:
        raise ValueError(f"orders: expected {n} orders for {n + 1} times, got {len(orders)}")
    C.is_data_prediction(algorithm_type)  # validated also when every step is zero-length
    C.normalize_solver_type(solver_type)
    if points is None:
        _check_times(ns, times, "times")
    pts = stack_points(points) if points is not None else point(ns, np.asarray(times, dtype=np.float64))
    if np.shape(pts.lam) != (n + 1,):
        raise ValueError(f"points: expected {n + 1} points, got {np.shape(pts.lam)}")
    k = max(orders)
    lam = pts.lam.tolist()
    # a step into sigma = 0 (lambda = +inf) is first order: the only update with a finite limit there
    orders = [1 if lam[i + 1] == math.inf else o for i, o in enumerate(orders)]
    ring = _History(lam, orders, depth=k - 1)
    zero, eff, prev = ring.zero, ring.order, ring.prev
    a, c, noise = _update_arrays(n)
    sde = algorithm_type.startswith("sde")
    for o in (1, 2, 3):
        idx = np.array([i for i in range(n) if eff[i] == o and not zero[i]], dtype=np.int64)
        if idx.size == 0:
            continue
        before = [pts[np.array([prev[i][j] for i in idx])] for j in range(o)]
        if sde:
            u = C.sde_multistep(algorithm_type, solver_type, o, before, pts[idx + 1], eta, s_noise, multistep3)
        else:
            u = C.multistep(algorithm_type, solver_type, o, before, pts[idx + 1], multistep3)
        _store(a, c, noise, idx, u)
    tl = np.asarray(times, dtype=np.float64).tolist()
    evals = [Eval(t=tl[i], t_next=tl[i + 1], source="x", dest="x", write_slot=ring.write_slot(i),
                  read_slots=ring.reads[i], order=eff[i], step=i + 1, noisy=bool(noise[i] != 0.0)) for i in range(n)]
    return Plan(evals, pts[np.arange(n)], C.Update(a, tuple(c.T), noise), ring.n_slots,
                np.asarray(times, dtype=np.float64), eff)


def plan_unipc(points, orders: list[int], correct: list[bool], variant: str = "bh2", predict_x0: bool = True,
               times=None) -> Plan:
    """UniPC as diffusers' UniPCMultistepScheduler steps it, one fused step per model evaluation.

    Evaluation i at points[i] first corrects the previous step's result (UniC, where correct[i]: diffusers' corrector,
    which the caller's warm-up and disable_corrector decide), then predicts points[i + 1] (UniP of orders[i]). The
    corrected sample is never stored: UniC and the previous UniP start from the same sample with the same x
    coefficient, so x_c = x + sum_j d_j m_j with x the previous step's result (`coefficients.unipc_correction`), and
    the step is x_next = A x_c + sum_j c_j m_j = A x + sum_j (A d_j + c_j) m_j: one row, over the new output and the
    ring's (newest first; a corrector of order p reads p stored outputs). Zero-length steps: the identity (`_History`),
    and no corrector over them. A step that ends at sigma = 0 is first order (higher orders have no finite limit).
    `Plan.correction` keeps the d's (diffusers' `last_sample` is x_c).
    """
    pts = stack_points(points)
    n = len(orders)
    if np.shape(pts.lam) != (n + 1,) or len(correct) != n:
        raise ValueError(f"points: expected {n + 1} points and {n} corrector flags, got {np.shape(pts.lam)}, "
                         f"{len(correct)}")
    if variant not in C.UNIPC_VARIANTS:
        raise ValueError(f"solver_type: expected one of {C.UNIPC_VARIANTS}, got {variant!r}")
    sig = pts.sigma.tolist()
    orders = [1 if sig[i + 1] == 0.0 else o for i, o in enumerate(orders)]
    lam = pts.lam.tolist()
    zero_len = [not abs(lam[i + 1] - lam[i]) > C.ZERO_STEP for i in range(n)]
    corr = [bool(correct[i]) and i > 0 and not zero_len[i - 1] for i in range(n)]  # none over a zero-length step
    k = max(orders)
    # a corrector reads the outputs the previous step's predictor combined: as many as its order
    ring = _History(lam, orders, depth=k, extra_reads=lambda i, done: done[i - 1] if corr[i] else 0)
    eff, prev = ring.order, ring.prev
    width = max(1 + len(r) for r in ring.reads)
    a, c, d = np.ones(n), np.zeros((n, width)), np.zeros((n, width))
    for o in sorted(set(eff)):
        idx = np.array([i for i in range(n) if eff[i] == o and not ring.zero[i]], dtype=np.int64)
        if idx.size:
            u = C.unipc_predictor(variant, predict_x0, o, [pts[np.array([prev[i][j] for i in idx])] for j in range(o)],
                                  pts[idx + 1])
            a[idx] = u.a
            for j, cj in enumerate(u.c):
                c[idx, j] = cj
        idx = np.array([i for i in range(n) if corr[i] and eff[i - 1] == o], dtype=np.int64)
        if idx.size:
            u = C.unipc_correction(variant, predict_x0, o,
                                   [pts[np.array([prev[i - 1][j] for i in idx])] for j in range(o)], pts[idx])
            for j, dj in enumerate(u.c):
                d[idx, j] = dj
    c = c + a[:, None] * d
    tl = (np.zeros(n + 1) if times is None else np.asarray(times, dtype=np.float64)).tolist()
    evals = [Eval(t=tl[i], t_next=tl[i + 1], source="x", dest="x", write_slot=ring.write_slot(i),
                  read_slots=ring.reads[i], order=eff[i], step=i + 1, noisy=False, corrected=corr[i])
             for i in range(n)]
    return Plan(evals, pts[np.arange(n)], C.Update(a, tuple(c.T), np.zeros(n)), ring.n_slots, np.asarray(tl), eff,
                kind="unipc", correction=d)


def plan_singlestep(ns, algorithm_type, solver_type, outer, orders, skip_type="time_uniform", u2_form="taylor",
                    inner_times: list[list[float]] | None = None, block_ends=None, block_noise=None) -> Plan:
    """Singlestep blocks outer[i] -> outer[i+1] of orders[i].

    Intermediate times are spaced by `skip_type` inside each block (the authors' rule), or given per block
    in `inner_times` (orders[i] - 1 times each; diffusers' singlestep scheduler uses its own timesteps).
    Ancestral blocks (k-diffusion's dpm_fast with eta > 0): block i solves the ODE from outer[i] to
    block_ends[i] (default outer[i + 1]) and adds block_noise[i] * z, which brings x to outer[i + 1].
    """
    if len(outer) != len(orders) + 1:
        raise ValueError(f"orders: expected {len(outer) - 1} block orders, got {len(orders)}")
    outer = np.asarray(outer, dtype=np.float64)
    block_ends = outer[1:] if block_ends is None else np.asarray(block_ends, dtype=np.float64)
    _check_times(ns, outer, "outer")
    _check_times(ns, block_ends, "block_ends")
    if block_ends.shape != (len(orders),):
        raise ValueError(f"block_ends: expected {len(orders)} block ends, got {block_ends.shape}")
    eval_t, blocks = [], []  # evaluation times; per block (order, first evaluation index)
    for b, o in enumerate(orders):
        s, t = float(outer[b]), float(block_ends[b])
        if inner_times is not None:
            inner_t = np.asarray(inner_times[b], dtype=np.float64)
            if inner_t.shape != (o - 1,):
                raise ValueError(f"inner_times: block {b} of order {o} needs {o - 1} times, got {inner_t.shape}")
            _check_times(ns, inner_t, "inner_times")
        else:
            inner_t = time_steps(ns, skip_type, s, t, o)[1:-1] if o > 1 else np.zeros(0)
        blocks.append((o, len(eval_t)))
        eval_t += [s] + inner_t.tolist()
    nfe = len(eval_t)
    pts = point(ns, np.asarray(eval_t + [float(block_ends[-1])]))
    ends = point(ns, block_ends)
    a, c, noise = _update_arrays(nfe)
    for o in (1, 2, 3):
        bs = [b for b, (ob, _) in enumerate(blocks) if ob == o]
        if not bs:
            continue
        first = np.array([blocks[b][1] for b in bs], dtype=np.int64)
        ups = C.singlestep(algorithm_type, solver_type, o, pts[first], [pts[first + j] for j in range(1, o)],
                           ends[np.array(bs)], u2_form)
        for j, u in enumerate(ups):
            _store(a, c, noise, first + j, u)
    if block_noise is not None:
        noise[[first + o - 1 for o, first in blocks]] = np.broadcast_to(np.asarray(block_noise, np.float64),
                                                                        (len(blocks),))
    evals = []
    for b, (o, first) in enumerate(blocks):
        t_end = float(block_ends[b])
        for j in range(o):
            last = j == o - 1
            evals.append(Eval(t=eval_t[first + j], t_next=t_end if last else eval_t[first + j + 1],
                              source="x" if j == 0 else "u", dest="x" if last else "u",
                              write_slot=None if last else j, read_slots=tuple(range(j - 1, -1, -1)), order=o,
                              step=b + 1, noisy=bool(noise[first + j] != 0.0)))
    return Plan(evals, pts[np.arange(nfe)], C.Update(a, tuple(c.T), noise), 2, outer, list(orders),
                needs_u=max(orders) > 1, kind="singlestep")


TWO_STAGE = ("2s_ancestral", "sde", "dpm2")


def plan_two_stage(sigmas, form: str, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5, *, starts=None,
                   mids=None, ends=None, noise=None) -> Plan:
    """Two-evaluation steps on VE sigmas (alpha = 1), one `Eval` per model call.

    Each interval sigma_i -> sigma_{i+1} > 0 takes two evaluations: the first at x_i (sigma_i) moves to an
    intermediate point u, the second, at u, restarts from x_i (the caller passes x_i as x and u as x_eval):
    - "2s_ancestral" (k-diffusion's DPM-Solver++(2S) ancestral): (down, up) = `coefficients.ancestral`(sigma_i,
      sigma_{i+1}, eta); u is the first-order step to the lambda midpoint of sigma_i and down (r = 1/2 always, as
      k-diffusion), and the second evaluation's output alone takes x_i to down, plus up * z. Where down = 0 (the last
      step, or a large eta) a single evaluation gives its output, plus up * z while sigma_{i+1} > 0.
    - "sde" (DPM-Solver++ SDE, k-diffusion's `sample_dpmpp_sde`; diffusers' DPMSolverSDEScheduler is r = 1/2,
      eta = 1): u is the ancestral first-order step to s = sigma_i^(1-r) sigma_{i+1}^r (noise z1), and the
      second takes x_i ancestrally to sigma_{i+1} with (1 - 1/(2r)) m_i + 1/(2r) m_u (noise z2). A last step to
      sigma = 0 is one evaluation: its output.
    - "dpm2" (DPM2: k-diffusion's `sample_dpm_2` / `sample_dpm_2_ancestral`, diffusers' KDPM2 schedulers): Euler
      steps of dx/dsigma = (x - D) / sigma with a log-sigma midpoint. Interval i starts at starts[i] (default
      sigma_i; sample_dpm_2's churned sigma_hat), ends at ends[i] (default sigma_{i+1}, or with eta > 0 the ancestral
      sigma_down) and evaluates the model a second time at mids[i] (default the log-sigma midpoint of start and
      end): u = x_i + (mid - start) d(x_i) is the first-order step to the midpoint, and the second evaluation takes
      x_i to the end with the midpoint's derivative, x_i + (end - start) / mid (u - D(u)) -- linear in x_i, u and
      D(u), so its update reads x_eval itself as hist1 (`Eval.reads_eval`). Where end = 0 one evaluation: x = D.
      Then noise[i] * z is added (default: sigma_up * s_noise where two evaluations are taken, else 0); a front end
      passes the float values its original computes (diffusers' float32 grids, sample_dpm_2's churn of the next
      interval as noise).
    `Eval.t` is the sigma the model is evaluated at; noise scales include s_noise.
    """
    if form not in TWO_STAGE:
        raise ValueError(f"form: expected one of {TWO_STAGE}, got {form!r}")
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta: must be finite and >= 0, got {eta}")
    if not (0.0 < r <= 1.0):
        raise ValueError(f"r: the intermediate point's lambda fraction must be in (0, 1], got {r}")
    sig = np.asarray(sigmas, dtype=np.float64)
    n = len(sig) - 1
    ps, pt = C.Point.from_ve_sigma(sig[:-1]), C.Point.from_ve_sigma(sig[1:])
    fac = 1.0 / (2.0 * r)
    if form == "dpm2":
        ps, mid, single, first, second, one = _dpm2_intervals(sig, eta, s_noise, starts, mids, ends, noise)
    elif form == "2s_ancestral":
        q, up = C.ancestral(ps, pt, eta)
        single = q.sigma == 0.0
        mid = C.Point.from_ve_sigma(np.exp(-(ps.lam + 0.5 * (q.lam - ps.lam))))
        first = C.multistep("dpmsolver++", "dpmsolver", 1, [ps], mid)
        last = C.multistep("dpmsolver++", "dpmsolver", 1, [ps], q)
        second = C.Update(last.a, (last.c[0], 0.0), up * s_noise)
        # one evaluation: x = m_i (+ up z while sigma_{i+1} > 0)
        one = C.Update(0.0, (1.0, 0.0), np.where(pt.sigma > 0.0, up * s_noise, 0.0))
    else:
        single = pt.sigma == 0.0
        mid = C.Point.from_ve_sigma(np.exp(-(ps.lam + r * (pt.lam - ps.lam))))
        q1, up1 = C.ancestral(ps, mid, eta)
        q2, up2 = C.ancestral(ps, pt, eta)
        u1 = C.multistep("dpmsolver++", "dpmsolver", 1, [ps], q1)
        first = C.Update(u1.a, u1.c, up1 * s_noise)
        base = C.multistep("dpmsolver++", "dpmsolver", 1, [ps], q2)
        second = C.Update(base.a, (fac * base.c[0], (1.0 - fac) * base.c[0]), up2 * s_noise)
        one = C.Update(0.0, (1.0, 0.0), 0.0)
    keep_first = fac != 1.0 and form == "sde"  # the second evaluation also reads m_i
    reads_eval = form == "dpm2"

    def per_interval(u: C.Update, p: C.Point) -> np.ndarray:
        """[n, 7]: a, c0, c1, noise of the update and alpha, sigma, lambda of the evaluation, per interval."""
        c1 = u.c[1] if len(u.c) > 1 else 0.0
        return np.stack(np.broadcast_arrays(u.a, u.c[0], c1, u.noise, p.alpha, p.sigma, p.lam), axis=-1)

    kinds = {"one": per_interval(one, ps), "first": per_interval(first, ps), "second": per_interval(second, mid)}
    seq = [(k, i) for i in range(n) for k in (("one",) if single[i] else ("first", "second"))]
    rows = np.array([kinds[k][i] for k, i in seq]).reshape(len(seq), 7)
    evals = [Eval(t=float(rows[j, 5]), t_next=float(mid.sigma[i] if k == "first" else sig[i + 1]),
                  source="u" if k == "second" else "x", dest="u" if k == "first" else "x",
                  write_slot=0 if keep_first and k == "first" else None,
                  read_slots=(0,) if keep_first and k == "second" else (), order=1 if k == "one" else 2, step=i + 1,
                  noisy=bool(rows[j, 3] != 0.0), reads_eval=reads_eval and k == "second")
             for j, (k, i) in enumerate(seq)]
    update = C.Update(rows[:, 0], (rows[:, 1], rows[:, 2], np.zeros(len(seq))), rows[:, 3])
    return Plan(evals, C.Point(rows[:, 4], rows[:, 5], rows[:, 6]), update, 0 if reads_eval else 1, sig,
                [ev.order for ev in evals if ev.dest == "x"], needs_u=True, kind="singlestep")


@np.errstate(divide="ignore", invalid="ignore")
def _dpm2_intervals(sig, eta, s_noise, starts, mids, ends, noise):
    """plan_two_stage's "dpm2" form: (start points, midpoints, single, first, second, one) per interval."""
    n = len(sig) - 1

    def given(v, name):
        v = np.broadcast_to(np.asarray(v, dtype=np.float64), (n,))
        if not (np.isfinite(v).all() and (v >= 0).all()):
            raise ValueError(f"{name}: DPM2 sigmas must be finite and >= 0")
        return v

    ps = C.Point.from_ve_sigma(sig[:-1] if starts is None else given(starts, "starts"))
    up = 0.0
    if ends is None:
        pe, up = C.ancestral(C.Point.from_ve_sigma(sig[:-1]), C.Point.from_ve_sigma(sig[1:]), eta) if eta else (
            C.Point.from_ve_sigma(sig[1:]), 0.0)
    else:
        pe = C.Point.from_ve_sigma(given(ends, "ends"))
    single = np.broadcast_to(pe.sigma == 0.0, (n,))
    z = np.where(single, 0.0, up * s_noise) if noise is None else np.broadcast_to(
        np.asarray(noise, dtype=np.float64), (n,))
    mid_sigma = np.where(single, ps.sigma, np.sqrt(ps.sigma * pe.sigma)) if mids is None else given(mids, "mids")
    mid = C.Point.from_ve_sigma(mid_sigma)
    first = C.multistep("dpmsolver++", "dpmsolver", 1, [ps], mid)  # Euler in sigma: a = mid / start, c0 = 1 - a
    k = np.where(single, 0.0, (pe.sigma - ps.sigma) / mid.sigma)
    second = C.Update(1.0, (-k, k), z)  # x_i + k (u - D(u)): c0 on D(u), c1 on u (hist1 = x_eval)
    one = C.multistep("dpmsolver++", "dpmsolver", 1, [ps], pe)  # end = 0: x = D
    return ps, mid, single, first, second, C.Update(one.a, one.c, z)


def plan_singlestep_steps(algorithm_type: str, solver_type: str, points, orders: list[int], times=None) -> Plan:
    """Singlestep blocks as diffusers' singlestep scheduler steps them: evaluation i, of order o = orders[i], is the
    o-th of a block that started o - 1 evaluations before. Its update goes from the block start (points[i - o + 1])
    through the block's later evaluation points to points[i + 1], combining the block's outputs (the newest is its
    own; the ring holds the last ones). The caller passes the block start as x and the current sample as x_eval.
    ``sde-dpmsolver++`` is diffusers' singlestep SDE variant (`coefficients.singlestep_sde_diffusers`).
    """
    pts = stack_points(points)
    n = len(orders)
    if np.shape(pts.lam) != (n + 1,):
        raise ValueError(f"points: expected {n + 1} points, got {np.shape(pts.lam)}")
    if any(o > i + 1 for i, o in enumerate(orders)):
        raise ValueError("orders: evaluation i can be at most the (i + 1)-th of its block")
    a, c, noise = _update_arrays(n)

    def update(o, start, inner, end) -> C.Update:
        if algorithm_type == "sde-dpmsolver++":
            return C.singlestep_sde_diffusers(solver_type, o, start, inner, end)[-1]
        return C.singlestep(algorithm_type, solver_type, o, start, inner, end, u2_form="solver_type")[-1]

    for o in (1, 2, 3):
        idx = np.array([i for i in range(n) if orders[i] == o], dtype=np.int64)
        if idx.size == 0:
            continue
        _store(a, c, noise, idx, update(o, pts[idx - o + 1], [pts[idx - o + 1 + j] for j in range(1, o)],
                                        pts[idx + 1]))
    # A block whose evaluation points repeat a time (a zero-length sub-step, e.g. a repeated timestep): of each
    # coincident pair only the newer output enters, at the order of the distinct points, so no divided difference
    # spans h = 0 (the whole block repeating one time is the identity already). The third-order update of the
    # "dpmsolver" (midpoint) form divides only by the newest point's distance from the block start and does not read
    # the middle output: it stays as it is (diffusers' result there is finite, and this is it).
    lam = pts.lam
    midpoint = C.normalize_solver_type(solver_type) == "dpmsolver"
    for i in range(n):
        o, b = orders[i], i - orders[i] + 1
        kept = [j for j in range(o) if j == o - 1 or abs(lam[b + j + 1] - lam[b + j]) > C.ZERO_STEP]
        if len(kept) == o or not abs(lam[i + 1] - lam[b]) > C.ZERO_STEP:
            continue
        if o == 3 and midpoint and abs(lam[i] - lam[b]) > C.ZERO_STEP:
            continue
        u = update(len(kept), pts[b + kept[0]], [pts[b + j] for j in kept[1:]], pts[i + 1])
        a[i], noise[i], c[i] = u.a, u.noise, 0.0
        for pos, j in enumerate(reversed(kept)):  # u.c is newest first; c[i, m] is the output m evaluations back
            c[i, o - 1 - j] = u.c[pos]
    k = max(orders)
    tl = (np.zeros(n + 1) if times is None else np.asarray(times, dtype=np.float64)).tolist()
    evals = [Eval(t=tl[i], t_next=tl[i + 1], source="x", dest="x",
                  write_slot=(i % k) if any(orders[j] > j - i for j in range(i + 1, n)) else None,
                  read_slots=tuple((i - j) % k for j in range(1, orders[i])), order=orders[i], step=i + 1,
                  noisy=bool(noise[i] != 0.0)) for i in range(n)]
    return Plan(evals, pts[np.arange(n)], C.Update(a, tuple(c.T), noise), k, np.asarray(tl), list(orders))


def plan_caller_steps(algorithm_type: str, solver_type: str, now, nxt, back, has_back, eta: float = 1.0) -> Plan:
    """Independent steps whose history the caller holds (diffusers' CogVideoXDPMScheduler is passed the previous
    step's x0 and its time with every call): step i goes from now[i] to nxt[i] with the output at now[i] and, where
    has_back[i], the caller's previous output at back[i] (hist1 of the op) -- second order, or first order where
    back[i] is at now[i]'s lambda (the divided difference would span h = 0). now, nxt, back: `Point`s of arrays [n]
    (or lists of points); multistep updates of `algorithm_type` (SDE: eta, s_noise 1). One `Eval` per step."""
    now, nxt, back = (stack_points(p) for p in (now, nxt, back))
    n = np.shape(now.lam)[0]
    has = np.broadcast_to(np.asarray(has_back, dtype=bool), (n,))
    with np.errstate(invalid="ignore"):
        orders = np.where(has & ~C.is_zero_step(now.lam - back.lam), 2, 1)
    a, c, noise = _update_arrays(n)
    sde = algorithm_type.startswith("sde")
    for o in (1, 2):
        idx = np.flatnonzero(orders == o)
        if idx.size:
            prev = [now[idx], back[idx]][:o]
            u = (C.sde_multistep(algorithm_type, solver_type, o, prev, nxt[idx], eta) if sde
                 else C.multistep(algorithm_type, solver_type, o, prev, nxt[idx]))
            _store(a, c, noise, idx, u)
    evals = [Eval(t=float(i), t_next=float(i + 1), source="x", dest="x", write_slot=None, read_slots=(),
                  order=int(orders[i]), step=i + 1, noisy=bool(noise[i] != 0.0)) for i in range(n)]
    return Plan(evals, now, C.Update(a, tuple(c.T), noise), 0, np.arange(n + 1, dtype=np.float64),
                orders.tolist())
