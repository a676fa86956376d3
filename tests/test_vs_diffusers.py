"""Step-by-step equivalence of the float64 reference with diffusers' DPM-Solver schedulers.

`DPMSolverMultistepScheduler` and `DPMSolverSinglestepScheduler` (diffusers 0.42) run against `DPMSolver.execute`
(``backend="torch"``) on plans built by `dpm_kernels.planner` from the scheduler's own timesteps. Both sides are
driven by the same deterministic model, the analytic `GaussianMixtureModel` (the exact noise / x0 / v prediction of
a Gaussian mixture under this schedule); each side evaluates it at ITS OWN current sample. Every model input (= the
sample after each step, singlestep intermediate points included) and the final sample are compared.

Time mapping (checked by `test_time_mapping`)
---------------------------------------------
Schedule: diffusers builds ``alphas_cumprod`` in float32 from its betas; ``NoiseScheduleVP("discrete",
alphas_cumprod=scheduler.alphas_cumprod)`` takes exactly those N = 1000 values, so both sides share one schedule
(rebuilding it from the betas in float64 would differ by the float32 cumprod's rounding: alpha by up to 6e-7
relative, lambda near t = 1/N, where sigma^2 = 1 - alphas_cumprod cancels, by up to 8e-5). Our
discrete schedule puts train step n at continuous time t_n = (n + 1) / N with log(alpha_{t_n}) =
log(alphas_cumprod[n]) / 2. Hence:

- diffusers timestep k (an integer label 0..N-1, the model input) <-> our continuous time t = (k + 1) / N; the
  model input time of our wrapper is 1000 * (t - 1/N) = k for N = 1000, so both sides call the model with the
  same label;
- diffusers' VE sigma_k = sqrt((1 - alphas_cumprod[k]) / alphas_cumprod[k]) <-> ``Point.from_vp_of_ve_sigma``
  (alpha, sigma) = (1/sqrt(1 + s^2), s/sqrt(1 + s^2)), which is our point at t = (k + 1) / N (alpha_t^2 =
  alphas_cumprod[k]) up to the float32 rounding of sigma_k;
- final sigma: ``final_sigmas_type="sigma_min"`` is sigma at k = 0, i.e. t = 1/N (our default t_end); ``"zero"``
  is sigma = 0, the point (alpha, sigma, lambda) = (1, 0, +inf) that no finite t of a VP schedule reaches: the plan
  gets it through ``points=`` (diffusers then always takes a first-order last step, as our planner requires);
- sigmas that are not those of integer timesteps (``use_karras_sigmas``) keep the rounded model label k but the
  solver points are ``Point.from_vp_of_ve_sigma(sigma_i)`` of the scheduler's own sigmas, passed with ``points=``.

Orders: diffusers' multistep scheduler uses min(order, step) while warming up and, with lower_order_final and
fewer than 15 steps, orders <= 2 and 1 for the last two steps: `planner.multistep_orders(n, order, lof,
threshold=15)`; ``final_sigmas_type="zero"`` or ``euler_at_final`` make the last step first order. The singlestep
scheduler's ``order_list`` (e.g. [1, 2, 3, 1, 2, 3, 1, 2]) is split into blocks (a run 1, 2, .., k is a block of
order k); a block's intermediate points are the scheduler's own timesteps, its u2 follows the solver_type
(``u2_form="solver_type"``).

Tolerance: diffusers computes every coefficient in float32 from float32 sigmas (lambda = log(alpha) - log(sigma) is
~5e-7 off in absolute terms; exp(-h) - 1 is formed without expm1, so phi2/phi3 lose a further 1/h, 1/h^2 to
cancellation) and the multistep scheduler rounds the sample to float32 in every step. Those errors, times the
step's coefficients, accumulate to 1e-7..1e-5 of the sample's scale. Measured maxima: ~1e-6 for the data-prediction
solvers, ~4e-6 for sde-dpmsolver, 1.4e-5 for the singlestep noise-prediction solver of order 3, whose first block
(h = 2.6 at high noise) multiplies the lambda error by sigma_t * expm1(h) ~ 12. RTOL = 5e-5 sits above all of them;
every wrong option tried (solver type swapped, lower-order-final threshold 10 instead of 15, u2 in taylor form,
k-diffusion's 3rd-order SDE D2, thresholding bound or ratio changed, thresholding off) is off by >= 5e-3. Errors
are max |x_ours - x_diffusers| / max(1, max |x_ours|) per step. `test_singlestep_float64` removes diffusers'
float32 (its singlestep scheduler computes in the dtype of its sigmas) and then agrees to RTOL64 = 1e-11
(measured 1e-13).

Not covered because diffusers itself fails: singlestep + algorithm_type="dpmsolver" + thresholding (its
convert_model_output indexes ``self.alpha_t[timestep]`` with timestep=None and raises a shape error).
diffusers' third-order "sde-dpmsolver++" branch is not k-diffusion's 3M SDE (the 1/2 in its D2 coefficient has the
wrong sign; see `test_sde_order3_is_diffusers_variant` and tests/test_vs_kdiffusion.py): it is compared with our
``multistep3="diffusers"`` variant, which reproduces it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

try:
    from diffusers import DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler
except ImportError as exc:  # a required test dependency: fail loudly instead of skipping
    raise ImportError(
        "diffusers is a required test dependency of tests/test_vs_diffusers.py (pip install diffusers==0.42.1)"
    ) from exc

from dpm_kernels import DPMSolver, GaussianMixtureModel, NoiseScheduleVP, model_wrapper
from dpm_kernels import coefficients as C
from dpm_kernels import planner as P

N_TRAIN = 1000
RTOL = 5e-5  # diffusers: float32 coefficients and float32 samples (module docstring)
RTOL64 = 1e-11  # diffusers' singlestep scheduler run in float64
SHAPE = (2, 2, 4, 4)  # [B, C, H, W]: diffusers' thresholding reshapes to (B, C * H * W)
BETAS = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),  # DDPM
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),  # Stable Diffusion
}
PRED = {"epsilon": "noise", "sample": "x_start", "v_prediction": "v"}
# diffusers deprecates algorithm_type="dpmsolver"/"sde-dpmsolver" (FutureWarning) and trips over numpy 2's copy
# keyword (DeprecationWarning): noise for these tests
pytestmark = [pytest.mark.usefixtures("one_thread"),  # tiny tensors
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
THRESHOLD = dict(thresholding=True, scale=1.5, sample_max_value=2.0)  # |x0| quantiles span 1..3: every regime


class Recorder:
    """The model as both sides see it: a fixed Gaussian mixture; records every input sample and time label."""

    def __init__(self, gmm: GaussianMixtureModel):
        self.gmm = gmm
        self.inputs: list[torch.Tensor] = []
        self.labels: list[float] = []

    def __call__(self, x, t_input, *args, **kwargs):
        t = torch.as_tensor(t_input, dtype=torch.float64).reshape(-1)
        self.inputs.append(x.detach().clone())
        self.labels.append(float(t[0]))
        return self.gmm(x, t.expand(x.shape[0]))


def gmm_for(ns: NoiseScheduleVP, prediction_type: str, scale: float = 1.0) -> GaussianMixtureModel:
    g = torch.Generator().manual_seed(1234)
    means = scale * torch.randn(3, math.prod(SHAPE[1:]), generator=g, dtype=torch.float64)
    return GaussianMixtureModel(means, [0.3, 0.5, 0.4], [0.5, 0.3, 0.2], ns, model_type=PRED[prediction_type])


def x_T() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float32)


def sde_noise(n: int) -> torch.Tensor:
    return torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(99), dtype=torch.float32)


def t_of(k) -> float:
    """diffusers timestep label k -> our continuous time (discrete schedule of N_TRAIN steps)."""
    return (float(k) + 1.0) / N_TRAIN


def point_at(ns: NoiseScheduleVP, t: float) -> C.Point:
    return C.Point.from_log_alpha(float(ns.log_alpha64(t)))


ZERO = C.Point(1.0, 0.0, math.inf)  # diffusers' final sigma 0


def run_diffusers(sched, model: Recorder, noise: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor:
    x = x_T().to(dtype)
    for i, k in enumerate(sched.timesteps):
        out = model(x, k.to(torch.float64))
        kw = {} if noise is None else {"variance_noise": noise[i]}
        x = sched.step(out, k, x, **kw).prev_sample
    return x


def solver_for(ns, prediction_type, algorithm_type, model: Recorder, thresholding=False, ratio=0.995, max_val=1.0):
    fn = model_wrapper(model, ns, model_type=PRED[prediction_type])
    # diffusers' thresholding: s = clamp(quantile(|x0|, ratio), 1, sample_max_value), for every algorithm
    return DPMSolver(fn, ns, algorithm_type=algorithm_type, backend="torch", thresholding_semantics="diffusers",
                     correcting_x0_fn="dynamic_thresholding" if thresholding else None,
                     thresholding_max_val=max_val, dynamic_thresholding_ratio=ratio)


def step_errors(ours: Recorder, out_ours: torch.Tensor, theirs: Recorder, out_theirs: torch.Tensor) -> list[float]:
    """Relative error of every sample (each model input, then the result); the model labels must agree."""
    assert len(ours.inputs) == len(theirs.inputs), "different numbers of model evaluations"
    np.testing.assert_allclose(ours.labels, theirs.labels, rtol=0, atol=1e-9)
    errs = []
    for a, b in zip(ours.inputs + [out_ours], theirs.inputs + [out_theirs], strict=True):
        a64, b64 = a.double(), b.double()
        errs.append(float((a64 - b64).abs().max()) / max(1.0, float(a64.abs().max())))
    return errs


def check(errs: list[float], tol: float = RTOL) -> None:
    worst = max(errs)
    assert worst <= tol, f"max relative step error {worst:.3e} at sample {errs.index(worst)} > {tol}: " + \
        " ".join(f"{e:.1e}" for e in errs)


def multistep_case(betas="linear", order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
                   prediction_type="epsilon", steps=12, lower_order_final=True, final_sigmas_type="sigma_min",
                   thresholding=False, euler_at_final=False, use_karras_sigmas=False, scale=1.0,
                   sample_max_value=1.0, multistep3=None, our_thresholding=None) -> list[float]:
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=N_TRAIN, **BETAS[betas], solver_order=order, prediction_type=prediction_type,
        algorithm_type=algorithm_type, solver_type=solver_type, lower_order_final=lower_order_final,
        final_sigmas_type=final_sigmas_type, thresholding=thresholding, sample_max_value=sample_max_value,
        euler_at_final=euler_at_final, use_karras_sigmas=use_karras_sigmas)
    sched.set_timesteps(steps)
    n = len(sched.timesteps)
    ns = NoiseScheduleVP("discrete", alphas_cumprod=sched.alphas_cumprod)
    assert ns.total_N == N_TRAIN
    sde = algorithm_type.startswith("sde")
    noise = sde_noise(n) if sde else None
    theirs = Recorder(gmm_for(ns, prediction_type, scale))
    out_theirs = run_diffusers(sched, theirs, noise)

    times = [t_of(k) for k in sched.timesteps] + [1.0 / N_TRAIN]
    points = None
    if use_karras_sigmas:
        points = [C.Point.from_vp_of_ve_sigma(float(s)) for s in sched.sigmas]
    elif final_sigmas_type == "zero":
        points = [point_at(ns, t) for t in times[:-1]] + [ZERO]
    orders = P.multistep_orders(n, order, lower_order_final, threshold=15)
    if final_sigmas_type == "zero" or euler_at_final:
        orders[-1] = 1
    if multistep3 is None:
        multistep3 = "diffusers" if sde else "standard"
    plan = P.plan_multistep(ns, algorithm_type, solver_type, times, orders, eta=1.0 if sde else 0.0,
                            multistep3=multistep3, points=points)
    ours = Recorder(theirs.gmm)
    thr = thresholding if our_thresholding is None else our_thresholding
    solver = solver_for(ns, prediction_type, algorithm_type, ours, thr, max_val=sample_max_value)
    out_ours = solver.execute(x_T().double(), plan, noise=None if noise is None else noise.double())
    return step_errors(ours, out_ours, theirs, out_theirs)


def split_blocks(order_list: list[int]) -> list[int]:
    """Block orders of diffusers' singlestep order list: each block is a run 1, 2, ..., k."""
    blocks: list[int] = []
    for o in order_list:
        if o == 1:
            blocks.append(1)
        else:
            assert blocks and o == blocks[-1] + 1, f"unexpected order list {order_list}"
            blocks[-1] = o
    return blocks


