"""What every fused diffusers scheduler shares: planning a trajectory at its first step, one fused op call per step,
the state diffusers keeps (step index, model_outputs), and when not to fuse.

A subclass (one per diffusers class) supplies the hooks at the bottom of `FusedStepMixin`: the solver's points of
the sigma grid, how the raw output is converted, the orders diffusers would use, the plan, the noise diffusers
would draw, where a step starts from (singlestep blocks) and how diffusers' own state evolves.
"""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ... import coefficients as C
from ... import planner as P
from ...backends import registry
from ...ops import FLOAT_DTYPES, BoundStep, bind, default_history_dtype
from ...step_autograd import any_requires_grad

# diffusers' prediction types -> the conversion's model types (flow_prediction: see `FusedStepMixin._conversion`)
MODEL_TYPE = {"epsilon": "noise", "sample": "x_start", "v_prediction": "v", "flow_prediction": "flow"}
LEARNED = ("learned", "learned_range")
# Plans (which keep their device tables) by (class, start, grid, configuration), shared by every scheduler object: the
# same trajectory run again -- the next image, or a new scheduler per image -- plans and uploads nothing.
_PLANS = P.Cache(64)


@dataclass
class Trajectory:
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
    tracked: dict = field(default_factory=dict)  # ring slot -> its output as autograd tracks it (steps under autograd)


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


scheduler_output = _output_maker()


@functools.cache
def _init_options(cls) -> tuple[tuple[str, object], ...]:
    """(name, default) of every option of the scheduler's __init__."""
    return tuple((name, p.default) for name, p in inspect.signature(cls.__init__).parameters.items()
                 if p.default is not inspect.Parameter.empty)


