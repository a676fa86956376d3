"""The forks of the authors' API (`dpm_kernels.forks`: SANA, PixArt, ldm / SD2) against statements of their rules,
written here in our own words, and an independent float64 sampler; plus analytic-model checks.

The forks' rules, as read from their code (NVlabs/Sana diffusion/model/dpm_solver.py, PixArt-alpha/PixArt-sigma
diffusion/model/dpm_solver.py, Stability-AI/stablediffusion ldm/models/diffusion/dpm_solver/):
- network time: authors / PixArt / ldm (t - 1/N) * 1000; SANA (t - 1/N) * N; SANA's "discrete_flow" t * 1000.
- flow model output v becomes noise as (1 - t) v + x; then x0 = (x - t * noise) / (1 - t).
- SANA's time_uniform_flow grid: u_i = 1 - t_0 + i/n (t_0 - t_T), t_i = s u_i / (1 + (s - 1) u_i), s = flow_shift.
- interval guidance (SANA): classifier-free where lo < t < hi (float32 times), the conditional output alone
  elsewhere; "classifier-free_PAG": every step uncond + g (cond - uncond) + p (cond - perturbed) from the stacked
  [uncond, cond, cond] call (g = 1: cond + p (cond - perturbed) from [cond, cond]), the perturbed copy last;
  "classifier-free_PAG_seq": below t = 0.5 the classifier-free rule, from 0.5 on the three-way combination.
- multistep lower_order_final: SANA and PixArt at any number of steps, the authors below 10, SD2's sampler below 15.
- SANA's progress: after the first evaluation (1, n + 1), then after update i (i + 1, n + 1); singlestep blocks
  (b, K + 1); the callback is tried as f(step / total, desc=...) and then as f(step, total).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from conftest import backends_for

import dpm_kernels as dk
from dpm_kernels import forks
from dpm_kernels.forks import ldm, pixart, sana

MEANS = {"uncond": [[1.0, -0.5], [-1.0, 0.5]], "cond": [[1.5, 0.3], [-0.7, 0.9]],
         "perturbed": [[0.2, -1.2], [1.1, 1.4]]}
B = 5
COND, UNCOND = torch.ones(B), torch.zeros(B)
BACKENDS = [b for b in backends_for("cpu") if b != "triton"]  # Triton's interpreter: too slow for whole trajectories


def x_T(seed=0, shape=(B, 2)):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


class Net:
    """A conditional network from exact mixtures: cond 1 -> the "cond" mixture, 0 -> "uncond"; while `perturb` is k,
    the last 1/k of the batch is the "perturbed" mixture. Records (batch size, network time) of every call."""

    def __init__(self, ns, model_type, scale=1000.0):
        self.g = {k: dk.GaussianMixtureModel(m, [0.4, 0.6], noise_schedule=ns, model_type=model_type,
                                             discrete_time_scale=scale) for k, m in MEANS.items()}
        self.perturb = 0
        self.calls = []

    def __call__(self, x, t_in, cond=None):
        self.calls.append((x.shape[0], t_in.clone()))
        out = self.g["uncond"](x, t_in)
        if cond is not None:
            out = torch.where(cond.reshape(-1, *([1] * (x.dim() - 1))) > 0.5, self.g["cond"](x, t_in), out)
        if self.perturb:
            n = x.shape[0] // self.perturb
            out = torch.cat([out[:-n], self.g["perturbed"](x[-n:], t_in[-n:])])
        return out

    def hook(self):
        @contextlib.contextmanager
        def pag_hook(k):
            self.perturb = k
            try:
                yield
            finally:
                self.perturb = 0
        return pag_hook


# ---------------- the independent reference: the forks' rules in float64, one step at a time ----------------

def guided_raw(net, x, t, t_in, rule, g, p, interval):
    """(outputs combined as the fork's rule says) for an evaluation at float time t; network time t_in [B]."""
    lo, hi = interval
    t32 = np.float32(t)
    cfg_on = g != 1.0 and np.float32(lo) < t32 < np.float32(hi)
    seq_cfg = rule == "classifier-free_PAG_seq" and t32 < 0.5
    if rule == "classifier-free" or seq_cfg:
        if not cfg_on:
            return net(x, t_in, COND)
        u, c = net(torch.cat([x, x]), torch.cat([t_in, t_in]), torch.cat([UNCOND, COND])).chunk(2)
        return u + g * (c - u)
    if rule == "classifier-free_PAG" and g == 1.0:
        net.perturb = 2
        c, pt = net(torch.cat([x, x]), torch.cat([t_in, t_in]), torch.cat([COND, COND])).chunk(2)
        net.perturb = 0
        return c + p * (c - pt)
    net.perturb = 3
    u, c, pt = net(torch.cat([x] * 3), torch.cat([t_in] * 3), torch.cat([UNCOND, COND, COND])).chunk(3)
    net.perturb = 0
    return u + g * (c - u) + p * (c - pt)


def reference_multistep(x, times, orders, alpha_sigma, to_x0):
    """Multistep DPM-Solver++ ("dpmsolver" type) in float64 from the formulas of docs/math.md; to_x0(x, t) is the
    guided data prediction. A step into sigma = 0 is first order (the forks' last step with lower_order_final)."""
    a = [alpha_sigma(t)[0] for t in times]
    s = [alpha_sigma(t)[1] for t in times]
    lam = [math.log(ai) - math.log(si) if si > 0 else math.inf for ai, si in zip(a, s, strict=True)]
    ms = []
    for i, o in enumerate(orders):
        ms.insert(0, to_x0(x, times[i]))
        h = lam[i + 1] - lam[i]
        phi = -math.expm1(-h) if h != math.inf else 1.0  # 1 - e^{-h}
        x = (s[i + 1] / s[i]) * x + a[i + 1] * phi * ms[0]
        if o >= 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d1_0 = (ms[0] - ms[1]) / r0
            if o == 2:
                x = x + 0.5 * a[i + 1] * phi * d1_0
            else:
                r1 = (lam[i - 1] - lam[i - 2]) / h
                d1_1 = (ms[1] - ms[2]) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi2 = -phi / h + 1.0
                phi3 = phi2 / h - 0.5
                x = x + a[i + 1] * phi2 * d1 - a[i + 1] * phi3 * d2
    return x


def fork_orders(steps, order, lof_below, ends_at_zero=False):
    out = []
    for i in range(1, steps + 1):
        o = min(order, i)
        if steps < lof_below:
            o = min(o, steps + 1 - i)
        out.append(o)
    if ends_at_zero:
        out[-1] = 1
    return out


def flow_grid(steps, shift, t_T=1.0, t_0=1e-3):
    u = np.array([1.0 - t_0 + i / steps * (t_0 - t_T) for i in range(steps + 1)])
    return shift * u / (1.0 + (shift - 1.0) * u)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---------------- the time_uniform_flow grid ----------------

@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0, 0.5])
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_time_uniform_flow_grid(shift, steps):
    ns = sana.NoiseScheduleFlow("discrete_flow")
    s = sana.DPM_Solver(lambda x, t: x, ns)
    got = s.plan(steps=steps, skip_type="time_uniform_flow", flow_shift=shift).times
    np.testing.assert_allclose(got, flow_grid(steps, shift), rtol=1e-13, atol=0)
    assert got[-1] == 0.0 and got[0] == pytest.approx(shift * 0.999 / (1 + (shift - 1) * 0.999), rel=1e-15)
    sub = s.plan(steps=steps, t_start=0.8, t_end=0.01, skip_type="time_uniform_flow", flow_shift=shift).times
    np.testing.assert_allclose(sub, flow_grid(steps, shift, 0.8, 0.01), rtol=1e-13, atol=1e-17)
    tt = s.get_time_steps("time_uniform_flow", 1.0, 1e-3, steps, "cpu", shift=shift)
    assert tt.dtype == torch.float32 and torch.equal(tt, torch.from_numpy(got).float())