def singlestep_case(betas="linear", order=3, algorithm_type="dpmsolver++", solver_type="midpoint",
                    prediction_type="epsilon", steps=12, lower_order_final=False, final_sigmas_type="sigma_min",
                    thresholding=False, scale=1.0, sample_max_value=1.0, float64=False) -> list[float]:
    sched = DPMSolverSinglestepScheduler(
        num_train_timesteps=N_TRAIN, **BETAS[betas], solver_order=order, prediction_type=prediction_type,
        algorithm_type=algorithm_type, solver_type=solver_type, lower_order_final=lower_order_final,
        final_sigmas_type=final_sigmas_type, thresholding=thresholding, sample_max_value=sample_max_value)
    sched.set_timesteps(steps)
    if float64:
        # diffusers computes in the dtype of its sigmas: upcast them, and build our schedule from the very same
        # float32 sigma table (alpha^2 = 1 / (1 + sigma^2)) so that the points agree to float64 rounding
        sig = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5  # diffusers' train sigmas (float32)
        ns = NoiseScheduleVP("discrete", alphas_cumprod=1.0 / (1.0 + sig.double() ** 2))
        sched.sigmas = sched.sigmas.double()
    else:
        ns = NoiseScheduleVP("discrete", alphas_cumprod=sched.alphas_cumprod)
    theirs = Recorder(gmm_for(ns, prediction_type, scale))
    out_theirs = run_diffusers(sched, theirs, None, torch.float64 if float64 else torch.float32)

    ts = [t_of(k) for k in sched.timesteps] + [1.0 / N_TRAIN]
    blocks = split_blocks(list(sched.order_list))
    assert sum(blocks) == len(sched.timesteps)
    starts = np.cumsum([0] + blocks)
    outer = [ts[i] for i in starts]
    inner = [[ts[i + j] for j in range(1, o)] for i, o in zip(starts[:-1], blocks, strict=True)]
    ours = Recorder(theirs.gmm)
    solver = solver_for(ns, prediction_type, algorithm_type, ours, thresholding, max_val=sample_max_value)
    x = x_T().double()
    if final_sigmas_type == "zero":
        # diffusers' last step is then first order to sigma = 0; plan_singlestep has no `points`, so that last
        # block runs as a one-step multistep plan whose end point is (alpha, sigma) = (1, 0)
        assert blocks[-1] == 1
        plan = P.plan_singlestep(ns, algorithm_type, solver_type, outer[:-1], blocks[:-1], u2_form="solver_type",
                                 inner_times=inner[:-1])
        x = solver.execute(x, plan)
        last = P.plan_multistep(ns, algorithm_type, solver_type, outer[-2:], [1],
                                points=[point_at(ns, outer[-2]), ZERO])
        x = solver.execute(x, last)
    else:
        plan = P.plan_singlestep(ns, algorithm_type, solver_type, outer, blocks, u2_form="solver_type",
                                 inner_times=inner)
        x = solver.execute(x, plan)
    return step_errors(ours, x, theirs, out_theirs)


# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("betas", list(BETAS))
def test_time_mapping(betas):
    """diffusers timestep k <-> t = (k + 1) / N; sigma_k <-> Point.from_vp_of_ve_sigma; sigma_min <-> t = 1/N."""
    sched = DPMSolverMultistepScheduler(num_train_timesteps=N_TRAIN, **BETAS[betas], final_sigmas_type="sigma_min")
    sched.set_timesteps(25)
    ns = NoiseScheduleVP("discrete", alphas_cumprod=sched.alphas_cumprod)
    wrapped = model_wrapper(lambda x, t: x, ns)
    times = [t_of(k) for k in sched.timesteps] + [1.0 / N_TRAIN]
    for i, t in enumerate(times):
        ours, theirs = point_at(ns, t), C.Point.from_vp_of_ve_sigma(float(sched.sigmas[i]))
        assert ours.alpha == pytest.approx(theirs.alpha, rel=1e-6)
        assert ours.sigma == pytest.approx(theirs.sigma, rel=1e-6)
        assert ours.lam == pytest.approx(theirs.lam, abs=1e-6)
    for k, t in zip(sched.timesteps, times, strict=False):
        label = float(wrapped.model_input_time(torch.tensor([t], dtype=torch.float64)))
        assert label == pytest.approx(float(k), abs=1e-9)
        assert point_at(ns, t).lam == pytest.approx(float(sched.lambda_t[int(k)]), abs=2e-6)
    zero = DPMSolverMultistepScheduler(num_train_timesteps=N_TRAIN, **BETAS[betas], final_sigmas_type="zero")
    zero.set_timesteps(25)
    assert float(zero.sigmas[-1]) == 0.0 and C.Point.from_vp_of_ve_sigma(0.0) == ZERO


