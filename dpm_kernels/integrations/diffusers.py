"""diffusers' DPM-Solver schedulers with a fused `step()`: one fused-step op call per step.

    from dpm_kernels.integrations.diffusers import FusedDPMSolverMultistepScheduler
    pipe.scheduler = FusedDPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.fused_backend = "auto"        # or any of backends.registry.CHOICES (an attribute, not config)

`FusedDPMSolverMultistepScheduler` and `FusedDPMSolverSinglestepScheduler` subclass diffusers'
`DPMSolverMultistepScheduler` / `DPMSolverSinglestepScheduler` and leave `__init__` alone (ConfigMixin derives the
config keys from its signature), so `from_config`, `save_config`, `set_timesteps`, `scale_model_input`,
`add_noise` and every sigma grid (Karras, exponential, beta, Lu lambdas, timestep_spacing, final_sigmas_type,
lambda_min_clipped, rescaled betas, custom timesteps) are diffusers' own. Only `step()` changes: converting the
output (epsilon / sample / v_prediction to x0 or eps), dynamic thresholding (diffusers' semantics, s =
clamp(quantile(|x0|, ratio), 1, sample_max_value); noise-prediction solvers go via x0 and back), storing the result
in a ring buffer owned by the scheduler, the multistep / singlestep combination and the SDE noise run in ONE pass.

Coefficients are float64, planned on the host (`planner`) from the scheduler's sigmas (CPU tensors in diffusers) for
every remaining step at the first `step()` after `set_timesteps` -- when the starting index is known -- and uploaded
once (pinned + non_blocking on CUDA); each step then uses a row view. The scheduler keeps its last few plans: the
same trajectory run again (the next image) plans nothing and reuses the device table. No step reads a device tensor
on the host, so a loop of steps can be captured in a CUDA graph: call `set_begin_index(0)` first (else diffusers'
`_init_step_index` searches the timesteps: one sync at the first step), give SDE noise through a CUDA generator or
`variance_noise` (a CPU generator's noise is copied from pageable memory), and keep the scheduler (its row table and
ring) alive and on that trajectory while replaying.

Tolerance: diffusers forms its coefficients in float32 (lambda = log(alpha) - log(sigma), exp(h) - 1 without
expm1) and the multistep scheduler rounds the sample to float32 in every step; ours are float64. Float32 samples
agree with diffusers' to that rounding: max |ours - diffusers| / max(1, max |x|) is ~1e-6 per step and up to ~3e-5
for noise-prediction solvers of order 3 (whose large first steps amplify diffusers' lambda rounding); the tests
require ours to be no farther from diffusers' float64 trajectory than twice diffusers' own float32 trajectory.
Float64 runs agree with diffusers run with float64 sigmas to 1e-13 (singlestep) and 4e-7 (multistep: the float32
rounding of the sample there). Half precision and mixed dtypes: diffusers rounds intermediates to half, we compute
in float32 and round once (result dtypes are diffusers'). SDE noise is drawn as diffusers draws it (`randn_tensor`,
same shape / device / dtype, every step), so one generator seed gives the same trajectory.

Fallback: options not fused run diffusers' own `step()` for the whole trajectory; `scheduler.fused_reason` says why
(None: fused). They are flow matching (`prediction_type="flow_prediction"`, `use_flow_sigmas`), `variance_type`
"learned"/"learned_range", solver_order outside 1..3, multistep "sde-dpmsolver" with solver_order 3 and singlestep
"dpmsolver" with thresholding (diffusers' own code fails there and still does), options unknown to this module set
to non-default values, and, decided at the first step: unsupported dtypes, model outputs shaped unlike the sample,
inputs requiring grad (the op has no autograd), SDE sigma grids that go backwards. A zero-length step (a repeated
sigma) is the identity and stores nothing, and later orders are capped so that no update spans it: finite where
diffusers' own multistep update at order >= 2 divides by h = 0.

State: `step_index`, `lower_order_nums` and (singlestep) `sample` evolve as in diffusers. The parent's
`model_outputs` list is not maintained during a fused trajectory: reading it gives a tuple of views into the ring
(oldest first; None where no later step needs the output), valid until the next step.
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .. import coefficients as C
from .. import planner as P
from ..ops import FLOAT_DTYPES, BoundStep, bind, default_history_dtype

__all__ = ["FusedDPMSolverMultistepScheduler", "FusedDPMSolverSinglestepScheduler"]

_MODEL_TYPE = {"epsilon": "noise", "sample": "x_start", "v_prediction": "v"}
# Config keys whose effect is reproduced: the first set only shapes the sigma grid built by the inherited
# set_timesteps (or matters only with use_flow_sigmas, which falls back); the second is read by the fused step.
_GRID_KEYS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
              "rescale_betas_zero_snr", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
              "use_lu_lambdas", "final_sigmas_type", "lambda_min_clipped", "timestep_spacing", "steps_offset",
              "flow_shift", "use_dynamic_shifting", "time_shift_type"}
_STEP_KEYS = {"solver_order", "prediction_type", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
              "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "use_flow_sigmas",
              "variance_type"}


@dataclass
class _Trajectory:
    """The plan of the steps from `start` to the end of the grid, made at the first step after set_timesteps."""

    start: int  # step_index of the first fused step
    plan: P.Plan  # one evaluation per step: orders, ring slots, noise flags
    table: P.DeviceTable  # its coefficient rows on the sample's device: step k uses table.rows[k]
    step: BoundStep
    slots: tuple[torch.Tensor, ...]  # ring slots of converted outputs (views of the scheduler's ring)
    shape: torch.Size
    dtype: torch.dtype  # working dtype: promote(sample, model_output) at the first step, as diffusers' arithmetic
    device: torch.device
    sde: bool  # noise is drawn every step (diffusers' RNG use)
    model_dtype_result: bool  # the result has model_output's dtype (else the working dtype)
    calls: int = 0


_STEP_KEY_ORDER = tuple(sorted(_STEP_KEYS | {"final_sigmas_type"}))


def _output_fast(prev: torch.Tensor) -> SchedulerOutput:
    """SchedulerOutput(prev_sample=prev) without BaseOutput's per-field __post_init__ (a few us a step)."""
    out = SchedulerOutput.__new__(SchedulerOutput)
    OrderedDict.__setitem__(out, "prev_sample", prev)
    object.__setattr__(out, "prev_sample", prev)
    return out


