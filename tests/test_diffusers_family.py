"""The fused inverse, EDM, cosine and SDE drop-ins against diffusers' own schedulers, step by step.

Every run checks that the fused path ran (fused_reason None, one fused call per step) and compares every step:
- deterministic configurations: the fused float32 trajectory may be off diffusers' float64 trajectory (its sigmas
  patched to float64 after set_timesteps) by at most twice what diffusers' float32 trajectory is, plus 1e-6, and
  the fused float64 trajectory must equal diffusers' float64 one to TOL64 (these classes compute in the input dtype);
- SDE configurations (the noise depends on the dtype, so float32 and float64 runs differ): the same noise on both
  sides, fused float32 vs diffusers float32 within TOL32_SDE (diffusers' float32 coefficients), float64 vs float64
  within TOL64.
Errors are max |x - ref| / max(1, max |ref|) over all steps. The option matrices are those of diffusers' own test
files for these schedulers (tests/schedulers/test_scheduler_{dpm_multi_inverse,edm_dpmsolver_multistep,
cosine_dpmsolver_multistep,dpm_sde}.py), plus the grids and orders they leave out.
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings

import pytest
import torch
from conftest import assert_drop_in_surface, backends_for
from kdiff_import import load_sampling

try:
    import diffusers
    from diffusers import (
        CosineDPMSolverMultistepScheduler,
        DPMSolverMultistepInverseScheduler,
        DPMSolverSDEScheduler,
        EDMDPMSolverMultistepScheduler,
    )
except ImportError as exc:  # a required test dependency: fail loudly instead of skipping
    raise ImportError("diffusers is a required test dependency (pip install diffusers==0.42.1)") from exc

from dpm_kernels import coefficients as C
from dpm_kernels.integrations.diffusers import (
    FusedCosineDPMSolverMultistepScheduler,
    FusedDPMSolverMultistepInverseScheduler,
    FusedDPMSolverMultistepScheduler,
    FusedDPMSolverSDEScheduler,
    FusedEDMDPMSolverMultistepScheduler,
)

BACKENDS = [b for b in backends_for("cpu") if b in ("torch", "cpu")]
SHAPE = (2, 3, 4, 4)
TOL64 = 1e-9
TOL32_SDE = 1e-5  # measured <= 6e-7
PAIRS = {"inverse": (DPMSolverMultistepInverseScheduler, FusedDPMSolverMultistepInverseScheduler),
         "edm": (EDMDPMSolverMultistepScheduler, FusedEDMDPMSolverMultistepScheduler),
         "cosine": (CosineDPMSolverMultistepScheduler, FusedCosineDPMSolverMultistepScheduler),
         "sde": (DPMSolverSDEScheduler, FusedDPMSolverSDEScheduler)}
# the base configurations of diffusers' test files
BASE = {
    "inverse": dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", solver_order=2,
                    prediction_type="epsilon", thresholding=False, sample_max_value=1.0, algorithm_type="dpmsolver++",
                    solver_type="midpoint", lower_order_final=False, lambda_min_clipped=-float("inf"),
                    variance_type=None),
    "edm": dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, num_train_timesteps=1000, solver_order=2,
                prediction_type="epsilon", thresholding=False, sample_max_value=1.0, algorithm_type="dpmsolver++",
                solver_type="midpoint", lower_order_final=False, euler_at_final=False, final_sigmas_type="sigma_min"),
    "cosine": dict(),
    "sde": dict(num_train_timesteps=1100, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                noise_sampler_seed=0),
}
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]  # torchsde: queries clamped to the tree's range
logging.getLogger("diffusers").setLevel(logging.ERROR)


def toy_model(x: torch.Tensor, t) -> torch.Tensor:
    """Deterministic, bounded, timestep-dependent; |x0| quantiles pass 1 so thresholding clamps."""
    return 1.3 * torch.tanh(0.7 * x + 0.001 * float(t))


def is_sde(kind: str, cfg: dict) -> bool:
    return kind in ("cosine", "sde") or cfg.get("algorithm_type", "").startswith("sde")


def run(cls, cfg: dict, steps: int, dtype=torch.float32, backend: str | None = None, shape=SHAPE, model=toy_model,
        seed: int = 3, begin: int | None = None, noise: str = "generator"):
    """Steps and x0 predictions (where the class returns them) of one trajectory; the scheduler. noise="variance":
    the SDE noise passed as variance_noise (drawn in float32, the same in every dtype) instead of a generator."""
    s = cls(**cfg)
    if backend is not None:
        s.fused_backend = backend
    s.set_timesteps(steps)
    if dtype == torch.float64:
        s.sigmas = s.sigmas.double()  # diffusers then forms its coefficients in float64 too
    ts = s.timesteps
    if begin is not None:
        s.set_begin_index(begin)
        ts = ts[begin:]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype) * float(s.init_noise_sigma)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the SDE scheduler's tree seed when noise_sampler_seed is None
    takes_generator = "generator" in inspect.signature(s.step).parameters
    xs, preds = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in ts:
            kw = {"generator": g} if takes_generator else {}
            if noise == "variance":
                kw = {"variance_noise": torch.randn(shape, generator=g).to(dtype)}
            out = s.step(model(s.scale_model_input(x, t), t), t, x, **kw)
            x = out.prev_sample
            xs.append(x)
            if getattr(out, "pred_original_sample", None) is not None:
                preds.append(out.pred_original_sample)
    return xs, preds, s


def err(xs, refs) -> float:
    assert len(xs) == len(refs)
    return max(float((a.double() - r.double()).abs().max()) / max(1.0, float(r.double().abs().max()))
               for a, r in zip(xs, refs, strict=True))


def err64(xs, refs, s, kind: str) -> float:
    """err, where a zero-length step (|h| <= ZERO_STEP: EDM's sigma_min end, h = -2.3e-7 in float64), which the
    drop-in takes as the identity and diffusers as a step of that length, may be off by up to ZERO_STEP (scaled
    to count as TOL64). Step k goes from sigmas[k] to sigmas[k + 1] (all but the SDE scheduler, checked exactly)."""
    if kind == "sde":
        return err(xs, refs)
    sig = s.sigmas.double()
    h = (torch.log(sig[:-1]) - torch.log(sig[1:])).abs().tolist()
    return max(err([a], [r]) * (TOL64 / C.ZERO_STEP if i < len(h) and h[i] <= C.ZERO_STEP else 1.0)
               for i, (a, r) in enumerate(zip(xs, refs, strict=True)))


def assert_fused(s, n_steps: int) -> None:
    assert s.fused_reason is None
    assert s._fz_traj is not None and s._fz_traj.calls == n_steps, "not every step ran fused"


def check(kind: str, cfg: dict, steps: int = 10, **kw) -> dict:
    """The fused drop-in (each backend) against diffusers (module doc); returns the measured deviations."""
    parent, fused = PAIRS[kind]
    cfg = {**BASE[kind], **cfg}
    ref, ref_pred, _ = run(parent, cfg, steps, torch.float64, **kw)
    d32, d32_pred, _ = run(parent, cfg, steps, torch.float32, **kw)
    sde = is_sde(kind, cfg) and kw.get("noise") != "variance"  # variance_noise: the same noise in every dtype
    bound = TOL32_SDE if sde else 2.0 * err(d32, ref) + 1e-6
    seen = {}
    for backend in BACKENDS:
        o32, p32, s = run(fused, cfg, steps, torch.float32, backend, **kw)
        assert_fused(s, len(o32))
        want = d32 if sde else ref
        assert err(o32, want) <= bound, (backend, err(o32, want), bound)
        o64, p64, s = run(fused, cfg, steps, torch.float64, backend, **kw)
        assert_fused(s, len(o64))
        assert err64(o64, ref, s, kind) <= TOL64, (backend, err64(o64, ref, s, kind))
        if ref_pred:  # the SDE scheduler's pred_original_sample
            assert err(p32, d32_pred) <= TOL32_SDE and err(p64, ref_pred) <= TOL64
        seen[backend] = (err(o32, want), err64(o64, ref, s, kind))
    return seen


def _ids(cases):
    return ["-".join(f"{k}={v}" for k, v in c.items()) or "default" for c in cases]


# ---- DPMSolverMultistepInverseScheduler ----
INVERSE = (
    [dict(algorithm_type=a, solver_type=st, solver_order=o, prediction_type=p) for a in ("dpmsolver", "dpmsolver++")
     for st in ("midpoint", "heun") for o in (1, 2, 3) for p in ("epsilon", "sample")]
    + [dict(thresholding=True, solver_order=o, solver_type=st, sample_max_value=m, prediction_type=p)
       for o in (1, 2, 3) for st in ("midpoint", "heun") for m in (0.5, 1.0, 2.0) for p in ("epsilon", "sample")]
    + [dict(prediction_type="v_prediction"), dict(lower_order_final=True), dict(lambda_min_clipped=-5.1),
       dict(timestep_spacing="trailing"), dict(timestep_spacing="leading"), dict(num_train_timesteps=100),
       dict(prediction_type="v_prediction", use_karras_sigmas=True), dict(use_exponential_sigmas=True),
       dict(use_beta_sigmas=True), dict(solver_order=3, use_karras_sigmas=True),
       dict(thresholding=True, dynamic_thresholding_ratio=0.87, sample_max_value=0.5)]
)


@pytest.mark.parametrize("cfg", INVERSE, ids=_ids(INVERSE))
def test_inverse_matrix(cfg):
    check("inverse", cfg)


INVERSE_FLOW_SDE = [dict(use_flow_sigmas=True, flow_shift=3.0, algorithm_type=a, prediction_type=p, solver_order=o,
                         solver_type=st)
                    for a, p in (("sde-dpmsolver++", "flow_prediction"), ("sde-dpmsolver++", "epsilon"),
                                 ("sde-dpmsolver", "epsilon"), ("sde-dpmsolver", "v_prediction"))
                    for o in (1, 2) for st in ("midpoint", "heun")]


@pytest.mark.parametrize("cfg", INVERSE_FLOW_SDE, ids=_ids(INVERSE_FLOW_SDE))
def test_inverse_sde_towards_data_is_fused(cfg):
    # with flow sigmas diffusers' inverse grid runs from sigma ~1 down (towards the data): an SDE step is defined
    # there and diffusers' result is finite -- the drop-in decides by the grid's direction, not the algorithm's name
    check("inverse", cfg, noise="variance")  # the same noise in every dtype: the float32 runs against float64
    if cfg["algorithm_type"] == "sde-dpmsolver++":  # diffusers' draws (sde-dpmsolver's float32 runs differ by 2e-5)
        check("inverse", cfg)


def test_inverse_learned_variance():
    check("inverse", dict(variance_type="learned_range"), model=lambda x, t: torch.cat([toy_model(x, t), 0.5 * x], 1))


@pytest.mark.parametrize("alg", ["sde-dpmsolver++", "sde-dpmsolver"])
def test_inverse_sde_is_refused_not_nan(alg):
    # going up in noise, the SDE inversion's noise term has sqrt(1 - e^{-2h}) of h < 0: diffusers returns NaN (or
    # fails at order 3); the drop-in refuses at the first step, before writing anything
    parent, fused = PAIRS["inverse"]
    cfg = {**BASE["inverse"], "algorithm_type": alg}
    xs, _, _ = run(parent, cfg, 6)
    assert torch.isnan(xs[-1]).any()
    s = fused(**cfg)
    s.set_timesteps(6)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="cannot be inverted"):
        s.step(toy_model(x, s.timesteps[0]), s.timesteps[0], x)
    assert s.step_index in (None, 0)


# ---- EDMDPMSolverMultistepScheduler ----
EDM = (
    [dict(thresholding=True, solver_order=o, solver_type=st, sample_max_value=m, prediction_type=p)
     for o in (1, 2, 3) for st in ("midpoint", "heun") for m in (0.5, 1.0, 2.0) for p in ("epsilon", "v_prediction")]
    + [dict(algorithm_type=a, solver_type=st, solver_order=o, prediction_type=p)
       for a in ("dpmsolver++", "sde-dpmsolver++") for st in ("midpoint", "heun") for o in (1, 2, 3)
       for p in ("epsilon", "v_prediction") if not (a == "sde-dpmsolver++" and o == 3)]
    + [dict(lower_order_final=True), dict(euler_at_final=True), dict(final_sigmas_type="zero"),
       dict(sigma_schedule="exponential"), dict(sigma_schedule="exponential", final_sigmas_type="zero", solver_order=3),
       dict(solver_order=3, lower_order_final=True), dict(sigma_data=1.0, prediction_type="v_prediction"),
       dict(thresholding=True, dynamic_thresholding_ratio=0.87, sample_max_value=0.5), dict(rho=5.0)]
)


@pytest.mark.parametrize("cfg", EDM, ids=_ids(EDM))
def test_edm_matrix(cfg):
    check("edm", cfg)


@pytest.mark.parametrize("steps", [1, 2, 25])
def test_edm_step_counts(steps):
    check("edm", dict(solver_order=3), steps=steps)


def test_edm_sigma_min_end_is_the_identity():
    # final_sigmas_type="sigma_min": the last sigma repeats sigma_min (h = 0 in float32, -2.3e-7 in float64); the
    # step there is the identity and the SDE noise term stays finite
    _, fused = PAIRS["edm"]
    for alg in ("dpmsolver++", "sde-dpmsolver++"):
        xs, _, s = run(fused, {**BASE["edm"], "algorithm_type": alg, "solver_type": "heun"}, 10)
        assert_fused(s, 10)
        assert torch.isfinite(xs[-1]).all() and torch.equal(xs[-1], xs[-2])


# ---- CosineDPMSolverMultistepScheduler (Stable Audio) ----
COSINE = [dict(sigma_schedule=ss, final_sigmas_type="zero", sigma_min=0.3, sigma_max=500.0)
          for ss in ("exponential", "karras")] + [
    dict(), dict(solver_order=1), dict(prediction_type="epsilon"), dict(solver_type="heun"), dict(euler_at_final=True),
    dict(lower_order_final=False), dict(sigma_data=0.5)]


@pytest.mark.parametrize("cfg", COSINE, ids=_ids(COSINE))
def test_cosine_matrix(cfg):
    check("cosine", cfg)
    check("cosine", cfg, shape=(1, 4, 8))  # diffusers' test sample: [B, C, T] audio latents


@pytest.mark.parametrize("schedule", ["exponential", "karras"])
def test_cosine_sigma_min_end_where_diffusers_recurses(schedule):
    # final_sigmas_type="sigma_min" repeats sigma_min: diffusers queries its Brownian tree on an empty interval and
    # recurses without end; the drop-in takes that step as the identity (no noise to draw) after the same steps
    parent, fused = PAIRS["cosine"]
    cfg = dict(sigma_schedule=schedule, final_sigmas_type="sigma_min", sigma_min=0.3, sigma_max=500.0)
    with pytest.raises(RecursionError):
        run(parent, cfg, 10)
    want, _, _ = run(parent, {**cfg, "final_sigmas_type": "zero"}, 10)  # the same grid up to the last sigma
    xs, _, s = run(fused, cfg, 10)
    assert_fused(s, 10)
    assert err(xs[:-1], want[:-1]) <= TOL32_SDE and torch.equal(xs[-1], xs[-2])


def test_cosine_generator_list_and_global_rng():
    # one tree per sample from a list of generators; the global RNG's seed without a generator
    parent, fused = PAIRS["cosine"]
    for gens in ([torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)], None):
        outs = []
        for cls in (parent, fused):
            s = cls()
            s.set_timesteps(8)
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)) * float(s.init_noise_sigma)
            torch.manual_seed(11)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for t in s.timesteps:
                    x = s.step(toy_model(s.scale_model_input(x, t), t), t, x, generator=gens).prev_sample
            outs.append(x)
        assert_fused(s, 8)
        assert err([outs[1]], [outs[0]]) <= TOL32_SDE


# ---- DPMSolverSDEScheduler ----
SDE = [dict(num_train_timesteps=n) for n in (10, 50, 100, 1000)] + [
    dict(beta_start=b0, beta_end=b1) for b0, b1 in ((1e-5, 2e-4), (1e-4, 2e-3), (1e-3, 2e-2))] + [
    dict(beta_schedule="scaled_linear"), dict(prediction_type="v_prediction"), dict(prediction_type="sample"),
    dict(use_karras_sigmas=True), dict(use_beta_sigmas=True), dict(use_exponential_sigmas=True),
    dict(timestep_spacing="trailing"), dict(timestep_spacing="leading", steps_offset=1),
    dict(noise_sampler_seed=None), dict(beta_schedule="squaredcos_cap_v2")]


@pytest.mark.parametrize("cfg", SDE, ids=_ids(SDE))
def test_sde_matrix(cfg):
    if cfg.get("prediction_type") == "sample":  # diffusers: NotImplementedError; fused: x0 is the output itself
        parent, fused = PAIRS["sde"]
        with pytest.raises(NotImplementedError):
            run(parent, {**BASE["sde"], **cfg}, 6)
        xs, preds, s = run(fused, {**BASE["sde"], **cfg}, 6)
        assert_fused(s, len(xs))
        assert torch.equal(xs[-1], preds[-1]) and torch.isfinite(xs[-1]).all()
        return
    check("sde", cfg)


def test_sde_s_noise_steps_and_states():
    parent, fused = PAIRS["sde"]
    for steps in (1, 2, 50):
        check("sde", {}, steps=steps)
    # s_noise, diffusers' test loop (the scaled sample carried as the sample), and the state after each call
    cfg = BASE["sde"]
    runs = []
    for cls in (parent, fused):
        s = cls(**cfg)
        s.set_timesteps(6)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)) * float(s.init_noise_sigma)
        states = []
        for t in s.timesteps:
            x = s.scale_model_input(x, t)
            x = s.step(toy_model(x, t), t, x, s_noise=0.7).prev_sample
            states.append((s.sample is None, None if s.mid_point_sigma is None else float(s.mid_point_sigma)))
        runs.append((x, states))
    assert_fused(s, len(s.timesteps))
    assert runs[0][1] == runs[1][1]
    assert err([runs[1][0]], [runs[0][0]]) <= TOL32_SDE


def test_sde_last_step_without_set_timesteps():
    # diffusers' check_over_configs: no set_timesteps (the __init__ grid), scale_model_input at the last timestep
    # sets the step index there, and step() takes the final Euler call
    outs = []
    for cls in PAIRS["sde"]:
        s = cls(**BASE["sde"])
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
        t = s.timesteps[-1]
        x_in = s.scale_model_input(x, t)
        outs.append(s.step(0.1 * x_in, t, x_in).prev_sample)
    assert s.fused_reason is None and s._fz_traj.calls == 1
    assert err([outs[1]], [outs[0]]) <= 1e-6


# ---- beyond diffusers: third-order SDE steps (diffusers fails) match k-diffusion's DPM-Solver++(3M) SDE ----
@pytest.mark.parametrize("kind", ["edm", "cosine"])
def test_third_order_sde_is_kdiffusions(kind):
    K = load_sampling()
    parent, fused = PAIRS[kind]
    cfg = {**BASE[kind], "solver_order": 3, "solver_type": "heun", "lower_order_final": False,
           "final_sigmas_type": "zero"}
    if kind == "edm":
        cfg["algorithm_type"] = "sde-dpmsolver++"
    with pytest.raises(UnboundLocalError):
        run(parent, cfg, 10, torch.float64)
    xs, _, s = run(fused, cfg, 10, torch.float64)
    assert_fused(s, 10)
    # the same trajectory as k-diffusion: denoiser D(x, sigma) = c_skip x + c_out F(c_in x, c_noise), and the noise
    # the drop-in drew (recorded by a rerun through the same noise hook)
    ref = fused(**cfg)
    ref.set_timesteps(10)
    ref.sigmas = ref.sigmas.double()
    sig = ref.sigmas
    sd = ref.config.sigma_data
    sign = 1.0 if ref.config.prediction_type == "epsilon" else -1.0

    def denoiser(x, sigma):
        s_ = sigma[0].double()
        t = ref.precondition_noise(s_)
        f = toy_model(x / torch.sqrt(s_ ** 2 + sd ** 2), t)
        return sd ** 2 / (s_ ** 2 + sd ** 2) * x + sign * s_ * sd / torch.sqrt(s_ ** 2 + sd ** 2) * f

    noises = iter(_recorded_noise(fused, cfg, 10))
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)).double() * float(ref.init_noise_sigma)
    want = K.sample_dpmpp_3m_sde(denoiser, x0, sig, disable=True, noise_sampler=lambda a, b: next(noises))
    assert err([xs[-1]], [want]) <= 1e-9, err([xs[-1]], [want])


def test_inverse_flow_third_order_sde_is_kdiffusions():
    """diffusers' inverse scheduler with flow sigmas (a grid towards the data) fails at a third-order SDE step
    (AssertionError); the drop-in takes k-diffusion's DPM-Solver++(3M) SDE step there. k-diffusion runs in
    x_ve = x / alpha on sigma_ve = sigma / (1 - sigma), with the denoiser x0 = x - sigma v and the drop-in's noise."""
    K = load_sampling()
    parent, fused = PAIRS["inverse"]
    cfg = {**BASE["inverse"], "use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction",
           "algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun"}
    with pytest.raises(AssertionError):
        run(parent, cfg, 10, torch.float64)
    xs, _, s = run(fused, cfg, 10, torch.float64)
    assert_fused(s, 10)
    sig = s.sigmas.double()  # the last sigma repeats: the drop-in's last step is the identity
    assert torch.equal(xs[-1], xs[-2])
    t_of = {float(a): t for a, t in zip(sig.tolist(), s.timesteps.tolist(), strict=False)}

    def denoiser(x_ve, sigma_ve):
        sv = float(sigma_ve[0])
        sigma = sv / (1.0 + sv)
        x = x_ve * (1.0 - sigma)
        t = t_of[min(t_of, key=lambda a: abs(a - sigma))]
        return x - sigma * toy_model(x, t)

    it = iter(_recorded_noise(fused, cfg, 10))  # alpha sigma_ve = sigma: the same z in both variables
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)).double() * float(s.init_noise_sigma)
    sv = sig[:-1] / (1.0 - sig[:-1])
    want = K.sample_dpmpp_3m_sde(denoiser, x0 / (1.0 - float(sig[0])), sv, disable=True,
                                 noise_sampler=lambda a, b: next(it)) * (1.0 - float(sig[-2]))
    assert err([xs[-2]], [want]) <= 1e-9, err([xs[-2]], [want])