# ---------------- SANA's flow path ----------------

def sana_flow_reference(net, steps, order, shift, interval, rule="classifier-free", g=4.5, p=2.0, lof=True,
                        x=None):
    x = x_T() if x is None else x
    times = flow_grid(steps, shift)

    def to_x0(xx, t):
        t_in = torch.full((B,), t * 1000.0, dtype=torch.float64)
        v = guided_raw(net, xx, t, t_in, rule, g, p, interval)
        noise = (1.0 - t) * v + xx
        return (xx - t * noise) / (1.0 - t)

    return reference_multistep(x, times, fork_orders(steps, order, math.inf if lof else 0, True),
                               lambda t: (1.0 - t, t), to_x0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.2, 0.7)])
def test_sana_flow_sample_matches_reference(backend, shift, order, interval):
    """SANA's flow sampling call, step by step in float64: discrete_flow time, velocity conversion, interval guidance,
    the shifted grid to t = 0 and lower orders at the end (20 steps)."""
    ns = sana.NoiseScheduleFlow(schedule="discrete_flow")
    net = Net(ns, "flow")
    fn = sana.model_wrapper(net, ns, model_type="flow", guidance_type="classifier-free", condition=COND,
                            unconditional_condition=UNCOND, guidance_scale=4.5, interval_guidance=list(interval))
    out = sana.DPM_Solver(fn, ns, algorithm_type="dpmsolver++", backend=backend).sample(
        x_T(), steps=20, order=order, skip_type="time_uniform_flow", method="multistep", flow_shift=shift)
    ref = sana_flow_reference(Net(ns, "flow"), 20, order, shift, interval)
    assert rel(out, ref) < 1e-9


