"""The fused drop-in of diffusers' `CogVideoXDPMScheduler` (the CogVideoX, CogView3-Plus and ConsisID pipelines):
SDE-DPM-Solver++(2M) on the DDPM grid, with the history held by the caller.

Its `step(model_output, old_pred_original_sample, timestep, timestep_back, sample, ...)` is passed the previous
step's x0 and that step's timestep, and returns `(prev_sample, pred_original_sample)`; the pipeline feeds the x0
back. Each call here is one fused op: x, the output (converted to x0 on the VP point of `alphas_cumprod[timestep]`),
the caller's previous x0 as hist1, the noise; out is prev_sample and hist_out pred_original_sample. Coefficients come
from `planner.plan_caller_steps` (float64, from diffusers' own `alphas_cumprod`), planned for the whole grid of
`set_timesteps` at the first call -- the (timestep, timestep_back) pairs a pipeline passes -- and uploaded once; any
other pair is planned when first seen.

diffusers' habits that pipelines see are kept: the step goes to `timestep - num_train_timesteps //
num_inference_steps` whatever `timestep_spacing` (so a trailing grid's next step starts elsewhere), `eta`,
`variance_noise` and `use_clipped_model_output` are ignored, noise is drawn twice from the caller's generator when a
previous x0 is used (once otherwise; the first draw is then unused), and the first-order calls (no previous x0, or
the last step) return a tuple whatever `return_dict` says.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from diffusers import CogVideoXDPMScheduler
from diffusers.schedulers.scheduling_dpm_cogvideox import DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ... import coefficients as C
from ... import planner as P
from ...ops import bind
from ._common import MODEL_TYPE, FusedStepMixin


def _host_index(t) -> int:
    """A timestep as a Python int (a 1-element integer tensor is read to the host, as diffusers' own step does)."""
    if isinstance(t, torch.Tensor):
        if t.numel() != 1 or t.is_floating_point() or t.is_complex():
            raise TypeError(f"timestep: expected an integer timestep, got a {t.dtype} tensor of shape {tuple(t.shape)}")
        return int(t.item())
    return operator.index(t)


class FusedCogVideoXDPMScheduler(FusedStepMixin, CogVideoXDPMScheduler):
    """`CogVideoXDPMScheduler` with a fused `step()`: same config, arguments, noise draws and results (module doc).

    Beyond diffusers: a `timestep_back` at the lambda of `timestep` (diffusers: 0/0) takes a first-order step;
    `old_pred_original_sample` without `timestep_back` raises a ValueError naming it (diffusers: IndexError).
    What is not fused runs diffusers' own step for that call (the scheduler keeps no state between calls), with the
    reason in ``fused_reason``: a zero-terminal-SNR grid with an epsilon model (x0 = x / 0: diffusers gives NaN),
    timesteps that are not integers, a previous x0 that is not a floating tensor of the sample's shape and device.
    Attributes: ``fused_backend`` (a `backends.registry.CHOICES` name), ``fused_reason`` (read-only).
    """

    # every option of diffusers' class shapes alphas_cumprod or the timesteps, or is not read by its step at all
    # (clip_sample, clip_sample_range, sample_max_value)
    GRID_KEYS = frozenset({"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                           "set_alpha_to_one", "steps_offset", "timestep_spacing", "rescale_betas_zero_snr",
                           "snr_shift_scale", "clip_sample", "clip_sample_range", "sample_max_value"})
    STEP_KEYS = frozenset({"prediction_type"})
    PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
    _fz_rows: dict | None = None  # ((timestep, prev, timestep_back or None), device) -> its coefficient row

    def step(self, model_output: torch.Tensor, old_pred_original_sample: torch.Tensor, timestep: int,
             timestep_back: int, sample: torch.Tensor, eta: float = 0.0, use_clipped_model_output: bool = False,
             generator: torch.Generator | None = None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = False) -> DDIMSchedulerOutput | tuple:
        """diffusers' `step` (same arguments and result), fused unless `fused_reason` says otherwise."""
        done = self._cog_fused(model_output, old_pred_original_sample, timestep, timestep_back, sample, generator)
        if done is None:
            return super().step(model_output, old_pred_original_sample, timestep, timestep_back, sample, eta=eta,
                                use_clipped_model_output=use_clipped_model_output, generator=generator,
                                variance_noise=variance_noise, return_dict=return_dict)
        prev, pred, second = done
        if second and return_dict:
            return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=pred)
        return prev, pred

    def _fz_reset(self) -> None:
        super()._fz_reset()
        self._fz_rows = None

    def _cog_fused(self, model_output, old, timestep, timestep_back, sample, generator):
        """(prev_sample, pred_original_sample, second order) or None: diffusers' own step runs."""
        self._fz_data_reason = None
        if self.num_inference_steps is None or self._config_reason() is not None:
            return None
        why = self._data_reason(model_output, sample)
        if why is None and old is not None and not (
                isinstance(old, torch.Tensor) and old.is_floating_point() and old.shape == sample.shape
                and old.device == sample.device):
            why = "old_pred_original_sample: not a floating tensor of the sample's shape and device: not fused"
        if why is None:
            try:
                t = _host_index(timestep)
                prev = t - self.config.num_train_timesteps // self.num_inference_steps
                second = old is not None and prev >= 0
                if second and timestep_back is None:
                    raise LookupError("timestep_back")
                back = _host_index(timestep_back) if second else None
                row = self._row((t, prev, back), sample.device)
            except LookupError as exc:
                if str(exc) == "timestep_back":
                    raise ValueError("timestep_back: old_pred_original_sample is given, so the step needs the "
                                     "timestep it was predicted at (diffusers: IndexError)") from None
                why = f"planning failed ({exc!r})"
            except (TypeError, ValueError, ArithmeticError) as exc:
                why = f"planning failed ({exc})"
        if why is not None:
            self._fz_data_reason = why
            return None
        w = self._working_dtype(sample, model_output)
        z = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        if second:  # diffusers draws again for the second-order update
            z = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        x = sample if sample.dtype == w else sample.to(w)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        identity = self.config.prediction_type == "sample"  # diffusers returns the model output itself as x0
        pred = None if identity else torch.empty_like(out)
        hist1 = None if not second else old if old.dtype == w else old.to(w)
        noisy = bool(row[1])
        bind(self.fused_backend, sample.device)(x, model_output if model_output.dtype == w else model_output.to(w),
                                                row[0], out, pred, hist1, None, None, z.to(w) if noisy else None)
        return out, model_output if identity else pred, second

    def _row(self, key: tuple, device: torch.device):
        """(row, adds noise) of a step (timestep, prev timestep, timestep_back or None) on `device`: at the first
        call, the rows of every step of the grid as a pipeline calls them, uploaded once; a new pair, when seen."""
        rows = self._fz_rows
        if rows is None:
            rows = self._fz_rows = {}
        if (key, device) not in rows:
            keys = [key]
            if not rows:
                ratio = self.config.num_train_timesteps // self.num_inference_steps
                ts = [int(t) for t in self.timesteps.tolist()]
                keys += [(t, t - ratio, ts[i - 1] if i > 0 and t - ratio >= 0 else None) for i, t in enumerate(ts)]
                keys = list(dict.fromkeys(keys))
            plan = self._plan_keys(keys)
            table = plan.device_table(P.Conversion(MODEL_TYPE[self.config.prediction_type], "x0"), device,
                                      what="timestep")
            for k, r, ev in zip(keys, table.rows, plan.evals, strict=True):
                rows[(k, device)] = (r, ev.noisy)
        return rows[(key, device)]

    def _plan_keys(self, keys: list[tuple]) -> P.Plan:
        ac = self.alphas_cumprod.detach().cpu().double().numpy()
        final = float(self.final_alpha_cumprod)

        def points(vals) -> C.Point:
            with np.errstate(divide="ignore"):  # alpha_cumprod = 0 (zero terminal SNR): lambda = -inf
                return C.Point.from_log_alpha(0.5 * np.log(np.asarray(vals, dtype=np.float64)))

        now = points([ac[t] for t, _, _ in keys])
        nxt = points([ac[p] if p >= 0 else final for _, p, _ in keys])
        back = points([ac[b] if b is not None else 0.5 for _, _, b in keys])
        return P.plan_caller_steps("sde-dpmsolver++", "midpoint", now, nxt, back, [b is not None for _, _, b in keys])
