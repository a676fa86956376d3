"""DPMSolver behaviour: edge cases, evaluation counts, options, fused vs unfused paths, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import dpm_kernels as dk

NS_LIN = dk.NoiseScheduleVP("linear")
NS_DISC = dk.NoiseScheduleVP("discrete", betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
MEANS = [[1.0, -0.5], [-1.0, 0.5]]
STDS = [0.4, 0.6]


def gm_fn(ns, model_type="noise"):
    gm = dk.GaussianMixtureModel(MEANS, STDS, noise_schedule=ns, model_type=model_type)
    return gm, dk.model_wrapper(gm, ns, model_type=model_type)


def x_T(b=8, dtype=torch.float64, seed=0):
    return torch.randn(b, 2, dtype=dtype, generator=torch.Generator().manual_seed(seed))


METHODS = ["multistep", "singlestep", "singlestep_fixed"]


@pytest.mark.parametrize("ns", [NS_LIN, NS_DISC], ids=["linear", "discrete"])
@pytest.mark.parametrize("alg", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_few_steps_finite_and_counted(ns, alg, method, order):
    """steps = 1, 2, 3 run for every method, end finite, and use the documented number of evaluations."""
    gm, fn = gm_fn(ns)
    for steps in (1, 2, 3):
        gm.calls = 0
        s = dk.DPMSolver(fn, ns, algorithm_type=alg, backend="torch")
        y = s.sample(x_T(), steps=steps, order=order, method=method)
        assert bool(torch.isfinite(y).all())
        plan = s.plan(steps=steps, order=order, method=method)
        assert gm.calls == plan.nfe
        if method == "singlestep_fixed":
            assert plan.nfe == (steps // order) * order if steps >= order else plan.nfe == steps
        else:
            assert plan.nfe == steps
        assert plan.evals[-1].t_next == pytest.approx(1.0 / ns.total_N)


@pytest.mark.parametrize("skip", ["time_uniform", "logSNR", "time_quadratic", "karras", "exponential"])
def test_final_step_reaches_t_end_finite_for_every_spacing(skip):
    gm, fn = gm_fn(NS_DISC)
    for alg in ("dpmsolver++", "dpmsolver", "sde-dpmsolver++"):
        s = dk.DPMSolver(fn, NS_DISC, algorithm_type=alg, backend="torch")
        for steps in (1, 5, 30):
            y = s.sample(x_T(), steps=steps, order=3, skip_type=skip, generator=torch.Generator().manual_seed(1))
            assert bool(torch.isfinite(y).all())
            times = s.plan(steps=steps, order=3, skip_type=skip).times
            assert (times[1:] < times[:-1]).all() and len(times) == steps + 1


def test_model_types_agree():
    """noise / x_start / v / score parameterisations of the same exact model give the same samples."""
    outs = []
    for mt in ("noise", "x_start", "v", "score"):
        _, fn = gm_fn(NS_LIN, mt)
        for alg in ("dpmsolver++", "dpmsolver"):
            s = dk.DPMSolver(fn, NS_LIN, algorithm_type=alg, backend="torch")
            outs.append((alg, s.sample(x_T(), steps=10, order=2)))
    for alg in ("dpmsolver++", "dpmsolver"):
        ref = [o for a, o in outs if a == alg]
        for o in ref[1:]:
            assert torch.allclose(o, ref[0], rtol=1e-9, atol=1e-9)


def _unfused(fn):
    """A plain model_fn (not a WrappedModel): the solver then cannot fuse conversion or guidance."""
    return lambda x, t: fn(x, t)


def test_classifier_free_guidance_fused_equals_unfused():
    gm = dk.GaussianMixtureModel(MEANS, STDS, noise_schedule=NS_LIN)

    def model(x, t_in, cond):
        shift = cond[:, None].to(x.dtype)  # cond 0 or 1 moves the prediction
        return gm(x, t_in) + 0.3 * shift * torch.tanh(x)

    b = 6
    cond = torch.ones(b)
    uncond = torch.zeros(b)
    fn = dk.model_wrapper(model, NS_LIN, guidance_type="classifier-free", condition=cond,
                          unconditional_condition=uncond, guidance_scale=4.0)
    assert fn.cfg == "stacked"
    for alg in ("dpmsolver++", "dpmsolver"):
        fused = dk.DPMSolver(fn, NS_LIN, algorithm_type=alg, backend="torch").sample(x_T(b), steps=8, order=2)
        plain = dk.DPMSolver(_unfused(fn), NS_LIN, algorithm_type=alg, backend="torch").sample(x_T(b), steps=8,
                                                                                               order=2)
        assert torch.allclose(fused, plain, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("semantics", ["authors", "diffusers"])
@pytest.mark.parametrize("alg", ["dpmsolver++", "dpmsolver"])
def test_thresholding_fused_equals_unfused(semantics, alg):
    """Dynamic thresholding fused into the step equals torch.quantile-based thresholding done by hand."""
    _, fn = gm_fn(NS_LIN)
    ratio, max_val = 0.8, 1.2

    def by_hand(x0, t):
        q = torch.quantile(x0.abs().reshape(x0.shape[0], -1), ratio, dim=1)
        s = torch.clamp(q, min=max_val) if semantics == "authors" else torch.clamp(q, 1.0, max_val)
        s = s[:, None]
        return torch.clamp(x0, -s, s) / s

    x = x_T(8) * 3
    s_fused = dk.DPMSolver(fn, NS_LIN, algorithm_type=alg, correcting_x0_fn="dynamic_thresholding",
                           thresholding_max_val=max_val, dynamic_thresholding_ratio=ratio, backend="torch",
                           thresholding_semantics=semantics)
    fused = s_fused.sample(x, steps=6, order=2, denoise_to_zero=True)
    if semantics == "authors" or alg == "dpmsolver++":
        # the authors' rule: thresholding applies to data predictions (and the final denoising) only
        s_plain = dk.DPMSolver(_unfused(fn), NS_LIN, algorithm_type=alg, correcting_x0_fn=by_hand, backend="torch")
        plain = s_plain.sample(x, steps=6, order=2, denoise_to_zero=True)
        assert torch.allclose(fused, plain, rtol=1e-9, atol=1e-9)
    else:
        # diffusers' rule for noise prediction: eps -> x0 -> threshold -> eps in every step
        def eps_thresholded(xx, t):
            eps = fn(xx, t)
            a = NS_LIN.marginal_alpha(t).to(xx.dtype)[:, None]
            sg = NS_LIN.marginal_std(t).to(xx.dtype)[:, None]
            x0 = by_hand((xx - sg * eps) / a, t)
            return (xx - a * x0) / sg

        s_plain = dk.DPMSolver(eps_thresholded, NS_LIN, algorithm_type=alg, correcting_x0_fn=by_hand, backend="torch")
        plain = s_plain.sample(x, steps=6, order=2, denoise_to_zero=True)
        assert torch.allclose(fused, plain, rtol=1e-9, atol=1e-9)
    unthresholded = dk.DPMSolver(fn, NS_LIN, algorithm_type=alg, backend="torch").sample(x, steps=6, order=2,
                                                                                         denoise_to_zero=True)
    assert not torch.allclose(fused, unthresholded, atol=1e-3), "thresholding had no effect: test is vacuous"


def test_inversion_round_trip():
    _, fn = gm_fn(NS_LIN)
    s = dk.DPMSolver(fn, NS_LIN, algorithm_type="dpmsolver++", backend="torch")
    x0 = s.sample(x_T(), steps=200, order=3, skip_type="logSNR", t_end=1e-2, multistep3="third_order")
    back = s.inverse(x0, steps=200, order=3, skip_type="logSNR", t_start=1e-2, multistep3="third_order")
    assert float((back - x_T()).abs().max()) < 1e-4


def test_sde_eta_zero_equals_ode_and_inversion_refused():
    _, fn = gm_fn(NS_LIN)
    for order in (1, 2, 3):
        for st in ("dpmsolver", "taylor"):
            ode = dk.DPMSolver(fn, NS_LIN, "dpmsolver++", backend="torch").sample(x_T(), steps=12, order=order,
                                                                                  solver_type=st)
            sde = dk.DPMSolver(fn, NS_LIN, "sde-dpmsolver++", backend="torch").sample(x_T(), steps=12, order=order,
                                                                                      eta=0.0, solver_type=st)
            assert torch.allclose(ode, sde, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="algorithm_type"):
        dk.DPMSolver(fn, NS_LIN, "sde-dpmsolver++").inverse(x_T())


def test_sde_noise_is_reproducible_per_sample():
    """Per-sample generators: a sample's result does not depend on its batch position or the batch size."""
    _, fn = gm_fn(NS_LIN)
    s = dk.DPMSolver(fn, NS_LIN, "sde-dpmsolver++", backend="torch")
    xs = x_T(4)
    full = s.sample(xs, steps=10, order=2, generator=[torch.Generator().manual_seed(100 + i) for i in range(4)])
    perm = [2, 0, 3, 1]
    shuffled = s.sample(xs[perm], steps=10, order=2,
                        generator=[torch.Generator().manual_seed(100 + i) for i in perm])
    assert torch.equal(shuffled, full[perm])
    single = s.sample(xs[2:3], steps=10, order=2, generator=[torch.Generator().manual_seed(102)])
    assert torch.equal(single[0], full[2])
    # caller-supplied noise equals the same noise drawn by the solver
    noise = torch.stack([torch.randn(4, 2, generator=torch.Generator().manual_seed(7 + k)).double() for k in range(10)])
    a = s.sample(xs, steps=10, order=2, noise=noise)
    it = iter(noise)
    b = s.sample(xs, steps=10, order=2, noise_sampler=lambda t_s, t_t: next(it))
    assert torch.equal(a, b)
    assert not torch.allclose(a, full)


