"""The fused CogVideoXDPMScheduler drop-in against diffusers' own, call by call, driven as the CogVideoX pipeline
drives it: the previous call's pred_original_sample and timestep fed back (old_pred_original_sample, timestep_back),
eta and the generator passed as its extra step arguments.

Every call must run fused (fused_reason None after it). Errors are max |x - ref| / max(1, max |ref|) over all calls,
of prev_sample and pred_original_sample:
- float64: equal to diffusers' float64 run (its alphas_cumprod patched to float64, so that it forms its coefficients in
  float64 too) to TOL64;
- float32: no farther from the float64 reference than twice diffusers' own float32 run, plus 1e-6; the noise is drawn
  in the sample's dtype, so that reference takes the float32 draws (diffusers' `randn_tensor` wrapped for that run).
There is no test file for this scheduler in diffusers (only a LoRA test that builds the pipeline with
timestep_spacing="trailing"); the matrix covers every option of its __init__ and step.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import assert_drop_in_surface, backends_for
from test_diffusers_family import err

try:
    from diffusers import CogVideoXDPMScheduler
    from diffusers.schedulers import scheduling_dpm_cogvideox as cog_module
except ImportError as exc:  # a required test dependency: fail loudly instead of skipping
    raise ImportError("diffusers is a required test dependency (pip install diffusers==0.42.1)") from exc

from dpm_kernels.integrations.diffusers import FusedCogVideoXDPMScheduler

BACKENDS = [b for b in backends_for("cpu") if b in ("torch", "cpu")]
SHAPE = (2, 3, 4, 4)
TOL64 = 1e-9
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def toy_model(x: torch.Tensor, t) -> torch.Tensor:
    return 1.3 * torch.tanh(0.7 * x.float() + 0.001 * float(t))


@contextlib.contextmanager
def float32_draws():
    orig = cog_module.randn_tensor

    def draw(shape, generator=None, device=None, dtype=None, layout=None):
        return orig(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    cog_module.randn_tensor = draw
    try:
        yield
    finally:
        cog_module.randn_tensor = orig


def run(cls, cfg: dict, steps: int, dtype=torch.float32, backend: str | None = None, return_dict: bool = False,
        generator="seeded", model_dtype=None, **step_kw):
    """(prev_samples, pred_original_samples, outputs, scheduler) of a pipeline-style loop."""
    s = cls(**cfg)
    if backend is not None:
        s.fused_backend = backend
    s.set_timesteps(steps)
    if dtype == torch.float64:
        s.alphas_cumprod, s.final_alpha_cumprod = s.alphas_cumprod.double(), s.final_alpha_cumprod.double()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)).to(dtype)
    g = torch.Generator().manual_seed(3) if generator == "seeded" else generator
    torch.manual_seed(3)  # generator None: the global RNG
    xs, preds, outs, old = [], [], [], None
    ts = s.timesteps
    for i, t in enumerate(ts):
        mo = toy_model(x, t).to(model_dtype or dtype)
        out = s.step(mo, old, t, ts[i - 1] if i > 0 else None, x, eta=0.0, generator=g, return_dict=return_dict,
                     **step_kw)
        outs.append(out)
        x, old = out if isinstance(out, tuple) else (out.prev_sample, out.pred_original_sample)
        if cls is FusedCogVideoXDPMScheduler:
            assert s.fused_reason is None, s.fused_reason
        xs.append(x)
        preds.append(old)
    return xs, preds, outs, s


def check(cfg: dict, steps: int = 10, backends=BACKENDS) -> dict:
    d64, d64_pred, _, _ = run(CogVideoXDPMScheduler, cfg, steps, torch.float64)
    with float32_draws():
        ref, ref_pred, _, _ = run(CogVideoXDPMScheduler, cfg, steps, torch.float64)
    d32, d32_pred, _, _ = run(CogVideoXDPMScheduler, cfg, steps, torch.float32)
    bound, bound_pred = 2.0 * err(d32, ref) + 1e-6, 2.0 * err(d32_pred, ref_pred) + 1e-6
    seen = {}
    for backend in backends:
        o32, p32, _, _ = run(FusedCogVideoXDPMScheduler, cfg, steps, torch.float32, backend)
        assert err(o32, ref) <= bound and err(p32, ref_pred) <= bound_pred, (backend, err(o32, ref), bound)
        o64, p64, _, _ = run(FusedCogVideoXDPMScheduler, cfg, steps, torch.float64, backend)
        assert err(o64, d64) <= TOL64 and err(p64, d64_pred) <= TOL64, (backend, err(o64, d64))
        seen[backend] = (err(o32, ref), err(d32, ref), err(o64, d64))
    return seen


MATRIX = [dict(timestep_spacing=s) for s in ("leading", "linspace", "trailing")] + [
    dict(prediction_type=p) for p in ("epsilon", "sample", "v_prediction")] + [
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02), dict(beta_schedule="squaredcos_cap_v2"),
    dict(set_alpha_to_one=False), dict(steps_offset=1), dict(snr_shift_scale=1.0), dict(snr_shift_scale=6.0),
    dict(num_train_timesteps=100), dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist()),
    dict(clip_sample=False, clip_sample_range=2.0, sample_max_value=3.0)]


@pytest.mark.parametrize("cfg", MATRIX, ids=["-".join(f"{k}={v}" for k, v in c.items())[:60] for c in MATRIX])
def test_matrix(cfg):
    check(cfg)


@pytest.mark.parametrize("steps", [1, 2, 50])
def test_step_counts(steps):
    check({"timestep_spacing": "trailing"}, steps=steps)
    check({"num_train_timesteps": 10}, steps=10 if steps == 50 else steps)  # ratio 1: every timestep


def test_triton_backend():
    backends = [b for b in backends_for("cpu") if b == "triton"]
    assert backends or torch.cuda.is_available()
    check({"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, steps=4, backends=backends)


def test_outputs_noise_and_ignored_arguments():
    """The result types (tuples on the first-order calls whatever return_dict, DDIMSchedulerOutput otherwise with
    return_dict=True), the generator's state after every call (two draws where a previous x0 is used), the global
    RNG without a generator, a list of per-sample generators, and eta / variance_noise / use_clipped_model_output,
    which diffusers ignores."""
    for return_dict in (False, True):
        a = run(CogVideoXDPMScheduler, {}, 6, return_dict=return_dict)
        b = run(FusedCogVideoXDPMScheduler, {}, 6, return_dict=return_dict)
        assert [type(o) for o in a[2]] == [type(o) for o in b[2]]
        assert err(b[0], a[0]) <= 1e-5
    states = []
    for cls in (CogVideoXDPMScheduler, FusedCogVideoXDPMScheduler):
        g = torch.Generator().manual_seed(3)
        s = cls()
        s.set_timesteps(5)
        x, old, seen = torch.randn(SHAPE), None, []
        for i, t in enumerate(s.timesteps):
            x, old = s.step(toy_model(x, t), old, t, s.timesteps[i - 1] if i else None, x, generator=g)
            seen.append(g.get_state())
        states.append(seen)
    assert all(torch.equal(p, q) for p, q in zip(*states, strict=True))
    for per_sample in (False, True):
        a, b = (run(cls, {}, 6, generator=[torch.Generator().manual_seed(i) for i in (1, 2)] if per_sample else None)
                for cls in (CogVideoXDPMScheduler, FusedCogVideoXDPMScheduler))
        assert err(b[0], a[0]) <= 1e-5
    a = run(FusedCogVideoXDPMScheduler, {}, 6)
    b = run(FusedCogVideoXDPMScheduler, {}, 6, variance_noise=torch.ones(SHAPE), use_clipped_model_output=True)
    assert all(torch.equal(p, q) for p, q in zip(a[0], b[0], strict=True))


@pytest.mark.parametrize("sample_dtype,model_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, None),
                                                      (torch.float16, None)])
def test_low_precision(sample_dtype, model_dtype):
    """The pipeline's dtypes (bfloat16 latents, the transformer's output upcast to float32) and plain half samples:
    diffusers' result dtypes, and no farther from diffusers' float32 run than diffusers' own low-precision run (x2,
    + 1e-2; the noise is drawn in the sample's dtype on both sides)."""
    ref = run(CogVideoXDPMScheduler, {}, 8, torch.float32)
    low = run(CogVideoXDPMScheduler, {}, 8, sample_dtype, model_dtype=model_dtype)
    for backend in BACKENDS:
        ours = run(FusedCogVideoXDPMScheduler, {}, 8, sample_dtype, backend, model_dtype=model_dtype)
        assert [(x.dtype, p.dtype) for x, p in zip(ours[0], ours[1], strict=True)] == [
            (x.dtype, p.dtype) for x, p in zip(low[0], low[1], strict=True)]
        assert err(ours[0], ref[0]) <= 2 * err(low[0], ref[0]) + 1e-2, (backend, err(ours[0], ref[0]))


