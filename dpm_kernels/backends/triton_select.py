"""Dynamic thresholding's per-sample quantile of |y| on the GPU: radix select, no sort, no host sync.

y is the converted model output (`triton_math.load_converted`), recomputed from the inputs in every pass so
every pass and the update kernel see the same bits. Keys are the bits of |y| (`abs_key`): 31 significant
bits for float32 arithmetic, 63 for float64, consumed 8 at a time from the top, so NPASS = 4 or 8
histogram passes. torch.quantile 'linear' needs order statistics k and kh = min(k + 1, n - 1); (k, w) come
from `reference.quantile_rank` on the host (they depend only on n and the ratio).

State after each pass, derived from that pass's 256-bin histogram of the keys still under the prefix:
- `pre`, `r`: the bits of key k chosen so far and k's rank among the keys under that prefix;
- `hs`: 0 while kh shares k's prefix (its rank is r + dlt, dlt = kh - k), 1 right after they part (kh is then
  the smallest key under its own prefix `hpre`: one masked min in the next pass finds it), 2 once `hkey` is
  known. Ties need nothing special: the histogram counts them; NaN keys sort above inf like torch.sort.

Two regimes, same math (`_digit_step`):
- small n (or many samples): `_select_small`, one program per sample loops over its sample NPASS times,
  keeps the histogram in registers and writes s: the whole thresholded step is 2 launches.
- huge n: per pass one launch of `_hist_pass` over (sample, chunk) programs folded into grid axis 0 (no
  65535 limit); each program replays the earlier passes from a small int64 workspace [B, NPASS, 257]
  (256 bins + the encoded min), then adds its chunk's histogram with relaxed atomics (ordering between
  passes comes from the launches themselves, on one stream). `_finalize` replays all passes and writes s.
  Launches: 1 memset + NPASS + 1, all sizes fixed by shapes, so the sequence is CUDA-graph capturable.
"""

import struct

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.interpreter import InterpretedFunction

from . import reference
from .triton_math import abs_key, from_bits, key_max, key_value, lerp_torch, load_coef, load_converted, threshold_scale

NBINS: tl.constexpr = tl.constexpr(256)
WS_ROW: tl.constexpr = tl.constexpr(257)  # one pass in the workspace: 256 counts + KEY_MAX - min(kh candidates)

# Small path: one program per sample. 16 warps x 8 elements a thread keeps ~64 KB of loads in flight per
# SM (bf16: one 16-byte vector per thread per tensor), the most one program can do for bandwidth.
SMALL_BLOCK, SMALL_WARPS = 4096, 16
# Huge path: 2048-element blocks (8 warps x 8 elements), 16 blocks per program: n / 32768 programs per
# sample, at most 257 atomics each (zero bins skipped), so atomics stay far below the data traffic.
PASS_BLOCK, PASS_ITERS, PASS_WARPS = 2048, 16, 8
SMALL_MAX_N = 1 << 17  # above this a single program per sample is slower than NPASS + 2 launches


def launch(kernel, grid, *args, **meta) -> None:
    """Every launch of this backend goes through here: one place to count or trace them (tests do)."""
    if not isinstance(kernel, InterpretedFunction):  # wrap_triton rejects the interpreter's kernels
        kernel = wrap_triton(kernel)
    kernel[grid](*args, **meta)


def f64_bits(v: float) -> int:
    """A Python float as the int64 of its float64 bits: Triton would round a float argument to fp32."""
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


@triton.jit
def _digit_step(h, pre, r, hs, hpre, hkey, dlt, last):
    """Consume one digit: h [256] int64 counts the keys under `pre` by their next 8 bits."""
    bins = tl.arange(0, NBINS)
    cum = tl.cumsum(h, 0)
    d = tl.minimum(tl.sum((cum <= r).to(tl.int32), 0), 255)  # bins wholly below rank r
    dh = tl.minimum(tl.sum((cum <= r + dlt).to(tl.int32), 0), 255)
    below = tl.sum(tl.where(bins < d, h, 0), 0)
    split = (hs == 0) & (dh != d)
    cand = (pre << 8) | dh.to(pre.dtype)
    hs = tl.where(split, tl.where(last, 2, 1), hs)
    hpre = tl.where(split, cand, hpre)
    hkey = tl.where(split & last, cand, hkey)  # parted at the last digit: kh's key is complete
    return (pre << 8) | d.to(pre.dtype), r - below, hs, hpre, hkey


