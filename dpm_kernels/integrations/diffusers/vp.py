"""The fused drop-ins of diffusers' VP DPM-Solver schedulers: multistep, singlestep, and the multistep inverse.

Each subclass keeps diffusers' `__init__`, `set_timesteps` (sigma grids, flow sigmas and shifts, `mu`), and every
other method; only `step()` is one fused op call, planned once per trajectory (`_common.FusedStepMixin`).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DPMSolverMultistepInverseScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler
from diffusers.utils.torch_utils import randn_tensor

from ... import coefficients as C
from ... import planner as P
from ._common import FusedStepMixin, StepWithGenerator, StepWithVarianceNoise

# Options of diffusers' VP schedulers whose effect is reproduced: the grid keys only shape the sigma grid diffusers'
# own set_timesteps builds; the step keys are read by the fused step.
VP_GRID_KEYS = frozenset({"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                          "rescale_betas_zero_snr", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                          "use_lu_lambdas", "final_sigmas_type", "lambda_min_clipped", "timestep_spacing",
                          "steps_offset", "flow_shift", "use_dynamic_shifting", "time_shift_type"})
VP_STEP_KEYS = frozenset({"solver_order", "prediction_type", "thresholding", "dynamic_thresholding_ratio",
                          "sample_max_value", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final",
                          "use_flow_sigmas", "variance_type", "final_sigmas_type"})


class _VPStep(FusedStepMixin):
    GRID_KEYS = VP_GRID_KEYS
    STEP_KEYS = VP_STEP_KEYS

    def _result_in_model_dtype(self) -> bool:
        # diffusers casts the result to the dtype of the converted output: the raw output's where no sample enters
        cfg = self.config
        return (cfg.algorithm_type.endswith("++") and cfg.prediction_type == "sample") or (
            not cfg.algorithm_type.endswith("++") and cfg.prediction_type == "epsilon" and not cfg.thresholding)


class FusedDPMSolverMultistepScheduler(_VPStep, StepWithVarianceNoise, DPMSolverMultistepScheduler):
    """`DPMSolverMultistepScheduler` with a fused `step()`; same config, same results (package doc).

    Attributes: ``fused_backend`` (a `backends.registry.CHOICES` name), ``fused_reason`` (read-only).
    """

    ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")

    def _orders(self, start: int, n: int) -> list[int]:
        return self._multistep_orders(start, n, self.config.final_sigmas_type == "zero")

    def _plan_steps(self, points: C.Point, orders: list[int]) -> P.Plan:
        return self._plan_multistep(points, orders, "diffusers")

    def _advanced(self, ev: P.Eval, sample: torch.Tensor) -> None:
        self._count_lower_order()

    def _noise(self, model_output, sample, generator, variance_noise, ev: P.Eval) -> torch.Tensor | None:
        if variance_noise is not None:
            return variance_noise.to(device=model_output.device, dtype=torch.float32)
        # the shape of the converted output (diffusers draws after cutting a learned variance off)
        return randn_tensor(self._prediction(model_output, sample).shape, generator=generator,
                            device=model_output.device, dtype=torch.float32)


class FusedDPMSolverMultistepInverseScheduler(_VPStep, StepWithVarianceNoise, DPMSolverMultistepInverseScheduler):
    """`DPMSolverMultistepInverseScheduler` with a fused `step()`: the multistep solver run towards noise, with the
    inverse scheduler's ascending grid (deduplicated timesteps, the noisiest sigma appended) and its lower-order rule.

    SDE algorithms are decided by the grid's direction: on a grid that goes up in noise an SDE step cannot be
    inverted (diffusers' inverse scheduler returns NaN there, and raises at third order), so it is refused with a
    clear error; with use_flow_sigmas=True diffusers' "inverse" grid runs from sigma ~1 down, towards the data, where
    the SDE step is defined: it is fused, with diffusers' noise (and at third order k-diffusion's 3M SDE update, where
    diffusers fails). A zero-length step (karras/exponential/beta grids repeat their last sigma) is the identity,
    where diffusers' heun form gives NaN.
    Attributes: ``fused_backend`` (a `backends.registry.CHOICES` name), ``fused_reason`` (read-only).
    """

    ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
    FALL_BACK_ON_PLANNING_ERRORS = False  # an SDE inversion: diffusers' own step would return NaN

    def _orders(self, start: int, n: int) -> list[int]:
        return self._multistep_orders(start, n, False)  # no final_sigmas_type in the inverse scheduler

    def _plan_steps(self, points: C.Point, orders: list[int]) -> P.Plan:
        if self.config.algorithm_type.startswith("sde") and (np.diff(points.lam) < -C.ZERO_STEP).any():
            raise ValueError(f"algorithm_type: {self.config.algorithm_type!r} cannot be inverted (an SDE step adds "
                             "noise that no later step can remove); use dpmsolver++ or dpmsolver to invert")
        return self._plan_multistep(points, orders)

    def _advanced(self, ev: P.Eval, sample: torch.Tensor) -> None:
        self._count_lower_order()

    def _noise(self, model_output, sample, generator, variance_noise, ev: P.Eval) -> torch.Tensor | None:
        if variance_noise is not None:
            return variance_noise
        # diffusers draws in the converted output's shape and dtype (the raw output's where it is the x0 itself)
        dtype = model_output.dtype if self._result_in_model_dtype() else self._working_dtype(sample, model_output)
        return randn_tensor(self._prediction(model_output, sample).shape, generator=generator,
                            device=model_output.device, dtype=dtype)


class FusedDPMSolverSinglestepScheduler(_VPStep, StepWithGenerator, DPMSolverSinglestepScheduler):
    """`DPMSolverSinglestepScheduler` with a fused `step()`; same config, same results (package doc).

    A step of order k (the scheduler's ``order_list``) starts from ``self.sample``, the sample of the block's first
    step (held by reference, as diffusers does), and evaluates its output at the current sample (``x_eval``).
    ``dpmsolver`` with thresholding, where diffusers' own code fails, is fused (thresholded x0, then back to eps).
    Attributes: ``fused_backend`` (a `backends.registry.CHOICES` name), ``fused_reason`` (read-only).
    """

    ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")

    def _orders(self, start: int, n: int) -> list[int]:
        # diffusers lowers order_list[i] while fewer outputs than that exist since set_timesteps
        return [min(self.order_list[i], k + 1) for k, i in enumerate(range(start, n))]

    def _plan_steps(self, points: C.Point, orders: list[int]) -> P.Plan:
        return P.plan_singlestep_steps(self.config.algorithm_type, self.config.solver_type, points, orders)

    def _noise(self, model_output, sample, generator, variance_noise, ev: P.Eval) -> torch.Tensor | None:
        return randn_tensor(self._prediction(model_output, sample).shape, generator=generator,
                            device=model_output.device, dtype=model_output.dtype)

    def _start_point(self, ev: P.Eval, sample, x_now):
        if ev.order == 1:
            self.sample = sample  # the block start, by reference like diffusers
            return x_now, None
        start = self.sample.to(x_now.dtype)
        return start, (None if start is x_now else x_now)

    def _advanced(self, ev: P.Eval, sample: torch.Tensor) -> None:
        pass

    def _result_in_model_dtype(self) -> bool:
        return False  # no final cast in diffusers' singlestep step: the promoted dtype
