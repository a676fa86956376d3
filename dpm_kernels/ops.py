"""The fused step for callers: `fused_step` (keyword arguments, any backend) and `bind` (a step bound to a backend
once, for loops that call it every step; every front end of this package runs its steps through one).

``torch.ops.dpm_kernels.fused_step`` is the op itself (`opdef`: schema, argument rules, fake implementation), with
C++ kernels for CPU and CUDA and "auto" behaviour on first use (`backends.registry`);
``torch.ops.dpm_kernels.fused_step_triton`` is the same schema served by Triton. Both trace under
``torch.compile(fullgraph=True)``. The "torch" backend is the plain-PyTorch reference, not an op, so torch.compile
can fuse it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import layout as L
from .backends import registry
from .opdef import FLOAT_DTYPES, NAMESPACE, SCHEMA, check_step_args, default_history_dtype, history_dtype
from .step_autograd import any_requires_grad

__all__ = ["FLOAT_DTYPES", "NAMESPACE", "SCHEMA", "BoundStep", "bind", "check_step_args", "default_history_dtype",
           "fused_step", "history_dtype", "threshold_args"]


def cfg_mode(cfg: str) -> int:
    if not isinstance(cfg, str) or cfg not in L.CFG_MODES:
        raise ValueError(f"cfg: expected one of {tuple(L.CFG_MODES)}, got {cfg!r}")
    return L.CFG_MODES[cfg]


def threshold_args(threshold, name: str = "threshold") -> tuple[bool, float, float, float]:
    """(on, ratio, lo, hi) of the op from None or a (ratio, lo, hi) triple; errors name the caller's argument."""
    if threshold is None:
        return False, 0.0, 1.0, 1.0
    if isinstance(threshold, (str, bytes)) or not isinstance(threshold, Sequence) or len(threshold) != 3:
        raise TypeError(f"{name}: expected None or a (ratio, lo, hi) triple, e.g. (0.995, 1.0, float('inf')) for "
                        f"s = clamp(quantile(|x0|, ratio), lo, hi); got {threshold!r}")
    try:
        ratio, lo, hi = (float(v) for v in threshold)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected three numbers (ratio, lo, hi), got {threshold!r}") from None
    return True, ratio, lo, hi