def _recorded_noise(cls, cfg, steps):
    """The noise the drop-in adds in each step, in order (float64)."""
    seen = []
    orig = cls._noise

    def spy(self, *args):
        z = orig(self, *args)
        seen.append(z)
        return z

    cls._noise = spy
    try:
        run(cls, cfg, steps, torch.float64)
    finally:
        cls._noise = orig
    return seen


# ---- end to end: a small diffusers network with random weights ----
def _tiny_unet(out_channels=3):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=out_channels, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


E2E = [("inverse", dict(solver_order=2)), ("edm", dict(algorithm_type="sde-dpmsolver++", solver_order=2)),
       ("cosine", dict()), ("sde", dict()),
       ("flow", dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, solver_order=2))]


@pytest.mark.parametrize("kind,cfg", E2E, ids=[k for k, _ in E2E])
def test_unet_loop_end_to_end(kind, cfg):
    """A manual sampling loop with a tiny UNet2DModel for each new drop-in (flow matching: the multistep one with flow
    sigmas, the UNet as the velocity network): the fused scheduler's final sample is diffusers'."""
    unet = _tiny_unet()
    parent, fused = PAIRS.get(kind, (diffusers.DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler))
    cfg = {**BASE.get(kind, {}), **cfg}
    finals = {}
    for name, cls in [("diffusers", parent)] + [(b, fused) for b in BACKENDS]:
        s = cls(**cfg)
        if name != "diffusers":
            s.fused_backend = name
        s.set_timesteps(8)
        x = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(5)) * float(s.init_noise_sigma)
        g = torch.Generator().manual_seed(9)
        kw = {"generator": g} if "generator" in inspect.signature(s.step).parameters else {}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t in s.timesteps:
                t_in = t if kind not in ("edm", "cosine") else t.reshape(1).expand(2)
                x = s.step(unet(s.scale_model_input(x, t), t_in).sample, t, x, **kw).prev_sample
        if name != "diffusers":
            assert_fused(s, len(s.timesteps))
        finals[name] = x
    for b in BACKENDS:
        assert err([finals[b]], [finals["diffusers"]]) < 5e-5, (b, err([finals[b]], [finals["diffusers"]]))


