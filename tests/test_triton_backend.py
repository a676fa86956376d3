"""The Triton backend's own parts: the radix select, the launch counts, registration, graph capture.

Runs on CUDA when there is a GPU, else on CPU tensors under the Triton interpreter (conftest sets it), so the
shapes stay small; the multi-program select path is forced with tiny test-only block sizes.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import rel_err

from dpm_kernels import layout as L
from dpm_kernels import ops
from dpm_kernels.backends import reference, triton_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.skipif(triton_backend.why_unavailable(torch.device(DEVICE)) is not None,
                       reason=str(triton_backend.why_unavailable(torch.device(DEVICE)))),
    # the interpreter's numpy warns on inf - inf inside lerp (NaN, as torch.lerp gives)
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

if triton_backend.why_unavailable(torch.device(DEVICE)) is None:
    from dpm_kernels.backends import triton_select as sel

# the multi-program path with test-only sizes: several programs per sample at n ~ 70 (blocks of 32, 2 a program;
# or blocks of 64, one a program, which the interpreter runs faster)
MULTI = {"small": False, "block": 32, "iters": 2}
MULTI_FAST = {"small": False, "block": 64, "iters": 1}
RATIOS = (0.0, 0.25, 0.5, 0.995, 1.0)


def _awkward(dtype: torch.dtype) -> list[torch.Tensor]:
    """Batches [B, n] whose rows stress the select: ties, zeros, extremes, NaN, last-bit differences, n = 1, 2."""
    gen = torch.Generator().manual_seed(1)
    eps = torch.finfo(dtype).eps
    n = 70  # > one test block (32) and one test chunk (64): several programs per sample on the multi path
    rows = torch.randn(8, n, generator=gen, dtype=torch.float64)
    rows[1] = (rows[1] * 2).round()  # ties
    rows[2] = -1.25  # all equal
    rows[3] = 0.0
    rows[4, ::5] = 0.0
    rows[4, 1::7] = -0.0
    rows[4, 2] = math.inf
    rows[4, 3] = -math.inf
    if dtype != torch.bfloat16:  # the interpreter's bfloat16 upcast flushes subnormals; GPUs do not
        rows[4, 4::6] = torch.finfo(dtype).tiny / 4
    rows[5] = (1.0 + eps * torch.arange(n, dtype=torch.float64)) * (-1.0) ** torch.arange(n)  # last bits differ
    rows[6, 3] = math.nan
    rows[6, 40::2] = math.nan
    rows[7, :69] = math.nan  # one number among NaNs
    tiny_n = [torch.tensor([[3.0], [-0.5], [0.0], [math.nan]], dtype=torch.float64),
              torch.tensor([[1.0, -2.0], [5.0, 5.0], [math.nan, 1.0]], dtype=torch.float64)]
    return [t.to(dtype).to(DEVICE) for t in [rows] + tiny_n]


def _expect(v: torch.Tensor, ratio: float) -> torch.Tensor:
    """The reference quantile of |v| per row, in the kernels' arithmetic type."""
    acc = reference.acc_dtype(v.dtype)
    return reference.per_sample_quantile(v.to(acc).abs(), ratio)


