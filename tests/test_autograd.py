"""Gradients through the fused step on every backend present (`dpm_kernels.step_autograd`).

Judged against an independent plain-torch step written here with torch.quantile and torch.clamp (autograd
differentiates it), and by torch.autograd.gradcheck / gradgradcheck in float64 (finite differences).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ALL_BACKEND_CASES, IDS

from dpm_kernels import layout as L
from dpm_kernels import ops
from dpm_kernels.backends import registry

F64 = torch.float64
INSIDE = (0.6, 0.05, 30.0)  # q between lo and hi: the gradient runs through the quantile
ABOVE = (0.9, 0.01, 0.02)  # q > hi: s = hi, a constant
AUTHORS = (0.995, 1.0, math.inf)
MAXIMUM = (1.0, 0.05, 100.0)  # s = max |y0|: an element on the clamp's bound (its two gradient terms cancel)
NAMES = ("x", "model_out", "model_cond", "x_eval", "hist1", "hist2", "hist3", "noise")
# every backend present; the CUDA ones (only where a GPU is) marked gpu
BACKENDS = [pytest.param(d, b, id=i, marks=[pytest.mark.gpu] if d == "cuda" else [])
            for (d, b), i in zip(ALL_BACKEND_CASES, IDS, strict=True)]


def make(shape=(2, 3, 4), *, cfg="none", nhist=2, noise=False, x_eval=False, per_sample=False, dtype=F64,
         hist_dtype=None, seed=0):
    """A step's tensors (dict by schema name, absent ones None) and a random coefficient row (or rows)."""
    gen = torch.Generator().manual_seed(seed)
    b = shape[0]

    def rnd(*s, scale=1.0, dt=dtype):
        return (torch.randn(*s, generator=gen, dtype=F64) * scale).to(dt)

    rows = L.CFG_ROWS[L.CFG_MODES[cfg]]
    t = dict.fromkeys(NAMES)
    t["x"] = rnd(*shape)
    t["model_out"] = rnd(rows * b, *shape[1:], scale=2.0)
    if cfg == "pair":
        t["model_cond"] = rnd(*shape, scale=2.0)
    if x_eval:
        t["x_eval"] = rnd(*shape)
    for i in range(nhist):
        t[f"hist{i + 1}"] = rnd(*shape, dt=hist_dtype or dtype)
    if noise:
        t["noise"] = rnd(*shape)
    coef = torch.rand((b, L.NCOEF) if per_sample else (L.NCOEF,), generator=gen, dtype=F64) * 3 - 1.5
    coef[..., L.GUIDE] = 1.0 + 6.0 * torch.rand(coef[..., L.GUIDE].shape, generator=gen, dtype=F64)
    for i, slot in ((1, L.C1), (2, L.C2), (3, L.C3)):
        if nhist < i:
            coef[..., slot] = 0.0
    if not noise:
        coef[..., L.CN] = 0.0
    return t, coef


def plain_step(t: dict, coef: torch.Tensor, cfg: str, thr) -> tuple[torch.Tensor, torch.Tensor]:
    """The step in float64 with plain torch ops, independent of the package: (out, m)."""
    x = t["x"].double()
    b = x.shape[0]
    k = coef if coef.dim() == 1 else coef.reshape((b,) + (1,) * (x.dim() - 1) + (L.NCOEF,))

    def c(i):
        return k[..., i]

    mo = t["model_out"].double()
    xe = x if t["x_eval"] is None else t["x_eval"].double()
    if cfg == "none":
        raw = mo
    else:
        u = mo[:b]
        cond = t["model_cond"].double() if cfg == "pair" else mo[b:2 * b]
        raw = u + c(L.GUIDE) * (cond - u)
        if cfg == "stacked3":
            raw = raw + c(L.GUIDE2) * (cond - mo[2 * b:])
    y = c(L.PX) * xe + c(L.PM) * raw
    if thr is not None:
        ratio, lo, hi = thr
        s = torch.quantile(y.abs().reshape(b, -1), ratio, dim=1).clamp(lo, hi).reshape((b,) + (1,) * (x.dim() - 1))
        y = c(L.QX) * xe + c(L.QM) * torch.clamp(y, -s, s) / s
    out = c(L.A) * x + c(L.C0) * y
    for i, slot in ((1, L.C1), (2, L.C2), (3, L.C3)):
        if t[f"hist{i}"] is not None:
            out = out + c(slot) * t[f"hist{i}"].double()
    if t["noise"] is not None:
        out = out + c(L.CN) * t["noise"].double()
    return out, y


