"""The fused drop-ins of diffusers' VE (EDM-preconditioned) DPM-Solver schedulers: EDM and cosine (Stable Audio).

Both sample x = x0 + sigma eps (alpha = 1, lambda = -log sigma) with a network preconditioned as in Karras et al.
2022: x0 = c_skip(sigma) x + c_out(sigma) F (conversion "edm_noise" / "edm_v" with the config's sigma_data).
The input preconditioning is `scale_model_input`, diffusers' own. `_compatibles` names the parent so that
`from_config` round trips (diffusers' own lists are empty for these two).
"""

from __future__ import annotations

import torch
from diffusers import CosineDPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor

from ... import coefficients as C
from ... import planner as P
from ._common import StepWithGenerator


def brownian_tree():
    """diffusers' Brownian tree sampler class (imported when first needed: it needs torchsde)."""
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    return BrownianTreeNoiseSampler


_EDM_TYPES = {"epsilon": "edm_noise", "v_prediction": "edm_v"}
_VE_GRID_KEYS = frozenset({"sigma_min", "sigma_max", "sigma_schedule", "num_train_timesteps", "rho",
                           "final_sigmas_type"})
_VE_STEP_KEYS = frozenset({"sigma_data", "solver_order", "prediction_type", "solver_type", "lower_order_final",
                           "euler_at_final", "final_sigmas_type", "thresholding", "dynamic_thresholding_ratio",
                           "sample_max_value", "algorithm_type"})


class _VEStep(StepWithGenerator):
    GRID_KEYS = _VE_GRID_KEYS
    STEP_KEYS = _VE_STEP_KEYS
    PREDICTION_TYPES = tuple(_EDM_TYPES)
    ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")

    def _points(self, sigmas) -> C.Point:
        return C.Point.from_ve_sigma(sigmas)

    def _conversion(self) -> P.Conversion:
        cfg = self.config
        return P.Conversion(_EDM_TYPES[cfg.prediction_type], "x0", self._threshold() is not None,
                            sigma_data=float(cfg.sigma_data))

    def _orders(self, start: int, n: int) -> list[int]:
        return self._multistep_orders(start, n, self.config.final_sigmas_type == "zero")

    def _plan_steps(self, points: C.Point, orders: list[int]) -> P.Plan:
        # third-order SDE steps: k-diffusion's form (diffusers has no third-order SDE update in these classes)
        return self._plan_multistep(points, orders, "standard", self._algorithm())

    def _draws_noise(self) -> bool:
        return self._algorithm().startswith("sde")

    def _advanced(self, ev: P.Eval, sample: torch.Tensor) -> None:
        self._count_lower_order()


class FusedEDMDPMSolverMultistepScheduler(_VEStep, EDMDPMSolverMultistepScheduler):
    """`EDMDPMSolverMultistepScheduler` with a fused `step()`: same config and results.

    Beyond diffusers: `sde-dpmsolver++` at third order (diffusers: UnboundLocalError) runs k-diffusion's third-order
    SDE update; the sigma_min end (a last step of h ~ -2e-7) is the identity.
    Attributes: ``fused_backend`` (a `backends.registry.CHOICES` name), ``fused_reason`` (read-only).
    """

    _compatibles = ["EDMDPMSolverMultistepScheduler"]

    def _noise(self, model_output, sample, generator, variance_noise, ev: P.Eval) -> torch.Tensor | None:
        return randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                            dtype=model_output.dtype)


class FusedCosineDPMSolverMultistepScheduler(_VEStep, CosineDPMSolverMultistepScheduler):
    """`CosineDPMSolverMultistepScheduler` (Stable Audio) with a fused `step()`: always SDE-DPM-Solver++ (eta = 1),
    its noise from diffusers' Brownian tree -- seeded from ``generator.initial_seed()`` at the first step after
    set_timesteps, queried at (sigmas[i], sigmas[i + 1]) every step, as diffusers does -- and passed to the kernel.

    Beyond diffusers: `solver_order=3` (diffusers: UnboundLocalError at the third step) runs k-diffusion's
    third-order SDE update.
    Attributes: ``fused_backend`` (a `backends.registry.CHOICES` name), ``fused_reason`` (read-only).
    """

    _compatibles = ["CosineDPMSolverMultistepScheduler"]

    def _algorithm(self) -> str:
        return "sde-dpmsolver++"

    def _threshold(self):
        return None  # the cosine scheduler has no thresholding

    def _noise(self, model_output, sample, generator, variance_noise, ev: P.Eval) -> torch.Tensor | None:
        if self.noise_sampler is None:
            seed = None
            if isinstance(generator, list):
                seed = [g.initial_seed() for g in generator]
            elif generator is not None:
                seed = generator.initial_seed()
            # the tree's shape, dtype and device are those of diffusers' converted output: the sample's, promoted
            like = torch.zeros(model_output.shape, dtype=self._working_dtype(sample, model_output),
                               device=model_output.device)
            self.noise_sampler = brownian_tree()(like, sigma_min=self.config.sigma_min,
                                                 sigma_max=self.config.sigma_max, seed=seed)
        if not ev.noisy:  # a zero-length step (the sigma_min end): nothing to query
            return None
        i = self.step_index
        return self.noise_sampler(self.sigmas[i], self.sigmas[i + 1]).to(model_output.device)