def test_final_step_to_zero_returns_the_previous_data_prediction():
    """The last step of the time_uniform_flow grid ends at t = 0 (alpha = 1, sigma = 0): it returns the data
    prediction made at the previous grid point, at every order (higher orders have no finite limit there, so the last
    step is first order also with lower_order_final=False; SANA gives NaN then)."""
    ns = sana.NoiseScheduleFlow("discrete_flow")
    net = Net(ns, "flow")
    fn = sana.model_wrapper(net, ns, "flow", None, "classifier-free", COND, UNCOND, 3.0)
    for order, lof in ((1, True), (2, True), (3, True), (2, False), (3, False)):
        s = sana.DPM_Solver(fn, ns, backend="torch")
        y, inter = s.sample(x_T(), steps=8, order=order, skip_type="time_uniform_flow", flow_shift=3.0,
                            lower_order_final=lof, return_intermediate=True)
        t_prev = float(flow_grid(8, 3.0)[-2])
        x0_prev = s.data_prediction_fn(inter[-2], torch.tensor([t_prev], dtype=torch.float64))
        assert torch.isfinite(y).all() and rel(y, x0_prev) < 1e-12
        assert s.plan(steps=8, order=order, skip_type="time_uniform_flow", flow_shift=3.0,
                      lower_order_final=lof).orders[-1] == 1


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_flow_grid_to_zero_converges_to_the_exact_solution(shift):
    """Analytic check: one Gaussian's flow ODE from the grid's first time to t = 0 (clean data) has a closed form;
    every order converges to it on SANA's shifted grid (first order at rate 1, the others at least 8x lower error
    from 20 to 160 steps and below first order's)."""
    ns = sana.NoiseScheduleFlow("discrete_flow")
    mu, std = [0.7, -0.4], 0.5
    fn = sana.model_wrapper(dk.GaussianMixtureModel([mu], [std], noise_schedule=ns, model_type="flow"), ns, "flow")
    x = x_T(1, (16, 2))
    exact = dk.exact_ode_solution(x, mu, std, ns, float(flow_grid(1, shift)[0]), 0.0)
    errs = {}
    for order in (1, 2, 3):
        errs[order] = [float((sana.DPM_Solver(fn, ns, backend="torch").sample(
            x, steps=n, order=order, skip_type="time_uniform_flow", flow_shift=shift) - exact).abs().max())
            for n in (20, 40, 80, 160)]
    slopes = -np.diff(np.log2(errs[1]))
    assert ((slopes > 0.85) & (slopes < 1.15)).all(), errs[1]
    for order in (2, 3):
        assert errs[order][-1] < errs[order][0] / 8 and errs[order][-1] < errs[1][-1] / 3, errs


