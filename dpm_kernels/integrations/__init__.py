"""Integrations with other libraries' sampling APIs. Each submodule imports its library on import.

- `dpm_kernels.integrations.diffusers`: `FusedDPMSolverMultistepScheduler`, `FusedDPMSolverSinglestepScheduler`,
  drop-in subclasses of diffusers' DPM-Solver schedulers whose `step()` is one fused op call.
"""