def test_where_diffusers_fails():
    """A timestep_back at the timestep itself (diffusers: r = 0, inf - inf = NaN) is a first-order step, with the
    second of the two draws diffusers makes; old_pred_original_sample without timestep_back raises a ValueError
    naming it (diffusers: IndexError)."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    old = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = CogVideoXDPMScheduler()
    ref.set_timesteps(10)
    t = int(ref.timesteps[3])
    bad = ref.step(toy_model(x, t).double(), old, t, t, x, generator=torch.Generator().manual_seed(4))[0]
    assert not torch.isfinite(bad).all()
    g = torch.Generator().manual_seed(4)
    torch.randn(SHAPE, generator=g, dtype=torch.float64)  # diffusers' first, unused draw
    want = ref.step(toy_model(x, t).double(), None, t, None, x, generator=g)
    s = FusedCogVideoXDPMScheduler()
    s.set_timesteps(10)
    got = s.step(toy_model(x, t).double(), old, t, t, x, generator=torch.Generator().manual_seed(4))
    assert s.fused_reason is None and err(list(got), list(want)) <= TOL64
    with pytest.raises(IndexError):
        ref.step(toy_model(x, t).double(), old, t, None, x)
    with pytest.raises(ValueError, match="timestep_back"):
        s.step(toy_model(x, t).double(), old, t, None, x)


def test_fallbacks_say_why_and_run_diffusers_step():
    # zero terminal SNR with an epsilon model: x0 = (x - eps) / 0 at the first trailing timestep -- diffusers' NaN
    cfg = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    s = FusedCogVideoXDPMScheduler(**cfg)
    s.set_timesteps(4)
    x = torch.randn(SHAPE)
    out = s.step(toy_model(x, 999), None, s.timesteps[0], None, x)
    assert "planning failed" in s.fused_reason and not torch.isfinite(out[0]).all()
    # a float timestep: diffusers' own step (which refuses it)
    s = FusedCogVideoXDPMScheduler()
    s.set_timesteps(4)
    with pytest.raises(IndexError):
        s.step(toy_model(x, 1), None, torch.tensor(999.0), None, x)
    assert "timestep" in s.fused_reason
    # an option the module does not know, set to a non-default value
    unknown = type("Unknown", (FusedCogVideoXDPMScheduler,),
                   {"GRID_KEYS": FusedCogVideoXDPMScheduler.GRID_KEYS - {"snr_shift_scale"}})
    s = unknown(snr_shift_scale=2.0)
    s.set_timesteps(4)
    s.step(toy_model(x, 1), None, s.timesteps[0], None, x)
    assert "snr_shift_scale=2.0" in s.fused_reason


def test_options_matter():
    a = run(FusedCogVideoXDPMScheduler, {}, 8)[0]
    for cfg in (dict(prediction_type="v_prediction"), dict(snr_shift_scale=1.0), dict(timestep_spacing="trailing")):
        assert err(a, run(FusedCogVideoXDPMScheduler, cfg, 8)[0]) > 1e-2, cfg


def test_config_and_signatures_are_diffusers(tmp_path):
    src = CogVideoXDPMScheduler(timestep_spacing="trailing")
    assert_drop_in_surface(src, FusedCogVideoXDPMScheduler, tmp_path,
                           ("set_timesteps", "step", "scale_model_input", "add_noise", "get_velocity"))
