"""k-diffusion-style samplers on the fused step: same signatures and results as `k_diffusion.sampling`.

    from dpm_kernels.k_diffusion import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde
    x0 = sample_dpmpp_2m(denoiser, x, sigmas)

k-diffusion works with x_ve = x / alpha and a denoiser ``model(x, sigma, **extra_args) -> x0``; in these
variables a VP point is (alpha = 1, sigma = sigma_ve, lambda = -log sigma), so the DPM-Solver++ updates
apply unchanged (`coefficients.Point.from_ve_sigma`). Each step is one fused op: store the denoised
output in a ring buffer, combine, add noise; the trajectory is planned once (`planner.plan_multistep` on VE points)
and its coefficient table uploaded once. The sigmas are read to the host once per call.

Differences from k-diffusion, by design: the default noise sampler of the SDE samplers is i.i.d. Gaussian
noise (k-diffusion defaults to a torchsde Brownian tree; pass ``noise_sampler`` to use any other), and
`sample_dpmpp_3m_sde` takes ``multistep3="third_order"`` for a truly third-order update (the default
"standard" reproduces k-diffusion, whose update has local error O(h^3)).
"""

from __future__ import annotations

import math

import torch

from . import coefficients as C
from . import planner as P
from .ops import bind, default_history_dtype

_plans = P.Cache(64)  # the same sigmas and options again (the next image): planned and uploaded once


def _sigmas(sigmas: torch.Tensor) -> list[float]:
    if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas: expected a 1-D tensor of at least 2 noise levels")
    sig = sigmas.detach().double().cpu().tolist()
    if any(not math.isfinite(s) or s < 0 for s in sig):
        raise ValueError("sigmas: noise levels must be finite and >= 0")
    if any(b > a for a, b in zip(sig, sig[1:], strict=False)):
        raise ValueError("sigmas: must be non-increasing (a repeated sigma is a zero-length step, the identity)")
    return sig


def _run(model, x, sigmas, extra_args, callback, disable, algorithm, solver_type, max_order, eta, s_noise,
         noise_sampler, multistep3="standard", backend="auto"):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x: expected a floating-point tensor")
    extra_args = {} if extra_args is None else extra_args
    sig = _sigmas(sigmas)
    n = len(sig) - 1
    orders = [1 if sig[i + 1] == 0 else min(max_order, i + 1) for i in range(n)]
    plan = _plans.get((tuple(sig), algorithm, solver_type, max_order, eta, s_noise, multistep3),
                      lambda: P.plan_multistep(None, algorithm, solver_type, sig, orders, eta, s_noise, multistep3,
                                               points=C.Point.from_ve_sigma(sig)))
    rows = plan.device_table(P.IDENTITY_X0, x.device, what="sigmas").rows
    step = bind(backend, x.device)
    if noise_sampler is None:
        noise_sampler = lambda sigma, sigma_next: torch.randn_like(x)  # noqa: E731
    slots = torch.empty((plan.n_slots,) + tuple(x.shape), dtype=default_history_dtype(x.dtype),
                        device=x.device).unbind(0)
    # k-diffusion's `sigmas[i] * s_in` for every i at once: the 0-d sigma takes s_in's (x's) dtype and device
    sigma_in = sigmas.to(device=x.device, dtype=x.dtype)[:, None].expand(len(sig), x.shape[0]).contiguous().unbind(0)
    cur = x.clone(memory_format=torch.contiguous_format)
    spare = torch.empty_like(cur) if callback is not None else None
    from tqdm.auto import trange

    for i in trange(n, disable=disable):
        denoised = model(cur, sigma_in[i], **extra_args)
        if callback is not None:
            callback({"x": cur, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        ev = plan.evals[i]
        z = noise_sampler(sigmas[i], sigmas[i + 1]).to(cur.dtype) if ev.noisy else None
        # a callback may keep `x`: then write into a second buffer instead of in place
        out = cur if spare is None else spare
        h = [slots[s] for s in ev.read_slots] + [None, None]
        if not isinstance(denoised, torch.Tensor) or not denoised.is_floating_point():
            raise TypeError(f"model: must return a floating-point tensor (the denoised x0), got "
                            f"{denoised.dtype if isinstance(denoised, torch.Tensor) else type(denoised).__name__}")
        if denoised.dtype != cur.dtype:
            denoised = denoised.to(cur.dtype)
        step(cur, denoised, rows[i], out, None if ev.write_slot is None else slots[ev.write_slot], h[0], h[1], None, z)
        if spare is not None:
            cur, spare = out, torch.empty_like(cur)
    return cur


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, *, backend="auto"):
    """DPM-Solver++(2M) (k-diffusion's signature): model(x, sigma, **extra_args) -> denoised."""
    return _run(model, x, sigmas, extra_args, callback, disable, "dpmsolver++", "dpmsolver", 2, 0.0, 1.0, None,
                backend=backend)


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, solver_type="midpoint", *, backend="auto"):
    """DPM-Solver++(2M) SDE (k-diffusion's signature); solver_type "midpoint" or "heun"."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError("solver_type: must be 'heun' or 'midpoint'")
    return _run(model, x, sigmas, extra_args, callback, disable, "sde-dpmsolver++", solver_type, 2, eta, s_noise,
                noise_sampler, backend=backend)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, *, multistep3="standard", backend="auto"):
    """DPM-Solver++(3M) SDE (k-diffusion's signature). multistep3: "standard" | "third_order"."""
    # k-diffusion's second step (before three outputs exist) uses the phi_2 (taylor) form
    return _run(model, x, sigmas, extra_args, callback, disable, "sde-dpmsolver++", "taylor", 3, eta, s_noise,
                noise_sampler, multistep3, backend=backend)