def test_interval_guidance_rule_and_default():
    """Guided evaluations are exactly those with lo < t < hi (2B-sample calls), the others call the network with the
    condition alone (B samples); SANA's default [0, 1] leaves the first step at t = 1 unguided, PixArt guides it."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    for interval, first_guided in ((None, False), ((0.3, 0.6), False), ((-1.0, 2.0), True)):
        ns = sana.NoiseScheduleVP("discrete", betas=betas)
        net = Net(ns, "noise", ns.total_N)
        kw = {} if interval is None else {"interval_guidance": interval}
        fn = sana.model_wrapper(net, ns, "noise", None, "classifier-free", COND, UNCOND, 3.0, **kw)
        s = sana.DPM_Solver(fn, ns, backend="torch")
        s.sample(x_T(), steps=10, order=2)
        lo, hi = (0.0, 1.0) if interval is None else interval
        times = s.plan(steps=10, order=2).times[:-1]
        assert [n for n, _ in net.calls] == [2 * B if lo < t < hi else B for t in times]
        assert (net.calls[0][0] == 2 * B) == first_guided
    net = Net(ns, "noise")
    fn = pixart.model_wrapper(net, ns, "noise", None, "classifier-free", COND, UNCOND, 3.0)
    pixart.DPM_Solver(fn, ns, backend="torch").sample(x_T(), steps=10, order=2)
    assert [n for n, _ in net.calls] == [2 * B] * 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_sana_vp_and_pixart_vp_match_reference(backend):
    """The discrete VP path of both forks against the reference: a clipped cosine schedule (N = total_N < 1000),
    where SANA feeds the network (t - 1/N) * N and PixArt (t - 1/N) * 1000; interval guidance on for SANA."""
    betas = torch.from_numpy(forks.named_betas("squaredcos_cap_v2", 1000))
    for fork, mod in (("sana", sana), ("pixart", pixart)):
        ns = mod.NoiseScheduleVP("discrete", betas=betas)
        n = ns.total_N
        assert n < 1000
        scale = n if fork == "sana" else 1000.0
        interval = (0.0, 1.0) if fork == "sana" else (-math.inf, math.inf)
        net = Net(ns, "noise", scale)
        solver = forks.DPMS(net, COND, UNCOND, 4.0, noise_schedule="squaredcos_cap_v2", fork=fork, backend=backend)
        for order, steps, skip in ((2, 20, "time_uniform"), (3, 12, "logSNR")):
            out = solver.sample(x_T(), steps=steps, order=order, skip_type=skip, method="multistep")
            times = solver.plan(steps=steps, order=order, skip_type=skip).times
            ref_net = Net(ns, "noise", scale)

            def alpha_sigma(t, ns=ns):
                return tuple(float(v) for v in ns.alpha_sigma64(t))

            def to_x0(xx, t, ref_net=ref_net, scale=scale, interval=interval, n=n, alpha_sigma=alpha_sigma):
                t_in = torch.full((B,), (t - 1.0 / n) * scale, dtype=torch.float64)
                a, s = alpha_sigma(t)
                return (xx - s * guided_raw(ref_net, xx, t, t_in, "classifier-free", 4.0, 0.0, interval)) / a

            ref = reference_multistep(x_T(), times, fork_orders(steps, order, math.inf), alpha_sigma, to_x0)
            assert rel(out, ref) < 1e-9, (fork, order, skip)
            t_in = torch.stack([t[0] for _, t in net.calls[-steps:]])
            np.testing.assert_allclose(t_in.numpy(), (times[:-1] - 1.0 / n) * scale, rtol=1e-14)


def test_discrete_flow_network_time():
    ns = sana.NoiseScheduleFlow("discrete_flow")
    net = Net(ns, "flow")
    sana.DPM_Solver(sana.model_wrapper(net, ns, "flow"), ns, backend="torch").sample(
        x_T(), steps=6, skip_type="time_uniform_flow", flow_shift=3.0)
    np.testing.assert_allclose(torch.stack([t[0] for _, t in net.calls]).numpy(), flow_grid(6, 3.0)[:-1] * 1000.0,
                               rtol=1e-14)
    assert dk.NoiseScheduleFlow().schedule == "flow"  # the package's own flow schedule feeds t itself
    assert sana.NoiseScheduleFlow().schedule == "discrete_flow"  # SANA's default


# ---------------- perturbed-attention guidance ----------------

@pytest.mark.parametrize("rule", ["classifier-free_PAG", "classifier-free_PAG_seq"])
@pytest.mark.parametrize("g", [1.0, 4.5])
def test_pag_combination_matches_reference(rule, g):
    """PAG's three-way combination (two-way at g = 1), fused, against the reference; the interval does not apply to
    "classifier-free_PAG"; "_PAG_seq" switches at t = 0.5."""
    ns = sana.NoiseScheduleFlow("discrete_flow")
    net = Net(ns, "flow")
    fn = sana.model_wrapper(net, ns, "flow", None, rule, COND, UNCOND, g, pag_scale=2.0, pag_applied_layers=[3],
                            interval_guidance=[0.2, 0.7], pag_hook=net.hook())
    for order in (2, 3):
        net.calls.clear()
        out = sana.DPM_Solver(fn, ns, backend="torch").sample(x_T(), steps=12, order=order,
                                                              skip_type="time_uniform_flow", flow_shift=3.0)
        ref = sana_flow_reference(Net(ns, "flow"), 12, order, 3.0, (0.2, 0.7), rule, g, 2.0)
        assert rel(out, ref) < 1e-9
        times = flow_grid(12, 3.0)[:-1]
        if rule == "classifier-free_PAG":
            want = [2 * B if g == 1.0 else 3 * B] * 12
        else:
            want = [(2 * B if (0.2 < t < 0.7 and g != 1.0) else B) if t < 0.5 else 3 * B for t in times]
        assert [n for n, _ in net.calls] == want


@pytest.mark.parametrize("g,name", [(1.0, "pag"), (3.0, "pagcfg")])
def test_sana_pag_hook_swaps_sanas_attention_processors(monkeypatch, g, name):
    """Without a hook, SANA's model_wrapper swaps the attention of pag_applied_layers for SANA's identity processor
    (the two-chunk one at g = 1, the CFG one otherwise) during the stacked call and back afterwards."""
    log = []

    def proc(name):
        class P:
            def __init__(self, attn):
                log.append((name, attn.index))
        return P

    mod = types.ModuleType("diffusion.model.nets.sana_blocks")
    mod.PAGIdentitySelfAttnProcessorLiteLA = proc("pag")
    mod.PAGCFGIdentitySelfAttnProcessorLiteLA = proc("pagcfg")
    mod.SelfAttnProcessorLiteLA = proc("plain")
    for pkg in ("diffusion", "diffusion.model", "diffusion.model.nets"):
        monkeypatch.setitem(sys.modules, pkg, types.ModuleType(pkg))
    monkeypatch.setitem(sys.modules, "diffusion.model.nets.sana_blocks", mod)
    ns = sana.NoiseScheduleFlow("discrete_flow")
    gm = Net(ns, "flow")

    class Sana(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = [types.SimpleNamespace(attn=types.SimpleNamespace(index=i)) for i in range(4)]

        def forward_with_dpmsolver(self, x, t, c):
            log.append(("call", x.shape[0]))
            return gm(x, t, c)

    net = Sana()
    solver = sana.DPMS(net.forward_with_dpmsolver, COND, UNCOND, g, pag_scale=2.0, pag_applied_layers=[1, 3],
                       model_type="flow", guidance_type="classifier-free_PAG", schedule="FLOW")
    solver.sample(x_T(), steps=2, order=1, skip_type="time_uniform_flow", flow_shift=3.0)
    k = 2 if g == 1.0 else 3
    one = [(name, 1), (name, 3), ("call", k * B), ("plain", 1), ("plain", 3)]
    assert log == one * 2
    with pytest.raises(ValueError, match="pag_hook"):
        dk.model_wrapper(gm, ns, "flow", None, "classifier-free_PAG", COND, UNCOND, 3.0, pag_applied_layers=[1])


# ---------------- rules of the solvers ----------------

def test_lower_order_final_rules():
    ns = dk.NoiseScheduleVP("linear")
    fn = dk.model_wrapper(lambda x, t: x, ns)
    for steps in (5, 12, 20):
        authors = dk.DPM_Solver(fn, ns).plan(steps=steps, order=3).orders
        fork = sana.DPM_Solver(fn, ns).plan(steps=steps, order=3).orders
        assert fork == pixart.DPM_Solver(fn, ns).plan(steps=steps, order=3).orders == fork_orders(steps, 3, math.inf)
        assert authors == fork_orders(steps, 3, 10)
    fixed = sana.DPM_Solver(fn, ns).plan(steps=20, order=3, lower_order_final_threshold=10).orders
    assert fixed == fork_orders(20, 3, 10)


def test_progress_callbacks():
    ns = sana.NoiseScheduleFlow("discrete_flow")
    fn = sana.model_wrapper(Net(ns, "flow"), ns, "flow")
    s = sana.DPM_Solver(fn, ns, backend="torch")
    seen = []
    s.register_progress_bar(lambda step, total: seen.append((step, total)))
    s.sample(x_T(), steps=6, order=2, skip_type="time_uniform_flow", flow_shift=3.0)
    assert seen == [(i, 7) for i in range(1, 8)]
    seen.clear()
    s.sample(x_T(), steps=6, order=2, t_start=0.9, method="singlestep")
    assert seen == [(b, 4) for b in range(1, 4)]  # three blocks of order 2: one short of the total, as SANA
    frac = []
    s.register_progress_bar(lambda f, desc: frac.append((f, desc)))  # gradio's progress(fraction, desc=...)
    s.sample(x_T(), steps=3, order=1, skip_type="time_uniform_flow")
    assert frac == [(i / 4, f"Generating {i}/4") for i in range(1, 5)]
    s.register_progress_bar(None)
    s.sample(x_T(), steps=3, order=1, skip_type="time_uniform_flow")
    with pytest.raises(TypeError, match="progress_fn"):
        s.register_progress_bar(3)


def test_singlestep_on_the_flow_path():
    """SANA's singlestep flow path is NaN at orders 2-3 (its inverse_lambda is exp(-lambda)); here the intermediate
    times are right, so every order converges to the exact solution. The singlestep grids are not shifted (SANA
    passes no flow_shift to them), and a last block into t = 0 runs as first-order steps."""
    ns = sana.NoiseScheduleFlow("discrete_flow")
    mu, std = [0.7, -0.4], 0.5
    fn = sana.model_wrapper(dk.GaussianMixtureModel([mu], [std], noise_schedule=ns, model_type="flow"), ns, "flow")
    x = x_T(2, (8, 2))
    exact = dk.exact_ode_solution(x, mu, std, ns, 0.4, 1e-3)
    for order in (1, 2, 3):  # logSNR steps from t = 0.4: the slope of the error over 24 -> 96 steps is the order
        e = [float((sana.DPM_Solver(fn, ns, backend="torch").sample(x, steps=n, order=order, method="singlestep",
                                                                     t_start=0.4, skip_type="logSNR") - exact
                    ).abs().max()) for n in (24, 96)]
        assert math.log2(e[0] / e[1]) / 2 > order - 0.5, (order, e)
    s = sana.DPM_Solver(fn, ns, backend="torch")
    for shift in (1.0, 5.0):
        plan = s.plan(steps=6, order=2, method="singlestep", skip_type="time_uniform_flow", flow_shift=shift)
        np.testing.assert_allclose(plan.times, np.concatenate([flow_grid(6, 1.0)[[0, 2, 4]], flow_grid(6, 1.0)[5:]]),
                                   rtol=1e-14)
        assert plan.orders == [2, 2, 1, 1]
    y = s.sample(x, steps=6, order=3, method="singlestep", skip_type="time_uniform_flow")
    assert torch.isfinite(y).all()


def test_model_output_tuple_first_element():
    ns = dk.NoiseScheduleVP("linear")
    gm = dk.GaussianMixtureModel(MEANS["uncond"], [0.4, 0.6], noise_schedule=ns)
    a = dk.DPM_Solver(dk.model_wrapper(gm, ns), ns, backend="torch").sample(x_T(), steps=5)
    b = dk.DPM_Solver(dk.model_wrapper(lambda x, t: (gm(x, t), "extra"), ns), ns, backend="torch").sample(x_T(),
                                                                                                          steps=5)
    assert torch.equal(a, b)


# ---------------- DPMS: both forks' arguments ----------------

SANA_DPMS = ["model", "condition", "uncondition", "cfg_scale", ("pag_scale", 1.0), ("pag_applied_layers", None),
             ("model_type", "noise"), ("noise_schedule", "linear"), ("guidance_type", "classifier-free"),
             ("model_kwargs", None), ("diffusion_steps", 1000), ("schedule", "VP"), ("interval_guidance", None)]
PIXART_DPMS = ["model", "condition", "uncondition", "cfg_scale", ("model_type", "noise"),
               ("noise_schedule", "linear"), ("guidance_type", "classifier-free"), ("model_kwargs", None),
               ("diffusion_steps", 1000)]
SANA_WRAPPER = ["model", "noise_schedule", ("model_type", "noise"), ("model_kwargs", None), ("guidance_type", "uncond"),
                ("condition", None), ("unconditional_condition", None), ("guidance_scale", 1.0), ("pag_scale", 1.0),
                ("pag_applied_layers", ()), ("interval_guidance", (0, 1.0)), ("classifier_fn", None),
                ("classifier_kwargs", None)]
AUTHORS_WRAPPER = ["model", "noise_schedule", ("model_type", "noise"), ("model_kwargs", None),
                   ("guidance_type", "uncond"), ("condition", None), ("unconditional_condition", None),
                   ("guidance_scale", 1.0), ("classifier_fn", None), ("classifier_kwargs", None)]


def positional(fn):
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind != p.POSITIONAL_OR_KEYWORD:
            continue
        out.append(p.name if p.default is p.empty else (p.name, p.default))
    return out


def test_signatures():
    """Positional parameters and defaults as the forks' (SANA's [0, 1.0] / [] defaults as tuples); anything more is
    keyword-only."""
    assert positional(forks.DPMS) == positional(sana.DPMS) == SANA_DPMS
    assert positional(pixart.DPMS) == PIXART_DPMS
    assert positional(sana.model_wrapper) == SANA_WRAPPER
    assert positional(dk.model_wrapper) == positional(pixart.model_wrapper) == AUTHORS_WRAPPER
    sample = positional(sana.DPM_Solver.sample)
    assert sample[-2:] == [("return_intermediate", False), ("flow_shift", 1.0)]
    assert positional(dk.DPM_Solver.get_time_steps)[-1] == ("shift", 1.0)
    assert positional(ldm.DPMSolverSampler.sample)[:20] == [
        "self", "S", "batch_size", "shape", ("conditioning", None), ("callback", None), ("normals_sequence", None),
        ("img_callback", None), ("quantize_x0", False), ("eta", 0.0), ("mask", None), ("x0", None),
        ("temperature", 1.0), ("noise_dropout", 0.0), ("score_corrector", None), ("corrector_kwargs", None),
        ("verbose", True), ("x_T", None), ("log_every_t", 100), ("unconditional_guidance_scale", 1.0)]


def test_named_betas_equal_diffusers():
    from diffusers import DDPMScheduler

    for name in forks.BETA_SCHEDULES:
        for n in (1000, 250):
            ref = DDPMScheduler(num_train_timesteps=n, beta_schedule=name, beta_start=1e-4 * 1000 / n,
                                beta_end=0.02 * 1000 / n).betas.double().numpy()
            np.testing.assert_allclose(forks.named_betas(name, n), ref, rtol=1e-6)  # diffusers keeps float32


def test_dpms_schedules_and_fork_choice():
    net = Net(dk.NoiseScheduleVP("linear"), "noise")
    s = forks.DPMS(net, COND, UNCOND, 4.5, schedule="FLOW", model_type="flow")
    assert isinstance(s, sana.DPM_Solver) and s.noise_schedule.schedule == "discrete_flow"
    s = forks.DPMS(net, COND, UNCOND, 4.5, fork="pixart", diffusion_steps=500)
    assert s.noise_schedule.total_N == 500 and s.lower_order_final_threshold == math.inf
    with pytest.raises(ValueError, match="interval_guidance"):
        forks.DPMS(net, COND, UNCOND, 4.5, fork="pixart", interval_guidance=[0.1, 0.9])
    with pytest.raises(ValueError, match="schedule"):
        forks.DPMS(net, COND, UNCOND, 4.5, schedule="EDM")
    with pytest.raises(ValueError, match="fork"):
        forks.DPMS(net, COND, UNCOND, 4.5, fork="sd3")
    with pytest.raises(ValueError, match="noise_schedule"):
        forks.DPMS(net, COND, UNCOND, 4.5, noise_schedule="cosine")


def test_bad_input_is_named():
    ns = sana.NoiseScheduleFlow("discrete_flow")
    fn = sana.model_wrapper(Net(ns, "flow"), ns, "flow")
    s = sana.DPM_Solver(fn, ns)
    for shift in (0.0, -1.0, math.inf, "3"):
        with pytest.raises(ValueError, match="flow_shift"):
            s.sample(x_T(), steps=4, skip_type="time_uniform_flow", flow_shift=shift)
    vp = dk.NoiseScheduleVP("linear")
    with pytest.raises(ValueError, match="skip_type"):
        dk.DPM_Solver(dk.model_wrapper(lambda x, t: x, vp), vp).sample(x_T(), steps=4, skip_type="time_uniform_flow")
    with pytest.raises(TypeError, match="interval_guidance"):
        dk.model_wrapper(lambda x, t, c: x, ns, "flow", None, "classifier-free", COND, UNCOND, 2.0,
                         interval_guidance=0.5)
    with pytest.raises(ValueError, match="schedule"):
        dk.NoiseScheduleFlow("edm")
    with pytest.raises(ValueError, match="unconditional_condition"):
        dk.model_wrapper(lambda x, t, c: x, ns, "flow", None, "classifier-free_PAG_seq", COND, None, 1.0)
    with pytest.raises(ValueError, match="lower_order_final_threshold"):
        s.sample(x_T(), steps=4, lower_order_final_threshold=-1)


# ---------------- ldm / SD2: DPMSolverSampler ----------------

class LatentDiffusion:
    """A stand-in for ldm's LatentDiffusion: apply_model(x, t, c) with c a tensor or {"c_crossattn": [tensor]}."""

    def __init__(self, parameterization, alphas_cumprod):
        self.parameterization = parameterization
        self.alphas_cumprod = alphas_cumprod
        self.betas = 1 - alphas_cumprod / torch.cat([torch.ones(1, dtype=alphas_cumprod.dtype), alphas_cumprod[:-1]])
        self.device = self.betas.device
        ns = dk.NoiseScheduleVP("discrete", alphas_cumprod=alphas_cumprod.float().double(), clipped_lambda=None)
        self.net = Net(ns, "noise" if parameterization == "eps" else "v")

    def apply_model(self, x, t, c):
        c = c["c_crossattn"][0] if isinstance(c, dict) else c
        return self.net(x.reshape(x.shape[0], -1), t, c).reshape(x.shape)


