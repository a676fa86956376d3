"""Property-based tests of the fused op against the reference (hypothesis).

Random shapes (0-size and 1-element included), strides (transposed, sliced), dtypes, history lengths,
guidance layouts, thresholding, noise, per-sample coefficients and coefficient ranges: every backend present
must agree with the float64 reference. Malformed inputs must raise a clear error and leave `out` and the
history untouched. The compiled CPU backend runs 1,000+ generated cases; Triton's interpreter fewer.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ALL_BACKEND_CASES, IDS
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_fused_step import assert_close_to_reference, run_reference

from dpm_kernels import layout as L
from dpm_kernels import ops

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def n_examples(device: str, backend: str) -> int:
    if backend == "triton" and device == "cpu":
        return 60  # the interpreter runs ~1 case/s
    return 1000 if backend in ("cpu", "cuda") else 300


@st.composite
def step_cases(draw):
    ndim = draw(st.integers(1, 4))
    shape = [draw(st.integers(0 if i == 0 else 1, 5 if i else 4)) for i in range(ndim)]
    if ndim == 1:
        shape = [draw(st.integers(0, 4))]
    if draw(st.booleans()) and ndim >= 2:
        shape[-1] = draw(st.sampled_from([1, 7, 33, 130]))
    dtype = draw(st.sampled_from(DTYPES))
    nhist = draw(st.integers(0, 3))
    cfg = draw(st.sampled_from(list(L.CFG_MODES)))
    thr = draw(st.sampled_from([None, (0.995, 1.0, math.inf), (0.5, 0.1, 2.0), (1.0, 1e-3, 1e3), (0.0, 0.5, 0.5)]))
    noise = draw(st.booleans())
    x_eval = draw(st.booleans())
    per_sample = draw(st.booleans()) and shape[0] > 0
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(shape=tuple(shape), dtype=dtype, nhist=nhist, cfg=cfg, thr=thr, noise=noise, x_eval=x_eval,
                per_sample=per_sample, layout=layout, scale=scale, seed=seed)


def _relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values, different strides."""
    if t.dim() >= 2 and layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        big = torch.empty((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
        v = big[..., ::2]
        v.copy_(t)
        return v
    return t


def build(p, device):
    gen = torch.Generator().manual_seed(p["seed"])
    shape, dtype = p["shape"], p["dtype"]
    b = shape[0]

    def rnd(s, scale=1.0):
        t = (torch.randn(*s, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
        return _relayout(t, p["layout"])

    mo_shape = (L.CFG_ROWS[L.CFG_MODES[p["cfg"]]] * b,) + tuple(shape[1:])
    rows = (torch.rand((b, L.NCOEF) if p["per_sample"] else (L.NCOEF,), generator=gen, dtype=torch.float64) * 2 - 1)
    rows = rows * p["scale"]
    return {
        "x": rnd(shape), "model_out": rnd(mo_shape, 2.0),
        "model_cond": rnd(shape, 2.0) if p["cfg"] == "pair" else None,
        "x_eval": rnd(shape) if p["x_eval"] else None,
        "hist": [rnd(shape) for _ in range(p["nhist"])],
        "noise": rnd(shape) if p["noise"] else None,
        "coef": rows.to(device), "cfg": p["cfg"], "threshold": p["thr"],
    }


@pytest.mark.parametrize("device,backend", ALL_BACKEND_CASES, ids=IDS)
def test_random_cases_match_reference(device, backend):
    @settings(max_examples=n_examples(device, backend), deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(step_cases())
    def check(p):
        case = build(p, device)
        x = case["x"]
        out = torch.full(x.shape, float("nan"), dtype=x.dtype, device=device)
        hist_out = torch.full(x.shape, float("nan"), dtype=x.dtype, device=device)
        ops.fused_step(x, case["model_out"], case["coef"], out=out, hist_out=hist_out, hist=case["hist"],
                       model_cond=case["model_cond"], x_eval=case["x_eval"], noise=case["noise"], cfg=case["cfg"],
                       threshold=case["threshold"], backend=backend)
        ref_out, ref_m = run_reference(case)
        # finite inputs and coefficients, and s = clamp(q, lo, hi) >= lo > 0: the float64 reference is finite, so a
        # non-finite value anywhere is a bug (no case is skipped)
        assert torch.isfinite(ref_out).all() and torch.isfinite(ref_m).all()
        assert_close_to_reference(case, out, hist_out)

    check()


MALFORMED = ["shape", "dtype", "device-coef", "coef-shape", "alias", "cfg", "hist-dtype"]


@pytest.mark.parametrize("device,backend", ALL_BACKEND_CASES, ids=IDS)
def test_malformed_inputs_raise_and_write_nothing(device, backend):
    @settings(max_examples=n_examples(device, backend) // 4, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(step_cases(), st.sampled_from(MALFORMED))
    def check(p, kind):
        assume(p["shape"][0] > 0 and len(p["shape"]) >= 2)
        case = build(p, device)
        x = case["x"]
        out = torch.full(x.shape, 7.0, dtype=x.dtype, device=device)
        hist_out = torch.full(x.shape, 7.0, dtype=x.dtype, device=device)
        hist = [h.clone() for h in case["hist"]]
        kw = dict(out=out, hist_out=hist_out, hist=hist, model_cond=case["model_cond"], x_eval=case["x_eval"],
                  noise=case["noise"], cfg=case["cfg"], threshold=case["threshold"], backend=backend)
        mo, coef = case["model_out"], case["coef"]
        if kind == "shape":
            mo = mo[..., :-1] if mo.shape[-1] > 1 else torch.cat([mo, mo], -1)
        elif kind == "dtype":
            mo = mo.to(torch.float64 if x.dtype != torch.float64 else torch.float32)
        elif kind == "device-coef":
            coef = coef.float()
        elif kind == "coef-shape":
            coef = torch.zeros(L.NCOEF + 1, dtype=torch.float64, device=device)
        elif kind == "alias":
            kw["hist_out"] = x
        elif kind == "cfg":
            kw["cfg"] = "pair" if case["cfg"] != "pair" else "none"
            if kw["cfg"] == "none":
                kw["model_cond"] = torch.zeros_like(x)
        elif kind == "hist-dtype":
            assume(hist)
            hist[0] = hist[0].to(torch.float64 if x.dtype != torch.float64 else torch.float16)
        before = [t.clone() for t in [out, hist_out] + hist]
        with pytest.raises((ValueError, TypeError)):
            ops.fused_step(x, mo, coef, **kw)
        for t, b in zip([out, hist_out] + hist, before, strict=True):
            assert torch.equal(t, b), "written despite the error"

    check()
