"""Mistakes a user makes, answered by a named error (or by one documented rule), on every front end alike."""

from __future__ import annotations

import pytest
import torch
from conftest import backends_for

import dpm_kernels as dk
from dpm_kernels import planner as P
from dpm_kernels.k_diffusion import sample_dpmpp_2m

NS = dk.NoiseScheduleVP("linear")
X = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))


def step(**kw):
    args = dict(t=0.5, t_next=0.4, noise_schedule=NS, order=2, backend="torch")
    args.update(kw)
    return dk.multistep_update(X, torch.ones_like(X), dk.History(X, order=2), **args)


@pytest.mark.parametrize("kw,exc,name", [
    (dict(thresholding=(0.995, 1.0)), TypeError, "thresholding"),
    (dict(thresholding=0.995), TypeError, "thresholding"),
    (dict(thresholding=("a", 1.0, 2.0)), TypeError, "thresholding"),
    (dict(noise_schedule=torch.zeros(3)), TypeError, "noise_schedule"),
    (dict(t=[0.5, 0.5, 0.5, 0.5]), TypeError, "t"),
    (dict(t_next="0.4"), TypeError, "t_next"),
    (dict(t=float("nan")), ValueError, "t"),
    (dict(t=torch.tensor([0.5, 0.4])), ValueError, "t"),
    (dict(order=4), ValueError, "order"),
    (dict(algorithm_type="ddim"), ValueError, "algorithm_type"),
    (dict(model_type="eps"), ValueError, "model_type"),
    (dict(cfg="both"), ValueError, "cfg"),
    (dict(backend="fortran"), ValueError, "backend"),
    (dict(algorithm_type="sde-dpmsolver++"), ValueError, "noise"),
])
def test_multistep_update_names_the_argument(kw, exc, name):
    with pytest.raises(exc) as info:
        step(**kw)
    assert str(info.value).startswith(f"{name}:"), str(info.value)


def test_multistep_update_zero_length_second_order_step_is_the_identity():
    hist = dk.History(X, order=2)
    dk.multistep_update(X, torch.ones_like(X), hist, t=0.6, t_next=0.5, noise_schedule=NS, order=2, backend="torch")
    y = dk.multistep_update(X, torch.ones_like(X), hist, t=0.5, t_next=0.5, noise_schedule=NS, order=2,
                            backend="torch")
    assert torch.equal(y, X)


GM = dk.GaussianMixtureModel([[1.0, 0.0, 0.0]], [0.5], noise_schedule=NS)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_floating_model_outputs_of_another_dtype_are_cast_everywhere(dtype):
    """One rule for every front end: a floating output is cast to x's dtype; the result is x's dtype and equals the
    run with the output cast by hand."""
    def model(x, t):
        return GM(x, t).to(dtype)

    solver = dk.DPMSolver(dk.model_wrapper(model, NS), NS, backend="torch")
    y = solver.sample(X, steps=4, order=2)
    want = dk.DPMSolver(dk.model_wrapper(lambda x, t: model(x, t).to(X.dtype), NS), NS, backend="torch").sample(
        X, steps=4, order=2)
    assert y.dtype == X.dtype and torch.equal(y, want)
    out = dk.multistep_update(X, torch.ones_like(X, dtype=dtype), dk.History(X), t=0.5, t_next=0.4,
                              noise_schedule=NS, backend="torch")
    ref = dk.multistep_update(X, torch.ones_like(X), dk.History(X), t=0.5, t_next=0.4, noise_schedule=NS,
                              backend="torch")
    assert out.dtype == X.dtype and torch.equal(out, ref)


def test_non_floating_model_outputs_are_refused_everywhere():
    solver = dk.DPMSolver(dk.model_wrapper(lambda x, t: torch.zeros(x.shape, dtype=torch.int64), NS), NS,
                          backend="torch")
    with pytest.raises(TypeError, match="^model_fn:"):
        solver.sample(X, steps=3)
    with pytest.raises(TypeError, match="^model_output:"):
        dk.multistep_update(X, torch.zeros(X.shape, dtype=torch.int64), dk.History(X), t=0.5, t_next=0.4,
                            noise_schedule=NS)
    sigmas = torch.tensor([10.0, 1.0, 0.0])
    with pytest.raises(TypeError, match="^model:"):
        sample_dpmpp_2m(lambda x, s: torch.zeros(x.shape, dtype=torch.int32), X * 10, sigmas, disable=True)
    with pytest.raises(TypeError, match="^model_fn:"):
        dk.DPMSolver(dk.model_wrapper(lambda x, t: "eps", NS), NS, backend="torch").sample(X, steps=2)


# ---- a History serves one trajectory; times lie in the schedule; inversion is the ODE run backwards ----

