"""Noise schedules: alpha_t, sigma_t, lambda_t and the inverse of lambda (docs/math.md, "Notation").

`NoiseScheduleVP` keeps the names, arguments and semantics of the authors' `dpm_solver_pytorch.py` so that
code written for it runs unchanged; `NoiseScheduleFlow` is the flow-matching path x_t = (1 - t) x0 + t eps.
Both are `NoiseSchedule`s: everything is computed in float64 internally; the public methods return tensors in
the dtype of their input (float32 for Python floats), like the authors' code. The planner uses the float64
helpers (`point64`, `lambda64`, `inverse_lambda64`) directly.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .coefficients import Point

_SCHEDULES = ("discrete", "linear", "cosine")
FLOW_SCHEDULES = ("flow", "continuous", "discrete_flow")


def _log_sigma_from_log_alpha(log_alpha: np.ndarray) -> np.ndarray:
    # sigma^2 = 1 - alpha^2 = -expm1(2 log_alpha): exact near t = 0 where alpha -> 1.
    return 0.5 * np.log(-np.expm1(2.0 * log_alpha))


def _interp_extrapolate(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Piecewise-linear interpolation, extended linearly past both ends (the authors' `interpolate_fn`).

    `xp` must be increasing.
    """
    idx = np.clip(np.searchsorted(xp, x, side="right") - 1, 0, len(xp) - 2)
    x0, x1 = xp[idx], xp[idx + 1]
    y0, y1 = fp[idx], fp[idx + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class NoiseSchedule:
    """A Gaussian path x_t = alpha_t x0 + sigma_t eps, t in (0, T]: what the solvers need of a schedule.

    Subclasses give `log_alpha64`, `alpha_sigma64`, `lambda64`, `inverse_lambda64` and `point64` (float64, numpy)
    and the attributes `schedule` (a name), `T` and `total_N` (the default end time is 1 / total_N); the authors'
    tensor API below is built on them.
    """

    schedule: str
    T: float
    total_N: int

    def log_alpha64(self, t):
        raise NotImplementedError

    def alpha_sigma64(self, t):
        raise NotImplementedError

    def lambda64(self, t):
        raise NotImplementedError

    def inverse_lambda64(self, lamb):
        raise NotImplementedError

    def point64(self, t) -> Point:
        """The solver's point(s) (alpha, sigma, lambda) at time(s) t."""
        raise NotImplementedError

    def check_times(self, t, name: str = "t") -> None:
        """Refuse times outside this schedule: a ValueError naming the caller's argument `name` unless every time
        lies in [0, T] (0: clean data; T: the schedule's noisiest time). The one range rule of every front end that
        takes times. A time that rounds to T in float32 counts as T: a float32 tensor holding T = 0.97 holds
        0.97000003.

        t: a float, or an array / tensor of times.
        """
        if type(t) is float:  # the per-step case of a custom loop: no numpy
            if 0.0 <= t <= self.T or (t > self.T and float(np.float32(t)) == float(np.float32(self.T))):
                return
            bad = t
        else:
            v = np.asarray(t.detach().cpu().double() if isinstance(t, torch.Tensor) else t, dtype=np.float64)
            with np.errstate(over="ignore", invalid="ignore"):  # huge times become inf in float32: still refused
                ok = (v >= 0.0) & ((v <= self.T) | (v.astype(np.float32) == np.float32(self.T)))
            if bool(np.all(ok)):
                return
            bad = float(v[~ok].flat[0])
        raise ValueError(f"{name}: times must lie in [0, T = {self.T}] of {self!r} (0: clean data, T: its "
                         f"noisiest time), got {bad}")

    # ----- the authors' tensor API -----
    def _wrap(self, fn, t):
        tt = torch.as_tensor(t)
        out_dtype = tt.dtype if tt.is_floating_point() else torch.get_default_dtype()
        val = fn(tt.detach().cpu().double().numpy())
        return torch.as_tensor(np.asarray(val), dtype=torch.float64).to(device=tt.device, dtype=out_dtype)

    def marginal_log_mean_coeff(self, t):
        """log(alpha_t) for a time tensor t (same shape and dtype)."""
        return self._wrap(self.log_alpha64, t)

    def marginal_alpha(self, t):
        """alpha_t."""
        return self._wrap(lambda v: self.alpha_sigma64(v)[0], t)

    def marginal_std(self, t):
        """sigma_t."""
        return self._wrap(lambda v: self.alpha_sigma64(v)[1], t)

    def marginal_lambda(self, t):
        """lambda_t = log(alpha_t) - log(sigma_t), the half log-SNR."""
        return self._wrap(self.lambda64, t)

    def inverse_lambda(self, lamb):
        """The time t whose half log-SNR is lamb."""
        return self._wrap(self.inverse_lambda64, lamb)


class NoiseScheduleVP(NoiseSchedule):
    """The forward process q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) of a VP diffusion model.

    Args:
        schedule: ``"discrete"`` (a model trained on N discrete steps; give ``betas`` or ``alphas_cumprod``),
            ``"linear"`` (continuous VPSDE, ``beta(t) = beta_0 + t (beta_1 - beta_0)``) or ``"cosine"``
            (continuous, s = 0.008, T = 0.9946).
        betas: [N] betas of a discrete model.
        alphas_cumprod: [N] cumulative products of alphas (DDPM's alpha-bar); used when ``betas`` is None.
        continuous_beta_0, continuous_beta_1: the linear schedule's endpoints.
        dtype: dtype of the stored discrete arrays (kept for compatibility; the math is float64).
        clipped_lambda: discrete schedules lose the tail where lambda < clipped_lambda (the authors' -5.1); None
            keeps every step (the authors' older code, used by ldm / Stable Diffusion 2's sampler).

    Discrete models: step n (0-based) sits at continuous time t_n = (n + 1) / N, so T = 1 and the smallest
    time is 1 / N; log(alpha_t) is piecewise linear in t between those points. As in the authors' code the
    tail where lambda < -5.1 is clipped off (it matters only for cosine-like discrete schedules), and
    ``total_N`` is the length after clipping.
    """

    def __init__(
        self,
        schedule: str = "discrete",
        betas: torch.Tensor | None = None,
        alphas_cumprod: torch.Tensor | None = None,
        continuous_beta_0: float = 0.1,
        continuous_beta_1: float = 20.0,
        dtype: torch.dtype = torch.float32,
        *,
        clipped_lambda: float | None = -5.1,
    ) -> None:
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule: unsupported noise schedule {schedule!r}; expected one of {_SCHEDULES}")
        self.schedule = schedule
        self.dtype = dtype
        if schedule == "discrete":
            if betas is not None:
                b = np.asarray(torch.as_tensor(betas).detach().cpu().double().numpy(), dtype=np.float64)
                _check_array("betas", b)
                if np.any(b <= 0) or np.any(b >= 1):
                    raise ValueError("betas: every beta must lie in (0, 1)")
                log_alphas = 0.5 * np.cumsum(np.log1p(-b))
            elif alphas_cumprod is not None:
                ac = np.asarray(torch.as_tensor(alphas_cumprod).detach().cpu().double().numpy(), dtype=np.float64)
                _check_array("alphas_cumprod", ac)
                if np.any(ac <= 0) or np.any(ac >= 1):
                    raise ValueError("alphas_cumprod: every value must lie in (0, 1)")
                log_alphas = 0.5 * np.log(ac)
            else:
                raise ValueError("betas: a 'discrete' schedule needs `betas` or `alphas_cumprod`")
            if np.any(np.diff(log_alphas) >= 0):
                raise ValueError("betas/alphas_cumprod: alphas_cumprod must be strictly decreasing")
            if clipped_lambda is not None:
                log_alphas = self._clip_log_alphas(log_alphas, float(clipped_lambda))
            self.T = 1.0
            self.total_N = int(log_alphas.shape[0])
            if self.total_N < 2:
                raise ValueError("betas: a discrete schedule needs at least 2 steps")
            self._log_alpha_np = log_alphas
            self._t_np = np.linspace(0.0, 1.0, self.total_N + 1)[1:]
            # The authors' attribute names, as [1, N] tensors in `dtype`.
            self.log_alpha_array = torch.from_numpy(log_alphas).reshape(1, -1).to(dtype)
            self.t_array = torch.from_numpy(self._t_np).reshape(1, -1).to(dtype)
        else:
            self.total_N = 1000
            self.beta_0 = float(continuous_beta_0)
            self.beta_1 = float(continuous_beta_1)
            if schedule == "linear" and not (0 <= self.beta_0 < self.beta_1):
                raise ValueError("continuous_beta_0: need 0 <= continuous_beta_0 < continuous_beta_1")
            self.cosine_s = 0.008
            self.cosine_beta_max = 999.0
            self.cosine_log_alpha_0 = math.log(math.cos(self.cosine_s / (1.0 + self.cosine_s) * math.pi / 2.0))
            # T = 1 is singular for the cosine schedule; the authors use 0.9946.
            self.T = 0.9946 if schedule == "cosine" else 1.0

    @staticmethod
    def _clip_log_alphas(log_alphas: np.ndarray, clipped_lambda: float = -5.1) -> np.ndarray:
        lambdas = log_alphas - _log_sigma_from_log_alpha(log_alphas)
        idx = int(np.searchsorted(lambdas[::-1], clipped_lambda))
        return log_alphas[:-idx] if idx > 0 else log_alphas

    # ----- float64 core (numpy in, numpy out) -----
    def log_alpha64(self, t: np.ndarray | float) -> np.ndarray:
        """log(alpha_t) in float64."""
        t = np.asarray(t, dtype=np.float64)
        if self.schedule == "discrete":
            return _interp_extrapolate(t, self._t_np, self._log_alpha_np)
        if self.schedule == "linear":
            return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0
        s = self.cosine_s
        return np.log(np.cos((t + s) / (1.0 + s) * math.pi / 2.0)) - self.cosine_log_alpha_0

    def lambda64(self, t: np.ndarray | float) -> np.ndarray:
        """lambda_t = log(alpha_t) - log(sigma_t) in float64."""
        la = self.log_alpha64(t)
        return la - _log_sigma_from_log_alpha(la)

    def inverse_lambda64(self, lamb: np.ndarray | float) -> np.ndarray:
        """The time t with lambda_t = lamb, in float64."""
        lamb = np.asarray(lamb, dtype=np.float64)
        # log(alpha) = -0.5 * log(1 + exp(-2 lambda)), stable for both signs of lambda.
        log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * lamb)
        if self.schedule == "linear":
            tmp = 2.0 * (self.beta_1 - self.beta_0) * np.logaddexp(-2.0 * lamb, 0.0)
            delta = self.beta_0**2 + tmp
            return tmp / (np.sqrt(delta) + self.beta_0) / (self.beta_1 - self.beta_0)
        if self.schedule == "cosine":
            s = self.cosine_s
            return np.arccos(np.exp(log_alpha + self.cosine_log_alpha_0)) * 2.0 * (1.0 + s) / math.pi - s
        return _interp_extrapolate(log_alpha, self._log_alpha_np[::-1], self._t_np[::-1])

    def alpha_sigma64(self, t):
        """(alpha_t, sigma_t) in float64; sigma_t = sqrt(1 - alpha_t^2) without cancellation."""
        la = self.log_alpha64(t)
        return np.exp(la), np.exp(_log_sigma_from_log_alpha(la))

    def point64(self, t) -> Point:
        return Point.from_log_alpha(self.log_alpha64(t))

    def __repr__(self) -> str:
        return f"NoiseScheduleVP(schedule={self.schedule!r}, T={self.T}, total_N={self.total_N})"


