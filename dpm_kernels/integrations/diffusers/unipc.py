"""The fused drop-in of diffusers' `UniPCMultistepScheduler` (UniPC, Zhao et al. 2023): every `step()` is one fused op
call that corrects the previous step's result (UniC), converts and stores the new output and predicts the next
sample (UniP).

diffusers' step k+1 corrects x_{k+1} from `last_sample` (where step k's predictor started) and then predicts from the
corrected sample. Both updates share the x coefficient, the m0 term and the divided differences, so the corrected
sample is the predicted x_{k+1} the caller passes plus a combination of outputs; the fused step is one row over the
new output and the ring (`planner.plan_unipc`). The corrected sample itself is never written: `last_sample` is derived
from the ring when read.

diffusers' state (`model_outputs`, `last_sample`, `this_order`, `timestep_list`, `lower_order_nums`, `step_index`) can
be read at any time. Writing `model_outputs` or `last_sample` (an item of the list too) during a fused trajectory hands
the rest of the trajectory to diffusers' own step, from the state the fused steps reached (`fused_reason` says so);
ChronoEdit's pipeline does that when it drops frames mid-trajectory.
"""

from __future__ import annotations

import functools

import torch
from diffusers import UniPCMultistepScheduler

from ... import coefficients as C
from ... import planner as P
from ._common import MODEL_TYPE, FusedStepMixin, scheduler_output

UNIPC_GRID_KEYS = frozenset({"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                             "rescale_betas_zero_snr", "use_karras_sigmas", "use_exponential_sigmas",
                             "use_beta_sigmas", "final_sigmas_type", "timestep_spacing", "steps_offset", "flow_shift",
                             "use_dynamic_shifting", "time_shift_type", "sigma_min", "sigma_max", "shift_terminal"})
UNIPC_STEP_KEYS = frozenset({"solver_order", "prediction_type", "thresholding", "dynamic_thresholding_ratio",
                             "sample_max_value", "predict_x0", "solver_type", "lower_order_final", "disable_corrector",
                             "solver_p", "use_flow_sigmas"})
FUSED_ORDERS = (1, 2, 3)  # a UniC of order 3 combines four outputs: the op's third history input


class _StateList(list):
    """`model_outputs` read during a fused trajectory: the outputs diffusers would hold. Assigning an item hands the
    trajectory to diffusers' own step first; the list then is diffusers' own state."""

    def __init__(self, items, on_write):
        super().__init__(items)
        self._on_write = on_write

    def __setitem__(self, index, value):
        on_write, self._on_write = self._on_write, None
        if on_write is not None:
            on_write(self)
        super().__setitem__(index, value)


