"""The fused diffusers schedulers against diffusers' own, step by step (dpm_kernels/integrations/diffusers/).

Each trajectory runs the same deterministic model on both sides, evaluated at each side's OWN current sample; SDE
runs share the generator seed (or the variance_noise). Criterion (flash-attention's rule): the fused float32
trajectory may be off diffusers' float64 trajectory (its sigmas patched to float64 after set_timesteps) by at most
twice what diffusers' own float32 trajectory is, plus 1e-6 (singlestep SDE, whose noise diffusers draws in the
sample's dtype: float32 against diffusers' float32, same noise, within 1e-5). Float64 runs must match diffusers'
float64 trajectory exactly up to diffusers' rounding of the sample to float32 in every multistep step (TOL64):
that check is what tells a wrong formula (>= 1e-3 off) from rounding. Errors are max |x - ref| / max(1, max |ref|)
over all steps.
"""

from __future__ import annotations

import logging
import types

import pytest
import torch
from conftest import assert_drop_in_surface, backends_for

try:
    import diffusers
    from diffusers import DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler
except ImportError as exc:  # a required test dependency: fail loudly instead of skipping
    raise ImportError("diffusers is a required test dependency (pip install diffusers==0.42.1)") from exc

from dpm_kernels.integrations import diffusers as fused_package
from dpm_kernels.integrations.diffusers import FusedDPMSolverMultistepScheduler, FusedDPMSolverSinglestepScheduler

# torch (reference) and the C++ CPU kernels; "cpu" is in the list unless DPM_KERNELS_NO_EXT=1, and a CPU extension
# that fails to build fails these tests (fused_backend="cpu" raises)
BACKENDS = [b for b in backends_for("cpu") if b in ("torch", "cpu")]
SHAPE = (2, 3, 4, 4)
TOL64 = {"multi": 2e-6, "single": 1e-10}  # multistep: diffusers casts the sample to float32 (measured 4.4e-7)
PAIRS = {"multi": (DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler),
         "single": (DPMSolverSinglestepScheduler, FusedDPMSolverSinglestepScheduler)}
