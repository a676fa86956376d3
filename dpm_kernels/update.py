"""`multistep_update`: one fused multistep step for custom sampling loops.

    hist = dk.History(x, order=3)
    for i in range(steps):
        eps = unet(x, ts[i])
        x = dk.multistep_update(x, eps, hist, t=ts[i], t_next=ts[i + 1], noise_schedule=ns, order=3, out=x)

The history is a ring buffer [order, *x.shape] owned by the caller: each call writes the converted model
output into a free slot (no copies, no list shifting) and remembers the output's time. The coefficient row comes
from the planner (`planner.coefficient_rows`), vectorized over samples when t is a [B] tensor. Rows of float
times are kept per (schedule, times, options, device) in a small cache: a loop that runs the same time grid again
(the next image, after `hist.reset()`) finds its rows there and does no float64 math and no upload per step.

A History belongs to one trajectory: a step that does not start at the previous t_next, or turns back, raises
(outputs of another trajectory would silently enter the update). Times outside the schedule's [0, T] raise
(`NoiseSchedule.check_times`). t_next > t runs the ODE towards noise (inversion: DDIM-style encoding of data
into noise); SDE algorithms refuse it.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from . import coefficients as C
from . import planner as P
from .ops import bind, default_history_dtype
from .schedule import NoiseSchedule
from .step_autograd import any_requires_grad

_steps = P.Cache(4096)  # (schedule, times, options, device) -> what a step with float times needs
_OP_NAME = re.compile(r"\bmodel_out\b")  # the op's name for what this module calls model_output
_CONTINUITY_RTOL = 1e-6  # a step starts where the last ended up to this (float32 copies of a float64 grid)


class History:
    """The last `order` converted model outputs of a multistep solver and their times.

    Args:
        like: a [B, ...] tensor giving shape, dtype and device.
        order: ring size = the highest solver order it will serve (1..3).
        dtype: storage dtype; default float32 for float16/bfloat16 samples (more accurate), else like's.
    Attributes:
        buffer: [order, B, ...] storage; `count`: outputs stored so far; `last_order`: the order of the most
        recent update. Only outputs of distinct times are stored: a zero-length step (t_next == t) stores nothing.

    A History serves one trajectory: each step must start where the previous one ended (its t is the previous
    t_next, per sample) and keep its direction (towards the data, or towards noise for an ODE inversion); a step
    that does not raises. Call `reset()` before the next trajectory (the next image), or make a new History.

    Under autograd (a step with grad mode on and an input requiring grad) each stored output is also kept as the
    tensor autograd tracks, and later steps read that one: gradients flow through the history to earlier steps.
    The buffer holds the same values either way.
    """

    def __init__(self, like: torch.Tensor, order: int = 3, dtype: torch.dtype | None = None):
        if not isinstance(order, int) or order not in (1, 2, 3):
            raise ValueError(f"order: expected 1, 2 or 3, got {order!r}")
        if not isinstance(like, torch.Tensor) or not like.is_floating_point():
            raise TypeError("like: expected a floating-point tensor [B, ...]")
        self.order = order
        self.x_dtype = like.dtype
        dtype = default_history_dtype(like.dtype) if dtype is None else dtype
        self.buffer = torch.empty((order,) + tuple(like.shape), dtype=dtype, device=like.device)
        self._slots = self.buffer.unbind(0)
        self.reset()

    def reset(self) -> None:
        """Forget every stored output (start a new trajectory)."""
        self.count = 0
        self.last_order = 0
        # (slot, point(s), cache key of the time, the output as autograd tracks it or None), newest first
        self._entries: list[tuple[int, C.Point, object, torch.Tensor | None]] = []
        self._tracked = False  # some step stored a tracked output: later steps with grad mode on go through autograd
        self._t_end = None  # the previous step's t_next (a float or [B] times): where the next step must start
        self._way = 0  # the trajectory's direction in t (per sample: an array): -1 towards the data, +1 towards noise

    def slot(self, k: int) -> int:
        """Ring index of the k-th most recent output (k = 0: newest)."""
        return self._entries[k][0]

    def points(self, k: int) -> C.Point:
        """The point(s) (one, or [B] arrays) of the k-th most recent output."""
        return self._entries[k][1]

    def _free_slot(self) -> int:
        taken = {e[0] for e in self._entries[:self.order - 1]}
        return next(s for s in range(self.order) if s not in taken)

    def _push(self, slot: int, pt: C.Point, key, tracked: torch.Tensor | None = None) -> None:
        self._entries = [(slot, pt, key, tracked)] + self._entries[:self.order - 1]
        self.count += 1
        if tracked is not None:
            self._tracked = True

    def _check_continues(self, t, t_next) -> None:
        """Refuse a step that does not continue this trajectory (see the class doc), before anything is written:
        the stored outputs of another trajectory would enter this update and give a silently wrong x."""
        end = self._t_end
        if end is None:
            return
        if type(t) is float and type(t_next) is float and type(end) is float and type(self._way) is int:
            gap, first, got = abs(t - end) > _CONTINUITY_RTOL * abs(end), None, t  # the per-step case: no numpy
            way = (t_next > t) - (t_next < t)
            turn = way != 0 and self._way != 0 and way != self._way
        else:
            ta, ea, na = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (t, end, t_next)))
            gaps = (np.abs(ta - ea) > _CONTINUITY_RTOL * np.abs(ea)).reshape(-1)
            first = int(np.argmax(gaps))
            gap, got, end = bool(gaps[first]), float(ta.flat[first]), float(ea.flat[first])
            way = np.sign(na - ta)
            turn = bool(np.any((way != 0) & (self._way != 0) & (way != self._way)))
        if gap:
            which = "" if first is None or ta.ndim == 0 else f" (sample {first})"
            raise ValueError(f"t: {got}{which} does not continue this history's trajectory, whose last step ended at "
                             f"t_next = {end}; call history.reset() to start a new trajectory")
        if turn:
            was = "towards the data" if np.any(np.asarray(self._way) < 0) else "towards noise (an inversion)"
            raise ValueError(f"t_next: this step (t = {t} -> t_next = {t_next}) turns back on a trajectory that ran "
                             f"{was}; call history.reset() to start a new trajectory")

    def _advance(self, t, t_next) -> None:
        """Record a step taken: the next one starts at t_next, in the same direction."""
        if type(t) is float and type(t_next) is float and type(self._way) is int:
            self._way = ((t_next > t) - (t_next < t)) or self._way
        else:
            way = np.sign(np.asarray(t_next, dtype=np.float64) - np.asarray(t, dtype=np.float64))
            self._way = np.where(way != 0, way, self._way)
        self._t_end = t_next


def _time_key(t, b: int, name: str):
    """A float time, or a [B] float64 numpy array of per-sample times (validated)."""
    if isinstance(t, torch.Tensor):
        if t.numel() not in (1, b):
            raise ValueError(f"{name}: expected a scalar or [{b}] times, got shape {tuple(t.shape)}")
        tv = t.detach().double().cpu().reshape(-1).numpy()
        if not np.all(np.isfinite(tv)):
            raise ValueError(f"{name}: times must be finite")
        return float(tv[0]) if tv.size == 1 else tv
    if type(t) is not float and (isinstance(t, (bool, str)) or not isinstance(t, (int, float, np.floating,
                                                                                      np.integer))):
        raise TypeError(f"{name}: expected a float or a [B] tensor of times, got {type(t).__name__}")
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"{name}: times must be finite, got {t}")
    return t


def _distinct_orders(order: int, chain: list[C.Point]):
    """Per sample, the highest order <= `order` whose points (current first, then the stored ones) are pairwise
    apart: a divided difference never spans a zero-length step."""
    eff = np.ones(np.broadcast_shapes(*(np.shape(p.lam) for p in chain)), dtype=np.int64) if order > 1 else 1
    ok = True
    for j in range(1, order):
        ok = ok & ~C.is_zero_step(chain[j].lam - chain[j - 1].lam)
        eff = eff + ok
    return eff


def _update(algorithm_type, solver_type, order, chain, pt, eta, s_noise, multistep3) -> C.Update:
    if algorithm_type.startswith("sde"):
        return C.sde_multistep(algorithm_type, solver_type, order, chain[:order], pt, eta, s_noise, multistep3)
    return C.multistep(algorithm_type, solver_type, order, chain[:order], pt, multistep3)


def _row(ps, pt, chain, eff, algorithm_type, solver_type, model_type, guidance_scale, thresholding, eta,
         s_noise, multistep3) -> np.ndarray:
    orders = _distinct_orders(eff, chain)
    if np.ndim(orders) == 0:
        upd = _update(algorithm_type, solver_type, int(orders), chain, pt, eta, s_noise, multistep3)
    else:  # per sample: each order present, then each sample's own
        ups = {o: _update(algorithm_type, solver_type, o, chain, pt, eta, s_noise, multistep3)
               for o in sorted(set(orders.tolist()))}
        pick = lambda get: np.select([orders == o for o in ups], [get(u) for u in ups.values()])  # noqa: E731
        upd = C.Update(pick(lambda u: u.a), tuple(pick(lambda u, j=j: u.c[j] if j < len(u.c) else 0.0)
                                                  for j in range(eff)), pick(lambda u: u.noise))
    conv = P.Conversion.for_algorithm(model_type, algorithm_type, thresholding, guidance_scale)
    return P.coefficient_rows(ps, conv, upd, what="t_next")


def multistep_update(
    x: torch.Tensor,
    model_output: torch.Tensor,
    history: History,
    *,
    t,
    t_next,
    noise_schedule: NoiseSchedule,
    order: int = 2,
    algorithm_type: str = "dpmsolver++",
    solver_type: str = "dpmsolver",
    model_type: str = "noise",
    guidance_scale: float = 1.0,
    model_cond: torch.Tensor | None = None,
    cfg: str = "none",
    thresholding: tuple[float, float, float] | None = None,
    noise: torch.Tensor | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    multistep3: str = "standard",
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One multistep DPM-Solver(++) step from time t to t_next, fused into one pass.

    Args:
        x: [B, ...] sample at time t.
        model_output: [B, ...] raw network output at (x, t) of type `model_type`; with cfg="stacked",
            [2B, ...] = cat([uncond, cond]); with cfg="pair", the unconditional half (cond in model_cond).
            A floating output of another dtype is cast to x's.
        history: the `History` of this trajectory (updated in place); t must be the previous step's t_next
            (call `history.reset()` before a new trajectory).
        t, t_next: continuous times in [0, T] of the schedule (floats, or [B] tensors for per-sample times;
            reading those is a host sync on a GPU). t_next < t steps towards the data; t_next > t is an inversion
            step towards noise (ODE algorithms only: an SDE step cannot be inverted), and a trajectory keeps its
            direction. t_next == t is a zero-length step: x is returned unchanged.
        noise_schedule: the `NoiseScheduleVP` (or `NoiseScheduleFlow`) the times refer to.
        order: 1..3; lower while the history warms up (the first call is first order).
        algorithm_type: "dpmsolver++" | "dpmsolver" | "sde-dpmsolver++" | "sde-dpmsolver".
        solver_type: "dpmsolver" (midpoint) | "taylor" (heun).
        model_type: "noise" | "x_start" | "v" | "score" | "flow" (velocity, with a NoiseScheduleFlow).
        guidance_scale: classifier-free guidance scale (cfg != "none").
        thresholding: None or (ratio, lo, hi): s = clamp(quantile(|x0|, ratio), lo, hi) per sample; x0 is
            clamped to [-s, s] and divided by s (authors: (0.995, max_val, inf); diffusers: (0.995, 1, max)).
        noise: [B, ...] standard normal noise (SDE algorithms).
        eta, s_noise: SDE noise scale and multiplier.
        multistep3: "standard" | "third_order" (see `coefficients.multistep`).
        out: destination [B, ...]; may be x itself. Allocated when None.
    Returns:
        x at t_next.
    """
    if not isinstance(history, History):
        raise TypeError(f"history: expected a dpm_kernels.History, got {type(history).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x: expected a floating-point tensor")
    if not isinstance(noise_schedule, NoiseSchedule):
        raise TypeError(f"noise_schedule: expected a dpm_kernels.NoiseScheduleVP or NoiseScheduleFlow, got "
                        f"{type(noise_schedule).__name__}")
    if history.buffer.shape[1:] != x.shape or history.x_dtype != x.dtype or history.buffer.device != x.device:
        raise ValueError(f"history: built for {tuple(history.buffer.shape[1:])} {history.x_dtype} on "
                         f"{history.buffer.device}, got x {tuple(x.shape)} {x.dtype} on {x.device}")
    if not isinstance(order, int) or order not in (1, 2, 3) or order > history.order:
        raise ValueError(f"order: expected 1..{history.order} (the history's size), got {order!r}")
    if not isinstance(model_output, torch.Tensor) or not model_output.is_floating_point():
        what = f"a {model_output.dtype} tensor" if isinstance(model_output, torch.Tensor) else \
            type(model_output).__name__
        raise TypeError(f"model_output: expected a floating-point tensor, got {what}")
    if model_output.dtype != x.dtype:
        model_output = model_output.to(x.dtype)
    sde = algorithm_type.startswith("sde")
    b = x.shape[0]
    ts, tn = _time_key(t, b, "t"), _time_key(t_next, b, "t_next")
    noise_schedule.check_times(ts, "t")
    noise_schedule.check_times(tn, "t_next")
    history._check_continues(ts, tn)
    entries = history._entries
    k = min(order, len(entries) + 1)  # the order before a zero-length step or repeated times lower it
    thr = thresholding is not None

    def plan():
        ps, pt = P.point(noise_schedule, ts), P.point(noise_schedule, tn)
        zero = bool(np.all(C.is_zero_step(pt.lam - ps.lam)))
        eff = 1 if zero else k
        rows = _row(ps, pt, [ps] + [e[1] for e in entries[:eff - 1]], eff, algorithm_type, solver_type,
                    model_type, guidance_scale, thr, eta, s_noise, multistep3)
        if rows.ndim == 2 and rows.shape[0] != b:
            rows = np.broadcast_to(rows, (b, rows.shape[1]))
        return P.DeviceTable(rows, x.device).device_rows, zero, eff, ps

    keys = (ts, tn) + tuple(e[2] for e in entries[:k - 1])
    if all(isinstance(v, float) for v in keys):
        coef, all_zero, eff, ps = _steps.get((noise_schedule, keys, k, algorithm_type, solver_type, model_type,
                                              float(guidance_scale), thr, float(eta), float(s_noise), multistep3,
                                              x.device), plan)
    else:
        coef, all_zero, eff, ps = plan()
    used = entries[:eff - 1]
    noisy = sde and not all_zero and (eta != 0 and s_noise != 0)
    if noisy and noise is None:
        raise ValueError("noise: SDE algorithms need standard normal noise of x's shape")
    write = None if all_zero else history._free_slot()
    slots = history._slots
    step = bind(backend, x.device, cfg, thresholding, threshold_name="thresholding")
    z = noise if noisy else None
    m = None
    try:
        if torch.is_grad_enabled() and (history._tracked or any_requires_grad(x, model_output, model_cond, z)):
            # autograd: the stored outputs are read as the tensors it tracks, the new one is kept beside its slot
            h = [slots[e[0]] if e[3] is None else e[3] for e in used] + [None, None]
            out, m = step.tracked_into(x, model_output, coef, out, None, h[0], h[1], None, z, model_cond,
                                       m_dtype=history.buffer.dtype)
            if write is not None:
                with torch.no_grad():
                    slots[write].copy_(m)
        else:
            h = [slots[e[0]] for e in used] + [None, None]
            if out is None:
                out = torch.empty_like(x, memory_format=torch.contiguous_format)
            step.mutating(x, model_output, coef, out, None if write is None else slots[write], h[0], h[1], None, z,
                          model_cond)
    except (ValueError, TypeError) as e:  # the op's rules, said with this function's argument names
        raise (TypeError if isinstance(e, TypeError) else ValueError)(_OP_NAME.sub("model_output", str(e))) from None
    if write is not None:
        history._push(write, ps, ts if isinstance(ts, float) else None, m)
    history._advance(ts, tn)
    history.last_order = eff
    return out
