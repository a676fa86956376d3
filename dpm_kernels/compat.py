"""The authors' per-update methods of `DPM_Solver`, for code that calls them directly.

Same names, arguments and return values as `dpm_solver_pytorch.DPM_Solver`; times are tensors of shape
(1,). They evaluate the model through `self.model_fn` (converted outputs, as the authors' code) and run each
linear combination as one fused step (`DPMSolver.combine`) with float64 coefficients. `sample` does not use them.
"""

from __future__ import annotations

import torch

from . import coefficients as C
from . import planner as P


def _f(t) -> float:
    return float(torch.as_tensor(t).reshape(-1)[0])


class AuthorsUpdatesMixin:
    def _pt(self, t, name: str) -> C.Point:
        """The point of the caller's time argument `name`, refused outside the schedule (`check_times`)."""
        t = _f(t)
        self.noise_schedule.check_times(t, name)
        return P.point(self.noise_schedule, t)

    def _pt_lambda(self, lam: float):
        t = float(self.noise_schedule.inverse_lambda64(lam))
        return t, P.point(self.noise_schedule, t)

    def _ttensor(self, t: float, like: torch.Tensor) -> torch.Tensor:
        return torch.full((1,), t, dtype=torch.float32, device=like.device)

    def dpm_solver_first_update(self, x, s, t, model_s=None, return_intermediate=False):
        upd = C.multistep(self.algorithm_type, "dpmsolver", 1, [self._pt(s, "s")], self._pt(t, "t"))
        if model_s is None:
            model_s = self.model_fn(x, s)
        x_t = self.combine(upd, x, [model_s])
        return (x_t, {"model_s": model_s}) if return_intermediate else x_t

    def singlestep_dpm_solver_second_update(self, x, s, t, r1=0.5, model_s=None, return_intermediate=False,
                                            solver_type="dpmsolver"):
        r1 = 0.5 if r1 is None else float(r1)
        ps, pt = self._pt(s, "s"), self._pt(t, "t")
        t1, p1 = self._pt_lambda(ps.lam + r1 * (pt.lam - ps.lam))
        ups = C.singlestep(self.algorithm_type, solver_type, 2, ps, [p1], pt)
        if model_s is None:
            model_s = self.model_fn(x, s)
        x_s1 = self.combine(ups[0], x, [model_s])
        model_s1 = self.model_fn(x_s1, self._ttensor(t1, x))
        x_t = self.combine(ups[1], x, [model_s1, model_s])
        return (x_t, {"model_s": model_s, "model_s1": model_s1}) if return_intermediate else x_t

    def singlestep_dpm_solver_third_update(self, x, s, t, r1=1.0 / 3.0, r2=2.0 / 3.0, model_s=None, model_s1=None,
                                           return_intermediate=False, solver_type="dpmsolver"):
        r1 = 1.0 / 3.0 if r1 is None else float(r1)
        r2 = 2.0 / 3.0 if r2 is None else float(r2)
        ps, pt = self._pt(s, "s"), self._pt(t, "t")
        h = pt.lam - ps.lam
        t1, p1 = self._pt_lambda(ps.lam + r1 * h)
        t2, p2 = self._pt_lambda(ps.lam + r2 * h)
        ups = C.singlestep(self.algorithm_type, solver_type, 3, ps, [p1, p2], pt)
        if model_s is None:
            model_s = self.model_fn(x, s)
        if model_s1 is None:
            x_s1 = self.combine(ups[0], x, [model_s])
            model_s1 = self.model_fn(x_s1, self._ttensor(t1, x))
        x_s2 = self.combine(ups[1], x, [model_s1, model_s])
        model_s2 = self.model_fn(x_s2, self._ttensor(t2, x))
        x_t = self.combine(ups[2], x, [model_s2, model_s1, model_s])
        if return_intermediate:
            return x_t, {"model_s": model_s, "model_s1": model_s1, "model_s2": model_s2}
        return x_t

    def multistep_dpm_solver_second_update(self, x, model_prev_list, t_prev_list, t, solver_type="dpmsolver"):
        return self.multistep_dpm_solver_update(x, model_prev_list, t_prev_list, t, 2, solver_type)

    def multistep_dpm_solver_third_update(self, x, model_prev_list, t_prev_list, t, solver_type="dpmsolver"):
        return self.multistep_dpm_solver_update(x, model_prev_list, t_prev_list, t, 3, solver_type)

    def singlestep_dpm_solver_update(self, x, s, t, order, return_intermediate=False, solver_type="dpmsolver",
                                     r1=None, r2=None):
        if order == 1:
            return self.dpm_solver_first_update(x, s, t, return_intermediate=return_intermediate)
        if order == 2:
            return self.singlestep_dpm_solver_second_update(x, s, t, r1=r1, return_intermediate=return_intermediate,
                                                            solver_type=solver_type)
        if order == 3:
            return self.singlestep_dpm_solver_third_update(x, s, t, r1=r1, r2=r2,
                                                           return_intermediate=return_intermediate,
                                                           solver_type=solver_type)
        raise ValueError(f"order: solver order must be 1, 2 or 3, got {order}")

    def multistep_dpm_solver_update(self, x, model_prev_list, t_prev_list, t, order, solver_type="dpmsolver"):
        """Multistep update of `order` from t_prev_list[-1] to t; lists are oldest first (the authors' order)."""
        if order not in (1, 2, 3):
            raise ValueError(f"order: solver order must be 1, 2 or 3, got {order}")
        prev = [self._pt(tp, "t_prev_list") for tp in list(t_prev_list)[::-1][:order]]
        ms = list(model_prev_list)[::-1][:order]
        upd = C.multistep(self.algorithm_type, solver_type, order, prev, self._pt(t, "t"))
        return self.combine(upd, x, ms)

    def dpm_solver_adaptive(self, x, order, t_T, t_0, h_init=0.05, atol=0.0078, rtol=0.05, theta=0.9, t_err=1e-5,
                            solver_type="dpmsolver"):
        from .adaptive import run_adaptive

        if order not in (2, 3):
            raise ValueError(f"order: for adaptive step size solver, order must be 2 or 3, got {order}")
        self.noise_schedule.check_times(float(t_T), "t_T")
        self.noise_schedule.check_times(float(t_0), "t_0")
        with torch.no_grad():
            return run_adaptive(self, x, order, float(t_T), float(t_0), h_init, atol, rtol, theta, t_err, solver_type)
