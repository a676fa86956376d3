"""k-diffusion-style samplers on the fused step: same signatures, defaults and results as `k_diffusion.sampling`.

    from dpm_kernels.k_diffusion import sample_dpmpp_2m, sample_dpmpp_sde, sample_dpm_fast, sample_dpm_2
    x0 = sample_dpmpp_2m(denoiser, x, sigmas)

k-diffusion works with x_ve = x / alpha and a denoiser ``model(x, sigma, **extra_args) -> x0``; in these
variables a VP point is (alpha = 1, sigma = sigma_ve, lambda = -log sigma), so the DPM-Solver(++) updates apply
unchanged (`coefficients.Point.from_ve_sigma`). Every model evaluation is followed by one fused op: convert (the
DPM-Solver samplers `dpm_fast` / `dpm_adaptive` work in eps = (x - x0) / sigma), store in a ring buffer, combine,
add noise. A trajectory is planned once (`planner.plan_multistep`, `plan_two_stage`, `plan_singlestep`; cached:
the same sigmas again plan and upload nothing) and its coefficient table uploaded once. DPM2 (`sample_dpm_2`,
`sample_dpm_2_ancestral`) is `plan_two_stage`'s "dpm2" form, on the grid values k-diffusion computes itself (its
churned sigma_hat, its log-sigma midpoints, its ancestral sigma_down / sigma_up, in the sigmas' dtype).

Noise: each sampler calls ``noise_sampler(sigma, sigma_next)`` where k-diffusion calls it, with the same arguments
(the round-tripped float values k-diffusion computes in the sigmas' dtype), and by default draws what k-diffusion
draws: `torch.randn_like` for `dpmpp_2s_ancestral`, `dpm_2_ancestral`, `dpm_fast`, `dpm_adaptive`, and a
Brownian tree seeded from the global RNG (`noise.BrownianTreeNoise`, k-diffusion's construction; needs torchsde) for
`dpmpp_sde`, `dpmpp_2m_sde`, `dpmpp_3m_sde`; `dpm_2` draws its churn noise from the global RNG in every step, as
k-diffusion does. With the same global seed the results are k-diffusion's.

Differences from k-diffusion, by design: the sigmas must be non-increasing (a repeated sigma is a zero-length step,
the identity); the coefficients are float64 (`dpm_fast` keeps k-diffusion's float32 time grid, so that it takes the
same steps, and differs from it by ~1e-7 relative); `dpm_adaptive` takes k-diffusion's own float32 times and
coefficients (`_adaptive_updates`), since its step size controller and a Brownian tree's noise turn any other
rounding into other steps (float64 samples then take k-diffusion's steps exactly; float32 ones differ by the
kernels' rounding of the two solutions, which can move a step); `sample_dpmpp_3m_sde` takes
``multistep3="third_order"`` for a truly third-order update (the default "standard" reproduces k-diffusion, whose
update has local error O(h^3)).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import coefficients as C
from . import planner as P
from .noise import BrownianTreeNoise
from .ops import bind, default_history_dtype

_plans = P.Cache(64)  # the same sigmas and options again (the next image): planned and uploaded once
EPS_FROM_DENOISER = P.Conversion("x_start", "eps")  # k-diffusion's DPMSolver: eps = (x - model(x)) / sigma


def _sigmas(sigmas: torch.Tensor) -> list[float]:
    if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas: expected a 1-D tensor of at least 2 noise levels")
    sig = sigmas.detach().double().cpu().tolist()
    if any(not math.isfinite(s) or s < 0 for s in sig):
        raise ValueError("sigmas: noise levels must be finite and >= 0")
    if any(b > a for a, b in zip(sig, sig[1:], strict=False)):
        raise ValueError("sigmas: must be non-increasing (a repeated sigma is a zero-length step, the identity)")
    return sig


def _check_x(x) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x: expected a floating-point tensor")


def _checked_output(denoised, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(denoised, torch.Tensor) or not denoised.is_floating_point():
        raise TypeError(f"model: must return a floating-point tensor (the denoised x0), got "
                        f"{denoised.dtype if isinstance(denoised, torch.Tensor) else type(denoised).__name__}")
    return denoised if denoised.dtype == dtype else denoised.to(dtype)


def _brownian_default(x, sigmas: torch.Tensor, noise_sampler):
    """k-diffusion's default for the SDE samplers: a tree over [min positive sigma, max sigma]."""
    if noise_sampler is not None:
        return noise_sampler
    return BrownianTreeNoise(x, sigmas[sigmas > 0].min(), sigmas.max())