class FusedUniPCMultistepScheduler(FusedStepMixin, UniPCMultistepScheduler):
    """`UniPCMultistepScheduler` with a fused `step()`; same config, same results (package doc, module doc).

    Where diffusers fails, better defined: a last step to sigma = 0 is finite with bh1 and with predict_x0=False (the
    first-order update's limit; diffusers: 0 * inf = NaN) and first order whatever lower_order_final says (higher orders
    have no limit there; diffusers: inf / NaN); a zero-length step (a repeated sigma) is the identity and no corrector
    spans it (diffusers: NaN); a grid whose first timestep repeats, entered at that timestep without set_begin_index,
    starts at its first index (diffusers starts at the second and fails at the last step). ``solver_p`` (another
    scheduler as the predictor) runs diffusers' own step.
    Attributes: ``fused_backend`` (a `backends.registry.CHOICES` name), ``fused_reason`` (read-only).
    """

    GRID_KEYS = UNIPC_GRID_KEYS
    STEP_KEYS = UNIPC_STEP_KEYS
    _fz_last = None  # diffusers' last_sample outside a fused trajectory
    _fz_x = None  # x of the last fused step: the sample it started from (the previous result, if it corrected)
    _fz_held = None  # the last fused step's result (x of the next step if it corrects) and its version counter
    _fz_held_version = 0
    _fz_result_dtype = None  # diffusers' result dtype: the sample's where no corrector runs, else last_sample's

    @functools.wraps(UniPCMultistepScheduler.set_timesteps)
    def set_timesteps(self, *args, **kwargs):
        self._fz_reset()  # first: diffusers resets model_outputs and last_sample, which must not hand anything over
        UniPCMultistepScheduler.set_timesteps(self, *args, **kwargs)
        self._fz_reset()

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True):
        """diffusers' `step` (same arguments and result), fused unless `fused_reason` says otherwise."""
        out = self._fused(model_output, timestep, sample, None, None)
        if out is None:
            return super().step(model_output, timestep, sample, return_dict=return_dict)
        tl = self.timestep_list
        tl[:-1] = tl[1:]
        tl[-1] = timestep
        self._fz_held, self._fz_held_version = out, out._version
        prev = out if out.dtype == self._fz_result_dtype else out.to(self._fz_result_dtype)
        return scheduler_output(prev) if return_dict else (prev,)

    # ----- diffusers' state -----
    @property
    def model_outputs(self):
        """diffusers' list (oldest first); during a fused trajectory the stored outputs as ring views, None where an
        output was not kept (no later step reads it), valid until the next step."""
        if self._fz_traj is None:
            return self._fz_outputs
        return _StateList(self._fz_state_outputs(), lambda lst: self._fz_handover("model_outputs", lst))

    @model_outputs.setter
    def model_outputs(self, value) -> None:
        self._fz_handover("model_outputs")
        self._fz_outputs = value

    @property
    def last_sample(self):
        """The sample the last step's predictor started from: its corrected sample (derived from the ring)."""
        if self._fz_traj is None:
            return self._fz_last
        last = self._fz_corrected_sample()
        if last is None:
            raise RuntimeError("last_sample: the corrected sample of the last fused step is not kept (no later step "
                               "reads its output: the trajectory's end, or disable_corrector at the next step)")
        return last

    @last_sample.setter
    def last_sample(self, value) -> None:
        self._fz_handover("last_sample")
        self._fz_last = value

    def _fz_state_outputs(self) -> list:
        """diffusers' model_outputs after the fused steps so far: the last solver_order outputs, oldest first (from
        before the trajectory where it has not taken that many steps)."""
        traj, k = self._fz_traj, self.config.solver_order
        evals, calls = traj.plan.evals, traj.calls
        before = list(self._fz_outputs or [None] * k)
        out = []
        for j in range(calls - k, calls):
            if j < 0:
                out.append(before[len(before) + j] if -j <= len(before) else None)
                continue
            s = evals[j].write_slot  # still there unless a later step wrote the same slot
            alive = s is not None and all(evals[i].write_slot != s for i in range(j + 1, calls))
            out.append(traj.slots[s] if alive else None)
        return out

    def _fz_corrected_sample(self) -> torch.Tensor | None:
        """diffusers' last_sample after the fused steps so far (None before the first; None if not derivable)."""
        traj = self._fz_traj
        if traj.calls == 0:
            return self._fz_last
        i = traj.calls - 1
        ev = traj.plan.evals[i]
        x = self._fz_x
        if ev.corrected:
            d = traj.plan.correction[i].tolist()
            newest = None if ev.write_slot is None else traj.slots[ev.write_slot]
            ms = [newest] + [traj.slots[s] for s in ev.read_slots]
            if any(dj != 0.0 and (j >= len(ms) or ms[j] is None) for j, dj in enumerate(d)):
                return None
            x = x + sum(dj * ms[j].to(x.dtype) for j, dj in enumerate(d) if dj != 0.0)
        return x.to(self._fz_result_dtype)

    def _fz_handover(self, what: str, outputs: list | None = None) -> None:
        """`what` was written during a fused trajectory: diffusers' own step continues it from the state reached."""
        traj = self._fz_traj
        if traj is None:
            return
        state = self._fz_state_outputs()
        last = self._fz_corrected_sample()
        self._fz_traj = None
        self._fz_data_reason = f"{what} was set during the trajectory: diffusers' own step() continues it"
        copies = [None if m is None else m.clone() for m in state]
        if outputs is None:
            outputs = copies
        else:
            list.__init__(outputs, copies)
        self._fz_outputs = outputs
        self._fz_last = last

    # ----- hooks of FusedStepMixin -----
    def _class_reason(self) -> str | None:
        cfg = self.config
        if self.solver_p is not None:
            return "solver_p: another scheduler as UniP's predictor runs diffusers' own step()"
        if cfg.prediction_type not in MODEL_TYPE:
            return f"prediction_type={cfg.prediction_type!r} is not fused"
        if cfg.prediction_type == "flow_prediction" and not self.predict_x0:
            return "prediction_type='flow_prediction' with predict_x0=False: diffusers does not define it"
        if cfg.solver_order not in FUSED_ORDERS:
            return f"solver_order={cfg.solver_order!r}: orders {FUSED_ORDERS} are fused"
        if cfg.solver_type not in C.UNIPC_VARIANTS:
            return f"solver_type={cfg.solver_type!r} is not fused"
        if self._threshold() is not None and not (0.0 <= cfg.dynamic_thresholding_ratio <= 1.0
                                                  and cfg.sample_max_value > 0):
            return "thresholding: ratio outside [0, 1] or sample_max_value <= 0 is not fused"
        return None

    def _config_key(self) -> tuple:
        # and the instance attributes diffusers' step reads (set from the config in __init__, writable after)
        return (super()._config_key(), bool(self.predict_x0), tuple(self.disable_corrector))

    def _conversion(self) -> P.Conversion:
        """x0 (predict_x0) or eps; flow_prediction is x0 = x - sigma v with diffusers' sigma (`FusedStepMixin`).
        Thresholding applies to x0 only: diffusers ignores it with predict_x0=False."""
        cfg = self.config
        mt = MODEL_TYPE[cfg.prediction_type]
        if mt == "flow" and not cfg.use_flow_sigmas:
            mt = "flow_ve"
        return P.Conversion(mt, "x0" if self.predict_x0 else "eps", self._threshold() is not None)

    def _threshold(self):
        cfg = self.config
        return (cfg.dynamic_thresholding_ratio, 1.0, cfg.sample_max_value) if cfg.thresholding and self.predict_x0 \
            else None

    def _draws_noise(self) -> bool:
        return False

    def _orders(self, start: int, n: int) -> list[int]:
        """diffusers' rule: lower_order_final lowers the order to the steps left (at any step count), and the warm-up
        to the steps taken since set_timesteps + 1."""
        cfg = self.config
        so = cfg.solver_order
        return [min(min(so, n - i) if cfg.lower_order_final else so, min(k, so) + 1)
                for k, i in enumerate(range(start, n))]

    def _make_plan(self, sigmas, start: int, n: int) -> P.Plan:
        # diffusers corrects at step index i > 0 after a step of this trajectory, unless i - 1 is in disable_corrector
        correct = [k > 0 and i - 1 not in self.disable_corrector for k, i in enumerate(range(start, n))]
        return P.plan_unipc(self._points(sigmas), self._orders(start, n), correct, self.config.solver_type,
                            bool(self.predict_x0))

    def _start_point(self, ev: P.Eval, sample, x_now):
        """A corrected step starts from the previous step's result (diffusers: from last_sample, with the same x
        coefficient); the model output is converted at the sample passed, if that is another tensor."""
        if ev.corrected:
            held = self._fz_held
            if sample is held:
                if held._version != self._fz_held_version:
                    raise RuntimeError("sample: the tensor the previous step() returned was modified in place; the "
                                       "UniPC corrector needs it as returned (pass a modified copy instead)")
                x_now = None
            x = held
        else:
            x, x_now = x_now, None
        self._fz_x = x
        return x, x_now

    def _advanced(self, ev: P.Eval, sample: torch.Tensor) -> None:
        self._count_lower_order()
        self.this_order = ev.order
        if not ev.corrected:
            self._fz_result_dtype = sample.dtype

    def _init_step_index(self, timestep) -> None:
        """diffusers' search, except that a grid whose first timestep repeats, entered at that timestep, starts at
        index 0 (diffusers takes the second occurrence: one step past the grid's start, so the loop over the timesteps
        fails at its last step)."""
        super()._init_step_index(timestep)
        ts = self.host_timesteps()
        if self.begin_index is None and self._step_index == 1 and ts[0] == ts[1]:
            self._step_index = 0  # the search found ts[1], which equals ts[0]: the timestep is the grid's first
