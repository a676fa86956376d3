"""The C++ CPU kernel of dpm_kernels::fused_step: op registration, torch.compile, large samples, threads.

The numerical matrix against the float64 reference lives in test_fused_step.py (ids `cpu-cpu`); this file
covers what is specific to the compiled CPU backend.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from dpm_kernels import layout as L
from dpm_kernels import ops
from dpm_kernels.backends import reference, registry

# Like conftest: a kernel that fails to build fails these tests; only an explicit opt-out skips them.
pytestmark = pytest.mark.skipif(os.environ.get("DPM_KERNELS_NO_EXT") == "1", reason="DPM_KERNELS_NO_EXT=1")


@pytest.fixture(autouse=True, scope="module")
def _cpu_kernel_loaded():
    registry.prepare("cpu", "cpu")  # builds or loads the extension; raises if it cannot


OP = torch.ops.dpm_kernels.fused_step.default
THR = (0.9, 0.05, 3.0)  # q inside (lo, hi) for unit-variance data: the quantile itself matters


def _coef(b: int | None, seed: int, *, noise: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (L.NCOEF,) if b is None else (b, L.NCOEF)
    c = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
    c[..., L.GUIDE] = 3.0
    if not noise:
        c[..., L.CN] = 0.0
    return c


def _args(
    shape,
    *,
    cfg="none",
    thr=None,
    noise=False,
    per_sample=False,
    x_eval=False,
    dtype=torch.float32,
    hist_dtype=None,
    hist3=False,
    seed=0,
):
    """Positional op arguments (schema order), outputs freshly allocated; history in hist_dtype (default x's): hist1
    and hist2, and hist3 when asked."""
    gen = torch.Generator().manual_seed(seed)
    hdt = hist_dtype or dtype

    def rnd(*s, dt=dtype):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(dt)

    b = shape[0]
    x = rnd(*shape)
    model_out = rnd(*((L.CFG_ROWS[L.CFG_MODES[cfg]] * b,) + tuple(shape[1:])))
    model_cond = rnd(*shape) if cfg == "pair" else None
    hist1, hist2 = rnd(*shape, dt=hdt), rnd(*shape, dt=hdt)
    coef = _coef(b if per_sample else None, seed, noise=noise)
    ratio, lo, hi = thr if thr is not None else (0.0, 1.0, 1.0)
    return (
        x,
        model_out,
        model_cond,
        rnd(*shape) if x_eval else None,
        hist1,
        hist2,
        rnd(*shape, dt=hdt) if hist3 else None,
        rnd(*shape) if noise else None,
        coef,
        L.CFG_MODES[cfg],
        thr is not None,
        ratio,
        lo,
        hi,
        torch.empty_like(x),
        torch.empty_like(x, dtype=hdt),
    )


OPCHECK_CASES = {
    "plain": {},
    "thresholded": {"thr": THR},
    "stacked-cfg": {"cfg": "stacked", "thr": (0.995, 1.0, math.inf)},
    "stacked3-cfg-hist3": {"cfg": "stacked3", "hist3": True, "thr": THR},
    "pair-cfg-x_eval": {"cfg": "pair", "x_eval": True},
    "per-sample-coef": {"per_sample": True, "thr": THR},
    "noise": {"noise": True},
    "float64": {"dtype": torch.float64, "thr": THR, "noise": True},
    "bfloat16": {"dtype": torch.bfloat16, "cfg": "stacked"},
    "float16-float32-history": {"dtype": torch.float16, "hist_dtype": torch.float32, "thr": THR},
}


@pytest.mark.parametrize("name", list(OPCHECK_CASES))
def test_opcheck(name):
    args = _args((3, 4, 5), seed=1, **OPCHECK_CASES[name])
    torch.library.opcheck(OP, args)


def test_opcheck_without_history_slot():
    args = list(_args((2, 9), seed=2))
    args[-1] = None
    torch.library.opcheck(OP, tuple(args))


@pytest.mark.slow
def test_torch_compile_fullgraph_loop_equals_eager():
    registry.prepare("cpu", "cpu")
    b, n, steps = 2, 257, 5
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(b, n, generator=gen)
    coefs = [_coef(None, 10 + i, noise=True) for i in range(steps)]
    noises = [torch.randn(b, n, generator=gen) for _ in range(steps)]

    def model(x, i):
        # exact arithmetic (a roll, a power-of-two scale): inductor cannot round it differently from eager,
        # so compiled and eager loops must agree bit for bit
        return torch.roll(x, i + 1, dims=-1) * 0.5

    def sample(x, coefs, noises):
        hist = torch.zeros(2, *x.shape)
        for i in range(steps):
            m = model(x, i)
            slot, prev = hist[i % 2], hist[(i + 1) % 2]
            x = ops.fused_step(
                x,
                m,
                coefs[i],
                hist_out=slot,
                hist=[prev],
                noise=noises[i],
                cfg="none",
                threshold=THR if i % 2 else None,
                backend="cpu",
            )
        return x, hist

    eager_x, eager_h = sample(x0, coefs, noises)
    comp_x, comp_h = torch.compile(sample, fullgraph=True, backend="inductor")(x0, coefs, noises)
    torch.testing.assert_close(comp_x, eager_x, rtol=0, atol=0)
    torch.testing.assert_close(comp_h, eager_h, rtol=0, atol=0)


def _identity_threshold_coef() -> torch.Tensor:
    """y = x, m = clamp(x, -s, s) / s, out = m: the step exposes the thresholding of x itself."""
    c = torch.zeros(L.NCOEF, dtype=torch.float64)
    c[L.PX], c[L.QM], c[L.C0] = 1.0, 1.0, 1.0
    return c


def test_quantile_of_one_sample_above_torch_quantile_limit():
    n = (1 << 24) + 3  # torch.quantile refuses more than 2^24 elements
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, n, generator=gen)
    x[0, ::1000] = x[0, ::1000].round()  # some ties
    ratio = 0.8  # rank with a fractional part: interpolation between two order statistics
    out = ops.fused_step(
        x, torch.zeros_like(x), _identity_threshold_coef(), threshold=(ratio, 1e-30, math.inf), backend="cpu"
    )
    s = reference.per_sample_quantile(x.abs(), ratio).clamp(min=1e-30)[:, None]
    assert s.dtype == torch.float32
    expect = torch.minimum(torch.maximum(x, -s), s) / s
    assert torch.equal(out, expect)


@pytest.mark.parametrize(
    "shape,thr",
    [((1, 1 << 18), THR), ((3, 100_003), THR), ((8, 4096), THR), ((2, 1 << 18), None), ((1, 70_001), (0.5, 1e-3, 9.0))],
    ids=["one-large-sample", "three-samples", "many-small-samples", "plain", "median"],
)
def test_bitwise_identical_with_one_and_two_threads(shape, thr):
    base = _args(shape, cfg="stacked3", thr=thr, noise=True, per_sample=True, hist3=True, seed=5)
    saved = torch.get_num_threads()
    results = []
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            args = list(base)
            args[-2], args[-1] = torch.full_like(base[0], math.nan), torch.full_like(base[0], math.nan)
            OP(*args)
            results.append((args[-2], args[-1]))
    finally:
        torch.set_num_threads(saved)
    (o1, h1), (o2, h2) = results
    assert torch.equal(o1, o2) and torch.equal(h1, h2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_large_samples_match_the_reference_bitwise(dtype):
    """Samples above the size the kernel selects in directly, with ties, NaN and inf: same bits as the reference
    run in the kernel's arithmetic type (where the reference's sort and the kernel's selection must agree)."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 200_001, generator=gen, dtype=torch.float64)
    x[0] = x[0].round()  # a few distinct values: big tie groups
    x[1, ::5000] = math.inf
    x[1, 7] = math.nan
    x = x.to(dtype)
    mo = torch.randn(x.shape, generator=gen).to(dtype)
    coef = _coef(None, 7)
    for ratio in (0.0, 0.37, 0.995, 1.0):
        want_out, want_m = reference.fused_step(
            x, mo, coef, None, None, None, None, None, None, L.CFG_NONE, True, ratio, 0.05, 3.0
        )
        out, m = torch.empty_like(x), torch.empty_like(x)
        OP(x, mo, None, None, None, None, None, None, coef, L.CFG_NONE, True, ratio, 0.05, 3.0, out, m)
        torch.testing.assert_close(out, want_out, rtol=0, atol=0, equal_nan=True, msg=f"ratio={ratio}")
        torch.testing.assert_close(m, want_m, rtol=0, atol=0, equal_nan=True, msg=f"ratio={ratio}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_selection_when_a_strided_sample_misleads(dtype, ties):
    """The kernel first tries a key interval guessed from evenly strided elements; a layout with outliers at
    exactly those positions makes the guess miss, and the radix passes must still find the exact answer."""
    n = 1 << 18  # the guess probes a power-of-two number of evenly spaced elements: all multiples of 8
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, n, generator=gen, dtype=torch.float64)
    if ties:
        x = x.round()  # big tie groups: the radix passes run down to the last bit
    x[:, ::8] = 100.0 + torch.arange(0, n, 8, dtype=torch.float64) % 977
    x = x.to(dtype)
    coef = _identity_threshold_coef()
    for ratio in (0.0, 0.25, 0.5, 0.9):
        out = ops.fused_step(x, torch.zeros_like(x), coef, threshold=(ratio, 1e-30, math.inf), backend="cpu")
        s = reference.per_sample_quantile(x.abs(), ratio).clamp(min=1e-30)[:, None]
        assert torch.equal(out, torch.minimum(torch.maximum(x, -s), s) / s), f"ratio={ratio}"


def test_direct_op_call_validates_before_writing():
    """The C++ checks are a safety net for direct torch.ops calls that skip the Python wrapper."""
    args = list(_args((2, 8), seed=8))
    args[-2].fill_(5.0)
    args[-1].fill_(5.0)
    bad = list(args)
    bad[4] = torch.randn(2, 9)  # hist1 of the wrong shape
    with pytest.raises(ValueError, match="hist1"):
        OP(*bad)
    bad = list(args)
    bad[-1] = args[4]  # hist_out is hist1
    with pytest.raises(ValueError, match="hist_out"):
        OP(*bad)
    bad = list(args)
    bad[5] = args[5].double()  # a history dtype that is neither x's nor float32-for-half
    with pytest.raises(TypeError, match="hist2"):
        OP(*bad)
    bad = list(args)
    bad[6] = args[5].clone()  # hist3 without hist2
    bad[5] = None
    with pytest.raises(ValueError, match="hist3"):
        OP(*bad)
    bad = list(args)
    bad[8] = args[8].clone()
    bad[8][L.A] = math.inf
    with pytest.raises(ValueError, match="coef"):
        OP(*bad)
    assert bool((args[-2] == 5.0).all()) and bool((args[-1] == 5.0).all())


@pytest.fixture(params=["32", "16"], ids=["widest", "16-byte"])
def cpu_width(request, monkeypatch):
    """Runs a test in the widest build this CPU has (AVX2 + F16C on most x86-64) and in the 16-byte build."""
    if request.param == "16":
        monkeypatch.setenv("DPM_KERNELS_CPU_WIDTH", "16")
    else:
        monkeypatch.delenv("DPM_KERNELS_CPU_WIDTH", raising=False)
    return request.param


def _special_floats() -> torch.Tensor:
    """float32 bit patterns that stress rounding to 16 bits: every half/bfloat16 rounding tie and its neighbours,
    subnormals, the overflow edges, infinities, NaNs of both signs with payloads, plus random patterns."""
    gen = torch.Generator().manual_seed(11)
    rnd = torch.randint(-(1 << 31), 1 << 31, (1 << 20,), generator=gen, dtype=torch.int64)
    top = torch.arange(1 << 16, dtype=torch.int64) << 16  # every bfloat16 value, as float32 bits
    near = torch.cat([top + d for d in (0x7FFF, 0x8000, 0x8001, 0x17FFF, 0x18000, 0x18001)])
    half_grid = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int64) << 13  # every float16 mantissa step
    half_ties = torch.cat([half_grid + d for d in (0xFFF, 0x1000, 0x1001)])
    special = torch.tensor(
        [0, 1, 0x7F7FFFFF, 0x7F800000, 0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0x477FE000, 0x477FEFFF, 0x477FF000,
         0x33000000, 0x33000001, 0x387FC000],
        dtype=torch.int64,
    )
    special = torch.cat([special, special | (1 << 31)])
    bits = torch.cat([rnd, near, half_ties, special]) & 0xFFFFFFFF
    bits = torch.where(bits >= (1 << 31), bits - (1 << 32), bits)
    return bits.to(torch.int32).view(torch.float32)


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    iview = {2: torch.int16, 4: torch.int32}[got.element_size()]
    return torch.equal(got.view(iview), want.view(iview))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vector_conversions_match_c10(dtype, cpu_width):
    """The kernel's vector loads and stores of 16-bit floats equal PyTorch's conversions bit for bit: every one of
    the 65536 16-bit patterns loaded, and a million float32 patterns (ties, subnormals, overflow, NaN) stored."""
    # Load: y = 0 * x + 1 * raw lands in the float32 history slot; raw = every 16-bit pattern.
    raw = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)[None]
    x = torch.zeros_like(raw)
    coef = torch.zeros(L.NCOEF, dtype=torch.float64)
    coef[L.PM] = 1.0
    out, m = torch.empty_like(x), torch.full(raw.shape, math.nan)
    OP(x, raw, None, None, None, None, None, None, coef, L.CFG_NONE, False, 0.0, 1.0, 1.0, out, m)
    assert _same_bits(m, 0.0 + raw.float())
    # Store: out = 0 * x + 0 * m + 1 * h1 with h1 float32: the kernel's rounding of every float above.
    h1 = _special_floats()[None]
    x = torch.zeros(h1.shape, dtype=dtype)
    coef = torch.zeros(L.NCOEF, dtype=torch.float64)
    coef[L.C1] = 1.0
    out = torch.empty_like(x)
    OP(x, torch.zeros_like(x), None, None, h1, None, None, None, coef, L.CFG_NONE, False, 0.0, 1.0, 1.0, out, None)
    want = (0.0 + h1).to(dtype)
    finite = ~want.isnan()
    assert _same_bits(out[finite], want[finite])
    assert bool(out[~finite].isnan().all())


