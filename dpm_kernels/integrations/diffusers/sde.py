"""The fused drop-in of diffusers' `DPMSolverSDEScheduler`: k-diffusion's DPM-Solver++ SDE (`planner.plan_two_stage`,
r = 1/2, eta = 1) on the VE sigmas of a VP training schedule, with diffusers' Brownian tree noise.

The model sees `scale_model_input`'s x / sqrt(sigma^2 + 1) (diffusers' own); its output converts on the VE path:
epsilon x0 = x - sigma eps, v_prediction x0 = x / (sigma^2 + 1) - sigma v / sqrt(sigma^2 + 1) (EDM's v form with
sigma_data = 1). diffusers' module imports torchsde; without it this class, like diffusers', fails when created.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DPMSolverSDEScheduler

from ... import planner as P
from ._common import TwoCallStep
from .ve import brownian_tree

_SDE_TYPES = {"epsilon": P.Conversion("noise"), "v_prediction": P.Conversion("edm_v", sigma_data=1.0),
              "sample": P.Conversion("x_start")}


class FusedDPMSolverSDEScheduler(TwoCallStep, DPMSolverSDEScheduler):
    """`DPMSolverSDEScheduler` with a fused `step()`: same config, calls and results (`pred_original_sample` too).

    Each interval sigma_i -> sigma_{i+1} is two calls -- an ancestral step to the lambda midpoint, then from x_i
    to sigma_{i+1} with the midpoint's x0 -- and the last, to sigma = 0, one call (x0); `scheduler.sample` and
    `mid_point_sigma` evolve as in diffusers, so `scale_model_input` and the timesteps are diffusers' own. Noise:
    diffusers' Brownian tree (seeded from `noise_sampler_seed`, else the global RNG, at the first step), queried at
    the float32 sigmas diffusers computes, times `s_noise`, passed to the kernel.

    Beyond diffusers: prediction_type="sample" is fused (diffusers raises NotImplementedError); a trajectory that
    begins at the second call of an interval (an odd `set_begin_index`) is refused with a ValueError (diffusers:
    NaN).
    Attributes: ``fused_backend`` (a `backends.registry.CHOICES` name), ``fused_reason`` (read-only).
    """

    GRID_KEYS = frozenset({"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                           "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "timestep_spacing",
                           "steps_offset"})
    STEP_KEYS = frozenset({"prediction_type", "noise_sampler_seed"})
    PREDICTION_TYPES = tuple(_SDE_TYPES)
    FALL_BACK_ON_PLANNING_ERRORS = False  # the one planning error, an odd begin index: diffusers' step gives NaN
    _fz_s_noise = 1.0
    _fz_pred: torch.Tensor | None = None

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True, s_noise: float = 1.0):
        """diffusers' `step` (same arguments and result), fused unless `fused_reason` says otherwise."""
        self._fz_s_noise = float(s_noise)
        prev = self._fused(model_output, timestep, sample, None, None)
        if prev is None:
            return super().step(model_output, timestep, sample, return_dict=return_dict, s_noise=s_noise)
        pred, self._fz_pred = self._fz_pred, None
        pred = pred if pred.dtype == prev.dtype else pred.to(prev.dtype)
        if not return_dict:
            return prev, pred
        from diffusers.schedulers.scheduling_dpmsolver_sde import DPMSolverSDESchedulerOutput  # needs torchsde

        return DPMSolverSDESchedulerOutput(prev_sample=prev, pred_original_sample=pred)

    def _conversion(self) -> P.Conversion:
        return _SDE_TYPES[self.config.prediction_type]

    def _make_plan(self, sigmas: np.ndarray, start: int, n: int) -> P.Plan:
        # diffusers' sigmas are [s_0, s_1, s_1, s_2, s_2, ..., s_{N-1}, s_{N-1}, 0]: one pair per interval
        if start % 2:
            raise ValueError(f"set_begin_index: the trajectory begins at step index {start}, the second call of an "
                             "interval (each interval takes two calls); begin at an even index (diffusers' own step "
                             "returns NaN there)")
        return P.plan_two_stage(np.append(sigmas[0::2], sigmas[-1]), "sde", eta=1.0, s_noise=1.0, r=0.5)

    def _draws_noise(self) -> bool:
        return True

    def _noise(self, model_output, sample, generator, variance_noise, ev: P.Eval) -> torch.Tensor | None:
        i = self.step_index
        if self.noise_sampler is None:  # at the first step, as diffusers (its seed may come from the global RNG)
            positive = self.sigmas[self.sigmas > 0]
            self.noise_sampler = brownian_tree()(sample, positive.min().item(), self.sigmas.max().item(),
                                                  self.noise_sampler_seed)
        if ev.order == 1:  # the Euler step to sigma = 0: no noise
            return None
        first = ev.dest == "u"
        z = self.noise_sampler(*self._query_sigmas(i if first else i - 1, first))
        return z if self._fz_s_noise == 1.0 else z * self._fz_s_noise

    def _query_sigmas(self, i: int, to_midpoint: bool):
        """diffusers' float32 sigma_fn(t) and sigma_fn(t + h / 2) (to_midpoint) or sigma_fn(t_next) for the interval
        sigmas[i] -> sigmas[i + 1], t = -log sigma: the tree's query and, to the midpoint, `mid_point_sigma`."""
        t, t_next = self.sigmas[i].log().neg(), self.sigmas[i + 1].log().neg()
        to = t + (t_next - t) * 0.5 if to_midpoint else t_next
        return t.neg().exp(), to.neg().exp()

    def _hist_out(self, ev: P.Eval, slots):
        # every call returns its x0 (pred_original_sample) in a tensor of its own; no later call reads it (r = 1/2)
        self._fz_pred = torch.empty_like(slots[0])
        return self._fz_pred

    def _advanced(self, ev: P.Eval, sample: torch.Tensor) -> None:
        if ev.dest == "u":  # diffusers' first-order state -> second: the interval start and the midpoint sigma
            self.sample = sample
            self.mid_point_sigma = self._query_sigmas(self.step_index - 1, True)[1]
        elif ev.source == "u":
            self.sample = None
            self.mid_point_sigma = None