pytestmark = [pytest.mark.usefixtures("one_thread"),  # tiny tensors
              pytest.mark.filterwarnings("ignore::FutureWarning"),  # deprecated dpmsolver / sde-dpmsolver
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
logging.getLogger("diffusers").setLevel(logging.ERROR)  # singlestep's "changing lower_order_final" notices


def toy_model(x: torch.Tensor, t) -> torch.Tensor:
    """Deterministic, bounded, timestep-dependent; |x0| quantiles pass 1 so thresholding clamps."""
    return 1.3 * torch.tanh(0.7 * x + 0.001 * float(t))


def run(cls, cfg: dict, steps: int, dtype=torch.float32, backend: str | None = None, begin: int | None = None,
        sched=None, shape=SHAPE, model=toy_model, noise: str = "generator", device: str = "cpu", mu=None):
    s = sched if sched is not None else cls(**cfg)
    if backend is not None:
        s.fused_backend = backend
    s.set_timesteps(steps, **({} if mu is None else {"mu": mu}))
    if dtype == torch.float64:
        s.sigmas = s.sigmas.double()  # diffusers then forms its coefficients in float64 too
    ts = s.timesteps
    if begin is not None:
        s.set_begin_index(begin)
        ts = ts[begin:]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(device, dtype)
    g = torch.Generator().manual_seed(3)
    out = []
    for t in ts:
        kw = {"generator": g}
        if noise == "variance" and "variance_noise" in s.step.__code__.co_varnames:
            kw = {"variance_noise": torch.randn(shape, generator=g).to(device)}
        x = s.step(model(x, t), t, x, **kw).prev_sample
        out.append(x)
    return out, s


def err(xs, refs) -> float:
    assert len(xs) == len(refs)
    return max(float((a.double() - r.double()).abs().max()) / max(1.0, float(r.double().abs().max()))
               for a, r in zip(xs, refs, strict=True))


def check(kind: str, cfg: dict, steps: int = 10, device: str = "cpu", **kw) -> None:
    """The fused scheduler on `device` (each backend) against diffusers on the CPU (module doc)."""
    parent, fused = PAIRS[kind]
    ref, _ = run(parent, cfg, steps, torch.float64, **kw)
    d32, _ = run(parent, cfg, steps, torch.float32, **kw)
    # the singlestep scheduler draws SDE noise in the sample's dtype: its float32 and float64 runs see different
    # noise, so the float32 runs are compared with each other (same noise; diffusers' float32 rounding, <= 2e-6)
    same_noise = kind == "single" and cfg.get("algorithm_type", "").startswith("sde")
    want, bound = (d32, 1e-5) if same_noise else (ref, 2.0 * err(d32, ref) + 1e-6)
    for backend in BACKENDS if device == "cpu" else backends_for(device):
        o32, s = run(fused, cfg, steps, torch.float32, backend, device=device, **kw)
        assert s.fused_reason is None
        assert err(o32, want) <= bound, (backend, err(o32, want), bound)
        o64, _ = run(fused, cfg, steps, torch.float64, backend, device=device, **kw)
        assert err(o64, ref) <= TOL64[kind], (backend, err(o64, ref))


def _ids(cases):
    return ["-".join(f"{k}={v}" for k, v in c.items()) for c in cases]


ALGS_M = ["dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver"]
MULTI = (
    [dict(algorithm_type=a, solver_order=o, solver_type=st) for a in ALGS_M for o in (1, 2, 3)
     for st in (("midpoint",) if o == 1 else ("midpoint", "heun")) if not (a == "sde-dpmsolver" and o == 3)]
    + [dict(algorithm_type=a, solver_order=3 if a.endswith("++") else 2, solver_type="heun", prediction_type=p,
            thresholding=thr, sample_max_value=1.5) for a in ALGS_M for p in ("epsilon", "sample", "v_prediction")
       for thr in (False, True) if (p, thr) != ("epsilon", False)]
)
for c in MULTI:  # final_sigmas_type="zero" (the default) is refused by diffusers for noise-prediction algorithms
    if not c["algorithm_type"].endswith("++"):
        c["final_sigmas_type"] = "sigma_min"


@pytest.mark.parametrize("cfg", MULTI, ids=_ids(MULTI))
def test_multistep_matrix(cfg):
    check("multi", cfg)


MULTI_OPTIONS = [  # (cfg, steps, run kwargs): grids, final-step rules, starting points
    (dict(solver_order=3, lower_order_final=False), 10, {}),
    (dict(solver_order=3, euler_at_final=True, final_sigmas_type="sigma_min"), 16, {}),
    (dict(solver_order=3, final_sigmas_type="sigma_min"), 16, {}),  # >= 15 steps: no lower-order final steps
    (dict(solver_order=2, final_sigmas_type="sigma_min", solver_type="heun"), 8, {}),
    (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True), 12, {}),
    (dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, beta_schedule="scaled_linear"), 12,
     {"noise": "variance"}),
    (dict(solver_order=3, use_lu_lambdas=True), 10, {}),
    (dict(use_exponential_sigmas=True), 10, {}),
    (dict(algorithm_type="sde-dpmsolver++", solver_order=3, use_beta_sigmas=True), 10, {}),
    (dict(timestep_spacing="leading", steps_offset=1), 10, {}),
    (dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"), 10, {}),
    (dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, solver_order=3), 10, {}),
    (dict(solver_order=3, thresholding=True, sample_max_value=1.5), 12, {"begin": 4}),  # img2img start
]


@pytest.mark.parametrize("cfg,steps,kw", MULTI_OPTIONS, ids=[_ids([c])[0] for c, _, _ in MULTI_OPTIONS])
def test_multistep_options(cfg, steps, kw):
    check("multi", cfg, steps, **kw)


ALGS_S = ["dpmsolver++", "dpmsolver", "sde-dpmsolver++"]
SINGLE = (
    [dict(algorithm_type=a, solver_order=o, solver_type=st, steps=8 + (i % 3))
     for i, (a, o, st) in enumerate((a, o, st) for a in ALGS_S for o in (1, 2, 3)
                                    for st in (("midpoint",) if o == 1 else ("midpoint", "heun")))]
    + [dict(algorithm_type=a, solver_order=3, solver_type="heun", prediction_type=p, thresholding=thr,
            sample_max_value=1.5, steps=9) for a in ALGS_S for p in ("epsilon", "sample", "v_prediction")
       for thr in (False, True) if (p, thr) != ("epsilon", False) and not (a == "dpmsolver" and thr)]
)
for c in SINGLE:
    if not c["algorithm_type"].endswith("++"):
        c["final_sigmas_type"] = "sigma_min"


@pytest.mark.parametrize("cfg", SINGLE, ids=_ids(SINGLE))
def test_singlestep_matrix(cfg):
    cfg = dict(cfg)
    check("single", cfg, cfg.pop("steps"))


