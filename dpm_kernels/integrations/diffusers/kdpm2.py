"""The fused drop-ins of diffusers' `KDPM2DiscreteScheduler` and `KDPM2AncestralDiscreteScheduler` ("DPM2" and
"DPM2 a"): DPM2 (`planner.plan_two_stage`, form "dpm2") on the VE sigmas of a VP training schedule.

Each interval sigma_i -> sigma_{i+1} is two calls -- an Euler step to the interpolated sigma, then from the interval's
start with the derivative there -- and the last, to sigma = 0, one Euler call (x0). The grid is diffusers' own: its
float32 `sigmas`, `sigmas_interpol` (and for the ancestral class `sigmas_down`, `sigmas_up`) are read as they are, so
the model sees diffusers' timesteps and `scale_model_input` (diffusers' own) divides by diffusers' sigmas. The output
converts on the VE path as in the SDE scheduler (`sde._SDE_TYPES`).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from ... import planner as P
from ._common import TwoCallStep
from .sde import _SDE_TYPES


class _KDPM2Step(TwoCallStep):
    GRID_KEYS = frozenset({"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                           "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "timestep_spacing",
                           "steps_offset"})
    STEP_KEYS = frozenset({"prediction_type"})
    PREDICTION_TYPES = tuple(_SDE_TYPES)
    # the planning errors -- an odd begin index (diffusers' step never moves x again), a NaN grid (diffusers: NaN) --
    # are raised, not run by diffusers
    FALL_BACK_ON_PLANNING_ERRORS = False
    _fz_pred: torch.Tensor | None = None

    def _kdpm2_step(self, model_output, timestep, sample, generator, return_dict: bool, output_cls):
        prev = self._fused(model_output, timestep, sample, generator, None)
        if prev is None:
            return None
        pred, self._fz_pred = self._fz_pred, None
        return output_cls(prev_sample=prev, pred_original_sample=pred) if return_dict else (prev, pred)

    # ----- hooks -----
    def _draws_noise(self) -> bool:
        return False

    def _conversion(self) -> P.Conversion:
        return _SDE_TYPES[self.config.prediction_type]

    def _init_step_index(self, timestep) -> None:
        """diffusers' rule (the second of several equal timesteps: an img2img start at an interval's first call),
        except where that is an interval's second call and an earlier equal timestep starts an interval: a grid whose
        first timestep repeats (trailing / leading spacing with more steps than training timesteps) then begins at its
        start, where diffusers begins one call late and divides by sigma = 0 at its last call (NaN)."""
        super()._init_step_index(timestep)
        if self.begin_index is None and self._step_index % 2:
            even = [i for i in np.flatnonzero(self.host_timesteps() == self.host_timesteps()[self._step_index]).tolist()
                    if i % 2 == 0 and i < self._step_index]
            if even:
                self._step_index = even[0]

    def _make_plan(self, sigmas: np.ndarray, start: int, n: int) -> P.Plan:
        if start % 2:
            raise ValueError(f"set_begin_index: the trajectory begins at step index {start}, the second call of an "
                             "interval (each interval takes two calls); begin at an even index (diffusers' own step "
                             "then steps every later interval by zero)")
        starts, mids, ends, noise = (np.asarray(v, dtype=np.float64) for v in self._grid(start, n))
        if not all(np.isfinite(v).all() for v in (starts, mids, ends, noise)):
            raise ValueError(f"num_inference_steps: diffusers' grid for {self.num_inference_steps} steps has NaN "
                             "sigmas (an ancestral sigma_down that rounds to 0 in float32 puts the interpolated "
                             "sigma at log(0)); its own step and timesteps are NaN there: take more steps")
        return P.plan_two_stage(np.append(starts, ends[-1]), "dpm2", starts=starts, mids=mids, ends=ends, noise=noise)

    def _hist_out(self, ev: P.Eval, slots):
        # every call returns its x0 (pred_original_sample) in a tensor of its own, in the working dtype (that of x_eval,
        # which the second call reads as hist1)
        traj = self._fz_traj
        self._fz_pred = torch.empty(traj.shape, dtype=traj.dtype, device=traj.device)
        return self._fz_pred

    def _advanced(self, ev: P.Eval, sample: torch.Tensor) -> None:
        # diffusers keeps the interval's start after every first-order call (also the last one), None after a second
        self.sample = sample if ev.source == "x" else None


class FusedKDPM2DiscreteScheduler(_KDPM2Step, KDPM2DiscreteScheduler):
    """`KDPM2DiscreteScheduler` ("DPM2") with a fused `step()`: same config, calls and results (`pred_original_sample`
    too); `scheduler.sample` evolves as in diffusers, so `scale_model_input` and the timesteps are diffusers' own.

    Beyond diffusers: prediction_type="sample" is fused (diffusers raises NotImplementedError); a grid whose first
    timestep repeats begins at its first call (diffusers: NaN); a trajectory begun at the second call of an interval
    (an odd `set_begin_index`) is refused with a ValueError (diffusers steps every later interval by zero).
    Attributes: ``fused_backend`` (a `backends.registry.CHOICES` name), ``fused_reason`` (read-only).
    """

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True):
        """diffusers' `step` (same arguments and result), fused unless `fused_reason` says otherwise."""
        from diffusers.schedulers.scheduling_k_dpm_2_discrete import KDPM2DiscreteSchedulerOutput as Output

        out = self._kdpm2_step(model_output, timestep, sample, None, return_dict, Output)
        return super().step(model_output, timestep, sample, return_dict=return_dict) if out is None else out

    def _grid(self, start: int, n: int):
        """(start, midpoint, end, noise) sigmas of the intervals from call `start` on: diffusers' float32 values."""
        k = np.arange(start, n, 2)
        s, si = (v.cpu().numpy() for v in (self.sigmas, self.sigmas_interpol))
        return s[k], si[k + 1], s[k + 1], np.zeros(len(k))


