"""Failure modes users of DPM-Solver samplers reported, each checked on every backend present.

Backends: the reference, the C++ CPU kernels, Triton (through its interpreter on CPU; fewer cases there,
it is slow), and CUDA/Triton on a GPU when one is present.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import ALL_BACKEND_CASES, IDS

import dpm_kernels as dk
from dpm_kernels import layout as L
from dpm_kernels import planner as P
from dpm_kernels.k_diffusion import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde

NS_DISC = dk.NoiseScheduleVP("discrete", betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
SCHEDULES = {"discrete": NS_DISC, "linear": dk.NoiseScheduleVP("linear"), "cosine": dk.NoiseScheduleVP("cosine")}


def model_fn(ns, device="cpu", guidance=None):
    gm = dk.GaussianMixtureModel([[1.0, -0.5], [-1.0, 0.5]], [0.3, 0.5], noise_schedule=ns)
    if guidance is None:
        return dk.model_wrapper(lambda x, t: gm(x, t).to(x.device), ns)

    def cond_model(x, t, c):
        return gm(x, t).to(x.device) + 0.2 * c.to(x.device, x.dtype)[:, None] * torch.tanh(x)

    b = 3
    return dk.model_wrapper(cond_model, ns, guidance_type="classifier-free", condition=torch.ones(b),
                            unconditional_condition=torch.zeros(b), guidance_scale=guidance)


def x_T(b=3, dtype=torch.float32, device="cpu", seed=0):
    return torch.randn(b, 2, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


CONFIGS = [(alg, method, order) for alg in ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")
           for method in (("multistep",) if alg.startswith("sde") else ("multistep", "singlestep", "singlestep_fixed"))
           for order in (1, 2, 3)]


def test_every_planned_final_step_is_finite():
    """Every order x algorithm x method x steps 1..30 plans finite coefficients that end at t_end = 1/N (the
    smallest time): all 630 trajectories, on the rows the kernels would get."""
    for alg, method, order in CONFIGS:
        s = dk.DPMSolver(model_fn(NS_DISC), NS_DISC, algorithm_type=alg, backend="torch",
                         correcting_x0_fn="dynamic_thresholding")
        for steps in range(1, 31):
            plan = s.plan(steps=steps, order=order, method=method)
            rows = plan.table(s.conversion())
            assert np.isfinite(rows).all() and plan.evals[-1].t_next == 1.0 / NS_DISC.total_N, (alg, method, order)


@pytest.mark.parametrize("device,backend", ALL_BACKEND_CASES, ids=IDS)
def test_final_step_is_finite_for_every_configuration(device, backend):
    """The same configurations run for real at a few step counts (the short ones, where the last steps are the
    longest, and 30) end finite on every backend."""
    fn = model_fn(NS_DISC)
    for alg, method, order in CONFIGS:
        s = dk.DPMSolver(fn, NS_DISC, algorithm_type=alg, backend=backend)
        for steps in (1, 2, 3, 30):
            y = s.sample(x_T(device=device), steps=steps, order=order, method=method,
                         generator=torch.Generator().manual_seed(0))
            assert bool(torch.isfinite(y).all()), (alg, method, order, steps)


@pytest.mark.parametrize("device,backend", ALL_BACKEND_CASES, ids=IDS)
def test_denoising_to_sigma_zero_is_finite(device, backend):
    """k-diffusion-style sigmas end at 0: the last step is the limit x = x0, never log(0) or 0 * inf."""
    def denoiser(x, sigma):
        return x / (1 + sigma[:, None] ** 2)

    slow = backend == "triton" and device == "cpu"
    for n in (1, 2, 3, 10) if slow else range(1, 31):
        sig = torch.cat([torch.exp(torch.linspace(np.log(14.0), np.log(0.03), n)), torch.zeros(1)]).double()
        x = x_T(device=device) * 14
        for f in (sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde):
            seen = []
            y = f(denoiser, x, sig.to(device), disable=True, backend=backend,
                  callback=lambda d, seen=seen: seen.append(d["denoised"].clone()))
            assert bool(torch.isfinite(y).all()), (f.__name__, n)
            # the last step returns the denoiser output at the last nonzero sigma, exactly (a = 0, c0 = 1)
            assert len(seen) == n and torch.equal(y, seen[-1]), (f.__name__, n)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("skip", ["time_uniform", "logSNR", "time_quadratic", "karras", "exponential"])
def test_spacings_never_repeat_or_lose_a_step(schedule, skip):
    ns = SCHEDULES[schedule]
    t_end = 1.0 / ns.total_N
    for n in range(1, 1001):
        ts = P.time_steps(ns, skip, ns.T, t_end, n)
        assert len(ts) == n + 1
        assert np.all(np.diff(ts) < 0), (n, ts)
        assert ts[0] == ns.T and ts[-1] == t_end
    solver = dk.DPMSolver(model_fn(ns), ns, backend="torch")
    for n in (1, 17, 999, 1000):
        for method in ("multistep", "singlestep"):
            plan = solver.plan(steps=n, order=3, skip_type=skip, method=method)
            assert plan.nfe == n
            evals_t = np.array([ev.t for ev in plan.evals])
            assert np.all(np.diff(evals_t) < 0)


@pytest.mark.parametrize("device,backend", ALL_BACKEND_CASES, ids=IDS)
@pytest.mark.parametrize("dtype,bound", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)], ids=["fp16", "bf16"])
def test_half_precision_close_to_float32(device, backend, dtype, bound):
    """fp16/bf16 runs: finite, output in the input dtype, relative L2 distance to the float32 run below
    the bound, for 2M, 3M and 2M SDE at 10/20/50 steps (coefficients are float64 on the host regardless)."""
    fn = model_fn(NS_DISC)
    slow = backend == "triton" and device == "cpu"
    configs = [("dpmsolver++", 2), ("dpmsolver++", 3), ("sde-dpmsolver++", 2)]
    for alg, order in configs:
        for steps in (10, 20) if slow else (10, 20, 50):
            s = dk.DPMSolver(fn, NS_DISC, algorithm_type=alg, backend=backend)
            x = x_T(b=4, device=device, seed=1) * 1.0
            kw = {"generator": [torch.Generator().manual_seed(i) for i in range(4)]} if alg.startswith("sde") else {}
            ref = s.sample(x.float(), steps=steps, order=order, **kw)
            kw = {"generator": [torch.Generator().manual_seed(i) for i in range(4)]} if alg.startswith("sde") else {}
            low = s.sample(x.to(dtype), steps=steps, order=order, **kw)
            assert low.dtype == dtype
            assert bool(torch.isfinite(low).all())
            rel = float((low.float() - ref).norm() / ref.norm())
            assert rel < bound, (alg, order, steps, rel)


def test_coefficients_are_float64_on_the_host():
    s = dk.DPMSolver(model_fn(NS_DISC), NS_DISC, backend="torch")
    rows = s.plan(steps=10, order=3).table(s.conversion())
    assert rows.dtype == np.float64 and rows.shape == (10, L.NCOEF)


@pytest.mark.parametrize("device,backend", ALL_BACKEND_CASES, ids=IDS)
def test_large_guidance_scales_stay_finite(device, backend):
    slow = backend == "triton" and device == "cpu"
    for g in (7.5, 20.0):
        fn = model_fn(NS_DISC, guidance=g)
        for steps in (10,) if slow else (10, 20, 30):
            for alg in ("dpmsolver++", "dpmsolver"):
                y = dk.DPMSolver(fn, NS_DISC, algorithm_type=alg, correcting_x0_fn="dynamic_thresholding",
                                 backend=backend).sample(x_T(device=device), steps=steps, order=2)
                assert bool(torch.isfinite(y).all()), (g, steps, alg)


@pytest.mark.parametrize("device,backend", ALL_BACKEND_CASES, ids=IDS)
def test_solver_reuse_equals_fresh_object(device, backend):
    fn = model_fn(NS_DISC)
    s = dk.DPMSolver(fn, NS_DISC, backend=backend)
    first = s.sample(x_T(3, device=device), steps=8, order=3)
    s.sample(x_T(5, torch.float64, device=device, seed=4), steps=13, order=2, method="singlestep")
    s.sample(x_T(1, device=device, seed=5), steps=3, order=3)
    again = s.sample(x_T(3, device=device), steps=8, order=3)
    fresh = dk.DPMSolver(fn, NS_DISC, backend=backend).sample(x_T(3, device=device), steps=8, order=3)
    assert torch.equal(first, again) and torch.equal(again, fresh)
    # the multistep_update history: reset() makes a used History equal to a new one
    ts = P.time_steps(NS_DISC, "time_uniform", 1.0, 1e-3, 6)
    h = dk.History(x_T(device=device), order=3)

    def loop(hist):
        x = x_T(device=device)
        for i in range(6):
            x = dk.multistep_update(x, fn(x, torch.full((3,), ts[i])).to(x.dtype), hist, t=ts[i], t_next=ts[i + 1],
                                    noise_schedule=NS_DISC, order=3, backend=backend)
        return x

    a = loop(h)
    h.reset()
    assert torch.equal(loop(h), a)
    assert torch.equal(loop(dk.History(x_T(device=device), order=3)), a)


@pytest.mark.parametrize("device,backend", ALL_BACKEND_CASES, ids=IDS)
def test_per_sample_times_match_a_loop_over_samples(device, backend):
    """multistep_update with [B] time tensors equals running each sample alone with its own times."""
    fn = model_fn(NS_DISC)
    b, n = 3, 5
    grids = [P.time_steps(NS_DISC, "time_uniform", 1.0 - 0.1 * i, 2e-3 * (i + 1), n) for i in range(b)]
    x0 = x_T(b, torch.float64, device=device)

    def run(xs, gr):
        h = dk.History(xs, order=3)
        x = xs.clone()
        for k in range(n):
            t = torch.tensor([g[k] for g in gr], dtype=torch.float64)
            tn = torch.tensor([g[k + 1] for g in gr], dtype=torch.float64)
            eps = fn(x, t.to(device)).to(x.dtype)
            x = dk.multistep_update(x, eps, h, t=t, t_next=tn, noise_schedule=NS_DISC, order=3, backend=backend)
        return x

    batched = run(x0, grids)
    for i in range(b):
        alone = run(x0[i:i + 1], [grids[i]])
        assert torch.allclose(batched[i:i + 1], alone, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="t"):
        dk.multistep_update(x0, x0, dk.History(x0), t=torch.zeros(2), t_next=0.5, noise_schedule=NS_DISC)


@pytest.mark.parametrize("device,backend", ALL_BACKEND_CASES, ids=IDS)
def test_two_threads_equal_serial(device, backend):
    fn = model_fn(NS_DISC)
    cfgs = [dict(steps=12, order=3), dict(steps=9, order=2, method="singlestep")]
    serial = [dk.DPMSolver(fn, NS_DISC, backend=backend).sample(x_T(device=device, seed=i), **c)
              for i, c in enumerate(cfgs)]
    results: dict[int, torch.Tensor] = {}
    errors = []

    def work(i):
        try:
            results[i] = dk.DPMSolver(fn, NS_DISC, backend=backend).sample(x_T(device=device, seed=i), **cfgs[i])
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        assert torch.equal(results[i], serial[i])