class FusedStepMixin:
    """Placed before the diffusers class in the MRO; `__init__` stays diffusers' (ConfigMixin reads its signature)."""

    # Options that only shape the sigma grid diffusers' own set_timesteps builds (so nothing to do here), and those
    # the fused step reads. An option in neither set that differs from its default falls back: this module does not
    # know what it means (it was written against diffusers 0.42).
    GRID_KEYS: frozenset = frozenset()
    STEP_KEYS: frozenset = frozenset()
    # A grid the planner refuses runs diffusers' own step (its result, whatever it is), unless diffusers' result there
    # is known to be NaN: then the planner's error is raised instead.
    FALL_BACK_ON_PLANNING_ERRORS = True
    _fz_traj: Trajectory | None = None
    _fz_ring: tuple | None = None  # (buffer, its slots): reused by the next trajectory of the same shape and dtype
    _fz_data_reason: str | None = None
    _fz_outputs: list | None = None

    def __init_subclass__(cls, **kwargs):
        """Each drop-in's `set_timesteps` is its diffusers parent's (same signature: pipelines inspect it for `mu`,
        `timesteps`, `sigmas`), followed by forgetting the fused trajectory."""
        super().__init_subclass__(**kwargs)
        parent = next((b for b in cls.__mro__[1:] if "set_timesteps" in vars(b) and not issubclass(b, FusedStepMixin)),
                      None)
        if parent is None or any("set_timesteps" in vars(b) for b in cls.__mro__ if issubclass(b, FusedStepMixin)):
            return  # this class or a drop-in it extends has its own (or already the wrapped one)
        original = parent.set_timesteps

        @functools.wraps(original)
        def set_timesteps(self, *args, **kw):
            original(self, *args, **kw)
            self._fz_reset()
            self.host_timesteps()  # the one device read of a trajectory's index bookkeeping: here, not in a step

        cls.set_timesteps = set_timesteps

    # ----- public state -----
    @property
    def fused_backend(self) -> str:
        """Which backend runs the fused steps (an attribute, not config; checked when set). "auto" (the default)
        and "fastest" choose one for the sample's device, and what cannot be fused runs diffusers' own step (the
        reason in `fused_reason`). A backend's own name (`backends.registry.NAMES`) is a promise: that backend runs
        every step, or the first step raises a ValueError saying why it cannot."""
        return self.__dict__.get("_fz_backend", "auto")

    @fused_backend.setter
    def fused_backend(self, name: str) -> None:
        try:
            registry.validate(name)
        except (TypeError, ValueError):
            raise ValueError(f"fused_backend: expected one of {registry.CHOICES}, got {name!r}") from None
        traj = self._fz_traj  # set mid-trajectory: the next step runs on it (or it says now why it cannot)
        step = None if traj is None else self._bound_step(traj.device, name)
        self.__dict__["_fz_backend"] = name
        if step is not None:
            traj.step = step

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' `from_config`, also taking ``fused_backend=`` (which diffusers would drop without a word)."""
        name = kwargs.pop("fused_backend", None)
        made = super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)
        if name is not None:
            (made[0] if return_unused_kwargs else made).fused_backend = name
        return made

    def _bound_step(self, device: torch.device, name: str | None = None) -> BoundStep:
        """The fused step on `device` with backend `name` (default `fused_backend`); a named backend that cannot
        serve the device raises why."""
        name = self.fused_backend if name is None else name
        try:
            return bind(name, device, "none", self._threshold())
        except ValueError as e:
            if not str(e).startswith("backend:"):
                raise
            raise ValueError(f"fused_backend: {name!r} cannot serve {device} tensors "
                             f"({str(e).removeprefix('backend: ')})") from None

    @property
    def fused_reason(self) -> str | None:
        """Why this trajectory runs diffusers' own `step()`; None when it is fused."""
        return self._fz_data_reason or self._config_reason()

    @property
    def model_outputs(self):
        """diffusers' list outside a fused trajectory; during one, a tuple of ring views (oldest first; None where no
        later step needs the output), valid until the next step."""
        traj = self._fz_traj
        if traj is None:
            return self._fz_outputs
        k, evals = self.config.get("solver_order", 1), traj.plan.evals
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
        why = self._class_reason()
        if why is not None:
            return why
        for name, default in _init_options(type(self)):
            if name not in self.GRID_KEYS and name not in self.STEP_KEYS and name in cfg and cfg[name] != default:
                return f"{name}={cfg[name]!r}: an option this module does not know (checked with diffusers 0.42)"
        return None

    def _data_reason(self, model_output, sample) -> str | None:
        for name, t in (("sample", sample), ("model_output", model_output)):
            if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
                return f"{name}: a {getattr(t, 'dtype', type(t).__name__)} is not fused"
        if sample.dim() < 1 or model_output.device != sample.device:
            return "model_output and sample are on different devices (or 0-d): not fused"
        if self._prediction(model_output, sample).shape != sample.shape:
            return (f"model_output {tuple(model_output.shape)} does not fit the sample {tuple(sample.shape)}: "
                    "not fused")
        if self._threshold() is not None and sample.dim() < 2:
            return "thresholding needs [B, C, ...] samples"
        return None

    # ----- planning -----
    def _plan(self, model_output: torch.Tensor, sample: torch.Tensor, step: BoundStep) -> Trajectory:
        start, n = self.step_index, self._grid_length()
        sigmas = self.sigmas[start:n + 1].numpy().astype(np.float64)  # a CPU tensor in diffusers: no device sync
        dev, w = sample.device, self._working_dtype(sample, model_output)
        plan = _PLANS.get((type(self), start, n, sigmas.tobytes(), self.host_timesteps().tobytes(),
                           self._config_key()), lambda: self._make_plan(sigmas, start, n))
        table = plan.device_table(self._conversion(), dev, what="sigmas")
        shape = (plan.n_slots, *sample.shape)
        hd = default_history_dtype(w)  # float32 history for half samples: more accurate than diffusers'
        ring = self._fz_ring
        if ring is None or ring[0].shape != shape or ring[0].dtype != hd or ring[0].device != dev:
            buf = torch.empty(shape, dtype=hd, device=dev)
            ring = self._fz_ring = (buf, buf.unbind(0))
        return Trajectory(start, plan, table, step, ring[1], sample.shape, w, dev, self._draws_noise(),
                          self._result_in_model_dtype())

    def _config_key(self) -> str:
        """The whole configuration as a hashable key (computed once per config object): a plan made for one
        scheduler serves another only where every option agrees (values may be lists: their repr)."""
        cfg = self.config
        known = self.__dict__.get("_fz_config_key")
        if known is None or known[0] is not cfg:
            known = self._fz_config_key = (cfg, repr(sorted(cfg.items())))
        return known[1]

    # ----- the first step's index, without a device sync -----
    def host_timesteps(self) -> np.ndarray:
        """A host copy of `timesteps` (made by set_timesteps, where reading the device is no cost to any step; remade
        if `timesteps` was replaced since)."""
        ts = self.timesteps
        known = self.__dict__.get("_fz_ts_host")
        if known is None or known[0] is not ts:
            known = self._fz_ts_host = (ts, None if ts is None else ts.detach().cpu().numpy())
        return known[1]

    def _timestep_on_host(self, timestep):
        """The value of `timestep` known without reading the device, or None: a Python number, a CPU tensor, or an
        element of `timesteps` itself (what a pipeline's ``for t in scheduler.timesteps`` passes: its index is its
        storage offset, its value the host copy's)."""
        if not isinstance(timestep, torch.Tensor):
            number = isinstance(timestep, (int, float, np.number)) and not isinstance(timestep, bool)
            return timestep if number else None
        if timestep.numel() != 1:
            return None
        ts = self.timesteps
        if (timestep.dim() == 0 and isinstance(ts, torch.Tensor) and ts.dim() == 1 and ts.numel() > 0
                and timestep.device == ts.device and timestep.dtype == ts.dtype
                and timestep.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr()):
            off, stride = timestep.storage_offset() - ts.storage_offset(), ts.stride(0)
            if stride > 0 and off % stride == 0 and 0 <= off // stride < ts.shape[0]:
                return self.host_timesteps()[off // stride]
        return timestep.item() if timestep.device.type == "cpu" else None

    def _init_step_index(self, timestep) -> None:
        """diffusers' rule for the first step's index (the second of several equal timesteps -- an img2img start --
        else the only one), decided on the host where the timestep's value is known there, so that the first step
        does not synchronise with the device even without `set_begin_index`. A timestep whose value only the device
        knows, or one not in the grid, takes diffusers' own search (and its sync, or its error)."""
        if getattr(self, "begin_index", None) is None:
            value = self._timestep_on_host(timestep)
            hits = np.flatnonzero(self.host_timesteps() == value) if value is not None else ()
            if len(hits):
                self._step_index = int(hits[1] if len(hits) > 1 else hits[0])
                return
        super()._init_step_index(timestep)

    # ----- the step -----
    def _fused(self, model_output, timestep, sample, generator, variance_noise) -> torch.Tensor | None:
        """x at the next step, or None when diffusers' own step must run."""
        traj = self._fz_traj
        if traj is None:
            if self.num_inference_steps is None:
                return None  # diffusers' own step says what is missing
            why = self.fused_reason
            if why is None:
                if self.step_index is None:
                    self._init_step_index(timestep)
                why = self._data_reason(model_output, sample)
            if why is None:
                step = self._bound_step(sample.device)  # a named backend that cannot serve the device raises here
                try:
                    traj = self._plan(model_output, sample, step)
                except (ValueError, ArithmeticError) as exc:  # e.g. an SDE sigma grid that goes backwards
                    if not self.FALL_BACK_ON_PLANNING_ERRORS:
                        raise
                    why = f"planning failed ({exc})"
            if why is not None:
                if self.fused_backend in registry.NAMES:  # named: never diffusers' step instead, silently
                    raise ValueError(f"fused_backend: {self.fused_backend!r} was named, but this step cannot be "
                                     f"fused: {why}. Set fused_backend = 'auto' to run diffusers' own step there.")
                if self.fused_reason is None:
                    self._fz_data_reason = why
                return None
            self._fz_traj = traj
        k = traj.calls
        if self._step_index is None or self._step_index - traj.start != k:
            raise RuntimeError("step: step_index changed outside step() in a fused trajectory; call set_timesteps()")
        evals = traj.plan.evals
        if k >= len(evals):
            raise IndexError(f"step: all {len(evals)} steps of this trajectory were taken; call set_timesteps()")
        mo = self._prediction(model_output, sample)
        if sample.shape != traj.shape or mo.shape != traj.shape or sample.device != traj.device:
            raise ValueError(f"step: sample/model_output {tuple(sample.shape)}/{tuple(model_output.shape)} on "
                             f"{sample.device} changed within a trajectory ({tuple(traj.shape)} on {traj.device})")
        w, ev = traj.dtype, evals[k]
        z = self._noise(model_output, sample, generator, variance_noise, ev) if traj.sde else None  # as diffusers
        x_now = sample if sample.dtype == w else sample.to(w)
        x, x_eval = self._start_point(ev, sample, x_now)
        slots = traj.slots
        mo = mo if mo.dtype == w else mo.to(w)
        z = z.to(w) if z is not None and ev.noisy else None
        if torch.is_grad_enabled() and (traj.tracked or any_requires_grad(x, mo, x_eval, z)):
            out = self._tracked_step(traj, ev, x, mo, x_eval, z)
        else:
            h = ([x_eval] if ev.reads_eval else []) + [slots[s] for s in ev.read_slots] + [None, None, None]
            out = torch.empty_like(x_now, memory_format=torch.contiguous_format)
            traj.step.mutating(x, mo, traj.table.rows[k], out, self._hist_out(ev, slots), h[0], h[1], x_eval, z,
                               hist3=h[2])
            if traj.tracked:  # the slot written no longer holds the tracked output of an earlier step
                traj.tracked.pop(ev.write_slot, None)
        traj.calls += 1
        self._step_index += 1
        self._advanced(ev, sample)
        return out.to(model_output.dtype) if traj.model_dtype_result and model_output.dtype != w else out

    def _tracked_step(self, traj: Trajectory, ev: P.Eval, x, mo, x_eval, z) -> torch.Tensor:
        """The step under autograd (grad mode on and an input requiring grad, or outputs of such steps in the ring):
        the functional op, reading stored outputs as the tensors autograd tracks. The ring slot (and a returned
        pred_original_sample) still receive the values, so diffusers' state reads the same as on the fused path."""
        slots, tracked = traj.slots, traj.tracked
        h = ([x_eval] if ev.reads_eval else []) + [tracked.get(s, slots[s]) for s in ev.read_slots] + [None] * 3
        hist_out = self._hist_out(ev, slots)
        res, m = traj.step.tracked(x, mo, traj.table.rows[traj.calls], h[0], h[1], x_eval, z, None, h[2],
                                   None if hist_out is None else hist_out.dtype)
        if hist_out is not None:
            with torch.no_grad():
                hist_out.copy_(m)
            if ev.write_slot is not None and hist_out is slots[ev.write_slot]:
                tracked[ev.write_slot] = m
            if self.__dict__.get("_fz_pred") is hist_out:  # returned as pred_original_sample: the tracked one
                self._fz_pred = m
        return res

    # ----- hooks: the defaults serve diffusers' VP schedulers (multistep, singlestep, inverse) -----
    PREDICTION_TYPES: tuple[str, ...] = tuple(MODEL_TYPE)  # the class's prediction types that are fused
    ALGORITHMS: tuple[str, ...] = ()  # the algorithm types diffusers' class defines (empty: it has no such option)

    def _class_reason(self) -> str | None:
        """A configuration of this class that diffusers does not define (its own step raises), and why; None: it
        is fused."""
        cfg = self.config
        if cfg.prediction_type not in self.PREDICTION_TYPES:
            return f"prediction_type={cfg.prediction_type!r} is not fused"
        if cfg.get("solver_order", 1) not in (1, 2, 3):
            return f"solver_order={cfg.solver_order!r}: only 1, 2, 3 are fused"
        if self.ALGORITHMS and self._algorithm() not in self.ALGORITHMS:
            return f"algorithm_type={self._algorithm()!r} is not fused by {type(self).__name__}"
        if cfg.get("solver_type", "midpoint") not in ("midpoint", "heun"):
            return f"solver_type={cfg.solver_type!r} is not fused"
        if cfg.get("thresholding") and not (0.0 <= cfg.dynamic_thresholding_ratio <= 1.0 and cfg.sample_max_value > 0):
            return "thresholding: ratio outside [0, 1] or sample_max_value <= 0 is not fused"
        return None

    def _algorithm(self) -> str:
        return self.config.algorithm_type

    def _grid_length(self) -> int:
        """Steps in the grid: len(timesteps)."""
        return len(self.timesteps)

    def _points(self, sigmas: np.ndarray) -> C.Point:
        """The solver's points of diffusers' sigmas: flow sigmas (alpha = 1 - sigma), else VE sigmas seen in VP."""
        if self.config.get("use_flow_sigmas", False):
            return C.Point.from_flow_sigma(sigmas)
        return C.Point.from_vp_of_ve_sigma(sigmas)

    def _conversion(self) -> P.Conversion:
        """Raw output -> the solver's prediction. flow_prediction is x0 = x - sigma v with diffusers' sigma: the flow
        sigma itself, or on VP points from VE sigmas the VE sigma (sigma_vp / alpha: "flow_ve")."""
        cfg = self.config
        mt = MODEL_TYPE[cfg.prediction_type]
        if mt == "flow" and not cfg.get("use_flow_sigmas", False):
            mt = "flow_ve"
        return P.Conversion.for_algorithm(mt, cfg.algorithm_type, bool(cfg.thresholding))

    def _threshold(self):
        cfg = self.config
        return (cfg.dynamic_thresholding_ratio, 1.0, cfg.sample_max_value) if cfg.get("thresholding") else None

    def _prediction(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The part of the output the solver uses: with a learned variance the network returns 2C channels and the
        first C are the prediction (diffusers slices [:, :3], which is that for 3-channel images)."""
        if (self.config.get("variance_type") in LEARNED and model_output.dim() >= 2 and sample.dim() >= 2
                and model_output.shape[1] == 2 * sample.shape[1]):
            return model_output[:, :sample.shape[1]]
        return model_output

    def _working_dtype(self, sample, model_output) -> torch.dtype:
        return torch.promote_types(sample.dtype, model_output.dtype)

    def _draws_noise(self) -> bool:
        return self.config.algorithm_type.startswith("sde")

    def _result_in_model_dtype(self) -> bool:
        return False

    def _make_plan(self, sigmas: np.ndarray, start: int, n: int) -> P.Plan:
        """The plan of steps start..n - 1 on diffusers' remaining sigmas."""
        return self._plan_steps(self._points(sigmas), self._orders(start, n))

    def _start_point(self, ev: P.Eval, sample, x_now):
        """(x, x_eval) of the fused step: where the update starts, and where the model was evaluated if not there."""
        return x_now, None

    def _hist_out(self, ev: P.Eval, slots):
        """Where the converted output is stored: its ring slot, if a later step reads it."""
        return None if ev.write_slot is None else slots[ev.write_slot]

    def _advanced(self, ev: P.Eval, sample: torch.Tensor) -> None:
        pass

    # ----- shared by the multistep classes -----
    def _multistep_orders(self, start: int, n: int, final_zero: bool) -> list[int]:
        """diffusers' multistep rule: warm-up by lower_order_nums (steps since set_timesteps), lower orders at the
        end (final_zero: the final_sigmas_type="zero" term of the classes that have it). sde-dpmsolver has no
        third-order form (diffusers has no such branch): its orders stop at 2."""
        cfg = self.config
        so = min(cfg.solver_order, 2) if cfg.get("algorithm_type") == "sde-dpmsolver" else cfg.solver_order
        orders = []
        for k, i in enumerate(range(start, n)):
            warm = min(k, so)
            final = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15) or final_zero)
            second = i == n - 2 and cfg.lower_order_final and n < 15
            orders.append(1 if so == 1 or warm < 1 or final else 2 if so == 2 or warm < 2 or second else 3)
        return orders

    def _plan_multistep(self, points: C.Point, orders: list[int], sde_third_order: str = "standard",
                        algorithm_type: str | None = None) -> P.Plan:
        """The multistep plan; SDE algorithms at eta = 1 with the third-order variant `sde_third_order`
        ("diffusers": its multistep scheduler's D2 term; "standard": k-diffusion's, where diffusers has none)."""
        alg = algorithm_type or self.config.algorithm_type
        sde = alg.startswith("sde")
        return P.plan_multistep(None, alg, self.config.solver_type, np.zeros(len(orders) + 1), orders, eta=1.0,
                                s_noise=1.0, multistep3=sde_third_order if sde else "standard", points=points)

    def _count_lower_order(self) -> None:
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1


