"""The analytic test model of docs/math.md: a Gaussian mixture with an exact noise prediction.

For data ``sum_k w_k N(mu_k, s_k^2 I)`` under any Gaussian path (VP or flow),
``q_t = sum_k w_k N(alpha_t mu_k, v_k I)`` with ``v_k = alpha_t^2 s_k^2 + sigma_t^2`` and the exact
``eps(x, t) = -sigma_t grad log q_t(x)``. For a single component the probability-flow ODE has the closed-form
solution `exact_ode_solution`.
"""

from __future__ import annotations

import math

import torch

from .schedule import NoiseSchedule, NoiseScheduleVP


class GaussianMixtureModel:
    """A network stand-in ``model(x, t_input) -> eps`` (exact), usable with `model_wrapper`.

    Args:
        means: [K, D] component means; stds: [K] isotropic standard deviations; weights: [K] (normalised).
        noise_schedule: the schedule whose model input time convention ``t_input`` is decoded.
        model_type: what the callable returns: "noise" (eps), "x_start" (E[x0|x_t]), "v", "score", or "flow" (the
            flow-matching velocity eps - x0, with a NoiseScheduleFlow).
        discrete_time_scale: a discrete schedule's network time is (t - 1/N) * this (the authors' 1000; SANA's
            fork uses N); a "discrete_flow" schedule's is t * N.
    Inputs x are [B, D] (or [B, ...] flattened to D); computed in float64, returned in x's dtype.
    """

    def __init__(self, means, stds, weights=None, noise_schedule: NoiseSchedule | None = None,
                 model_type: str = "noise", discrete_time_scale: float = 1000.0):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.dim() != 2:
            raise ValueError("means: expected [K, D]")
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(k)
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()
        self.ns = noise_schedule or NoiseScheduleVP("linear")
        self.model_type = model_type
        self.discrete_time_scale = float(discrete_time_scale)
        self.calls = 0

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def continuous_time(self, t_input: torch.Tensor) -> torch.Tensor:
        if self.ns.schedule == "discrete":
            return t_input / self.discrete_time_scale + 1.0 / self.ns.total_N
        if self.ns.schedule == "discrete_flow":
            return t_input / self.ns.total_N
        return t_input

    def _predictions(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(eps, x0, alpha, sigma) in float64 on the CPU, [B, D] / [B, 1]: the exact noise prediction and the exact
        posterior mean of x0 (also at alpha = 0, where x0 cannot be recovered from eps)."""
        xb = x.reshape(x.shape[0], -1).double().cpu()
        t = torch.as_tensor(t, dtype=torch.float64).cpu().reshape(-1).expand(x.shape[0])
        a, s = self.ns.alpha_sigma64(t.numpy())
        alpha, sigma = torch.as_tensor(a)[:, None], torch.as_tensor(s)[:, None]
        var = alpha**2 * self.stds[None, :] ** 2 + sigma**2  # [B, K]
        diff = xb[:, None, :] - alpha[:, :, None] * self.means[None]  # [B, K, D]
        d = xb.shape[1]
        logp = (self.weights.log()[None] - 0.5 * d * torch.log(2 * math.pi * var)
                - 0.5 * (diff**2).sum(-1) / var)
        resp = torch.softmax(logp, dim=1)[:, :, None]  # [B, K, 1]
        eps = sigma * (resp * diff / var[:, :, None]).sum(1)  # -sigma * score
        x0 = (resp * (self.means[None] + alpha[:, :, None] * self.stds[None, :, None] ** 2 * diff
                      / var[:, :, None])).sum(1)
        return eps, x0, alpha, sigma

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Exact noise prediction at continuous time t ([B] or scalar)."""
        return self._predictions(x, t)[0].reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def __call__(self, x: torch.Tensor, t_input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.calls += 1
        t = self.continuous_time(torch.as_tensor(t_input).double().cpu())
        eps, x0, alpha, sigma = self._predictions(x, t)
        out = {"noise": lambda: eps, "x_start": lambda: x0, "v": lambda: alpha * eps - sigma * x0,
               "score": lambda: -eps / sigma, "flow": lambda: eps - x0}.get(self.model_type)
        if out is None:
            raise ValueError(f"model_type: unknown {self.model_type!r}")
        return out().reshape(x.shape).to(device=x.device, dtype=x.dtype)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact samples of the data distribution, float64 [n, D]."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[comp] + self.stds[comp][:, None] * z


def exact_ode_solution(x_T: torch.Tensor, mean, std: float, ns: NoiseSchedule, t_T: float, t: float) -> torch.Tensor:
    """Closed-form probability-flow ODE solution from (x_T, t_T) to t for one Gaussian N(mean, std^2 I), on any
    Gaussian path (VP or flow)."""
    mean = torch.as_tensor(mean, dtype=torch.float64)
    (a_T, s_T), (a_t, s_t) = (tuple(float(v) for v in ns.alpha_sigma64(u)) for u in (t_T, t))
    scale = math.sqrt(a_t**2 * std**2 + s_t**2) / math.sqrt(a_T**2 * std**2 + s_T**2)
    xT = x_T.double().reshape(x_T.shape[0], -1)
    return (a_t * mean + scale * (xT - a_T * mean)).reshape(x_T.shape)
