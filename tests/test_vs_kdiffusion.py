"""Equivalence with k-diffusion's DPM-Solver++ samplers, and the local truncation error of the 3rd-order SDE update.

k-diffusion (0.1.1.post1) integrates in the VE variables of Karras et al.: x_ve = x_vp / alpha, a denoiser
D(x_ve, sigma) = E[x0 | x] and sigmas sigma_ve = sigma_vp / alpha = exp(-lambda), ending at 0. We run our plans
directly in those variables (docs/math.md: the update formulas use only sigma ratios, alpha_t and lambda, so any
(alpha, sigma) pair works): every point is ``Point.from_ve_sigma(sigma) = (alpha, sigma, lambda) = (1, sigma,
-log sigma)``, the state is x_ve itself, the model type is "x_start" (our data prediction x0 = D) and the last
point sigma = 0 is (1, 0, +inf), reached by a first-order step (k-diffusion's "denoising step" x = D(x, sigma)).
This is the simplest exact change of variables: no rescaling of x or of the model output. The VP alternative
(x_vp = alpha x_ve with ``Point.from_vp_of_ve_sigma``) gives the same samples after dividing by alpha, which
`test_vp_points_equal_ve_points` checks once.

The plan's "times" are only labels handed to the model: with a continuous ``NoiseScheduleVP("linear")`` the model
wrapper passes t unchanged, so we use t = sigma and the model receives D's sigma directly. The same holds for our
noise sampler's (t_s, t_t) arguments, so one pre-drawn `NoiseSampler` can serve both sides.

Orders and forms: sample_dpmpp_2m = DPM-Solver++ multistep midpoint, orders [1, 2, ..., 2, 1] (first order at the
start and into sigma = 0); sample_dpmpp_2m_sde = sde-dpmsolver++ with eta, s_noise and solver_type midpoint/heun,
same orders; sample_dpmpp_3m_sde = sde-dpmsolver++ orders [1, 2, 3, ..., 3, 1], its second step in the heun
(taylor) form, multistep3="standard".

Both sides compute in float64 here (k-diffusion computes in the dtype of x and sigmas), so the samples agree to
rounding: RTOL = 1e-10 relative to max(1, |x|) per step (measured ~1e-14; the sigma_max = 14.6 start and ~15 steps
of O(1) coefficients leave lots of room, while any formula difference is >= 1e-4).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpm_kernels import DPMSolver, NoiseScheduleVP, model_wrapper
from dpm_kernels import coefficients as C
from dpm_kernels import planner as P

try:
    from kdiff_import import load_sampling

    K = load_sampling()
except ImportError as exc:  # a required test dependency: fail loudly instead of skipping
    raise ImportError(
        "k-diffusion is a required test dependency of tests/test_vs_kdiffusion.py "
        "(pip install --no-deps k-diffusion==0.1.1.post1, plus scipy, torchdiffeq, torchsde, tqdm)"
    ) from exc

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors
RTOL = 1e-10
SHAPE = (3, 8)
SIGMA_MIN, SIGMA_MAX = 0.0292, 14.6146  # Stable Diffusion's range


class MixtureDenoiser:
    """D(x, sigma) = E[x0 | x0 + sigma z = x] for x0 ~ sum_k w_k N(mu_k, s_k^2 I): exact, smooth, float64."""

    def __init__(self, dim: int, seed: int = 3):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(3, dim, generator=g, dtype=torch.float64)
        self.s2 = torch.tensor([0.3, 0.5, 0.4], dtype=torch.float64) ** 2
        self.logw = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log()
        self.calls: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        self.calls.append(x.clone())
        sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1)  # [B, 1, 1]
        v = self.s2.reshape(1, -1, 1) + sig**2  # [B, K, 1]
        diff = x.double()[:, None, :] - self.mu[None]  # [B, K, D]
        logp = self.logw[None] - 0.5 * x.shape[1] * v[..., 0].log() - 0.5 * (diff**2).sum(-1) / v[..., 0]
        resp = torch.softmax(logp, dim=1)[..., None]
        x0 = self.mu[None] + self.s2.reshape(1, -1, 1) / v * diff
        return (resp * x0).sum(1).to(x.dtype)


class NoiseSampler:
    """Pre-drawn standard normal noise, handed out in call order; records the (sigma, sigma_next) it was asked for."""

    def __init__(self, n: int, seed: int = 11):
        self.noise = torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.calls: list[tuple[float, float]] = []

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        self.calls.append((float(sigma), float(sigma_next)))
        return self.noise[len(self.calls) - 1]


def sigmas_for(kind: str, n: int) -> torch.Tensor:
    if kind == "karras":
        s = K.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX, rho=7.0)
    else:
        s = K.get_sigmas_exponential(n, SIGMA_MIN, SIGMA_MAX)
    assert float(s[-1]) == 0.0
    return s.double()


def x_start(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * sigmas[0]


def run_kdiff(sampler_name: str, sigmas: torch.Tensor, noise: NoiseSampler | None, **kw):
    model = MixtureDenoiser(SHAPE[1])
    states: list[torch.Tensor] = []
    extra = {} if noise is None else {"noise_sampler": noise}
    out = getattr(K, sampler_name)(model, x_start(sigmas), sigmas, callback=lambda d: states.append(d["x"].clone()),
                                   disable=True, **extra, **kw)
    return states + [out]


def kdiff_orders(sampler_name: str, n: int) -> list[int]:
    top = 3 if sampler_name == "sample_dpmpp_3m_sde" else 2
    return [min(top, i + 1) for i in range(n - 1)] + [1]  # first order into sigma = 0


def run_ours(sampler_name: str, sigmas: torch.Tensor, noise: NoiseSampler | None, eta=0.0, s_noise=1.0,
             solver_type="midpoint", vp=False):
    """Our plan for a k-diffusion sampler: VE points (or VP points with x_vp = alpha x_ve when vp=True)."""
    sig = [float(s) for s in sigmas]
    n = len(sig) - 1
    algorithm = "dpmsolver++" if sampler_name == "sample_dpmpp_2m" else "sde-dpmsolver++"
    if sampler_name == "sample_dpmpp_3m_sde":
        solver_type = "heun"  # its order-2 warm-up step is phi_2 * D1: the taylor form
    to_point = C.Point.from_vp_of_ve_sigma if vp else C.Point.from_ve_sigma
    points = [to_point(s) for s in sig]
    ns = NoiseScheduleVP("linear")  # only a container here: continuous, so model time = plan time = sigma
    plan = P.plan_multistep(ns, algorithm, solver_type, sig, kdiff_orders(sampler_name, n), eta=eta,
                            s_noise=s_noise, multistep3="standard", points=points)
    den = MixtureDenoiser(SHAPE[1])
    if vp:
        def model(x_vp, t):  # the same denoiser seen from VP coordinates: x_ve = x_vp * sqrt(1 + sigma^2)
            return den(x_vp * torch.sqrt(1 + t[:, None] ** 2), t)
        scale = [p.alpha for p in points]
    else:
        model, scale = den, [1.0] * len(points)
    solver = DPMSolver(model_wrapper(model, ns, model_type="x_start"), ns, algorithm_type=algorithm, backend="torch")
    _, states = solver.execute(x_start(sigmas) * scale[0], plan, noise_sampler=noise, return_intermediate=True)
    return [x / a for x, a in zip(states, scale, strict=True)]


def assert_close_per_step(ours: list[torch.Tensor], theirs: list[torch.Tensor], tol: float = RTOL) -> None:
    assert len(ours) == len(theirs)
    errs = [float((a - b).abs().max()) / max(1.0, float(b.abs().max())) for a, b in zip(ours, theirs, strict=True)]
    assert max(errs) <= tol, "per-step relative errors: " + " ".join(f"{e:.1e}" for e in errs)


@pytest.mark.parametrize("steps", [6, 15])
@pytest.mark.parametrize("spacing", ["karras", "exponential"])
def test_dpmpp_2m(spacing, steps):
    sigmas = sigmas_for(spacing, steps)
    assert_close_per_step(run_ours("sample_dpmpp_2m", sigmas, None), run_kdiff("sample_dpmpp_2m", sigmas, None))


SDE_CASES = [  # (spacing, eta, s_noise, solver_type)
    ("karras", 1.0, 1.0, "midpoint"), ("karras", 1.0, 1.0, "heun"), ("exponential", 0.5, 1.0, "midpoint"),
    ("karras", 0.5, 0.7, "heun"), ("exponential", 0.0, 1.0, "heun"), ("karras", 1.0, 0.0, "midpoint"),
]


@pytest.mark.parametrize("spacing,eta,s_noise,solver_type", SDE_CASES)
def test_dpmpp_2m_sde(spacing, eta, s_noise, solver_type):
    sigmas = sigmas_for(spacing, 12)
    mine, theirs = NoiseSampler(12), NoiseSampler(12)
    ours = run_ours("sample_dpmpp_2m_sde", sigmas, mine, eta, s_noise, solver_type)
    ref = run_kdiff("sample_dpmpp_2m_sde", sigmas, theirs, eta=eta, s_noise=s_noise, solver_type=solver_type)
    assert_close_per_step(ours, ref)
    if eta and s_noise:  # both drew noise for the same steps (k-diffusion skips only the step into sigma = 0)
        assert mine.calls == theirs.calls and len(mine.calls) == 11


@pytest.mark.parametrize("spacing,eta,s_noise", [("karras", 1.0, 1.0), ("exponential", 0.5, 0.8), ("karras", 0.0, 1.0)])
def test_dpmpp_3m_sde(spacing, eta, s_noise):
    sigmas = sigmas_for(spacing, 14)
    mine, theirs = NoiseSampler(14), NoiseSampler(14)
    ours = run_ours("sample_dpmpp_3m_sde", sigmas, mine, eta, s_noise)
    ref = run_kdiff("sample_dpmpp_3m_sde", sigmas, theirs, eta=eta, s_noise=s_noise)
    assert_close_per_step(ours, ref)
    if eta:
        assert mine.calls == theirs.calls and len(mine.calls) == 13


def test_vp_points_equal_ve_points():
    """The change of variables: a VP plan on x_vp = alpha x_ve gives k-diffusion's x_ve after dividing by alpha."""
    sigmas = sigmas_for("karras", 10)
    ours = run_ours("sample_dpmpp_2m_sde", sigmas, NoiseSampler(10), 0.7, 1.0, "heun", vp=True)
    ref = run_kdiff("sample_dpmpp_2m_sde", sigmas, NoiseSampler(10), eta=0.7, s_noise=1.0, solver_type="heun")
    assert_close_per_step(ours, ref, 1e-9)


