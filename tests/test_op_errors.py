"""Bad input to the fused step: every backend refuses it alike -- same exception type, a message starting with the
same argument's name -- before anything is written.

One table of bad op-level arguments (`OP_CASES`) runs against every backend present, both through each backend's
implementation as any caller gets it (`registry.checked`: the C++ and Triton ops check themselves, the reference is
checked in Python) and through `ops.fused_step`; every tensor an argument may alias is filled with a sentinel and
must be unchanged afterwards. A rule the C++ checks (csrc/fused_step_checks.h) and the Python ones (opdef.py)
disagree on fails here for the backend that drifted.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ALL_BACKEND_CASES, IDS

from dpm_kernels import layout as L
from dpm_kernels import ops
from dpm_kernels.backends import registry

SENTINEL = 12345.0
ARGS = ("x", "model_out", "model_cond", "x_eval", "hist1", "hist2", "hist3", "noise", "coef", "cfg", "threshold",
        "thr_ratio", "thr_min", "thr_max", "out", "hist_out")


def _good(device, dtype=torch.float32, b=2, n=8) -> dict:
    g = torch.Generator().manual_seed(0)
    rnd = lambda: torch.randn(b, n, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    coef = torch.zeros(L.NCOEF, dtype=torch.float64)
    coef[L.A], coef[L.C0], coef[L.PX], coef[L.PM], coef[L.QM], coef[L.C1] = 0.5, 0.5, 1.0, -0.3, 1.0, 0.2
    base = torch.full((b, n + 1), SENTINEL, dtype=dtype, device=device)  # out lives in a bigger buffer
    return dict(x=rnd(), model_out=rnd(), model_cond=None, x_eval=None, hist1=rnd(), hist2=None, hist3=None, noise=None,
                coef=coef.to(device), cfg=L.CFG_NONE, threshold=False, thr_ratio=0.9, thr_min=1.0, thr_max=2.0,
                out=base[:, :n], hist_out=torch.full((b, n), SENTINEL, dtype=dtype, device=device), _base=base)


def _set(**kw):
    return lambda a, d: a.update(kw)


def _with(name, make):
    return lambda a, d: a.update({name: make(a, d)})


# name -> (mutation of the good arguments, exception type, the argument the message names first)
OP_CASES = {
    "x-int": (_with("x", lambda a, d: torch.ones(2, 8, dtype=torch.int32, device=d)), TypeError, "x"),
    "x-0d": (_with("x", lambda a, d: torch.tensor(1.0, device=d)), ValueError, "x"),
    "cfg-unknown": (_set(cfg=7), ValueError, "cfg"),
    "model_out-shape": (_with("model_out", lambda a, d: torch.randn(2, 9, device=d)), ValueError, "model_out"),
    "model_out-dtype": (_with("model_out", lambda a, d: a["model_out"].double()), TypeError, "model_out"),
    "stacked-model_out-shape": (_set(cfg=L.CFG_STACKED), ValueError, "model_out"),
    "stacked3-model_out-B": (_set(cfg=L.CFG_STACKED3), ValueError, "model_out"),
    "stacked3-model_out-2B": (lambda a, d: a.update(cfg=L.CFG_STACKED3, model_out=torch.randn(4, 8, device=d)),
                              ValueError, "model_out"),
    "stacked-model_out-3B": (lambda a, d: a.update(cfg=L.CFG_STACKED, model_out=torch.randn(6, 8, device=d)),
                             ValueError, "model_out"),
    "model_cond-with-stacked3": (lambda a, d: a.update(cfg=L.CFG_STACKED3, model_out=torch.randn(6, 8, device=d),
                                                      model_cond=a["x"].clone()), ValueError, "model_cond"),
    "model_cond-without-pair": (_with("model_cond", lambda a, d: a["x"].clone()), ValueError, "model_cond"),
    "pair-without-model_cond": (_set(cfg=L.CFG_PAIR), ValueError, "model_cond"),
    "x_eval-shape": (_with("x_eval", lambda a, d: torch.randn(3, 8, device=d)), ValueError, "x_eval"),
    "x_eval-dtype": (_with("x_eval", lambda a, d: a["x"].half()), TypeError, "x_eval"),
    "hist1-shape": (_with("hist1", lambda a, d: torch.randn(3, 8, device=d)), ValueError, "hist1"),
    "hist1-dtype": (_with("hist1", lambda a, d: a["hist1"].double()), TypeError, "hist1"),
    "hist2-without-hist1": (lambda a, d: a.update(hist2=a["hist1"], hist1=None), ValueError, "hist2"),
    "hist3-without-hist2": (lambda a, d: a.update(hist3=a["hist1"].clone()), ValueError, "hist3"),
    "hist3-shape": (lambda a, d: a.update(hist2=a["hist1"].clone(), hist3=torch.randn(2, 7, device=d)), ValueError,
                    "hist3"),
    "hist3-dtype": (lambda a, d: a.update(hist2=a["hist1"].clone(), hist3=a["hist1"].double()), TypeError, "hist3"),
    "hist_out-dtype": (_with("hist_out", lambda a, d: torch.zeros(2, 8, dtype=torch.float16, device=d)), TypeError,
                       "hist_out"),
    "noise-shape": (_with("noise", lambda a, d: torch.randn(2, 7, device=d)), ValueError, "noise"),
    "out-shape": (_with("out", lambda a, d: torch.full((2, 9), SENTINEL, device=d)), ValueError, "out"),
    "out-dtype": (_with("out", lambda a, d: torch.full((2, 8), SENTINEL, dtype=torch.float64, device=d)), TypeError,
                  "out"),
    "coef-dtype": (_with("coef", lambda a, d: a["coef"].float()), TypeError, "coef"),
    "coef-shape": (_with("coef", lambda a, d: torch.zeros(3, L.NCOEF, dtype=torch.float64, device=d)), ValueError,
                   "coef"),
    "coef-nan": (lambda a, d: a["coef"].__setitem__(L.C1, math.nan), ValueError, "coef"),
    "coef-inf": (lambda a, d: a["coef"].__setitem__(L.A, math.inf), ValueError, "coef"),
    "thr-ratio": (_set(threshold=True, thr_ratio=1.5), ValueError, "thr_ratio"),
    "thr-bound-negative": (_set(threshold=True, thr_min=-1.0), ValueError, "thr_min"),
    "thr-bound-nan": (_set(threshold=True, thr_max=math.nan), ValueError, "thr_min"),
    "out-expanded": (_with("out", lambda a, d: torch.full((1, 8), SENTINEL, device=d).expand(2, 8)), ValueError,
                     "out"),
    "hist_out-expanded": (_with("hist_out", lambda a, d: torch.full((1, 8), SENTINEL, device=d).expand(2, 8)),
                          ValueError, "hist_out"),
    "hist_out-aliases-hist1": (_with("hist_out", lambda a, d: a["hist1"]), ValueError, "hist_out"),
    "hist_out-aliases-hist3": (lambda a, d: a.update(hist2=a["hist1"].clone(), hist3=a["hist_out"]), ValueError,
                               "hist_out"),
    "hist_out-aliases-out": (_with("hist_out", lambda a, d: a["out"]), ValueError, "hist_out"),
    "hist_out-aliases-x": (_with("hist_out", lambda a, d: a["x"]), ValueError, "hist_out"),
    "out-overlaps-model_out": (_with("out", lambda a, d: a["model_out"]), ValueError, "out"),
    "out-overlaps-hist1": (_with("out", lambda a, d: a["hist1"]), ValueError, "out"),
    "out-overlaps-hist3": (lambda a, d: a.update(hist2=a["hist1"].clone(), hist3=a["_base"][:, 1:]), ValueError,
                           "out"),
    "out-shifted-view-of-x": (lambda a, d: a.update(x=a["_base"][:, :8], out=a["_base"][:, 1:]), ValueError, "out"),
}
COEF_VALUE_CASES = ("coef-nan", "coef-inf")


def _bad_args(device, which):
    """The arguments of case `which`, the tensors it may write (each filled with values: uninitialised memory may hold
    NaN, which never compares equal to itself) and their copies."""
    a = _good(device)
    mutate, exc, name = OP_CASES[which]
    mutate(a, device)
    watched = [t for k, t in a.items() if isinstance(t, torch.Tensor) and k != "coef"]
    return a, watched, [t.clone() for t in watched], exc, name


def _assert_refused(call, a, watched, before, exc, name):
    with pytest.raises(exc) as info:
        call(a)
    assert str(info.value).startswith(f"{name}:"), f"{type(info.value).__name__}: {info.value}"
    for t, b in zip(watched, before, strict=True):
        assert torch.equal(t, b), "a tensor was written despite the error"


def _positional(a):
    return [a[k] for k in ARGS]


def _keywords(a, backend):
    given = [a[k] is not None for k in ("hist1", "hist2", "hist3")]
    if given != sorted(given, reverse=True):
        pytest.skip("fused_step's hist list cannot express a history entry without the newer ones")
    hist = [a[k] for k in ("hist1", "hist2", "hist3") if a[k] is not None]
    cfg = {v: k for k, v in L.CFG_MODES.items()}.get(a["cfg"])
    if cfg is None:
        pytest.skip("fused_step takes cfg by name; the op-level integer is checked through the op")
    thr = (a["thr_ratio"], a["thr_min"], a["thr_max"]) if a["threshold"] else None
    return ops.fused_step(a["x"], a["model_out"], a["coef"], out=a["out"], hist_out=a["hist_out"], hist=hist,
                          model_cond=a["model_cond"], x_eval=a["x_eval"], noise=a["noise"], cfg=cfg, threshold=thr,
                          backend=backend)


def _skip_device_coef_values(device, which):
    if which in COEF_VALUE_CASES and device != "cpu":
        pytest.skip("coefficient values are checked on the host only (device coefficients would need a sync); "
                    "the planner validates them where it computes them")


@pytest.mark.parametrize("device,backend", ALL_BACKEND_CASES, ids=IDS)
@pytest.mark.parametrize("which", list(OP_CASES))
def test_each_backend_refuses_alike_and_writes_nothing(device, backend, which):
    _skip_device_coef_values(device, which)
    a, watched, before, exc, name = _bad_args(device, which)
    impl = registry.checked(registry.by_name(backend))
    _assert_refused(lambda a: impl(*_positional(a)), a, watched, before, exc, name)


@pytest.mark.parametrize("device,backend", ALL_BACKEND_CASES, ids=IDS)
@pytest.mark.parametrize("which", list(OP_CASES))
def test_fused_step_refuses_alike_and_writes_nothing(device, backend, which):
    _skip_device_coef_values(device, which)
    a, watched, before, exc, name = _bad_args(device, which)
    _assert_refused(lambda a: _keywords(a, backend), a, watched, before, exc, name)


def test_good_arguments_pass_on_every_backend():
    """The table's base case is valid: each failure above comes from its one mutation."""
    for device, backend in ALL_BACKEND_CASES:
        a = _good(device)
        registry.checked(registry.by_name(backend))(*_positional(a))
        assert torch.isfinite(a["out"]).all() and not torch.equal(a["hist_out"], torch.full_like(a["x"], SENTINEL))


