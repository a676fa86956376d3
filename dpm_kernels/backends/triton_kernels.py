"""The fused update kernel and the launcher of a whole step (thresholding's select first, when asked).

`_step_kernel` does, per element, what `csrc/dpm_math.h` describes (see `triton_math`): load, guide, convert,
threshold with the sample's s, store m, combine, store out. One memory pass: reads x, model_out (x2 with guidance,
x3 with stacked3), x_eval (only when it is not x), the history entries given (each HAS_H* a compile-time flag: an
absent one costs no load), noise; writes hist_out and out. Bytes for n elements of size e: (tensors read + written)
* n * e, e.g. a multistep-2 step storing m moves 5 n e (x, model_out, hist1 in; out, hist_out out); with float32
history for float16/bfloat16 samples (`opdef.history_dtype`) the history tensors count 4 bytes an element:
2 n * 3 + 4 n * 2 = 14 n there. Thresholding adds the select's sweeps, each re-reading the 2-4 tensors y comes from
(x_eval or x, the 1-3 batches of model_out, model_cond; never the history): at most NPASS sweeps (4 for float32
arithmetic, 8 for float64), served from L2 after the first when a sample fits there.

Grid: samples and chunks folded into axis 0 (pid = b * nchunks + chunk), so neither B nor the chunk count
meets the 65535 limit of axes 1/2; each program reads its sample's float64 coefficient row (and s) once,
from device memory, so one captured CUDA graph replays any step. When nothing is per sample (one coefficient
row, no thresholding) the batch is one flat sample: no ragged tail per sample.

Block size: num_warps = 4 (128 threads) and 16-byte accesses (8 half / 4 float / 2 double elements per
thread per vector), 1 to 4 vectors per thread: BLOCK = 128 * vec * {1, 2, 4}, the largest that still gives
>= 2 programs per SM, so small latents spread over the GPU while large ones amortise the coefficient loads.
vec counts x's elements. With float32 history and half x a thread's 8-element group of history is two
16-byte vectors (Triton loads it so, in x's layout); stores are capped at 16 bytes a thread per instruction,
so Triton re-lays m out through shared memory (4 floats a thread) before the float32 hist_out store: a few KB
of shared traffic per program, small against the global bytes. Checked by compiling offline for sm_80/sm_90
(Triton 3.9): 16-byte global loads and stores for every tensor; at BLOCK 4096 up to 168 registers a thread
with float32 history (thresholded, sm_90) against 128 with half history, no spills.
Vectorization of the per-sample path needs the sample stride n to be a multiple of 16 (Triton specializes on
that), as it is for every latent shape; other n run with scalar accesses, correct but slower (the flat path
starts at 0 and always vectorizes). Offsets are int64 everywhere.
"""

import torch
import triton
import triton.language as tl

from . import triton_select as sel
from .triton_math import NCOEF, add_term, combine, convert_loaded, load_coef, threshold, to_storage

STEP_WARPS = 4


