"""Gradients through the front ends on the op: `multistep_update` with its `History`, the diffusers drop-ins, the
authors' per-update methods of `DPMSolver`; and the samplers that stay no-grad (`DPMSolver.sample`, the
k-diffusion samplers), as their originals are.

References: a plain-torch DPM-Solver++ loop written here from the formulas (docs/math.md) on the closed-form
linear VP schedule, and diffusers' own schedulers (differentiable PyTorch code) on the same model.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import backends_for

import dpm_kernels as dk

BACKENDS = backends_for("cpu")
F64 = torch.float64
SHAPE = (2, 3, 4, 4)
TIMES = [1.0, 0.62, 0.3, 0.05]  # a 3-step trajectory


def linear_vp(t: float) -> tuple[float, float, float]:
    """(alpha, sigma, lambda) of the continuous linear VP schedule (beta_0 = 0.1, beta_1 = 20), closed form."""
    log_alpha = -0.25 * t * t * (20.0 - 0.1) - 0.5 * t * 0.1
    alpha = math.exp(log_alpha)
    sigma = math.sqrt(-math.expm1(2.0 * log_alpha))
    return alpha, sigma, log_alpha - math.log(sigma)


def plain_multistep(x, model, order, thr=None, guidance=None, noises=None):
    """DPM-Solver++ (midpoint) multistep over TIMES in plain torch: warm-up orders 1, 2, 3; with noises the
    SDE-DPM-Solver++ (eta = 1) update. model(x, t) -> eps (or cat([uncond, cond]) with guidance)."""
    ms, lams = [], []
    for i in range(len(TIMES) - 1):
        t, tn = TIMES[i], TIMES[i + 1]
        a_s, s_s, l_s = linear_vp(t)
        a_t, s_t, l_t = linear_vp(tn)
        eps = model(x, t)
        if guidance is not None:
            u, c = eps.chunk(2)
            eps = u + guidance * (c - u)
        x0 = (x - s_s * eps) / a_s
        if thr is not None:
            ratio, lo, hi = thr
            s = torch.quantile(x0.abs().reshape(x0.shape[0], -1), ratio, dim=1).clamp(lo, hi)
            s = s.reshape((-1,) + (1,) * (x0.dim() - 1))
            x0 = torch.clamp(x0, -s, s) / s
        ms.insert(0, x0)
        lams.insert(0, l_s)
        h = l_t - l_s
        k = min(order, i + 1)
        if noises is None:
            phi1 = math.expm1(-h)
            x_new = (s_t / s_s) * x - a_t * phi1 * ms[0]
            if k == 2:
                r0 = (lams[0] - lams[1]) / h
                x_new = x_new - 0.5 * a_t * phi1 * (ms[0] - ms[1]) / r0
            elif k == 3:
                r0, r1 = (lams[0] - lams[1]) / h, (lams[1] - lams[2]) / h
                d10, d11 = (ms[0] - ms[1]) / r0, (ms[1] - ms[2]) / r1
                d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
                d2 = (d10 - d11) / (r0 + r1)
                phi2 = phi1 / h + 1.0
                phi3 = phi2 / h - 0.5
                x_new = x_new + a_t * phi2 * d1 - a_t * phi3 * d2
        else:  # SDE, eta = 1, order <= 2
            e = math.exp(-h)
            x_new = (s_t / s_s) * e * x + a_t * (1 - e * e) * ms[0]
            if k >= 2:
                r0 = (lams[0] - lams[1]) / h
                x_new = x_new + 0.5 * a_t * (1 - e * e) * (ms[0] - ms[1]) / r0
            x_new = x_new + s_t * math.sqrt(1 - e * e) * noises[i]
        x = x_new
    return x


def fused_multistep(x, model, order, backend, thr=None, guidance=None, noises=None):
    ns = dk.NoiseScheduleVP("linear")
    hist = dk.History(x, order=3)
    for i in range(len(TIMES) - 1):
        x = dk.multistep_update(x, model(x, TIMES[i]), hist, t=TIMES[i], t_next=TIMES[i + 1], noise_schedule=ns,
                                order=order, thresholding=thr, backend=backend,
                                cfg="stacked" if guidance is not None else "none", guidance_scale=guidance or 1.0,
                                algorithm_type="sde-dpmsolver++" if noises is not None else "dpmsolver++",
                                noise=None if noises is None else noises[i])
    return x


def make_model(theta):
    """A differentiable toy network: eps = theta * tanh(0.7 x) + 0.1 t x (theta: a learnable [C] scale)."""
    def model(x, t):
        return theta.reshape(1, -1, 1, 1) * torch.tanh(0.7 * x) + 0.1 * t * x
    return model


def stacked(model):
    def m(x, t):
        e = model(x, t)
        return torch.cat([e, 0.5 * e + 0.2 * x])
    return m


MULTISTEP = {  # name: (order, thresholding, guidance, noise)
    "order3": (3, None, None, False),
    "order2-threshold-cfg": (2, (0.9, 0.5, 3.0), 4.0, False),
    "sde-order2-noise": (2, None, None, True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MULTISTEP))
def test_multistep_update_gradients_equal_the_plain_loop(backend, name, one_thread):
    order, thr, guidance, noisy = MULTISTEP[name]
    gen = torch.Generator().manual_seed(1)
    x_T = torch.randn(SHAPE, generator=gen, dtype=F64)
    theta0 = torch.tensor([0.8, 1.1, 1.4], dtype=F64)
    noises0 = [torch.randn(SHAPE, generator=gen, dtype=F64) for _ in range(3)] if noisy else None
    target = torch.randn(SHAPE, generator=gen, dtype=F64)

    def grads(run):
        x, theta = x_T.clone().requires_grad_(True), theta0.clone().requires_grad_(True)
        noises = None if noises0 is None else [z.clone().requires_grad_(True) for z in noises0]
        model = make_model(theta) if guidance is None else stacked(make_model(theta))
        out = run(x, model, noises)
        leaves = [x, theta] + (noises or [])
        return [out.detach()] + list(torch.autograd.grad((out * target).sum(), leaves))

    got = grads(lambda x, m, z: fused_multistep(x, m, order, backend, thr, guidance, z))
    want = grads(lambda x, m, z: plain_multistep(x, m, order, thr, guidance, z))
    for g, w, what in zip(got, want, ["x_final", "d/dx_T", "d/dtheta", "d/dz1", "d/dz2", "d/dz3"], strict=False):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda s, what=what: f"{what}: {s}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_multistep_update_same_values_with_and_without_autograd(backend):
    """The autograd path gives the fused path's bits (the same kernel), and the history's buffer holds the same
    values either way; a step under no_grad in the middle keeps the rest consistent."""
    gen = torch.Generator().manual_seed(2)
    x_T = torch.randn(SHAPE, generator=gen)
    theta = torch.tensor([0.8, 1.1, 1.4], requires_grad=True)
    model = make_model(theta)
    ns = dk.NoiseScheduleVP("linear")

    def run(grad_steps):
        x, hist = x_T.clone(), dk.History(x_T, order=3)
        for i in range(3):
            with torch.set_grad_enabled(i in grad_steps):
                x = dk.multistep_update(x, model(x, TIMES[i]), hist, t=TIMES[i], t_next=TIMES[i + 1],
                                        noise_schedule=ns, order=3, backend=backend)
        return x, hist.buffer.clone()

    plain_x, plain_buf = run(())
    for grad_steps in ((0, 1, 2), (0, 2), (1,)):
        x, buf = run(grad_steps)
        assert x.requires_grad == (2 in grad_steps)
        assert torch.equal(x.detach(), plain_x) and torch.equal(buf, plain_buf), grad_steps


@pytest.mark.parametrize("backend", BACKENDS)
def test_multistep_update_refuses_to_overwrite_a_leaf(backend):
    x = torch.randn(SHAPE, requires_grad=True)
    hist = dk.History(x, order=2)
    with pytest.raises(ValueError, match="^out: a leaf tensor that requires grad"):
        dk.multistep_update(x, torch.tanh(x), hist, t=1.0, t_next=0.5, noise_schedule=dk.NoiseScheduleVP("linear"),
                            out=x, backend=backend)
    assert hist.count == 0


# ---- diffusers' drop-ins against diffusers' own schedulers ----
def _diffusers_pairs():
    from diffusers import (
        DPMSolverMultistepScheduler,
        DPMSolverSinglestepScheduler,
        EDMDPMSolverMultistepScheduler,
        KDPM2DiscreteScheduler,
        UniPCMultistepScheduler,
    )

    from dpm_kernels.integrations import diffusers as fz

    return {
        "multistep-order3": (DPMSolverMultistepScheduler, fz.FusedDPMSolverMultistepScheduler,
                             dict(solver_order=3)),
        # s = clamp(q, 1, sample_max_value): the quantile itself (q < 50 at these steps), or the bound 1.5
        "multistep-threshold": (DPMSolverMultistepScheduler, fz.FusedDPMSolverMultistepScheduler,
                                dict(solver_order=2, thresholding=True, sample_max_value=50.0,
                                     dynamic_thresholding_ratio=0.9)),
        "multistep-threshold-bound": (DPMSolverMultistepScheduler, fz.FusedDPMSolverMultistepScheduler,
                                      dict(solver_order=2, thresholding=True, sample_max_value=1.5,
                                           dynamic_thresholding_ratio=0.9)),
        "multistep-sde": (DPMSolverMultistepScheduler, fz.FusedDPMSolverMultistepScheduler,
                          dict(solver_order=2, algorithm_type="sde-dpmsolver++")),
        "singlestep-order3": (DPMSolverSinglestepScheduler, fz.FusedDPMSolverSinglestepScheduler,
                              dict(solver_order=3)),
        "unipc": (UniPCMultistepScheduler, fz.FusedUniPCMultistepScheduler, dict(solver_order=2)),
        "edm-v": (EDMDPMSolverMultistepScheduler, fz.FusedEDMDPMSolverMultistepScheduler,
                  dict(prediction_type="v_prediction")),
        "kdpm2": (KDPM2DiscreteScheduler, fz.FusedKDPM2DiscreteScheduler, {}),
    }


PAIR_NAMES = ["multistep-order3", "multistep-threshold", "multistep-threshold-bound", "multistep-sde",
              "singlestep-order3", "unipc", "edm-v", "kdpm2"]


def _scheduler_grads(cls, cfg, steps, backend=None):
    """(final sample, x0 predictions' sum, d loss / d x_T, d loss / d theta) of a loop over the grid, float64 sigmas."""
    s = cls(**cfg)
    if backend is not None:
        s.fused_backend = backend
    s.set_timesteps(steps)
    s.sigmas = s.sigmas.double()
    gen = torch.Generator().manual_seed(5)
    x_T = (torch.randn(SHAPE, generator=gen, dtype=F64) * float(s.init_noise_sigma)).requires_grad_(True)
    theta = torch.tensor([0.8, 1.1, 1.4], dtype=F64, requires_grad=True)
    g = torch.Generator().manual_seed(3)
    x, preds = x_T, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in s.timesteps:
            xin = s.scale_model_input(x, t)
            mo = theta.reshape(1, -1, 1, 1) * torch.tanh(0.7 * xin + 0.001 * float(t))
            kw = {"generator": g} if "generator" in s.step.__code__.co_varnames else {}
            out = s.step(mo, t, x, **kw)
            x = out.prev_sample
            if getattr(out, "pred_original_sample", None) is not None:
                preds = preds + out.pred_original_sample.sum()
    target = torch.linspace(-1, 1, x.numel(), dtype=F64).reshape(x.shape)
    loss = (x * target).sum() + 0.1 * preds
    return [x.detach(), torch.as_tensor(preds).detach(), *torch.autograd.grad(loss, [x_T, theta])], s


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", PAIR_NAMES)
def test_diffusers_drop_in_gradients_equal_diffusers(backend, name, one_thread):
    ref_cls, cls, cfg = _diffusers_pairs()[name]
    steps = 3 if name != "kdpm2" else 2  # KDPM2: two calls an interval
    want, _ = _scheduler_grads(ref_cls, cfg, steps)
    got, s = _scheduler_grads(cls, cfg, steps, backend)
    assert s.fused_reason is None and s._fz_traj is not None and s._fz_traj.calls == len(s.timesteps)
    # diffusers' multistep scheduler rounds the sample to float32 every step and thresholds in float32 (measured:
    # <= 3e-7); the others compute in float64 here (measured: <= 5e-16)
    tol = 1e-6 if name.startswith("multistep") else 1e-12
    for g, w, what in zip(got, want, ["x_final", "x0 predictions", "d/dx_T", "d/dtheta"], strict=True):
        scale = max(1.0, float(w.abs().max()))
        assert float((g - w).abs().max()) / scale < tol, (what, float((g - w).abs().max()) / scale)


def test_cogvideox_drop_in_gradients_equal_diffusers():
    """CogVideoX's step is handed the previous x0 by the pipeline: gradients flow through it too."""
    from diffusers import CogVideoXDPMScheduler

    from dpm_kernels.integrations.diffusers import FusedCogVideoXDPMScheduler

    def run(cls):
        s = cls()
        s.set_timesteps(4)
        x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=F64).requires_grad_(True)
        theta = torch.tensor([0.8, 1.1, 1.4], dtype=F64, requires_grad=True)
        g = torch.Generator().manual_seed(3)
        x, old, ts = x_T, None, s.timesteps
        for i, t in enumerate(ts):
            mo = theta.reshape(1, -1, 1, 1) * torch.tanh(0.7 * x)
            x, old = s.step(mo, old, t, ts[i - 1] if i > 0 else None, x, generator=g, return_dict=False)
        loss = (x * x).sum() + old.sum()
        return [x.detach(), *torch.autograd.grad(loss, [x_T, theta])], s

    want, _ = run(CogVideoXDPMScheduler)
    got, s = run(FusedCogVideoXDPMScheduler)
    assert s.fused_reason is None
    for g, w in zip(got, want, strict=True):
        assert float((g - w).abs().max()) / max(1.0, float(w.abs().max())) < 2e-6