SINGLE_OPTIONS = [
    (dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"), 9, {}),  # no lower-order end
    (dict(solver_order=2, lower_order_final=False, final_sigmas_type="sigma_min", solver_type="heun"), 8, {}),
    (dict(solver_order=3, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
          use_karras_sigmas=True), 10, {}),
    (dict(solver_order=3, use_exponential_sigmas=True, algorithm_type="sde-dpmsolver++"), 10, {}),
    (dict(solver_order=3, thresholding=True, sample_max_value=1.5), 12, {"begin": 4}),  # starts mid-block
]


@pytest.mark.parametrize("cfg,steps,kw", SINGLE_OPTIONS, ids=[_ids([c])[0] for c, _, _ in SINGLE_OPTIONS])
def test_singlestep_options(cfg, steps, kw):
    check("single", cfg, steps, **kw)


def test_start_from_a_later_timestep():
    """No set_begin_index: diffusers finds the index from the first timestep; so must we."""
    for kind in PAIRS:
        parent, fused = PAIRS[kind]
        outs = []
        for cls in (parent, fused):
            s = cls(solver_order=3)
            s.set_timesteps(12)
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
            for t in s.timesteps[5:]:
                x = s.step(toy_model(x, t), t, x).prev_sample
            outs.append(x)
        assert err([outs[1]], [outs[0]]) < 5e-5


def test_thresholding_and_options_matter():
    """The options tested above change the result (so equality with diffusers is not vacuous)."""
    base, _ = run(FusedDPMSolverMultistepScheduler, dict(solver_order=3), 10)
    for change in (dict(thresholding=True, sample_max_value=1.5), dict(solver_type="heun"),
                   dict(lower_order_final=False), dict(prediction_type="v_prediction")):
        other, _ = run(FusedDPMSolverMultistepScheduler, dict(solver_order=3, **change), 10)
        assert err(other, base) > 1e-4, change  # >> the 5e-5 of float32 rounding


@pytest.mark.parametrize("kind", ["multi", "single"])
def test_half_precision(kind):
    """float16 samples: no worse than 2x diffusers' own float16 error (we compute in float32, round once)."""
    parent, fused = PAIRS[kind]
    cfg = dict(solver_order=3 if kind == "single" else 2)
    ref, _ = run(parent, cfg, 10, torch.float64)
    d16, _ = run(parent, cfg, 10, torch.float16)
    for backend in BACKENDS:
        o16, s = run(fused, cfg, 10, torch.float16, backend)
        assert o16[-1].dtype == torch.float16 and s.fused_reason is None
        assert err(o16, ref) <= 2.0 * err(d16, ref) + 1e-3


@pytest.mark.parametrize("kind", ["multi", "single"])
@pytest.mark.parametrize("sample_dtype,model_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32)])
def test_mixed_dtypes(kind, sample_dtype, model_dtype):
    """Sample and model output in different dtypes: diffusers' result dtype (the converted output's, or the
    promoted one), and no less accurate than diffusers against a float64 run on the same half-rounded outputs."""
    parent, fused = PAIRS[kind]

    def model(dtype):
        return lambda x, t: toy_model(x.float(), t).to(model_dtype).to(dtype)

    for pred, alg in (("epsilon", "dpmsolver++"), ("sample", "dpmsolver++"), ("epsilon", "dpmsolver")):
        cfg = dict(solver_order=2, prediction_type=pred, algorithm_type=alg, final_sigmas_type="sigma_min")
        ref, _ = run(parent, cfg, 6, torch.float64, model=model(torch.float64))
        d, _ = run(parent, cfg, 6, sample_dtype, model=model(model_dtype))
        for backend in BACKENDS:
            o, _ = run(fused, cfg, 6, sample_dtype, backend, model=model(model_dtype))
            assert [a.dtype for a in o] == [a.dtype for a in d]
            assert err(o, ref) <= err(d, ref) + 1e-5, (pred, alg, backend)


@pytest.mark.parametrize("kind", ["multi", "single"])
def test_same_object_reused(kind):
    """set_timesteps starts over: the same object (other batch, shape, step count) equals a fresh one."""
    _, fused = PAIRS[kind]
    cfg = dict(solver_order=3, algorithm_type="sde-dpmsolver++")
    s = fused(**cfg)
    for steps, shape in ((10, SHAPE), (7, (3, 2, 5)), (10, SHAPE)):
        again, _ = run(fused, cfg, steps, sched=s, shape=shape)
        fresh, _ = run(fused, cfg, steps, shape=shape)
        assert err(again, fresh) == 0.0
    with pytest.raises(IndexError):  # past the end, like diffusers
        s.step(torch.zeros(SHAPE), 0, torch.zeros(SHAPE))


def test_state_and_model_outputs_views():
    """step_index / lower_order_nums as in diffusers; model_outputs views hold the converted outputs."""
    cfg = dict(solver_order=3, thresholding=True, sample_max_value=1.5)
    a, b = DPMSolverMultistepScheduler(**cfg), FusedDPMSolverMultistepScheduler(**cfg)
    for s in (a, b):
        s.set_timesteps(8)
    xa = xb = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    for t in a.timesteps:
        xa = a.step(toy_model(xa, t), t, xa).prev_sample
        xb, = b.step(toy_model(xb, t), t, xb, return_dict=False)
        assert (a.step_index, a.lower_order_nums) == (b.step_index, b.lower_order_nums)
        views = b.model_outputs
        assert isinstance(views, tuple) and len(views) == 3
        for va, vb in zip(a.model_outputs, views, strict=True):
            if vb is not None:
                assert err([vb], [va]) < 1e-5
    assert views[-1] is None  # the last output is read by no later step: not stored
    b.set_timesteps(8)
    assert b.model_outputs == [None, None, None]


def test_from_config_round_trip(tmp_path):
    src = DPMSolverMultistepScheduler(solver_order=3, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True,
                                      beta_schedule="scaled_linear", thresholding=True)
    fused = assert_drop_in_surface(src, FusedDPMSolverMultistepScheduler, tmp_path)
    for s in (src, fused):
        s.set_timesteps(10)
    x, n, t = torch.randn(SHAPE), torch.randn(SHAPE), src.timesteps[[2, 5]]
    assert torch.equal(fused.add_noise(x, n, t), src.add_noise(x, n, t))
    assert torch.equal(fused.scale_model_input(x, t[0]), src.scale_model_input(x, t[0]))
    # a pipeline's DDPM config (variance_type "fixed_small", clip_sample ...) is accepted and fused
    ddpm = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    single = FusedDPMSolverSinglestepScheduler.from_config(ddpm.config)
    assert single.config.beta_schedule == "squaredcos_cap_v2" and single.fused_reason is None


FORMERLY_UNFUSED = [  # what fell back to diffusers' own step before, now fused: (kind, cfg, model)
    ("multi", dict(use_flow_sigmas=True, prediction_type="flow_prediction", final_sigmas_type="zero"), None),
    ("single", dict(use_flow_sigmas=True, prediction_type="flow_prediction", final_sigmas_type="zero"), None),
    ("multi", dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction", solver_order=3,
                   final_sigmas_type="zero"), None),
    ("multi", dict(prediction_type="flow_prediction"), None),  # flow_prediction on VP sigmas: x0 = x - sigma_ve v
    ("multi", dict(variance_type="learned_range"), "learned"),
    ("single", dict(variance_type="learned", solver_order=3), "learned"),
    # SDE noise drawn in the converted output's shape, as diffusers draws it (it was the raw output's 2C channels)
    ("multi", dict(variance_type="learned_range", algorithm_type="sde-dpmsolver++", solver_order=3), "learned"),
    ("multi", dict(variance_type="learned", algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
     "learned"),
    ("single", dict(variance_type="learned_range", algorithm_type="sde-dpmsolver++", solver_order=2), "learned"),
    ("single", dict(variance_type="learned", algorithm_type="sde-dpmsolver++", solver_order=3), "learned"),
]


@pytest.mark.parametrize("kind,cfg,model", FORMERLY_UNFUSED, ids=[f"{k}-{_ids([c])[0]}" for k, c, _ in
                                                                  FORMERLY_UNFUSED])
def test_flow_and_learned_variance_are_fused(kind, cfg, model):
    kw = {}
    if model == "learned":  # the network returns [prediction, variance] along channels; the solver uses the first
        kw["model"] = lambda x, t: torch.cat([toy_model(x, t), 0.5 * x], 1)
    check(kind, cfg, **kw)


DYNAMIC_SHIFT = [dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True,
                      time_shift_type="exponential", final_sigmas_type="zero", solver_order=o) for o in (2, 3)]


@pytest.mark.parametrize("kind", ["multi", "single"])
@pytest.mark.parametrize("cfg", DYNAMIC_SHIFT, ids=_ids(DYNAMIC_SHIFT))
@pytest.mark.parametrize("mu", [0.5, 1.15])
def test_dynamic_shifting_with_mu(kind, cfg, mu):
    """SANA-style dynamic shifting: set_timesteps(mu=...) shifts the flow sigmas by exp(mu); the state diffusers
    leaves (config.flow_shift, the singlestep scheduler's lower_order_final, the grid) is the drop-in's."""
    check(kind, cfg, steps=9, mu=mu)
    parent, fused = PAIRS[kind]
    states = []
    for cls in (parent, fused):
        _, s = run(cls, cfg, 9, mu=mu)
        states.append((float(s.config.flow_shift), s.config.lower_order_final, s.sigmas.tolist()))
    _, unshifted = run(parent, cfg, 9, mu=0.0)
    assert states[0] == states[1] and states[0][2] != unshifted.sigmas.tolist()
    # the next trajectory with another mu plans again (the grid changed), on the same object
    s = fused(**cfg)
    a, _ = run(None, cfg, 9, sched=s, mu=mu)
    b, _ = run(None, cfg, 9, sched=s, mu=mu + 0.5)
    want, _ = run(parent, cfg, 9, mu=mu + 0.5)
    assert s.fused_reason is None and err(b, want) < 1e-4 and err(a, b) > 1e-3


def test_where_diffusers_fails_the_drop_ins_do_better():
    # sde-dpmsolver has no third-order update (diffusers: UnboundLocalError): second order at most
    cfg = dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min")
    with pytest.raises(UnboundLocalError):
        run(DPMSolverMultistepScheduler, dict(cfg, solver_order=3), 10)
    three, s = run(FusedDPMSolverMultistepScheduler, dict(cfg, solver_order=3), 10)
    two, _ = run(FusedDPMSolverMultistepScheduler, dict(cfg, solver_order=2), 10)
    assert s.fused_reason is None and all(torch.equal(a, b) for a, b in zip(three, two, strict=True))
    # singlestep dpmsolver with thresholding (diffusers indexes its tables with None): what diffusers means, i.e. its
    # multistep scheduler's conversion (thresholded x0 at the step's sigma, back to eps), in its singlestep updates
    cfg = dict(algorithm_type="dpmsolver", thresholding=True, sample_max_value=1.2, final_sigmas_type="sigma_min",
               solver_order=3)
    with pytest.raises(RuntimeError):
        run(DPMSolverSinglestepScheduler, cfg, 10)
    ref = DPMSolverSinglestepScheduler(**cfg)
    ref.convert_model_output = types.MethodType(DPMSolverMultistepScheduler.convert_model_output, ref)
    want, _ = run(None, cfg, 10, sched=ref)
    ours, s = run(FusedDPMSolverSinglestepScheduler, cfg, 10)
    assert s.fused_reason is None and err(ours, want) < 5e-5, err(ours, want)
    # a repeated timestep inside a singlestep block (num_train_timesteps=25 at 25 steps): diffusers divides 0 by 0
    cfg = dict(num_train_timesteps=25, final_sigmas_type="sigma_min")
    assert not run(DPMSolverSinglestepScheduler, cfg, 25)[0][-1].isfinite().all()
    ours, s = run(FusedDPMSolverSinglestepScheduler, cfg, 25)
    assert s.fused_reason is None and ours[-1].isfinite().all()
    # inputs that require grad: fused and differentiable, as diffusers' step (tests/test_autograd_front_ends.py)
    grads = []
    for cls in (DPMSolverMultistepScheduler, FusedDPMSolverMultistepScheduler):
        s = cls()
        s.set_timesteps(4)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), requires_grad=True)
        s.step(toy_model(x, s.timesteps[0]), s.timesteps[0], x).prev_sample.sum().backward()
        grads.append(x.grad)
    assert s.fused_reason is None and err([grads[1]], [grads[0]]) < 1e-6