def _ids(cases):
    return ["-".join(str(v) for v in c) for c in cases]


# The option matrix is covered pairwise rather than as a full product (each run costs ~0.1 s on a busy machine):
# every algorithm x order x solver_type, each prediction type with each algorithm, and so on.
ODE_CASES = [(alg, order, st, list(PRED)[i % 3])
             for i, (alg, order, st) in enumerate((a, o, s) for a in ("dpmsolver++", "dpmsolver")
                                                  for o in (1, 2, 3) for s in ("midpoint", "heun"))]


@pytest.mark.parametrize("algorithm_type,order,solver_type,prediction_type", ODE_CASES, ids=_ids(ODE_CASES))
def test_multistep_ode(algorithm_type, order, solver_type, prediction_type):
    check(multistep_case(order=order, algorithm_type=algorithm_type, solver_type=solver_type,
                         prediction_type=prediction_type))


STEP_CASES = [  # (betas, steps, lower_order_final, final_sigmas_type): diffusers lowers the final orders below 15
    ("linear", 8, True, "sigma_min"), ("scaled_linear", 8, True, "zero"), ("linear", 8, False, "sigma_min"),
    ("scaled_linear", 14, True, "sigma_min"), ("linear", 14, False, "zero"), ("linear", 15, True, "sigma_min"),
    ("scaled_linear", 15, True, "zero"), ("linear", 20, True, "zero"), ("scaled_linear", 20, False, "sigma_min"),
]


