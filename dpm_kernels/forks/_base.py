"""What the forks of the authors' `dpm_solver_pytorch.py` share: their solver's lower-order-final rule and the
guided-diffusion beta schedules their `DPMS` helpers are built on."""

from __future__ import annotations

import math

import numpy as np

from ..solver import DPMSolver

BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")


class ForkDPMSolver(DPMSolver):
    """`DPMSolver` with the forks' multistep rule: with lower_order_final the last steps lower their order at any
    number of steps (SANA and PixArt; the authors only below 10 steps). Everything else is `DPMSolver`."""

    lower_order_final_threshold = math.inf


def named_betas(name: str, steps: int) -> np.ndarray:
    """guided-diffusion's named beta schedules (float64), as the forks' `DPMS` reads them:

    - "linear": DDPM's betas from 1e-4 to 0.02, both scaled by 1000 / steps (evenly spaced);
    - "squaredcos_cap_v2": the betas whose cumulative product of (1 - beta) follows
      alpha_bar(t) = cos^2(pi/2 (t + 0.008) / 1.008) at t = i / steps, each beta capped at 0.999.
    """
    if name not in BETA_SCHEDULES:
        raise ValueError(f"noise_schedule: expected one of {BETA_SCHEDULES}, got {name!r}")
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 2):
        raise ValueError(f"diffusion_steps: expected an integer >= 2, got {steps!r}")
    if name == "linear":
        scale = 1000.0 / steps
        return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
    t = np.arange(steps + 1, dtype=np.float64) / steps
    alpha_bar = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