def fused(t: dict, coef, cfg, thr, backend, hist_dtype=None):
    """ops.fused_step on t's tensors, returning (out, m): m through a hist_out written by the step."""
    hist = [t[f"hist{i}"] for i in (1, 2, 3) if t[f"hist{i}"] is not None]
    hist_out = torch.empty(t["x"].shape, dtype=hist_dtype or t["x"].dtype)
    out = ops.fused_step(t["x"], t["model_out"], coef, hist_out=hist_out, hist=hist, model_cond=t["model_cond"],
                         x_eval=t["x_eval"], noise=t["noise"], cfg=cfg, threshold=thr, backend=backend)
    return out, hist_out


def as_function(t: dict, coef, cfg, thr, backend):
    """(f, inputs) for gradcheck: f maps the present tensors (all requiring grad) to (out, m)."""
    names = [n for n in NAMES if t[n] is not None]

    def f(*vals):
        return fused(dict(t, **dict(zip(names, vals, strict=True))), coef, cfg, thr, backend)

    return f, tuple(t[n].detach().clone().requires_grad_(True) for n in names)


def loss_grads(fn, t: dict, weights) -> dict:
    """d(sum(w_out * out) + sum(w_m * m)) / d(each present input), from fn(t) -> (out, m)."""
    leaves = {n: v.detach().clone().requires_grad_(True) for n, v in t.items() if v is not None}
    out, m = fn(dict(t, **leaves))
    loss = (out.double() * weights[0]).sum() + (m.double() * weights[1]).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