@pytest.mark.parametrize("betas,steps,lower_order_final,final_sigmas_type", STEP_CASES, ids=_ids(STEP_CASES))
def test_multistep_steps_and_final(betas, steps, lower_order_final, final_sigmas_type):
    """lower_order_final below and above diffusers' threshold of 15 steps; last sigma sigma_min or 0 (order 3)."""
    check(multistep_case(betas=betas, order=3, steps=steps, lower_order_final=lower_order_final,
                         final_sigmas_type=final_sigmas_type))


def test_multistep_euler_at_final():
    check(multistep_case(order=3, steps=20, euler_at_final=True))


THR_CASES = [("dpmsolver++", "epsilon", 3), ("dpmsolver++", "sample", 2), ("dpmsolver++", "v_prediction", 3),
             ("dpmsolver", "epsilon", 2), ("dpmsolver", "sample", 3), ("dpmsolver", "v_prediction", 2)]


@pytest.mark.parametrize("algorithm_type,prediction_type,order", THR_CASES, ids=_ids(THR_CASES))
def test_multistep_thresholding(algorithm_type, prediction_type, order):
    """diffusers' dynamic thresholding (ratio 0.995, s in [1, sample_max_value]); noise solvers via x0 and back."""
    check(multistep_case(order=order, algorithm_type=algorithm_type, prediction_type=prediction_type, **THRESHOLD))


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "dpmsolver"])
def test_thresholding_is_active(algorithm_type):
    """The thresholding cases are not vacuous: without thresholding on our side they would fail by far."""
    assert max(multistep_case(algorithm_type=algorithm_type, **THRESHOLD, our_thresholding=False)) > 1e-2


SDE_CASES = [(1, "midpoint", "zero", "epsilon"), (1, "heun", "sigma_min", "v_prediction"),
             (2, "midpoint", "sigma_min", "epsilon"), (2, "heun", "zero", "v_prediction"),
             (2, "midpoint", "zero", "sample"), (3, "midpoint", "zero", "v_prediction"),
             (3, "heun", "sigma_min", "epsilon")]


@pytest.mark.parametrize("order,solver_type,final_sigmas_type,prediction_type", SDE_CASES, ids=_ids(SDE_CASES))
def test_multistep_sde_dpmsolver_pp(order, solver_type, final_sigmas_type, prediction_type):
    """SDE-DPM-Solver++ (eta = 1), the same noise as `variance_noise`; order 3 = our "diffusers" variant."""
    check(multistep_case(order=order, algorithm_type="sde-dpmsolver++", solver_type=solver_type,
                         final_sigmas_type=final_sigmas_type, prediction_type=prediction_type))