DROPIN_CASES = [("sample_dpmpp_2m", {}), ("sample_dpmpp_2m_sde", dict(eta=0.8, s_noise=0.9, solver_type="heun")),
                ("sample_dpmpp_2m_sde", dict(eta=1.0, solver_type="midpoint")), ("sample_dpmpp_3m_sde", dict(eta=0.6))]


@pytest.mark.parametrize("sampler_name,kw", DROPIN_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(DROPIN_CASES)])
def test_dropin_samplers(sampler_name, kw):
    """`dpm_kernels.k_diffusion` (same signatures as k_diffusion.sampling, torch backend) against k-diffusion."""
    from dpm_kernels import k_diffusion as dk

    sigmas = sigmas_for("karras", 10)
    noise = {} if sampler_name == "sample_dpmpp_2m" else {"noise_sampler": NoiseSampler(10)}
    model = MixtureDenoiser(SHAPE[1])
    states: list[torch.Tensor] = []
    out = getattr(dk, sampler_name)(model, x_start(sigmas), sigmas, callback=lambda d: states.append(d["x"].clone()),
                                    disable=True, backend="torch", **noise, **kw)
    noise = {} if sampler_name == "sample_dpmpp_2m" else {"noise_sampler": NoiseSampler(10)}
    assert_close_per_step(states + [out], run_kdiff(sampler_name, sigmas, noise.get("noise_sampler"), **kw))


