"""The fused UniPC drop-in against diffusers' UniPCMultistepScheduler, step by step (dpm_kernels/integrations/diffusers/
unipc.py), and its coefficients against diffusers' own update functions.

Criteria as in tests/test_integration_diffusers.py: the fused float32 trajectory may be off diffusers' float64
trajectory (its sigmas patched to float64 after set_timesteps, so that diffusers forms its coefficients in float64)
by at most twice what diffusers' own float32 trajectory is, plus 1e-6; the fused float64 trajectory must equal
diffusers' float64 one to TOL64. Errors are max |x - ref| / max(1, max |ref|) over all steps. Every run asserts that
every step was fused. The option matrix covers diffusers' own test file for this scheduler
(tests/schedulers/test_scheduler_unipc.py, 0.42) and the options it leaves out; where diffusers fails (NaN, a
failed assertion), the better-defined result is checked against an independent reference.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_drop_in_surface, backends_for

try:
    import diffusers
    from diffusers import UniPCMultistepScheduler
except ImportError as exc:  # a required test dependency: fail loudly instead of skipping
    raise ImportError("diffusers is a required test dependency (pip install diffusers==0.42.1)") from exc

from dpm_kernels import coefficients as C
from dpm_kernels import planner as P
from dpm_kernels.integrations.diffusers import FusedUniPCMultistepScheduler
from dpm_kernels.integrations.diffusers.unipc import FUSED_ORDERS

BACKENDS = [b for b in backends_for("cpu") if b in ("torch", "cpu")]
TRITON = [b for b in backends_for("cpu") if b == "triton"]  # the interpreter on CPU: a subset of the matrix
SHAPE = (2, 3, 4, 4)
TOL64 = 1e-9  # measured <= 3e-15; diffusers' float64 phi recursion loses digits only at hundreds of steps
ORDERS = FUSED_ORDERS
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
logging.getLogger("diffusers").setLevel(logging.ERROR)


def toy_model(x: torch.Tensor, t) -> torch.Tensor:
    """Deterministic, bounded, timestep-dependent; |x0| quantiles pass 1 so thresholding clamps."""
    return 1.3 * torch.tanh(0.7 * x + 0.001 * float(t))


def run(cls, cfg: dict, steps: int, dtype=torch.float32, backend: str | None = None, begin: int | None = None,
        sched=None, shape=SHAPE, model=toy_model, mu=None, sigmas=None, ts_from: int = 0, seed: int = 7):
    """The samples of one trajectory (the model evaluated at each side's own sample) and the scheduler."""
    s = sched if sched is not None else cls(**cfg)
    if backend is not None:
        s.fused_backend = backend
    kw = {} if mu is None else {"mu": mu}
    if sigmas is not None:
        s.set_timesteps(sigmas=sigmas, **kw)
    else:
        s.set_timesteps(steps, **kw)
    if dtype == torch.float64:
        s.sigmas = s.sigmas.double()  # diffusers then forms its coefficients in float64 too
    ts = s.timesteps[ts_from:]
    if begin is not None:
        s.set_begin_index(begin)
        ts = s.timesteps[begin:]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    xs = []
    for t in ts:
        x = s.step(model(x, t), t, x).prev_sample
        xs.append(x)
    return xs, s


def err(xs, refs) -> float:
    assert len(xs) == len(refs)
    return max(float((a.double() - r.double()).abs().max()) / max(1.0, float(r.double().abs().max()))
               for a, r in zip(xs, refs, strict=True))


def assert_fused(s, n_steps: int) -> None:
    assert s.fused_reason is None, s.fused_reason
    assert s._fz_traj is not None and s._fz_traj.calls == n_steps, "not every step ran fused"


def check(cfg: dict, steps: int = 10, backends=None, **kw) -> tuple[float, float]:
    """The drop-in (each backend) against diffusers (module doc); returns the worst float32 and float64 errors."""
    ref, _ = run(UniPCMultistepScheduler, cfg, steps, torch.float64, **kw)
    d32, _ = run(UniPCMultistepScheduler, cfg, steps, torch.float32, **kw)
    assert all(bool(torch.isfinite(r).all()) for r in ref), "diffusers' own run is not finite: not a comparison"
    bound = 2.0 * err(d32, ref) + 1e-6
    worst = (0.0, 0.0)
    for backend in BACKENDS if backends is None else backends:
        o32, s = run(FusedUniPCMultistepScheduler, cfg, steps, torch.float32, backend, **kw)
        assert_fused(s, len(o32))
        e32 = err(o32, ref)
        assert e32 <= bound, (backend, e32, bound)
        o64, s = run(FusedUniPCMultistepScheduler, cfg, steps, torch.float64, backend, **kw)
        assert_fused(s, len(o64))
        e64 = err(o64, ref)
        assert e64 <= TOL64, (backend, e64)
        worst = (max(worst[0], e32), max(worst[1], e64))
    return worst


def _ids(cases):
    return ["-".join(f"{k}={v}" for k, v in c.items()) or "default" for c in cases]


# ---- coefficients: diffusers' own update functions in float64 ----
@pytest.mark.parametrize("flow", [False, True], ids=["vp", "flow"])
@pytest.mark.parametrize("predict_x0", [True, False])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_coefficients_are_diffusers_updates(flow, predict_x0, variant, order):
    """UniP, UniC, and UniC relative to UniP (x_c = x_pred + sum d_j m_j) reproduce diffusers'
    multistep_uni_p_bh_update / multistep_uni_c_bh_update on random outputs, at several steps of a grid."""
    cfg = dict(solver_type=variant, predict_x0=predict_x0, solver_order=3)
    if flow:
        cfg.update(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction" if predict_x0 else "epsilon")
    s = UniPCMultistepScheduler(**cfg)
    s.set_timesteps(12)
    s.sigmas = s.sigmas.double()
    pts = (C.Point.from_flow_sigma if flow else C.Point.from_vp_of_ve_sigma)(s.sigmas.numpy())
    g = torch.Generator().manual_seed(order)
    for i in (order, 6, 10):
        ms = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(4)]  # m_{i-3}, ..., m_i
        x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
        s.timestep_list = [None] * 4
        s._step_index, s.model_outputs = i, ms
        want_p = s.multistep_uni_p_bh_update(model_output=None, sample=x, order=order)
        u = C.unipc_predictor(variant, predict_x0, order, [pts[i - j] for j in range(order)], pts[i + 1])
        got_p = u.a * x + sum(c * ms[3 - j] for j, c in enumerate(u.c))
        s.model_outputs = ms[:3]  # the corrector of step i runs before m_i joins the list
        want_c = s.multistep_uni_c_bh_update(this_model_output=ms[3], last_sample=x, this_sample=x, order=order)
        prev = [pts[i - 1 - j] for j in range(order)]
        u = C.unipc_corrector(variant, predict_x0, order, prev, pts[i])
        got_c = u.a * x + sum(c * ms[3 - j] for j, c in enumerate(u.c))
        s._step_index = i - 1
        x_pred = s.multistep_uni_p_bh_update(model_output=None, sample=x, order=order)
        d = C.unipc_correction(variant, predict_x0, order, prev, pts[i])
        got_d = x_pred + sum(c * ms[3 - j] for j, c in enumerate(d.c))
        for got, want in ((got_p, want_p), (got_c, want_c), (got_d, want_c)):
            assert err([got], [want]) < 1e-13, (i, err([got], [want]))


def test_phi_functions_to_rounding():
    """b_k of UniPC comes from x phi_{k+1}(x) = (e^x - sum_{j<=k} x^j/j!) / x^k: exact to rounding for every step
    length (50-digit reference), where the recursion diffusers uses loses ~(k+1)/|x| of its digits per level (1000
    steps: |x| ~ 0.01)."""
    mpmath = pytest.importorskip("mpmath")  # a dependency of torch (via sympy)
    mpmath.mp.dps = 50

    def exact(x, k):
        x = mpmath.mpf(x)
        return float((mpmath.exp(x) - sum(x ** j / mpmath.factorial(j) for j in range(k + 1))) / x ** k)

    xs = [-1e-7, -1e-3, -0.02, -0.5, -0.999, -1.0, -1.001, -3.0, -40.0, 1e-4, 0.3, 0.999, 1.5, 12.0]
    for k in (1, 2, 3):
        got = C._x_phi(np.array(xs), k)
        for x, g in zip(xs, got, strict=True):
            assert abs(g / exact(x, k) - 1) < 1e-14, (x, k)
    x = -0.01
    recursion = ((np.expm1(x) / x - 1.0) / x - 0.5) / x - 1.0 / 6.0  # diffusers' x phi_4 in float64
    assert abs(recursion / exact(x, 3) - 1) > 1e-11


# ---- the plan ----
def test_plan_ring_reads_the_outputs_each_step_combines():
    """Walk the ring symbolically: every slot a step reads holds the output of the evaluation the plan's update means
    (the predictor's history, and the previous predictor's for the corrector); no step overwrites a slot it reads."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 14))
        sig = np.sort(rng.uniform(0.05, 20.0, n + 1))[::-1].copy()
        for j in range(n):
            if rng.random() < 0.15:
                sig[j + 1] = sig[j]
        if rng.random() < 0.4:
            sig[-1] = 0.0
        orders = [int(rng.integers(1, 4)) for _ in range(n)]
        correct = [bool(rng.random() < 0.8) for _ in range(n)]
        pts = C.Point.from_vp_of_ve_sigma(sig)
        plan = P.plan_unipc(pts, orders, correct, "bh2", bool(rng.random() < 0.5))
        assert np.isfinite(plan.update.a).all() and np.isfinite(np.array(plan.update.c)).all()
        zero = [not abs(pts.lam[i + 1] - pts.lam[i]) > C.ZERO_STEP for i in range(n)]
        ring, stored = [None] * plan.n_slots, []  # stored: evaluations of distinct times, newest first
        for i, ev in enumerate(plan.evals):
            assert ev.corrected == (i > 0 and correct[i] and not zero[i - 1])
            assert ev.order <= orders[i] and (sig[i + 1] > 0 or ev.order == 1)
            want = stored[:max(ev.order - 1, plan.evals[i - 1].order if ev.corrected else 0)]
            assert [ring[s] for s in ev.read_slots] == want, (i, ev)
            assert ev.write_slot not in ev.read_slots
            if ev.write_slot is not None:
                ring[ev.write_slot] = i
            if not zero[i]:
                stored.insert(0, i)


# ---- the option matrix, against diffusers ----
MATRIX = (
    [dict(solver_order=o, solver_type=st, predict_x0=px0, final_sigmas_type="sigma_min")
     for o in ORDERS for st in ("bh1", "bh2") for px0 in (True, False)]
    + [dict(solver_order=o, prediction_type=p, thresholding=thr, sample_max_value=1.5, solver_type=st)
       for o in ORDERS for p in ("epsilon", "sample", "v_prediction") for thr in (False, True)
       for st in ("bh1", "bh2") if (p, thr) != ("epsilon", False)]
    + [dict(solver_order=o, final_sigmas_type="zero") for o in ORDERS]
    + [dict(solver_order=o, predict_x0=False, prediction_type=p, thresholding=True, final_sigmas_type="sigma_min")
       for o in ORDERS for p in ("sample", "v_prediction")]  # diffusers ignores thresholding with predict_x0=False
)

for c in MATRIX:  # final_sigmas_type="zero" gives NaN in diffusers with bh1 / predict_x0=False (tested further down)
    if c.get("solver_type") == "bh1" or c.get("predict_x0") is False:
        c["final_sigmas_type"] = "sigma_min"


@pytest.mark.parametrize("cfg", MATRIX, ids=_ids(MATRIX))
def test_matrix(cfg):
    check(cfg)


OPTIONS = [  # (cfg, steps, run kwargs): grids, corrector, final-step rules, starting points
    (dict(disable_corrector=[0, 3, 4]), 10, {}),
    (dict(disable_corrector=list(range(12))), 12, {}),
    (dict(lower_order_final=False, final_sigmas_type="sigma_min"), 10, {}),
    (dict(final_sigmas_type="sigma_min"), 1, {}),
    (dict(), 2, {}),
    (dict(), 25, {}),
    (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True), 12, {}),
    (dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", sigma_min=0.1, sigma_max=50.0), 10, {}),
    (dict(use_exponential_sigmas=True), 10, {}),
    (dict(use_beta_sigmas=True, solver_type="bh1", final_sigmas_type="sigma_min"), 10, {}),
    (dict(timestep_spacing="leading", steps_offset=1), 10, {}),
    (dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"), 10, {}),
    (dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=500), 10, {}),
    (dict(thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.87), 12, {"begin": 4}),
    (dict(), 12, {"ts_from": 5}),  # no set_begin_index: diffusers' timestep search
    # flow matching (Wan): flow sigmas and shifts, dynamic shifting with mu, shift_terminal, custom sigmas, karras
    (dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0), 10, {}),
    (dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=5.0, final_sigmas_type="sigma_min",
          solver_type="bh1"), 10, {}),
    (dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True), 9, {"mu": 1.15}),
    (dict(use_flow_sigmas=True, prediction_type="flow_prediction", shift_terminal=0.1), 10, {}),
    (dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_karras_sigmas=True, sigma_min=0.01,
          sigma_max=200.0), 10, {}),
    (dict(use_flow_sigmas=True, prediction_type="flow_prediction"), 6,
     {"sigmas": np.array([1.0, 0.85, 0.6, 0.4, 0.2, 0.05])}),  # Wan passes its own flow sigmas
    (dict(use_flow_sigmas=True, prediction_type="epsilon", predict_x0=False, final_sigmas_type="sigma_min"), 10, {}),
    (dict(prediction_type="flow_prediction"), 10, {}),  # on VP sigmas: x0 = x - sigma_ve v
]


@pytest.mark.parametrize("cfg,steps,kw", OPTIONS, ids=[f"{_ids([c])[0]}-{s}" for c, s, _ in OPTIONS])
def test_options(cfg, steps, kw):
    for o in ORDERS:
        check({"solver_order": o, **cfg}, steps, **kw)


TRITON_CASES = [dict(solver_order=2, thresholding=True, sample_max_value=1.5, prediction_type="v_prediction"),
                dict(solver_order=2, predict_x0=False, solver_type="bh1", final_sigmas_type="sigma_min"),
                dict(solver_order=max(ORDERS), use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)]


@pytest.mark.skipif(not TRITON, reason="Triton is not available here (neither a GPU nor its interpreter)")
@pytest.mark.parametrize("cfg", TRITON_CASES, ids=_ids(TRITON_CASES))
def test_triton_interpreter(cfg):
    check(cfg, 8, backends=TRITON)


def test_options_matter():
    """The options above change the result (so equality with diffusers is not vacuous)."""
    cfg = dict(solver_order=2, final_sigmas_type="sigma_min")
    base, _ = run(FusedUniPCMultistepScheduler, cfg, 10)
    for change in (dict(solver_type="bh1"), dict(predict_x0=False), dict(disable_corrector=[2]),
                   dict(lower_order_final=False), dict(thresholding=True, sample_max_value=1.5),
                   dict(prediction_type="v_prediction"), dict(solver_order=1)):
        other, _ = run(FusedUniPCMultistepScheduler, {**cfg, **change}, 10)
        assert err(other, base) > 1e-4, change


# ---- diffusers' own test file for this scheduler ----
_TEST_BASE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", solver_order=2,
                  solver_type="bh2", final_sigmas_type="sigma_min")


def _diffusers_test_configs():
    cfgs = [dict(num_train_timesteps=n) for n in (25, 50, 100, 999, 1000)]
    cfgs += [dict(thresholding=thr, prediction_type=p, sample_max_value=m, solver_order=o, solver_type=st)
             for thr in (False, True) for o in ORDERS for st in ("bh1", "bh2") for m in (0.5, 1.0, 2.0)
             for p in ("epsilon", "sample")]
    cfgs += [dict(prediction_type=p) for p in ("epsilon", "v_prediction")]
    cfgs += [dict(rescale_betas_zero_snr=r) for r in (True, False)]
    cfgs += [dict(lower_order_final=lof) for lof in (True, False)]
    cfgs += [dict(use_karras_sigmas=True), dict(prediction_type="v_prediction", use_karras_sigmas=True),
             dict(use_beta_sigmas=True), dict(use_exponential_sigmas=True),
             dict(use_flow_sigmas=True, use_karras_sigmas=True)]
    return cfgs


@pytest.mark.parametrize("cfg", _diffusers_test_configs(), ids=_ids(_diffusers_test_configs()))
def test_diffusers_test_file_configs(cfg):
    """check_over_configs of diffusers' test file: its base config, dummy past outputs written to model_outputs after
    set_timesteps, a constant residual, solver_order + 1 steps from timesteps[0]; then a full 25-step loop with a
    model (its full_loop). Fused at every step, equal to diffusers."""
    cfg = {**_TEST_BASE, **cfg}
    sample = torch.rand(SHAPE, generator=torch.Generator().manual_seed(0))
    residual = 0.1 * sample
    outs = []
    for cls in (UniPCMultistepScheduler, FusedUniPCMultistepScheduler):
        s = cls(**cfg)
        s.set_timesteps(25)
        s.model_outputs = [residual + 0.2, residual + 0.15, residual + 0.10][:s.config.solver_order]
        x = sample
        for t in s.timesteps[:s.config.solver_order + 1]:
            x = s.step(residual, t, x).prev_sample
        outs.append(x)
    assert_fused(s, s.config.solver_order + 1)
    assert err([outs[1]], [outs[0]]) < 1e-5
    check(cfg, 10)  # its full_loop: 10 steps


def test_diffusers_test_file_steps_and_shapes():
    """test_step_shape (two steps at timesteps[5] and [6] with the same input sample: the second corrects from the
    first's result, converting the output at the sample given), test_inference_steps (a single step at timestep 0,
    the grid's last index), test_full_loop_with_noise (add_noise, then the loop from timesteps[8] without
    set_begin_index), and the 1-D samples of its second test class."""
    for shape in (SHAPE, (4, 3, 8)):
        sample = torch.rand(shape, generator=torch.Generator().manual_seed(0))
        residual = 0.1 * sample
        for n_steps in (1, 2, 3, 5, 10, 50, 100, 999, 1000):
            outs = []
            for cls in (UniPCMultistepScheduler, FusedUniPCMultistepScheduler):
                s = cls(**_TEST_BASE)
                s.set_timesteps(n_steps)
                outs.append(s.step(residual, 0, sample).prev_sample)
            assert_fused(s, 1)
            assert err([outs[1]], [outs[0]]) < 1e-6
        outs = []
        for cls in (UniPCMultistepScheduler, FusedUniPCMultistepScheduler):
            s = cls(**_TEST_BASE)
            s.set_timesteps(25)
            outs.append([s.step(residual, s.timesteps[i], sample).prev_sample for i in (5, 6)])
        assert_fused(s, 2)
        assert err(outs[1], outs[0]) < 1e-6
        outs = []
        for cls in (UniPCMultistepScheduler, FusedUniPCMultistepScheduler):
            s = cls(**_TEST_BASE)
            s.set_timesteps(10)
            x = s.add_noise(sample, torch.rand(shape, generator=torch.Generator().manual_seed(1)), s.timesteps[8:9])
            for t in s.timesteps[8:]:
                x = s.step(toy_model(x, t), t, x).prev_sample
            outs.append(x)
        assert_fused(s, 2)
        assert err([outs[1]], [outs[0]]) < 1e-6


def test_switch_and_config_round_trip(tmp_path):
    """test_switch (from_config through DPMSolverSinglestep, DEIS, DPMSolverMultistep and back) gives diffusers' result;
    same config keys and values, save/load, _compatibles, and the signatures pipelines introspect."""
    src = UniPCMultistepScheduler(**_TEST_BASE)
    s = FusedUniPCMultistepScheduler.from_config(src.config)
    for cls in (diffusers.DPMSolverSinglestepScheduler, diffusers.DEISMultistepScheduler,
                diffusers.DPMSolverMultistepScheduler, FusedUniPCMultistepScheduler):
        s = cls.from_config(s.config)
    want, _ = run(None, {}, 10, sched=UniPCMultistepScheduler(**_TEST_BASE))
    got, s = run(None, {}, 10, sched=s)
    assert_fused(s, 10)
    assert err(got, want) < 1e-6
    src = UniPCMultistepScheduler(solver_order=3, solver_type="bh1", predict_x0=False, disable_corrector=[1, 2],
                                  use_flow_sigmas=True, flow_shift=5.0, thresholding=True)
    ours = assert_drop_in_surface(src, FusedUniPCMultistepScheduler, tmp_path,
                                  ("set_timesteps", "step", "scale_model_input", "add_noise", "convert_model_output",
                                   "multistep_uni_p_bh_update", "multistep_uni_c_bh_update"))
    for s in (src, ours):
        s.set_timesteps(10)
    x, n, t = torch.randn(SHAPE), torch.randn(SHAPE), src.timesteps[[2, 5]]
    assert torch.equal(ours.add_noise(x, n, t), src.add_noise(x, n, t))


def test_flow_and_karras_sigmas_values():
    """diffusers' test_flow_and_karras_sigmas_values: the grid is diffusers' own (its set_timesteps)."""
    grids = []
    for cls in (UniPCMultistepScheduler, FusedUniPCMultistepScheduler):
        s = cls(sigma_min=0.01, sigma_max=200.0, use_flow_sigmas=True, use_karras_sigmas=True)
        s.set_timesteps(5)
        grids.append((s.sigmas.tolist(), s.timesteps.tolist()))
    assert grids[0] == grids[1]


# ---- precision and dtypes ----
def test_half_precision():
    """diffusers' test_fp16_support (thresholding at ratio 0, every prediction type and variant): float16 results, and
    no farther from diffusers' float32 run than diffusers' own float16 run (x2, + 1e-3), as the median over six
    samples: with epsilon outputs early steps amplify the sample's float16 rounding by 1 / alpha_t (~150), so single
    runs of either implementation scatter by 10x (tail included)."""
    for o in ORDERS:
        for st in ("bh1", "bh2"):
            for p in ("epsilon", "sample", "v_prediction"):
                cfg = dict(thresholding=True, dynamic_thresholding_ratio=0.0, prediction_type=p, solver_order=o,
                           solver_type=st)
                _, s = run(FusedUniPCMultistepScheduler, cfg, 10, torch.float16)
                assert_fused(s, 10)  # final sigma zero as in diffusers' test: bh1 gives NaN in diffusers there
                cfg["final_sigmas_type"] = "sigma_min"
                ref = [run(UniPCMultistepScheduler, cfg, 10, torch.float32, seed=k)[0] for k in range(6)]
                d16 = [err(run(UniPCMultistepScheduler, cfg, 10, torch.float16, seed=k)[0], ref[k]) for k in range(6)]
                for backend in BACKENDS:
                    o16 = []
                    for k in range(6):
                        xs, s = run(FusedUniPCMultistepScheduler, cfg, 10, torch.float16, backend, seed=k)
                        assert_fused(s, 10)
                        assert xs[-1].dtype == torch.float16
                        o16.append(err(xs, ref[k]))
                    assert np.median(o16) <= 2 * np.median(d16) + 1e-3, (cfg, backend, o16, d16)


@pytest.mark.parametrize("sample_dtype,model_dtype", [(torch.float32, torch.float16), (torch.float16, torch.float32)])
def test_mixed_dtypes(sample_dtype, model_dtype):
    """Sample and model output in different dtypes: diffusers' result dtype (the sample's), and no less accurate than
    diffusers against a float64 run on the same half-rounded outputs."""

    def model(dtype):
        return lambda x, t: toy_model(x.float(), t).to(model_dtype).to(dtype)

    for cfg in (dict(prediction_type="epsilon"), dict(prediction_type="sample"), dict(predict_x0=False)):
        cfg = {**cfg, "final_sigmas_type": "sigma_min"}
        ref, _ = run(UniPCMultistepScheduler, cfg, 6, torch.float64, model=model(torch.float64))
        d, _ = run(UniPCMultistepScheduler, cfg, 6, sample_dtype, model=model(model_dtype))
        for backend in BACKENDS:
            o, s = run(FusedUniPCMultistepScheduler, cfg, 6, sample_dtype, backend, model=model(model_dtype))
            assert_fused(s, 6)
            assert [a.dtype for a in o] == [a.dtype for a in d]
            assert err(o, ref) <= err(d, ref) + 1e-5, (cfg, backend, err(o, ref), err(d, ref))


# ---- diffusers' state, and what a pipeline does with it ----
def test_state_as_diffusers():
    """step_index, lower_order_nums, this_order, timestep_list, and model_outputs / last_sample (derived from the ring
    on demand) equal diffusers' after every step; set_timesteps starts over on the same object."""
    cfg = dict(solver_order=max(ORDERS), thresholding=True, sample_max_value=1.5)
    a, b = UniPCMultistepScheduler(**cfg), FusedUniPCMultistepScheduler(**cfg)
    for _ in range(2):
        for s in (a, b):
            s.set_timesteps(8)
        assert b.last_sample is None and b.model_outputs == [None] * cfg["solver_order"]
        xa = xb = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
        for t in a.timesteps:
            xa = a.step(toy_model(xa, t), t, xa).prev_sample
            xb, = b.step(toy_model(xb, t), t, xb, return_dict=False)
            assert (a.step_index, a.lower_order_nums, a.this_order) == (b.step_index, b.lower_order_nums, b.this_order)
            assert [int(v) for v in a.timestep_list if v is not None] == [int(v) for v in b.timestep_list
                                                                          if v is not None]
            for va, vb in zip(a.model_outputs, b.model_outputs, strict=True):
                assert vb is None or err([vb], [va]) < 1e-5
            if t != a.timesteps[-1]:  # after the last step its corrected sample is kept by no step
                assert err([b.last_sample], [a.last_sample]) < 1e-5
        assert err([xb], [xa]) < 1e-5
    with pytest.raises(RuntimeError, match="last_sample"):  # after the last step: kept by no later step
        _ = b.last_sample
    with pytest.raises(IndexError):  # past the end, like diffusers
        b.step(torch.zeros(SHAPE), 0, torch.zeros(SHAPE))


