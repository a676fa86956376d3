"""GPU-only checks of the CUDA backend: graph capture, no host syncs, launch counts, both selection regimes.

The backend-parametrized tests (test_fused_step.py, test_op_errors.py) cover the CUDA backend's semantics
on small shapes, which all take the small selection regime (one block per sample). These add what only a
GPU run shows: a 20-step loop captured in one CUDA graph replays bit for bit like eager (coefficients are
read from device memory, so new table values need no recapture), no step synchronises with the host, a
thresholded 1x4x128x128 step is at most 2 kernels, and the multi-launch ("huge") regime, samples past
2^24 elements and misaligned tensors agree with the reference. Mixed precision (float16/bfloat16 samples,
float32 history: fused_update_kernel<S, float>) runs through the same checks: graph replay, large and odd
samples, misaligned float32 history, and the binding's own dtype checks. Skipped without a CUDA device.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_fused_step import LOW_THR, assert_close_to_reference, make_case, run_backend

from dpm_kernels import layout as L
from dpm_kernels import ops
from dpm_kernels.backends import reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SMALL = (1, 4, 128, 128)  # n = 65536: one block per sample selects
HUGE = (1, 4, 256, 256)  # n = 262144 > 2^17 with one sample: multi-block passes
THR = (0.995, 1.0, math.inf)


def _table(steps: int, nhist: int, seed: int = 0) -> torch.Tensor:
    """[steps, NCOEF] float64 rows of a contracting multistep-like update (values stay O(1) over the loop)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(steps, L.NCOEF, dtype=torch.float64)
    t[:, L.PX] = 1.0
    t[:, L.PM] = -0.3 - 0.2 * torch.rand(steps, generator=g, dtype=torch.float64)
    t[:, L.QX], t[:, L.QM] = 0.0, 1.0
    t[:, L.A] = 0.9
    t[:, L.C0] = 0.08
    if nhist > 0:
        t[:, L.C1] = 0.03
    if nhist > 1:
        t[:, L.C2] = -0.01
    t[:, L.CN] = 0.02
    return t.cuda()


def _loop(x, ring, noise, table, threshold):
    """20 steps: a stand-in model, then the fused step writing x in place and one history slot."""
    for i in range(table.shape[0]):
        model_out = torch.tanh(x) * 1.7 + 0.1
        hist = [ring[(i - 1) % 3], ring[(i - 2) % 3]][: min(i, 2)]
        ops.fused_step(x, model_out, table[i], out=x, hist_out=ring[i % 3], hist=hist, noise=noise[i],
                       threshold=threshold, backend="cuda")


def _inputs(shape, dtype, steps, seed=0, hist_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype).cuda()
    ring = torch.zeros((3,) + shape, dtype=hist_dtype or dtype, device="cuda")
    noise = torch.randn((steps,) + shape, generator=g).to(dtype).cuda()
    return x, ring, noise


GRAPH_DTYPES = {"float16": (torch.float16, None), "float32": (torch.float32, None), "float64": (torch.float64, None),
                "float16-f32hist": (torch.float16, torch.float32), "bfloat16-f32hist": (torch.bfloat16, torch.float32)}


