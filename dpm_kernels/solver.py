"""`DPMSolver`: DPM-Solver and DPM-Solver++ samplers running every step as one fused op.

Drop-in for the authors' `DPM_Solver` (same constructor and `sample` arguments, defaults and results),
plus: SDE-DPM-Solver++ 1/2/3M (``algorithm_type="sde-dpmsolver++"``, ``eta``, ``s_noise``, reproducible
noise), Karras / exponential spacings, diffusers' thresholding semantics, an explicit lower-order-final
threshold, and a choice of backend. The trajectory is planned once in float64 (`planner`); each model
evaluation is followed by one `ops.fused_step` call that converts, guides, thresholds, stores in a ring
buffer, combines and adds noise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch

from . import coefficients as C
from . import planner as P
from .backends import registry
from .compat import AuthorsUpdatesMixin
from .model_wrapper import UNGUIDED, Guidance, WrappedModel
from .noise import NoiseSource
from .ops import bind, default_history_dtype
from .schedule import FLOW_SCHEDULES, NoiseSchedule

THRESHOLDING_SEMANTICS = ("authors", "diffusers")


class _ModelSpec:
    """What the solver needs to know about a model function to fuse its output conversion and guidance."""

    def __init__(self, model_fn: Callable):
        if isinstance(model_fn, WrappedModel):
            self.raw_type = model_fn.raw_type
            self.cfg = model_fn.cfg
            self.guidance_scale = model_fn.guidance_scale
            self.guidance_at = model_fn.guidance_at
        else:  # a plain `model_fn(x, t_continuous) -> noise`, as the authors' solver expects
            self.raw_type = "noise"
            self.cfg = "none"
            self.guidance_scale = 1.0
            self.guidance_at = lambda t: UNGUIDED
        self._wrapped = isinstance(model_fn, WrappedModel)
        self._model_fn = model_fn

    def raw(self, x: torch.Tensor, t: torch.Tensor, t_input: torch.Tensor | None, guidance: Guidance):
        if self._wrapped:
            return self._model_fn.raw(x, t, t_input, guidance)
        return self._model_fn(x, t)

    def input_times(self, plan: P.Plan, t_in: tuple[torch.Tensor, ...]) -> list:
        """Per evaluation, the time tensor the network is called with (None: let the model function convert)."""
        if not self._wrapped:
            return [None] * len(t_in)
        ns = self._model_fn.noise_schedule
        key = ("model_times", ns.schedule, ns.total_N, self._model_fn.discrete_time_scale,
               t_in[0].device, t_in[0].dtype, t_in[0].shape[0]) if t_in else None
        if key not in plan._uploads:
            plan._uploads[key] = self._model_fn.model_input_time(torch.stack(t_in)).unbind(0) if t_in else ()
        return plan._uploads[key]


class DPMSolver(AuthorsUpdatesMixin):
    """DPM-Solver / DPM-Solver++ (Lu et al. 2022) for a VP diffusion model (or a flow-matching one).

    Args:
        model_fn: ``model_fn(x, t_continuous) -> noise`` (from `model_wrapper`, which also enables fusing
            the output conversion and classifier-free guidance).
        noise_schedule: a `NoiseScheduleVP` (or `NoiseScheduleFlow` for flow-matching models).
        algorithm_type: "dpmsolver++" (data prediction), "dpmsolver" (noise prediction),
            "sde-dpmsolver++" (SDE, multistep only; see ``eta``/``s_noise`` of `sample`) or "sde-dpmsolver".
        correcting_x0_fn: None, "dynamic_thresholding", or ``f(x0, t) -> x0`` applied to data predictions.
        correcting_xt_fn: ``f(x_t, t, step) -> x_t`` applied after each step.
        thresholding_max_val, dynamic_thresholding_ratio: see ``thresholding_semantics``.
        backend: one of `backends.registry.CHOICES` ("auto": the first backend that can serve x's device).
        thresholding_semantics: "authors": s = max(quantile, thresholding_max_val), applied to data
            predictions (DPM-Solver++ and the final denoising); "diffusers": s = clamp(quantile, 1,
            thresholding_max_val), applied for every algorithm (noise predictions via x0 and back).

    `lower_order_final_threshold` (class attribute, 10 = the authors' rule): the multistep solver lowers its order
    at the final steps only when steps < this; `sample(lower_order_final_threshold=...)` overrides it per call.
    The forks' solvers (`dpm_kernels.forks`) lower it at any number of steps (math.inf).
    """

    lower_order_final_threshold: float = 10

    def __init__(
        self,
        model_fn: Callable,
        noise_schedule: NoiseSchedule,
        algorithm_type: str = "dpmsolver++",
        correcting_x0_fn=None,
        correcting_xt_fn: Callable | None = None,
        thresholding_max_val: float = 1.0,
        dynamic_thresholding_ratio: float = 0.995,
        backend: str = "auto",
        thresholding_semantics: str = "authors",
    ) -> None:
        if not callable(model_fn):
            raise TypeError(f"model_fn: expected a callable, got {type(model_fn).__name__}")
        if not isinstance(noise_schedule, NoiseSchedule):
            raise TypeError(f"noise_schedule: expected a NoiseScheduleVP or NoiseScheduleFlow, got "
                            f"{type(noise_schedule).__name__}")
        C.is_data_prediction(algorithm_type)  # validates the name
        if not (correcting_x0_fn is None or correcting_x0_fn == "dynamic_thresholding" or callable(correcting_x0_fn)):
            raise ValueError("correcting_x0_fn: expected None, 'dynamic_thresholding' or a callable")
        if correcting_xt_fn is not None and not callable(correcting_xt_fn):
            raise TypeError("correcting_xt_fn: expected a callable or None")
        if thresholding_semantics not in THRESHOLDING_SEMANTICS:
            raise ValueError(f"thresholding_semantics: expected one of {THRESHOLDING_SEMANTICS}, got "
                             f"{thresholding_semantics!r}")
        if not (0.0 <= dynamic_thresholding_ratio <= 1.0):
            raise ValueError("dynamic_thresholding_ratio: must lie in [0, 1]")
        if not thresholding_max_val > 0:
            raise ValueError("thresholding_max_val: must be > 0")
        registry.validate(backend)
        self.model = lambda x, t: model_fn(x, t.expand(x.shape[0]))
        self.noise_schedule = noise_schedule
        self.algorithm_type = algorithm_type
        self.dynamic_thresholding_ratio = float(dynamic_thresholding_ratio)
        self.thresholding_max_val = float(thresholding_max_val)
        self.thresholding_semantics = thresholding_semantics
        self._thresholding = correcting_x0_fn == "dynamic_thresholding"
        self.correcting_x0_fn = self.dynamic_thresholding_fn if self._thresholding else correcting_x0_fn
        self.correcting_xt_fn = correcting_xt_fn
        self.backend = backend
        self._spec = _ModelSpec(model_fn)
        self._plans = P.Cache(16)  # sample() called again with the same arguments plans (and uploads) nothing
        self.register_progress_bar()

    # ----- progress (SANA's fork) -----
    def register_progress_bar(self, progress_fn: Callable | None = None) -> None:
        """Call ``progress_fn`` as sampling advances (SANA's API): first as ``progress_fn(step / total,
        desc="Generating step/total")`` and, if that raises, as ``progress_fn(step, total)``. Multistep: step 1 after
        the first model evaluation, then step i + 1 after update i, total = steps + 1; singlestep: step b after
        block b, total = blocks + 1 (so the last call is one short of the total, as in SANA). None: no calls."""
        if progress_fn is not None and not callable(progress_fn):
            raise TypeError(f"progress_fn: expected a callable or None, got {type(progress_fn).__name__}")
        self.progress_fn = progress_fn

    def update_progress(self, step: int, total_steps: int) -> None:
        if self.progress_fn is None:
            return
        try:
            self.progress_fn(step / total_steps, desc=f"Generating {step}/{total_steps}")
        except Exception:  # a callback of (step, total), as SANA falls back to
            self.progress_fn(step, total_steps)

    # ----- model output helpers (the authors' API; unfused) -----
    def threshold_bounds(self) -> tuple[float, float, float]:
        """(ratio, lo, hi) of s = clamp(quantile(|x0|, ratio), lo, hi)."""
        if self.thresholding_semantics == "authors":
            return self.dynamic_thresholding_ratio, self.thresholding_max_val, math.inf
        return self.dynamic_thresholding_ratio, 1.0, self.thresholding_max_val

    def dynamic_thresholding_fn(self, x0: torch.Tensor, t=None) -> torch.Tensor:
        """Dynamic thresholding of x0 [B, ...] per sample (Imagen)."""
        from .backends.reference import threshold_scale

        ratio, lo, hi = self.threshold_bounds()
        dt = torch.float64 if x0.dtype == torch.float64 else torch.float32
        y = x0.to(dt)
        s = threshold_scale(y, ratio, lo, hi).reshape((-1,) + (1,) * (x0.dim() - 1))
        return (torch.minimum(torch.maximum(y, -s), s) / s).to(x0.dtype)

    def noise_prediction_fn(self, x, t):
        self.noise_schedule.check_times(t, "t")
        return self.model(x, t)

    def data_prediction_fn(self, x, t):
        noise = self.noise_prediction_fn(x, t)
        ns = self.noise_schedule
        dims = x.dim()
        alpha_t = ns.marginal_alpha(t).to(x.dtype)[(...,) + (None,) * (dims - 1)]
        sigma_t = ns.marginal_std(t).to(x.dtype)[(...,) + (None,) * (dims - 1)]
        x0 = (x - sigma_t * noise) / alpha_t
        if self.correcting_x0_fn is not None:
            x0 = self.correcting_x0_fn(x0, t)
        return x0

    def model_fn(self, x, t):
        if C.is_data_prediction(self.algorithm_type):
            return self.data_prediction_fn(x, t)
        return self.noise_prediction_fn(x, t)

    def denoise_to_zero_fn(self, x, s):
        return self.data_prediction_fn(x, s)

    def get_time_steps(self, skip_type, t_T, t_0, N, device, shift=1.0):
        """N + 1 time steps from t_T to t_0 as a float32 tensor on `device` (the authors' API; `shift`: SANA's flow
        shift of the "time_uniform_flow" grid, `planner.time_steps`)."""
        return torch.from_numpy(P.time_steps(self.noise_schedule, skip_type, t_T, t_0, N, shift=shift)).float().to(
            device)

    def get_orders_and_timesteps_for_singlestep_solver(self, steps, order, skip_type, t_T, t_0, device):
        orders, outer = self._singlestep_layout(steps, order, skip_type, t_T, t_0, "singlestep")
        return torch.from_numpy(outer).float().to(device), orders

    def add_noise(self, x, t, noise=None):
        """x_t = alpha_t x + sigma_t noise; t of shape (t_size,) gives (t_size, B, ...) (squeezed if 1)."""
        t = torch.as_tensor(t, device=x.device)
        self.noise_schedule.check_times(t, "t")
        alpha_t, sigma_t = self.noise_schedule.marginal_alpha(t), self.noise_schedule.marginal_std(t)
        if noise is None:
            noise = torch.randn((t.shape[0], *x.shape), device=x.device, dtype=x.dtype)
        xx = x.reshape((-1, *x.shape))
        view = (...,) + (None,) * (xx.dim() - 1)
        xt = alpha_t.to(x.dtype)[view] * xx + sigma_t.to(x.dtype)[view] * noise
        return xt.squeeze(0) if t.shape[0] == 1 else xt

    # ----- planning -----
    def _singlestep_layout(self, steps, order, skip_type, t_T, t_0, method):
        """Block orders and the block boundaries. Grids are never shifted here: SANA builds its singlestep grids
        without flow_shift. A last block into sigma = 0 (``time_uniform_flow`` ends at t = 0) becomes first-order
        steps through its own points: no higher-order block has a finite update there."""
        orders, outer = self._singlestep_blocks(steps, order, skip_type, t_T, t_0, method)
        if orders[-1] > 1 and float(self.noise_schedule.lambda64(outer[-1])) == math.inf:
            o = orders[-1]
            inner = P.time_steps(self.noise_schedule, _inner_skip(skip_type), float(outer[-2]), float(outer[-1]), o)
            orders, outer = orders[:-1] + [1] * o, np.concatenate([outer[:-1], inner[1:]])
        return orders, outer

    def _singlestep_blocks(self, steps, order, skip_type, t_T, t_0, method):
        ns = self.noise_schedule
        if method == "singlestep":
            orders = P.singlestep_orders(steps, order)
            if skip_type in ("logSNR", "uniform_lambda", "exponential"):
                outer = P.time_steps(ns, skip_type, t_T, t_0, len(orders))  # reproduces the paper's results
            else:
                full = P.time_steps(ns, skip_type, t_T, t_0, steps)
                outer = full[np.cumsum([0] + orders)]
        else:  # singlestep_fixed: steps // order blocks of `order`; fewer steps than order -> one block of `steps`
            k = steps // order
            if k == 0:
                order, k = steps, 1
            orders = [order] * k
            outer = P.time_steps(ns, skip_type, t_T, t_0, k)
        return orders, outer

    def plan(self, steps=20, t_start=None, t_end=None, order=2, skip_type="time_uniform", method="multistep",
             lower_order_final=True, solver_type="dpmsolver", lower_order_final_threshold=None, eta=1.0,
             s_noise=1.0, multistep3="standard", flow_shift=1.0) -> P.Plan:
        """The evaluation plan `sample` would run (times, orders, coefficients), for inspection."""
        t_T, t_0 = self._time_range(t_start, t_end, inverse=False)
        return self._plan(steps, t_T, t_0, order, skip_type, method, lower_order_final, solver_type,
                          self._lof_threshold(lower_order_final_threshold), eta, s_noise, multistep3, flow_shift)

    def _lof_threshold(self, value):
        return self.lower_order_final_threshold if value is None else value

    def _plan(self, steps, t_T, t_0, order, skip_type, method, lower_order_final, solver_type, lof_threshold,
              eta, s_noise, multistep3="standard", flow_shift=1.0):
        key = (steps, t_T, t_0, order, skip_type, method, lower_order_final, solver_type, lof_threshold, eta, s_noise,
               multistep3, float(flow_shift))
        return self._plans.get(key, lambda: self._make_plan(*key))

    def _make_plan(self, steps, t_T, t_0, order, skip_type, method, lower_order_final, solver_type, lof_threshold,
                   eta, s_noise, multistep3, flow_shift):
        ns = self.noise_schedule
        if method == "multistep":
            times = P.time_steps(ns, skip_type, t_T, t_0, steps, shift=flow_shift)
            self._check_grid(times, skip_type)
            orders = P.multistep_orders(steps, order, lower_order_final, lof_threshold)
            return P.plan_multistep(ns, self.algorithm_type, solver_type, times, orders, eta, s_noise, multistep3)
        orders, outer = self._singlestep_layout(steps, order, skip_type, t_T, t_0, method)
        self._check_grid(outer, skip_type)
        return P.plan_singlestep(ns, self.algorithm_type, solver_type, outer, orders, _inner_skip(skip_type))

    def _check_grid(self, times: np.ndarray, skip_type: str) -> None:
        # only "time_uniform_flow" leaves [t_end, t_start]: it ends at t = 0, clean data, which VP schedules never reach
        if times.min() <= 0.0 and self.noise_schedule.schedule not in FLOW_SCHEDULES:
            raise ValueError(f"skip_type: {skip_type!r} runs to t = {times.min()} (clean data), outside this "
                             f"{type(self.noise_schedule).__name__}'s times; it is a grid for NoiseScheduleFlow")

    def _time_range(self, t_start, t_end, inverse: bool):
        ns = self.noise_schedule
        if inverse:
            t_0 = 1.0 / ns.total_N if t_start is None else float(t_start)
            t_T = ns.T if t_end is None else float(t_end)
            lo, hi, lo_name, hi_name = t_0, t_T, "t_start", "t_end"
        else:
            t_T = ns.T if t_start is None else float(t_start)
            t_0 = 1.0 / ns.total_N if t_end is None else float(t_end)
            lo, hi, lo_name, hi_name = t_0, t_T, "t_end", "t_start"
        ns.check_times(lo, lo_name)
        ns.check_times(hi, hi_name)
        if not lo > 0:  # the authors' rule: a trajectory ends short of t = 0 (denoise_to_zero takes the last step)
            raise ValueError(f"{lo_name}: must be > 0, got {lo}")
        if not lo < hi:
            raise ValueError(f"{lo_name}: must be smaller than {hi_name} (got {lo_name}={lo}, {hi_name}={hi})")
        return (t_T, t_0) if not inverse else (t_0, t_T)

    def _check_sample_args(self, x, steps, order, skip_type, method, solver_type, lof_threshold, flow_shift=1.0):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
        if x.dim() < 1 or x.shape[0] < 1:
            raise ValueError(f"x: expected [B, ...] with B >= 1, got shape {tuple(x.shape)}")
        if method not in P.METHODS:
            raise ValueError(f"method: expected one of {P.METHODS}, got {method!r}")
        if not isinstance(order, int) or isinstance(order, bool) or order not in (1, 2, 3):
            raise ValueError(f"order: expected 1, 2 or 3, got {order!r}")
        if method == "adaptive" and order not in (2, 3):
            raise ValueError(f"order: the adaptive solver needs order 2 or 3, got {order}")
        if method != "adaptive" and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
        if skip_type not in P.SKIP_TYPES:
            raise ValueError(f"skip_type: expected one of {P.SKIP_TYPES}, got {skip_type!r}")
        C.normalize_solver_type(solver_type)
        if lof_threshold is not None and not (lof_threshold == math.inf or (
                isinstance(lof_threshold, int) and not isinstance(lof_threshold, bool) and lof_threshold >= 0)):
            raise ValueError(f"lower_order_final_threshold: expected None, an integer >= 0 or math.inf, got "
                             f"{lof_threshold!r}")
        if not (isinstance(flow_shift, (int, float)) and not isinstance(flow_shift, bool) and math.isfinite(flow_shift)
                and flow_shift > 0):
            raise ValueError(f"flow_shift: expected a finite number > 0, got {flow_shift!r}")
        if self.algorithm_type.startswith("sde") and method != "multistep":
            raise ValueError(f"method: SDE algorithms run multistep only, got {method!r}")

    # ----- sampling -----
    def sample(self, x, steps=20, t_start=None, t_end=None, order=2, skip_type="time_uniform", method="multistep",
               lower_order_final=True, denoise_to_zero=False, solver_type="dpmsolver", atol=0.0078, rtol=0.05,
               return_intermediate=False, flow_shift=1.0, *, lower_order_final_threshold=None, eta=1.0, s_noise=1.0,
               generator=None, noise=None, noise_sampler=None, multistep3="standard"):
        """Solve from t_start (default T) to t_end (default 1/N) with `steps` model evaluations.

        Arguments as in the authors' `DPM_Solver.sample`; in addition:
            flow_shift: SANA's shift s of the ``skip_type="time_uniform_flow"`` grid (`planner.time_steps`): the
                multistep grid runs from shift(1 - t_end) to shift(1 - t_start) (to t = 0 by default, with a
                first-order last step). Other grids and the singlestep methods are not shifted (as in SANA).
            lower_order_final_threshold: lower orders at the final steps only when steps < this (10 = the
                authors' rule, 15 = diffusers', math.inf = at any number of steps, as the forks); None: the
                solver's `lower_order_final_threshold`; only with lower_order_final=True.
            eta, s_noise: SDE noise scale and noise multiplier (``sde-dpmsolver++``; eta = 0 is the ODE).
            generator: a torch.Generator, or a list of B generators (per-sample reproducible noise).
            noise: [steps, B, ...] caller-supplied standard normal noise; noise_sampler: f(t_s, t_t) -> noise.
            multistep3: "standard" (the authors', diffusers' and k-diffusion's third-order multistep update,
                second order in practice) or "third_order" (its D2 term doubled: truly third order); see
                `coefficients.multistep`.
        Returns x at t_end (and the list of intermediates when return_intermediate).
        """
        self._check_sample_args(x, steps, order, skip_type, method, solver_type, lower_order_final_threshold,
                                flow_shift)
        t_T, t_0 = self._time_range(t_start, t_end, inverse=False)
        return self._solve(x, steps, t_T, t_0, order, skip_type, method, lower_order_final, denoise_to_zero,
                           solver_type, atol, rtol, return_intermediate,
                           self._lof_threshold(lower_order_final_threshold), eta, s_noise, generator, noise,
                           noise_sampler, multistep3, flow_shift)

    def inverse(self, x, steps=20, t_start=None, t_end=None, order=2, skip_type="time_uniform", method="multistep",
                lower_order_final=True, denoise_to_zero=False, solver_type="dpmsolver", atol=0.0078, rtol=0.05,
                return_intermediate=False, *, lower_order_final_threshold=None, multistep3="standard"):
        """ODE inversion: from t_start (default 1/N) up to t_end (default T). SDE inversion is refused."""
        if self.algorithm_type.startswith("sde"):
            raise ValueError("algorithm_type: SDE solvers cannot be inverted (the noise is not recoverable)")
        self._check_sample_args(x, steps, order, skip_type, method, solver_type, lower_order_final_threshold)
        t_0, t_T = self._time_range(t_start, t_end, inverse=True)
        return self._solve(x, steps, t_0, t_T, order, skip_type, method, lower_order_final, denoise_to_zero,
                           solver_type, atol, rtol, return_intermediate,
                           self._lof_threshold(lower_order_final_threshold), 0.0, 1.0, None, None, None, multistep3)

    def _solve(self, x, steps, t_from, t_to, order, skip_type, method, lower_order_final, denoise_to_zero,
               solver_type, atol, rtol, return_intermediate, lof_threshold, eta, s_noise, generator, noise,
               noise_sampler, multistep3, flow_shift=1.0):
        if return_intermediate and method == "adaptive":
            raise ValueError("return_intermediate: not available with method='adaptive'")
        if self.correcting_xt_fn is not None and method == "adaptive":
            raise ValueError("correcting_xt_fn: not available with method='adaptive'")
        with torch.no_grad():
            if method == "adaptive":
                x = self._adaptive(x, order, t_from, t_to, atol, rtol, solver_type)
                intermediates = []
                last_step = 0
            else:
                plan = self._plan(steps, t_from, t_to, order, skip_type, method, lower_order_final, solver_type,
                                  lof_threshold, eta, s_noise, multistep3, flow_shift)
                noises = None
                if self.algorithm_type.startswith("sde") and any(ev.noisy for ev in plan.evals):
                    noises = NoiseSource(x, noise, noise_sampler, generator, steps=len(plan.evals))
                x, intermediates = self._execute(x, plan, noises, return_intermediate, plan.kind == "multistep",
                                                 progress=True)
                last_step = plan.evals[-1].step
            if denoise_to_zero:
                x = self._denoise_to_zero(x, t_to)
                if self.correcting_xt_fn is not None:
                    x = self.correcting_xt_fn(x, self._t_tensor(t_to, x), last_step + 1)
                if return_intermediate:
                    intermediates.append(x.clone())
        return (x, intermediates) if return_intermediate else x

    # ----- building blocks: the fused steps of this solver (sample, adaptive.py and compat.py use them) -----
    def conversion(self, target: str | None = None, thresholding: bool | None = None,
                   guidance: Guidance | None = None) -> P.Conversion:
        """How this solver's fused steps turn the model's raw output into `target` (default: the algorithm's
        prediction, x0 for DPM-Solver++ and eps otherwise), thresholded or not (default: as configured), for an
        evaluation with `guidance` (default: the model's classifier-free guidance where it applies)."""
        plus = C.is_data_prediction(self.algorithm_type)
        target = ("x0" if plus else "eps") if target is None else target
        if thresholding is None:
            thresholding = self._threshold_for(target == "x0") is not None
        if guidance is None:
            guidance = Guidance(self._spec.cfg, self._spec.guidance_scale)
        return P.Conversion(self._spec.raw_type, target, thresholding, guidance.scale, pag_scale=guidance.scale2)

    def _threshold_for(self, data_prediction: bool):
        """(ratio, lo, hi) when the fused step must threshold this prediction, else None."""
        if not self._thresholding:
            return None
        if self.thresholding_semantics == "authors" and not data_prediction:
            return None
        return self.threshold_bounds()

    def _t_tensor(self, t: float, x: torch.Tensor) -> torch.Tensor:
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.full((x.shape[0],), t, dtype=dt, device=x.device)

    def _raw(self, x: torch.Tensor, t: torch.Tensor, t_input: torch.Tensor | None, guidance: Guidance) -> torch.Tensor:
        """The model's raw output at (x, t [B]) laid out as `guidance` says: a floating tensor, cast to x's dtype (any
        other output is an error)."""
        out = self._spec.raw(x, t, t_input, guidance)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            what = type(out).__name__ if not isinstance(out, torch.Tensor) else f"a {out.dtype} tensor"
            raise TypeError(f"model_fn: must return a floating-point tensor, got {what}")
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def _bound(self, x: torch.Tensor, threshold=None, cfg: str | None = None):
        return bind(self.backend, x.device, self._spec.cfg if cfg is None else cfg, threshold)

    def _convert(self, x: torch.Tensor, t: float, target: str | None = None,
                 thresholding: bool | None = None) -> torch.Tensor:
        """One model evaluation at (x, t), converted (new tensor): guidance, thresholding and `correcting_x0_fn`."""
        g = self._spec.guidance_at(t)
        raw = self._raw(x, self._t_tensor(t, x), None, g)
        conv = self.conversion(target, thresholding, g)
        custom = callable(self.correcting_x0_fn) and not self._thresholding and (conv.target == "x0")
        pt = P.point(self.noise_schedule, t)
        row = P.DeviceTable(P.coefficient_rows(pt, dataclasses.replace(conv, target="x0", thresholding=False)
                                               if custom else conv), x.device).rows[0]
        thr = self.threshold_bounds() if conv.thresholding else None
        y = self._bound(x, thr, g.layout)(x, raw, row, torch.empty_like(x))
        return self.correcting_x0_fn(y, self._t_tensor(t, x)).to(x.dtype) if custom else y

    def prediction(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """One model evaluation at (x [B, ...], t): this solver's prediction (x0 for DPM-Solver++, else eps), with
        guidance, thresholding and `correcting_x0_fn` applied as in `sample`; a new tensor."""
        t = float(t)
        self.noise_schedule.check_times(t, "t")
        return self._convert(x, t)

    def combine(self, update: C.Update, x: torch.Tensor, outputs: list[torch.Tensor],
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """``update.a * x + sum_j update.c[j] * outputs[j] (+ update.noise * noise)`` for converted predictions
        (newest first, at most 3) as one fused step; a new tensor."""
        if len(outputs) != len(update.c):
            raise ValueError(f"outputs: the update combines {len(update.c)} outputs, got {len(outputs)}")
        row = P.DeviceTable(P.coefficient_rows(C.Point(1.0, 1.0, 0.0), P.IDENTITY_X0, update), x.device).rows[0]
        hd = default_history_dtype(x.dtype)
        hist = [m.to(hd) for m in outputs[1:]] + [None, None]
        return self._bound(x, cfg="none")(x, outputs[0].to(x.dtype), row, torch.empty_like(x), None, hist[0], hist[1],
                                          None, noise)

    # ----- execution -----
    def execute(self, x: torch.Tensor, plan: P.Plan, *, generator=None, noise=None, noise_sampler=None,
                return_intermediate: bool = False):
        """Run a plan built with `dpm_kernels.planner` (explicit times, orders, points).

        For custom time grids: e.g. ``planner.plan_multistep(ns, "dpmsolver++", "dpmsolver", times, orders)``.
        Returns x at the plan's last time (and the intermediates after each step when asked).
        """
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x: expected a floating-point tensor")
        with torch.no_grad():
            noises = None
            if any(ev.noisy for ev in plan.evals):
                noises = NoiseSource(x, noise, noise_sampler, generator, steps=len(plan.evals))
            out, inter = self._execute(x, plan, noises, return_intermediate, plan.kind == "multistep")
        return (out, inter) if return_intermediate else out

    def _steps_by_guidance(self, x: torch.Tensor, plan: P.Plan, guidance: list[Guidance], custom_x0: bool) -> dict:
        """Per distinct guidance of the plan's evaluations: the table of its rows (an evaluation reads its own row
        of it) and the step bound to its layout -- an interval without guidance or a PAG stretch is a different row
        and layout, not a different code path. custom_x0: rows of the conversion to x0 alone (`correcting_x0_fn`
        then runs before the combination)."""
        out = {}
        for g in dict.fromkeys(guidance):
            conv = self.conversion(guidance=g)
            if custom_x0:
                table = plan.device_table(dataclasses.replace(conv, target="x0", thresholding=False), x.device,
                                          combine=False)
                out[g] = (table.rows, self._bound(x, cfg=g.layout))
            else:
                thr = self.threshold_bounds() if conv.thresholding else None
                out[g] = (plan.device_table(conv, x.device).rows, self._bound(x, thr, g.layout))
        return out

    def _execute(self, x, plan: P.Plan, noises, return_intermediate, multistep: bool, progress: bool = False):
        conv = self.conversion()
        custom_x0 = conv.target == "x0" and callable(self.correcting_x0_fn) and not self._thresholding
        dev = x.device
        guidance = [self._spec.guidance_at(ev.t) for ev in plan.evals]
        by_guidance = self._steps_by_guidance(x, plan, guidance, custom_x0)
        if custom_x0:  # user code sits between the conversion to x0 and the update: two fused steps an evaluation
            combine_rows, combine = plan.device_table(P.IDENTITY_X0, dev).rows, self._bound(x, cfg="none")
        t_in = plan.eval_times(dev, torch.float64 if x.dtype == torch.float64 else torch.float32, x.shape[0])
        t_model = self._spec.input_times(plan, t_in)  # what the network is given, once per trajectory
        xw = x.clone(memory_format=torch.contiguous_format)
        slots = torch.empty((plan.n_slots,) + tuple(x.shape), dtype=default_history_dtype(x.dtype),
                            device=dev).unbind(0)
        u = torch.empty_like(xw) if plan.needs_u else None
        intermediates = []
        x_first_eval = None
        if multistep and self.correcting_xt_fn is not None:
            # the authors evaluate the model at the uncorrected x_T, then correct x_T
            x_first_eval = xw.clone()
            xw.copy_(self.correcting_xt_fn(xw, self._t_tensor(plan.evals[0].t, xw), 0))
        if multistep and return_intermediate:
            intermediates.append(xw.clone())
        noise_i = 0
        total = len(plan.times)  # SANA's progress total: steps + 1 (multistep), blocks + 1 (singlestep)
        for i, ev in enumerate(plan.evals):
            if ev.source == "x":
                xe = x_first_eval if (i == 0 and x_first_eval is not None) else xw
            else:
                xe = u
            raw = self._raw(xe, t_in[i], t_model[i], guidance[i])
            if progress and multistep and i == 0:
                self.update_progress(1, total)
            rows, step = by_guidance[guidance[i]]
            if custom_x0:
                raw = self.correcting_x0_fn(step(xe, raw, rows[i], torch.empty_like(xe)), t_in[i]).to(xe.dtype)
                rows, step = combine_rows, combine
            z = None
            if ev.noisy:
                z = noises(noise_i, ev.t, ev.t_next)
                noise_i += 1
            h = [slots[s] for s in ev.read_slots] + [None, None]
            step(xw, raw, rows[i], xw if ev.dest == "x" else u,
                 None if ev.write_slot is None else slots[ev.write_slot], h[0], h[1], None if xe is xw else xe, z)
            if ev.dest == "x":
                if self.correcting_xt_fn is not None:
                    xw.copy_(self.correcting_xt_fn(xw, self._t_tensor(ev.t_next, xw), ev.step))
                if return_intermediate:
                    intermediates.append(xw.clone())
                if progress:
                    self.update_progress(ev.step + 1 if multistep else ev.step, total)
        return xw, intermediates

    def _denoise_to_zero(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """The data prediction at t (one more model evaluation), thresholded when thresholding is on."""
        return self._convert(x, t, "x0", self._thresholding)

    def _adaptive(self, x, order, t_T, t_0, atol, rtol, solver_type, h_init=0.05, theta=0.9, t_err=1e-5):
        """DPM-Solver-12 (order 2) / -23 (order 3): accept a step when the RMS error estimate is <= 1."""
        from .adaptive import run_adaptive

        return run_adaptive(self, x, order, t_T, t_0, h_init, atol, rtol, theta, t_err, solver_type)


def _inner_skip(skip_type: str) -> str:
    # SANA's singlestep grids are unshifted, so the points inside a block of its flow grid are uniform in t
    return "time_uniform" if skip_type == "time_uniform_flow" else skip_type


DPM_Solver = DPMSolver