# ---- the Python entry point's own arguments ----
PY_CASES = {
    "x-not-tensor": (dict(x=[1.0, 2.0]), TypeError, "x"),
    "cfg-unknown": (dict(cfg="twice"), ValueError, "cfg"),
    "threshold-pair": (dict(threshold=(0.995, 1.0)), TypeError, "threshold"),
    "threshold-float": (dict(threshold=0.995), TypeError, "threshold"),
    "threshold-strings": (dict(threshold=("a", "b", "c")), TypeError, "threshold"),
    "hist-too-many": (dict(hist="four"), ValueError, "hist"),
    "backend-unknown": (dict(backend="fortran"), ValueError, "backend"),
}


@pytest.mark.parametrize("which", list(PY_CASES))
def test_fused_step_arguments(which):
    a = _good("cpu")
    kw, exc, name = PY_CASES[which]
    kw = dict(kw)
    if kw.get("hist") == "four":
        kw["hist"] = [a["hist1"]] * 4
    x = kw.pop("x", a["x"])
    before = a["out"].clone()
    with pytest.raises(exc) as info:
        ops.fused_step(x, a["model_out"], a["coef"], out=a["out"], hist_out=a["hist_out"], **kw)
    assert str(info.value).startswith(f"{name}:"), str(info.value)
    assert torch.equal(a["out"], before)


def test_explicit_backend_that_cannot_serve_says_why():
    x = torch.randn(2, 4)
    coef = torch.zeros(L.NCOEF, dtype=torch.float64)
    with pytest.raises(ValueError, match="cuda"):
        ops.fused_step(x, x.clone(), coef, backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inputs_on_two_devices_are_refused():
    x = torch.randn(2, 4, device="cuda")
    coef = torch.zeros(L.NCOEF, dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match="model_out"):
        ops.fused_step(x, torch.randn(2, 4), coef)