class BoundStep:
    """A fused step with its backend chosen and its guidance layout and thresholding fixed.

    ``step(x, model_out, coef, out, hist_out=None, hist1=None, hist2=None, x_eval=None, noise=None, model_cond=None,
    hist3=None)``
    writes x_next into `out` (and the converted output into `hist_out`) and returns `out`; arguments as in
    `fused_step`, checked by the op's rules (by the C++ kernels themselves, else here) before anything is written.
    When grad mode is on and an input requires grad, the step runs as the functional op (`tracked`) and its results
    are copied into out and hist_out by autograd-recorded copies; otherwise nothing is added to the mutating call.
    """

    def __init__(self, backend: str, device: torch.device, cfg: str = "none", threshold=None,
                 threshold_name: str = "threshold"):
        self.backend = registry.resolve(registry.validate(backend), device)
        self._fixed = (cfg_mode(cfg),) + threshold_args(threshold, threshold_name)
        self._impl = self.backend.impl
        self._eager = self.backend.eager_impl
        self._check = not self.backend.self_checking
        # "auto" on a GPU with both backends: large plain steps on Triton (registry.large_step_backend); eager only
        large = registry.large_step_backend(backend, device, self._fixed[1])
        self._large = None if large is None else large.eager_impl

    def __call__(self, x, model_out, coef, out, hist_out=None, hist1=None, hist2=None, x_eval=None, noise=None,
                 model_cond=None, hist3=None):
        if torch.is_grad_enabled() and any_requires_grad(x, model_out, coef, hist1, hist2, x_eval, noise, model_cond,
                                                         hist3):
            return self.tracked_into(x, model_out, coef, out, hist_out, hist1, hist2, x_eval, noise, model_cond,
                                     hist3)[0]
        return self.mutating(x, model_out, coef, out, hist_out, hist1, hist2, x_eval, noise, model_cond, hist3)

    def mutating(self, x, model_out, coef, out, hist_out=None, hist1=None, hist2=None, x_eval=None, noise=None,
                 model_cond=None, hist3=None):
        """The mutating op itself, autograd not consulted: for callers that know no input requires grad (or run
        under no_grad). Same arguments and result as calling the step."""
        cfg, thr, ratio, lo, hi = self._fixed
        if torch.compiler.is_compiling():
            # traced: the op itself; shapes and dtypes are checked by the fake implementation; overlaps and
            # coefficient values are data the tracer cannot read (checked on the eager path, and by the planner)
            self._impl(x, model_out, model_cond, x_eval, hist1, hist2, hist3, noise, coef, cfg, thr, ratio, lo, hi,
                       out, hist_out)
            return out
        if self._check:
            check_step_args(x, model_out, model_cond, x_eval, hist1, hist2, hist3, noise, coef, cfg, thr, ratio, lo,
                            hi, out, hist_out)
        impl = self._eager if self._large is None or x.numel() < registry.TRITON_MIN_ELEMENTS else self._large
        impl(x, model_out, model_cond, x_eval, hist1, hist2, hist3, noise, coef, cfg, thr, ratio, lo, hi, out,
             hist_out)
        return out

    def tracked(self, x, model_out, coef, hist1=None, hist2=None, x_eval=None, noise=None, model_cond=None,
                hist3=None, m_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The step as autograd sees it: fresh (x_next, m) from ``dpm_kernels::fused_step_functional`` on this
        backend, differentiable in every tensor input but coef (`dpm_kernels.step_autograd`). m is in `m_dtype`,
        by default the history's dtype (`history_dtype`)."""
        cfg, thr, ratio, lo, hi = self._fixed
        if m_dtype is None and isinstance(x, torch.Tensor):
            m_dtype = history_dtype(x.dtype, hist1, hist2, hist3)
        return torch.ops.dpm_kernels.fused_step_functional(x, model_out, model_cond, x_eval, hist1, hist2, hist3,
                                                           noise, coef, cfg, thr, ratio, lo, hi, m_dtype,
                                                           self.backend.name)

    def tracked_into(self, x, model_out, coef, out, hist_out=None, hist1=None, hist2=None, x_eval=None, noise=None,
                     model_cond=None, hist3=None,
                     m_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`tracked`, then autograd-recorded copies into hist_out and out where given. Returns (out, or the fresh
        x_next when out is None; m, the tracked converted output). The destinations are checked first."""
        cfg, thr, ratio, lo, hi = self._fixed
        if not torch.compiler.is_compiling():  # the caller's destinations, before anything is written
            check_step_args(x, model_out, model_cond, x_eval, hist1, hist2, hist3, noise, coef, cfg, thr, ratio, lo,
                            hi, torch.empty_like(x) if out is None else out, hist_out)
            for name, t in (("out", out), ("hist_out", hist_out)):
                if t is not None and t.requires_grad and (t._base if t._base is not None else t).is_leaf:
                    raise ValueError(f"{name}: a leaf tensor that requires grad (or a view of one) cannot be written "
                                     "by a step autograd records; pass a fresh tensor or out=None")
        res, m = self.tracked(x, model_out, coef, hist1, hist2, x_eval, noise, model_cond, hist3,
                              hist_out.dtype if hist_out is not None else m_dtype)
        if hist_out is not None:
            hist_out.copy_(m)
        return (res if out is None else out.copy_(res)), m


_bound: dict[tuple, BoundStep] = {}


def bind(backend: str, device: torch.device, cfg: str = "none", threshold=None,
         threshold_name: str = "threshold") -> BoundStep:
    """The `BoundStep` for these options (one per distinct options and device, kept for the process)."""
    if torch.compiler.is_compiling():
        return BoundStep(backend, device, cfg, threshold, threshold_name)
    key = (backend, device, cfg, None if threshold is None else tuple(threshold) if isinstance(threshold, Sequence)
           else threshold)
    try:
        step = _bound.get(key)
    except TypeError:  # an unhashable option: BoundStep names what is wrong with it
        return BoundStep(backend, device, cfg, threshold, threshold_name)
    if step is None:
        step = _bound[key] = BoundStep(backend, device, cfg, threshold, threshold_name)
    return step


MAX_HISTORY = 3  # hist1, hist2, hist3 of the op


def split_history(hist: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """(hist1, hist2, hist3) from a list of up to MAX_HISTORY earlier outputs, newest first (None where absent)."""
    hist = tuple(hist)
    if len(hist) > MAX_HISTORY:
        raise ValueError(f"hist: at most {MAX_HISTORY} earlier outputs are combined, got {len(hist)}")
    return (hist + (None,) * MAX_HISTORY)[:MAX_HISTORY]


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
        model_out: [B, ...] raw network output at ``x_eval`` (default ``x``); [2B, ...] = cat([uncond, cond]) with
            cfg="stacked"; [3B, ...] = cat([uncond, cond, perturbed]) with cfg="stacked3".
        coef: float64 [NCOEF] or [B, NCOEF] coefficient rows, on x's device, from `dpm_kernels.planner`
            (`coefficient_rows`; the slots are named in `dpm_kernels.layout`).
        out: [B, ...] destination of x_next; may be ``x`` itself. Allocated when None.
        hist_out: [B, ...] destination of the converted output m (a ring-buffer slot), or None.
        hist: up to three earlier converted outputs [B, ...], newest first (C1, C2, C3). History tensors (hist and
            hist_out) share one dtype: x's, or float32 when x is float16/bfloat16.
        model_cond: [B, ...] conditional output for cfg="pair".
        x_eval: [B, ...] the point the model was evaluated at, when it is not ``x`` (singlestep solvers).
        noise: [B, ...] standard normal noise for SDE solvers (CN).
        cfg: "none" | "pair" | "stacked" | "stacked3": how the guidance outputs are laid out; stacked3 combines
            uncond + GUIDE (cond - uncond) + GUIDE2 (cond - perturbed) (perturbed-attention guidance).
        threshold: (ratio, lo, hi) to apply dynamic thresholding to the converted prediction:
            s = clamp(quantile(|y|, ratio), lo, hi) per sample, y = clamp(y, -s, s) / s.
        backend: one of `registry.CHOICES`: "auto" (deterministic: the first backend that can serve x's device),
            "fastest" (the same as "auto"), or a backend's name (`registry.NAMES`). On a GPU where both the CUDA and
            the Triton kernels load, "auto" runs plain steps of 2^24+ elements on Triton
            (`registry.TRITON_MIN_ELEMENTS`).

    Returns:
        ``out``. Nothing is written when an argument is invalid.

    Differentiable: when grad mode is on and any tensor input but coef requires grad, the result (and hist_out,
    written by a recorded copy) carries a grad_fn, on every backend (`dpm_kernels.step_autograd`); with out=None
    the result is a fresh tensor. A coef that requires grad is refused (the coefficients are planned constants).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    hist1, hist2, hist3 = split_history(hist)
    step = bind(backend, x.device, cfg, threshold)
    if out is None:
        if torch.is_grad_enabled() and any_requires_grad(x, model_out, coef, hist1, hist2, x_eval, noise, model_cond,
                                                     hist3):
            return step.tracked_into(x, model_out, coef, None, hist_out, hist1, hist2, x_eval, noise, model_cond,
                                     hist3)[0]
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return step(x, model_out, coef, out, hist_out, hist1, hist2, x_eval, noise, model_cond, hist3)