def _run(model, x: torch.Tensor, plan: P.Plan, model_sigmas, extra_args, callback, disable, noise_for,
         conversion: P.Conversion = P.IDENTITY_X0, backend: str = "auto", info=None) -> torch.Tensor:
    """Run `plan`'s evaluations: the model at x (Eval.source "x") or at the intermediate point u, each followed by
    its fused step. model_sigmas[k]: the sigma of evaluation k (float64); noise_for(k, ev): the noise of evaluation
    k or None (it calls the noise sampler where k-diffusion does). The callback runs after each step's first
    evaluation, with k-diffusion's keys; info(i) gives step i's sigma keys (and any others)."""
    extra_args = {} if extra_args is None else extra_args
    rows = plan.device_table(conversion, x.device, what="sigmas").rows
    step = bind(backend, x.device)
    slots = torch.empty((plan.n_slots,) + tuple(x.shape), dtype=default_history_dtype(x.dtype),
                        device=x.device).unbind(0)
    # k-diffusion's `sigma * s_in`: the 0-d sigma takes s_in's (x's) dtype and device
    sig_in = torch.tensor(np.asarray(model_sigmas, dtype=np.float64)).to(device=x.device, dtype=x.dtype)
    sig_in = sig_in[:, None].expand(len(plan.evals), x.shape[0]).contiguous().unbind(0)
    cur = x.clone(memory_format=torch.contiguous_format)
    u = torch.empty_like(cur) if plan.needs_u else None
    spare = torch.empty_like(cur) if callback is not None else None
    from tqdm.auto import tqdm

    with tqdm(total=plan.evals[-1].step if plan.evals else 0, disable=disable) as bar:
        for k, ev in enumerate(plan.evals):
            at = cur if ev.source == "x" else u
            denoised = _checked_output(model(at, sig_in[k], **extra_args), cur.dtype)
            if callback is not None and ev.source == "x":
                callback({"x": cur, "i": ev.step - 1, **info(ev.step - 1), "denoised": denoised})
            z = noise_for(k, ev)
            z = z.to(cur.dtype) if z is not None and ev.noisy else None
            # a callback may keep `x`: then a step's result goes to a second buffer instead of in place
            out = u if ev.dest == "u" else cur if spare is None else spare
            x_eval = None if ev.source == "x" else u
            h = ([x_eval] if ev.reads_eval else []) + [slots[j] for j in ev.read_slots] + [None, None]
            step(cur, denoised, rows[k], out, None if ev.write_slot is None else slots[ev.write_slot], h[0], h[1],
                 x_eval, z)
            if ev.dest == "x":
                bar.update(1)
                if spare is not None:
                    cur, spare = out, torch.empty_like(cur)
    return cur


