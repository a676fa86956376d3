"""Dynamic thresholding's per-sample quantile of |y| on the GPU: radix select, no sort, no host sync.

y is the converted model output (`triton_math.load_converted`), recomputed from the inputs in every pass so
every pass and the update kernel see the same bits. Keys are the bits of |y| (`abs_key`): 31 significant
bits for float32 arithmetic, 63 for float64, consumed 8 at a time from the top, so NPASS = 4 or 8
histogram passes. torch.quantile 'linear' needs order statistics k and kh = min(k + 1, n - 1); (k, w) come
from `reference.quantile_rank` on the host (they depend only on n and the ratio).

State after each pass, derived from that pass's 256-bin histogram of the keys still under k's prefix:
- `pre`, `r`: the bits of key k chosen so far and k's rank among the keys under that prefix;
- `ls`: 0 while digits of k are being chosen, 1 once k is alone under its prefix (one masked min in the next
  pass finds the rest of its bits and the remaining passes are skipped: float64 data of latent size is
  unique after 3-4 of its 8 digits; float32 usually needs all 4 sweeps anyway), 2 once `lkey` is known;
- `hs`: 0 while kh shares k's prefix (its rank is r + dlt, dlt = kh - k), 1 right after they part (kh is then
  the smallest key under its own prefix `hpre`: a masked min in the next pass), 2 once `hkey` is known.
Ties need nothing special (the histogram counts them; all-equal keys run all the digits); NaN keys sort
above inf like torch.sort.

Two regimes, same math (`_digit_step`):
- small n (or many samples): `_select_small`, one program per sample loops over its sample (at most NPASS
  times), keeps the histogram in registers and writes s: the whole thresholded step is 2 launches.
- huge n: per pass one launch of `_hist_pass` over (sample, chunk) programs folded into grid axis 0 (no
  65535 limit); each program takes the state its pass starts from out of a small int64 workspace
  [B, NPASS, WS_ROW_LEN] (one digit step from the previous pass's histogram, mins and starting state, which the
  previous pass's first chunk recorded), then adds its chunk's histogram with relaxed atomics (ordering
  between passes comes from the launches themselves, on one stream); once the keys are known, later passes
  return at once without reading data. `_finalize` applies the last pass and writes s.
  Launches: 1 memset + NPASS + 1 + the update, all fixed by shapes, so the sequence is CUDA-graph capturable.
"""

import functools
import struct
import threading

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.interpreter import InterpretedFunction

from .. import layout as L
from . import reference
from .triton_math import NCOEF, abs_key, from_bits, key_value, lerp_torch, load_coef, load_converted, threshold_scale

# One pass p in the int64 workspace: the pass's 256 counts, two min slots (KEY_MAX - min key, so that a zeroed
# slot reads "none yet" and atomic_max finds the min) and the state the pass started from (7 values).
_NBINS, _NSTATE = 256, 7
WS_ROW_LEN = _NBINS + 2 + _NSTATE  # int64 entries of one pass's workspace row
NBINS: tl.constexpr = tl.constexpr(_NBINS)
LMIN: tl.constexpr = tl.constexpr(_NBINS)  # min key under k's prefix (k pending)
HMIN: tl.constexpr = tl.constexpr(_NBINS + 1)  # min key under kh's prefix (kh pending)
STATE: tl.constexpr = tl.constexpr(_NBINS + 2)  # pre, r, ls, lkey, hs, hpre, hkey
WS_ROW: tl.constexpr = tl.constexpr(WS_ROW_LEN)

# Small path: one program per sample. 16 warps x 8 elements a thread keeps ~64 KB of loads in flight per
# SM (bf16: one 16-byte vector per thread per tensor), the most one program can do for bandwidth.
# Samples smaller than a block get the next power of two (at least 256): a 4096-lane block over n = 64 would
# run every histogram and barrier for 98% masked lanes (H100: 533 us -> 244 us at B = 4096, n = 64).
SMALL_BLOCK, SMALL_WARPS, SMALL_MIN_BLOCK = 4096, 16, 256
# Huge path: 2048-element blocks (8 warps x 8 elements), 16 blocks per program: n / 32768 programs per
# sample, at most 258 atomics each (zero bins skipped), so atomics stay far below the data traffic.
PASS_BLOCK, PASS_ITERS, PASS_WARPS = 2048, 16, 8
SMALL_MAX_N = 1 << 17  # above this a single program per sample is slower than NPASS + 2 launches