def _output_maker():
    """The fast construction where it gives what diffusers' constructor gives (checked once), else the constructor."""
    probe = torch.zeros(1)
    try:
        a, b = SchedulerOutput(prev_sample=probe), _output_fast(probe)
        same = (list(a.keys()) == list(b.keys()) and a.to_tuple()[0] is b.to_tuple()[0] is probe and b[0] is probe
                and b.prev_sample is probe and vars(a) == vars(b))
    except Exception:
        same = False
    return _output_fast if same else (lambda prev: SchedulerOutput(prev_sample=prev))


_scheduler_output = _output_maker()


@functools.cache
def _other_options(cls) -> tuple[tuple[str, object], ...]:
    """(name, default) of the scheduler options this module neither reproduces nor reads."""
    return tuple((name, p.default) for name, p in inspect.signature(cls.__init__).parameters.items()
                 if name not in _GRID_KEYS and name not in _STEP_KEYS and p.default is not inspect.Parameter.empty)


_PLAN_CACHE = 8  # plans kept per scheduler: the same trajectory run again (the next image) plans and uploads nothing


class _FusedStep:
    """What both schedulers share; placed before the diffusers class in the MRO."""

    fused_backend: str = "auto"
    _fz_traj: _Trajectory | None = None
    _fz_ring: tuple | None = None  # (buffer, its slots): reused by the next trajectory of the same shape and dtype
    _fz_plans: P.Cache | None = None  # plan key -> plan (which keeps its device tables)
    _fz_data_reason: str | None = None
    _fz_outputs: list | None = None

    # ----- public state -----
    @property
    def fused_reason(self) -> str | None:
        """Why this trajectory runs diffusers' own `step()`; None when it is fused."""
        return self._fz_data_reason or self._config_reason()

    @property
    def model_outputs(self):
        """diffusers' list outside a fused trajectory; during one, a tuple of ring views (see the module doc)."""
        traj = self._fz_traj
        if traj is None:
            return self._fz_outputs
        k, evals = self.config.solver_order, traj.plan.evals
        return tuple(traj.slots[evals[j].write_slot] if j >= 0 and evals[j].write_slot is not None else None
                     for j in range(traj.calls - k, traj.calls))

    @model_outputs.setter
    def model_outputs(self, value) -> None:
        self._fz_outputs = value

    def _fz_reset(self) -> None:
        self._fz_traj = None
        self._fz_data_reason = None

    # ----- what is fused -----
    def _config_reason(self) -> str | None:
        """Why this configuration is not fused (None: it is); computed once per config object."""
        cfg = self.config
        known = self.__dict__.get("_fz_config_reason")
        if known is None or known[0] is not cfg:
            known = self._fz_config_reason = (cfg, self._reason_for(cfg))
        return known[1]

    def _reason_for(self, cfg) -> str | None:
        if cfg.prediction_type == "flow_prediction" or cfg.use_flow_sigmas:
            return "flow matching (flow_prediction / use_flow_sigmas) is not fused"
        if cfg.prediction_type not in _MODEL_TYPE:
            return f"prediction_type={cfg.prediction_type!r} is not fused"
        if cfg.variance_type in ("learned", "learned_range"):
            return f"variance_type={cfg.variance_type!r}: diffusers slices the model output; not fused"
        if cfg.solver_order not in (1, 2, 3):
            return f"solver_order={cfg.solver_order!r}: only 1, 2, 3 are fused"
        if cfg.algorithm_type not in self._ALGORITHMS:
            return f"algorithm_type={cfg.algorithm_type!r} is not fused by {type(self).__name__}"
        if cfg.solver_type not in ("midpoint", "heun"):
            return f"solver_type={cfg.solver_type!r} is not fused"
        if cfg.thresholding and not (0.0 <= cfg.dynamic_thresholding_ratio <= 1.0 and cfg.sample_max_value > 0):
            return "thresholding: ratio outside [0, 1] or sample_max_value <= 0 is not fused"
        why = self._class_reason()
        if why is not None:
            return why
        for name, default in _other_options(type(self)):
            if name in cfg and cfg[name] != default:
                return f"{name}={cfg[name]!r}: an option this module does not know (checked with diffusers 0.42)"
        return None

    def _data_reason(self, model_output, sample) -> str | None:
        for name, t in (("sample", sample), ("model_output", model_output)):
            if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
                return f"{name}: a {getattr(t, 'dtype', type(t).__name__)} is not fused"
        if model_output.shape != sample.shape or model_output.device != sample.device or sample.dim() < 1:
            return "model_output and sample differ in shape or device (or are 0-d): not fused"
        if self.config.thresholding and sample.dim() < 2:
            return "thresholding needs [B, C, ...] samples"
        if torch.is_grad_enabled() and (sample.requires_grad or model_output.requires_grad):
            return "inputs require grad: the fused op has no autograd"
        return None

    # ----- planning -----
    def _plan(self, model_output: torch.Tensor, sample: torch.Tensor) -> _Trajectory:
        cfg = self.config
        start, n = self.step_index, len(self.timesteps)
        sigmas = self.sigmas[start:n + 1].numpy().astype(np.float64)  # a CPU tensor in diffusers: no device sync
        dev, w = sample.device, torch.promote_types(sample.dtype, model_output.dtype)
        if self._fz_plans is None:
            self._fz_plans = P.Cache(_PLAN_CACHE)
        plan = self._fz_plans.get((start, sigmas.tobytes(), self._config_key()),
                                  lambda: self._plan_steps(C.Point.from_vp_of_ve_sigma(sigmas), self._orders(start, n)))
        conv = P.Conversion.for_algorithm(_MODEL_TYPE[cfg.prediction_type], cfg.algorithm_type, bool(cfg.thresholding))
        table = plan.device_table(conv, dev, what="sigmas")
        shape = (plan.n_slots, *sample.shape)
        hd = default_history_dtype(w)  # float32 history for half samples: more accurate than diffusers'
        ring = self._fz_ring
        if ring is None or ring[0].shape != shape or ring[0].dtype != hd or ring[0].device != dev:
            buf = torch.empty(shape, dtype=hd, device=dev)
            ring = self._fz_ring = (buf, buf.unbind(0))
        thr = (cfg.dynamic_thresholding_ratio, 1.0, cfg.sample_max_value) if cfg.thresholding else None
        return _Trajectory(start, plan, table, bind(self.fused_backend, dev, "none", thr), ring[1], sample.shape, w,
                           dev, cfg.algorithm_type.startswith("sde"), self._result_in_model_dtype())

    def _config_key(self) -> tuple:
        """The options that shape a plan, as a hashable key (computed once per config object)."""
        cfg = self.config
        known = self.__dict__.get("_fz_config_key")
        if known is None or known[0] is not cfg:
            known = self._fz_config_key = (cfg, tuple((k, cfg[k]) for k in _STEP_KEY_ORDER if k in cfg))
        return known[1]

    # ----- the step -----
    def _fused(self, model_output, timestep, sample, generator, variance_noise) -> torch.Tensor | None:
        """x at the next step, or None when diffusers' own step must run."""
        traj = self._fz_traj
        if traj is None:
            if self.num_inference_steps is None or self.fused_reason is not None:
                return None
            if self.step_index is None:
                self._init_step_index(timestep)
            why = self._data_reason(model_output, sample)
            if why is None:
                try:
                    traj = self._plan(model_output, sample)
                except (ValueError, ArithmeticError) as exc:  # e.g. a sigma grid going backwards for an SDE
                    why = f"planning failed ({exc})"
            if why is not None:
                self._fz_data_reason = why
                return None
            self._fz_traj = traj
        k = traj.calls
        if self._step_index is None or self._step_index - traj.start != k:
            raise RuntimeError("step: step_index changed outside step() in a fused trajectory; call set_timesteps()")
        evals = traj.plan.evals
        if k >= len(evals):
            raise IndexError(f"step: all {len(evals)} steps of this trajectory were taken; call set_timesteps()")
        if sample.shape != traj.shape or model_output.shape != traj.shape or sample.device != traj.device:
            raise ValueError(f"step: sample/model_output {tuple(sample.shape)}/{tuple(model_output.shape)} on "
                             f"{sample.device} changed within a trajectory ({tuple(traj.shape)} on {traj.device})")
        if torch.is_grad_enabled() and (sample.requires_grad or model_output.requires_grad):
            raise RuntimeError("step: inputs require grad, but this fused trajectory has no autograd")
        w, ev = traj.dtype, evals[k]
        z = self._noise(model_output, generator, variance_noise) if traj.sde else None  # every step, as diffusers
        x_now = sample if sample.dtype == w else sample.to(w)
        x, x_eval = self._start_point(ev.order, sample, x_now)
        slots = traj.slots
        h = [slots[s] for s in ev.read_slots] + [None, None]
        out = torch.empty_like(x_now, memory_format=torch.contiguous_format)
        traj.step(x, model_output if model_output.dtype == w else model_output.to(w), traj.table.rows[k], out,
                  None if ev.write_slot is None else slots[ev.write_slot], h[0], h[1], x_eval,
                  z.to(w) if z is not None and ev.noisy else None)
        traj.calls += 1
        self._step_index += 1
        self._advanced()
        return out.to(model_output.dtype) if traj.model_dtype_result and model_output.dtype != w else out