class FusedKDPM2AncestralDiscreteScheduler(_KDPM2Step, KDPM2AncestralDiscreteScheduler):
    """`KDPM2AncestralDiscreteScheduler` ("DPM2 a") with a fused `step()`: same config, calls and results. Each
    interval goes to diffusers' sigma_down and adds sigma_up times noise drawn as diffusers draws it (`randn_tensor`
    in the second call, from the caller's generator, in the model output's dtype); the last call, to 0, adds none.

    Beyond diffusers: as `FusedKDPM2DiscreteScheduler`.
    Attributes: ``fused_backend`` (a `backends.registry.CHOICES` name), ``fused_reason`` (read-only).
    """

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True):
        """diffusers' `step` (same arguments and result), fused unless `fused_reason` says otherwise."""
        from diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete import (
            KDPM2AncestralDiscreteSchedulerOutput as Output,
        )

        out = self._kdpm2_step(model_output, timestep, sample, generator, return_dict, Output)
        if out is None:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        return out

    def _grid(self, start: int, n: int):
        k = np.arange(start, n, 2)
        s, si, down, up = (v.cpu().numpy() for v in (self.sigmas, self.sigmas_interpol, self.sigmas_down,
                                                      self.sigmas_up))
        return s[k], si[k], down[k], np.where(down[k] == 0, 0.0, up[k])

    def _draws_noise(self) -> bool:
        return True

    def _noise(self, model_output, sample, generator, variance_noise, ev: P.Eval) -> torch.Tensor | None:
        if ev.source != "u":  # diffusers draws in the second call of an interval only
            return None
        return randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                            generator=generator)

    def _advanced(self, ev: P.Eval, sample: torch.Tensor) -> None:
        super()._advanced(ev, sample)
        if ev.source == "x":  # diffusers' first-order dt (kept after the interval)
            i = self.step_index - 1
            self.dt = self.sigmas_interpol[i] - self.sigmas[i]