def test_options_matter():
    """The comparisons can fail: a changed option moves the result far beyond the tolerances."""
    for kind, a, b in [("inverse", dict(solver_order=2), dict(solver_order=3)),
                       ("edm", dict(), dict(prediction_type="v_prediction")),
                       ("cosine", dict(), dict(solver_type="heun")),
                       ("sde", dict(), dict(prediction_type="v_prediction"))]:
        _, fused = PAIRS[kind]
        xa, _, _ = run(fused, {**BASE[kind], **a}, 8)
        xb, _, _ = run(fused, {**BASE[kind], **b}, 8)
        assert err(xa, xb) > 100 * TOL32_SDE, kind
    assert math.isfinite(err(xa, xb))


@pytest.mark.parametrize("kind", list(PAIRS))
def test_config_and_signatures_are_diffusers(kind, tmp_path):
    """Same config keys and values, from_config both ways, save/load, _compatibles (at least the parent's), and the
    step / set_timesteps signatures pipelines introspect."""
    parent, fused = PAIRS[kind]
    src = parent(**BASE[kind])
    assert_drop_in_surface(src, fused, tmp_path)


@pytest.mark.parametrize("kind", list(PAIRS))
def test_half_precision(kind):
    """float16 samples (diffusers' test_fp16_support: thresholding at ratio 0 where the class has it): the result
    dtype is diffusers', and the fused float16 run is no farther from diffusers' float32 run than diffusers' own
    float16 run (x2, + 1e-3): we compute in float32 and round once."""
    parent, fused = PAIRS[kind]
    cfg = dict(BASE[kind])
    if "thresholding" in inspect.signature(parent.__init__).parameters:
        cfg.update(thresholding=True, dynamic_thresholding_ratio=0.0)
    ref, _, _ = run(parent, cfg, 8, torch.float32)
    d16, _, _ = run(parent, cfg, 8, torch.float16)
    for backend in BACKENDS:
        o16, _, s = run(fused, cfg, 8, torch.float16, backend)
        assert_fused(s, len(o16))
        assert o16[-1].dtype == d16[-1].dtype
        if not is_sde(kind, cfg):  # SDE noise drawn in float16 differs from float32's
            assert err(o16, ref) <= 2 * err(d16, ref) + 1e-3, (backend, err(o16, ref), err(d16, ref))
        else:
            assert err(o16, d16) <= 1e-2, (backend, err(o16, d16))


