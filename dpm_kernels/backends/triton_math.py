"""The per-element math of a fused step in Triton: `csrc/dpm_math.h`, function for function.

Every @triton.jit helper here has the C++ twin of the same name (`guided`, `guided3`, `convert`, `threshold`,
`combine`, `add_term`, `lerp_torch`, `threshold_scale`, `abs_key`, `key_value`, `load_coef`), written in the same order
of operations so the Triton, CUDA and CPU kernels round identically where the hardware lets them. Things
the header gets from C++ that Triton spells differently:

- the arithmetic type T is a constexpr flag `F64` (float64 tensors) instead of a template parameter (each
  kernel derives `ACC` from it): a flag, not a `tl.dtype` argument, because dtype-valued kernel arguments are
  awkward for torch.compile's kernel capture;
- `a / b` in float32 lowers to the approximate `div.full.f32` on NVIDIA GPUs, while nvcc's `/` is IEEE
  (`div.rn`), so `div_` calls `tl.math.div_rn`; float64 `/` is already IEEE;
- `a * b + c` may contract to an FMA on the GPU (Triton 3.6-3.9 fuse by default; 3.10 stops,
  TRITON_DEFAULT_FP_FUSION), unlike the C++ kernels (CPU: no FMA; CUDA: built with -fmad=false): within a
  rounding of the terms either way, and the select and the update compute y with the same code, so they
  contract it alike. (`enable_fp_fusion=False` is a launch option that torch.compile's capture of user
  kernels does not pass through, so it is not used);
- `min_`/`max_` are `tl.where` on the same comparison as the header, so NaN propagates the same way
  (torch.minimum/maximum semantics for a NaN y; `tl.minimum` would not promise that);
- radix-select keys are signed integers with the sign bit cleared (int32 for float, int64 for double):
  non-negative, so arithmetic shifts equal the header's logical ones and no unsigned types are needed.

`convert_loaded` is the one place the select kernels (through `load_converted`) and the update kernel compute y,
so both see the same bits (the select recomputes y from the inputs in every pass instead of storing it).

`to_storage` (no C++ twin: nvcc's __float2bfloat16_rn and Triton's compiled `.to` both round to nearest
even) stores through the Triton interpreter rounded the way a GPU rounds: the interpreter of Triton 3.9
converts float32 to bfloat16 by truncating the mantissa, which over a 20-step bfloat16 sampling loop
drifts ~10x farther from the float32 run than round-to-nearest-even does. Compiled kernels are unchanged.
"""

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .. import layout as L

# Coefficient indices as Triton compile-time constants (globals must be constexpr inside @triton.jit).
GUIDE: tl.constexpr = tl.constexpr(L.GUIDE)
PX: tl.constexpr = tl.constexpr(L.PX)
PM: tl.constexpr = tl.constexpr(L.PM)
QX: tl.constexpr = tl.constexpr(L.QX)
QM: tl.constexpr = tl.constexpr(L.QM)
A: tl.constexpr = tl.constexpr(L.A)
C0: tl.constexpr = tl.constexpr(L.C0)
C1: tl.constexpr = tl.constexpr(L.C1)
C2: tl.constexpr = tl.constexpr(L.C2)
CN: tl.constexpr = tl.constexpr(L.CN)
C3: tl.constexpr = tl.constexpr(L.C3)
GUIDE2: tl.constexpr = tl.constexpr(L.GUIDE2)
NCOEF: tl.constexpr = tl.constexpr(L.NCOEF)
CFG_PAIR: tl.constexpr = tl.constexpr(L.CFG_PAIR)
CFG_STACKED: tl.constexpr = tl.constexpr(L.CFG_STACKED)
CFG_STACKED3: tl.constexpr = tl.constexpr(L.CFG_STACKED3)


@triton.jit
def load_coef(row, F64: tl.constexpr):
    """One float64 coefficient row in row order, each entry rounded once to the arithmetic type (scalar loads;
    the compiler drops those a kernel does not use)."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    return (
        tl.load(row + GUIDE).to(ACC), tl.load(row + PX).to(ACC), tl.load(row + PM).to(ACC),
        tl.load(row + QX).to(ACC), tl.load(row + QM).to(ACC), tl.load(row + A).to(ACC),
        tl.load(row + C0).to(ACC), tl.load(row + C1).to(ACC), tl.load(row + C2).to(ACC), tl.load(row + CN).to(ACC),
        tl.load(row + C3).to(ACC), tl.load(row + GUIDE2).to(ACC),
    )


# True when the kernels are defined under the Triton interpreter (TRITON_INTERPRET=1 at import): decided at
# definition time, like triton.jit's own choice; a compile-time constant inside the kernels.
INTERPRETED: tl.constexpr = tl.constexpr(isinstance(load_coef, InterpretedFunction))


@triton.jit
def rne_bf16(v):
    """float32 v rounded to the nearest bfloat16, ties to even (NaN stays NaN), by integer arithmetic."""
    bits = v.to(tl.uint32, bitcast=True)
    r = bits + 0x7FFF + ((bits >> 16) & 1)
    r = tl.where(v != v, bits | 0x400000, r)  # a NaN's payload must not carry into the sign bit
    return (r >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_storage(v, DST: tl.constexpr):
    """v (the arithmetic type) in a tensor's storage type DST, rounded to nearest even as on the GPU."""
    if INTERPRETED:
        if DST == tl.bfloat16:
            return rne_bf16(v.to(tl.float32))
    return v.to(DST)


