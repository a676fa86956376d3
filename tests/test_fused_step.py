"""The fused step op on every backend present, against the float64 reference.

Each case builds inputs in the tested dtype, runs the backend into poisoned outputs, and compares with
`reference.fused_step` evaluated in float64 on the same (rounded) inputs:
- float64 / float32: error within a few units of rounding of the terms' magnitude;
- float16 / bfloat16: error at most 2x that of eager PyTorch doing the same arithmetic op by op in that
  dtype, and within one unit in the last place of the reference run at that dtype (f32 math, one rounding).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import ALL_BACKEND_CASES, IDS, poison

from dpm_kernels import layout as L
from dpm_kernels import ops
from dpm_kernels.backends import reference

AUTHORS_THR = (0.995, 1.0, math.inf)
DIFFUSERS_THR = (0.995, 1.0, 1.5)
LOW_THR = (0.6, 0.05, 3.0)  # q well inside (lo, hi): exercises the quantile itself

SHAPES = [(1, 1), (1, 1023), (3, 5, 7, 11), (17, 3, 4)]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _coef_row(gen: torch.Generator, nhist: int, noise: bool, thr: bool) -> torch.Tensor:
    """Random weights; the slots of absent inputs zeroed, except GUIDE2, which layouts other than stacked3 must
    ignore whatever its value."""
    r = (torch.rand(L.NCOEF, generator=gen, dtype=torch.float64) * 2 - 1) * 1.5
    r[L.GUIDE] = 1.0 + 6.0 * torch.rand((), generator=gen, dtype=torch.float64)
    r[L.GUIDE2] = 3.0 * torch.rand((), generator=gen, dtype=torch.float64)
    if nhist < 3:
        r[L.C3] = 0.0
    if nhist < 2:
        r[L.C2] = 0.0
    if nhist < 1:
        r[L.C1] = 0.0
    if not noise:
        r[L.CN] = 0.0
    if not thr:
        r[L.QX], r[L.QM] = 0.0, 1.0
    return r


def make_case(shape, dtype, device, *, nhist=2, cfg="none", thr=None, noise=False, x_eval=False,
              per_sample=False, seed=0, hist_f32=False):
    """Inputs of one step. hist_f32: history in float32 while x is float16/bfloat16 (mixed precision)."""
    gen = torch.Generator().manual_seed(seed)
    b = shape[0]
    hdt = torch.float32 if hist_f32 and dtype in (torch.float16, torch.bfloat16) else dtype

    def rnd(*s, scale=1.0, dt=dtype):
        return (torch.randn(*s, generator=gen, dtype=torch.float64) * scale).to(dt).to(device)

    case = {
        "x": rnd(*shape),
        "model_out": rnd(*((L.CFG_ROWS[L.CFG_MODES[cfg]] * b,) + tuple(shape[1:])), scale=2.0),
        "model_cond": rnd(*shape, scale=2.0) if cfg == "pair" else None,
        "x_eval": rnd(*shape) if x_eval else None,
        "hist": [rnd(*shape, dt=hdt) for _ in range(nhist)],
        "noise": rnd(*shape) if noise else None,
        "hist_dtype": hdt,
    }
    if per_sample:
        coef = torch.stack([_coef_row(gen, nhist, noise, thr is not None) for _ in range(b)])
    else:
        coef = _coef_row(gen, nhist, noise, thr is not None)
    case["coef"] = coef.to(device)
    case["cfg"] = cfg
    case["threshold"] = thr
    return case


def run_backend(case, backend, out=None, hist_out=None, write_hist=True):
    x = case["x"]
    if out is None:
        out = torch.empty_like(x)
        poison(out)
    if hist_out is None and write_hist:
        hist_out = torch.empty_like(x, dtype=case.get("hist_dtype", x.dtype))
        poison(hist_out)
    ops.fused_step(x, case["model_out"], case["coef"], out=out, hist_out=hist_out, hist=case["hist"],
                   model_cond=case["model_cond"], x_eval=case["x_eval"], noise=case["noise"], cfg=case["cfg"],
                   threshold=case["threshold"], backend=backend)
    return out, hist_out


def run_reference(case, dtype=torch.float64):
    """The reference on the case's values: float64 by default, or with x-like tensors in `dtype` (the history
    keeps its own dtype then, as the kernels see it); m is returned in the history dtype."""
    hdt = torch.float64 if dtype == torch.float64 else case.get("hist_dtype", dtype)

    def cv(t, dt=dtype):
        return None if t is None else t.to(dt)

    thr = case["threshold"]
    h = [cv(t, hdt) for t in case["hist"]] + [None, None, None]
    return reference.fused_step(
        cv(case["x"]), cv(case["model_out"]), case["coef"], cv(case["model_cond"]), cv(case["x_eval"]),
        h[0], h[1], h[2], cv(case["noise"]), L.CFG_MODES[case["cfg"]], thr is not None,
        *(thr if thr is not None else (0.0, 1.0, 1.0)), hdt,
    )


def naive_lowp(case):
    """Eager PyTorch in the tensors' own dtype, op by op (what an unfused sampler in fp16/bf16 does)."""
    c = case["coef"].cpu()
    if case["x"].shape[0] == 0:
        return torch.empty_like(case["x"]), torch.empty_like(case["x"])
    rows = c if c.dim() == 2 else c.unsqueeze(0).expand(case["x"].shape[0], -1)
    outs, ms = [], []
    for i in range(case["x"].shape[0]):
        k = [float(v) for v in rows[i]]
        xi = case["x"][i]
        xe = xi if case["x_eval"] is None else case["x_eval"][i]
        b = case["x"].shape[0]
        if case["cfg"] == "stacked3":
            u, cd, pt = case["model_out"][i], case["model_out"][b + i], case["model_out"][2 * b + i]
            raw = u + k[L.GUIDE] * (cd - u) + k[L.GUIDE2] * (cd - pt)
        elif case["cfg"] == "stacked":
            u, cd = case["model_out"][i], case["model_out"][b + i]
            raw = u + k[L.GUIDE] * (cd - u)
        elif case["cfg"] == "pair":
            u, cd = case["model_out"][i], case["model_cond"][i]
            raw = u + k[L.GUIDE] * (cd - u)
        else:
            raw = case["model_out"][i]
        y = k[L.PX] * xe + k[L.PM] * raw
        if case["threshold"] is not None:
            ratio, lo, hi = case["threshold"]
            q = torch.quantile(y.abs().reshape(-1).float(), ratio).to(y.dtype)
            s = torch.clamp(q, lo, hi)
            y = torch.clamp(y, -s, s) / s
            y = k[L.QX] * xe + k[L.QM] * y
        o = k[L.A] * xi + k[L.C0] * y
        for slot, hh in zip(L.C_SLOTS[1:], case["hist"], strict=False):
            o = o + k[slot] * hh[i]
        if case["noise"] is not None:
            o = o + k[L.CN] * case["noise"][i]
        outs.append(o)
        ms.append(y)
    return torch.stack(outs), torch.stack(ms)