def test_fallbacks_say_why_and_run_diffusers_step():
    """What is not fused runs diffusers' own step for the whole trajectory, with the reason in fused_reason."""
    # a prediction type diffusers' EDM class does not define: its own error, raised by its own step
    _, fused = PAIRS["edm"]
    s = fused(prediction_type="sample")
    s.set_timesteps(4)
    assert "prediction_type='sample'" in s.fused_reason
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError):
        s.step(toy_model(x, s.timesteps[0]), s.timesteps[0], x)
    # an option the module does not know, set to a non-default value (here: one it is told not to know)
    for kind in ("inverse", "edm", "sde"):
        parent, fused = PAIRS[kind]
        unknown = type("Unknown", (fused,), {"GRID_KEYS": fused.GRID_KEYS - {"num_train_timesteps"},
                                             "STEP_KEYS": fused.STEP_KEYS - {"num_train_timesteps"}})
        cfg = {**BASE[kind], "num_train_timesteps": 500}
        want, _, _ = run(parent, cfg, 6)
        got, _, s = run(unknown, cfg, 6)
        assert "num_train_timesteps=500" in s.fused_reason and s._fz_traj is None
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    # a model output that is not floating point
    parent, fused = PAIRS["sde"]
    s = fused(**BASE["sde"])
    s.set_timesteps(4)
    s.step(torch.zeros(SHAPE, dtype=torch.int64), s.timesteps[0], torch.randn(SHAPE))
    assert "int64" in s.fused_reason
    outs = []
    for cls in (parent, fused):  # diffusers: NaN; the drop-in: a ValueError naming the argument, nothing written
        s = cls(**BASE["sde"])
        s.set_timesteps(4)
        s.set_begin_index(1)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        try:
            for t in s.timesteps[1:]:
                x = s.step(toy_model(s.scale_model_input(x, t), t), t, x).prev_sample
            outs.append(x)
        except ValueError as exc:
            outs.append(exc)
    assert torch.isnan(outs[0]).all() and "set_begin_index" in str(outs[1]) and s.step_index == 1
