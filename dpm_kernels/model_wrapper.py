"""`model_wrapper`: turn a diffusion network into the continuous-time model function the solver calls.

Same names, arguments and semantics as the authors' `dpm_solver_pytorch.model_wrapper`: calling the result
as ``model_fn(x, t_continuous)`` returns the noise prediction. In addition the returned `WrappedModel`
tells the solver the network's raw output type and guidance layout (`raw`), so the fused step converts
and guides inside its single pass instead of in separate tensor operations.

Model input time: for a discrete schedule with N steps, ``1000 * (t - 1/N)`` (the labels 0..999 for
N = 1000); for continuous schedules (and flow matching's t = sigma), t itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .schedule import NoiseSchedule

MODEL_TYPES = ("noise", "x_start", "v", "score", "flow")
GUIDANCE_TYPES = ("uncond", "classifier", "classifier-free")


def _expand(v: torch.Tensor, dims: int) -> torch.Tensor:
    return v[(...,) + (None,) * (dims - 1)]


class WrappedModel:
    """A model function ``(x, t_continuous) -> noise`` that also exposes its raw output for fusion.

    Attributes used by the solver:
        raw_type: the parameterisation of `raw`'s output ("noise" | "x_start" | "v" | "score").
        cfg: "none" or "stacked" (classifier-free guidance: `raw` returns cat([uncond, cond]) of [2B, ...]).
        guidance_scale: the classifier-free guidance scale applied by the fused step.
    """

    def __init__(self, model, noise_schedule, model_type, model_kwargs, guidance_type, condition,
                 unconditional_condition, guidance_scale, classifier_fn, classifier_kwargs):
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
        stacked = (guidance_type == "classifier-free" and self.guidance_scale != 1.0
                   and unconditional_condition is not None)
        self.cfg = "stacked" if stacked else "none"
        # classifier guidance modifies the noise prediction, so its raw output is a noise prediction
        self.raw_type = "noise" if guidance_type == "classifier" else model_type

    def model_input_time(self, t_continuous: torch.Tensor) -> torch.Tensor:
        """Continuous time -> the time label the network was trained with."""
        if self.noise_schedule.schedule == "discrete":
            return (t_continuous - 1.0 / self.noise_schedule.total_N) * 1000.0
        return t_continuous

    def _call(self, x: torch.Tensor, t_continuous: torch.Tensor, cond=None, t_input=None) -> torch.Tensor:
        if t_input is None:
            t_input = self.model_input_time(t_continuous)
        if cond is None:
            return self.model(x, t_input, **self.model_kwargs)
        return self.model(x, t_input, cond, **self.model_kwargs)

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

    def raw(self, x: torch.Tensor, t_continuous: torch.Tensor, t_input: torch.Tensor | None = None) -> torch.Tensor:
        """The network output of type `raw_type` at (x, t); [2B, ...] (uncond first) when cfg == "stacked".

        t_input: `model_input_time(t_continuous)` when the caller has it already (the solver computes it once per
        trajectory)."""
        if self.guidance_type == "uncond":
            return self._call(x, t_continuous, t_input=t_input)
        if self.guidance_type == "classifier":
            noise = self._to_noise(self._call(x, t_continuous), x, t_continuous)
            grad = self._classifier_grad(x, self.model_input_time(t_continuous))
            sigma = _expand(self.noise_schedule.marginal_std(t_continuous).to(x.dtype), x.dim())
            return noise - self.guidance_scale * sigma * grad
        if self.cfg == "none":
            return self._call(x, t_continuous, cond=self.condition, t_input=t_input)
        x_in = torch.cat([x] * 2)
        t_in = torch.cat([t_continuous] * 2)
        c_in = torch.cat([self.unconditional_condition, self.condition])
        return self._call(x_in, t_in, cond=c_in)

    def __call__(self, x: torch.Tensor, t_continuous: torch.Tensor) -> torch.Tensor:
        """The noise prediction at (x, t_continuous) (the authors' `model_fn`)."""
        out = self.raw(x, t_continuous)
        if self.cfg == "stacked":
            b = x.shape[0]
            x2 = torch.cat([x] * 2)
            t2 = torch.cat([t_continuous] * 2)
            noise = self._to_noise(out, x2, t2) if self.raw_type != "noise" else out
            uncond, cond = noise[:b], noise[b:]
            return uncond + self.guidance_scale * (cond - uncond)
        if self.raw_type == "noise":
            return out
        return self._to_noise(out, x, t_continuous)


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
) -> WrappedModel:
    """Wrap a network as ``model_fn(x, t_continuous) -> noise`` (the authors' API).

    Args:
        model: ``model(x, t_input, **model_kwargs)`` (or ``model(x, t_input, cond, **model_kwargs)`` for
            classifier-free guidance) returning a prediction of type `model_type`, shape of x.
        noise_schedule: a `NoiseScheduleVP` or `NoiseScheduleFlow`.
        model_type: "noise" | "x_start" | "v" | "score" | "flow" (flow matching's velocity v = eps - x0, with a
            `NoiseScheduleFlow`).
        guidance_type: "uncond" | "classifier" (needs classifier_fn and condition) |
            "classifier-free" (needs condition; unconditional_condition for scale != 1).
        guidance_scale: classifier(-free) guidance scale.
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
    if model_type == "flow" and noise_schedule.schedule != "flow":
        raise ValueError("model_type: 'flow' (a velocity v = eps - x0) needs a NoiseScheduleFlow (alpha = 1 - t)")
    if guidance_type == "classifier":
        if classifier_fn is None:
            raise ValueError("classifier_fn: guidance_type='classifier' needs a classifier_fn")
        if condition is None:
            raise ValueError("condition: guidance_type='classifier' needs a condition")
    if guidance_type == "classifier-free" and condition is None:
        raise ValueError("condition: guidance_type='classifier-free' needs a condition")
    if guidance_type == "classifier-free" and guidance_scale != 1.0 and unconditional_condition is None:
        raise ValueError("unconditional_condition: classifier-free guidance with scale != 1 needs it")
    return WrappedModel(model, noise_schedule, model_type, model_kwargs, guidance_type, condition,
                        unconditional_condition, guidance_scale, classifier_fn, classifier_kwargs)