@triton.jit
def from_bits(high, low, F64: tl.constexpr):
    """A host float passed as the two signed 32-bit halves of its float64 bits (`triton_select.f64_bits`), in T."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    bits = (tl.cast(high, tl.int64) << 32) | tl.cast(tl.cast(low, tl.int32).to(tl.uint32), tl.int64)
    return bits.to(tl.float64, bitcast=True).to(ACC)


@triton.jit
def min_(a, b):
    return tl.where(b < a, b, a)


@triton.jit
def max_(a, b):
    return tl.where(a < b, b, a)


@triton.jit
def div_(a, b):
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.math.div_rn(a, b)


@triton.jit
def guided(uncond, cond, g):
    return uncond + g * (cond - uncond)


@triton.jit
def guided3(uncond, cond, perturbed, g, g2):
    return guided(uncond, cond, g) + g2 * (cond - perturbed)


@triton.jit
def convert(x_eval, raw, px, pm):
    return px * x_eval + pm * raw


@triton.jit
def threshold(x_eval, y, s, qx, qm):
    clipped = div_(min_(max_(y, -s), s), s)
    return qx * x_eval + qm * clipped


@triton.jit
def combine(x, m, a, c0):
    return a * x + c0 * m


@triton.jit
def add_term(acc, c, v):
    return acc + c * v


@triton.jit
def lerp_torch(lo, hi, w):
    """w: the float64 weight; the branch is on w, and w and 1 - w are each rounded to lo's type from float64."""
    wt = w.to(lo.dtype)
    w1 = (1.0 - w).to(lo.dtype)
    return tl.where(w < 0.5, lo + wt * (hi - lo), hi - (hi - lo) * w1)


@triton.jit
def threshold_scale(q, lo, hi):
    return min_(max_(q, lo), hi)


@triton.jit
def abs_key(v):
    """The bits of |v| as a non-negative integer, monotone in |v| (NaN above +inf, as torch.sort)."""
    if v.dtype == tl.float64:
        return v.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
    else:
        return v.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def key_value(k):
    if k.dtype == tl.int64:
        return k.to(tl.float64, bitcast=True)
    else:
        return k.to(tl.float32, bitcast=True)


@triton.jit
def convert_loaded(xe, mo_ptr, mc_ptr, idx, mask, cond_off, g, g2, px, pm, CFG: tl.constexpr, ACC: tl.constexpr):
    """y at flat offsets idx from an already loaded x_eval: the raw output loaded, guided, then converted."""
    raw = tl.load(mo_ptr + idx, mask=mask, other=0.0).to(ACC)
    if CFG == CFG_PAIR:
        raw = guided(raw, tl.load(mc_ptr + idx, mask=mask, other=0.0).to(ACC), g)
    elif CFG == CFG_STACKED:
        raw = guided(raw, tl.load(mo_ptr + cond_off + idx, mask=mask, other=0.0).to(ACC), g)
    elif CFG == CFG_STACKED3:
        cond = tl.load(mo_ptr + cond_off + idx, mask=mask, other=0.0).to(ACC)
        raw = guided3(raw, cond, tl.load(mo_ptr + 2 * cond_off + idx, mask=mask, other=0.0).to(ACC), g, g2)
    return convert(xe, raw, px, pm)


@triton.jit
def load_converted(mo_ptr, mc_ptr, xe_ptr, idx, mask, cond_off, g, g2, px, pm, CFG: tl.constexpr,
                   F64: tl.constexpr):
    """(x_eval, y) at flat offsets idx: guidance then conversion, in the arithmetic type.

    cond_off: element offset of the conditional batch of a stacked model_out (B * n; the perturbed batch of a
    stacked3 one follows at 2 * cond_off).
    """
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    xe = tl.load(xe_ptr + idx, mask=mask, other=0.0).to(ACC)
    return xe, convert_loaded(xe, mo_ptr, mc_ptr, idx, mask, cond_off, g, g2, px, pm, CFG, ACC)