# The Triton interpreter patches triton.language module-wide while a kernel runs, so two threads interpreting
# at once break each other: interpreted launches take turns (compiled launches need no lock).
_interpreter_lock = threading.Lock()


def launch(kernel, grid, *args, **meta) -> None:
    """Every launch of this backend goes through here: one place to count or trace them (tests do)."""
    if isinstance(kernel, InterpretedFunction):  # (which wrap_triton rejects; nothing traces them anyway)
        with _interpreter_lock:
            kernel[grid](*args, **meta)
    else:
        wrap_triton(kernel)[grid](*args, **meta)


def f64_bits(v: float) -> tuple[int, int]:
    """A Python float as the high and low halves of its float64 bits, each a signed 32-bit int.

    Not a float argument: Triton would round it to fp32. Not one int64 either: Inductor's code generation for
    user kernels (torch 2.11) fails on Python ints beyond 32 bits ('int' object has no attribute 'xreplace').
    """
    u = struct.unpack("<Q", struct.pack("<d", float(v)))[0]
    s32 = lambda h: h - (1 << 32) if h >= (1 << 31) else h  # noqa: E731
    return s32(u >> 32), s32(u & 0xFFFFFFFF)


@triton.jit
def _init_state(k, F64: tl.constexpr):
    """(pre, r, ls, lkey, hs, hpre, hkey) before the first pass."""
    KEYT: tl.constexpr = tl.int64 if F64 else tl.int32
    zero = tl.zeros([], KEYT)
    none = tl.zeros([], tl.int32)
    return zero, tl.cast(k, tl.int64), none, zero, none, zero, zero


@triton.jit
def _digit_step(h, pre, r, ls, lkey, hs, hpre, hkey, dlt, last):
    """Consume one digit of key k (ls == 0): h [256] int64 counts the keys under `pre` by their next 8 bits."""
    bins = tl.arange(0, NBINS)
    cum = tl.cumsum(h, 0)
    le = cum <= r  # bins wholly below rank r
    d = tl.minimum(tl.sum(le.to(tl.int32), 0), 255)
    below = tl.sum(tl.where(le, h, 0), 0)
    cnt = tl.sum(tl.where(bins == d, h, 0), 0)
    dh = tl.minimum(tl.sum((cum <= r + dlt).to(tl.int32), 0), 255)
    split = (hs == 0) & (dh != d)  # k was the last key of its bin: kh is the first of the next non-empty one
    cand = (pre << 8) | dh.to(pre.dtype)
    hs = tl.where(split, tl.where(last, 2, 1), hs)
    hpre = tl.where(split, cand, hpre)
    hkey = tl.where(split & last, cand, hkey)
    pre = (pre << 8) | d.to(pre.dtype)
    # k alone under its prefix: the next sweep's min finds it, no more digits needed (cnt == 1 also implies
    # kh already parted, or kh == k)
    ls = tl.where(last, 2, tl.where(cnt == 1, 1, 0))
    lkey = tl.where(last, pre, lkey)
    return pre, r - below, ls, lkey, hs, hpre, hkey