def _multistep(model, x, sigmas, extra_args, callback, disable, algorithm, solver_type, max_order, eta, s_noise,
               noise_sampler, multistep3="standard", backend="auto"):
    _check_x(x)
    sig = _sigmas(sigmas)
    n = len(sig) - 1
    orders = [1 if sig[i + 1] == 0 else min(max_order, i + 1) for i in range(n)]
    plan = _plans.get(("multistep", tuple(sig), algorithm, solver_type, max_order, eta, s_noise, multistep3),
                      lambda: P.plan_multistep(None, algorithm, solver_type, sig, orders, eta, s_noise, multistep3,
                                               points=C.Point.from_ve_sigma(sig)))
    if algorithm.startswith("sde"):
        noise_sampler = _brownian_default(x, sigmas, noise_sampler)

    def noise_for(k, ev):  # k-diffusion draws when eta is set, in every step but one to sigma = 0
        return noise_sampler(sigmas[k], sigmas[k + 1]) if ev.noisy else None

    return _run(model, x, plan, sig[:-1], extra_args, callback, disable, noise_for, backend=backend,
                info=lambda i: {"sigma": sigmas[i], "sigma_hat": sigmas[i]})


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, *, backend="auto"):
    """DPM-Solver++(2M) (k-diffusion's signature): model(x, sigma, **extra_args) -> denoised."""
    return _multistep(model, x, sigmas, extra_args, callback, disable, "dpmsolver++", "dpmsolver", 2, 0.0, 1.0,
                      None, backend=backend)


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, solver_type="midpoint", *, backend="auto"):
    """DPM-Solver++(2M) SDE (k-diffusion's signature); solver_type "midpoint" or "heun"."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError("solver_type: must be 'heun' or 'midpoint'")
    return _multistep(model, x, sigmas, extra_args, callback, disable, "sde-dpmsolver++", solver_type, 2, eta,
                      s_noise, noise_sampler, backend=backend)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, *, multistep3="standard", backend="auto"):
    """DPM-Solver++(3M) SDE (k-diffusion's signature). multistep3: "standard" | "third_order"."""
    # k-diffusion's second step (before three outputs exist) uses the phi_2 (taylor) form
    return _multistep(model, x, sigmas, extra_args, callback, disable, "sde-dpmsolver++", "taylor", 3, eta,
                      s_noise, noise_sampler, multistep3, backend=backend)


def _two_stage(model, x, sigmas, extra_args, callback, disable, form, eta, s_noise, r, noise_for_plan, backend):
    _check_x(x)
    sig = _sigmas(sigmas)
    plan = _plans.get(("two_stage", tuple(sig), form, eta, s_noise, r),
                      lambda: P.plan_two_stage(sig, form, eta, s_noise, r))
    return _run(model, x, plan, [ev.t for ev in plan.evals], extra_args, callback, disable, noise_for_plan(plan),
                backend=backend, info=lambda i: {"sigma": sigmas[i], "sigma_hat": sigmas[i]})


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                              noise_sampler=None, *, backend="auto"):
    """Ancestral DPM-Solver++(2S) (k-diffusion's signature): two model calls per step (one in a step to sigma = 0),
    noise ``noise_sampler(sigmas[i], sigmas[i + 1])`` (default randn_like) after every step but one to 0."""
    if noise_sampler is None:
        noise_sampler = lambda sigma, sigma_next: torch.randn_like(x)  # noqa: E731

    def noise_for_plan(plan):
        def noise_for(k, ev):
            i = ev.step - 1
            return noise_sampler(sigmas[i], sigmas[i + 1]) if ev.dest == "x" and ev.t_next > 0 else None
        return noise_for

    return _two_stage(model, x, sigmas, extra_args, callback, disable, "2s_ancestral", eta, s_noise, 0.5,
                      noise_for_plan, backend)


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                     noise_sampler=None, r=1 / 2, *, backend="auto"):
    """DPM-Solver++ (stochastic) (k-diffusion's signature): two model calls per step, the second at
    sigma_i^(1-r) sigma_{i+1}^r, each followed by Brownian noise (default: a Brownian tree seeded from the global
    RNG, as k-diffusion); a last step to sigma = 0 is one call."""
    _check_x(x)
    noise_sampler = _brownian_default(x, sigmas, noise_sampler)
    # k-diffusion's query sigmas: sigma_fn(t), sigma_fn(t + r h), sigma_fn(t_next), in the sigmas' dtype
    sg = sigmas.detach().cpu()
    t = sg.log().neg()
    t_mid = t[:-1] + (t[1:] - t[:-1]) * r
    q_from, q_mid, q_to = t[:-1].neg().exp(), t_mid.neg().exp(), t[1:].neg().exp()

    def noise_for_plan(plan):
        def noise_for(k, ev):
            i = ev.step - 1
            if ev.order == 1:  # the Euler step to sigma = 0
                return None
            return noise_sampler(q_from[i], q_mid[i] if ev.dest == "u" else q_to[i])
        return noise_for

    return _two_stage(model, x, sigmas, extra_args, callback, disable, "sde", eta, s_noise, r, noise_for_plan,
                      backend)


def _dpm2(model, x, sigmas, extra_args, callback, disable, starts, mids, ends, noise, noise_for, sigma_hats,
          backend):
    """Run DPM2 (`planner.plan_two_stage` form "dpm2") on k-diffusion's own float values: per interval i the
    (churned) start sigma, the midpoint, the end (sigma_{i+1} or sigma_down) and the noise scale after the interval
    (0-d tensors or floats in the sigmas' dtype, as k-diffusion computes them)."""
    f = [[float(v) for v in vals] for vals in (starts, mids, ends, noise)]
    plan = _plans.get(("dpm2", *map(tuple, f)), lambda: P.plan_two_stage(
        _sigmas(sigmas), "dpm2", starts=f[0], mids=f[1], ends=f[2], noise=f[3]))
    return _run(model, x, plan, [ev.t for ev in plan.evals], extra_args, callback, disable, noise_for,
                backend=backend, info=lambda i: {"sigma": sigmas[i], "sigma_hat": sigma_hats[i]})