@triton.jit
def _sweep(mo_ptr, mc_ptr, xe_ptr, base, lo, hi, cond_off, g, px, pm, pre, hpre, want_min, sh, hsh,
           CFG: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of digit (key >> sh) & 255 over keys with key >> hsh == pre, for elements [lo, hi) of the
    sample at `base`; with want_min also the smallest key with key >> hsh == hpre."""
    h = tl.zeros([NBINS], tl.int32)
    miss = tl.zeros([], tl.int32)
    kmax = key_max(F64)
    hmin = kmax
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < hi
        _, y = load_converted(mo_ptr, mc_ptr, xe_ptr, base + offs, inb, cond_off, g, px, pm, CFG, F64)
        key = abs_key(y)
        top = key >> hsh
        m = inb & (top == pre)
        # tl.histogram has no mask argument before Triton 3.4(ish): count the others in bin 0, subtract below
        h += tl.histogram(tl.where(m, (key >> sh) & 0xFF, 0).to(tl.int32), NBINS)
        miss += tl.sum((m == 0).to(tl.int32), 0)
        if want_min:
            hmin = tl.minimum(hmin, tl.min(tl.where(inb & (top == hpre), key, kmax), 0))
    h -= tl.where(tl.arange(0, NBINS) == 0, miss, 0)
    return h, hmin


@triton.jit
def _init_state(k, F64: tl.constexpr):
    zero = key_max(F64) * 0
    return zero, tl.cast(k, tl.int64), tl.zeros([], tl.int32), zero, zero


@triton.jit
def _replay(ws, npass, k, dlt, F64: tl.constexpr, NPASS: tl.constexpr):
    """The select state after passes 0..npass-1, from one sample's workspace rows."""
    pre, r, hs, hpre, hkey = _init_state(k, F64)
    kmax = key_max(F64)
    for j in range(npass):
        row = ws + j * WS_ROW
        got = tl.load(row + NBINS)  # KEY_MAX - min, written in pass j when kh parted in pass j - 1
        hkey = tl.where(hs == 1, (kmax - got).to(hkey.dtype), hkey)
        hs = tl.where(hs == 1, 2, hs)
        h = tl.load(row + tl.arange(0, NBINS))
        pre, r, hs, hpre, hkey = _digit_step(h, pre, r, hs, hpre, hkey, dlt, j == NPASS - 1)
    return pre, r, hs, hpre, hkey


@triton.jit
def _scale(pre, hs, hkey, w_bits, lo_bits, hi_bits, F64: tl.constexpr):
    """s = threshold_scale(lerp_torch(v[k], v[kh], w), lo, hi) from the final keys."""
    hkey = tl.where(hs == 0, pre, hkey)
    q = lerp_torch(key_value(pre), key_value(hkey), from_bits(w_bits, F64))
    return threshold_scale(q, from_bits(lo_bits, F64), from_bits(hi_bits, F64))


@triton.jit(do_not_specialize=["k", "dlt", "w_bits", "lo_bits", "hi_bits"])
def _select_small(mo_ptr, mc_ptr, xe_ptr, coef_ptr, scale_ptr, n, cond_off, k, dlt, w_bits, lo_bits, hi_bits,
                  CFG: tl.constexpr, PER_SAMPLE: tl.constexpr, F64: tl.constexpr, NPASS: tl.constexpr,
                  KEY_BITS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    g, px, pm, _, _, _, _, _, _, _ = load_coef(coef_ptr + b * PER_SAMPLE * 10, F64)
    base = b.to(tl.int64) * n
    pre, r, hs, hpre, hkey = _init_state(k, F64)
    for p in range(NPASS):
        sh = (NPASS - 1 - p) * 8
        h, hmin = _sweep(mo_ptr, mc_ptr, xe_ptr, base, 0, n, cond_off, g, px, pm, pre, hpre, hs == 1, sh,
                         tl.minimum(sh + 8, KEY_BITS), CFG, F64, BLOCK)
        hkey = tl.where(hs == 1, hmin, hkey)
        hs = tl.where(hs == 1, 2, hs)
        pre, r, hs, hpre, hkey = _digit_step(h.to(tl.int64), pre, r, hs, hpre, hkey, dlt, p == NPASS - 1)
    tl.store(scale_ptr + b, _scale(pre, hs, hkey, w_bits, lo_bits, hi_bits, F64))


@triton.jit(do_not_specialize=["k", "dlt", "p"])
def _hist_pass(mo_ptr, mc_ptr, xe_ptr, coef_ptr, ws_ptr, n, nchunks, cond_off, k, dlt, p,
               CFG: tl.constexpr, PER_SAMPLE: tl.constexpr, F64: tl.constexpr, NPASS: tl.constexpr,
               KEY_BITS: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // nchunks
    c = pid - b * nchunks
    g, px, pm, _, _, _, _, _, _, _ = load_coef(coef_ptr + b * PER_SAMPLE * 10, F64)
    ws = ws_ptr + b.to(tl.int64) * (NPASS * WS_ROW)
    pre, r, hs, hpre, hkey = _replay(ws, p, k, dlt, F64, NPASS)
    sh = (NPASS - 1 - p) * 8
    lo = c.to(tl.int64) * CHUNK
    hi = tl.minimum(lo + CHUNK, n)
    h, hmin = _sweep(mo_ptr, mc_ptr, xe_ptr, b.to(tl.int64) * n, lo, hi, cond_off, g, px, pm, pre, hpre, hs == 1,
                     sh, tl.minimum(sh + 8, KEY_BITS), CFG, F64, BLOCK)
    row = ws + p * WS_ROW
    tl.atomic_add(row + tl.arange(0, NBINS), h.to(tl.int64), mask=h != 0, sem="relaxed")
    if hs == 1:  # max of KEY_MAX - key is the min key; the zeroed slot means "none yet"
        tl.atomic_max(row + NBINS, (key_max(F64) - hmin).to(tl.int64), sem="relaxed")


@triton.jit(do_not_specialize=["k", "dlt", "w_bits", "lo_bits", "hi_bits"])
def _finalize(ws_ptr, scale_ptr, k, dlt, w_bits, lo_bits, hi_bits, F64: tl.constexpr, NPASS: tl.constexpr):
    b = tl.program_id(0)
    pre, r, hs, hpre, hkey = _replay(ws_ptr + b.to(tl.int64) * (NPASS * WS_ROW), NPASS, k, dlt, F64, NPASS)
    tl.store(scale_ptr + b, _scale(pre, hs, hkey, w_bits, lo_bits, hi_bits, F64))


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: pretend H100 so path choices match the GPU's


def select_scale(model_out: torch.Tensor, model_cond: torch.Tensor | None, xe: torch.Tensor, coef: torch.Tensor,
                 cfg: int, ratio: float, lo: float, hi: float, scale: torch.Tensor, *, small: bool | None = None,
                 block: int | None = None, iters: int | None = None) -> None:
    """scale[b] = clamp(quantile(|y_b|, ratio), lo, hi) for contiguous [B, ...] inputs (y as the update sees it).

    scale: [B] in the arithmetic dtype. small/block/iters force the path and block sizes (tests).
    """
    nb = xe.shape[0]
    n = xe.numel() // nb
    f64 = xe.dtype == torch.float64
    npass, key_bits = (8, 63) if f64 else (4, 31)
    k, w = reference.quantile_rank(n, ratio)
    dlt = min(k + 1, n - 1) - k
    mc = model_cond if model_cond is not None else model_out
    common = dict(CFG=cfg, PER_SAMPLE=int(coef.dim() == 2), F64=f64, NPASS=npass, KEY_BITS=key_bits)
    if small is None:
        small = n <= SMALL_MAX_N or (nb >= sm_count(xe.device) and n < 2**31)
    if small:
        launch(_select_small, (nb,), model_out, mc, xe, coef, scale, n, nb * n, k, dlt, f64_bits(w), f64_bits(lo),
               f64_bits(hi), **common, BLOCK=block or SMALL_BLOCK, num_warps=SMALL_WARPS)
        return
    block = block or PASS_BLOCK
    chunk = block * (iters or PASS_ITERS)
    nchunks = triton.cdiv(n, chunk)
    ws = torch.zeros((nb, npass, 257), dtype=torch.int64, device=xe.device)
    for p in range(npass):
        launch(_hist_pass, (nb * nchunks,), model_out, mc, xe, coef, ws, n, nchunks, nb * n, k, dlt, p, **common,
               BLOCK=block, CHUNK=chunk, num_warps=PASS_WARPS)
    launch(_finalize, (nb,), ws, scale, k, dlt, f64_bits(w), f64_bits(lo), f64_bits(hi), F64=f64, NPASS=npass,
           num_warps=1)


def quantile_abs(v: torch.Tensor, ratio: float, **force) -> torch.Tensor:
    """Per-row torch.quantile(|v|, ratio, dim=1) of v [B, n] by the radix select (float32 for half inputs).

    Runs the select with y = 1 * v + 0 * 0 and unbounded clamping, so the result is the quantile itself.
    """
    from .. import layout as L

    v = v.contiguous()
    coef = torch.zeros(L.NCOEF, dtype=torch.float64, device=v.device)
    coef[L.PX] = 1.0
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    scale = torch.empty(v.shape[0], dtype=acc, device=v.device)
    if v.numel():
        select_scale(torch.zeros_like(v), None, v, coef, L.CFG_NONE, ratio, -float("inf"), float("inf"), scale,
                     **force)
    return scale
