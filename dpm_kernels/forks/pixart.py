"""PixArt-α / PixArt-Σ's fork (PixArt-alpha/PixArt-alpha and PixArt-sigma, `diffusion/model/dpm_solver.py` and
`diffusion/dpm_solver.py`; Open-Sora's PixArt configs and ComfyUI's PixArt nodes use the same files): the same names,
arguments and defaults, fused. Replace

    from diffusion.model.dpm_solver import DPM_Solver, NoiseScheduleVP, model_wrapper
    from diffusion import DPMS

by imports from this module. PixArt's code is the authors' with one rule changed: multistep with lower_order_final
lowers the last orders at any number of steps (the authors only below 10). Its singlestep DPM-Solver-1 on a logSNR
grid fails (an index error: it plans one interval for `steps` steps); this module takes `steps` intervals, as the
authors do.
"""

from __future__ import annotations

import torch

from ..model_wrapper import model_wrapper
from ..schedule import NoiseScheduleVP
from ._base import ForkDPMSolver, named_betas

DPM_Solver = ForkDPMSolver

__all__ = ["DPMS", "DPM_Solver", "NoiseScheduleVP", "model_wrapper"]


def DPMS(model, condition, uncondition, cfg_scale, model_type="noise", noise_schedule="linear",  # noqa: N802
         guidance_type="classifier-free", model_kwargs=None, diffusion_steps=1000, *, backend="auto"):
    """PixArt's `DPMS`: a discrete VP schedule from guided-diffusion's named betas (`noise_schedule`,
    `diffusion_steps`), the authors' `model_wrapper` (classifier-free guidance at every step) and a DPM-Solver++
    solver. Call ``.sample(z, steps=20, order=2, skip_type="time_uniform", method="multistep")`` on the result."""
    ns = NoiseScheduleVP("discrete", betas=torch.from_numpy(named_betas(noise_schedule, diffusion_steps)))
    fn = model_wrapper(model, ns, model_type, model_kwargs, guidance_type, condition, uncondition, cfg_scale)
    return DPM_Solver(fn, ns, algorithm_type="dpmsolver++", backend=backend)
