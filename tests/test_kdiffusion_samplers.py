"""`dpm_kernels.k_diffusion` against `k_diffusion.sampling`, sampler by sampler: same arguments, same results.

Each case runs both with the same model, sigmas and noise -- a recording noise sampler that returns noise depending
only on its arguments (so the two sides must also ask for the same noise), and separately the default noise from
the same global seed (randn_like or the Brownian tree k-diffusion seeds from the global RNG) -- and compares the
final sample, every callback's x and denoised, and the noise sampler's arguments (to 1e-6; dpm_adaptive 5e-4).
Tolerances: float64 1e-12 relative (float64 on both sides); float32 2e-6 (k-diffusion's float32 coefficients);
dpm_fast / dpm_adaptive, whose time grid is float32 on both sides but whose coefficients k-diffusion forms in
float32 from it, 2e-6 / 5e-4 (dpm_adaptive: the step size controller amplifies that rounding; measured up to 1e-4)
with the same accept / reject sequence.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import backends_for
from kdiff_import import load_sampling

from dpm_kernels import k_diffusion as dk

K = load_sampling()
BACKENDS = [b for b in backends_for("cpu") if b in ("torch", "cpu")]
SHAPE = (2, 3, 4)
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


def model(x, sigma):
    s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
    return x / (1 + s * s) + 0.1 * torch.tanh(x)


class Noise:
    """Noise that depends only on the queried (sigma, sigma_next); records the queries."""

    def __init__(self, dtype):
        self.dtype, self.calls = dtype, []

    def __call__(self, a, b):
        self.calls.append((float(a), float(b)))
        k = torch.arange(24, dtype=torch.float64).reshape(SHAPE)
        return torch.sin(1.3 * k * float(a) + 0.7 * float(b) + 0.1 * k).to(self.dtype)


def rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max()) / max(1.0, float(b.double().abs().max()))


def run(mod, name, x, *args, backend=None, **kw):
    seen = []
    cb = lambda d: seen.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()})  # noqa
    extra = {} if backend is None else {"backend": backend}
    out = getattr(mod, name)(model, x, *args, callback=cb, disable=True, **kw, **extra)
    return out, seen


def compare(name, args, kw, dtype, tol, fixed_noise=True, sigma_tol=1e-6):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype) * 10
    for backend in BACKENDS:
        sides = []
        for mod, b in ((K, None), (dk, backend)):
            extra = dict(kw)
            noise = Noise(dtype) if fixed_noise and "noise_sampler" in inspect.signature(getattr(K, name)).parameters \
                else None
            if noise is not None:
                extra["noise_sampler"] = noise
            torch.manual_seed(5)
            out, seen = run(mod, name, x, *args, backend=b, **extra)
            sides.append((out, seen, noise))
        (ko, kseen, kn), (oo, oseen, on) = sides
        if isinstance(ko, tuple):  # dpm_adaptive with return_info
            assert ko[1] == oo[1], (ko[1], oo[1])
            ko, oo = ko[0], oo[0]
        assert rel(oo, ko) <= tol, (backend, rel(oo, ko))
        assert len(kseen) == len(oseen) and all(set(a) == set(b) for a, b in zip(kseen, oseen, strict=True))
        for a, b in zip(oseen, kseen, strict=True):
            assert a["i"] == b["i"] and abs(float(a["sigma"]) - float(b["sigma"])) <= sigma_tol * float(b["sigma"])
            assert rel(a["x"], b["x"]) <= tol and rel(a["denoised"], b["denoised"]) <= tol
        if kn is not None:
            assert len(on.calls) == len(kn.calls) and all(
                abs(p - q) <= sigma_tol * max(1.0, abs(q)) for c, d in zip(on.calls, kn.calls, strict=True)
                for p, q in zip(c, d, strict=True))


SIGMAS = {"karras": lambda: K.get_sigmas_karras(8, 0.03, 10.0), "exponential": lambda: K.get_sigmas_exponential(
    7, 0.05, 14.6), "repeat": lambda: torch.tensor([10.0, 4.0, 4.0, 1.0, 0.3, 0.0])}
TWO_STAGE = [("sample_dpmpp_2s_ancestral", {}), ("sample_dpmpp_2s_ancestral", dict(eta=0.5, s_noise=0.8)),
             ("sample_dpmpp_2s_ancestral", dict(eta=3.0)), ("sample_dpmpp_2s_ancestral", dict(eta=0.0)),
             ("sample_dpmpp_sde", {}), ("sample_dpmpp_sde", dict(eta=0.6, s_noise=0.9, r=0.3)),
             ("sample_dpmpp_sde", dict(eta=0.0)), ("sample_dpmpp_sde", dict(r=1.0)),
             ("sample_dpmpp_2m_sde", dict(solver_type="heun")),
             ("sample_dpmpp_2m_sde", dict(solver_type="heun", eta=0.7)),
             ("sample_dpmpp_2m_sde", {}), ("sample_dpmpp_3m_sde", {}), ("sample_dpmpp_2m", {}),
             ("sample_dpm_2", {}), ("sample_dpm_2", dict(s_churn=1.0)),
             ("sample_dpm_2", dict(s_churn=10.0, s_tmin=0.5, s_tmax=5.0, s_noise=0.9)),
             ("sample_dpm_2_ancestral", {}), ("sample_dpm_2_ancestral", dict(eta=0.5, s_noise=0.8)),
             ("sample_dpm_2_ancestral", dict(eta=3.0)), ("sample_dpm_2_ancestral", dict(eta=0.0))]
IDS = [f"{n[7:]}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for n, kw in TWO_STAGE]


@pytest.mark.parametrize("grid", list(SIGMAS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,kw", TWO_STAGE, ids=IDS)
def test_sigma_list_samplers(name, kw, dtype, grid):
    sigmas = SIGMAS[grid]().to(dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype) * 10
    def noise():
        return {"noise_sampler": Noise(dtype)} if "noise_sampler" in inspect.signature(getattr(K, name)).parameters \
            else {}

    if grid == "repeat" and not getattr(K, name)(model, x, sigmas, disable=True, **noise(), **kw).isfinite().all():
        # k-diffusion divides 0 by 0 at the zero-length step; ours is the identity there: the deduplicated grid's
        ours = getattr(dk, name)(model, x, sigmas, disable=True, **noise(), **kw)
        want = getattr(K, name)(model, x, sigmas.unique_consecutive(), disable=True, **noise(), **kw)
        assert rel(ours, want) <= tol
        return
    compare(name, (sigmas,), kw, dtype, tol)
    if grid == "repeat" and name == "sample_dpmpp_sde":
        # k-diffusion's default tree normalises the increment of the repeated sigma's empty interval: 0/0 = NaN;
        # ours adds no noise in a zero-length step
        assert not K.sample_dpmpp_sde(model, x, sigmas, disable=True, **kw).isfinite().all()
        assert dk.sample_dpmpp_sde(model, x, sigmas, disable=True, **kw).isfinite().all()
    elif name not in ("sample_dpmpp_2m", "sample_dpm_2"):  # (sample_dpm_2 draws from the global RNG already)
        compare(name, (sigmas,), kw, dtype, tol, fixed_noise=False)  # the defaults, from the same global seed


@pytest.mark.parametrize("name,kw", [("sample_dpm_2", {}), ("sample_dpm_2", dict(s_churn=2.0)),
                                     ("sample_dpm_2_ancestral", {})])
def test_dpm2_trailing_zero_sigma(name, kw):
    # a grid ending 0, 0: k-diffusion's last interval divides by sigma = 0 (NaN); ours is a zero-length step, the
    # identity, after the same steps as the grid without the repeat (and the same global-RNG draws)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    sigmas = torch.tensor([10.0, 2.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    torch.manual_seed(5)
    assert not getattr(K, name)(model, x, sigmas, disable=True, **kw).isfinite().all()
    torch.manual_seed(5)
    want = getattr(K, name)(model, x, sigmas[:-1], disable=True, **kw)
    torch.manual_seed(5)
    got = getattr(dk, name)(model, x, sigmas, disable=True, **kw)
    assert rel(got, want) <= 1e-12


FAST = [dict(n=n, eta=eta) for n in (1, 2, 3, 6, 8, 10, 12) for eta in (0.0, 1.0)] + [dict(n=9, eta=0.5, s_noise=0.7)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", FAST, ids=[str(k) for k in FAST])
def test_dpm_fast(kw, dtype):
    kw = dict(kw)
    n = kw.pop("n")
    compare("sample_dpm_fast", (0.03, 10.0, n), kw, dtype, 2e-6)
    compare("sample_dpm_fast", (0.03, 10.0, n), kw, dtype, 2e-6, fixed_noise=False)


ADAPTIVE = [dict(order=o, eta=e) for o in (2, 3) for e in (0.0, 1.0)] + [
    dict(order=3, rtol=0.01, atol=0.001), dict(order=2, h_init=0.5, pcoeff=0.1, dcoeff=0.05),
    dict(order=3, accept_safety=0.9, eta=0.5, s_noise=0.8)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", ADAPTIVE, ids=[str(k) for k in ADAPTIVE])
def test_dpm_adaptive(kw, dtype):
    # float64: k-diffusion's own float32 times and coefficients, so the same steps to rounding; float32: the error norm
    # is a small difference of the two solutions, and the kernels' rounding (not k-diffusion's order of operations)
    # moves it, hence the next h and every later time, by up to ~1e-3 relative (a formula error: > 1e-2)
    tol = 1e-9 if dtype == torch.float64 else 5e-4
    compare("sample_dpm_adaptive", (0.03, 10.0), dict(kw, return_info=True), dtype, tol,
            sigma_tol=1e-9 if dtype == torch.float64 else 3e-3)


ADAPTIVE_TREE = [dict(order=o, eta=e, seed=seed, sigma_max=m, rtol=r) for o, e, seed, m, r in (
    (3, 1.0, 0, 80.0, 0.05), (3, 1.0, 3, 80.0, 0.01), (3, 1.0, 4, 80.0, 0.01), (2, 1.0, 1, 14.6, 0.01),
    (2, 0.5, 4, 14.6, 0.01), (2, 1.0, 1, 80.0, 0.05), (2, 1.0, 2, 80.0, 0.01), (2, 1.0, 3, 80.0, 0.01),
    (2, 1.0, 5, 80.0, 0.05))]


@pytest.mark.parametrize("kw", ADAPTIVE_TREE, ids=[str(k) for k in ADAPTIVE_TREE])
def test_dpm_adaptive_brownian_tree(kw):
    """eta > 0 with Brownian-tree noise, whose value at a time step of 1e-5 relative already moves 1e-2: every time
    must be k-diffusion's. float64: the same accept / reject sequence and result to 1e-9 (configurations where the
    float64 coefficients took one rejection more or fewer); float32 (k-diffusion's float32 and float64 runs differ
    by as much, through the tree): no farther from k-diffusion's float64 run than its own float32 run, x2."""
    kw = dict(kw)
    seed, smax = kw.pop("seed"), kw.pop("sigma_max")
    x = torch.randn((2, 3, 4), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * smax
    res = {}
    for mod, dt in ((K, torch.float64), (dk, torch.float64), (K, torch.float32), (dk, torch.float32)):
        tree = K.BrownianTreeNoiseSampler(x.to(dt), 0.1 if smax == 80.0 else 0.02, smax, seed=seed)
        res[mod.__name__, dt] = mod.sample_dpm_adaptive(model, x.to(dt), 0.1 if smax == 80.0 else 0.02, smax,
                                                        noise_sampler=tree, return_info=True, disable=True, **kw)
    (k64, ik), (o64, io) = res[K.__name__, torch.float64], res[dk.__name__, torch.float64]
    assert ik == io and rel(o64, k64) <= 1e-9, (ik, io, rel(o64, k64))
    k32, o32 = res[K.__name__, torch.float32][0], res[dk.__name__, torch.float32][0]
    assert rel(o32, k64) <= 2 * rel(k32, k64) + 1e-5


def test_reverse_and_bad_arguments():
    x = torch.randn(SHAPE)
    for mod in (K, dk):
        with pytest.raises(ValueError, match="must not be 0"):
            mod.sample_dpm_fast(model, x, 0.0, 10.0, 5, disable=True)
        with pytest.raises(ValueError, match="eta must be 0"):
            mod.sample_dpm_adaptive(model, x, 10.0, 0.03, eta=1.0, disable=True)
        with pytest.raises(ValueError, match="order"):
            mod.sample_dpm_adaptive(model, x, 0.03, 10.0, order=1, disable=True)
    # reverse (sigma grows: encoding), eta = 0: k-diffusion's results
    a = K.sample_dpm_adaptive(model, x.double(), 10.0, 0.03, disable=True)
    b = dk.sample_dpm_adaptive(model, x.double(), 10.0, 0.03, disable=True)
    assert rel(b, a) <= 5e-4
    with pytest.raises(ValueError, match="sigmas"):
        dk.sample_dpmpp_sde(model, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="n:"):
        dk.sample_dpm_fast(model, x, 0.03, 10.0, 0)


def test_brownian_tree_is_kdiffusions():
    from dpm_kernels.noise import BrownianTreeNoise

    x = torch.zeros(SHAPE, dtype=torch.float64)
    for seed in (3, [1, 2]):
        ours, theirs = BrownianTreeNoise(x, 0.03, 10.0, seed), K.BrownianTreeNoiseSampler(x, 0.03, 10.0, seed)
        for a, b in ((10.0, 3.0), (3.0, 0.5), (0.5, 3.0), (10.0, 0.03)):
            assert torch.equal(ours(a, b), theirs(a, b))
    with pytest.raises(ValueError, match="seed"):
        BrownianTreeNoise(x, 0.03, 10.0, [1, 2, 3])


def test_ancestral_split_is_get_ancestral_step():
    import numpy as np

    from dpm_kernels import coefficients as C

    s_from = np.array([10.0, 3.0, 3.0, 0.5, 2.0])
    s_to = np.array([3.0, 3.0, 0.0, 0.1, 1.9])
    for eta in (0.0, 0.3, 1.0, 5.0):
        q, up = C.ancestral(C.Point.from_ve_sigma(s_from), C.Point.from_ve_sigma(s_to), eta)
        for i in range(len(s_from)):
            down_k, up_k = K.get_ancestral_step(torch.tensor(s_from[i], dtype=torch.float64),
                                                torch.tensor(s_to[i], dtype=torch.float64), eta)
            assert abs(q.sigma[i] - float(down_k)) <= 1e-12 and abs(up[i] - float(up_k)) <= 1e-12
            assert q.lam[i] == (np.inf if float(down_k) == 0 else -np.log(float(down_k))) or abs(
                q.lam[i] + np.log(float(down_k))) <= 1e-12


def test_adaptive_updates_are_the_singlestep_formulas():
    """sample_dpm_adaptive's k-diffusion-rounded coefficients are the float64 formulas of coefficients.singlestep (the
    noise-prediction DPM-Solver-2 / -3 and their intermediate points) to float32 rounding."""
    import numpy as np

    from dpm_kernels import coefficients as C
    from dpm_kernels.k_diffusion import _adaptive_updates

    for s, t in ((-2.3, -2.1), (-0.5, 0.4), (1.0, 3.2)):
        s32, t32 = torch.tensor(s), torch.tensor(t)
        for order in (2, 3):
            evals, low, low_from = _adaptive_updates(s32, t32, order)
            h = t32 - s32  # k-diffusion's float32 intermediate times s + r h
            lam = [float(v) for v in (s32, s32 + (1 / order) * h, s32 + (2 / 3) * h, t32)]
            pts = [C.Point.from_ve_sigma(np.exp(-v)) for v in lam]
            want = C.singlestep("dpmsolver", "dpmsolver", order, pts[0], pts[1:order], pts[3])
            want_low = (C.multistep("dpmsolver", "dpmsolver", 1, [pts[0]], pts[3]) if order == 2 else
                        C.singlestep("dpmsolver", "dpmsolver", 2, pts[0], [pts[1]], pts[3])[1])
            def close(got, w):  # float32 rounding, amplified by expm1(x) / x - 1 (a = alpha_t / alpha_s = 1 on VE)
                g, r = np.array((got.a, *got.c), dtype=float), np.array((w.a, *w.c), dtype=float)
                return np.abs(g - r).max() <= 1e-5 * max(1.0, np.abs(r).max())

            for (_, got), w in zip(evals, want, strict=True):
                assert close(got, w)
            assert low_from == order - 2 and close(low, want_low)
            assert [float(sig) for sig, _ in evals] == [float(torch.tensor(-v).exp()) for v in lam[:order]]


@pytest.mark.parametrize("name,kw", [("sample_dpm_2", dict(s_churn=1.0)), ("sample_dpm_2_ancestral", dict(eta=0.5))])
def test_dpm2_on_triton(name, kw):
    """The DPM2 samplers on the Triton backend (its interpreter on this CPU): k-diffusion's results."""
    backends = [b for b in backends_for("cpu") if b == "triton"]
    assert backends or torch.cuda.is_available()
    sigmas = K.get_sigmas_karras(5, 0.03, 10.0).double()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    for backend in backends:
        outs = []
        for mod, extra in ((K, {}), (dk, {"backend": backend})):
            torch.manual_seed(5)
            outs.append(getattr(mod, name)(model, x, sigmas, disable=True, **kw, **extra))
        assert rel(outs[1], outs[0]) <= 1e-12
