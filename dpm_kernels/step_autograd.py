"""Autograd for the fused step: the kernel of ``dpm_kernels::fused_step_functional`` and its backward formula.

The functional op runs the chosen backend's kernel into fresh ``(out, m)`` and is what the front ends call when
grad mode is on and an input requires grad (the mutating ``dpm_kernels::fused_step`` stays the path everywhere
else). Its backward is registered with ``torch.library.register_autograd``, so eager autograd and torch.compile
(AOTAutograd traces the formula into the backward graph) both see it.

For given coefficients the step is linear in every tensor input (`dpm_kernels.layout` has the forward). With
go = d loss / d out and gm = d loss / d m, and y0 = PX x_eval + PM raw the converted output before thresholding:

    gy    = gm + C0 go                          (m enters out with weight C0)
    g_y0  = gy,                g_xe = PX gy     (no thresholding)
    g_raw = PM g_y0;  uncond: (1 - G) g_raw,  cond: (G + G2) g_raw,  perturbed: -G2 g_raw  (G2 in stacked3 only)
    g_x   = A go  (+ g_xe when x_eval is None: x is the evaluation point too)
    g_hist_j = C_j go,   g_noise = CN go

Thresholding, y = QX x_eval + QM clamp(y0, -s, s) / s with s = clamp(q, lo, hi) and q the per-sample ratio-quantile
of |y0|, differentiates as torch does the reference written with torch.clamp and torch.quantile: inside the clamp
(|y0| <= s) 1/s, outside 0; through s (only while lo <= q <= hi) the two order statistics torch.quantile
interpolates get (1 - w) and w of the scale's gradient, times the sign of their element. Inputs saved for it are the
evaluation point and the model outputs (y0 is recomputed, in the kernels' arithmetic dtype).

The formula is plain torch code, so it is differentiable again (gradgradcheck) and traceable. The coefficients are
host-planned float64 constants: a ``coef`` that requires grad is refused, never silently given no gradient.
"""

from __future__ import annotations

import torch

from . import layout as L
from . import opdef
from .backends import reference, registry

_lib = torch.library.Library(opdef.NAMESPACE, "FRAGMENT")
FUNCTIONAL = f"{opdef.NAMESPACE}::{opdef.FUNCTIONAL_OP}"
GRAD_INPUTS = ("x", "model_out", "model_cond", "x_eval", "hist1", "hist2", "hist3", "noise")  # schema order


