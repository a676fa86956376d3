"""The fused-step op: one schema, registered once with torch.library, served by several backends.

``torch.ops.dpm_kernels.fused_step`` has CPU (C++) and CUDA (C++/CUDA) kernels registered by the compiled
extensions; ``torch.ops.dpm_kernels.fused_step_triton`` is the same schema served by Triton. Both have a
fake implementation, so ``torch.compile(fullgraph=True)`` traces loops that call them. The "torch" backend
is the plain-PyTorch reference (`backends/reference.py`), not an op, so torch.compile can fuse it.

`fused_step` below is the checked Python entry point that every backend goes through.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

from . import layout as L

NAMESPACE = "dpm_kernels"
SCHEMA = (
    "(Tensor x, Tensor model_out, Tensor? model_cond, Tensor? x_eval, Tensor? hist1, Tensor? hist2, "
    "Tensor? noise, Tensor coef, int cfg, bool threshold, float thr_ratio, float thr_min, float thr_max, "
    "Tensor(a!) out, Tensor(b!)? hist_out) -> ()"
)
MUTATES = ("out", "hist_out")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_lib = torch.library.Library(NAMESPACE, "DEF")
_lib.define("fused_step" + SCHEMA)


def _has_storage(t: torch.Tensor) -> bool:
    """False for fake/meta tensors (tracing, opcheck): they have no addresses to compare."""
    return t.device.type != "meta" and not is_fake(t)


def _span(t: torch.Tensor) -> tuple[int, int] | None:
    """[first byte, one past the last byte] a tensor can touch (conservative for strided views)."""
    if t.numel() == 0:
        return None
    lo = t.data_ptr()
    extent = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(), strict=True))
    return lo, lo + (extent + 1) * t.element_size()  # its own element size: history may be float32 beside half x


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the memory ranges of two real tensors intersect."""
    sa, sb = _span(a), _span(b)
    return sa is not None and sb is not None and sa[0] < sb[1] and sb[0] < sa[1]