@pytest.mark.parametrize("alg", ["sde-dpmsolver++", "dpmsolver++"])
@pytest.mark.parametrize("n", [15, 50])
def test_singlestep_midpoint_block_with_a_repeated_time(alg, n):
    """num_train_timesteps = steps repeats one timestep; where the repeat falls on the two later points of a third-order
    block, diffusers' midpoint update stays finite (it reads only the block start and the newest output): the drop-in
    takes that same update there instead of lowering the order."""
    cfg = dict(num_train_timesteps=n, algorithm_type=alg, solver_order=3, solver_type="midpoint")
    xs, s = run(DPMSolverSinglestepScheduler, cfg, n)
    ts = s.timesteps.tolist()
    i = next(k for k in range(1, n) if ts[k] == ts[k - 1])
    assert s.order_list[i] == 3 and xs[-1].isfinite().all()
    check("single", cfg, steps=n)


def test_shape_change_within_a_trajectory_raises():
    s = FusedDPMSolverMultistepScheduler()
    s.set_timesteps(5)
    x = torch.randn(SHAPE)
    s.step(toy_model(x, 0), s.timesteps[0], x)
    with pytest.raises(ValueError, match="changed within a trajectory"):
        s.step(torch.zeros(1, 3, 4, 4), s.timesteps[1], torch.zeros(1, 3, 4, 4))


