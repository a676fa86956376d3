"""SANA's fork (NVlabs/Sana `diffusion/model/dpm_solver.py` and `diffusion/dpm_solver.py`; also Sana-Video, PixelDiT
and code built on them): the same names, arguments and defaults, fused. Replace

    from diffusion.model.dpm_solver import DPM_Solver, NoiseScheduleFlow, NoiseScheduleVP, model_wrapper
    from diffusion import DPMS

by imports from this module. SANA's rules (docs/math.md, "The forks"):
- a discrete VP schedule's network time is (t - 1/N) * N (the authors: * 1000; they differ when a schedule is
  clipped); `NoiseScheduleFlow(schedule="discrete_flow")` feeds t * N, N = 1000;
- `model_type="flow"`: the velocity becomes noise as (1 - sigma_t) v + x;
- `interval_guidance=[lo, hi]` (default [0, 1]): classifier-free guidance only where lo < t < hi, so with the default
  the first step at t = 1 is unguided; "classifier-free_PAG" ignores the interval, "classifier-free_PAG_seq" guides
  classifier-free below t = 0.5 and with the PAG combination from t = 0.5 on;
- multistep with lower_order_final lowers the last orders at any number of steps; `skip_type="time_uniform_flow"`
  with `flow_shift`; `register_progress_bar`.
Where SANA's own code gives NaN (its flow `inverse_lambda` is exp(-lambda), so singlestep orders 2-3 and logSNR
grids on the flow path fail; a data prediction at t = 1; higher orders into t = 0) this module does the
well-defined thing instead (README, "Drop-in for the authors' code").
"""

from __future__ import annotations

import contextlib

import torch

from .. import model_wrapper as _mw
from .. import schedule as _schedule
from ..schedule import NoiseScheduleVP
from ._base import ForkDPMSolver, named_betas

DPM_Solver = ForkDPMSolver
SCHEDULES = ("VP", "FLOW")


class NoiseScheduleFlow(_schedule.NoiseScheduleFlow):
    """`dpm_kernels.NoiseScheduleFlow` with SANA's default: schedule="discrete_flow" (the network gets t * 1000)."""

    def __init__(self, schedule: str = "discrete_flow", t_max: float = 1.0) -> None:
        super().__init__(schedule, t_max)

__all__ = ["DPMS", "DPM_Solver", "NoiseScheduleFlow", "NoiseScheduleVP", "model_wrapper", "sana_pag_hook"]


def sana_pag_hook(model, pag_applied_layers, guidance_scale: float):
    """The PAG hook for SANA's own networks: while active, the self-attention of `pag_applied_layers` is SANA's
    identity processor (PAGIdentity... when guidance_scale == 1, PAGCFGIdentity... otherwise, as SANA chooses), and
    SANA's regular processor afterwards. Needs SANA's `diffusion.model.nets.sana_blocks` on the path."""
    try:
        from diffusion.model.nets.sana_blocks import (  # SANA's own package (the caller's codebase)
            PAGCFGIdentitySelfAttnProcessorLiteLA,
            PAGIdentitySelfAttnProcessorLiteLA,
            SelfAttnProcessorLiteLA,
        )
    except ImportError as e:
        raise ValueError("pag_hook: perturbed-attention guidance on pag_applied_layers needs SANA's attention "
                         "processors (diffusion.model.nets.sana_blocks), which are not importable here; pass "
                         "pag_hook=<your network's attention swap>") from e
    net = model if isinstance(model, torch.nn.Module) else getattr(model, "__self__", None)
    if net is None or not hasattr(net, "blocks"):
        raise ValueError("pag_hook: SANA's attention swap needs the network (or a bound method of it) with .blocks; "
                         "pass pag_hook=<your network's attention swap>")
    perturbed = PAGIdentitySelfAttnProcessorLiteLA if guidance_scale == 1.0 else PAGCFGIdentitySelfAttnProcessorLiteLA
    layers = list(pag_applied_layers)

    @contextlib.contextmanager
    def hook(k: int):
        for i in layers:
            net.blocks[i].attn.forward = perturbed(net.blocks[i].attn)
        try:
            yield
        finally:
            for i in layers:
                net.blocks[i].attn.forward = SelfAttnProcessorLiteLA(net.blocks[i].attn)

    return hook


def model_wrapper(model, noise_schedule, model_type="noise", model_kwargs=None, guidance_type="uncond", condition=None,
                  unconditional_condition=None, guidance_scale=1.0, pag_scale=1.0, pag_applied_layers=(),
                  interval_guidance=(0, 1.0), classifier_fn=None, classifier_kwargs=None, *, pag_hook=None):
    """SANA's `model_wrapper` (argument order and defaults as SANA's); `pag_hook` (keyword-only) replaces the
    attention swap for networks other than SANA's (`dpm_kernels.model_wrapper` describes it)."""
    if pag_hook is None and guidance_type in _mw.PAG_TYPES and list(pag_applied_layers or ()):
        pag_hook = sana_pag_hook(model, pag_applied_layers, guidance_scale)
    return _mw.model_wrapper(model, noise_schedule, model_type, model_kwargs, guidance_type, condition,
                             unconditional_condition, guidance_scale, classifier_fn, classifier_kwargs,
                             interval_guidance=interval_guidance, pag_scale=pag_scale,
                             pag_applied_layers=pag_applied_layers, pag_hook=pag_hook,
                             discrete_time_scale=getattr(noise_schedule, "total_N", 1000))


def DPMS(model, condition, uncondition, cfg_scale, pag_scale=1.0, pag_applied_layers=None, model_type="noise",  # noqa: N802
         noise_schedule="linear", guidance_type="classifier-free", model_kwargs=None, diffusion_steps=1000,
         schedule="VP", interval_guidance=None, *, pag_hook=None, backend="auto"):
    """SANA's `DPMS`: a discrete VP schedule from guided-diffusion's named betas (`noise_schedule`,
    `diffusion_steps`) or, with ``schedule="FLOW"``, `NoiseScheduleFlow("discrete_flow")`; SANA's `model_wrapper`;
    a DPM-Solver++ solver. Call ``.sample(z, steps=20, order=2, skip_type="time_uniform_flow", method="multistep",
    flow_shift=3.0)`` on the result."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    betas = named_betas(noise_schedule, diffusion_steps)  # SANA reads the named schedule for both paths
    ns = NoiseScheduleVP("discrete", betas=torch.from_numpy(betas)) if schedule == "VP" else NoiseScheduleFlow(
        "discrete_flow")
    interval = (0, 1.0) if interval_guidance is None else interval_guidance
    fn = model_wrapper(model, ns, model_type, model_kwargs, guidance_type, condition, uncondition, cfg_scale,
                       pag_scale, pag_applied_layers or (), interval, pag_hook=pag_hook)
    return DPM_Solver(fn, ns, algorithm_type="dpmsolver++", backend=backend)