class NoiseScheduleFlow(NoiseSchedule):
    """Flow matching (rectified flow): x_t = (1 - t) x0 + t eps for t in [0, 1]; alpha_t = 1 - t, sigma_t = t.

    The network predicts the velocity v = dx_t/dt = eps - x0 (`model_wrapper(..., model_type="flow")`), so
    x0 = x_t - t v and eps = x_t + (1 - t) v. T = 1 is pure noise (alpha = 0, lambda = -inf): data-prediction
    solvers (DPM-Solver++) start there exactly; noise-prediction solvers need t_start < 1. t = 0 is clean data
    (lambda = +inf): a grid may end there (``skip_type="time_uniform_flow"``), with a first-order last step.

    Args:
        schedule: how the network reads time: "flow" (or "continuous") gives it t itself; "discrete_flow" (SANA's
            models, trained on N = 1000 discrete steps) gives it t * N.
        t_max: T, the largest time.

    The default end time is 1 / total_N = 1e-3. Shifted flows (SD3's and SANA's flow_shift) are time grids on this
    path: ``sample(..., skip_type="time_uniform_flow", flow_shift=s)``, or times passed to the planner
    (planner.plan_multistep), or the diffusers drop-ins, which read them from the scheduler's config.
    """

    def __init__(self, schedule: str = "flow", t_max: float = 1.0) -> None:
        if schedule not in FLOW_SCHEDULES:
            raise ValueError(f"schedule: expected one of {FLOW_SCHEDULES}, got {schedule!r}")
        if not 0.0 < t_max <= 1.0:
            raise ValueError(f"t_max: expected 0 < t_max <= 1, got {t_max}")
        self.schedule = schedule
        self.T = float(t_max)
        self.total_N = 1000
        self.t0 = 1.0 / self.total_N  # SANA's attribute: the default end time

    def log_alpha64(self, t):
        return np.log1p(-np.asarray(t, dtype=np.float64))

    def alpha_sigma64(self, t):
        t = np.asarray(t, dtype=np.float64)
        return 1.0 - t, t

    @np.errstate(divide="ignore")
    def lambda64(self, t):
        t = np.asarray(t, dtype=np.float64)
        return np.log1p(-t) - np.log(t)

    def inverse_lambda64(self, lamb):
        """t = 1 / (1 + e^lambda), the logistic sigmoid of -lambda (no overflow for either sign)."""
        lamb = np.asarray(lamb, dtype=np.float64)
        return np.exp(-np.logaddexp(0.0, lamb))

    def point64(self, t) -> Point:
        return Point.from_flow_sigma(t)

    def __repr__(self) -> str:
        return f"NoiseScheduleFlow(schedule={self.schedule!r}, T={self.T})"


def _check_array(name: str, a: np.ndarray) -> None:
    if a.ndim != 1 or a.shape[0] < 2:
        raise ValueError(f"{name}: expected a 1-D array with at least 2 entries, got shape {tuple(a.shape)}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains non-finite values")
