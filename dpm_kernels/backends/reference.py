"""The pure-PyTorch reference of the fused step: the semantics every kernel is tested against.

Plain tensor code (no custom ops), so `torch.compile` can trace it and float64 inputs give the float64
reference. Arithmetic runs in float32 for half/bfloat16/float32 tensors and in float64 for float64 tensors,
like the kernels; results are stored in the input dtype.
"""

from __future__ import annotations

import torch

from .. import layout as L

_INT_LIMIT_QUANTILE = 1 << 24  # torch.quantile refuses larger inputs


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def quantile_rank(n: int, ratio: float) -> tuple[int, float]:
    """(k, w): the ratio-quantile of n sorted values is lerp(v[k], v[k+1], w) (torch.quantile 'linear').

    Computed in float64; torch.quantile itself computes the rank in the input's dtype, which differs only
    in rounding.
    """
    pos = float(ratio) * (n - 1)
    k = min(int(pos // 1), n - 1)
    return k, pos - k


def lerp(lo: torch.Tensor, hi: torch.Tensor, w: float) -> torch.Tensor:
    """torch.lerp's formula (two branches for accuracy), which torch.quantile uses."""
    return lo + w * (hi - lo) if w < 0.5 else hi - (hi - lo) * (1.0 - w)


def per_sample_quantile(v: torch.Tensor, ratio: float) -> torch.Tensor:
    """The ratio-quantile of each row of v [B, n] with linear interpolation; any n >= 1.

    Equal to torch.quantile(v, ratio, dim=1) up to rounding, including n > 2^24 where torch.quantile
    refuses (a sort does the selection here; the kernels use a radix select).
    """
    n = v.shape[1]
    k, w = quantile_rank(n, ratio)
    srt = torch.sort(v, dim=1).values
    lo = srt[:, k]
    hi = srt[:, min(k + 1, n - 1)]
    return lerp(lo, hi, w)


def threshold_scale(y: torch.Tensor, ratio: float, lo: float, hi: float) -> torch.Tensor:
    """Per-sample s = clamp(quantile(|y|, ratio), lo, hi), shape [B]."""
    q = per_sample_quantile(y.abs().reshape(y.shape[0], -1), ratio)
    return torch.clamp(q, min=lo, max=hi)


def _rows(coef: torch.Tensor, ndim: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Coefficient columns, each broadcastable against [B, ...] tensors of ndim dims."""
    c = coef.to(dtype)
    if c.dim() == 1:
        return [c[i] for i in range(L.NCOEF)]
    shape = (c.shape[0],) + (1,) * (ndim - 1)
    return [c[:, i].reshape(shape) for i in range(L.NCOEF)]


def fused_step(
    x: torch.Tensor,
    model_out: torch.Tensor,
    coef: torch.Tensor,
    model_cond: torch.Tensor | None = None,
    x_eval: torch.Tensor | None = None,
    hist1: torch.Tensor | None = None,
    hist2: torch.Tensor | None = None,
    hist3: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    cfg: int = L.CFG_NONE,
    threshold: bool = False,
    thr_ratio: float = 0.995,
    thr_min: float = 1.0,
    thr_max: float = float("inf"),
    m_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused solver step (see `dpm_kernels.layout` for the formula). Returns (out, m), m in `m_dtype`
    (the history dtype; default x's).

    Shapes: x, x_eval, hist1, hist2, hist3, noise, model_cond: [B, ...]; model_out: [B, ...], [2B, ...] with
    cfg=CFG_STACKED or [3B, ...] with CFG_STACKED3; coef: [NCOEF] or [B, NCOEF] float64. Inputs are assumed validated
    (`dpm_kernels.opdef.check_step_args`).
    """
    dt = acc_dtype(x.dtype)
    k = _rows(coef, x.dim(), dt)
    xe = (x if x_eval is None else x_eval).to(dt)
    b = x.shape[0]
    if cfg == L.CFG_STACKED3:
        u, c, p = model_out[:b].to(dt), model_out[b:2 * b].to(dt), model_out[2 * b:].to(dt)
        raw = u + k[L.GUIDE] * (c - u) + k[L.GUIDE2] * (c - p)
    elif cfg == L.CFG_STACKED:
        u, c = model_out[:b].to(dt), model_out[b:].to(dt)
        raw = u + k[L.GUIDE] * (c - u)
    elif cfg == L.CFG_PAIR:
        u, c = model_out.to(dt), model_cond.to(dt)
        raw = u + k[L.GUIDE] * (c - u)
    else:
        raw = model_out.to(dt)
    y = k[L.PX] * xe + k[L.PM] * raw
    if threshold and y.numel() > 0:
        s = threshold_scale(y, thr_ratio, thr_min, thr_max).reshape((-1,) + (1,) * (y.dim() - 1))
        y = torch.minimum(torch.maximum(y, -s), s) / s
        y = k[L.QX] * xe + k[L.QM] * y
    m = y
    out = k[L.A] * x.to(dt) + k[L.C0] * m
    if hist1 is not None:
        out = out + k[L.C1] * hist1.to(dt)
    if hist2 is not None:
        out = out + k[L.C2] * hist2.to(dt)
    if hist3 is not None:
        out = out + k[L.C3] * hist3.to(dt)
    if noise is not None:
        out = out + k[L.CN] * noise.to(dt)
    return out.to(x.dtype), m.to(x.dtype if m_dtype is None else m_dtype)


def op_impl(x, model_out, model_cond, x_eval, hist1, hist2, hist3, noise, coef, cfg, thr, ratio, lo, hi, out,
            hist_out) -> None:
    """The reference with the op's calling convention (schema order; writes out and hist_out)."""
    m_dtype = hist_out.dtype if hist_out is not None else x.dtype
    res, m = fused_step(x, model_out, coef, model_cond, x_eval, hist1, hist2, hist3, noise, cfg, thr, ratio, lo, hi,
                        m_dtype)
    if hist_out is not None:
        hist_out.copy_(m)
    out.copy_(res)