CASES = {  # name: (make kwargs, cfg, threshold)
    "plain": ({}, "none", None),
    "no-history": ({"nhist": 0}, "none", None),
    "hist3-noise": ({"nhist": 3, "noise": True}, "none", None),
    "pair-x_eval": ({"x_eval": True, "nhist": 1}, "pair", None),
    "stacked-per-sample": ({"per_sample": True}, "stacked", None),
    "stacked3-hist3": ({"nhist": 3}, "stacked3", None),
    "threshold-inside": ({}, "none", INSIDE),
    "threshold-above": ({"noise": True}, "stacked", ABOVE),
    "threshold-authors-x_eval": ({"x_eval": True, "per_sample": True}, "stacked3", AUTHORS),
    "threshold-per-sample-pair": ({"per_sample": True, "nhist": 3}, "pair", INSIDE),
    "threshold-maximum": ({}, "none", MAXIMUM),
}


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_gradients_equal_the_plain_torch_step(device, backend, name):
    kw, cfg, thr = CASES[name]
    t, coef = make(**kw, cfg=cfg, seed=len(name))
    t = {n: None if v is None else v.to(device) for n, v in t.items()}
    coef = coef.to(device)
    gen = torch.Generator().manual_seed(7)
    weights = (torch.randn(t["x"].shape, generator=gen, dtype=F64).to(device),
               torch.randn(t["x"].shape, generator=gen, dtype=F64).to(device))
    got = loss_grads(lambda tt: fused(tt, coef, cfg, thr, backend), t, weights)
    want = loss_grads(lambda tt: plain_step(tt, coef, cfg, thr), t, weights)
    assert got.keys() == want.keys()
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-12, msg=lambda s, n=n: f"{n}: {s}")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck(device, backend, name, one_thread):
    kw, cfg, thr = CASES[name]
    t, coef = make(**kw, cfg=cfg, seed=len(name))
    t = {n: None if v is None else v.to(device) for n, v in t.items()}
    f, inputs = as_function(t, coef.to(device), cfg, thr, backend)
    assert torch.autograd.gradcheck(f, inputs, fast_mode=backend == "triton")  # interpreted Triton: random projections


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("name", ["hist3-noise", "pair-x_eval", "threshold-inside", "threshold-authors-x_eval"])
def test_gradgradcheck(device, backend, name, one_thread):
    kw, cfg, thr = CASES[name]
    t, coef = make(**dict(kw, shape=(2, 5)), cfg=cfg, seed=3)
    t = {n: None if v is None else v.to(device) for n, v in t.items()}
    f, inputs = as_function(t, coef.to(device), cfg, thr, backend)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_gradients(device, backend, dtype):
    """Gradients come back in each input's dtype (float32 history beside half x) and near the float64 ones."""
    hdt = torch.float32 if dtype != torch.float32 else None
    t, coef = make((2, 33), cfg="stacked", nhist=2, x_eval=True, dtype=dtype, hist_dtype=hdt, seed=11)
    t = {n: None if v is None else v.to(device) for n, v in t.items()}
    coef = coef.to(device)
    w = (torch.ones(t["x"].shape, dtype=F64, device=device),) * 2
    got = loss_grads(lambda tt: fused(tt, coef, "stacked", INSIDE, backend, hist_dtype=hdt), t, w)
    want = loss_grads(lambda tt: plain_step(tt, coef, "stacked", INSIDE), t, w)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for n in got:
        assert got[n].dtype == t[n].dtype, n
        torch.testing.assert_close(got[n].double(), want[n].double(), rtol=tol, atol=tol * float(want[n].abs().max()))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_out_and_history_slot_are_tracked(device, backend):
    """Writing into given destinations (out = x, a ring slot) keeps the graph: the copies are recorded."""
    t, coef = make((2, 6), nhist=1, seed=5)
    x0 = t["x"].to(device).requires_grad_(True)
    eps = t["model_out"].to(device).requires_grad_(True)
    ring = torch.zeros(2, 2, 6, dtype=F64, device=device)
    x = x0 * 1.0  # a non-leaf: out=x overwrites it
    out = ops.fused_step(x, eps, coef.to(device), out=x, hist_out=ring[0], hist=[ring[1]], backend=backend)
    assert out is x and out.grad_fn is not None and ring.grad_fn is not None
    (out.sum() + 3 * ring.sum()).backward()
    c = coef
    torch.testing.assert_close(x0.grad, torch.full_like(x0, float(c[L.A] + (c[L.C0] + 3) * c[L.PX])))
    torch.testing.assert_close(eps.grad, torch.full_like(eps, float((c[L.C0] + 3) * c[L.PM])))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_refusals(device, backend):
    t, coef = make((2, 4), nhist=0)
    x = t["x"].to(device).requires_grad_(True)
    eps = t["model_out"].to(device)
    coef = coef.to(device)
    with pytest.raises(ValueError, match="^coef: requires grad"):
        ops.fused_step(x, eps, coef.clone().requires_grad_(True), backend=backend)
    with pytest.raises(ValueError, match="^out: a leaf tensor that requires grad"):
        ops.fused_step(x, eps, coef, out=x, backend=backend)
    hist_out = torch.full_like(x, 7.0)
    with pytest.raises(ValueError, match="^hist_out: overlaps x"):
        ops.fused_step(x, eps, coef, hist_out=x.detach(), backend=backend)
    with pytest.raises(ValueError, match="^out: shape"):
        ops.fused_step(x, eps, coef, out=torch.empty(3, 4, dtype=F64, device=device), hist_out=hist_out,
                       backend=backend)
    assert torch.all(hist_out == 7.0)  # nothing written before the refusal
    fn = torch.ops.dpm_kernels.fused_step_functional
    with pytest.raises(TypeError, match="^m_dtype:"):
        fn(x, eps, None, None, None, None, None, None, coef, 0, False, 0.0, 1.0, 1.0, torch.float32, backend)
    with pytest.raises(ValueError, match="^backend:"):
        fn(x, eps, None, None, None, None, None, None, coef, 0, False, 0.0, 1.0, 1.0, F64, "nope")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_no_grad_and_non_requiring_inputs_take_the_mutating_op(device, backend, monkeypatch):
    """The functional op runs only when autograd needs it."""
    calls = []
    real = ops.BoundStep.tracked
    monkeypatch.setattr(ops.BoundStep, "tracked", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    t, coef = make((2, 4), nhist=0)
    x, eps = t["x"].to(device), t["model_out"].to(device)
    ops.fused_step(x, eps, coef.to(device), backend=backend)
    with torch.no_grad():
        ops.fused_step(x.requires_grad_(True), eps, coef.to(device), backend=backend)
    assert not calls
    assert ops.fused_step(x, eps, coef.to(device), backend=backend).grad_fn is not None
    assert calls


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("thr", [None, INSIDE], ids=["plain", "threshold"])
def test_opcheck_functional_op(device, backend, thr):
    t, coef = make((2, 3, 4), cfg="stacked3", nhist=3, noise=True, x_eval=True, per_sample=True, seed=2)
    args = tuple(None if t[n] is None else t[n].to(device).requires_grad_(n != "noise") for n in NAMES)
    args += (coef.to(device), L.CFG_STACKED3, thr is not None, *(thr or (0.0, 1.0, 1.0)), F64, backend)
    torch.library.opcheck(torch.ops.dpm_kernels.fused_step_functional.default, args)


@pytest.mark.slow
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_torch_compile_backward_equals_eager(device, backend):
    """A fullgraph-compiled loss over two chained steps: same values and gradients as eager."""
    registry.prepare(backend, device)
    t, coef = make((2, 16), cfg="stacked", nhist=1, seed=9)
    x0, eps, h = (t[n].to(device) for n in ("x", "model_out", "hist1"))
    coef = coef.to(device)

    def loss(x, eps, h):
        x1 = ops.fused_step(x, eps, coef, hist=[h], cfg="stacked", threshold=INSIDE, backend=backend)
        x2 = ops.fused_step(x1, eps * x1.repeat(2, 1), coef, hist=[h], cfg="stacked", backend=backend)
        return (x2 * x2).sum()

    def grads(fn):
        leaves = [v.clone().requires_grad_(True) for v in (x0, eps, h)]
        val = fn(*leaves)
        return (val, *torch.autograd.grad(val, leaves))

    eager = grads(loss)
    compiled = grads(torch.compile(loss, fullgraph=True))
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
