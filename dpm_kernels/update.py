"""`multistep_update`: one fused multistep step for custom sampling loops.

    hist = dk.History(x, order=3)
    for i in range(steps):
        eps = unet(x, ts[i])
        x = dk.multistep_update(x, eps, hist, t=ts[i], t_next=ts[i + 1], noise_schedule=ns, order=3, out=x)

The history is a ring buffer [order, *x.shape] owned by the caller: each call writes the converted model
output into its next slot (no copies, no list shifting) and remembers the output's time. Coefficients are
computed in float64 on the host, per sample when t is a [B] tensor.
"""

from __future__ import annotations

import numpy as np
import torch

from . import coefficients as C
from . import layout as L
from .ops import default_history_dtype, fused_step
from .schedule import NoiseScheduleVP


class History:
    """The last `order` converted model outputs of a multistep solver and their times.

    Args:
        like: a [B, ...] tensor giving shape, dtype and device.
        order: ring size = the highest solver order it will serve (1..3).
        dtype: storage dtype; default float32 for float16/bfloat16 samples (more accurate), else like's.
    Attributes:
        buffer: [order, B, ...] storage; `count`: outputs pushed so far; `last_order`: the order of the most
        recent update.
    """

    def __init__(self, like: torch.Tensor, order: int = 3, dtype: torch.dtype | None = None):
        if order not in (1, 2, 3):
            raise ValueError(f"order: expected 1, 2 or 3, got {order!r}")
        if not isinstance(like, torch.Tensor) or not like.is_floating_point():
            raise TypeError("like: expected a floating-point tensor [B, ...]")
        self.order = order
        self.x_dtype = like.dtype
        dtype = default_history_dtype(like.dtype) if dtype is None else dtype
        self.buffer = torch.empty((order,) + tuple(like.shape), dtype=dtype, device=like.device)
        self.reset()

    def reset(self) -> None:
        """Forget every stored output (start a new trajectory)."""
        self.count = 0
        self.last_order = 0
        self._points: list[list[C.Point] | None] = [None] * self.order

    def slot(self, k: int) -> int:
        """Ring index of the k-th most recent output (k = 0: newest)."""
        return (self.count - 1 - k) % self.order

    def points(self, k: int) -> list[C.Point]:
        return self._points[self.slot(k)]

    def _advance(self, pts: list[C.Point]) -> int:
        idx = self.count % self.order
        self._points[idx] = pts
        self.count += 1
        return idx


def _points(ns: NoiseScheduleVP, t, b: int, name: str) -> list[C.Point]:
    """Per-sample points for a float or a [B] tensor of times (a scalar gives one shared point)."""
    if isinstance(t, torch.Tensor):
        tv = t.detach().double().cpu().reshape(-1).numpy()
        if tv.size not in (1, b):
            raise ValueError(f"{name}: expected a scalar or [{b}] times, got {tuple(t.shape)}")
    else:
        tv = np.asarray([float(t)])
    if not np.all(np.isfinite(tv)):
        raise ValueError(f"{name}: times must be finite")
    la = ns.log_alpha64(tv)
    return [C.Point.from_log_alpha(float(v)) for v in np.atleast_1d(la)]


def multistep_update(
    x: torch.Tensor,
    model_output: torch.Tensor,
    history: History,
    *,
    t,
    t_next,
    noise_schedule: NoiseScheduleVP,
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
        history: the `History` of this trajectory (updated in place).
        t, t_next: continuous times (floats, or [B] tensors for per-sample times), t_next towards the data.
        noise_schedule: the `NoiseScheduleVP` the times refer to.
        order: 1..3; lower while the history warms up (the first call is first order).
        algorithm_type: "dpmsolver++" | "dpmsolver" | "sde-dpmsolver++" | "sde-dpmsolver".
        solver_type: "dpmsolver" (midpoint) | "taylor" (heun).
        model_type: "noise" | "x_start" | "v" | "score".
        guidance_scale: classifier-free guidance scale (cfg != "none").
        thresholding: (ratio, lo, hi): s = clamp(quantile(|x0|, ratio), lo, hi) per sample; x0 is
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
    if history.buffer.shape[1:] != x.shape or history.x_dtype != x.dtype or history.buffer.device != x.device:
        raise ValueError(f"history: built for {tuple(history.buffer.shape[1:])} {history.x_dtype} on "
                         f"{history.buffer.device}, got x {tuple(x.shape)} {x.dtype} on {x.device}")
    if order not in (1, 2, 3) or order > history.order:
        raise ValueError(f"order: expected 1..{history.order} (the history's size), got {order!r}")
    plus = C.is_data_prediction(algorithm_type)
    sde = algorithm_type.startswith("sde")
    b = x.shape[0]
    ps = _points(noise_schedule, t, b, "t")
    pt = _points(noise_schedule, t_next, b, "t_next")
    eff = min(order, history.count + 1)
    prev_pts = [ps] + [history.points(k) for k in range(eff - 1)]
    n_rows = max(len(ps), len(pt), *(len(p) for p in prev_pts))
    target = "x0" if plus else "eps"
    rows = np.zeros((n_rows, L.NCOEF), dtype=np.float64)
    for i in range(n_rows):
        pick = [p[i] if len(p) > 1 else p[0] for p in prev_pts]
        p_next = pt[i] if len(pt) > 1 else pt[0]
        if sde:
            upd = C.sde_multistep(algorithm_type, solver_type, eff, pick, p_next, eta, s_noise, multistep3)
        else:
            upd = C.multistep(algorithm_type, solver_type, eff, pick, p_next, multistep3)
        p0 = pick[0]
        rows[i, L.GUIDE] = guidance_scale
        if thresholding is not None:
            rows[i, L.PX], rows[i, L.PM] = C.conversion(model_type, "x0", p0.alpha, p0.sigma)
            rows[i, L.QX], rows[i, L.QM] = C.conversion("x_start", target, p0.alpha, p0.sigma)
        else:
            rows[i, L.PX], rows[i, L.PM] = C.conversion(model_type, target, p0.alpha, p0.sigma)
            rows[i, L.QM] = 1.0
        rows[i, L.A] = upd.a
        rows[i, L.C0:L.C0 + len(upd.c)] = upd.c
        rows[i, L.CN] = upd.noise
    if not np.all(np.isfinite(rows)):
        raise ValueError("t_next: the step has non-finite coefficients (check t and t_next)")
    if sde and np.any(rows[:, L.CN] != 0) and noise is None:
        raise ValueError("noise: SDE algorithms need standard normal noise of x's shape")
    coef = torch.from_numpy(rows[0] if n_rows == 1 else rows)
    coef = coef.pin_memory().to(x.device, non_blocking=True) if x.device.type == "cuda" else coef.to(x.device)
    write = history.count % history.order
    hist = [history.buffer[history.slot(k)] for k in range(eff - 1)]
    res = fused_step(x, model_output, coef, out=out, hist_out=history.buffer[write], hist=hist, model_cond=model_cond,
                     noise=noise if sde else None, cfg=cfg, threshold=thresholding, backend=backend)
    history._advance(ps)
    history.last_order = eff
    return res
