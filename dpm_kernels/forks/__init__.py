"""The authors' API where its forks are used: one module per fork, each with the fork's names, arguments, defaults
and results, every step fused.

- `dpm_kernels.forks.sana`: SANA (NVlabs/Sana; Sana-Video, PixelDiT): `NoiseScheduleVP`, `NoiseScheduleFlow`,
  `model_wrapper`, `DPM_Solver`, `DPMS` (flow matching, interval guidance, PAG, `time_uniform_flow`, progress).
- `dpm_kernels.forks.pixart`: PixArt-α / PixArt-Σ (and Open-Sora's PixArt configs, ComfyUI's PixArt nodes):
  `NoiseScheduleVP`, `model_wrapper`, `DPM_Solver`, `DPMS`.
- `dpm_kernels.forks.ldm`: ldm / Stable Diffusion 2: `DPMSolverSampler`.

`DPMS` here takes both forks' arguments (SANA's signature, a superset of PixArt's) and the fork whose rules apply
(``fork="sana"`` or ``"pixart"``: they differ in whether the first step at t = 1 is guided and, for clipped
schedules, in the time fed to the network).
"""

from __future__ import annotations

from . import ldm, pixart, sana
from ._base import BETA_SCHEDULES, ForkDPMSolver, named_betas
from .ldm import DPMSolverSampler

FORKS = ("sana", "pixart")

__all__ = ["BETA_SCHEDULES", "DPMS", "DPMSolverSampler", "FORKS", "ForkDPMSolver", "ldm", "named_betas", "pixart",
           "sana"]


def DPMS(model, condition, uncondition, cfg_scale, pag_scale=1.0, pag_applied_layers=None, model_type="noise",  # noqa: N802
         noise_schedule="linear", guidance_type="classifier-free", model_kwargs=None, diffusion_steps=1000,
         schedule="VP", interval_guidance=None, *, fork="sana", pag_hook=None, backend="auto"):
    """The forks' `DPMS(model, condition, uncondition, cfg_scale, ...)`: returns a DPM-Solver++ solver for the
    network; call its ``sample(z, steps=20, order=2, skip_type=..., method="multistep")``.

    Arguments as SANA's `DPMS` (PixArt's are the same without pag_scale, pag_applied_layers, schedule and
    interval_guidance; pass those by keyword). fork: "sana" (`forks.sana.DPMS`) or "pixart" (`forks.pixart.DPMS`,
    which refuses SANA's own arguments with a ValueError naming them).
    """
    if fork == "sana":
        return sana.DPMS(model, condition, uncondition, cfg_scale, pag_scale, pag_applied_layers, model_type,
                         noise_schedule, guidance_type, model_kwargs, diffusion_steps, schedule, interval_guidance,
                         pag_hook=pag_hook, backend=backend)
    if fork != "pixart":
        raise ValueError(f"fork: expected one of {FORKS}, got {fork!r}")
    sana_only = {"pag_scale": pag_scale != 1.0, "pag_applied_layers": bool(pag_applied_layers),
                 "schedule": schedule != "VP", "interval_guidance": interval_guidance is not None,
                 "pag_hook": pag_hook is not None}
    bad = [k for k, v in sana_only.items() if v]
    if bad:
        raise ValueError(f"{bad[0]}: PixArt's DPMS has no {', '.join(bad)}; use fork='sana'")
    return pixart.DPMS(model, condition, uncondition, cfg_scale, model_type, noise_schedule, guidance_type,
                       model_kwargs, diffusion_steps, backend=backend)
