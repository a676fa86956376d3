"""The fused KDPM2 drop-ins ("DPM2", "DPM2 a") against diffusers' KDPM2DiscreteScheduler and
KDPM2AncestralDiscreteScheduler, call by call (prev_sample and pred_original_sample of every call).

Every run checks that the fused path ran (fused_reason None, one fused op per call). Criteria (errors are
max |x - ref| / max(1, max |ref|) over all calls):
- float64: equal to diffusers' float64 run (its float32 grids patched to float64 after set_timesteps, so that it
  forms its coefficients in float64 too) to TOL64;
- float32: no farther from the float64 reference than F32_FACTOR times diffusers' own float32 run, plus 1e-6. The
  ancestral class draws its noise in the model output's dtype, so its float64 reference takes the float32 draws
  (diffusers' `randn_tensor` wrapped for that run) -- the same noise as both float32 runs. F32_FACTOR is 5, not the
  family's 2: a DPM2 second call is x + k (u - D(u)) with k = (sigma_end - sigma) / sigma_mid, which diffusers forms
  as a difference u - D first and the op as two products k u and k D (it has no term that subtracts before
  multiplying). Where |k| is large -- the last two-call interval, most of all in the ancestral class, whose k is
  about -sigma / sigma_next (-1200 on beta sigmas) -- their roundings make the fused float32 result up to 4.6x
  farther from float64 than diffusers' (measured: beta sigmas 4.6x, squaredcos 3.0x, every other configuration
  <= 2.2x; the non-ancestral class <= 1.9x), a relative 6e-5 at most where diffusers' own is 1.3e-5.
The option matrix is that of diffusers' own test files (tests/schedulers/test_scheduler_kdpm2_{discrete,ancestral}.py:
num_train_timesteps, betas, beta schedules, prediction types, beta and exponential sigmas, their full loops), plus the
grids, spacings and step counts they leave out.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import pytest
import torch
from conftest import assert_drop_in_surface, backends_for
from test_diffusers_family import assert_fused, err, toy_model

try:
    import diffusers
    from diffusers import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler
    from diffusers.schedulers import scheduling_k_dpm_2_ancestral_discrete as ancestral_module
except ImportError as exc:  # a required test dependency: fail loudly instead of skipping
    raise ImportError("diffusers is a required test dependency (pip install diffusers==0.42.1)") from exc

from dpm_kernels.integrations.diffusers import FusedKDPM2AncestralDiscreteScheduler, FusedKDPM2DiscreteScheduler

BACKENDS = [b for b in backends_for("cpu") if b in ("torch", "cpu")]
SHAPE = (2, 3, 4, 4)
TOL64 = 1e-9
F32_FACTOR = 5.0  # module doc
PAIRS = {"kdpm2": (KDPM2DiscreteScheduler, FusedKDPM2DiscreteScheduler),
         "kdpm2a": (KDPM2AncestralDiscreteScheduler, FusedKDPM2AncestralDiscreteScheduler)}
BASE = dict(num_train_timesteps=1100, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")  # diffusers' tests
GRIDS = ("sigmas", "sigmas_interpol", "sigmas_up", "sigmas_down")
# diffusers' KDPM2 set_timesteps maps every sigma through numpy on torch tensors: NumPy 2 deprecation warnings per
# element (millions over this file), which pytest would record one by one
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")]


@contextlib.contextmanager
def float32_draws():
    """diffusers' ancestral noise drawn in float32 whatever the dtype asked (then cast): a float64 run on the noise of
    the float32 runs."""
    orig = ancestral_module.randn_tensor

    def draw(shape, generator=None, device=None, dtype=None, layout=None):
        return orig(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    ancestral_module.randn_tensor = draw
    try:
        yield
    finally:
        ancestral_module.randn_tensor = orig


def takes_generator(s) -> bool:
    return "generator" in inspect.signature(s.step).parameters


def run(cls, cfg: dict, steps: int, dtype=torch.float32, backend: str | None = None, model=toy_model, shape=SHAPE,
        begin: int | None = None, carry_scaled: bool = False):
    """(prev_samples, pred_original_samples, scheduler) of one trajectory; carry_scaled: diffusers' test loops, which
    carry the scaled model input as the sample."""
    s = cls(**cfg)
    if backend is not None:
        s.fused_backend = backend
    s.set_timesteps(steps)
    if dtype == torch.float64:
        for name in GRIDS:
            if hasattr(s, name):
                setattr(s, name, getattr(s, name).double())
    ts = s.timesteps
    if begin is not None:
        s.set_begin_index(begin)
        ts = ts[begin:]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype) * float(s.init_noise_sigma)
    kw = {"generator": torch.Generator().manual_seed(3)} if takes_generator(s) else {}
    xs, preds = [], []
    for t in ts:
        x_in = s.scale_model_input(x, t)
        out = s.step(model(x_in, t), t, x_in if carry_scaled else x, **kw)
        x = out.prev_sample
        xs.append(x)
        preds.append(out.pred_original_sample)
    return xs, preds, s


def check(kind: str, cfg: dict, steps: int = 10, backends=BACKENDS, **kw) -> dict:
    """The fused drop-in (each backend) against diffusers (module doc); returns the measured deviations."""
    parent, fused = PAIRS[kind]
    cfg = {**BASE, **cfg}
    d64, d64_pred, _ = run(parent, cfg, steps, torch.float64, **kw)
    with float32_draws():
        ref, ref_pred, _ = run(parent, cfg, steps, torch.float64, **kw)
    d32, d32_pred, _ = run(parent, cfg, steps, torch.float32, **kw)
    bound, bound_pred = F32_FACTOR * err(d32, ref) + 1e-6, F32_FACTOR * err(d32_pred, ref_pred) + 1e-6
    seen = {}
    for backend in backends:
        o32, p32, s = run(fused, cfg, steps, torch.float32, backend, **kw)
        assert_fused(s, len(o32))
        assert err(o32, ref) <= bound and err(p32, ref_pred) <= bound_pred, (backend, err(o32, ref), bound)
        o64, p64, s = run(fused, cfg, steps, torch.float64, backend, **kw)
        assert_fused(s, len(o64))
        assert err(o64, d64) <= TOL64 and err(p64, d64_pred) <= TOL64, (backend, err(o64, d64))
        seen[backend] = (err(o32, ref), err(d32, ref), err(o64, d64))
    return seen


def _ids(cases):
    return ["-".join(f"{k}={v}" for k, v in c.items()) or "default" for c in cases]


MATRIX = [dict(num_train_timesteps=n) for n in (10, 50, 100, 1000)] + [
    dict(beta_start=b0, beta_end=b1) for b0, b1 in ((1e-5, 2e-4), (1e-4, 2e-3), (1e-3, 2e-2))] + [
    dict(beta_schedule="scaled_linear"), dict(beta_schedule="squaredcos_cap_v2"), dict(prediction_type="epsilon"),
    dict(prediction_type="v_prediction"), dict(use_beta_sigmas=True), dict(use_exponential_sigmas=True),
    dict(use_karras_sigmas=True), dict(use_karras_sigmas=True, prediction_type="v_prediction"),
    dict(timestep_spacing="leading", steps_offset=1), dict(timestep_spacing="trailing")]


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("cfg", MATRIX, ids=_ids(MATRIX))
def test_matrix(kind, cfg):
    check(kind, cfg)


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("steps", [1, 2, 25])
def test_step_counts(kind, steps):
    if kind == "kdpm2a" and steps == 2:
        # diffusers' float32 sigma_down of 261 -> 0.01 is 0: its interpolated sigma and timestep are NaN, and so is
        # its result; the drop-in says why instead
        parent, fused = PAIRS[kind]
        assert not torch.isfinite(run(parent, BASE, steps)[0][-1]).any()
        with pytest.raises(ValueError, match="NaN"):
            run(fused, BASE, steps)
        return
    check(kind, {}, steps=steps)


@pytest.mark.parametrize("kind", list(PAIRS))
def test_triton_backend(kind):
    backends = [b for b in backends_for("cpu") if b == "triton"]
    assert backends or not torch.cuda.is_available()  # the interpreter serves CPU tensors in the test session
    check(kind, dict(prediction_type="v_prediction", use_karras_sigmas=True), steps=4, backends=backends)


@pytest.mark.parametrize("kind", list(PAIRS))
def test_diffusers_test_file_loops(kind):
    """diffusers' own full loops: the scaled input carried as the sample (no noise, v_prediction), and the img2img
    start at timesteps[t_start * order] after add_noise."""
    parent, fused = PAIRS[kind]
    for cfg in ({}, dict(prediction_type="v_prediction")):
        a, ap, _ = run(parent, {**BASE, **cfg}, 10, carry_scaled=True)
        b, bp, s = run(fused, {**BASE, **cfg}, 10, carry_scaled=True)
        assert_fused(s, len(b))
        assert err(b, a) <= 1e-5 and err(bp, ap) <= 1e-5
    outs = []
    for cls in (parent, fused):
        s = cls(**BASE)
        s.set_timesteps(10)
        x = torch.arange(4 * 3 * 8 * 8).reshape(3, 8, 8, 4).permute(3, 0, 1, 2) / (4 * 3 * 8 * 8)
        noise = x.flip(0)
        ts = s.timesteps[8 * s.order:]
        x = s.add_noise(x * s.init_noise_sigma, noise, ts[:1])
        kw = {"generator": torch.manual_seed(0)} if takes_generator(s) else {}
        for t in ts:
            x = s.scale_model_input(x, t)
            x = s.step(x * t / (t + 1), t, x, **kw).prev_sample
        outs.append(x)
    assert s.fused_reason is None and s._fz_traj.calls == len(ts)
    assert err([outs[1]], [outs[0]]) <= 1e-5


@pytest.mark.parametrize("kind", list(PAIRS))
def test_single_steps_of_diffusers_common_tests(kind):
    """check_over_configs (no set_timesteps: the __init__ grid, a step at timestep 0 by diffusers' index rule),
    test_step_shape (two calls from the first timestep of 50 steps) and the dict / tuple outputs."""
    parent, fused = PAIRS[kind]
    x = torch.rand((4, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    for cfg in MATRIX:
        outs = []
        for cls in (parent, fused):
            s = cls(**{**BASE, **cfg})
            s.scale_model_input(x, s.timesteps[-1])
            kw = {"generator": torch.manual_seed(0)} if takes_generator(s) else {}
            outs.append((s.step(0.1 * x, 0, x, **kw), s.step_index))
        assert outs[0][1] == outs[1][1] and s.fused_reason is None and s._fz_traj.calls == 1
        assert err([outs[1][0].prev_sample], [outs[0][0].prev_sample]) <= 1e-6, cfg
    for cls in (parent, fused):
        got = []
        for return_dict in (True, False):
            s = cls(**BASE)
            s.set_timesteps(50)
            kw = {"generator": torch.manual_seed(0)} if takes_generator(s) else {}
            out = s.step(0.1 * x, s.timesteps[0], x, return_dict=return_dict, **kw)
            got.append(tuple(out.values()) if return_dict else out)
            second = s.step(0.1 * x, s.timesteps[1], x, **kw).prev_sample
            assert second.shape == x.shape
        assert len(got[1]) == 2 and all(torch.equal(a, b) for a, b in zip(*got, strict=True))


@pytest.mark.parametrize("kind", list(PAIRS))
def test_states_are_diffusers(kind):
    """`sample` (the interval's start, by reference) and the ancestral `dt` after every call, as diffusers keeps them
    (scale_model_input reads them)."""
    runs = []
    for cls in PAIRS[kind]:
        s = cls(**BASE)
        s.set_timesteps(6)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)) * float(s.init_noise_sigma)
        kw = {"generator": torch.Generator().manual_seed(3)} if takes_generator(s) else {}
        states = []
        for t in s.timesteps:
            x_now = x
            x = s.step(toy_model(s.scale_model_input(x, t), t), t, x, **kw).prev_sample
            states.append((s.sample is x_now, s.sample is None, float(getattr(s, "dt", 0.0)), s.step_index))
        runs.append(states)
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kind", list(PAIRS))
def test_sample_prediction_where_diffusers_raises(kind):
    """prediction_type="sample" (diffusers: NotImplementedError) is fused: it equals diffusers' epsilon run with the
    network's x0 turned into the noise it implies at the call's sigma (diffusers' own sigma of that call)."""
    parent, fused = PAIRS[kind]
    with pytest.raises(NotImplementedError):
        run(parent, {**BASE, "prediction_type": "sample"}, 4)
    xs, preds, s = run(fused, {**BASE, "prediction_type": "sample"}, 6, torch.float64)
    assert_fused(s, len(xs))
    ref = parent(**BASE)
    ref.set_timesteps(6)
    for name in GRIDS:
        if hasattr(ref, name):
            setattr(ref, name, getattr(ref, name).double())
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)).double() * float(ref.init_noise_sigma)
    kw = {"generator": torch.Generator().manual_seed(3)} if takes_generator(ref) else {}
    want, want_pred = [], []
    for t in ref.timesteps:
        x_in = ref.scale_model_input(x, t)  # sets the step index
        i = ref.step_index
        if ref.state_in_first_order:
            sigma = ref.sigmas[i]
        else:
            sigma = ref.sigmas_interpol[i if kind == "kdpm2" else i - 1]
        out = ref.step((x - toy_model(x_in, t)) / sigma, t, x, **kw)
        x = out.prev_sample
        want.append(x)
        want_pred.append(out.pred_original_sample)
    assert err(xs, want) <= TOL64 and err(preds, want_pred) <= TOL64


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_repeated_first_timestep(kind, spacing):
    """More steps than training timesteps: the first timestep repeats, diffusers' index rule begins at the second
    call of the first interval and its last call divides by sigma = 0 (NaN). The drop-in begins at the first call:
    diffusers' own result when told to begin there (set_begin_index(0))."""
    parent, fused = PAIRS[kind]
    cfg = {**BASE, "num_train_timesteps": 10, "timestep_spacing": spacing}
    bad, _, _ = run(parent, cfg, 25)
    assert not torch.isfinite(bad[-1]).all()
    want, want_pred, _ = run(parent, cfg, 25, begin=0)
    xs, preds, s = run(fused, cfg, 25)
    assert_fused(s, len(xs))
    assert torch.isfinite(xs[-1]).all() and err(xs, want) <= 1e-5 and err(preds, want_pred) <= 1e-5


@pytest.mark.parametrize("kind", list(PAIRS))
def test_odd_begin_index_is_refused(kind):
    # diffusers' own step then takes every later interval from sigma_k to sigma_k (it never moves x again): refused
    _, fused = PAIRS[kind]
    s = fused(**BASE)
    s.set_timesteps(6)
    s.set_begin_index(3)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_begin_index"):
        s.step(toy_model(x, s.timesteps[3]), s.timesteps[3], x)
    assert s.step_index == 3


@pytest.mark.parametrize("kind", list(PAIRS))
def test_half_precision(kind):
    """float16: diffusers' result dtype, and no farther from diffusers' float32 run than diffusers' own float16 run
    (x2, + 1e-3; the ancestral noise is drawn in float16 on both sides)."""
    parent, fused = PAIRS[kind]
    ref, _, _ = run(parent, BASE, 8, torch.float32)
    d16, _, _ = run(parent, BASE, 8, torch.float16)
    for backend in BACKENDS:
        o16, p16, s = run(fused, BASE, 8, torch.float16, backend)
        assert_fused(s, len(o16))
        assert o16[-1].dtype == d16[-1].dtype == p16[-1].dtype
        bound = 2 * err(d16, ref) + 1e-3 if kind == "kdpm2" else 1e-2
        assert err(o16, ref if kind == "kdpm2" else d16) <= bound, (backend, err(o16, ref), err(d16, ref))


@pytest.mark.parametrize("kind", list(PAIRS))
def test_config_and_signatures_are_diffusers(kind, tmp_path):
    parent, fused = PAIRS[kind]
    src = parent(**BASE)
    assert_drop_in_surface(src, fused, tmp_path)


def test_options_matter_and_fallbacks():
    """The comparisons can fail (a changed option moves the result far beyond the tolerances); what is not fused runs
    diffusers' own step for the whole trajectory, with the reason in fused_reason."""
    for kind in PAIRS:
        _, fused = PAIRS[kind]
        a, _, _ = run(fused, BASE, 8)
        b, _, _ = run(fused, {**BASE, "prediction_type": "v_prediction"}, 8)
        assert err(a, b) > 1e-2
        parent, fused = PAIRS[kind]
        unknown = type("Unknown", (fused,), {"GRID_KEYS": fused.GRID_KEYS - {"num_train_timesteps"}})
        cfg = {**BASE, "num_train_timesteps": 500}
        want, _, _ = run(parent, cfg, 6)
        got, _, s = run(unknown, cfg, 6)
        assert "num_train_timesteps=500" in s.fused_reason and s._fz_traj is None
        assert all(torch.equal(p, q) for p, q in zip(got, want, strict=True))
        s = fused(**BASE)
        s.set_timesteps(4)
        s.step(torch.zeros(SHAPE, dtype=torch.int64), s.timesteps[0], torch.randn(SHAPE))
        assert "int64" in s.fused_reason


def test_unet_loop_end_to_end():
    """A manual loop with a tiny UNet2DModel: each drop-in's final sample is diffusers'."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    for parent, fused in PAIRS.values():
        finals = []
        for cls in (parent, fused):
            s = cls(**BASE)
            s.set_timesteps(6)
            x = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(5)) * float(s.init_noise_sigma)
            kw = {"generator": torch.Generator().manual_seed(9)} if takes_generator(s) else {}
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for t in s.timesteps:
                    x = s.step(unet(s.scale_model_input(x, t), t).sample, t, x, **kw).prev_sample
            finals.append(x)
        assert_fused(s, len(s.timesteps))
        assert err([finals[1]], [finals[0]]) < 5e-5