@pytest.mark.parametrize("order,solver_type", [(1, "midpoint"), (2, "midpoint"), (2, "heun")])
def test_multistep_sde_dpmsolver(order, solver_type):
    check(multistep_case(order=order, algorithm_type="sde-dpmsolver", solver_type=solver_type))


def test_sde_order3_is_diffusers_variant():
    """diffusers' 3rd-order SDE update is not k-diffusion's 3M ("standard"): only our "diffusers" variant matches."""
    check(multistep_case(order=3, algorithm_type="sde-dpmsolver++", steps=20))
    assert max(multistep_case(order=3, algorithm_type="sde-dpmsolver++", steps=20, multistep3="standard")) > 1e-2


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
def test_multistep_karras_sigmas(algorithm_type):
    """Sigmas between integer timesteps: points from diffusers' sigmas (from_vp_of_ve_sigma), labels rounded."""
    check(multistep_case(betas="scaled_linear", order=2, algorithm_type=algorithm_type, use_karras_sigmas=True,
                         final_sigmas_type="zero", steps=15))


SINGLE_CASES = [  # (algorithm_type, order, solver_type, steps, lower_order_final, final_sigmas_type)
    ("dpmsolver++", 1, "midpoint", 10, True, "zero"),
    ("dpmsolver", 1, "heun", 11, True, "sigma_min"),
    ("dpmsolver++", 2, "midpoint", 12, False, "sigma_min"),
    ("dpmsolver++", 2, "heun", 11, True, "zero"),
    ("dpmsolver", 2, "midpoint", 10, True, "sigma_min"),
    ("dpmsolver", 2, "heun", 12, False, "sigma_min"),
    ("dpmsolver++", 3, "midpoint", 12, False, "sigma_min"),
    ("dpmsolver++", 3, "heun", 10, True, "zero"),
    ("dpmsolver++", 3, "midpoint", 11, True, "zero"),
    ("dpmsolver++", 3, "heun", 12, True, "sigma_min"),
    ("dpmsolver", 3, "midpoint", 10, True, "sigma_min"),  # the largest float32 deviation (1.4e-5)
    ("dpmsolver", 3, "heun", 11, True, "sigma_min"),
    ("dpmsolver", 3, "midpoint", 12, False, "sigma_min"),
]


@pytest.mark.parametrize("algorithm_type,order,solver_type,steps,lower_order_final,final_sigmas_type", SINGLE_CASES,
                         ids=_ids(SINGLE_CASES))
def test_singlestep(algorithm_type, order, solver_type, steps, lower_order_final, final_sigmas_type):
    check(singlestep_case(order=order, algorithm_type=algorithm_type, solver_type=solver_type, steps=steps,
                          lower_order_final=lower_order_final, final_sigmas_type=final_sigmas_type))


@pytest.mark.parametrize("prediction_type,thresholding", [("epsilon", True), ("sample", False),
                                                          ("v_prediction", True)])
def test_singlestep_prediction_types(prediction_type, thresholding):
    # (thresholding with algorithm_type="dpmsolver" crashes inside diffusers' singlestep scheduler: not tested)
    kw = THRESHOLD if thresholding else {}
    check(singlestep_case(betas="scaled_linear", order=3, prediction_type=prediction_type, **kw))


F64_CASES = [("dpmsolver++", 2, "midpoint", "sigma_min"), ("dpmsolver++", 3, "heun", "zero"),
             ("dpmsolver++", 3, "midpoint", "sigma_min"), ("dpmsolver", 2, "heun", "sigma_min"),
             ("dpmsolver", 3, "midpoint", "sigma_min"), ("dpmsolver", 3, "heun", "sigma_min")]


@pytest.mark.parametrize("algorithm_type,order,solver_type,final_sigmas_type", F64_CASES, ids=_ids(F64_CASES))
def test_singlestep_float64(algorithm_type, order, solver_type, final_sigmas_type):
    """Without diffusers' float32 the singlestep updates agree to float64 rounding (the formulas are the same)."""
    check(singlestep_case(order=order, algorithm_type=algorithm_type, solver_type=solver_type, steps=11,
                          lower_order_final=True, final_sigmas_type=final_sigmas_type, float64=True), RTOL64)