def _loop(hist, x, ts, model=lambda x, t: 0.3 * x + 0.05 * torch.sin(3 * x), **kw):
    for i in range(len(ts) - 1):
        x = dk.multistep_update(x, model(x, ts[i]), hist, t=ts[i], t_next=ts[i + 1], noise_schedule=NS, order=3,
                                backend="torch", **kw)
    return x


def test_a_history_refuses_a_step_that_does_not_continue_its_trajectory():
    """The README's loop run twice with one History (no reset) used to mix the first run's outputs into the second
    (up to 9.5 off a fresh History); each way of leaving the trajectory now raises before anything is written."""
    ts = P.time_steps(NS, "logSNR", 1.0, 1e-3, 10).tolist()
    hist = dk.History(X, order=3)
    first = _loop(hist, X.clone(), ts)
    buf = hist.buffer.clone()
    x = X.clone()
    with pytest.raises(ValueError, match=r"^t: 1\.0 does not continue .* t_next = 0\.001; call history\.reset\(\)"):
        _loop(hist, x, ts)
    assert torch.equal(x, X) and torch.equal(hist.buffer, buf)  # nothing written
    hist.reset()
    assert torch.equal(_loop(hist, X.clone(), ts), first)
    # a time jumping back mid-trajectory, and a step turning back (towards noise after steps towards the data)
    hist.reset()
    _loop(hist, X.clone(), ts[:4])
    with pytest.raises(ValueError, match=r"^t: .* does not continue .*reset\(\)"):
        dk.multistep_update(X, X, hist, t=ts[1], t_next=ts[2], noise_schedule=NS, order=3, backend="torch")
    with pytest.raises(ValueError, match=r"^t_next: .*turns back on a trajectory that ran towards the data.*reset"):
        dk.multistep_update(X, X, hist, t=ts[3], t_next=ts[2], noise_schedule=NS, order=3, backend="torch")
    # a zero-length step where the trajectory is continues it
    y = dk.multistep_update(X, X, hist, t=ts[3], t_next=ts[3], noise_schedule=NS, order=3, backend="torch")
    assert torch.equal(y, X)
    # per-sample times: the error names the sample that jumped
    hist = dk.History(X, order=3)
    t0, t1 = torch.tensor([0.8, 0.7, 0.6, 0.5]), torch.tensor([0.7, 0.6, 0.5, 0.4])
    dk.multistep_update(X, X, hist, t=t0, t_next=t1, noise_schedule=NS, backend="torch")
    bad = t1.clone()
    bad[2] = 0.55
    with pytest.raises(ValueError, match=r"^t: 0\.55.* \(sample 2\) does not continue"):
        dk.multistep_update(X, X, hist, t=bad, t_next=bad - 0.1, noise_schedule=NS, backend="torch")
    dk.multistep_update(X, X, hist, t=t1, t_next=t1 - 0.1, noise_schedule=NS, backend="torch")  # float32 copies


def _authors_solver():
    return dk.DPMSolver(dk.model_wrapper(GM, NS), NS, backend="torch")


FRONT_ENDS = {  # (call, the argument its error must name)
    "multistep_update-t": (lambda: step(t=1.5), "t"),
    "multistep_update-t10": (lambda: step(t=10.0), "t"),
    "multistep_update-t_next": (lambda: step(t_next=-0.1), "t_next"),
    "multistep_update-per-sample": (lambda: step(t=torch.tensor([0.5, 0.5, 1.2, 0.5])), "t"),
    "multistep_update-flow": (lambda: step(noise_schedule=dk.NoiseScheduleFlow(), t=1.25, model_type="flow"), "t"),
    "sample-t_start": (lambda: _authors_solver().sample(X, steps=3, t_start=2.0), "t_start"),
    "sample-t_end": (lambda: _authors_solver().sample(X, steps=3, t_end=-1e-3), "t_end"),
    "inverse-t_end": (lambda: _authors_solver().inverse(X, steps=3, t_end=1.5), "t_end"),
    "plan-t_start": (lambda: _authors_solver().plan(steps=3, t_start=1.5), "t_start"),
    "get_time_steps": (lambda: _authors_solver().get_time_steps("logSNR", 1.5, 1e-3, 4, "cpu"), "t_T"),
    "get_orders_and_timesteps": (lambda: _authors_solver().get_orders_and_timesteps_for_singlestep_solver(
        6, 3, "time_uniform", 1.0, -0.5, "cpu"), "t_0"),
    "prediction": (lambda: _authors_solver().prediction(X, 1.5), "t"),
    "model_fn": (lambda: _authors_solver().model_fn(X, torch.tensor([1.5])), "t"),
    "add_noise": (lambda: _authors_solver().add_noise(X, torch.tensor([3.0])), "t"),
    "first_update": (lambda: _authors_solver().dpm_solver_first_update(X, torch.tensor([1.5]), torch.tensor([0.5])),
                     "s"),
    "singlestep_update": (lambda: _authors_solver().singlestep_dpm_solver_update(
        X, torch.tensor([0.9]), torch.tensor([-0.2]), 2), "t"),
    "multistep_dpm_solver_update": (lambda: _authors_solver().multistep_dpm_solver_update(
        X, [X, X], [torch.tensor([1.5]), torch.tensor([0.9])], torch.tensor([0.8]), 2), "t_prev_list"),
    "dpm_solver_adaptive": (lambda: _authors_solver().dpm_solver_adaptive(X, 2, 2.0, 1e-3), "t_T"),
    "time_steps": (lambda: P.time_steps(NS, "logSNR", 1.0, 1.1, 4), "t_0"),
    "plan_multistep": (lambda: P.plan_multistep(NS, "dpmsolver++", "dpmsolver", [1.2, 0.5, 0.1], [1, 2]), "times"),
    "plan_singlestep": (lambda: P.plan_singlestep(NS, "dpmsolver++", "dpmsolver", [0.9, 0.5, 1.3], [2, 1]),
                        "outer"),
}