def test_adaptive_is_accurate_and_counts_nfe():
    _, fn = gm_fn(NS_LIN)
    ref = dk.DPMSolver(fn, NS_LIN, backend="torch").sample(x_T(), steps=300, order=3, method="singlestep_fixed",
                                                          skip_type="logSNR")
    for order in (2, 3):
        s = dk.DPMSolver(fn, NS_LIN, backend="torch")
        y = s.sample(x_T(), order=order, method="adaptive", rtol=0.01)
        assert float((y - ref).abs().max()) < 0.05
        assert s.last_nfe % order == 0 and s.last_nfe > 0


def test_return_intermediate_correcting_xt_and_denoise_to_zero():
    gm, fn = gm_fn(NS_DISC)
    calls = []

    def corr(x, t, step):
        calls.append((float(t[0]), step))
        return x

    s = dk.DPMSolver(fn, NS_DISC, backend="torch", correcting_xt_fn=corr)
    gm.calls = 0
    x, inter = s.sample(x_T(), steps=5, order=2, return_intermediate=True, denoise_to_zero=True)
    assert gm.calls == 6  # 5 steps + the final denoising evaluation
    assert len(inter) == 1 + 5 + 1 and torch.equal(inter[-1], x)
    assert [c[1] for c in calls] == [0, 1, 2, 3, 4, 5, 6]
    assert all(not torch.equal(inter[i], inter[i + 1]) for i in range(len(inter) - 1))


