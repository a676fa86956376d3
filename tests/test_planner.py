"""The planner: the one row writer (vectorized over steps and samples), zero-length steps as the identity, and
plans with repeated times that equal the plans without the repeats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dpm_kernels as dk
from dpm_kernels import coefficients as C
from dpm_kernels import layout as L
from dpm_kernels import planner as P

NS = dk.NoiseScheduleVP("linear")
GM = dk.GaussianMixtureModel([[1.0, -0.5], [-1.0, 0.5]], [0.4, 0.6], noise_schedule=NS)
FN = dk.model_wrapper(GM, NS)


def x_T(b=6):
    return torch.randn(b, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("alg", ["dpmsolver++", "dpmsolver", "sde-dpmsolver++"])
def test_zero_length_step_is_the_identity(order, alg):
    prev = [P.point(NS, t) for t in (0.5, 0.6, 0.7)[:order]]
    if alg.startswith("sde"):
        u = C.sde_multistep(alg, "dpmsolver", order, prev, prev[0], eta=1.0)
    else:
        u = C.multistep(alg, "taylor", order, prev, prev[0])
    assert (u.a, tuple(u.c), u.noise) == (1.0, (0.0,) * order, 0.0)
    ps = P.point(NS, 0.5)
    for o in (2, 3):
        ups = C.singlestep("dpmsolver++", "taylor", o, ps, [ps] * (o - 1), ps)
        assert all((v.a, set(v.c)) == (1.0, {0.0}) for v in ups)


def test_vectorized_rows_equal_rows_one_at_a_time():
    """Per-sample arrays (a zero-length step among them) give, row by row, the scalar computation's rows."""
    ts, tn = np.array([0.8, 0.5, 0.3, 0.5]), np.array([0.6, 0.45, 0.3, 0.2])
    tp = np.array([0.9, 0.6, 0.35, 0.7])
    conv = P.Conversion("v", "x0", thresholding=True, guidance_scale=3.0)
    pts = [P.point(NS, v) for v in (ts, tp, tn)]
    u = C.multistep("dpmsolver++", "taylor", 2, pts[:2], pts[2])
    rows = P.coefficient_rows(pts[0], conv, u)
    assert rows.shape == (4, L.NCOEF)
    for i in range(4):
        one = [P.point(NS, float(v[i])) for v in (ts, tp, tn)]
        want = P.coefficient_rows(one[0], conv, C.multistep("dpmsolver++", "taylor", 2, one[:2], one[2]))
        np.testing.assert_array_equal(rows[i], want)
    np.testing.assert_array_equal(rows[2, [L.A, L.C0, L.C1, L.CN]], [1.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_four_weights_and_the_pag_scale_reach_their_slots(backend):
    """An update of four outputs (m, hist1-3) and a PAG scale: the row holds each in its slot, and the op combines
    them as written out by hand (raw guided three ways, passed through by the x_start -> x0 conversion)."""
    conv = P.Conversion("x_start", "x0", guidance_scale=4.0, pag_scale=1.5)
    u = C.Update(0.7, (0.4, -0.3, 0.2, -0.1), 0.05)
    row = P.coefficient_rows(P.point(NS, 0.5), conv, u)
    np.testing.assert_array_equal(row[list(L.C_SLOTS)], u.c)
    assert (row[L.GUIDE], row[L.GUIDE2], row[L.A], row[L.CN]) == (4.0, 1.5, 0.7, 0.05)
    gen = torch.Generator().manual_seed(3)
    x, z, *hist = (torch.randn(2, 5, generator=gen, dtype=torch.float64) for _ in range(5))
    un, co, pe = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64)
    out = dk.ops.fused_step(x, torch.cat([un, co, pe]), torch.from_numpy(row), hist=hist, noise=z, cfg="stacked3",
                            backend=backend)
    raw = un + 4.0 * (co - un) + 1.5 * (co - pe)
    want = 0.7 * x + 0.4 * raw - 0.3 * hist[0] + 0.2 * hist[1] - 0.1 * hist[2] + 0.05 * z
    torch.testing.assert_close(out, want, rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="^update: at most 4"):
        P.coefficient_rows(P.point(NS, 0.5), conv, C.Update(0.7, (0.1,) * 5))


def test_non_finite_rows_name_the_argument():
    bad = C.Update(float("nan"), (1.0,))
    with pytest.raises(ValueError, match="^sigmas:"):
        P.coefficient_rows(P.point(NS, 0.5), P.IDENTITY_X0, bad, what="sigmas")


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("alg", ["dpmsolver++", "dpmsolver"])
def test_repeated_time_equals_the_grid_without_it(order, alg):
    """A repeated time is a zero-length step: identity, nothing stored, so the run equals the run without it."""
    times = P.time_steps(NS, "logSNR", 1.0, 1e-3, 8)
    rep = np.insert(times, 4, times[4])
    solver = dk.DPMSolver(FN, NS, algorithm_type=alg, backend="torch")
    base = P.plan_multistep(NS, alg, "dpmsolver", times, P.multistep_orders(8, order, False, 10))
    plan = P.plan_multistep(NS, alg, "dpmsolver", rep, P.multistep_orders(9, order, False, 10))
    assert plan.evals[4].write_slot is None and plan.orders[4] == 1
    assert plan.orders[5] == min(order, 5)  # the step after it has its distinct history
    x_rep, x_base = solver.execute(x_T(), plan), solver.execute(x_T(), base)
    assert torch.isfinite(x_rep).all()
    assert torch.equal(x_rep, x_base)


def test_multistep_update_zero_length_step_changes_nothing():
    x = x_T()
    hist = dk.History(x, order=2)
    ts = P.time_steps(NS, "logSNR", 1.0, 1e-3, 5).tolist()

    def run(grid):
        h = dk.History(x, order=2)
        y = x.clone()
        for s, t in zip(grid[:-1], grid[1:], strict=True):
            y = dk.multistep_update(y, GM(y, torch.full((6,), s, dtype=torch.float64)), h, t=s, t_next=t,
                                    noise_schedule=NS, order=2, backend="torch")
        return y

    y = dk.multistep_update(x, torch.ones_like(x), hist, t=0.5, t_next=0.5, noise_schedule=NS, order=2,
                            backend="torch")
    assert torch.equal(y, x) and hist.count == 0
    assert torch.equal(run(ts[:3] + [ts[2]] + ts[3:]), run(ts))


def test_multistep_update_per_sample_times_with_a_repeat_in_one_sample():
    """Per-sample times where one sample's step is zero-length: that sample is unchanged, the others move as a
    loop over samples does."""
    x = x_T(3)
    eps = GM(x, torch.full((3,), 0.6, dtype=torch.float64))
    t = torch.tensor([0.6, 0.6, 0.6], dtype=torch.float64)
    tn = torch.tensor([0.5, 0.6, 0.4], dtype=torch.float64)
    y = dk.multistep_update(x, eps, dk.History(x, order=2), t=t, t_next=tn, noise_schedule=NS, backend="torch")
    assert torch.equal(y[1], x[1])
    for i in (0, 2):
        yi = dk.multistep_update(x[i:i + 1], eps[i:i + 1], dk.History(x[i:i + 1], order=2), t=0.6,
                                 t_next=float(tn[i]), noise_schedule=NS, backend="torch")
        torch.testing.assert_close(y[i:i + 1], yi, rtol=1e-14, atol=1e-14)


def test_multistep_update_rows_cached_per_schedule():
    """Cached rows are keyed by the schedule too: two schedules, the same times, each its own result."""
    x = x_T()
    eps = torch.ones_like(x)
    other = dk.NoiseScheduleVP("cosine")
    a = dk.multistep_update(x, eps, dk.History(x), t=0.5, t_next=0.4, noise_schedule=NS, backend="torch")
    b = dk.multistep_update(x, eps, dk.History(x), t=0.5, t_next=0.4, noise_schedule=other, backend="torch")
    assert not torch.equal(a, b)
    p, q = P.point(other, 0.5), P.point(other, 0.4)
    u = C.multistep("dpmsolver++", "dpmsolver", 1, [p], q)
    want = u.a * x + u.c[0] * (x - p.sigma * eps) / p.alpha
    torch.testing.assert_close(b, want, rtol=1e-13, atol=1e-13)


def test_one_row_writer():
    """No module but the planner fills coefficient rows (the planner's docstring promise)."""
    import pathlib
    import re

    pkg = pathlib.Path(dk.__file__).parent
    writers = []
    for f in pkg.rglob("*.py"):
        text = f.read_text()
        if re.search(r"\[\s*(\.\.\.,\s*)?L\.(A|C0|C1|C2|C3|CN|PX|PM|QX|QM|GUIDE|GUIDE2)\s*\]\s*=", text) or re.search(
                r"\brow\[L\.\w+\]\s*=", text):
            writers.append(f.relative_to(pkg).as_posix())
    assert writers == ["planner.py"], writers


@pytest.mark.parametrize("alg", ["dpmsolver++", "dpmsolver", "sde-dpmsolver++"])
@pytest.mark.parametrize("st", ["midpoint", "heun"])
def test_singlestep_block_with_a_repeated_time_drops_to_the_distinct_points(alg, st):
    """diffusers' singlestep grid with a repeated timestep (num_train_timesteps=25 at 25 steps): a block whose start
    and inner point coincide combines only the newer output, at the order of the distinct points (diffusers: 0/0)."""
    pts = C.Point.from_vp_of_ve_sigma(np.array([2.0, 1.0, 1.0, 0.5, 0.2, 0.1]))
    # evaluations: 0 (order 1), 1 (order 1: 1.0 -> 1.0, the identity), 2 (order 2: block [1, 2], points 1.0, 1.0),
    # 3 (order 1), 4 (order 3 would need 2 earlier outputs of its block: order 2, block [3, 4])
    plan = P.plan_singlestep_steps(alg, st, pts, [1, 1, 2, 1, 2])
    rows = plan.table(P.Conversion.for_algorithm("noise", alg))
    assert np.isfinite(rows).all()
    first = C.sde_multistep(alg, st, 1, [pts[2]], pts[3], eta=1.0) if alg.startswith("sde") else \
        C.multistep(alg, st, 1, [pts[2]], pts[3])
    u = plan.update
    assert np.isclose(u.a[2], first.a, rtol=1e-12) and np.isclose(u.c[0][2], first.c[0], rtol=1e-12)
    assert u.c[1][2] == 0.0 and np.isclose(u.noise[2], first.noise, rtol=1e-12)
    assert (u.a[1], u.c[0][1], u.noise[1]) == (1.0, 0.0, 0.0)  # the zero-length evaluation is the identity


@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
def test_dpm2_defaults_are_the_formulas(eta):
    """plan_two_stage's "dpm2" form on its defaults (ends: the ancestral sigma_down, mids: the log-sigma midpoint,
    noise: sigma_up * s_noise) equals a DPM2 loop written out in float64 from its definition (docs/math.md): Euler to
    the midpoint, then x + (end - sigma) / mid * (u - D(u)), then the noise; a last interval to 0 is one Euler call."""
    sig = np.array([8.0, 3.0, 1.2, 0.4, 0.0])
    plan = P.plan_two_stage(sig, "dpm2", eta=eta, s_noise=0.9)
    rows = plan.table(P.IDENTITY_X0)
    den = lambda x, s: x / (1 + s * s) + 0.1 * np.tanh(x)  # noqa: E731  a denoiser
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(5) * 8
    zs = iter(rng.standard_normal((len(sig), 5)))
    # the plan, one row per model call: m = D(x_eval); out = a x + c0 m + c1 x_eval (reads_eval) + cn z
    x, u = x0.copy(), None
    for ev, r in zip(plan.evals, rows, strict=True):
        at = x if ev.source == "x" else u
        m = den(at, ev.t)
        out = r[L.A] * x + r[L.C0] * m + (r[L.C1] * at if ev.reads_eval else 0.0)
        z = next(zs) if ev.noisy else 0.0
        out = out + r[L.CN] * z
        if ev.dest == "u":
            u = out
        else:
            x = out
    # the definition
    zs = iter(np.random.default_rng(0).standard_normal((len(sig) + 1, 5))[1:])
    y = x0.copy()
    for s, s_next in zip(sig[:-1], sig[1:], strict=True):
        up = min(s_next, eta * np.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
        down = np.sqrt(s_next ** 2 - up ** 2)
        d = (y - den(y, s)) / s
        if down == 0:
            y = y + d * (down - s)
            continue
        mid = np.exp(0.5 * (np.log(s) + np.log(down)))
        u = y + d * (mid - s)
        y = y + (u - den(u, mid)) / mid * (down - s)
        if up > 0:
            y = y + 0.9 * up * next(zs)
    assert np.abs(x - y).max() <= 1e-12 * max(1.0, np.abs(y).max())
    assert [ev.reads_eval for ev in plan.evals] == [ev.source == "u" for ev in plan.evals] and plan.n_slots == 0