SD_BETAS = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2


@pytest.mark.parametrize("param", ["eps", "v"])
@pytest.mark.parametrize("steps", [14, 15, 25])
@pytest.mark.parametrize("as_dict", [False, True])
def test_ldm_sampler_matches_reference(param, steps, as_dict):
    """SD2's DPMSolverSampler: float32 alphas_cumprod unclipped (a cosine schedule that the authors' later code would
    clip), network time (t - 1/N) * 1000, eps or v parameterization, dict conditions, DPM-Solver++(2) multistep on
    a time-uniform grid lowering its final order below 15 steps; (samples, None) returned."""
    ac = torch.cumprod(1 - torch.from_numpy(forks.named_betas("squaredcos_cap_v2", 1000)), 0)
    model = LatentDiffusion(param, ac)
    c, uc = ({"c_crossattn": [COND]}, {"c_crossattn": [UNCOND]}) if as_dict else (COND, UNCOND)
    xT = x_T(3, (B, 2, 1, 1))
    out, none = ldm.DPMSolverSampler(model, device=torch.device("cpu")).sample(
        steps, B, (2, 1, 1), c, x_T=xT, unconditional_guidance_scale=7.5, unconditional_conditioning=uc,
        verbose=False)
    assert none is None and out.shape == xT.shape
    ns = dk.NoiseScheduleVP("discrete", alphas_cumprod=ac.float().double(), clipped_lambda=None)
    assert ns.total_N == 1000
    ref_net = Net(ns, "noise" if param == "eps" else "v")

    def to_x0(xx, t):
        t_in = torch.full((B,), (t - 1e-3) * 1000.0, dtype=torch.float64)
        a, s = (float(v) for v in ns.alpha_sigma64(t))
        out = guided_raw(ref_net, xx, t, t_in, "classifier-free", 7.5, 0.0, (-1, 2))
        return (xx - s * out) / a if param == "eps" else a * xx - s * out

    ref = reference_multistep(xT.reshape(B, 2), np.linspace(1.0, 1e-3, steps + 1), fork_orders(steps, 2, 15),
                              lambda t: tuple(float(v) for v in ns.alpha_sigma64(t)), to_x0)
    assert rel(out.reshape(B, 2), ref) < 1e-9


def test_ldm_sampler_defaults_and_refusals():
    ac = torch.cumprod(1 - SD_BETAS, 0)
    model = LatentDiffusion("eps", ac)
    sampler = ldm.DPMSolverSampler(model)
    torch.manual_seed(7)
    a, _ = sampler.sample(4, 3, (2, 1, 1), COND[:3], unconditional_guidance_scale=3.0,
                          unconditional_conditioning=UNCOND[:3], backend="torch")
    torch.manual_seed(7)
    xT = torch.randn(3, 2, 1, 1)  # SD2 draws x_T with the global generator on the model's device
    b, _ = sampler.sample(4, 3, (2, 1, 1), COND[:3], x_T=xT, unconditional_guidance_scale=3.0,
                          unconditional_conditioning=UNCOND[:3], backend="torch")
    assert torch.equal(a, b) and a.dtype == torch.float32
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        sampler.sample(2, 3, (2, 1, 1), COND[:3], x_T=xT, eta=1.0, unconditional_conditioning=UNCOND[:3])
    assert any("eta" in str(m.message) for m in w)
    model.parameterization = "x0"
    with pytest.raises(ValueError, match="parameterization"):
        sampler.sample(2, 3, (2, 1, 1), COND[:3], x_T=xT)
