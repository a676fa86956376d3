"""The op's definition: the schema of ``dpm_kernels::fused_step``, its argument rules and its fake implementation;
and ``dpm_kernels::fused_step_functional``, the same step returning fresh ``(out, m)`` instead of writing them, the
form autograd can differentiate (`dpm_kernels.step_autograd` registers its kernel and backward formula).

This module defines and nothing else: it imports no backend, so the backends and the dispatcher
(`dpm_kernels.ops`) import it without cycles. Every implementation of the schema (the C++ CPU and CUDA kernels,
the Triton op, the PyTorch reference) refuses bad input by the rules of `check_step_args`: the C++ kernels by the
same rules written in C++ (`csrc/fused_step_checks.h`, same order, same exception types, messages starting with
the same argument name), the others by calling it. `tests/test_op_errors.py` runs one table of bad inputs against
every backend present, so the two copies cannot drift apart unnoticed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch._subclasses.fake_tensor import is_fake

from . import layout as L

NAMESPACE = "dpm_kernels"
SCHEMA = (
    "(Tensor x, Tensor model_out, Tensor? model_cond, Tensor? x_eval, Tensor? hist1, Tensor? hist2, Tensor? hist3, "
    "Tensor? noise, Tensor coef, int cfg, bool threshold, float thr_ratio, float thr_min, float thr_max, "
    "Tensor(a!) out, Tensor(b!)? hist_out) -> ()"
)
OP = "fused_step"
MUTATES = ("out", "hist_out")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HISTORY_ARGS = ("hist1", "hist2", "hist3", "hist_out")

# The functional form: autograd formulas attach only to ops that mutate nothing and return fresh tensors. `m_dtype`
# is the history dtype m is returned in; `backend` names the backend whose kernel computes it (`registry.CHOICES`).
FUNCTIONAL_OP = "fused_step_functional"
FUNCTIONAL_SCHEMA = (
    "(Tensor x, Tensor model_out, Tensor? model_cond, Tensor? x_eval, Tensor? hist1, Tensor? hist2, Tensor? hist3, "
    "Tensor? noise, Tensor coef, int cfg, bool threshold, float thr_ratio, float thr_min, float thr_max, "
    "ScalarType m_dtype, str backend) -> (Tensor out, Tensor m)"
)

_lib = torch.library.Library(NAMESPACE, "DEF")
_lib.define(OP + SCHEMA)
_lib.define(FUNCTIONAL_OP + FUNCTIONAL_SCHEMA)


def default_history_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """What the samplers store their history in: float32 for float16/bfloat16 samples, else the sample dtype.

    A multistep update combines history entries with coefficients of both signs; rounding each entry to 8 or
    11 mantissa bits makes the 3M solver's bfloat16 result ~4x farther from float32 than float32 storage does.
    """
    return torch.float32 if x_dtype in (torch.float16, torch.bfloat16) else x_dtype


def history_dtype(x_dtype: torch.dtype, *hist: torch.Tensor | None) -> torch.dtype:
    """The dtype the history tensors must share: that of the first given, if it is x's dtype or float32 for a
    float16/bfloat16 x (keeping a low-precision solver's history in float32 is much more accurate); else x's."""
    for t in hist:
        if t is not None:
            return t.dtype if history_dtype_allowed(x_dtype, t.dtype) else x_dtype
    return x_dtype


def history_dtype_allowed(x_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    return dtype == x_dtype or (dtype == torch.float32 and x_dtype in (torch.float16, torch.bfloat16))


def _has_storage(t: torch.Tensor) -> bool:
    """False for fake/meta tensors (tracing, opcheck): they have no addresses to compare."""
    if type(t) is torch.Tensor:  # the common case, without is_fake's unwrapping
        return t.device.type != "meta"
    return t.device.type != "meta" and not is_fake(t)


def _span(t: torch.Tensor) -> tuple[int, int] | None:
    """[first byte, one past the last byte] a tensor can touch (conservative for strided views; PyTorch strides
    are never negative, so the data pointer is the lowest address)."""
    n = t.numel()
    if n == 0:
        return None
    lo = t.data_ptr()
    if t.is_contiguous():
        return lo, lo + n * t.element_size()
    extent = sum((d - 1) * st for d, st in zip(t.shape, t.stride(), strict=True))
    return lo, lo + (extent + 1) * t.element_size()  # its own element size: history may be float32 beside half x


def _intersect(sa, sb) -> bool:
    return sa is not None and sb is not None and sa[0] < sb[1] and sb[0] < sa[1]


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _self_overlapping(t: torch.Tensor) -> bool:
    """True when some elements of t share memory (an expanded view): writing it would race with itself."""
    return not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1  # at::MemOverlap::Yes


def check_step_args(
    x: torch.Tensor,
    model_out: torch.Tensor,
    model_cond: torch.Tensor | None,
    x_eval: torch.Tensor | None,
    hist1: torch.Tensor | None,
    hist2: torch.Tensor | None,
    hist3: torch.Tensor | None,
    noise: torch.Tensor | None,
    coef: torch.Tensor,
    cfg: int,
    threshold: bool,
    thr_ratio: float,
    thr_min: float,
    thr_max: float,
    out: torch.Tensor,
    hist_out: torch.Tensor | None,
    check_values: bool = True,
) -> None:
    """Raise TypeError/ValueError naming the first bad argument. Reads no tensor data except a CPU ``coef``.

    ``out`` may be ``x`` or ``x_eval`` itself (the update is elementwise); otherwise the outputs must not
    overlap each other or any input, nor themselves.
    """
    for name, t in (("x", x), ("model_out", model_out), ("coef", coef), ("out", out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected a floating dtype in {FLOAT_DTYPES}, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x: expected a tensor with a batch dimension, got a 0-d tensor")
    if cfg not in L.CFG_ROWS:
        raise ValueError(f"cfg: expected 0 (none), 1 (pair), 2 (stacked) or 3 (stacked3), got {cfg}")
    b = x.shape[0]
    hdt = history_dtype(x.dtype, hist1, hist2, hist3, hist_out)
    for name, t in (("model_out", model_out), ("model_cond", model_cond), ("x_eval", x_eval), ("hist1", hist1),
                    ("hist2", hist2), ("hist3", hist3), ("noise", noise), ("out", out), ("hist_out", hist_out)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
        if name in HISTORY_ARGS:
            if t.dtype != hdt:
                raise TypeError(f"{name}: dtype {t.dtype}: history tensors share one dtype, x's ({x.dtype}) or "
                                "float32 when x is float16/bfloat16")
        elif t.dtype != x.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} does not match x's dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: on device {t.device}, but x is on {x.device}")
        want = x.shape
        if name == "model_out" and L.CFG_ROWS[cfg] > 1:
            want = torch.Size((L.CFG_ROWS[cfg] * b,) + tuple(x.shape[1:]))
        if t.shape != want:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match the expected {tuple(want)}")
    if cfg == L.CFG_PAIR and model_cond is None:
        raise ValueError("model_cond: cfg='pair' needs the conditional output in model_cond")
    if cfg != L.CFG_PAIR and model_cond is not None:
        raise ValueError("model_cond: given, but cfg is not 'pair'")
    if hist2 is not None and hist1 is None:
        raise ValueError("hist2: given without hist1 (history entries are newest first)")
    if hist3 is not None and hist2 is None:
        raise ValueError("hist3: given without hist2 (history entries are newest first)")
    if coef.dtype != torch.float64:
        raise TypeError(f"coef: expected float64 coefficients, got {coef.dtype}")
    if coef.device != x.device:
        raise ValueError(f"coef: on device {coef.device}, but x is on {x.device}")
    if not (coef.shape == (L.NCOEF,) or coef.shape == (b, L.NCOEF)):
        raise ValueError(f"coef: expected shape ({L.NCOEF},) or ({b}, {L.NCOEF}), got {tuple(coef.shape)}")
    if threshold:
        if not (0.0 <= thr_ratio <= 1.0):
            raise ValueError(f"thr_ratio: the thresholding quantile must lie in [0, 1], got {thr_ratio}")
        if math.isnan(thr_min) or math.isnan(thr_max) or thr_min <= 0.0 or thr_max <= 0.0:
            raise ValueError(f"thr_min: thresholding bounds must be > 0, got ({thr_min}, {thr_max})")
    if _has_storage(x):  # fake tensors (tracing) share one storage and have no addresses
        _check_overlaps(x, model_out, model_cond, x_eval, hist1, hist2, hist3, noise, coef, out, hist_out)
    if check_values and coef.device.type == "cpu" and type(coef) is torch.Tensor:
        finite = np.isfinite(coef.detach().numpy())
        if not finite.all():
            bad = [L.NAMES[i % L.NCOEF] for i in np.flatnonzero(~finite).tolist()]
            raise ValueError(f"coef: non-finite coefficients ({', '.join(sorted(set(bad)))})")


def _check_overlaps(x, model_out, model_cond, x_eval, hist1, hist2, hist3, noise, coef, out, hist_out) -> None:
    if _self_overlapping(out):
        raise ValueError("out: has elements sharing memory (an expanded view); it must be writable element by element")
    inputs = [(name, t, _span(t)) for name, t in (("x", x), ("model_out", model_out), ("model_cond", model_cond),
                                                   ("x_eval", x_eval), ("hist1", hist1), ("hist2", hist2),
                                                   ("hist3", hist3), ("noise", noise), ("coef", coef)) if t is not None]
    so = _span(out)
    if hist_out is not None:
        if _self_overlapping(hist_out):
            raise ValueError("hist_out: has elements sharing memory (an expanded view); it must be writable element "
                             "by element")
        sh = _span(hist_out)
        if _intersect(sh, so):
            raise ValueError("hist_out: overlaps out")
        for name, _, st in inputs:
            if _intersect(sh, st):
                raise ValueError(f"hist_out: overlaps {name}; the history slot written must not be read")
    for name, t, st in inputs:
        if _intersect(so, st) and not (name in ("x", "x_eval") and _same_view(out, t)):
            raise ValueError(f"out: overlaps {name}; out may be x or x_eval itself, nothing else it reads")


def _fake(x, model_out, model_cond, x_eval, hist1, hist2, hist3, noise, coef, cfg, threshold, thr_ratio, thr_min,
          thr_max, out, hist_out) -> None:
    check_step_args(x, model_out, model_cond, x_eval, hist1, hist2, hist3, noise, coef, cfg, threshold, thr_ratio,
                    thr_min, thr_max, out, hist_out, check_values=False)


torch.library.register_fake(f"{NAMESPACE}::{OP}", _fake, lib=_lib)


def fake_impl():
    """The fake (meta) implementation shared by every op with this schema."""
    return _fake


def functional_outputs(x: torch.Tensor, m_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The fresh (out, m) the functional op returns: x's shape, contiguous; out in x's dtype, m in m_dtype."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, torch.empty_like(out, dtype=m_dtype)


def check_m_dtype(x: torch.Tensor, m_dtype, hist1, hist2, hist3) -> None:
    """The functional op's m_dtype follows the history rule: the given history's dtype, else x's or float32."""
    if not isinstance(m_dtype, torch.dtype):
        raise TypeError(f"m_dtype: expected a torch.dtype, got {type(m_dtype).__name__}")
    if not isinstance(x, torch.Tensor):
        return  # check_step_args names x
    given = next((t.dtype for t in (hist1, hist2, hist3) if isinstance(t, torch.Tensor)), None)
    if given is not None and not history_dtype_allowed(x.dtype, given):
        given = None  # a bad history dtype: check_step_args names that argument
    if not history_dtype_allowed(x.dtype, m_dtype) or (given is not None and given != m_dtype):
        raise TypeError(f"m_dtype: {m_dtype}: history tensors share one dtype, x's ({x.dtype}) or float32 when x "
                        "is float16/bfloat16, and m is returned in it")


def _fake_functional(x, model_out, model_cond, x_eval, hist1, hist2, hist3, noise, coef, cfg, threshold, thr_ratio,
                     thr_min, thr_max, m_dtype, backend):
    check_m_dtype(x, m_dtype, hist1, hist2, hist3)
    out, m = functional_outputs(x, m_dtype)
    check_step_args(x, model_out, model_cond, x_eval, hist1, hist2, hist3, noise, coef, cfg, threshold, thr_ratio,
                    thr_min, thr_max, out, m, check_values=False)
    return out, m


torch.library.register_fake(f"{NAMESPACE}::{FUNCTIONAL_OP}", _fake_functional, lib=_lib)
