"""Plans are shared across objects: a new DPMSolver per sample() call (as the authors' examples make one), over a new
but equal noise schedule, or a new diffusers scheduler per image, plans and uploads nothing the first one did not --
and anything that changes the points or the configuration plans anew (no plan serves a trajectory it was not made
for). The host cost of such fresh objects is measured by benchmarks/bench_overhead.py (fresh-DPMSolver,
fresh-scheduler)."""

from __future__ import annotations

import torch

import dpm_kernels as dk
from dpm_kernels.integrations.diffusers import FusedDPMSolverMultistepScheduler, FusedUniPCMultistepScheduler


def _count(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def counted(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(module, name, counted)
    return calls


def _ns(beta_end=0.02):
    return dk.NoiseScheduleVP("discrete", betas=torch.linspace(1e-4, beta_end, 1000, dtype=torch.float64))


def test_a_new_solver_over_an_equal_schedule_plans_nothing_new(monkeypatch):
    from dpm_kernels import solver as S

    calls = _count(monkeypatch, S.P, "plan_multistep")
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    model = lambda x, t: 0.1 * x  # noqa: E731
    outs = []
    for beta_end in (0.0201234, 0.0201234, 0.0201234, 0.0205):
        ns = _ns(beta_end)
        solver = dk.DPMSolver(dk.model_wrapper(model, ns), ns)
        outs.append(solver.sample(x, steps=7, order=2, skip_type="logSNR"))
    assert len(calls) == 2  # the first schedule once, the different one once
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]) and not torch.allclose(outs[0], outs[3])
    ns = _ns(0.0201234)
    dk.DPMSolver(dk.model_wrapper(model, ns), ns, algorithm_type="dpmsolver").sample(x, steps=7, order=2,
                                                                                    skip_type="logSNR")
    assert len(calls) == 3  # another algorithm: another plan


def test_schedule_keys_tell_points_apart():
    assert _ns(0.02).key == _ns(0.02).key != _ns(0.021).key
    assert dk.NoiseScheduleVP("linear").key != dk.NoiseScheduleVP("linear", continuous_beta_1=19.0).key
    assert dk.NoiseScheduleVP("linear").key != dk.NoiseScheduleVP("cosine").key
    flow = dk.NoiseScheduleFlow().key
    assert flow == dk.NoiseScheduleFlow("discrete_flow").key != dk.NoiseScheduleFlow(t_max=0.9).key


def _trajectory(sched, x0):
    sched.set_timesteps(8)
    x = x0.clone()
    for t in sched.timesteps:
        x = sched.step(0.1 * x, t, x).prev_sample
    return x


def test_a_new_scheduler_per_image_plans_nothing_new(monkeypatch):
    x0 = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    for cls, other in ((FusedDPMSolverMultistepScheduler, dict(solver_order=3)),
                       (FusedUniPCMultistepScheduler, dict(disable_corrector=[2]))):
        calls = _count(monkeypatch, cls, "_make_plan")
        cfg = dict(beta_end=0.0201234)  # a grid no other test planned
        first = _trajectory(cls(**cfg), x0)
        again = _trajectory(cls(**cfg), x0)
        assert len(calls) == 1 and torch.equal(first, again), cls.__name__
        changed = _trajectory(cls(**cfg, **other), x0)
        assert len(calls) == 2 and not torch.equal(first, changed), cls.__name__
        s = cls(**cfg)
        s.set_timesteps(8)
        if cls is FusedUniPCMultistepScheduler:  # an instance attribute diffusers' step reads, written after __init__
            s.predict_x0 = False
            x = x0.clone()
            for t in s.timesteps:
                x = s.step(0.1 * x, t, x).prev_sample
            assert len(calls) == 3 and not torch.equal(first, x)