def _kernel(x, model_out, model_cond, x_eval, hist1, hist2, hist3, noise, coef, cfg, threshold, thr_ratio, thr_min,
            thr_max, m_dtype, backend):
    """The functional op on real tensors: backend `backend`'s kernel writes fresh (out, m)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    opdef.check_m_dtype(x, m_dtype, hist1, hist2, hist3)
    b = registry.resolve(registry.validate(backend), x.device)
    out, m = opdef.functional_outputs(x, m_dtype)
    args = (x, model_out, model_cond, x_eval, hist1, hist2, hist3, noise, coef, cfg, threshold, thr_ratio, thr_min,
            thr_max, out, m)
    if not b.self_checking:
        opdef.check_step_args(*args)
    b.impl(*args)
    return out, m


def _setup_context(ctx, inputs, output) -> None:
    x, model_out, model_cond, x_eval, hist1, hist2, hist3, noise, coef, cfg, thr, ratio, lo, hi, _, _ = inputs
    if coef.requires_grad:
        raise ValueError("coef: requires grad, but the step is not differentiated with respect to its coefficients "
                         "(host-planned float64 constants); pass coef.detach()")
    ctx.fixed = (cfg, thr, ratio, lo, hi)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in inputs[:8])
    ctx.ndim = x.dim()
    if thr:  # y0 is recomputed from the evaluation point and the model outputs
        ctx.save_for_backward(coef, x if x_eval is None else x_eval, model_out, model_cond)
    else:
        ctx.save_for_backward(coef)


def _weight(coef: torch.Tensor, ndim: int, dt: torch.dtype):
    """A function turning a float64 coefficient column (coef[..., i] or a combination) into a factor broadcasting
    against [B, ...] tensors, in the arithmetic dtype: per-sample rows become [B, 1, ...]."""
    if coef.dim() == 1:
        return lambda v: v.to(dt)
    shape = (coef.shape[0],) + (1,) * (ndim - 1)
    return lambda v: v.reshape(shape).to(dt)


def _raw(model_out, model_cond, cfg, b, c, w, dt) -> torch.Tensor:
    """raw = the guided model output (the forward's first line), in dt."""
    if cfg == L.CFG_NONE:
        return model_out.to(dt)
    u = model_out[:b].to(dt)
    cond = model_cond.to(dt) if cfg == L.CFG_PAIR else model_out[b:2 * b].to(dt)
    raw = u + w(c[..., L.GUIDE]) * (cond - u)
    if cfg == L.CFG_STACKED3:
        raw = raw + w(c[..., L.GUIDE2]) * (cond - model_out[2 * b:].to(dt))
    return raw


def _threshold_backward(y0: torch.Tensor, g_yc: torch.Tensor, ratio: float, lo: float, hi: float) -> torch.Tensor:
    """d loss / d y0 for yc = clamp(y0, -s, s) / s, s = clamp(quantile(|y0|, ratio), lo, hi) per sample, given
    g_yc = d loss / d yc. The gradients torch gives the reference written with torch.clamp and torch.quantile."""
    b = y0.shape[0]
    a = y0.abs().reshape(b, -1)
    # a concrete rank: traced with dynamic shapes, a symbolic per-sample size would make w a symbolic float,
    # which AOTAutograd's scalar pass cannot turn into a tensor (torch 2.13); int() specializes the backward graph
    n = int(a.shape[1])
    k, w = reference.quantile_rank(n, ratio)
    srt = torch.sort(a, dim=1)
    cols = [k, min(k + 1, n - 1)]  # the two order statistics torch.quantile interpolates
    v, idx = srt.values[:, cols], srt.indices[:, cols]
    q = reference.lerp(v[:, 0], v[:, 1], w)
    s = q.clamp(min=lo, max=hi)
    sb = s.reshape((b,) + (1,) * (y0.dim() - 1))
    inside = (y0 >= -sb) & (y0 <= sb)  # torch.clamp passes the gradient at the bounds themselves
    g_y0 = torch.where(inside, g_yc / sb, 0.0)
    # outside the clamp yc = +-1 whatever s is; inside d(y0 / s)/ds = -y0 / s^2
    g_s = -torch.where(inside, g_yc * y0, 0.0).reshape(b, -1).sum(1) / (s * s)
    g_q = torch.where((q >= lo) & (q <= hi), g_s, 0.0)
    g_a = torch.zeros_like(a).scatter_add(1, idx, torch.stack([g_q * (1.0 - w), g_q * w], dim=1))
    return g_y0 + g_a.reshape(y0.shape) * torch.sign(y0)  # d|y0|/dy0 = sign, 0 at 0 as torch.abs defines


def _backward(ctx, go: torch.Tensor, gm: torch.Tensor):
    cfg, thr, ratio, lo, hi = ctx.fixed
    dtypes = ctx.dtypes
    need = ctx.needs_input_grad
    c = ctx.saved_tensors[0]
    dt = reference.acc_dtype(dtypes[0])
    w = _weight(c, ctx.ndim, dt)
    go = go.to(dt)
    gy = gm.to(dt) + w(c[..., L.C0]) * go
    g_xe = None
    if thr and go.numel() > 0:
        _, xe, model_out, model_cond = ctx.saved_tensors
        xe = xe.to(dt)
        y0 = w(c[..., L.PX]) * xe + w(c[..., L.PM]) * _raw(model_out, model_cond, cfg, go.shape[0], c, w, dt)
        g_y0 = _threshold_backward(y0, w(c[..., L.QM]) * gy, ratio, lo, hi)
        if (need[0] and dtypes[3] is None) or need[3]:
            g_xe = w(c[..., L.QX]) * gy + w(c[..., L.PX]) * g_y0
    else:
        g_y0 = gy
        if (need[0] and dtypes[3] is None) or need[3]:
            g_xe = w(c[..., L.PX]) * gy
    grads: list[torch.Tensor | None] = [None] * 16

    def put(i: int, g: torch.Tensor) -> None:
        grads[i] = g.to(dtypes[i])

    if need[1] or need[2]:
        g_raw = w(c[..., L.PM]) * g_y0
        if cfg == L.CFG_NONE:
            put(1, g_raw)
        else:
            g = c[..., L.GUIDE]
            g2 = c[..., L.GUIDE2] if cfg == L.CFG_STACKED3 else torch.zeros_like(g)
            parts = [w(1.0 - g) * g_raw, w(g + g2) * g_raw] + ([w(-g2) * g_raw] if cfg == L.CFG_STACKED3 else [])
            if cfg == L.CFG_PAIR:
                put(1, parts[0])
                put(2, parts[1])
            else:
                put(1, torch.cat(parts))
    if need[0]:
        put(0, w(c[..., L.A]) * go if dtypes[3] is not None else w(c[..., L.A]) * go + g_xe)
    if need[3]:
        put(3, g_xe)
    for i, slot in ((4, L.C1), (5, L.C2), (6, L.C3), (7, L.CN)):
        if need[i]:
            put(i, w(c[..., slot]) * go)
    return tuple(grads)


torch.library.impl(FUNCTIONAL, "CompositeExplicitAutograd", _kernel, lib=_lib)
torch.library.register_autograd(FUNCTIONAL, _backward, setup_context=_setup_context, lib=_lib)


def any_requires_grad(*tensors: torch.Tensor | None) -> bool:
    """True when some input requires grad: with grad mode on, autograd must then see the step (callers test
    torch.is_grad_enabled() first, the one check the no-grad path pays)."""
    for t in tensors:  # a loop: half the cost of any() over a generator, paid per step with grad mode on
        if t is not None and t.requires_grad:
            return True
    return False