def _log_midpoint(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """k-diffusion's DPM2 midpoint exp(lerp(log a, log b, 1/2)), in the sigmas' dtype (0 where b = 0: not used)."""
    return a.log().lerp(b.log(), 0.5).exp() if b != 0 else b


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float("inf"), s_noise=1., *, backend="auto"):
    """DPM2 (k-diffusion's "inspired by DPM-Solver-2" sampler and signature): per interval an Euler step to the
    log-sigma midpoint and one from sigma_hat to sigma_{i+1} with the midpoint's derivative (a last step to 0:
    Euler); Karras' churn (s_churn, s_tmin, s_tmax, s_noise) raises sigma_i to sigma_hat with noise drawn from the
    global RNG in every step, as k-diffusion draws it. The churn of step i + 1 is added by step i's last fused op
    (drawn after its model call, where k-diffusion draws it); only step 0's is a separate add."""
    _check_x(x)
    sig = _sigmas(sigmas)
    n = len(sig) - 1
    sg = sigmas.detach().cpu()
    gammas = [min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= sg[i] <= s_tmax else 0. for i in range(n)]
    hats = [sg[i] * (g + 1) for i, g in enumerate(gammas)]
    churn = [(h ** 2 - sg[i] ** 2) ** 0.5 if g > 0 else 0.0 for i, (g, h) in enumerate(zip(gammas, hats, strict=True))]
    eps = torch.randn_like(x) * s_noise  # k-diffusion's draw of step 0, before the first model call
    if gammas[0] > 0:
        x = x + eps * torch.as_tensor(churn[0]).to(x.device)
    noise = [s_noise * float(churn[i + 1]) for i in range(n - 1)] + [0.0]

    def noise_for(k, ev):  # step i + 1's draw, after step i's last model call
        return torch.randn_like(x) if ev.dest == "x" and ev.step < n else None

    return _dpm2(model, x, sigmas, extra_args, callback, disable, hats,
                 [_log_midpoint(hats[i], sg[i + 1]) for i in range(n)], sg[1:], noise, noise_for, hats, backend)


