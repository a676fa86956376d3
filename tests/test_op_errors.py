"""Bad input to the fused step: a clear error naming the argument, and nothing written."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ALL_BACKEND_CASES

from dpm_kernels import layout as L
from dpm_kernels import ops

SENTINEL = 12345.0


def _good(device, dtype=torch.float32, b=2, n=8):
    x = torch.randn(b, n, dtype=dtype, device=device)
    coef = torch.zeros(L.NCOEF, dtype=torch.float64, device=device)
    coef[L.A], coef[L.C0], coef[L.PX], coef[L.PM], coef[L.C1] = 0.5, 0.5, 1.0, -0.3, 0.2
    return {
        "x": x,
        "model_out": torch.randn(b, n, dtype=dtype, device=device),
        "coef": coef,
        "out": torch.full((b, n), SENTINEL, dtype=dtype, device=device),
        "hist_out": torch.full((b, n), SENTINEL, dtype=dtype, device=device),
        "hist": [torch.randn(b, n, dtype=dtype, device=device)],
    }


def _call(kw, backend):
    kw = dict(kw)
    x, mo, coef = kw.pop("x"), kw.pop("model_out"), kw.pop("coef")
    return ops.fused_step(x, mo, coef, backend=backend, **kw)


BAD = {
    "model_out-shape": (lambda k, d: k.update(model_out=torch.randn(2, 9, device=d)), ValueError, "model_out"),
    "model_out-dtype": (lambda k, d: k.update(model_out=k["model_out"].double()), TypeError, "model_out"),
    "hist-shape": (lambda k, d: k.update(hist=[torch.randn(3, 8, device=d)]), ValueError, "hist1"),
    "hist-too-many": (lambda k, d: k.update(hist=[k["x"]] * 3), ValueError, "hist"),
    "noise-shape": (lambda k, d: k.update(noise=torch.randn(2, 7, device=d)), ValueError, "noise"),
    "out-shape": (lambda k, d: k.update(out=torch.empty(2, 9, device=d)), ValueError, "out"),
    "coef-dtype": (lambda k, d: k.update(coef=k["coef"].float()), TypeError, "coef"),
    "coef-shape": (lambda k, d: k.update(coef=torch.zeros(3, L.NCOEF, dtype=torch.float64, device=d)), ValueError,
                   "coef"),
    "coef-nan": (lambda k, d: k["coef"].__setitem__(L.C1, math.nan), ValueError, "coef"),
    "coef-inf": (lambda k, d: k["coef"].__setitem__(L.A, math.inf), ValueError, "coef"),
    "x-int": (lambda k, d: k.update(x=torch.ones(2, 8, dtype=torch.int32, device=d)), TypeError, "x"),
    "x-0d": (lambda k, d: k.update(x=torch.tensor(1.0, device=d)), ValueError, "x"),
    "cfg-unknown": (lambda k, d: k.update(cfg="twice"), ValueError, "cfg"),
    "cfg-pair-missing": (lambda k, d: k.update(cfg="pair"), ValueError, "model_cond"),
    "cfg-stacked-shape": (lambda k, d: k.update(cfg="stacked"), ValueError, "model_out"),
    "thr-ratio": (lambda k, d: k.update(threshold=(1.5, 1.0, 2.0)), ValueError, "thr_ratio"),
    "thr-bounds": (lambda k, d: k.update(threshold=(0.9, -1.0, 2.0)), ValueError, "thr_min"),
    "hist_out-aliases-hist": (lambda k, d: k.update(hist_out=k["hist"][0]), ValueError, "hist_out"),
    "hist_out-aliases-out": (lambda k, d: k.update(hist_out=k["out"]), ValueError, "hist_out"),
    "out-overlaps-model_out": (lambda k, d: k.update(out=k["model_out"]), ValueError, "out"),
    "x-not-tensor": (lambda k, d: k.update(x=[1.0, 2.0]), TypeError, "x"),
    "backend-unknown": (lambda k, d: k.update(backend="fortran"), ValueError, "backend"),
}


@pytest.mark.parametrize("device,backend", ALL_BACKEND_CASES, ids=[f"{d}-{b}" for d, b in ALL_BACKEND_CASES])
@pytest.mark.parametrize("which", list(BAD))
def test_bad_input_raises_and_writes_nothing(device, backend, which):
    if which.startswith("coef-") and which in ("coef-nan", "coef-inf") and device != "cpu":
        pytest.skip("coefficient values are checked on the host (device coefficients would need a sync); "
                    "the planner and multistep_update validate them before upload")
    kw = _good(device)
    watched = [kw["out"], kw["hist_out"], kw["model_out"], kw["hist"][0]]
    before = [t.clone() for t in watched]
    mutate, exc, name = BAD[which]
    mutate(kw, device)
    if "backend" in kw:
        backend = kw.pop("backend")
    with pytest.raises(exc, match=name):
        _call(kw, backend)
    for t, b in zip(watched, before, strict=True):
        assert torch.equal(t, b), "a tensor was written despite the error"


def test_explicit_backend_that_cannot_serve_says_why():
    x = torch.randn(2, 4)
    coef = torch.zeros(L.NCOEF, dtype=torch.float64)
    with pytest.raises(ValueError, match="cuda"):
        ops.fused_step(x, x.clone(), coef, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_inputs_on_two_devices_are_refused():
    x = torch.randn(2, 4, device="cuda")
    coef = torch.zeros(L.NCOEF, dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match="model_out"):
        ops.fused_step(x, torch.randn(2, 4), coef)