HISTORY_ARGS = ("hist1", "hist2", "hist_out")


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
            ok = t.dtype == x_dtype or (t.dtype == torch.float32 and x_dtype in (torch.float16, torch.bfloat16))
            return t.dtype if ok else x_dtype
    return x_dtype


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def check_step_args(
    x: torch.Tensor,
    model_out: torch.Tensor,
    model_cond: torch.Tensor | None,
    x_eval: torch.Tensor | None,
    hist1: torch.Tensor | None,
    hist2: torch.Tensor | None,
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
    overlap each other or any input.
    """
    for name, t in (("x", x), ("model_out", model_out), ("coef", coef), ("out", out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected a floating dtype in {FLOAT_DTYPES}, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x: expected a tensor with a batch dimension, got a 0-d tensor")
    if cfg not in (L.CFG_NONE, L.CFG_PAIR, L.CFG_STACKED):
        raise ValueError(f"cfg: expected 0 (none), 1 (pair) or 2 (stacked), got {cfg}")
    b = x.shape[0]
    expect = {
        "model_out": model_out,
        "model_cond": model_cond,
        "x_eval": x_eval,
        "hist1": hist1,
        "hist2": hist2,
        "noise": noise,
        "out": out,
        "hist_out": hist_out,
    }
    for name, t in expect.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
        if name in HISTORY_ARGS:
            if t.dtype != history_dtype(x.dtype, hist1, hist2, hist_out):
                raise TypeError(f"{name}: dtype {t.dtype}: history tensors share one dtype, x's ({x.dtype}) or "
                                "float32 when x is float16/bfloat16")
        elif t.dtype != x.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} does not match x's dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: on device {t.device}, but x is on {x.device}")
        want = x.shape
        if name == "model_out" and cfg == L.CFG_STACKED:
            want = torch.Size((2 * b,) + tuple(x.shape[1:]))
        if t.shape != want:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match the expected {tuple(want)}")
    if cfg == L.CFG_PAIR and model_cond is None:
        raise ValueError("model_cond: cfg='pair' needs the conditional output in model_cond")
    if cfg != L.CFG_PAIR and model_cond is not None:
        raise ValueError("model_cond: given, but cfg is not 'pair'")
    if hist2 is not None and hist1 is None:
        raise ValueError("hist2: given without hist1 (history entries are newest first)")
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
        _check_overlaps(x, model_out, model_cond, x_eval, hist1, hist2, noise, coef, out, hist_out)
    if check_values and coef.device.type == "cpu" and not bool(torch.isfinite(coef).all()):
        bad = [L.NAMES[i % L.NCOEF] for i in torch.nonzero(~torch.isfinite(coef.reshape(-1))).flatten().tolist()]
        raise ValueError(f"coef: non-finite coefficients ({', '.join(sorted(set(bad)))})")


def _check_overlaps(x, model_out, model_cond, x_eval, hist1, hist2, noise, coef, out, hist_out) -> None:
    inputs = {"x": x, "model_out": model_out, "model_cond": model_cond, "x_eval": x_eval,
              "hist1": hist1, "hist2": hist2, "noise": noise, "coef": coef}
    if hist_out is not None:
        if _overlap(hist_out, out):
            raise ValueError("hist_out: overlaps out")
        for name, t in inputs.items():
            if t is not None and _overlap(hist_out, t):
                raise ValueError(f"hist_out: overlaps {name}; the history slot written must not be read")
    for name, t in inputs.items():
        if t is not None and _overlap(out, t) and not (name in ("x", "x_eval") and _same_view(out, t)):
            raise ValueError(f"out: overlaps {name}; out may be x or x_eval itself, nothing else it reads")


@torch.library.register_fake(f"{NAMESPACE}::fused_step")
def _fused_step_fake(x, model_out, model_cond, x_eval, hist1, hist2, noise, coef, cfg, threshold,
                     thr_ratio, thr_min, thr_max, out, hist_out) -> None:
    check_step_args(x, model_out, model_cond, x_eval, hist1, hist2, noise, coef, cfg, threshold,
                    thr_ratio, thr_min, thr_max, out, hist_out, check_values=False)


def fake_impl():
    """The fake (meta) implementation shared by every op with this schema."""
    return _fused_step_fake


def fused_step(
    x: torch.Tensor,
    model_out: torch.Tensor,
    coef: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    hist_out: torch.Tensor | None = None,
    hist: Sequence[torch.Tensor] = (),
    model_cond: torch.Tensor | None = None,
    x_eval: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    cfg: str = "none",
    threshold: tuple[float, float, float] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One fused DPM-Solver step: convert the raw model output, store it, combine, add noise.

    Args:
        x: [B, ...] the sample the update starts from (``a * x``).
        model_out: [B, ...] raw network output at ``x_eval`` (default ``x``); [2B, ...] with cfg="stacked"
            (unconditional half first).
        coef: float64 [NCOEF] or [B, NCOEF] coefficient rows (`dpm_kernels.layout`), on x's device.
        out: [B, ...] destination of x_next; may be ``x`` itself. Allocated when None.
        hist_out: [B, ...] destination of the converted output m (a ring-buffer slot), or None.
        hist: up to two earlier converted outputs [B, ...], newest first (C1, C2). History tensors (hist and
            hist_out) share one dtype: x's, or float32 when x is float16/bfloat16.
        model_cond: [B, ...] conditional output for cfg="pair".
        x_eval: [B, ...] the point the model was evaluated at, when it is not ``x`` (singlestep solvers).
        noise: [B, ...] standard normal noise for SDE solvers (CN).
        cfg: "none" | "pair" | "stacked": how classifier-free guidance outputs are laid out.
        threshold: (ratio, lo, hi) to apply dynamic thresholding to the converted prediction:
            s = clamp(quantile(|y|, ratio), lo, hi) per sample, y = clamp(y, -s, s) / s.
        backend: "auto" | "torch" | "cpu" | "cuda" | "triton".

    Returns:
        ``out``. Nothing is written when an argument is invalid.
    """
    from .backends import registry

    if cfg not in L.CFG_MODES:
        raise ValueError(f"cfg: expected one of {tuple(L.CFG_MODES)}, got {cfg!r}")
    hist = tuple(hist)
    if len(hist) > 2:
        raise ValueError(f"hist: at most 2 earlier outputs are combined, got {len(hist)}")
    hist1 = hist[0] if len(hist) > 0 else None
    hist2 = hist[1] if len(hist) > 1 else None
    thr = threshold is not None
    ratio, lo, hi = (float(v) for v in threshold) if thr else (0.0, 1.0, 1.0)
    if out is None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    args = (x, model_out, model_cond, x_eval, hist1, hist2, noise, coef, L.CFG_MODES[cfg], thr, ratio, lo, hi)
    if torch.compiler.is_compiling():
        # Traced: shapes and dtypes are checked by the fake implementation; memory overlap and coefficient
        # values are data the tracer cannot read (they were checked on the eager path or by the planner).
        impl = registry.resolve_cached(backend, x)
    else:
        name = registry.resolve_name(backend, x)
        if name not in registry.SELF_CHECKING:  # the C++ ops check the same rules themselves, cheaper
            check_step_args(*args, out, hist_out)
        impl = registry._impl(name)
    impl(*args, out, hist_out)
    return out