def _get_ancestral_step(sigma_from, sigma_to, eta):
    """k-diffusion's `get_ancestral_step` in its own arithmetic (0-d tensors of the sigmas' dtype): the grid values
    its DPM2 ancestral sampler steps to (`coefficients.ancestral` is the same split in float64)."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - up ** 2) ** 0.5, up


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, *, backend="auto"):
    """Ancestral DPM2 (k-diffusion's signature): DPM2 from sigma_i to sigma_down, then
    ``noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up`` (default randn_like); where sigma_down = 0 one
    Euler call to 0 and no noise, as k-diffusion."""
    _check_x(x)
    sig = _sigmas(sigmas)
    n = len(sig) - 1
    if noise_sampler is None:
        noise_sampler = lambda sigma, sigma_next: torch.randn_like(x)  # noqa: E731
    sg = sigmas.detach().cpu()
    downs, ups = zip(*(_get_ancestral_step(sg[i], sg[i + 1], eta) for i in range(n)), strict=True)
    noise = [0.0 if float(d) == 0 else s_noise * float(u) for d, u in zip(downs, ups, strict=True)]

    def noise_for(k, ev):
        i = ev.step - 1
        return noise_sampler(sigmas[i], sigmas[i + 1]) if ev.source == "u" else None

    return _dpm2(model, x, sigmas, extra_args, callback, disable, sg[:-1],
                 [_log_midpoint(sg[i], downs[i]) for i in range(n)], downs, noise, noise_for, sg[:-1], backend)


def _sigma_limits(sigma_min, sigma_max):
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    # k-diffusion's t(torch.tensor(sigma)): float32 for Python floats
    return torch.as_tensor(sigma_max).log().neg(), torch.as_tensor(sigma_min).log().neg()


def _ancestral_target(t, t_next, t_end, eta):
    """k-diffusion's DPMSolver ancestral split in float32 time: (ODE target time, noise scale as a 0-d tensor)."""
    if not eta:
        return t_next, 0.0
    s_from, s_to = t.neg().exp(), t_next.neg().exp()
    s_up = torch.minimum(s_to, eta * (s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2) ** 0.5)
    s_down = (s_to ** 2 - s_up ** 2) ** 0.5
    target = torch.minimum(t_end, s_down.log().neg())
    return target, (s_to ** 2 - target.neg().exp() ** 2) ** 0.5


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.0,
                    s_noise=1.0, noise_sampler=None, *, backend="auto"):
    """DPM-Solver-fast (k-diffusion's signature): n model evaluations in singlestep blocks of orders 3, ..., 2, 1
    on a grid uniform in -log sigma from sigma_max to sigma_min (no final denoising step), noise-prediction
    DPM-Solver updates; eta > 0: ancestral blocks, noise ``noise_sampler(sigma(t), sigma(t_next))`` (default
    randn_like, drawn every step as k-diffusion does)."""
    _check_x(x)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: the number of model evaluations must be a positive integer, got {n!r}")
    t_start, t_end = _sigma_limits(sigma_min, sigma_max)
    if not t_end > t_start and eta:
        raise ValueError("eta must be 0 for reverse sampling")
    if noise_sampler is None:
        noise_sampler = lambda sigma, sigma_next: torch.randn_like(x)  # noqa: E731
    orders = P.singlestep_orders(n, 3)  # the authors' DPM-Solver-fast orders, which k-diffusion uses
    ts = torch.linspace(t_start, t_end, len(orders) + 1)  # float32, as k-diffusion
    targets, ups = zip(*(_ancestral_target(ts[i], ts[i + 1], t_end, eta) for i in range(len(orders))), strict=True)
    ups = [float(u * s_noise) for u in ups]  # k-diffusion's su * s_noise, rounded as it rounds it
    tl = ts.double().tolist()
    ends = [float(v) for v in targets]
    plan = _plans.get(("fast", tuple(tl), tuple(orders), tuple(ends), tuple(ups), s_noise),
                      lambda: P.plan_singlestep(P.VELambdaTime, "dpmsolver", "dpmsolver", tl, orders,
                                                inner_times=[list(np.linspace(tl[b], ends[b], o + 1)[1:-1])
                                                             for b, o in enumerate(orders)],
                                                block_ends=ends, block_noise=ups))

    def noise_for(k, ev):
        i = ev.step - 1
        return noise_sampler(ts[i].neg().exp(), ts[i + 1].neg().exp()) if ev.dest == "x" else None

    return _run(model, x, plan, [math.exp(-ev.t) for ev in plan.evals], extra_args, callback, disable, noise_for,
                EPS_FROM_DENOISER, backend,
                info=lambda i: {"sigma": ts[i].neg().exp(), "sigma_hat": ts[i].neg().exp(), "t": ts[i], "t_up": ts[i]})


def _adaptive_updates(s, t, order: int):
    """One attempt of k-diffusion's DPM-Solver-12 / -23 from time s to t (0-d float32 tensors, t = -log sigma): the
    sigma of each model evaluation and the update that follows it (x_high's, through u1 [, u2]), then x_low's update
    on the stored eps and which eps it starts from. Every number is k-diffusion's own: its float32 intermediate times
    and coefficients, in its order of operations (values the float64 formulas of `coefficients.singlestep` give to
    float32 rounding; tests/test_kdiffusion_samplers.py compares them). The step size controller feeds on the small
    difference x_high - x_low and Brownian-tree noise on the exact times, so only these very values reproduce
    k-diffusion's accept / reject sequence and noise."""
    sig = lambda v: v.neg().exp()  # noqa: E731
    h = t - s
    r1 = 1 / 2 if order == 2 else 1 / 3
    s1 = s + r1 * h
    c_u1 = float(sig(s1) * (r1 * h).expm1())  # u1 = x - c_u1 eps
    c1 = float(sig(t) * h.expm1())  # x - c1 eps: the first-order step
    c2 = float(sig(t) / (2 * r1) * h.expm1())  # dpm_solver_2_step: x - c1 eps - c2 (eps_r1 - eps)
    first = C.Update(1.0, (-c_u1,))
    if order == 2:
        return [(sig(s), first), (sig(s1), C.Update(1.0, (-c2, c2 - c1)))], C.Update(1.0, (-c1,)), 0
    r2 = 2 / 3
    s2 = s + r2 * h
    c_a = float(sig(s2) * (r2 * h).expm1())  # u2 = x - c_a eps - c_b (eps_r1 - eps)
    c_b = float(sig(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1))
    c3 = float(sig(t) / r2 * (h.expm1() / h - 1))  # x_3 = x - c1 eps - c3 (eps_r2 - eps)
    evals = [(sig(s), first), (sig(s1), C.Update(1.0, (-c_b, c_b - c_a))),
             (sig(s2), C.Update(1.0, (-c3, 0.0, c3 - c1)))]
    return evals, C.Update(1.0, (-c2, c2 - c1)), 1


