"""dpm_kernels: fused DPM-Solver / DPM-Solver++ sampling steps (Lu et al. 2022).

    import dpm_kernels as dk
    ns = dk.NoiseScheduleVP("discrete", betas=betas)
    model_fn = dk.model_wrapper(model, ns, model_type="noise")
    x0 = dk.DPMSolver(model_fn, ns, algorithm_type="dpmsolver++").sample(x_T, steps=20, order=2)
"""

from . import forks, layout, ops
from .analytic import GaussianMixtureModel, exact_ode_solution
from .forks import DPMS, DPMSolverSampler
from .model_wrapper import model_wrapper
from .schedule import NoiseSchedule, NoiseScheduleFlow, NoiseScheduleVP
from .solver import DPM_Solver, DPMSolver
from .update import History, multistep_update

__all__ = [
    "DPMS",
    "DPMSolver",
    "DPMSolverSampler",
    "DPM_Solver",
    "GaussianMixtureModel",
    "History",
    "NoiseSchedule",
    "NoiseScheduleFlow",
    "NoiseScheduleVP",
    "exact_ode_solution",
    "forks",
    "layout",
    "model_wrapper",
    "multistep_update",
    "ops",
]
__version__ = "0.1.0"