def test_authors_update_methods_match_sampler():
    """The authors' per-update methods (used by some callers directly) reproduce `sample`."""
    _, fn = gm_fn(NS_LIN)
    s = dk.DPMSolver(fn, NS_LIN, backend="torch")
    ts = s.get_time_steps("time_uniform", 1.0, 1e-3, 4, "cpu")
    x = x_T()
    ms, tl = [s.model_fn(x, ts[0:1])], [ts[0:1]]
    for i in range(1, 5):
        x = s.multistep_dpm_solver_update(x, ms, tl, ts[i:i + 1], min(2, i), "dpmsolver")
        ms.append(s.model_fn(x, ts[i:i + 1]))
        tl.append(ts[i:i + 1])
    want = s.sample(x_T(), steps=4, order=2, lower_order_final=False)
    # the authors' time steps are float32: agreement to float32 rounding of the times
    assert torch.allclose(x, want, rtol=1e-5, atol=1e-5)


BAD = [
    (dict(method="bogus"), ValueError, "method"),
    (dict(order=4), ValueError, "order"),
    (dict(order=0), ValueError, "order"),
    (dict(steps=0), ValueError, "steps"),
    (dict(skip_type="cubic"), ValueError, "skip_type"),
    (dict(t_end=0.5, t_start=0.4), ValueError, "t_end"),
    (dict(t_end=0.0), ValueError, "t_end"),
    (dict(solver_type="rk4"), ValueError, "solver_type"),
    (dict(method="adaptive", order=1), ValueError, "order"),
]


