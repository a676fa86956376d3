"""ldm / Stable Diffusion 2's DPM-Solver sampler (Stability-AI/stablediffusion
`ldm/models/diffusion/dpm_solver/sampler.py`, built on an older copy of the authors' code; the authors'
examples/stable-diffusion has a variant of it): `DPMSolverSampler` with the same arguments and results, fused.
Replace

    from ldm.models.diffusion.dpm_solver import DPMSolverSampler

by an import from this module. The sampler's rules: the schedule is the model's `alphas_cumprod` (in float32, not
clipped), the network is ``model.apply_model(x, t, c)`` with t = (t_continuous - 1/N) * 1000, its output type is
the model's `parameterization` ("eps" or "v"), conditions may be tensors or dicts of tensors and lists, and the
solver is multistep DPM-Solver++(2) on a time-uniform grid that lowers its final orders below 15 steps.
"""

from __future__ import annotations

import warnings

import torch

from ..model_wrapper import model_wrapper
from ..schedule import NoiseScheduleVP
from ..solver import DPMSolver

MODEL_TYPES = {"eps": "noise", "v": "v"}
SD2_DEVICE = torch.device("cuda")  # SD2's default for the sampler's `device`
LOWER_ORDER_FINAL_BELOW = 15  # SD2's copy of the authors' code (the authors' later code: 10)

# SD2's sample() accepts these (the DDIM sampler's arguments) and does nothing with them
_IGNORED = {"callback": None, "normals_sequence": None, "img_callback": None, "quantize_x0": False, "eta": 0.0,
            "mask": None, "x0": None, "temperature": 1.0, "noise_dropout": 0.0, "score_corrector": None,
            "corrector_kwargs": None}


def _batch(conditioning):
    c = conditioning
    if isinstance(c, dict):
        c = c[next(iter(c))]
    while isinstance(c, (list, tuple)) and c:
        c = c[0]
    return c.shape[0] if isinstance(c, torch.Tensor) else None


class DPMSolverSampler:
    """DPM-Solver++ for an ldm `LatentDiffusion` model (anything with `apply_model(x, t, c)`, `alphas_cumprod`,
    `betas` and `parameterization`).

    Args:
        model: the LatentDiffusion model.
        device: kept for SD2's signature (SD2 moves `alphas_cumprod` there; here it stays on the model's device).
    """

    def __init__(self, model, device=SD2_DEVICE, **kwargs):
        self.model = model
        self.device = device
        self.alphas_cumprod = model.alphas_cumprod.detach().clone().to(torch.float32)
        self.noise_schedule = NoiseScheduleVP("discrete", alphas_cumprod=self.alphas_cumprod, clipped_lambda=None)

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None, img_callback=None,
               quantize_x0=False, eta=0.0, mask=None, x0=None, temperature=1.0, noise_dropout=0.0,
               score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None, log_every_t=100,
               unconditional_guidance_scale=1.0, unconditional_conditioning=None, *, skip_type="time_uniform",
               method="multistep", order=2, lower_order_final=True, correcting_xt_fn=None, t_start=None, t_end=None,
               lower_order_final_threshold=LOWER_ORDER_FINAL_BELOW, backend="auto", **kwargs):
        """`S` steps of DPM-Solver++ from x_T (default: standard normal noise [batch_size, *shape]) with
        classifier-free guidance; returns ``(samples, None)`` as SD2's sampler. The keyword-only solver options
        (`skip_type` ... `t_end`) are those of the authors' example sampler; `lower_order_final_threshold`: 15 is
        SD2's rule, 10 the authors' example's."""
        given = {"callback": callback, "normals_sequence": normals_sequence, "img_callback": img_callback,
                 "quantize_x0": quantize_x0, "eta": eta, "mask": mask, "x0": x0, "temperature": temperature,
                 "noise_dropout": noise_dropout, "score_corrector": score_corrector,
                 "corrector_kwargs": corrector_kwargs}
        ignored = [k for k, v in given.items() if not (v is _IGNORED[k] or v == _IGNORED[k])]
        if ignored:
            warnings.warn(f"DPMSolverSampler.sample: {', '.join(ignored)} have no effect (as in SD2's sampler)",
                          stacklevel=2)
        param = getattr(self.model, "parameterization", None)
        if param not in MODEL_TYPES:
            raise ValueError(f"model.parameterization: expected one of {tuple(MODEL_TYPES)}, got {param!r}")
        if conditioning is not None and _batch(conditioning) not in (None, batch_size):
            warnings.warn(f"Got {_batch(conditioning)} conditionings but batch-size is {batch_size}", stacklevel=2)
        device = self.model.betas.device
        img = torch.randn((batch_size, *shape), device=device) if x_T is None else x_T
        model_fn = model_wrapper(lambda x, t, c: self.model.apply_model(x, t, c), self.noise_schedule,
                                 model_type=MODEL_TYPES[param], guidance_type="classifier-free",
                                 condition=conditioning, unconditional_condition=unconditional_conditioning,
                                 guidance_scale=unconditional_guidance_scale)
        solver = DPMSolver(model_fn, self.noise_schedule, algorithm_type="dpmsolver++",
                           correcting_xt_fn=correcting_xt_fn, backend=backend)
        x = solver.sample(img, steps=S, t_start=t_start, t_end=t_end, order=order, skip_type=skip_type, method=method,
                          lower_order_final=lower_order_final,
                          lower_order_final_threshold=lower_order_final_threshold)
        return x.to(device), None