def term_scale(case) -> tuple[float, float]:
    """max over elements of sum |coef * value| for out and for m, in float64 (the rounding error scale)."""
    d = {k: (None if v is None or not isinstance(v, torch.Tensor) else v.double()) for k, v in case.items()}
    c = case["coef"].double()
    cc = c if c.dim() == 2 else c.unsqueeze(0)
    shape = (-1,) + (1,) * (case["x"].dim() - 1)

    def col(i):
        return cc[:, i].abs().reshape(shape)

    b = case["x"].shape[0]
    if case["cfg"] == "stacked3":
        u, cd, pt = d["model_out"][:b].abs(), d["model_out"][b:2 * b].abs(), d["model_out"][2 * b:].abs()
        raw = u + col(L.GUIDE) * (cd + u) + col(L.GUIDE2) * (cd + pt)
    elif case["cfg"] == "stacked":
        raw = d["model_out"][:b].abs() + col(L.GUIDE) * (d["model_out"][b:].abs() + d["model_out"][:b].abs())
    elif case["cfg"] == "pair":
        raw = d["model_out"].abs() + col(L.GUIDE) * (d["model_cond"].abs() + d["model_out"].abs())
    else:
        raw = d["model_out"].abs()
    xe = (d["x_eval"] if d["x_eval"] is not None else d["x"]).abs()
    sm = col(L.PX) * xe + col(L.PM) * raw
    if case["threshold"] is not None:
        sm = col(L.QX) * xe + col(L.QM) * (1.0 + sm)
    so = col(L.A) * d["x"].abs() + col(L.C0) * sm
    for slot, hh in zip(L.C_SLOTS[1:], case["hist"], strict=False):
        so = so + col(slot) * hh.double().abs()
    if case["noise"] is not None:
        so = so + col(L.CN) * d["noise"].abs()
    return float(so.max()) if so.numel() else 0.0, float(sm.max()) if sm.numel() else 0.0