def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


def test_ddpm_pipeline_end_to_end():
    """DDPMPipeline with the scheduler swapped (SDE noise from the pipeline's generator) = diffusers' scheduler."""
    pipe = diffusers.DDPMPipeline(unet=_tiny_unet(), scheduler=diffusers.DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    cfg = dict(algorithm_type="sde-dpmsolver++", solver_order=2)
    images = {}
    for name, cls, backend in [("diffusers", DPMSolverMultistepScheduler, None)] + [
            (b, FusedDPMSolverMultistepScheduler, b) for b in BACKENDS]:
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **cfg)
        if backend is not None:
            pipe.scheduler.fused_backend = backend
        images[name] = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=8,
                            output_type="pt").images
        assert getattr(pipe.scheduler, "fused_reason", None) is None
    for b in BACKENDS:  # images in [0, 1]: float32 rounding of a sample of scale ~5 after 8 steps
        assert err([images[b]], [images["diffusers"]]) < 5e-5, b


def test_unet_manual_loop_singlestep():
    """A manual denoising loop with a UNet, v-prediction, thresholding, singlestep order 3."""
    unet = _tiny_unet()
    cfg = dict(solver_order=3, prediction_type="v_prediction", thresholding=True, sample_max_value=1.5)
    finals = {}
    for name, cls in [("diffusers", DPMSolverSinglestepScheduler)] + [(b, FusedDPMSolverSinglestepScheduler)
                                                                        for b in BACKENDS]:
        s = cls(**cfg)
        if name != "diffusers":
            s.fused_backend = name
        s.set_timesteps(9)
        x = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            for t in s.timesteps:
                x = s.step(unet(s.scale_model_input(x, t), t).sample, t, x).prev_sample
        finals[name] = x
    for b in BACKENDS:
        assert err([finals[b]], [finals["diffusers"]]) < 1e-5, b