WIDTH_CASES = {
    "float32-thr-cfg": {"dtype": torch.float32, "cfg": "stacked", "thr": THR, "noise": True},
    "float32-thr-stacked3-hist3": {"dtype": torch.float32, "cfg": "stacked3", "thr": THR, "hist3": True},
    "bfloat16-stacked3-hist3": {"dtype": torch.bfloat16, "hist_dtype": torch.float32, "cfg": "stacked3",
                                "hist3": True, "noise": True},
    "float16-hist3-thr": {"dtype": torch.float16, "hist3": True, "thr": THR, "per_sample": True},
    "float64-pair": {"dtype": torch.float64, "cfg": "pair", "x_eval": True},
    "bfloat16-thr": {"dtype": torch.bfloat16, "hist_dtype": torch.float32, "thr": THR, "noise": True},
    "bfloat16-own-history": {"dtype": torch.bfloat16, "cfg": "pair"},
    "float16-thr": {"dtype": torch.float16, "hist_dtype": torch.float32, "thr": THR, "per_sample": True},
    "float16-own-history": {"dtype": torch.float16, "noise": True},
}


@pytest.mark.parametrize("name", list(WIDTH_CASES))
def test_widest_and_16_byte_builds_agree_bitwise(name, monkeypatch):
    """No FMA and the same operation order in every build: the AVX2 and SSE forms give identical bits, and both
    equal the reference run in float32 to rounding (the numerical matrix is test_fused_step.py's)."""
    base = _args((3, 1000 + 37), seed=12, **WIDTH_CASES[name])
    results = []
    for width in ("32", "16"):
        if width == "16":
            monkeypatch.setenv("DPM_KERNELS_CPU_WIDTH", "16")
        args = list(base)
        args[-2], args[-1] = torch.full_like(base[-2], math.nan), torch.full_like(base[-1], math.nan)
        OP(*args)
        results.append((args[-2], args[-1]))
    (o1, h1), (o2, h2) = results
    assert torch.equal(o1, o2) and torch.equal(h1, h2)
    assert not o1.isnan().any()