# ---- the authors' API ----
@pytest.mark.parametrize("backend", BACKENDS)
def test_dpmsolver_per_update_methods_are_differentiable_and_sample_is_not(backend):
    """As in the authors' code: the per-update methods (plain torch there) carry gradients; `sample` runs under
    torch.no_grad()."""
    theta = torch.tensor([0.8, 1.1, 1.4], dtype=F64, requires_grad=True)
    ns = dk.NoiseScheduleVP("linear")
    model = make_model(theta)
    solver = dk.DPMSolver(dk.model_wrapper(lambda x, t: model(x, float(t[0])), ns), ns, backend=backend)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=F64).requires_grad_(True)
    ts = [torch.tensor([t], dtype=F64) for t in TIMES]
    x, prev_m, prev_t = x_T, [], []
    for i in range(3):
        prev_m.append(solver.model_fn(x, ts[i]))
        prev_t.append(ts[i])
        x = solver.multistep_dpm_solver_update(x, prev_m, prev_t, ts[i + 1], min(i + 1, 3))
    target = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6), dtype=F64)
    got = torch.autograd.grad((x * target).sum(), [x_T, theta])
    x_ref = plain_multistep(x_T, model, 3)
    want = torch.autograd.grad((x_ref * target).sum(), [x_T, theta])
    torch.testing.assert_close(x.detach(), x_ref.detach(), rtol=1e-10, atol=1e-10)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    assert not solver.sample(x_T, steps=3, order=2, skip_type="time_uniform", t_end=0.05).requires_grad


def test_kdiffusion_samplers_stay_no_grad():
    """k-diffusion decorates its samplers with @torch.no_grad(); so do these."""
    from dpm_kernels import k_diffusion as kd

    x = torch.randn(SHAPE, requires_grad=True)
    sigmas = torch.tensor(np.array([10.0, 3.0, 1.0, 0.0]), dtype=torch.float32)
    out = kd.sample_dpmpp_2m(lambda x, s, **kw: torch.tanh(x), x, sigmas, disable=True)
    assert not out.requires_grad
