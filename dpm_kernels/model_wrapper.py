"""`model_wrapper`: turn a diffusion network into the continuous-time model function the solver calls.

Same names, arguments and semantics as the authors' `dpm_solver_pytorch.model_wrapper`: calling the result
as ``model_fn(x, t_continuous)`` returns the noise prediction. In addition the returned `WrappedModel`
tells the solver, per evaluation time, how the network's raw output is laid out and combined (`guidance_at`), so
the fused step converts and guides inside its single pass instead of in separate tensor operations.

Model input time: for a discrete schedule with N steps, ``discrete_time_scale * (t - 1/N)`` (the authors' 1000:
labels 0..999 for N = 1000; SANA's fork uses N); for SANA's "discrete_flow" schedule ``t * N``; for continuous
schedules (and flow matching's t = sigma), t itself.

Guidance (docs/math.md, "Guidance"): classifier-free guidance combines [uncond, cond] outputs as
``uncond + g * (cond - uncond)``; `interval_guidance` (SANA) applies it only where lo < t < hi and calls the network
with the condition alone elsewhere; perturbed-attention guidance (PAG, SANA's "classifier-free_PAG") adds a third
output, computed by the network with perturbed attention, as ``+ pag * (cond - perturbed)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .schedule import NoiseSchedule, NoiseScheduleFlow

MODEL_TYPES = ("noise", "x_start", "v", "score", "flow")
GUIDANCE_TYPES = ("uncond", "classifier", "classifier-free", "classifier-free_PAG", "classifier-free_PAG_seq")
PAG_TYPES = ("classifier-free_PAG", "classifier-free_PAG_seq")
PAG_SEQ_SWITCH = 0.5  # "classifier-free_PAG_seq": classifier-free guidance below this t, the PAG combination above


def _expand(v: torch.Tensor, dims: int) -> torch.Tensor:
    return v[(...,) + (None,) * (dims - 1)]


def _f32(v: float) -> float:
    # the forks compare their float32 time tensors with the bounds: compare as they do
    return float(np.float32(v))


def cat_conditions(conds: list):
    """Conditions stacked along the batch as the network receives them: tensors concatenated, dicts key by key and
    lists element by element (ldm's {"c_concat": [...], "c_crossattn": [...]})."""
    first = conds[0]
    if isinstance(first, dict):
        return {k: cat_conditions([c[k] for c in conds]) for k in first}
    if isinstance(first, (list, tuple)):
        return [cat_conditions([c[i] for c in conds]) for i in range(len(first))]
    return torch.cat(conds)


@dataclass(frozen=True)
class Guidance:
    """How one evaluation calls the network and combines its outputs: the guidance part of that step's fused row.

    layout: the op's layout of the raw output -- "none" (one output), "stacked" ([A, B] -> A + scale * (B - A)) or
        "stacked3" ([uncond, cond, perturbed] -> uncond + scale * (cond - uncond) + scale2 * (cond - perturbed)).
    inputs: the condition of each batch chunk ("cond" / "uncond"; () for a network called without one).
    perturbed: the last chunk is computed with perturbed attention (the PAG hook is active during the call).
    """

    layout: str = "none"
    scale: float = 1.0
    scale2: float = 0.0
    inputs: tuple[str, ...] = ()
    perturbed: bool = False


UNGUIDED = Guidance()


class WrappedModel:
    """A model function ``(x, t_continuous) -> noise`` that also exposes its raw output for fusion.

    Attributes used by the solver:
        raw_type: the parameterisation of `raw`'s output ("noise" | "x_start" | "v" | "score" | "flow").
        guidance_at(t): the `Guidance` of an evaluation at time t (layout, scales, how the network is called).
        cfg, guidance_scale: the layout and scale of classifier-free guidance where it is applied.
    """

    def __init__(self, model, noise_schedule, model_type, model_kwargs, guidance_type, condition,
                 unconditional_condition, guidance_scale, classifier_fn, classifier_kwargs, interval_guidance=None,
                 pag_scale=1.0, pag_hook=None, discrete_time_scale=1000.0):
        self.model = model
        self.noise_schedule = noise_schedule
        self.model_type = model_type
        self.model_kwargs = dict(model_kwargs or {})
        self.guidance_type = guidance_type
        self.condition = condition
        self.unconditional_condition = unconditional_condition
        self.guidance_scale = float(guidance_scale)
        self.classifier_fn = classifier_fn
        self.classifier_kwargs = dict(classifier_kwargs or {})
        self.interval_guidance = None if interval_guidance is None else tuple(float(v) for v in interval_guidance)
        self.pag_scale = float(pag_scale)
        self.pag_hook = pag_hook
        self.discrete_time_scale = float(discrete_time_scale)
        stacked = (guidance_type == "classifier-free" and self.guidance_scale != 1.0
                   and unconditional_condition is not None)
        self.cfg = "stacked" if stacked else "none"
        # classifier guidance modifies the noise prediction, so its raw output is a noise prediction
        self.raw_type = "noise" if guidance_type == "classifier" else model_type

    # ----- the guidance rules: which outputs an evaluation at t combines, and how -----
    def _cfg_at(self, t: float) -> Guidance:
        lo_hi = self.interval_guidance
        if (self.guidance_scale == 1.0 or self.unconditional_condition is None
                or (lo_hi is not None and not _f32(lo_hi[0]) < _f32(t) < _f32(lo_hi[1]))):
            return Guidance(inputs=("cond",))  # outside the interval (bounds excluded): the conditional output alone
        return Guidance("stacked", self.guidance_scale, inputs=("uncond", "cond"))

    def _pag(self) -> Guidance:
        if self.guidance_scale == 1.0:  # cond + pag * (cond - perturbed): [cond, perturbed] in the stacked layout
            return Guidance("stacked", -self.pag_scale, inputs=("cond", "cond"), perturbed=True)
        return Guidance("stacked3", self.guidance_scale, self.pag_scale, inputs=("uncond", "cond", "cond"),
                        perturbed=True)

    def guidance_at(self, t: float) -> Guidance:
        """The `Guidance` of an evaluation at continuous time t (a float)."""
        gt = self.guidance_type
        if gt in ("uncond", "classifier"):
            return UNGUIDED
        if gt == "classifier-free":
            return self._cfg_at(t)
        if gt == "classifier-free_PAG":  # SANA applies PAG at every t, whatever interval_guidance says
            return self._pag()
        if _f32(t) < PAG_SEQ_SWITCH:  # classifier-free_PAG_seq
            return self._cfg_at(t)
        return Guidance("stacked3", self.guidance_scale, self.pag_scale, inputs=("uncond", "cond", "cond"),
                        perturbed=True)

    # ----- calling the network -----
    def model_input_time(self, t_continuous: torch.Tensor) -> torch.Tensor:
        """Continuous time -> the time label the network was trained with."""
        ns = self.noise_schedule
        if ns.schedule == "discrete":
            return (t_continuous - 1.0 / ns.total_N) * self.discrete_time_scale
        if ns.schedule == "discrete_flow":
            return t_continuous * ns.total_N
        return t_continuous

    def _call(self, x: torch.Tensor, t_continuous: torch.Tensor, cond=None, t_input=None) -> torch.Tensor:
        if t_input is None:
            t_input = self.model_input_time(t_continuous)
        out = self.model(x, t_input, **self.model_kwargs) if cond is None else self.model(x, t_input, cond,
                                                                                         **self.model_kwargs)
        # SANA's networks may return (output, extras): the forks take the first element
        return out[0] if isinstance(out, (tuple, list)) else out

    def _to_noise(self, output: torch.Tensor, x: torch.Tensor, t_continuous: torch.Tensor) -> torch.Tensor:
        ns = self.noise_schedule
        if self.model_type == "noise":
            return output
        alpha = _expand(ns.marginal_alpha(t_continuous).to(x.dtype), x.dim())
        sigma = _expand(ns.marginal_std(t_continuous).to(x.dtype), x.dim())
        if self.model_type == "x_start":
            return (x - alpha * output) / sigma
        if self.model_type == "v":
            return alpha * output + sigma * x
        if self.model_type == "flow":
            return x + alpha * output  # v = eps - x0 on a path with alpha = 1 - t
        return -sigma * output  # score

    def _classifier_grad(self, x: torch.Tensor, t_input: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_prob = self.classifier_fn(x_in, t_input, self.condition, **self.classifier_kwargs)
            return torch.autograd.grad(log_prob.sum(), x_in)[0]

    def raw(self, x: torch.Tensor, t_continuous: torch.Tensor, t_input: torch.Tensor | None = None,
            guidance: Guidance | None = None) -> torch.Tensor:
        """The network output of type `raw_type` at (x, t), its chunks stacked along the batch as `guidance`
        (default: ``guidance_at(t)``) lays them out: [kB, ...] for k inputs.

        t_input: `model_input_time(t_continuous)` when the caller has it already (the solver computes it once per
        trajectory)."""
        if self.guidance_type == "uncond":
            return self._call(x, t_continuous, t_input=t_input)
        if self.guidance_type == "classifier":
            noise = self._to_noise(self._call(x, t_continuous), x, t_continuous)
            grad = self._classifier_grad(x, self.model_input_time(t_continuous))
            sigma = _expand(self.noise_schedule.marginal_std(t_continuous).to(x.dtype), x.dim())
            return noise - self.guidance_scale * sigma * grad
        g = self.guidance_at(float(t_continuous.reshape(-1)[0])) if guidance is None else guidance
        conds = {"cond": self.condition, "uncond": self.unconditional_condition}
        k = len(g.inputs)
        if k == 1:
            return self._call(x, t_continuous, cond=self.condition, t_input=t_input)
        hook = self.pag_hook(k) if (g.perturbed and self.pag_hook is not None) else contextlib.nullcontext()
        with hook:
            return self._call(torch.cat([x] * k), torch.cat([t_continuous] * k),
                              cond=cat_conditions([conds[c] for c in g.inputs]),
                              t_input=None if t_input is None else torch.cat([t_input] * k))

    def __call__(self, x: torch.Tensor, t_continuous: torch.Tensor) -> torch.Tensor:
        """The noise prediction at (x, t_continuous) (the authors' `model_fn`; unfused)."""
        g = self.guidance_at(float(t_continuous.reshape(-1)[0])) if self.guidance_type not in (
            "uncond", "classifier") else UNGUIDED
        out = self.raw(x, t_continuous, guidance=g)
        k = max(1, len(g.inputs))
        noise = out if self.raw_type == "noise" else self._to_noise(out, torch.cat([x] * k),
                                                                   torch.cat([t_continuous] * k))
        if g.layout == "none":
            return noise
        chunks = noise.chunk(k)
        guided = chunks[0] + g.scale * (chunks[1] - chunks[0])
        return guided + g.scale2 * (chunks[1] - chunks[2]) if g.layout == "stacked3" else guided


def _check_interval(interval_guidance) -> None:
    if interval_guidance is None:
        return
    try:
        lo, hi = (float(v) for v in interval_guidance)
    except (TypeError, ValueError):
        raise TypeError(f"interval_guidance: expected None or two numbers [lo, hi], got {interval_guidance!r}"
                        ) from None
    if np.isnan([lo, hi]).any():
        raise ValueError(f"interval_guidance: bounds must not be NaN, got {interval_guidance!r}")


def model_wrapper(
    model: Callable,
    noise_schedule: NoiseSchedule,
    model_type: str = "noise",
    model_kwargs: dict | None = None,
    guidance_type: str = "uncond",
    condition=None,
    unconditional_condition=None,
    guidance_scale: float = 1.0,
    classifier_fn: Callable | None = None,
    classifier_kwargs: dict | None = None,
    *,
    interval_guidance=None,
    pag_scale: float = 1.0,
    pag_applied_layers=None,
    pag_hook: Callable | None = None,
    discrete_time_scale: float = 1000.0,
) -> WrappedModel:
    """Wrap a network as ``model_fn(x, t_continuous) -> noise`` (the authors' API).

    Args:
        model: ``model(x, t_input, **model_kwargs)`` (or ``model(x, t_input, cond, **model_kwargs)`` for
            classifier-free guidance) returning a prediction of type `model_type`, shape of x (a tuple or list:
            its first element, as SANA's fork reads it).
        noise_schedule: a `NoiseScheduleVP` or `NoiseScheduleFlow`.
        model_type: "noise" | "x_start" | "v" | "score" | "flow" (flow matching's velocity v = eps - x0, with a
            `NoiseScheduleFlow`).
        guidance_type: "uncond" | "classifier" (needs classifier_fn and condition) |
            "classifier-free" (needs condition; unconditional_condition for scale != 1) |
            "classifier-free_PAG" (SANA: uncond + g * (cond - uncond) + pag_scale * (cond - perturbed) at every
            step; cond + pag_scale * (cond - perturbed) when g = 1) |
            "classifier-free_PAG_seq" (SANA: classifier-free guidance while t < 0.5, the PAG combination above).
        condition, unconditional_condition: tensors, or dicts / lists of tensors (ldm), stacked along the batch.
        guidance_scale: classifier(-free) guidance scale.
    Keyword-only (SANA's fork and beyond):
        interval_guidance: None (guide at every step) or [lo, hi]: classifier-free guidance only where
            lo < t < hi (bounds excluded, compared in float32 as SANA does), the conditional output alone elsewhere.
        pag_scale: the perturbed-attention guidance scale.
        pag_hook: ``pag_hook(k) -> context manager`` during which the network, called on k stacked copies of x,
            computes the last copy with perturbed attention (SANA swaps the self-attention of `pag_applied_layers`
            for an identity; `dpm_kernels.forks.sana.sana_pag_hook` does that for SANA's own networks).
        pag_applied_layers: the layers the hook perturbs (kept for SANA's signature; without a hook only an empty
            list is accepted: nothing is perturbed, as in SANA).
        discrete_time_scale: a discrete schedule's network time is (t - 1/N) * this (SANA: N).
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type: expected one of {MODEL_TYPES}, got {model_type!r}")
    if guidance_type not in GUIDANCE_TYPES:
        raise ValueError(f"guidance_type: expected one of {GUIDANCE_TYPES}, got {guidance_type!r}")
    if not callable(model):
        raise TypeError(f"model: expected a callable, got {type(model).__name__}")
    if not isinstance(noise_schedule, NoiseSchedule):
        raise TypeError(f"noise_schedule: expected a NoiseScheduleVP or NoiseScheduleFlow, got "
                        f"{type(noise_schedule).__name__}")
    if model_type == "flow" and not isinstance(noise_schedule, NoiseScheduleFlow):
        raise ValueError("model_type: 'flow' (a velocity v = eps - x0) needs a NoiseScheduleFlow (alpha = 1 - t)")
    if guidance_type == "classifier":
        if classifier_fn is None:
            raise ValueError("classifier_fn: guidance_type='classifier' needs a classifier_fn")
        if condition is None:
            raise ValueError("condition: guidance_type='classifier' needs a condition")
    free = guidance_type.startswith("classifier-free")
    if free and condition is None:
        raise ValueError(f"condition: guidance_type={guidance_type!r} needs a condition")
    if free and unconditional_condition is None and (guidance_scale != 1.0 or guidance_type.endswith("_seq")):
        raise ValueError(f"unconditional_condition: guidance_type={guidance_type!r} with scale {guidance_scale} "
                         "needs it")
    _check_interval(interval_guidance)
    if pag_hook is not None and not callable(pag_hook):
        raise TypeError(f"pag_hook: expected a callable returning a context manager, got {type(pag_hook).__name__}")
    if guidance_type in PAG_TYPES and pag_hook is None and list(pag_applied_layers or []):
        raise ValueError("pag_hook: perturbed-attention guidance on pag_applied_layers needs a hook that perturbs the "
                         "network's attention (the model's business); dpm_kernels.forks.sana.sana_pag_hook does it "
                         "for SANA's networks")
    if not (isinstance(discrete_time_scale, (int, float)) and discrete_time_scale > 0):
        raise ValueError(f"discrete_time_scale: expected a number > 0, got {discrete_time_scale!r}")
    return WrappedModel(model, noise_schedule, model_type, model_kwargs, guidance_type, condition,
                        unconditional_condition, guidance_scale, classifier_fn, classifier_kwargs, interval_guidance,
                        pag_scale, pag_hook, discrete_time_scale)
