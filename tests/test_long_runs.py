"""10,000 steps through one reused scheduler, one reused solver and one reused History: memory stays flat
(tracked Python objects, live tensors, Python allocations, resident memory) and the last trajectory equals a
fresh object's."""

from __future__ import annotations

import gc
import tracemalloc

import pytest
import torch

import dpm_kernels as dk
from dpm_kernels import planner as P
from dpm_kernels.integrations.diffusers import FusedDPMSolverMultistepScheduler

TRAJECTORIES, STEPS = 500, 20  # 10,000 steps each
# pytest keeps every warning a test emits (diffusers' set_timesteps warns each call): that list would grow
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]
X = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
NS = dk.NoiseScheduleVP("linear")


def eps_model(x, t):
    return 0.3 * x + 0.1 * torch.sin(x)


def footprint() -> tuple[int, int, int, int]:
    """(tracked objects, live tensors, bytes held by Python's allocator, resident bytes)."""
    gc.collect()
    objs = gc.get_objects()
    tensors = sum(1 for o in objs if isinstance(o, torch.Tensor))
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * 4096
    return len(objs), tensors, tracemalloc.get_traced_memory()[0], rss


def assert_flat(run_one, warm: int = 50):
    tracemalloc.start()
    try:
        for _ in range(warm):  # caches, allocator pools and lazily built state fill up first
            run_one()
        objs0, tensors0, py0, rss0 = footprint()
        for _ in range(TRAJECTORIES - warm):
            last = run_one()
        objs1, tensors1, py1, rss1 = footprint()
    finally:
        tracemalloc.stop()
    assert objs1 - objs0 < 200, (objs0, objs1)
    assert tensors1 - tensors0 <= 2, (tensors0, tensors1)
    assert py1 - py0 < 64 << 10, (py0, py1)  # Python objects of any kind, GC-tracked or not
    assert rss1 - rss0 < 32 << 20, (rss0, rss1)  # tensor storage included
    return last


def scheduler_run(sched):
    sched.set_timesteps(STEPS)
    x = X.clone()
    for t in sched.timesteps:
        x = sched.step(eps_model(x, t), t, x).prev_sample
    return x


def test_reused_scheduler_stays_flat_and_equals_a_fresh_one():
    sched = FusedDPMSolverMultistepScheduler(solver_order=3, algorithm_type="dpmsolver++")
    last = assert_flat(lambda: scheduler_run(sched))
    assert sched.fused_reason is None
    assert torch.equal(last, scheduler_run(FusedDPMSolverMultistepScheduler(solver_order=3)))


def test_reused_solver_stays_flat_and_equals_a_fresh_one():
    solver = dk.DPMSolver(dk.model_wrapper(eps_model, NS), NS)
    run = lambda s: s.sample(X, steps=STEPS, order=3, skip_type="logSNR")  # noqa: E731
    last = assert_flat(lambda: run(solver))
    assert torch.equal(last, run(dk.DPMSolver(dk.model_wrapper(eps_model, NS), NS)))


def test_reused_history_stays_flat_and_equals_a_fresh_one():
    ts = P.time_steps(NS, "logSNR", 1.0, 1e-3, STEPS).tolist()
    hist = dk.History(X, order=3)

    def run(h):
        h.reset()
        x = X.clone()
        for i in range(STEPS):
            dk.multistep_update(x, eps_model(x, ts[i]), h, t=ts[i], t_next=ts[i + 1], noise_schedule=NS, order=3,
                                out=x)
        return x

    last = assert_flat(lambda: run(hist))
    assert torch.equal(last, run(dk.History(X, order=3)))