@pytest.mark.parametrize("which", list(FRONT_ENDS))
def test_times_outside_the_schedule_are_refused_by_every_front_end(which):
    """multistep_update with t = 1.5 on a T = 1 schedule returned values around 9e4 (t = 10: NaN); every front end
    that takes times now refuses them by one rule (`NoiseSchedule.check_times`), naming its argument."""
    call, name = FRONT_ENDS[which]
    with pytest.raises(ValueError, match=rf"^{name}: times must lie in \[0, T = "):
        call()


def test_a_float32_time_of_T_is_T():
    """[B] float32 times holding T are inside the schedule though float32(T) may exceed T (0.97 -> 0.97000003)."""
    ns = dk.NoiseScheduleFlow(t_max=0.97)
    t = torch.full((4,), 0.97)
    assert float(t[0]) > 0.97
    y = dk.multistep_update(X, X, dk.History(X), t=t, t_next=0.5, noise_schedule=ns, model_type="flow",
                            backend="torch")
    assert bool(y.isfinite().all())
    with pytest.raises(ValueError, match="^t:"):
        ns.check_times(0.9701, "t")


def test_inversion_runs_the_ode_towards_noise_and_back():
    """t_next > t is an ODE inversion step: on a single Gaussian, whose ODE flow is known in closed form, inverting
    to T lands on the exact noise (converging as the grid is refined) and sampling back returns the start."""
    from dpm_kernels.analytic import exact_ode_solution

    mean, std = [1.0, -0.5, 0.25], 0.5
    gm = dk.GaussianMixtureModel([mean], [std], noise_schedule=NS)
    z = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t0 = 1e-3
    x_start = exact_ode_solution(z, mean, std, NS, 1.0, t0)
    exact_T = exact_ode_solution(x_start, mean, std, NS, t0, 1.0)
    for alg in ("dpmsolver++", "dpmsolver"):
        errs = []
        for n in (20, 40):
            up = P.time_steps(NS, "logSNR", 1.0, t0, n)[::-1].tolist()
            hist = dk.History(x_start, order=3)
            model = lambda x, t: gm.eps(x, torch.full((x.shape[0],), t))  # noqa: E731
            x_T = _loop(hist, x_start.clone(), up, model, algorithm_type=alg)
            errs.append(float((x_T - exact_T).norm(dim=1).max()))
            hist.reset()
            back = _loop(hist, x_T, up[::-1], model, algorithm_type=alg)
        assert errs[1] < 5e-3 and errs[1] < errs[0] / 3, (alg, errs)
        assert float((back - x_start).norm(dim=1).max()) < 1e-3, alg
    # an SDE step cannot be inverted: refused, naming the time
    with pytest.raises(ValueError, match="^t: SDE steps must go towards the data"):
        step(t=0.4, t_next=0.5, algorithm_type="sde-dpmsolver++", noise=torch.randn_like(X))


@pytest.mark.parametrize("backend", [b for b in backends_for("cpu") if b in ("torch", "cpu")])
def test_multistep_update_errors_name_model_output(backend):
    """The op calls it model_out; multistep_update's argument is model_output, on every backend alike."""
    with pytest.raises(ValueError, match=r"^model_output: shape .*4, 2.* does not match"):
        dk.multistep_update(X, torch.ones(4, 2), dk.History(X), t=0.5, t_next=0.4, noise_schedule=NS,
                            backend=backend)