def test_kdiffusion_loaded_without_torchvision():
    """The helper leaves no stub torchvision (or half-imported k_diffusion) behind for other tests."""
    import sys

    assert not any(m == "torchvision" or m.startswith("torchvision.") for m in sys.modules)
    assert "k_diffusion" not in sys.modules and callable(K.sample_dpmpp_3m_sde)


# ----------------------------------------------------------------------------------------------------------------
# Local truncation error of the third-order SDE update (docs/math.md): eta = 1, noise = 0, and a denoiser whose
# x0 prediction is the quadratic x0(lambda) = c0 + c1 v + c2 v^2 in v = lambda - lambda_s0 (independent of x).
# Treating x0 as that known function of lambda, the deterministic part of the SDE step from s0 to t is exactly
#   x_t = (sigma_t / sigma_s0) e^{-eta h} x + alpha_t (1 + eta) int_0^h e^{-(1 + eta)(h - v)} x0(v) dv,
# which the multistep update approximates from x0 at s0, s1 = s0 - r0 h, s2 = s1 - r1 h. For a quadratic the
# finite differences are exact (D1 = h x0', D2 = h^2 x0''/2), so only the weight on D2 errs: k-diffusion's 3M
# ("standard", -phi3(2h)) leaves alpha_t phi3(2h) D2 = O(h^3); diffusers' (-(phi3(2h) + 1)) leaves O(h^2);
# "third_order" (-2 phi3(2h)) is exact.
R0, R1 = 0.8, 1.3  # non-uniform previous steps
COEF = torch.tensor([[0.7, -1.1, 0.4], [-0.3, 0.9, 1.5]], dtype=torch.float64)  # 2 components x (c0, c1, c2)
HS = [0.2 / 2**k for k in range(5)]