class TwoCallStep(FusedStepMixin):
    """The schedulers that take two calls per interval and keep its start in diffusers' ``self.sample`` (DPMSolverSDE,
    KDPM2): the second call's update restarts from there, at the midpoint sample it is given."""

    def _start_point(self, ev: P.Eval, sample, x_now):
        if ev.source == "u":
            start = self.sample if self.sample.dtype == x_now.dtype else self.sample.to(x_now.dtype)
            return start, x_now
        return x_now, None


class StepWithGenerator(FusedStepMixin):
    """`step(model_output, timestep, sample, generator=None, return_dict=True)`: the singlestep, EDM and cosine
    schedulers' signature."""

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True) -> SchedulerOutput | tuple:
        """diffusers' `step` (same arguments and result), fused unless `fused_reason` says otherwise."""
        prev = self._fused(model_output, timestep, sample, generator, None)
        if prev is None:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        return scheduler_output(prev) if return_dict else (prev,)


class StepWithVarianceNoise(FusedStepMixin):
    """`step(model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True)`: the multistep
    and inverse schedulers' signature."""

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """diffusers' `step` (same arguments and result), fused unless `fused_reason` says otherwise."""
        prev = self._fused(model_output, timestep, sample, generator, variance_noise)
        if prev is None:
            return super().step(model_output, timestep, sample, generator=generator, variance_noise=variance_noise,
                                return_dict=return_dict)
        return scheduler_output(prev) if return_dict else (prev,)