@triton.jit
def _step_kernel(x_ptr, mo_ptr, mc_ptr, xe_ptr, h1_ptr, h2_ptr, h3_ptr, z_ptr, coef_ptr, scale_ptr, out_ptr, ho_ptr,
                 n, nchunks, cond_off,
                 CFG: tl.constexpr, HAS_XE: tl.constexpr, HAS_H1: tl.constexpr, HAS_H2: tl.constexpr,
                 HAS_H3: tl.constexpr, HAS_Z: tl.constexpr, HAS_HO: tl.constexpr, THRESH: tl.constexpr,
                 PER_SAMPLE: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    b = pid // nchunks
    c = pid - b * nchunks
    g, px, pm, qx, qm, a, c0, c1, c2, cn, c3, g2 = load_coef(coef_ptr + b * PER_SAMPLE * NCOEF, F64)
    offs = c.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    idx = b.to(tl.int64) * n + offs

    xv = tl.load(x_ptr + idx, mask=mask, other=0.0).to(ACC)
    xe = xv
    if HAS_XE:
        xe = tl.load(xe_ptr + idx, mask=mask, other=0.0).to(ACC)
    y = convert_loaded(xe, mo_ptr, mc_ptr, idx, mask, cond_off, g, g2, px, pm, CFG, ACC)
    if THRESH:
        y = threshold(xe, y, tl.load(scale_ptr + b), qx, qm)
    # History may be float32 while x is float16/bfloat16 (`opdef.history_dtype`): every load converts from its
    # own pointer's element type, and m is stored in hist_out's, rounded once from the arithmetic type.
    if HAS_HO:
        tl.store(ho_ptr + idx, to_storage(y, ho_ptr.dtype.element_ty), mask=mask)
    acc = combine(xv, y, a, c0)
    if HAS_H1:
        acc = add_term(acc, c1, tl.load(h1_ptr + idx, mask=mask, other=0.0).to(ACC))
    if HAS_H2:
        acc = add_term(acc, c2, tl.load(h2_ptr + idx, mask=mask, other=0.0).to(ACC))
    if HAS_H3:
        acc = add_term(acc, c3, tl.load(h3_ptr + idx, mask=mask, other=0.0).to(ACC))
    if HAS_Z:
        acc = add_term(acc, cn, tl.load(z_ptr + idx, mask=mask, other=0.0).to(ACC))
    tl.store(out_ptr + idx, to_storage(acc, out_ptr.dtype.element_ty), mask=mask)


def step_block(total: int, elem_size: int, device: torch.device) -> int:
    """BLOCK for the update: 1-4 sixteen-byte vectors of x per thread, >= 2 programs per SM when there is work.

    elem_size is x's: float32 history with half x makes each history vector two 16-byte accesses, not a
    smaller block (x's accesses stay 16 bytes wide)."""
    vec = 128 * (16 // elem_size)
    block = 4 * vec
    while block > vec and triton.cdiv(total, block) < 2 * sel.sm_count(device):
        block //= 2
    return block


def fused_step(x, model_out, model_cond, x_eval, hist1, hist2, hist3, noise, coef, cfg: int, thr: bool, ratio: float,
               lo: float, hi: float, out, hist_out, **force) -> None:
    """One step on contiguous tensors (schema order; `ops.fused_step` has the argument docs).

    out may be x or x_eval itself; hist_out may be None. force: select path/block overrides (tests).
    """
    nb = x.shape[0]
    if x.numel() == 0:
        return
    n = x.numel() // nb
    f64 = x.dtype == torch.float64
    per_sample = coef.dim() == 2
    scale = None
    if thr:
        scale = torch.empty(nb, dtype=torch.float64 if f64 else torch.float32, device=x.device)
        sel.select_scale(model_out, model_cond, x if x_eval is None else x_eval, coef, cfg, ratio, lo, hi, scale,
                         **force)
    rows, cols = (nb, n) if (per_sample or thr) else (1, nb * n)
    block = step_block(x.numel(), x.element_size(), x.device)
    nchunks = triton.cdiv(cols, block)
    sel.launch(
        _step_kernel, (rows * nchunks,),
        x, model_out, model_cond if model_cond is not None else model_out, x_eval if x_eval is not None else x,
        hist1 if hist1 is not None else x, hist2 if hist2 is not None else x, hist3 if hist3 is not None else x,
        noise if noise is not None else x, coef, scale if scale is not None else coef, out,
        hist_out if hist_out is not None else out, cols, nchunks, nb * n,
        CFG=cfg, HAS_XE=x_eval is not None, HAS_H1=hist1 is not None, HAS_H2=hist2 is not None,
        HAS_H3=hist3 is not None, HAS_Z=noise is not None, HAS_HO=hist_out is not None, THRESH=thr,
        PER_SAMPLE=int(per_sample), F64=f64, BLOCK=block, num_warps=STEP_WARPS,
    )