@pytest.mark.parametrize("shape", [SMALL, HUGE], ids=["small", "huge"])
@pytest.mark.parametrize("dtypes", list(GRAPH_DTYPES.values()), ids=list(GRAPH_DTYPES))
def test_graph_replay_equals_eager_bitwise(shape, dtypes):
    dtype, hist_dtype = dtypes
    steps = 20
    table = _table(steps, nhist=2)
    x0, ring0, noise = _inputs(shape, dtype, steps, hist_dtype=hist_dtype)

    def eager(tab):
        x, ring = x0.clone(), ring0.clone()
        _loop(x, ring, noise, tab, THR)
        return x, ring

    want_x, want_ring = eager(table)
    x, ring = x0.clone(), ring0.clone()
    side = torch.cuda.Stream()  # warm-up on a side stream before capture, as torch.cuda.graphs asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _loop(x.clone(), ring.clone(), noise, table, THR)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _loop(x, ring, noise, table, THR)
    x.copy_(x0)
    ring.copy_(ring0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(x, want_x) and torch.equal(ring, want_ring)
    # New coefficient values in the same table: a replay uses them without recapture.
    table[:, L.PM] *= 0.5
    want_x, want_ring = eager(table)
    x.copy_(x0)
    ring.copy_(ring0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(x, want_x) and torch.equal(ring, want_ring)


@pytest.mark.parametrize("shape", [SMALL, HUGE], ids=["small", "huge"])
def test_no_host_sync_per_step(shape):
    steps = 4
    table = _table(steps, nhist=2)
    x, ring, noise = _inputs(shape, torch.float16, steps)
    _loop(x, ring, noise, table, THR)  # loads the extension, warms the allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _loop(x, ring, noise, table, THR)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def _kernels(fn) -> tuple[list[str], list[str]]:
    """(kernel names, memcpy/memset names) that fn puts on the GPU, from the profiler's CUDA events."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = [n for n in names if n.startswith(("Memcpy", "Memset", "memcpy", "memset"))]
    return [n for n in names if n not in copies], copies


@pytest.mark.parametrize("dtype,hist_f32", [(torch.float16, False), (torch.bfloat16, False), (torch.float32, False),
                                            (torch.bfloat16, True)], ids=["f16", "bf16", "f32", "bf16-f32hist"])
def test_thresholded_small_step_is_at_most_two_kernels(dtype, hist_f32):
    case = make_case(SMALL, dtype, "cuda", nhist=2, cfg="stacked", thr=THR, noise=True, seed=1, hist_f32=hist_f32)
    out, hist_out = torch.empty_like(case["x"]), torch.empty_like(case["x"], dtype=case["hist_dtype"])
    run_backend(case, "cuda", out=out, hist_out=hist_out)  # load and warm up
    kernels, copies = _kernels(lambda: run_backend(case, "cuda", out=out, hist_out=hist_out))
    assert 1 <= len(kernels) <= 2, kernels
    assert not copies, copies
    plain = dict(case, threshold=None)
    kernels, copies = _kernels(lambda: run_backend(plain, "cuda", out=out, hist_out=hist_out))
    assert len(kernels) == 1 and not copies, (kernels, copies)


@pytest.mark.parametrize(
    "shape,dtype,hist_f32",
    [(HUGE, torch.float32, False), (HUGE, torch.float16, False), (HUGE, torch.float64, False),
     ((3, 5, 181, 149), torch.bfloat16, False), ((2, 300007), torch.float32, False),
     ((64, 2, 257, 263), torch.float32, False), (HUGE, torch.float16, True), ((3, 5, 181, 149), torch.bfloat16, True),
     ((2, 3, 4, 1000), torch.float16, True)],
    ids=["huge-f32", "huge-f16", "huge-f64", "huge-odd-bf16", "huge-odd-f32", "many-large-samples",
         "huge-f16-f32hist", "huge-odd-bf16-f32hist", "n-mult-8-f16-f32hist"],
)
def test_large_samples_against_reference(shape, dtype, hist_f32):
    """n > 2^17: multi-block selection (or, with 64 samples, one block per large sample); odd n: scalar path.
    f32hist: float32 history with half samples (two 16-byte history accesses per 8-element group)."""
    for per_sample in (False, True):
        case = make_case(shape, dtype, "cuda", nhist=2, cfg="pair", thr=LOW_THR, noise=True, x_eval=True,
                         per_sample=per_sample, seed=3, hist_f32=hist_f32)
        out, m = run_backend(case, "cuda")
        assert_close_to_reference(case, out, m)


@pytest.mark.parametrize("n", [1, 7, (1 << 17) + 1, (1 << 24) + 3], ids=["1", "7", "2^17+1", "2^24+3"])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.995, 1.0])
def test_quantile_matches_sort_reference(n, ratio):
    """With y = x, lo tiny and c0 = 1 the step returns clamp(x, -s, s) / s with the kernel's own s; compare
    with the sort-based reference quantile (torch.quantile refuses n > 2^24)."""
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(2, n, generator=g) * 3 + 0.5).cuda()
    x[1] = x[1].round()  # ties
    coef = torch.zeros(L.NCOEF, dtype=torch.float64, device="cuda")
    coef[L.PX], coef[L.QM], coef[L.C0] = 1.0, 1.0, 1.0
    out = ops.fused_step(x, torch.zeros_like(x), coef, threshold=(ratio, 1e-30, math.inf), backend="cuda")
    q = reference.per_sample_quantile(x.abs(), ratio).clamp(min=1e-30)[:, None]
    expect = torch.minimum(torch.maximum(x, -q), q) / q
    assert torch.allclose(out, expect, rtol=1e-5, atol=1e-6), f"n={n} ratio={ratio}"


def test_misaligned_tensors_take_the_scalar_path():
    """Tensors starting one element past a 16-byte boundary: same values as aligned ones, bit for bit."""
    shape = (2, 4, 33, 35)
    n = math.prod(shape)
    case = make_case(shape, torch.float16, "cuda", nhist=2, cfg="stacked", thr=LOW_THR, noise=True, seed=9)
    ref_out, ref_m = run_backend(case, "cuda")
    shifted = dict(case)
    for key in ("x", "model_out", "noise"):
        t = case[key]
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
        buf[1:].copy_(t.reshape(-1))
        shifted[key] = buf[1:].view(t.shape)
        assert shifted[key].data_ptr() % 16 != 0
    out_buf = torch.empty(n + 1, dtype=torch.float16, device="cuda")
    out, m = run_backend(shifted, "cuda", out=out_buf[1:].view(shape))
    assert_close_to_reference(shifted, out, m)
    # Same arithmetic on either path, built with -fmad=false (no contraction): the vector and scalar paths agree.
    assert torch.equal(out, ref_out) and torch.equal(m, ref_m)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_misaligned_float32_history_takes_the_scalar_path(dtype):
    """float32 history one element (4 bytes) past a 16-byte boundary while the half tensors are aligned, and
    the other way round: every tensor's own alignment decides, and both paths give the same bits."""
    shape = (2, 4, 32, 36)  # n a multiple of 8: only the pointers can push it off the vector path
    n = math.prod(shape)
    case = make_case(shape, dtype, "cuda", nhist=2, thr=LOW_THR, noise=True, per_sample=True, seed=12, hist_f32=True)
    ref_out, ref_m = run_backend(case, "cuda")
    assert_close_to_reference(case, out=ref_out, m=ref_m)

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
        buf[1:].copy_(t.reshape(-1))
        v = buf[1:].view(t.shape)
        assert v.data_ptr() % 16 != 0
        return v

    hist_shift = dict(case, hist=[shifted(h) for h in case["hist"]])
    ho_buf = torch.full((n + 1,), math.nan, dtype=torch.float32, device="cuda")
    out, m = run_backend(hist_shift, "cuda", hist_out=ho_buf[1:].view(shape))
    assert torch.equal(out, ref_out) and torch.equal(m, ref_m)
    assert math.isnan(float(ho_buf[0]))
    x_shift = dict(case, x=shifted(case["x"]), noise=shifted(case["noise"]))
    out, m = run_backend(x_shift, "cuda")
    assert torch.equal(out, ref_out) and torch.equal(m, ref_m)


def test_binding_checks_the_history_dtype():
    """The binding's own checks (without the Python entry point): history shares one dtype, x's or float32 for
    a half x; anything else is refused naming the argument, before anything is written."""
    x = torch.randn(2, 8, device="cuda", dtype=torch.float16)
    coef = torch.zeros(L.NCOEF, dtype=torch.float64, device="cuda")
    ops.fused_step(x, x.clone(), coef, backend="cuda")  # loads the extension
    op = torch.ops.dpm_kernels.fused_step
    out = torch.full_like(x, 7.0)

    def call(hist1, hist_out):
        op(x, x.clone(), None, None, hist1, None, None, None, coef, 0, False, 0.5, 1.0, 1.0, out, hist_out)

    f32, f64, f16 = (torch.zeros(2, 8, device="cuda", dtype=d) for d in (torch.float32, torch.float64, torch.float16))
    for hist1, hist_out, name in ((f32, f16.clone(), "hist_out"), (f16, f32.clone(), "hist_out"), (f64, None, "hist1"),
                                  (None, f64.clone(), "hist_out")):
        with pytest.raises((TypeError, RuntimeError), match=name):
            call(hist1, hist_out)
        assert bool((out == 7.0).all())
    xf = torch.randn(2, 8, device="cuda")
    with pytest.raises((TypeError, RuntimeError), match="hist1"):  # float32 x: history must be float32 too
        op(xf, xf.clone(), None, None, f16, None, None, None, coef, 0, False, 0.5, 1.0, 1.0, torch.empty_like(xf),
           None)
    call(f32, f32.clone())  # the mixed pair is accepted


def test_inputs_on_two_devices_are_refused():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    x = torch.randn(2, 8, device="cuda:0")
    coef = torch.zeros(L.NCOEF, dtype=torch.float64, device="cuda:0")
    other = torch.randn(2, 8, device="cuda:1")
    out = torch.full_like(x, 7.0)
    with pytest.raises(ValueError, match="model_out"):
        ops.fused_step(x, other, coef, out=out, backend="cuda")
    # The binding checks too, without the Python entry point in front of it.
    ops.fused_step(x, x.clone(), coef, backend="cuda")  # loads the extension
    with pytest.raises((ValueError, RuntimeError), match="model_out"):
        torch.ops.dpm_kernels.fused_step(x, other, None, None, None, None, None, None, coef, 0, False, 0.5, 1.0, 1.0,
                                         out, None)
    assert bool((out == 7.0).all())