CUDA_CASES = [
    ("multi", dict(solver_order=3, thresholding=True, sample_max_value=1.5), {}),
    ("multi", dict(algorithm_type="sde-dpmsolver++", solver_order=3), {"noise": "variance"}),
    ("multi", dict(algorithm_type="sde-dpmsolver++", solver_order=2), {}),  # CPU generator, noise moved to the GPU
    ("single", dict(solver_order=3, prediction_type="v_prediction", thresholding=True, sample_max_value=1.5), {}),
    ("single", dict(algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="heun"), {}),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind,cfg,kw", CUDA_CASES, ids=[f"{k}-{_ids([c])[0]}" for k, c, _ in CUDA_CASES])
def test_cuda_matrix(kind, cfg, kw):
    check(kind, cfg, 10, device="cuda", **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", backends_for("cuda"))
@pytest.mark.parametrize("begin", [True, False], ids=["set_begin_index", "searched"])
def test_cuda_no_host_sync(backend, begin):
    """No step synchronises with the device, the first included, timesteps on the GPU, with or without
    set_begin_index (without it the first step finds its index on the host: tests/test_step_index.py)."""
    for kind in PAIRS:
        s = PAIRS[kind][1](solver_order=3, thresholding=True, sample_max_value=1.5)
        s.fused_backend = backend
        s.set_timesteps(8, device="cuda")
        if begin:
            s.set_begin_index(0)
        x = torch.randn(SHAPE, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in s.timesteps:  # the toy model without its float(t), which would read the GPU
                x = s.step(1.3 * torch.tanh(0.7 * x + 0.001 * t.to(x.dtype)), t, x).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert s.fused_reason is None and bool(torch.isfinite(x).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", backends_for("cuda"))
def test_cuda_graph_capture(backend):
    """A whole fused trajectory captured in one CUDA graph replays diffusers' eager result."""
    dev = torch.device("cuda")
    cfg = dict(solver_order=3, thresholding=True, sample_max_value=1.5)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)).to(dev)
    ref = DPMSolverMultistepScheduler(**cfg)
    ref.set_timesteps(10)
    x = x0
    for t in ref.timesteps:
        x = ref.step(toy_model(x, t), t, x).prev_sample
    s = FusedDPMSolverMultistepScheduler(**cfg)
    s.fused_backend = backend

    def trajectory(inp):
        s.set_timesteps(10)
        s.set_begin_index(0)  # no index search on the device
        y = inp
        for t in s.timesteps:
            y = s.step(toy_model(y, t), t, y).prev_sample
        return y

    static_x = x0.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: loads the backend, plans, uploads the rows, allocates the ring
        trajectory(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = trajectory(static_x)
    static_x.copy_(x0)
    graph.replay()
    torch.cuda.synchronize()
    assert err([static_out.cpu()], [x.cpu()]) < 5e-5


# the configurations diffusers' own test files (tests/schedulers/test_scheduler_dpm_{multi,single}.py, 0.42) run,
# on their base configs: none may fall back
_TEST_BASE = {
    "multi": dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", solver_order=2,
                  prediction_type="epsilon", thresholding=False, sample_max_value=1.0, algorithm_type="dpmsolver++",
                  solver_type="midpoint", lower_order_final=False, euler_at_final=False,
                  lambda_min_clipped=-float("inf"), variance_type=None, final_sigmas_type="sigma_min"),
    "single": dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", solver_order=2,
                   prediction_type="epsilon", thresholding=False, sample_max_value=1.0, algorithm_type="dpmsolver++",
                   solver_type="midpoint", lambda_min_clipped=-float("inf"), variance_type=None,
                   final_sigmas_type="sigma_min"),
}
_ALGS_IN_TESTS = {"multi": ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++"),
                  "single": ("dpmsolver", "dpmsolver++", "sde-dpmsolver++")}


def _diffusers_test_configs(kind):
    cfgs = [dict(num_train_timesteps=n) for n in (25, 50, 100, 999, 1000)]
    cfgs += [dict(thresholding=True, algorithm_type="dpmsolver++", solver_order=o, solver_type=st, sample_max_value=m,
                  prediction_type=p) for o in (1, 2, 3) for st in ("midpoint", "heun") for m in (0.5, 1.0, 2.0)
             for p in ("epsilon", "sample")]
    cfgs += [dict(algorithm_type=a, solver_type=st, solver_order=o, prediction_type=p) for a in _ALGS_IN_TESTS[kind]
             for st in ("midpoint", "heun") for o in (1, 2, 3) for p in ("epsilon", "sample")
             if not (a.startswith("sde") and o == 3)]
    cfgs += [dict(prediction_type="v_prediction"), dict(lower_order_final=True), dict(lambda_min_clipped=-5.1),
             dict(variance_type="learned_range"), dict(use_karras_sigmas=True), dict(use_beta_sigmas=True),
             dict(use_exponential_sigmas=True), dict(thresholding=True, dynamic_thresholding_ratio=0.87,
                                                     sample_max_value=0.5),
             dict(prediction_type="v_prediction", use_karras_sigmas=True)]
    if kind == "multi":
        cfgs += [dict(euler_at_final=True), dict(rescale_betas_zero_snr=True),
                 dict(prediction_type="v_prediction", use_lu_lambdas=True)]
    return cfgs


@pytest.mark.parametrize("kind", ["multi", "single"])
def test_no_configuration_of_diffusers_tests_falls_back(kind):
    _, fused = PAIRS[kind]
    for cfg in _diffusers_test_configs(kind):
        for steps in (10, 25):
            _, s = run(fused, {**_TEST_BASE[kind], **cfg}, steps)
            assert s.fused_reason is None and s._fz_traj.calls == len(s.timesteps), (cfg, s.fused_reason)


@pytest.mark.parametrize("kind", ["multi", "single"])
def test_custom_timesteps(kind):
    """diffusers' test_custom_timesteps: set_timesteps(timesteps=...) with both final sigma types."""
    parent, fused = PAIRS[kind]
    for p in ("epsilon", "sample", "v_prediction"):
        for final in ("sigma_min", "zero"):
            cfg = {**_TEST_BASE[kind], "prediction_type": p, "final_sigmas_type": final}
            if kind == "multi":
                cfg["algorithm_type"] = "sde-dpmsolver++" if p == "sample" else "dpmsolver++"
            outs = []
            for cls in (parent, fused):
                s = cls(**cfg)
                s.set_timesteps(timesteps=[999, 850, 736, 645, 545, 455, 343, 233, 124, 10])
                x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
                g = torch.Generator().manual_seed(3)
                for t in s.timesteps:
                    x = s.step(toy_model(x, t), t, x, generator=g).prev_sample
                outs.append(x)
            assert s.fused_reason is None and s._fz_traj.calls == 10
            assert err([outs[1]], [outs[0]]) < 1e-5, (p, final, err([outs[1]], [outs[0]]))


DROP_INS = [getattr(fused_package, n) for n in fused_package.__all__]


@pytest.mark.parametrize("cls", DROP_INS, ids=lambda c: c.__name__)
def test_an_unknown_backend_name_raises_when_set(cls):
    """A typo ("cuad") ran diffusers' own step without a word; now it is refused on assignment and in from_config,
    on every drop-in (the rule lives in the shared mixin), and the attribute keeps its value."""
    s = cls()
    for bad in ("cuad", "", None, 3):
        with pytest.raises(ValueError, match=r"^fused_backend: expected one of \('auto'"):
            s.fused_backend = bad
    assert s.fused_backend == "auto"
    with pytest.raises(ValueError, match="^fused_backend: expected one of"):
        cls.from_config(s.config, fused_backend="cuad")
    assert cls.from_config(s.config, fused_backend="torch").fused_backend == "torch"


def test_a_named_backend_is_used_or_raises_why_not():
    """fused_backend = "cuda" on CPU tensors ran diffusers' own step (only fused_reason said so). A backend's own name
    is a promise: it runs every step, or the first step raises naming it and the reason; "auto" keeps its fallback."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for cls in (FusedDPMSolverMultistepScheduler, FusedDPMSolverSinglestepScheduler):
        s = cls()
        s.fused_backend = "cuda"  # CPU tensors: cuda never serves them, GPU or not
        s.set_timesteps(6)
        with pytest.raises(ValueError, match=r"^fused_backend: 'cuda' cannot serve cpu tensors \(cuda: serves cuda"):
            s.step(toy_model(x, s.timesteps[0]), s.timesteps[0], x)
        assert s.fused_reason is None and s._fz_traj is None
    # what "auto" would run diffusers' step for raises with a named backend: a sample of a dtype the op does not
    # take (diffusers' step casts it to float32) ...
    for backend, fallback in (("auto", True), ("torch", False)):
        s = FusedDPMSolverMultistepScheduler()
        s.fused_backend = backend
        s.set_timesteps(4)
        xi = (4 * x).round().to(torch.int32)
        if fallback:
            s.step(toy_model(x, s.timesteps[0]), s.timesteps[0], xi)
            assert "torch.int32 is not fused" in s.fused_reason
        else:
            with pytest.raises(ValueError, match="^fused_backend: 'torch' was named, but this step cannot be fused: "
                                                 "sample: a torch.int32 is not fused"):
                s.step(toy_model(x, s.timesteps[0]), s.timesteps[0], xi)
    # ... and a configuration the module does not know (here: one it is told not to know), also when the named
    # backend is set after "auto" fell back at the first step of a trajectory
    unknown = type("Unknown", (FusedDPMSolverMultistepScheduler,),
                   {"STEP_KEYS": FusedDPMSolverMultistepScheduler.STEP_KEYS - {"solver_order"}})
    s = unknown(solver_order=3)
    s.set_timesteps(4)
    s.step(toy_model(x, s.timesteps[0]), s.timesteps[0], x)  # "auto": diffusers' step
    s.fused_backend = "torch"
    with pytest.raises(ValueError, match="^fused_backend: 'torch' was named.*solver_order=3"):
        s.step(toy_model(x, s.timesteps[1]), s.timesteps[1], x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_backend_set_mid_trajectory_runs_the_next_step(backend):
    """Setting fused_backend between steps switches the running trajectory (same plan, same ring)."""
    want, _ = run(FusedDPMSolverMultistepScheduler, dict(solver_order=3), 8, backend="torch")
    s = FusedDPMSolverMultistepScheduler(solver_order=3)
    s.fused_backend = "torch"
    s.set_timesteps(8)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    for i, t in enumerate(s.timesteps):
        if i == 3:
            s.fused_backend = backend
            assert s._fz_traj.step.backend.name == backend
        x = s.step(toy_model(x, t), t, x).prev_sample
    assert s.fused_reason is None and err([x], [want[-1]]) < 1e-6
    with pytest.raises(ValueError, match="^fused_backend: 'cuda' cannot serve cpu"):
        s.fused_backend = "cuda"
    assert s.fused_backend == backend


def test_a_named_backend_does_not_hand_a_unipc_trajectory_over_silently():
    """Writing UniPC's last_sample mid-trajectory hands the rest to diffusers' own step with "auto"; a named backend
    promised every step, so the next step raises and says why."""
    from dpm_kernels.integrations.diffusers import FusedUniPCMultistepScheduler

    for backend in ("auto", "torch"):
        s = FusedUniPCMultistepScheduler(solver_order=2)
        s.fused_backend = backend
        s.set_timesteps(6)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        for t in s.timesteps[:3]:
            x = s.step(toy_model(x, t), t, x).prev_sample
        s.last_sample = 0.9 * s.last_sample
        t = s.timesteps[3]
        if backend == "auto":
            s.step(toy_model(x, t), t, x)
            assert "last_sample was set" in s.fused_reason
        else:
            with pytest.raises(ValueError, match="^fused_backend: 'torch' was named.*last_sample was set"):
                s.step(toy_model(x, t), t, x)