@triton.jit
def _sweep(mo_ptr, mc_ptr, xe_ptr, base, lo, hi, cond_off, g, g2, px, pm, pre, hpre, ls, hs, sh, hsh,
           CFG: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over elements [lo, hi) of the sample at `base`. With ls == 0 the histogram of digit
    (key >> sh) & 255 over keys with key >> hsh == pre; with ls == 1 the smallest such key; with hs == 1 the
    smallest key with key >> hsh == hpre. Returns (h [256] int32, lo min, hi min)."""
    KEYT: tl.constexpr = tl.int64 if F64 else tl.int32
    KMAX: tl.constexpr = 0x7FFFFFFFFFFFFFFF if F64 else 0x7FFFFFFF  # the largest key: a NaN, all payload set
    lanes = tl.arange(0, BLOCK)
    h = tl.zeros([NBINS], tl.int32)
    miss = tl.zeros([BLOCK], tl.int32)
    lminv = tl.full([BLOCK], KMAX, KEYT)
    hminv = lminv
    for start in range(lo, hi, BLOCK):
        offs = start + lanes
        inb = offs < hi
        _, y = load_converted(mo_ptr, mc_ptr, xe_ptr, base + offs, inb, cond_off, g, g2, px, pm, CFG, F64)
        key = abs_key(y)
        top = key >> hsh
        mine = inb & (top == pre)
        if ls == 0:
            # tl.histogram has no mask before Triton 3.4(ish): the others count in bin 0, subtracted below
            h += tl.histogram(tl.where(mine, (key >> sh) & 0xFF, 0).to(tl.int32), NBINS)
            miss += (mine == 0).to(tl.int32)
        if ls == 1:
            lminv = tl.minimum(lminv, tl.where(mine, key, KMAX))
        if hs == 1:
            hminv = tl.minimum(hminv, tl.where(inb & (top == hpre), key, KMAX))
    lmin = tl.full([], KMAX, KEYT)
    hmin = tl.full([], KMAX, KEYT)
    if ls == 0:
        h -= tl.where(tl.arange(0, NBINS) == 0, tl.sum(miss, 0), 0)
    if ls == 1:
        lmin = tl.min(lminv, 0)
    if hs == 1:
        hmin = tl.min(hminv, 0)
    return h, lmin, hmin


@triton.jit
def _load_state(row, F64: tl.constexpr):
    KEYT: tl.constexpr = tl.int64 if F64 else tl.int32
    st = row + STATE
    return (tl.load(st).to(KEYT), tl.load(st + 1), tl.load(st + 2).to(tl.int32), tl.load(st + 3).to(KEYT),
            tl.load(st + 4).to(tl.int32), tl.load(st + 5).to(KEYT), tl.load(st + 6).to(KEYT))


@triton.jit
def _store_state(row, pre, r, ls, lkey, hs, hpre, hkey):
    st = row + STATE
    tl.store(st, pre.to(tl.int64))
    tl.store(st + 1, r)
    tl.store(st + 2, ls.to(tl.int64))
    tl.store(st + 3, lkey.to(tl.int64))
    tl.store(st + 4, hs.to(tl.int64))
    tl.store(st + 5, hpre.to(tl.int64))
    tl.store(st + 6, hkey.to(tl.int64))


@triton.jit
def _advance(row, dlt, last, F64: tl.constexpr):
    """The state after pass `row` ran: the state it started from, its mins and its histogram applied."""
    KMAX: tl.constexpr = 0x7FFFFFFFFFFFFFFF if F64 else 0x7FFFFFFF
    pre, r, ls, lkey, hs, hpre, hkey = _load_state(row, F64)
    lkey = tl.where(ls == 1, (KMAX - tl.load(row + LMIN)).to(lkey.dtype), lkey)
    ls = tl.where(ls == 1, 2, ls)
    hkey = tl.where(hs == 1, (KMAX - tl.load(row + HMIN)).to(hkey.dtype), hkey)
    hs = tl.where(hs == 1, 2, hs)
    if ls == 0:
        h = tl.load(row + tl.arange(0, NBINS))
        pre, r, ls, lkey, hs, hpre, hkey = _digit_step(h, pre, r, ls, lkey, hs, hpre, hkey, dlt, last)
    return pre, r, ls, lkey, hs, hpre, hkey


@triton.jit
def _scale(lkey, hs, hkey, w_h, w_l, lo_h, lo_l, hi_h, hi_l, F64: tl.constexpr):
    """s = threshold_scale(lerp_torch(v[k], v[kh], w), lo, hi) from the final keys (hs != 2: kh's key is k's)."""
    hkey = tl.where(hs == 2, hkey, lkey)
    q = lerp_torch(key_value(lkey), key_value(hkey), from_bits(w_h, w_l, True))  # the weight stays float64
    return threshold_scale(q, from_bits(lo_h, lo_l, F64), from_bits(hi_h, hi_l, F64))


@triton.jit(do_not_specialize=["k", "dlt", "w_h", "w_l", "lo_h", "lo_l", "hi_h", "hi_l"])
def _select_small(mo_ptr, mc_ptr, xe_ptr, coef_ptr, scale_ptr, n, cond_off, k, dlt, w_h, w_l, lo_h, lo_l, hi_h, hi_l,
                  CFG: tl.constexpr, PER_SAMPLE: tl.constexpr, F64: tl.constexpr, NPASS: tl.constexpr,
                  KEY_BITS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    g, px, pm, _, _, _, _, _, _, _, _, g2 = load_coef(coef_ptr + b * PER_SAMPLE * NCOEF, F64)
    base = b.to(tl.int64) * n
    pre, r, ls, lkey, hs, hpre, hkey = _init_state(k, F64)
    for p in range(NPASS):
        if (ls != 2) | (hs == 1):  # both keys known: the remaining passes are skipped
            sh = (NPASS - 1 - p) * 8
            h, lmin, hmin = _sweep(mo_ptr, mc_ptr, xe_ptr, base, tl.zeros([], tl.int64), n, cond_off, g, g2, px, pm,
                                   pre, hpre, ls, hs, sh, tl.minimum(sh + 8, KEY_BITS), CFG, F64, BLOCK)
            lkey = tl.where(ls == 1, lmin, lkey)
            ls = tl.where(ls == 1, 2, ls)
            hkey = tl.where(hs == 1, hmin, hkey)
            hs = tl.where(hs == 1, 2, hs)
            if ls == 0:
                pre, r, ls, lkey, hs, hpre, hkey = _digit_step(h.to(tl.int64), pre, r, ls, lkey, hs, hpre, hkey,
                                                               dlt, p == NPASS - 1)
    tl.store(scale_ptr + b, _scale(lkey, hs, hkey, w_h, w_l, lo_h, lo_l, hi_h, hi_l, F64))


@triton.jit(do_not_specialize=["k", "dlt", "p"])
def _hist_pass(mo_ptr, mc_ptr, xe_ptr, coef_ptr, ws_ptr, n, nchunks, cond_off, k, dlt, p,
               CFG: tl.constexpr, PER_SAMPLE: tl.constexpr, F64: tl.constexpr, NPASS: tl.constexpr,
               KEY_BITS: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // nchunks
    c = pid - b * nchunks
    ws = ws_ptr + b.to(tl.int64) * (NPASS * WS_ROW)
    row = ws + p * WS_ROW
    # Every program derives the state this pass starts from (one digit step from the previous pass's row);
    # the first chunk records it for the next pass, which then never replays further back.
    if p == 0:
        pre, r, ls, lkey, hs, hpre, hkey = _init_state(k, F64)
    else:
        pre, r, ls, lkey, hs, hpre, hkey = _advance(row - WS_ROW, dlt, False, F64)
    if c == 0:
        _store_state(row, pre, r, ls, lkey, hs, hpre, hkey)
    if (ls != 2) | (hs == 1):  # else this pass has nothing left to do: the launch ends at once
        g, px, pm, _, _, _, _, _, _, _, _, g2 = load_coef(coef_ptr + b * PER_SAMPLE * NCOEF, F64)
        sh = (NPASS - 1 - p) * 8
        lo = c.to(tl.int64) * CHUNK
        hi = tl.minimum(lo + CHUNK, n)
        h, lmin, hmin = _sweep(mo_ptr, mc_ptr, xe_ptr, b.to(tl.int64) * n, lo, hi, cond_off, g, g2, px, pm, pre,
                               hpre, ls, hs, sh, tl.minimum(sh + 8, KEY_BITS), CFG, F64, BLOCK)
        # relaxed: nothing in this launch reads these; the next launch on the stream sees them complete
        KMAX: tl.constexpr = 0x7FFFFFFFFFFFFFFF if F64 else 0x7FFFFFFF
        if ls == 0:
            tl.atomic_add(row + tl.arange(0, NBINS), h.to(tl.int64), mask=h != 0, sem="relaxed")
        if ls == 1:  # max of KEY_MAX - key is the min key; the zeroed slot reads as "none yet"
            tl.atomic_max(row + LMIN, (KMAX - lmin).to(tl.int64), sem="relaxed")
        if hs == 1:
            tl.atomic_max(row + HMIN, (KMAX - hmin).to(tl.int64), sem="relaxed")


@triton.jit(do_not_specialize=["dlt", "w_h", "w_l", "lo_h", "lo_l", "hi_h", "hi_l"])
def _finalize(ws_ptr, scale_ptr, dlt, w_h, w_l, lo_h, lo_l, hi_h, hi_l, F64: tl.constexpr, NPASS: tl.constexpr):
    b = tl.program_id(0)
    last_row = ws_ptr + b.to(tl.int64) * (NPASS * WS_ROW) + (NPASS - 1) * WS_ROW
    pre, r, ls, lkey, hs, hpre, hkey = _advance(last_row, dlt, True, F64)
    tl.store(scale_ptr + b, _scale(lkey, hs, hkey, w_h, w_l, lo_h, lo_l, hi_h, hi_l, F64))


@functools.cache
def _cuda_sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of the device (for the interpreter: an H100's, so path choices match the GPU's)."""
    return _cuda_sm_count(device.index) if device.type == "cuda" else 132


def _warps(block: int, most: int) -> int:
    """At least 8 elements a thread: (test-size) blocks smaller than the CTA would be replicated across warps."""
    return max(1, min(most, block // 256))


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
        block = block or max(SMALL_MIN_BLOCK, min(SMALL_BLOCK, triton.next_power_of_2(n)))
        launch(_select_small, (nb,), model_out, mc, xe, coef, scale, n, nb * n, k, dlt, *f64_bits(w), *f64_bits(lo),
               *f64_bits(hi), **common, BLOCK=block, num_warps=_warps(block, SMALL_WARPS))
        return
    block = block or PASS_BLOCK
    chunk = block * (iters or PASS_ITERS)
    nchunks = triton.cdiv(n, chunk)
    ws = torch.zeros((nb, npass, WS_ROW_LEN), dtype=torch.int64, device=xe.device)
    for p in range(npass):
        launch(_hist_pass, (nb * nchunks,), model_out, mc, xe, coef, ws, n, nchunks, nb * n, k, dlt, p, **common,
               BLOCK=block, CHUNK=chunk, num_warps=_warps(block, PASS_WARPS))
    launch(_finalize, (nb,), ws, scale, dlt, *f64_bits(w), *f64_bits(lo), *f64_bits(hi), F64=f64, NPASS=npass,
           num_warps=1)


def quantile_abs(v: torch.Tensor, ratio: float, **force) -> torch.Tensor:
    """Per-row torch.quantile(|v|, ratio, dim=1) of v [B, n] by the radix select (float32 for half inputs).

    Runs the select with v as an output that is already x0 (the planner's identity row: y = v) and unbounded
    clamping, so the result is the quantile itself.
    """
    from .. import coefficients as C
    from .. import planner as P

    v = v.contiguous()
    coef = torch.from_numpy(P.coefficient_rows(C.Point(1.0, 1.0, 0.0), P.IDENTITY_X0)).to(v.device)
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    scale = torch.empty(v.shape[0], dtype=acc, device=v.device)
    if v.numel():
        select_scale(v, None, torch.zeros_like(v), coef, L.CFG_NONE, ratio, -float("inf"), float("inf"), scale,
                     **force)
    return scale