def _check(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    # The order statistics are exact; the interpolation may round once differently (an FMA on the GPU).
    eps = torch.finfo(want.dtype).eps
    torch.testing.assert_close(got, want, rtol=4 * eps, atol=0.0, equal_nan=True, msg=what)


# (path, dtype) -> ratios; fewer where the interpreter is slowest (float64 runs up to 8 launches a ratio)
SELECT_CASES = {
    ("one-program", torch.float32): RATIOS,
    ("one-program", torch.float64): (0.0, 0.5, 1.0),
    ("one-program", torch.bfloat16): (0.0, 0.995),
    ("multi-program", torch.float32): (0.0, 0.5, 1.0),
    ("multi-program", torch.float64): (0.995,),
}


@pytest.mark.parametrize("path,dtype", list(SELECT_CASES), ids=[f"{p}-{d}" for p, d in SELECT_CASES])
def test_select_matches_sorted_reference(path, dtype):
    force = MULTI_FAST if path == "multi-program" else {"small": True}
    for v in _awkward(dtype):
        for ratio in SELECT_CASES[(path, dtype)]:
            got = sel.quantile_abs(v, ratio, **force)
            _check(got, _expect(v, ratio), f"n={v.shape[1]} ratio={ratio} {path}")


def test_select_sizes_around_block_and_chunk_edges():
    """Ragged tails: sizes just below, at and above the (test) block and chunk sizes, both paths."""
    gen = torch.Generator().manual_seed(2)
    for n, ratio in ((32, 0.995), (33, 0.1), (64, 0.995), (65, 0.995), (129, 0.6)):
        v = torch.randn(2, n, generator=gen).to(DEVICE)
        want = _expect(v, ratio)
        _check(sel.quantile_abs(v, ratio, **MULTI), want, f"n={n} ratio={ratio} multi")
        _check(sel.quantile_abs(v, ratio, small=True, block=32), want, f"n={n} ratio={ratio} one-program")


def _thresholded_case(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)
    model_out = (torch.randn(*shape, generator=gen) * 2).to(dtype).to(DEVICE)
    coef = torch.zeros(L.NCOEF, dtype=torch.float64)
    coef[L.PX], coef[L.PM], coef[L.QX], coef[L.QM], coef[L.A], coef[L.C0] = 1.3, -0.7, 0.2, 0.9, 0.6, 0.4
    return x, model_out, coef.to(DEVICE)


@pytest.fixture
def count_launches(monkeypatch):
    """Counts the backend's kernel launches (every one goes through triton_select.launch)."""
    names: list[str] = []
    real = sel.launch

    def counting(kernel, grid, *args, **meta):
        names.append(getattr(kernel, "__name__", getattr(getattr(kernel, "fn", None), "__name__", "?")))
        real(kernel, grid, *args, **meta)

    monkeypatch.setattr(sel, "launch", counting)
    return names


def test_thresholded_latent_step_is_two_launches(count_launches):
    x, model_out, coef = _thresholded_case((1, 4, 128, 128))
    thr = (0.995, 1.0, 1.5)
    out = torch.full_like(x, math.nan)
    hist_out = torch.full_like(x, math.nan)
    ops.fused_step(x, model_out, coef, out=out, hist_out=hist_out, threshold=thr, backend="triton")
    assert len(count_launches) <= 2, count_launches
    ref_out, ref_m = reference.fused_step(x.double(), model_out.double(), coef, threshold=True, thr_ratio=thr[0],
                                          thr_min=thr[1], thr_max=thr[2])
    assert rel_err(out, ref_out) < 1e-5 and rel_err(hist_out, ref_m) < 1e-5


def test_huge_path_step_matches_and_launches_a_fixed_number(count_launches, monkeypatch):
    """Force the multi-program select inside a whole step: NPASS histogram launches + finalize + update."""
    monkeypatch.setattr(sel, "SMALL_MAX_N", 0)
    monkeypatch.setattr(sel, "sm_count", lambda device: 1 << 20)
    monkeypatch.setattr(sel, "PASS_BLOCK", 64)
    monkeypatch.setattr(sel, "PASS_ITERS", 2)
    for dtype, npass in ((torch.float32, 4), (torch.float64, 8)):
        count_launches.clear()
        x, model_out, coef = _thresholded_case((2, 3, 50), dtype, seed=3)
        out = ops.fused_step(x, model_out, coef, threshold=(0.7, 0.05, 3.0), backend="triton")
        assert count_launches == ["_hist_pass"] * npass + ["_finalize", "_step_kernel"]
        ref_out, _ = reference.fused_step(x.double(), model_out.double(), coef, threshold=True, thr_ratio=0.7,
                                          thr_min=0.05, thr_max=3.0)
        assert rel_err(out, ref_out) < (1e-5 if dtype == torch.float32 else 1e-12)


def test_registered_schema_is_the_contract():
    """triton_op infers its schema from annotations; it must be ops.SCHEMA (an int argument reads SymInt)."""
    got = torch.ops.dpm_kernels.fused_step_triton.default._schema
    want = torch._C.parse_schema("dpm_kernels::fused_step_triton" + ops.SCHEMA)
    assert [a.name for a in got.arguments] == [a.name for a in want.arguments]
    for g, w in zip(got.arguments, want.arguments, strict=True):
        assert str(g.type).replace("SymInt", "int") == str(w.type), g.name
        assert (g.alias_info is not None and g.alias_info.is_write) == (w.alias_info is not None and
                                                                      w.alias_info.is_write), g.name
    assert len(got.returns) == len(want.returns) == 0


@pytest.mark.parametrize("three", [False, True], ids=["plain", "stacked3-hist3"])
def test_opcheck(three):
    x, model_out, coef = _thresholded_case((2, 3, 5))
    if three:  # [uncond, cond, perturbed] and three history entries
        args = (x, torch.cat([model_out, -model_out, x]), None, None, x.clone(), x + 1, x * 2, None, coef,
                L.CFG_STACKED3, True, 0.9, 0.5, 2.0, torch.empty_like(x), torch.empty_like(x))
    else:
        args = (x, model_out, None, None, x.clone(), None, None, None, coef, L.CFG_NONE, True, 0.9, 0.5, 2.0,
                torch.empty_like(x), torch.empty_like(x))
    op = torch.ops.dpm_kernels.fused_step_triton.default
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration"))
    # tracing into the kernels (aot_dispatch) needs compiled kernels: only where a GPU runs them
    torch.library.opcheck(op, args, test_utils=("test_faketensor",) + (("test_aot_dispatch_dynamic",)
                                                                        if DEVICE == "cuda" else ()))


def test_why_unavailable_names_the_device():
    why = triton_backend.why_unavailable(torch.device("meta"))
    assert why is not None and "meta" in why


@pytest.mark.skipif(DEVICE != "cuda", reason="per-sample sizes above 2^24 are too slow for the interpreter")
def test_select_above_two_to_the_24():
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    v = torch.randn(1, (1 << 24) + 3, generator=gen, device=DEVICE)
    v[0, :1000] = 7.0  # ties at the top
    for ratio in (0.5, 0.995, 1.0):
        _check(sel.quantile_abs(v, ratio), _expect(v, ratio), f"ratio={ratio}")


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("small", [True, False], ids=["one-program", "multi-program"])
def test_cuda_graph_replays_any_step(small, monkeypatch):
    """One captured thresholded step replays with new coefficients (read on the device, no host sync)."""
    if not small:
        monkeypatch.setattr(sel, "SMALL_MAX_N", 0)
        monkeypatch.setattr(sel, "sm_count", lambda device: 1 << 20)
    x, model_out, coef = _thresholded_case((2, 4, 32, 32))
    out, hist_out = torch.empty_like(x), torch.empty_like(x)
    thr = (0.9, 0.5, 3.0)

    def step():
        ops.fused_step(x, model_out, coef, out=out, hist_out=hist_out, threshold=thr, backend="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for scale in (1.0, -0.5):
        coef.mul_(scale)
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_m = reference.fused_step(x.double(), model_out.double(), coef, threshold=True, thr_ratio=thr[0],
                                              thr_min=thr[1], thr_max=thr[2])
        assert rel_err(out, ref_out) < 1e-5 and rel_err(hist_out, ref_m) < 1e-5


def _mixed_case(shape, dtype, seed, nhist=2, per_sample=False):
    """Half inputs with float32 history (`ops.history_dtype`), values kept away from zero-scale terms."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(dt, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dt).to(DEVICE)

    x, model_out, noise = rnd(dtype), rnd(dtype, 2.0), rnd(dtype)
    hist = [rnd(torch.float32) for _ in range(nhist)]
    rows = shape[0] if per_sample else 1
    coef = (torch.rand(rows, L.NCOEF, generator=gen, dtype=torch.float64) * 2 - 1) * 1.5
    for j, slot in enumerate(L.C_SLOTS[1:]):
        coef[:, slot] *= nhist > j
    return x, model_out, noise, hist, (coef if per_sample else coef[0]).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_history_layouts(dtype):
    """float32 history with half x through the layouts the op takes: non-contiguous history in and out, out
    aliasing x, per-sample rows with n not a multiple of 16 (unvectorized path), history read but not written
    and written but not read. m is stored from float32 arithmetic, never rounded to x's dtype on the way."""
    thr = (0.7, 0.05, 3.0)
    eps = torch.finfo(dtype).eps
    for nhist, write, per_sample, thresh, alias in ((3, True, True, True, True), (1, True, False, False, False),
                                                    (0, True, False, True, False), (2, False, True, False, True)):
        x, model_out, noise, hist, coef = _mixed_case((3, 5, 12), dtype, seed=7 + nhist, nhist=nhist,
                                                      per_sample=per_sample)
        hist = [h.transpose(1, 2).contiguous().transpose(1, 2) for h in hist]  # same values, strided
        ref_out, ref_m = reference.fused_step(
            x.double(), model_out.double(), coef, None, None, *[h.double() for h in hist] + [None] * (3 - nhist),
            noise.double(), L.CFG_NONE, thresh, *(thr if thresh else (0.0, 1.0, 1.0)))
        big = torch.full((3, 5, 24), math.nan, dtype=torch.float32, device=DEVICE)
        hist_out = big[:, :, ::2] if write else None  # a strided float32 slot
        out = x if alias else torch.full_like(x, math.nan)
        ops.fused_step(x, model_out, coef, out=out, hist_out=hist_out, hist=hist, noise=noise,
                       threshold=thr if thresh else None, backend="triton")
        what = f"nhist={nhist} write={write} per_sample={per_sample} thr={thresh} alias={alias}"
        assert out.dtype == dtype
        assert rel_err(out, ref_out) <= 2 * eps, what
        if write:
            assert hist_out.dtype == torch.float32
            assert rel_err(hist_out, ref_m) < 1e-5, what  # far below eps(dtype): no rounding to x's dtype
            assert bool(torch.isnan(big[:, :, 1::2]).all()), f"wrote outside the strided hist_out view ({what})"


if triton_backend.why_unavailable(torch.device(DEVICE)) is None:
    import triton
    import triton.language as tl

    from dpm_kernels.backends.triton_math import to_storage

    @triton.jit
    def _round_kernel(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + offs, to_storage(tl.load(src + offs, mask=offs < n), dst.dtype.element_ty), mask=offs < n)


def test_bfloat16_stores_round_to_nearest_even():
    """Stores to bfloat16 round like the GPU (and torch): to nearest, ties to even. The Triton 3.9 interpreter's
    own float32 -> bfloat16 conversion truncates; `triton_math.to_storage` rounds under the interpreter."""
    gen = torch.Generator().manual_seed(5)
    bits = torch.randint(-(1 << 31), 1 << 31, (4096,), generator=gen, dtype=torch.int64)
    low = torch.tensor([0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=torch.int64)  # ties, just below/above
    high = torch.tensor([0x3F80, 0x3F81, 0x7F7F, 0xFF7F, 0x0000, 0x8000, 0x0001, 0x807F, 0x7F80], dtype=torch.int64)
    edge = (high[:, None] << 16 | low[None, :]).reshape(-1)  # near 1, max finite (-> inf), zeros, subnormals
    v = torch.cat([bits, edge]).to(torch.int32).view(torch.float32)
    v = torch.cat([v, torch.tensor([math.inf, -math.inf, math.nan, 3.0e38, -3.3895e38])]).to(DEVICE)
    got = torch.empty(v.shape, dtype=torch.bfloat16, device=DEVICE)
    sel.launch(_round_kernel, (triton.cdiv(v.numel(), 1024),), v, got, v.numel(), BLOCK=1024)
    want = v.to(torch.bfloat16)
    same = (got.view(torch.int16) == want.view(torch.int16)) | (torch.isnan(got) & torch.isnan(want))
    assert bool(same.all()), f"{int((~same).sum())} values rounded differently, e.g. {v[~same][:4].tolist()}"


@pytest.mark.skipif(DEVICE != "cuda", reason="torch.compile over a triton_op needs a GPU")
@pytest.mark.parametrize("path", ["none", "small", "multi"])
def test_torch_compile_fullgraph_traces_the_step(path, monkeypatch):
    """Inductor generates the launches of every kernel of the op (plain step, and both select paths, with an
    infinite clamp bound whose float64 bits exceed 32 bits) and the compiled step equals the eager one bit for bit."""
    if path == "multi":
        monkeypatch.setattr(sel, "SMALL_MAX_N", 0)
    thr = None if path == "none" else (0.995, 1.0, math.inf)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 64, 64, generator=gen).to(DEVICE)
    m = torch.randn(2, 4, 64, 64, generator=gen).to(DEVICE)
    h = torch.randn(2, 4, 64, 64, generator=gen).to(DEVICE)
    coef = torch.zeros(L.NCOEF, dtype=torch.float64)
    for col, v in ((L.GUIDE, 1.0), (L.PX, 1.3), (L.PM, -0.7), (L.QM, 1.0), (L.A, 0.9), (L.C0, 0.2), (L.C1, -0.1)):
        coef[col] = v
    coef = coef.to(DEVICE)

    def step(x, m, h, coef):
        out, slot = torch.empty_like(x), torch.empty_like(x)
        ops.fused_step(x, m, coef, out=out, hist_out=slot, hist=[h], threshold=thr, backend="triton")
        return out, slot

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(x, m, h, coef)
    want = step(x, m, h, coef)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_op_declares_every_kernel_it_launches():
    """torch keys its compile caches on the kernels a triton_op declares; ours launch through a helper that
    torch's source scan cannot follow, so the backend declares them itself."""
    from torch._library import triton as library_triton

    from dpm_kernels.backends import triton_kernels

    triton_backend.why_unavailable(torch.device(DEVICE))  # registers the op
    declared = library_triton.get_triton_kernels_for_op(f"{ops.NAMESPACE}::{triton_backend.OP_NAME}")
    for k in (triton_kernels._step_kernel, sel._select_small, sel._hist_pass, sel._finalize):
        assert any(d is k for d in declared), k


def test_eager_steps_skip_the_custom_op_dispatch():
    """A Python custom op's dispatcher round trip costs ~80 us a call on this project's CPU (the C++ op: 8 us with its
    whole step), more than an eager step's own host work: eager steps call the op's Python implementation directly,
    with the same result; code that torch.compile traces keeps the op (test_torch_compile_fullgraph_traces_the_step)."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(3)
    x, m, h = (torch.randn(2, 3, 8, 8, generator=gen).to(DEVICE) for _ in range(3))
    coef = torch.zeros(L.NCOEF, dtype=torch.float64)
    for col, v in ((L.PX, 1.3), (L.PM, -0.7), (L.QM, 1.0), (L.A, 0.9), (L.C0, 0.2), (L.C1, -0.1)):
        coef[col] = v
    coef = coef.to(DEVICE)
    step = ops.bind("triton", torch.device(DEVICE))
    out, slot = torch.empty_like(x), torch.empty_like(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(x, m, coef, out, slot, h)
    names = {e.key for e in prof.key_averages()}
    assert f"{ops.NAMESPACE}::{triton_backend.OP_NAME}" not in names, sorted(names)
    want, want_slot = torch.empty_like(x), torch.empty_like(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # the op itself, for comparison: it is dispatched
        torch.ops.dpm_kernels.fused_step_triton(x, m, None, None, h, None, None, None, coef, 0, False, 0.0, 1.0, 1.0,
                                                want, want_slot)
    assert f"{ops.NAMESPACE}::{triton_backend.OP_NAME}" in {e.key for e in prof.key_averages()}
    assert torch.equal(out, want) and torch.equal(slot, want_slot)