class FusedDPMSolverMultistepScheduler(_FusedStep, DPMSolverMultistepScheduler):
    """`DPMSolverMultistepScheduler` with a fused `step()`; same config, same results (module doc).

    Attributes: ``fused_backend`` (a `backends.registry.CHOICES` name), ``fused_reason`` (read-only).
    """

    _ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")

    @functools.wraps(DPMSolverMultistepScheduler.set_timesteps)
    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._fz_reset()

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """diffusers' `step` (same arguments and result), fused unless `fused_reason` says otherwise."""
        prev = self._fused(model_output, timestep, sample, generator, variance_noise)
        if prev is None:
            return super().step(model_output, timestep, sample, generator=generator, variance_noise=variance_noise,
                                return_dict=return_dict)
        return _scheduler_output(prev) if return_dict else (prev,)

    def _class_reason(self) -> str | None:
        if self.config.algorithm_type == "sde-dpmsolver" and self.config.solver_order == 3:
            return "sde-dpmsolver with solver_order=3: diffusers has no third-order sde-dpmsolver update"
        return None

    def _orders(self, start: int, n: int) -> list[int]:
        # diffusers' rule: warm-up by lower_order_nums (steps since set_timesteps), lower orders at the end
        cfg, so = self.config, self.config.solver_order
        orders = []
        for k, i in enumerate(range(start, n)):
            warm = min(k, so)
            final = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                    or cfg.final_sigmas_type == "zero")
            second = i == n - 2 and cfg.lower_order_final and n < 15
            orders.append(1 if so == 1 or warm < 1 or final else 2 if so == 2 or warm < 2 or second else 3)
        return orders

    def _plan_steps(self, points: C.Point, orders: list[int]) -> P.Plan:
        cfg = self.config
        sde = cfg.algorithm_type.startswith("sde")
        return P.plan_multistep(None, cfg.algorithm_type, cfg.solver_type, np.zeros(len(orders) + 1), orders,
                                eta=1.0, s_noise=1.0, multistep3="diffusers" if sde else "standard", points=points)

    def _noise(self, model_output, generator, variance_noise) -> torch.Tensor | None:
        if not self.config.algorithm_type.startswith("sde"):
            return None
        if variance_noise is not None:
            return variance_noise.to(device=model_output.device, dtype=torch.float32)
        return randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=torch.float32)

    def _start_point(self, order, sample, x_now):
        return x_now, None

    def _advanced(self) -> None:
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1

    def _result_in_model_dtype(self) -> bool:
        # diffusers casts the result to the dtype of the converted output: the raw output's where no sample enters
        cfg = self.config
        return (cfg.algorithm_type.endswith("++") and cfg.prediction_type == "sample") or (
            not cfg.algorithm_type.endswith("++") and cfg.prediction_type == "epsilon" and not cfg.thresholding)