def test_writing_state_hands_over_to_diffusers():
    """ChronoEdit drops frames mid-trajectory by writing model_outputs[j] and last_sample: from there diffusers' own
    step continues from the state the fused steps reached, and the result is diffusers'."""

    def loop(cls, how):
        s = cls(solver_order=max(ORDERS), use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
        s.set_timesteps(10)
        x = torch.randn((1, 2, 5, 4, 4), generator=torch.Generator().manual_seed(3))
        for i, t in enumerate(s.timesteps):
            if i == 4 and how != "last only":
                x = x[:, :, [0, -1]]
                if how == "items":
                    for j in range(len(s.model_outputs)):
                        if s.model_outputs[j] is not None and s.model_outputs[j].shape[-3] != x.shape[-3]:
                            s.model_outputs[j] = s.model_outputs[j][:, :, [0, -1]]
                    if s.last_sample is not None:
                        s.last_sample = s.last_sample[:, :, [0, -1]]
                else:
                    last = s.last_sample[:, :, [0, -1]]
                    s.model_outputs = [None if m is None else m[:, :, [0, -1]] for m in s.model_outputs]
                    s.last_sample = last
            if i == 6 and how == "last only":
                s.last_sample = 0.9 * s.last_sample  # no other change: the corrector then starts from it
            x = s.step(toy_model(x, t), t, x).prev_sample
        return x, s

    for how in ("items", "lists", "last only"):
        want, _ = loop(UniPCMultistepScheduler, how)
        got, s = loop(FusedUniPCMultistepScheduler, how)
        assert "diffusers' own step() continues" in s.fused_reason
        assert err([got], [want]) < 1e-5, (how, err([got], [want]))
        s.set_timesteps(10)
        assert s.fused_reason is None


def test_a_changed_sample_is_diffusers_semantics():
    """A pipeline that changes the sample between steps (inpainting blends it with the noised image, Kandinsky passes a
    slice): diffusers' corrector starts from last_sample and only converts the output at the sample given; so does
    the drop-in. A returned sample modified in place is refused, before anything is written."""

    def loop(cls, blend):
        s = cls(solver_order=max(ORDERS))
        s.set_timesteps(10)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
        keep = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
        mask = (torch.arange(SHAPE[-1]) < 2).float()
        for t in s.timesteps:
            x = s.step(toy_model(x, t), t, x).prev_sample
            if blend:
                x = mask * keep + (1 - mask) * x
        return x, s

    want, _ = loop(UniPCMultistepScheduler, True)
    got, s = loop(FusedUniPCMultistepScheduler, True)
    assert_fused(s, 10)
    assert err([got], [want]) < 1e-5
    plain, _ = loop(FusedUniPCMultistepScheduler, False)
    assert err([plain], [got]) > 1e-2
    s = FusedUniPCMultistepScheduler()
    s.set_timesteps(6)
    x = torch.randn(SHAPE)
    x = s.step(toy_model(x, s.timesteps[0]), s.timesteps[0], x).prev_sample
    x.mul_(0.5)
    with pytest.raises(RuntimeError, match="modified in place"):
        s.step(toy_model(x, s.timesteps[1]), s.timesteps[1], x)
    assert s.step_index == 1


# ---- where diffusers fails: the better-defined result ----
@pytest.mark.parametrize("cfg", [dict(solver_type="bh1"), dict(predict_x0=False),
                                 dict(predict_x0=False, solver_type="bh1", prediction_type="v_prediction")],
                         ids=_ids([dict(solver_type="bh1"), dict(predict_x0=False), dict(predict_x0=False,
                                   solver_type="bh1", prediction_type="v_prediction")]))
def test_last_step_to_sigma_zero_is_finite(cfg):
    """final_sigmas_type="zero": diffusers' last (first-order) step forms 0 * inf with bh1 (B(h) = -h = -inf) or with
    predict_x0=False (sigma_t expm1(h)) and returns NaN. The drop-in takes the update's limit: diffusers' run to a
    last sigma of 1e-12 instead of 0 (float64) is the same trajectory up to ~1e-12."""
    for o in ORDERS:
        c = {**cfg, "solver_order": o}
        nan, _ = run(UniPCMultistepScheduler, c, 10)
        assert not torch.isfinite(nan[-1]).all() and torch.isfinite(nan[-2]).all()
        ref = UniPCMultistepScheduler(**c)
        ref.set_timesteps(10)
        ref.sigmas = ref.sigmas.double()
        ref.sigmas[-1] = 1e-12
        want, _ = run(None, c, 10, torch.float64, sched=ref)
        for backend in BACKENDS:
            got, s = run(FusedUniPCMultistepScheduler, c, 10, torch.float64, backend)
            assert_fused(s, 10)
            assert err(got, want) < 1e-9, (backend, err(got, want))


def test_higher_order_last_step_to_sigma_zero_is_first_order():
    """lower_order_final=False with final_sigmas_type="zero": diffusers' last step of order 2 divides by r = 0 (inf /
    NaN). The drop-in's last step is first order: its second order run equals diffusers' with lower_order_final=True
    (which lowers only that step at order 2)."""
    nan, _ = run(UniPCMultistepScheduler, dict(lower_order_final=False), 10)
    assert not torch.isfinite(nan[-1]).all()
    want, _ = run(UniPCMultistepScheduler, dict(lower_order_final=True), 10, torch.float64)
    got, s = run(FusedUniPCMultistepScheduler, dict(lower_order_final=False), 10, torch.float64)
    assert_fused(s, 10)
    assert err(got, want) < 1e-12


def _output_of_t(x, t):
    """An x0 prediction that depends on the timestep only (prediction_type="sample")."""
    return torch.full_like(x, 0.0) + torch.linspace(-1.5, 1.5, x.shape[-1]) * (1 + 0.001 * float(t))


def test_repeated_sigma_is_the_identity():
    """num_train_timesteps=25 at 25 steps repeats timestep 12 (and its sigma): diffusers' corrector over the
    zero-length step divides 0 by 0 (NaN from order 2 on, a singular solve at 3). The drop-in takes that step as the
    identity (no corrector over it, the history keeps distinct times): with an output that depends on t only, that is
    diffusers' run on the grid without the repeated entry, step by step (the identity step's result is the corrected
    sample); at order 1, where B(h) = 0 multiplies diffusers' NaN away, diffusers' own run too."""
    cfg = dict(num_train_timesteps=25, prediction_type="sample")
    for o in ORDERS:
        c = {**cfg, "solver_order": o}
        try:
            own, _ = run(UniPCMultistepScheduler, c, 25, torch.float64, model=_output_of_t)
        except torch.linalg.LinAlgError:  # order 3: a singular system instead of NaN
            own = [torch.full(SHAPE, float("nan"))]
        assert bool(torch.isfinite(own[-1]).all()) == (o == 1)
        ref = UniPCMultistepScheduler(**c)
        ref.set_timesteps(25)
        keep = [i for i in range(len(ref.timesteps)) if i == 0 or ref.timesteps[i] != ref.timesteps[i - 1]]
        dup = next(i for i in range(1, 25) if i not in keep) - 1  # the zero-length step
        ref.sigmas = ref.sigmas.double()[keep + [len(ref.sigmas) - 1]]
        ref.timesteps = ref.timesteps[keep]
        ref.num_inference_steps = len(keep)
        want, _ = run(None, c, 24, torch.float64, sched=ref, model=_output_of_t)
        for backend in BACKENDS:
            s = FusedUniPCMultistepScheduler(**c)
            s.fused_backend = backend
            got, s = run(None, c, 25, torch.float64, sched=s, model=_output_of_t)
            assert_fused(s, 25)
            assert err(got[:dup] + got[dup + 1:], want) < 1e-12, (o, backend)
            assert o > 1 or err(got, own) < 1e-12
        got, _ = run(FusedUniPCMultistepScheduler, {**c, "prediction_type": "epsilon"}, 25)
        assert all(bool(torch.isfinite(v).all()) for v in got)


@pytest.mark.parametrize("cfg,steps", [
    (dict(num_train_timesteps=100, use_flow_sigmas=True, prediction_type="flow_prediction"), 100),
    (dict(num_train_timesteps=100, use_karras_sigmas=True), 500),
    (dict(num_train_timesteps=100, rescale_betas_zero_snr=True), 200),  # the first sigma repeats too
], ids=["flow", "karras", "zero-snr"])
def test_repeated_first_timestep_starts_at_the_first_index(cfg, steps):
    """A grid whose first timestep repeats: diffusers' index search starts the loop at the second index, so the loop
    over the timesteps fails at its last step (AssertionError) or goes NaN. The drop-in starts at the first: its run
    without set_begin_index is diffusers' run with set_begin_index(0) (where that is finite)."""
    with pytest.raises(AssertionError):
        xs, _ = run(UniPCMultistepScheduler, cfg, steps)
        assert all(bool(torch.isfinite(v).all()) for v in xs)
    got, s = run(FusedUniPCMultistepScheduler, cfg, steps)
    assert_fused(s, steps)
    assert all(bool(torch.isfinite(v).all()) for v in got)
    want, d = run(UniPCMultistepScheduler, cfg, steps, begin=0)
    if all(bool(torch.isfinite(v).all()) for v in want):
        assert err(got, want) < 1e-4
    else:  # a repeated first sigma: a zero-length first step, the identity
        assert torch.equal(got[0], run(FusedUniPCMultistepScheduler, cfg, steps)[0][0])


# ---- what is not fused ----
def test_fallbacks_say_why_and_run_diffusers_step():
    """solver_p (another scheduler as the predictor), orders the op cannot combine, and an option unknown to this
    module run diffusers' own step for the whole trajectory, with the reason in fused_reason."""
    cases = [(dict(solver_p=diffusers.DPMSolverMultistepScheduler()), "solver_p"),
             (dict(solver_order=4, lower_order_final=False, final_sigmas_type="sigma_min"), "solver_order=4")]
    unknown = type("Unknown", (FusedUniPCMultistepScheduler,),
                   {"GRID_KEYS": FusedUniPCMultistepScheduler.GRID_KEYS - {"num_train_timesteps"}})
    for cfg, why in cases:
        want, _ = run(UniPCMultistepScheduler, cfg, 8)
        got, s = run(FusedUniPCMultistepScheduler, cfg, 8)
        assert why in s.fused_reason and s._fz_traj is None
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    want, _ = run(UniPCMultistepScheduler, dict(num_train_timesteps=500), 6)
    got, s = run(unknown, dict(num_train_timesteps=500), 6)
    assert "num_train_timesteps=500" in s.fused_reason
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    s = FusedUniPCMultistepScheduler(predict_x0=False, prediction_type="flow_prediction")
    s.set_timesteps(4)
    assert "flow_prediction" in s.fused_reason
    with pytest.raises(ValueError):  # diffusers' own error
        s.step(torch.zeros(SHAPE), s.timesteps[0], torch.zeros(SHAPE))


# ---- end to end ----
def test_unet_loop_end_to_end():
    """A manual loop with a tiny UNet2DModel (epsilon, and as a velocity network on flow sigmas, Wan's setting): the
    fused scheduler's final sample is diffusers'."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    for cfg in (dict(solver_order=2), dict(solver_order=max(ORDERS), use_flow_sigmas=True, flow_shift=3.0,
                                           prediction_type="flow_prediction", solver_type="bh1",
                                           final_sigmas_type="sigma_min")):
        finals = {}
        for name in ["diffusers"] + BACKENDS:
            s = (UniPCMultistepScheduler if name == "diffusers" else FusedUniPCMultistepScheduler)(**cfg)
            if name != "diffusers":
                s.fused_backend = name
            s.set_timesteps(8)
            x = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(5))
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for t in s.timesteps:
                    x = s.step(unet(s.scale_model_input(x, t), t).sample, t, x).prev_sample
            if name != "diffusers":
                assert_fused(s, 8)
            finals[name] = x
        for b in BACKENDS:
            assert err([finals[b]], [finals["diffusers"]]) < 5e-5, (cfg, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", backends_for("cuda"))
def test_cuda_no_host_sync_and_graph(backend):
    """On a GPU: the drop-in matches diffusers, no step synchronises with the device, and a captured trajectory
    replays the eager result."""
    dev = torch.device("cuda")
    cfg = dict(solver_order=max(ORDERS), thresholding=True, sample_max_value=1.5)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    ref = UniPCMultistepScheduler(**cfg)
    ref.set_timesteps(10)
    x = x0
    for t in ref.timesteps:
        x = ref.step(toy_model(x, t), t, x).prev_sample
    s = FusedUniPCMultistepScheduler(**cfg)
    s.fused_backend = backend

    def trajectory(inp, sync_check=False):
        s.set_timesteps(10)
        s.set_begin_index(0)
        y = inp
        if sync_check:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            for t in s.timesteps:
                y = s.step(toy_model(y, t), t, y).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return y

    static_x = x0.to(dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = trajectory(static_x)
        trajectory(static_x, sync_check=True)
    torch.cuda.current_stream().wait_stream(side)
    assert err([eager.cpu()], [x]) < 5e-5
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = trajectory(static_x)
    graph.replay()
    torch.cuda.synchronize()
    assert err([static_out.cpu()], [x]) < 5e-5