@pytest.mark.parametrize("n", [1, 2, 3, 64, 65, 257, 4096, 1 << 15, (1 << 15) + 1])
@pytest.mark.parametrize("kind", ["distinct", "ties", "nan-inf-zero"])
def test_sample_quantile_matches_the_reference_bitwise(n, kind):
    """Samples the kernel selects in memory (up to 2^15 keys) and the first size above: every rank position,
    including the first and last (ratio 0 and 1, exact) and equal neighbours, gives the reference's order
    statistics. Interpolated ranks may round differently in the last place (torch.quantile's lerp vs the
    kernel's): 3e-7 relative, where a neighbouring order statistic would be off by orders of magnitude more."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=gen)
    if kind == "ties":
        x = (x * 2).round() / 2  # a handful of distinct values: the k-th and (k+1)-th keys often tie
    elif kind == "nan-inf-zero":
        x[:, :: max(1, n // 7)] = 0.0
        x[0, -1] = math.nan
        x[1, 0] = -math.inf
        x[2, n // 2] = math.inf
    mo = torch.randn(x.shape, generator=gen)
    coef = _coef(None, n)
    coef[L.PX], coef[L.PM] = 1.0, 0.0  # y = x: the sample's own values are thresholded
    for ratio in (0.0, 0.37, 0.5, 0.995, 1.0):
        want_out, want_m = reference.fused_step(
            x, mo, coef, None, None, None, None, None, None, L.CFG_NONE, True, ratio, 1e-30, math.inf
        )
        out, m = torch.full_like(x, 7.0), torch.full_like(x, 7.0)
        OP(x, mo, None, None, None, None, None, None, coef, L.CFG_NONE, True, ratio, 1e-30, math.inf, out, m)
        tol = 0.0 if ratio in (0.0, 1.0) else 3e-7
        torch.testing.assert_close(out, want_out, rtol=tol, atol=0, equal_nan=True, msg=f"ratio={ratio}")
        torch.testing.assert_close(m, want_m, rtol=tol, atol=0, equal_nan=True, msg=f"ratio={ratio}")