class FusedDPMSolverSinglestepScheduler(_FusedStep, DPMSolverSinglestepScheduler):
    """`DPMSolverSinglestepScheduler` with a fused `step()`; same config, same results (module doc).

    A step of order k (the scheduler's ``order_list``) starts from ``self.sample``, the sample of the block's first
    step (held by reference, as diffusers does), and evaluates its output at the current sample (``x_eval``).
    Attributes: ``fused_backend`` (a `backends.registry.CHOICES` name), ``fused_reason`` (read-only).
    """

    _ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")

    @functools.wraps(DPMSolverSinglestepScheduler.set_timesteps)
    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._fz_reset()

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True) -> SchedulerOutput | tuple:
        """diffusers' `step` (same arguments and result), fused unless `fused_reason` says otherwise."""
        prev = self._fused(model_output, timestep, sample, generator, None)
        if prev is None:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        return _scheduler_output(prev) if return_dict else (prev,)

    def _class_reason(self) -> str | None:
        if self.config.algorithm_type == "dpmsolver" and self.config.thresholding:
            return "dpmsolver with thresholding: diffusers' singlestep code fails here (alpha_t[None])"
        return None

    def _orders(self, start: int, n: int) -> list[int]:
        # diffusers lowers order_list[i] while fewer outputs than that exist since set_timesteps
        return [min(self.order_list[i], k + 1) for k, i in enumerate(range(start, n))]

    def _plan_steps(self, points: C.Point, orders: list[int]) -> P.Plan:
        return P.plan_singlestep_steps(self.config.algorithm_type, self.config.solver_type, points, orders)

    def _noise(self, model_output, generator, variance_noise) -> torch.Tensor | None:
        if self.config.algorithm_type != "sde-dpmsolver++":
            return None
        return randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                            dtype=model_output.dtype)

    def _start_point(self, order, sample, x_now):
        if order == 1:
            self.sample = sample  # the block start, by reference like diffusers
            return x_now, None
        start = self.sample.to(x_now.dtype)
        return start, (None if start is x_now else x_now)

    def _advanced(self) -> None:
        pass

    def _result_in_model_dtype(self) -> bool:
        return False  # no final cast in diffusers' singlestep step: the promoted dtype