class _PIDController:
    """k-diffusion's PID step size controller (error-per-unit, limiter 1 + atan(x - 1))."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety, self.eps = accept_safety, eps
        self.errs: list[float] = []

    def propose_step(self, error) -> bool:
        inv = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv, inv, inv]
        self.errs[0] = inv
        factor = 1 + math.atan(self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3 - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81,
                        eta=0.0, s_noise=1.0, noise_sampler=None, return_info=False, *, backend="auto"):
    """DPM-Solver-12 / -23 with PID step size control (k-diffusion's signature and step sequence): each attempt
    evaluates a lower- and a higher-order singlestep solution sharing `order` model evaluations and one error norm
    (a host sync per attempt, inherent to the method). Returns x, or (x, info) with return_info."""
    _check_x(x)
    if order not in (2, 3):
        raise ValueError("order should be 2 or 3")
    t_start, t_end = _sigma_limits(sigma_min, sigma_max)
    forward = bool(t_end > t_start)
    if not forward and eta:
        raise ValueError("eta must be 0 for reverse sampling")
    if noise_sampler is None:
        noise_sampler = lambda sigma, sigma_next: torch.randn_like(x)  # noqa: E731
    extra_args = {} if extra_args is None else extra_args
    h_init = abs(h_init) * (1 if forward else -1)
    atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
    pid = _PIDController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    step = bind(backend, x.device)
    hd = default_history_dtype(x.dtype)
    m = torch.empty((3,) + tuple(x.shape), dtype=hd, device=x.device).unbind(0)  # eps at s, s1, s2
    u = torch.empty_like(x, memory_format=torch.contiguous_format)
    x = x.clone(memory_format=torch.contiguous_format)
    x_prev = x
    s = t_start
    ones = x.new_ones([x.shape[0]])
    from tqdm.auto import tqdm

    with tqdm(disable=disable) as bar:
        while (s < t_end - 1e-5) if forward else (s > t_end + 1e-5):
            t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
            t_, su = _ancestral_target(s, t, t_end, eta) if eta else (t, 0.0)
            evals, low, low_from = _adaptive_updates(s, t_, order)
            for j, (sig, up) in enumerate(evals):  # evaluation j at x (j = 0) or at u, each stores its eps in m[j]
                pp = C.Point.from_ve_sigma(float(sig))
                den = _checked_output(model(x if j == 0 else u, float(sig) * ones, **extra_args), x.dtype)
                if j == 0:
                    d0 = den  # the callback's denoised
                row = torch.from_numpy(P.coefficient_rows(pp, EPS_FROM_DENOISER, up, "sigma_min")).to(x.device)
                last = j == len(evals) - 1
                x_high = torch.empty_like(x) if last else u
                step(x, den, row, x_high, None if last else m[j], m[j - 1] if j > 0 else None,
                     m[j - 2] if j > 1 else None, None if j == 0 else u, None)
            # x_low: the lower-order combination of the stored eps (identity conversion, newest first)
            lrow = torch.from_numpy(P.coefficient_rows(pp, P.Conversion.identity("eps"), low, "sigma_min"))
            x_low = torch.empty_like(x)
            step(x, m[low_from].to(x.dtype), lrow.to(x.device), x_low, None, m[0] if low_from == 1 else None, None,
                 None, None)
            delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            accept = pid.propose_step(error)
            if accept:
                x_prev = x_low
                z = noise_sampler(s.neg().exp(), t.neg().exp())
                x = x_high + su * s_noise * z if su else x_high
                s = t
                info["n_accept"] += 1
            else:
                info["n_reject"] += 1
            info["nfe"] += order
            info["steps"] += 1
            bar.update(order)
            if callback is not None:
                callback({"sigma": s.neg().exp(), "sigma_hat": s.neg().exp(), "x": x, "i": info["steps"] - 1,
                          "t": s, "t_up": s, "denoised": d0, "error": error, "h": pid.h, **info})
    return (x, info) if return_info else x