@pytest.mark.parametrize("kwargs,exc,name", BAD, ids=[b[2] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_sample_arguments(kwargs, exc, name):
    _, fn = gm_fn(NS_LIN)
    with pytest.raises(exc, match=name):
        dk.DPMSolver(fn, NS_LIN, backend="torch").sample(x_T(), **kwargs)


def test_bad_construction_arguments():
    gm, fn = gm_fn(NS_LIN)
    with pytest.raises(ValueError, match="schedule"):
        dk.NoiseScheduleVP("sigmoid")
    with pytest.raises(ValueError, match="betas"):
        dk.NoiseScheduleVP("discrete")
    with pytest.raises(ValueError, match="model_type"):
        dk.model_wrapper(gm, NS_LIN, model_type="eps")
    with pytest.raises(ValueError, match="guidance_type"):
        dk.model_wrapper(gm, NS_LIN, guidance_type="cfg")
    with pytest.raises(ValueError, match="condition"):
        dk.model_wrapper(gm, NS_LIN, guidance_type="classifier-free")
    with pytest.raises(ValueError, match="classifier_fn"):
        dk.model_wrapper(gm, NS_LIN, guidance_type="classifier", condition=torch.ones(2))
    with pytest.raises(ValueError, match="algorithm_type"):
        dk.DPMSolver(fn, NS_LIN, algorithm_type="dpm")
    with pytest.raises(ValueError, match="method"):
        dk.DPMSolver(fn, NS_LIN, algorithm_type="sde-dpmsolver++").sample(x_T(), method="singlestep")
    with pytest.raises(TypeError, match="x"):
        dk.DPMSolver(fn, NS_LIN).sample(torch.ones(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend"):
        dk.DPMSolver(fn, NS_LIN, backend="metal")


def test_schedules_match_closed_forms():
    t = torch.tensor([1e-3, 0.1, 0.5, 0.9], dtype=torch.float64)
    la = -0.25 * t**2 * (20 - 0.1) - 0.5 * t * 0.1
    assert torch.allclose(NS_LIN.marginal_log_mean_coeff(t), la, rtol=1e-14)
    lam = NS_LIN.marginal_lambda(t)
    assert torch.allclose(lam, la - 0.5 * torch.log(1 - torch.exp(2 * la)), rtol=1e-12)
    for ns in (NS_LIN, NS_DISC, dk.NoiseScheduleVP("cosine")):
        tt = torch.linspace(0.01, ns.T, 37, dtype=torch.float64)
        assert torch.allclose(ns.inverse_lambda(ns.marginal_lambda(tt)), tt, rtol=1e-9, atol=1e-9)
    # discrete: log alpha at t_n = (n+1)/N is exactly 0.5 * log(alphas_cumprod[n])
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)
    n = torch.tensor([0, 10, 500, 999])
    got = NS_DISC.marginal_log_mean_coeff((n + 1).double() / 1000)
    assert torch.allclose(got, 0.5 * torch.log(ac[n]), rtol=1e-12)
    # model input time: 1000 * (t - 1/N) maps t_n to n
    _, fn = gm_fn(NS_DISC)
    assert torch.allclose(fn.model_input_time((n + 1).double() / 1000), n.double())
    c = dk.NoiseScheduleVP("cosine")
    assert c.T == 0.9946 and math.isfinite(float(c.marginal_lambda(torch.tensor(c.T))))