def _x0(v: float) -> torch.Tensor:
    return COEF[:, 0] + COEF[:, 1] * v + COEF[:, 2] * v * v


def _exact_step(x: torch.Tensor, pt: C.Point, ps0: C.Point, eta: float) -> torch.Tensor:
    h = pt.lam - ps0.lam
    k = 1.0 + eta
    nodes, weights = np.polynomial.legendre.leggauss(30)  # exact to rounding for this smooth integrand
    v = 0.5 * h * (nodes + 1.0)
    integral = sum(w * 0.5 * h * math.exp(-k * (h - vi)) * _x0(vi) for vi, w in zip(v, weights, strict=True))
    return pt.sigma / ps0.sigma * math.exp(-eta * h) * x + pt.alpha * k * integral


def _points(h: float, vp: bool):
    lams = [-(R0 + R1) * h, -R0 * h, 0.0, h]  # s2, s1, s0, t with lambda_s0 = 0
    make = C.Point.from_vp_of_ve_sigma if vp else C.Point.from_ve_sigma
    return [make(math.exp(-lam)) for lam in lams]


def _lte(variant: str, h: float, vp: bool = False) -> float:
    s2, s1, s0, t = _points(h, vp)
    x = torch.tensor([0.9, -0.6], dtype=torch.float64)
    upd = C.sde_multistep("sde-dpmsolver++", "dpmsolver", 3, [s0, s1, s2], t, eta=1.0, s_noise=1.0,
                          multistep3=variant)
    ms = [_x0(p.lam - s0.lam) for p in (s0, s1, s2)]
    got = upd.a * x + sum(c * m for c, m in zip(upd.c, ms, strict=True))  # + upd.noise * 0
    return float((got - _exact_step(x, t, s0, 1.0)).abs().max())


def _kdiff_lte(h: float) -> float:
    """The same one-step error of k-diffusion's own sample_dpmpp_3m_sde (its third step, noise zero)."""
    s2, s1, s0, t = _points(h, vp=False)
    sigmas = torch.tensor([p.sigma for p in (s2, s1, s0, t)], dtype=torch.float64)
    states = []

    def model(x, sigma):
        v = -math.log(float(sigma[0])) - s0.lam
        return _x0(v).expand_as(x).clone()

    out = K.sample_dpmpp_3m_sde(model, torch.tensor([[0.3, 0.2]], dtype=torch.float64) * sigmas[0], sigmas,
                                callback=lambda d: states.append(d["x"].clone()), disable=True, eta=1.0,
                                noise_sampler=lambda a, b: torch.zeros(1, 2, dtype=torch.float64))
    x_s0 = states[2][0]
    return float((out[0] - _exact_step(x_s0, t, s0, 1.0)).abs().max())


def _slope(errs: list[float]) -> float:
    return float(np.polyfit(np.log(HS), np.log(errs), 1)[0])


@pytest.mark.parametrize("vp", [False, True])
def test_sde3_local_truncation_error(vp):
    standard = [_lte("standard", h, vp) for h in HS]
    buggy = [_lte("diffusers", h, vp) for h in HS]
    third = [_lte("third_order", h, vp) for h in HS]
    assert 2.85 < _slope(standard) < 3.15, standard
    assert 1.85 < _slope(buggy) < 2.15, buggy
    assert max(third) < 1e-13, third  # exact for a quadratic x0: rounding only
    assert min(standard) > 1e3 * max(third)  # the errors above are truncation, not rounding
    if not vp:  # k-diffusion's own 3M SDE step has the "standard" error, to rounding
        kd = [_kdiff_lte(h) for h in HS]
        np.testing.assert_allclose(kd, standard, rtol=1e-6)