def assert_close_to_reference(case, out, m):
    ref_out, ref_m = run_reference(case)
    if out.numel() == 0:
        return
    so, sm = term_scale(case)
    same_out, same_m = run_reference(case, case["x"].dtype)
    nv_out, nv_m = naive_lowp(case)
    _check(out, ref_out, same_out, nv_out, so, "out")
    if m is not None:
        _check(m, ref_m, same_m, nv_m, sm, "m")


def _check(got, ref64, same, naive, scale, what):
    """float64/float32 results: within a few roundings of the terms' magnitude of the float64 reference.
    float16/bfloat16 results: within 1 ulp of the reference computed at that dtype (f32 math, one rounding)
    and no more than 2x the error of eager PyTorch doing the arithmetic in that dtype."""
    dtype = got.dtype
    if dtype in (torch.float64, torch.float32):
        eps = torch.finfo(dtype).eps
        err = float((got.double() - ref64).abs().max())
        assert err <= 16 * eps * max(scale, 1e-30) + 1e-300, f"{what} error {err:.3e} vs scale {scale:.3e}"
        return
    got, same = got.cpu(), same.cpu()
    ulp = torch.finfo(dtype).eps * torch.maximum(same.double().abs(),
                                                 torch.full_like(same.double(), torch.finfo(dtype).tiny))
    diff = (got.double() - same.double()).abs()
    assert bool((diff <= ulp * 1.0001 + 1e-30).all()), f"{what}: more than 1 ulp from the same-dtype reference"
    e_got = float((got.double() - ref64.cpu()).abs().max())
    e_nv = float((naive.double().cpu() - ref64.cpu()).abs().max())
    assert e_got <= 2 * e_nv + 4 * torch.finfo(dtype).eps * float(ref64.abs().max() + 1), (what, e_got, e_nv)


def _matrix():
    """A covering subset of shapes x dtypes x flags (the full product is tested for the reference elsewhere)."""
    flags = list(itertools.product([0, 1, 2, 3], list(L.CFG_MODES), [None, AUTHORS_THR, DIFFUSERS_THR, LOW_THR],
                                   [False, True], [False, True], [False, True]))
    cases = []
    for i, (nhist, cfg, thr, noise, x_eval, per_sample) in enumerate(flags):
        shape = SHAPES[i % len(SHAPES)]
        dtype = DTYPES[(i // len(SHAPES)) % len(DTYPES)]
        cases.append((shape, dtype, nhist, cfg, thr, noise, x_eval, per_sample, i))
    return cases


MATRIX = _matrix()
THR_NAMES = {None: "nothr", AUTHORS_THR: "authors", DIFFUSERS_THR: "diffusers", LOW_THR: "lowthr"}


def _case_id(c) -> str:
    shape, dtype, nhist, cfg, thr, noise, x_eval, per_sample, seed = c
    flags = "".join(f for f, on in (("-noise", noise), ("-xeval", x_eval), ("-rows", per_sample)) if on)
    return (f"{seed}-{'x'.join(map(str, shape))}-{str(dtype).removeprefix('torch.')}-h{nhist}-{cfg}-"
            f"{THR_NAMES[thr]}{flags}")


# One test per (backend, case): a failure names its case and hides none of the others. The Triton interpreter is
# slow: it takes every third case (which still covers every flag value).
MATRIX_PARAMS = [pytest.param(d, b, c, id=f"{d}-{b}-{_case_id(c)}") for d, b in ALL_BACKEND_CASES
                 for c in MATRIX if not (b == "triton" and d == "cpu" and c[-1] % 3)]


@pytest.mark.parametrize("device,backend,case_spec", MATRIX_PARAMS)
def test_matrix_against_float64_reference(device, backend, case_spec):
    shape, dtype, nhist, cfg, thr, noise, x_eval, per_sample, seed = case_spec
    case = make_case(shape, dtype, device, nhist=nhist, cfg=cfg, thr=thr, noise=noise, x_eval=x_eval,
                     per_sample=per_sample, seed=seed)
    out, m = run_backend(case, backend)
    assert_close_to_reference(case, out, m)


@pytest.mark.parametrize("device,backend", ALL_BACKEND_CASES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nhist,cfg", [(2, "stacked"), (3, "stacked3")], ids=["h2-stacked", "h3-stacked3"])
def test_every_dtype_with_thresholding_and_guidance(device, backend, dtype, nhist, cfg):
    for shape in SHAPES:
        case = make_case(shape, dtype, device, nhist=nhist, cfg=cfg, thr=LOW_THR, noise=True, seed=7)
        out, m = run_backend(case, backend)
        assert_close_to_reference(case, out, m)


@pytest.mark.parametrize("device,backend", ALL_BACKEND_CASES, ids=IDS)
@pytest.mark.parametrize("thr", [None, LOW_THR], ids=["plain", "thresholded"])
@pytest.mark.parametrize("nhist,cfg", [(2, "none"), (3, "stacked3")], ids=["h2", "h3-stacked3"])
def test_out_aliases_x(device, backend, thr, nhist, cfg):
    case = make_case((3, 5, 7, 11), torch.float32, device, nhist=nhist, cfg=cfg, thr=thr, noise=True, seed=3)
    ref_out, ref_m = run_reference(case)
    x = case["x"].clone()
    case["x"] = x
    hist_out = torch.full_like(x, float("nan"))
    out, m = run_backend(case, backend, out=x, hist_out=hist_out)
    assert out.data_ptr() == x.data_ptr()
    case["x"] = case["x"]  # now holds the result; compare against the reference computed before
    assert float((out.double() - ref_out).abs().max()) < 1e-4
    assert float((m.double() - ref_m).abs().max()) < 1e-4


@pytest.mark.parametrize("device,backend", ALL_BACKEND_CASES, ids=IDS)
def test_non_contiguous_inputs_and_outputs(device, backend):
    case = make_case((4, 6, 10), torch.float32, device, nhist=2, thr=LOW_THR, noise=True, x_eval=True, seed=5)
    ref_out, ref_m = run_reference(case)
    # transpose every input: same values, non-contiguous layout
    for k in ("x", "model_out", "x_eval", "noise"):
        case[k] = case[k].transpose(1, 2).contiguous().transpose(1, 2)
    case["hist"] = [h.transpose(1, 2).contiguous().transpose(1, 2) for h in case["hist"]]
    assert not case["x"].is_contiguous()
    big = torch.full((4, 6, 20), float("nan"), device=device)
    out = big[:, :, ::2]  # strided output view
    hist_big = torch.full((2, 4, 6, 10), float("nan"), device=device)
    hist_out = hist_big[1]
    run_backend(case, backend, out=out, hist_out=hist_out)
    assert float((out.double() - ref_out).abs().max()) < 1e-4
    assert float((hist_out.double() - ref_m).abs().max()) < 1e-4
    assert bool(torch.isnan(big[:, :, 1::2]).all()), "wrote outside the strided out view"
    assert bool(torch.isnan(hist_big[0]).all()), "wrote outside the history slot"


@pytest.mark.parametrize("device,backend", ALL_BACKEND_CASES, ids=IDS)
def test_without_history_write(device, backend):
    case = make_case((2, 33), torch.float32, device, nhist=1, seed=11)
    out, _ = run_backend(case, backend, write_hist=False)
    ref_out, _ = run_reference(case)
    assert float((out.double() - ref_out).abs().max()) < 1e-5


@pytest.mark.parametrize("device,backend", ALL_BACKEND_CASES, ids=IDS)
def test_zero_size_batch_is_a_no_op(device, backend):
    case = make_case((0, 5), torch.float32, device, nhist=1, thr=AUTHORS_THR, seed=1)
    out, m = run_backend(case, backend)
    assert out.shape == (0, 5) and m.shape == (0, 5)


@pytest.mark.parametrize("device,backend", ALL_BACKEND_CASES, ids=IDS)
def test_quantile_equals_torch_quantile(device, backend):
    """With px = 1, pm = 0, a = 0, c0 = 1 and a huge lo, the step returns clamp(x, -s, s)/s with s from the
    kernel's own quantile; recover s and compare with torch.quantile."""
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 10, 1000, 4097):
        for ratio in (0.0, 0.3, 0.5, 0.995, 1.0):
            x = (torch.randn(3, n, generator=gen) * 3).to(device)
            x[1] = x[1].round()  # ties
            coef = torch.zeros(L.NCOEF, dtype=torch.float64, device=device)
            coef[L.PX], coef[L.QM], coef[L.C0] = 1.0, 1.0, 1.0
            out = ops.fused_step(x, torch.zeros_like(x), coef, threshold=(ratio, 1e-30, math.inf), backend=backend)
            q = torch.quantile(x.abs().double(), ratio, dim=1).clamp(min=1e-30)[:, None]
            expect = torch.minimum(torch.maximum(x.double(), -q), q) / q
            assert torch.allclose(out.double(), expect, rtol=1e-5, atol=1e-6), f"n={n} ratio={ratio}"


@pytest.mark.parametrize("device,backend", ALL_BACKEND_CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_history_with_half_inputs(device, backend, dtype):
    """Mixed precision: x, model output, noise in float16/bfloat16; history read and written in float32."""
    for i, (shape, thr, cfg) in enumerate([((1, 1023), None, "none"), ((3, 5, 7, 11), LOW_THR, "stacked"),
                                           ((17, 3, 4), AUTHORS_THR, "pair")]):
        case = make_case(shape, dtype, device, nhist=2, cfg=cfg, thr=thr, noise=True, seed=40 + i, hist_f32=True)
        out, m = run_backend(case, backend)
        assert out.dtype == dtype and m.dtype == torch.float32
        assert_close_to_reference(case, out, m)


@pytest.mark.parametrize("device,backend", ALL_BACKEND_CASES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stacked3_without_perturbed_guidance_is_the_two_way_step(device, backend, dtype):
    """GUIDE2 = 0: cfg="stacked3" on [uncond, cond, anything] gives the bits of cfg="stacked" on [uncond, cond]
    (g2 * (cond - perturbed) adds an exact zero)."""
    for i, (shape, thr) in enumerate([((2, 1023), LOW_THR), ((3, 5, 7, 11), None)]):
        case = make_case(shape, dtype, device, nhist=3, cfg="stacked3", thr=thr, noise=True, per_sample=True,
                         seed=60 + i)
        case["coef"][:, L.GUIDE2] = 0.0
        out3, m3 = run_backend(case, backend)
        two = dict(case, cfg="stacked", model_out=case["model_out"][: 2 * shape[0]])
        out2, m2 = run_backend(two, backend)
        assert torch.equal(out3, out2) and torch.equal(m3, m2)


@pytest.mark.parametrize("device,backend", ALL_BACKEND_CASES, ids=IDS)
def test_stacked3_guidance_equals_diffusers_pag(device, backend):
    """The raw output the kernels guide with equals diffusers' perturbed-attention guidance on the same chunks
    (PAGMixin._apply_perturbed_attention_guidance, float64): the row passes raw through (px = 0, pm = 1, c0 = 1)."""
    pag_utils = pytest.importorskip("diffusers.pipelines.pag.pag_utils")

    class Pag(pag_utils.PAGMixin):
        def __init__(self, scale):
            self._pag_scale, self._pag_adaptive_scale, self.pag_applied_layers = scale, 0.0, []

    gen = torch.Generator().manual_seed(70)
    mo = torch.randn(6, 4, 9, generator=gen, dtype=torch.float64)
    for g, g2 in ((4.5, 2.0), (1.0, 0.0), (7.0, 3.5)):
        want = Pag(g2)._apply_perturbed_attention_guidance(mo, True, g, 999)
        coef = torch.zeros(L.NCOEF, dtype=torch.float64)
        coef[L.GUIDE], coef[L.GUIDE2], coef[L.PM], coef[L.QM], coef[L.C0] = g, g2, 1.0, 1.0, 1.0
        out = ops.fused_step(torch.zeros_like(want).to(device), mo.to(device), coef.to(device), cfg="stacked3",
                             backend=backend)
        torch.testing.assert_close(out.cpu(), want, rtol=1e-15, atol=1e-14)
