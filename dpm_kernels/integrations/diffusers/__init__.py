"""diffusers' DPM-Solver schedulers with a fused `step()`: one fused-step op call per step.

Drop-ins (each a subclass of the diffusers class named after "Fused"): FusedDPMSolverMultistepScheduler,
FusedDPMSolverSinglestepScheduler, FusedDPMSolverMultistepInverseScheduler (`vp.py`),
FusedEDMDPMSolverMultistepScheduler, FusedCosineDPMSolverMultistepScheduler (`ve.py`), FusedDPMSolverSDEScheduler
(`sde.py`), FusedUniPCMultistepScheduler (`unipc.py`), FusedKDPM2DiscreteScheduler,
FusedKDPM2AncestralDiscreteScheduler (`kdpm2.py`), FusedCogVideoXDPMScheduler (`cogvideox.py`: its step is passed
the previous x0 and timestep by the pipeline); what they share is `_common.py`.

    from dpm_kernels.integrations.diffusers import FusedDPMSolverMultistepScheduler
    pipe.scheduler = FusedDPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.fused_backend = "auto"        # or any of backends.registry.CHOICES (an attribute, not config)

Every class subclasses its diffusers original and leaves `__init__` alone (ConfigMixin derives the config keys from
its signature), so `from_config`, `save_config`, `set_timesteps` (with `mu`, custom timesteps), `scale_model_input`,
`add_noise` and every sigma grid (Karras, exponential, beta, Lu lambdas, flow sigmas and shifts, timestep_spacing,
final_sigmas_type, lambda_min_clipped, rescaled betas) are diffusers' own. Only `step()` changes: converting the
output (epsilon / sample / v_prediction / flow_prediction, EDM's preconditioning) to x0 or eps, dynamic thresholding
(diffusers' semantics, s = clamp(quantile(|x0|, ratio), 1, sample_max_value); noise-prediction solvers go via x0 and
back), storing the result in a ring buffer owned by the scheduler, the multistep / singlestep combination and the SDE
noise run in ONE pass.

Coefficients are float64, planned on the host (`planner`) from the scheduler's sigmas (CPU tensors in diffusers) for
every remaining step at the first `step()` after `set_timesteps` -- when the starting index is known -- and uploaded
once (pinned + non_blocking on CUDA); each step then uses a row view. The scheduler keeps its last few plans: the
same trajectory run again (the next image) plans nothing and reuses the device table. No step reads a device tensor
on the host, so a loop of steps can be captured in a CUDA graph: call `set_begin_index(0)` first (else diffusers'
`_init_step_index` searches the timesteps: one sync at the first step), give SDE noise through a CUDA generator or
`variance_noise` (a CPU generator's noise is copied from pageable memory), and keep the scheduler (its row table and
ring) alive and on that trajectory while replaying.

Tolerance: diffusers forms its coefficients in float32 (lambda = log(alpha) - log(sigma), exp(h) - 1 without expm1)
and the multistep scheduler rounds the sample to float32 in every step; ours are float64. Float32 samples agree with
diffusers' to that rounding: max |ours - diffusers| / max(1, max |x|) is ~1e-6 per step and up to ~3e-5 for
noise-prediction solvers of order 3 (whose large first steps amplify diffusers' lambda rounding); the tests require
ours to be no farther from diffusers' float64 trajectory than twice diffusers' own float32 trajectory. Half precision
and mixed dtypes: diffusers rounds intermediates to half, we compute in float32 and round once (result dtypes are
diffusers'). SDE noise is drawn as diffusers draws it (`randn_tensor`, same shape / device / dtype, every step; the
Brownian trees of the cosine and SDE schedulers queried at the same float32 times), so one seed gives the same
trajectory.

Where diffusers itself fails, the drop-ins do better: a zero-length step (a repeated sigma, an EDM or cosine
sigma_min end) is the identity and later orders are capped so that no update spans it (diffusers' heun form divides
0 by 0, its cosine scheduler recurses without end in the Brownian tree); a model output with a learned variance is
cut to the sample's channels (diffusers cuts [:, :3]); singlestep dpmsolver with thresholding is fused (diffusers'
code fails); sde-dpmsolver runs at most second order (diffusers has no third-order branch); third-order SDE steps of
the EDM, cosine and (flow-sigma) inverse schedulers (diffusers: UnboundLocalError / AssertionError) run k-diffusion's
3M SDE update; SDE inversion on a grid up in noise is refused with a clear error (diffusers returns NaN), and decided
by the grid's direction, not the name (diffusers' flow-sigma "inverse" grid runs towards the data: fused);
DPMSolverSDE and KDPM2 with prediction_type="sample" are fused (diffusers: NotImplementedError); KDPM2 grids whose
first timestep repeats begin at their first call (diffusers: NaN); the CogVideoX step with a timestep_back at its own
lambda is first order (diffusers: NaN).

Fallback (with `fused_backend="auto"`; a backend named there runs every step or raises why it cannot, and an unknown
name raises when set): a configuration that is not fused runs diffusers' own `step()` for the whole trajectory, and
`scheduler.fused_reason` says why (None: fused): a prediction type or solver order outside what diffusers defines,
options unknown to this module set to non-default values (checked with diffusers 0.42), and, decided at the first
step, unsupported dtypes, model outputs that do not fit the sample. Inputs that require grad are fused: the step
runs the op's differentiable form (`dpm_kernels.step_autograd`), reading earlier outputs as the tensors autograd
tracks, so the result and pred_original_sample carry gradients.

State: `step_index`, `lower_order_nums` and (singlestep) `sample` evolve as in diffusers. The parent's
`model_outputs` list is not maintained during a fused trajectory: reading it gives a tuple of views into the ring
(oldest first; None where no later step needs the output), valid until the next step. UniPC's state (`model_outputs`
as a list, `last_sample`, `this_order`, `timestep_list`) reads as diffusers' at every step; writing it mid-trajectory
hands the rest of the trajectory to diffusers' own step (`unipc.py`).
"""

from .cogvideox import FusedCogVideoXDPMScheduler
from .kdpm2 import FusedKDPM2AncestralDiscreteScheduler, FusedKDPM2DiscreteScheduler
from .sde import FusedDPMSolverSDEScheduler
from .unipc import FusedUniPCMultistepScheduler
from .ve import FusedCosineDPMSolverMultistepScheduler, FusedEDMDPMSolverMultistepScheduler
from .vp import (
    FusedDPMSolverMultistepInverseScheduler,
    FusedDPMSolverMultistepScheduler,
    FusedDPMSolverSinglestepScheduler,
)

__all__ = [
    "FusedCogVideoXDPMScheduler",
    "FusedCosineDPMSolverMultistepScheduler",
    "FusedDPMSolverMultistepInverseScheduler",
    "FusedDPMSolverMultistepScheduler",
    "FusedDPMSolverSDEScheduler",
    "FusedDPMSolverSinglestepScheduler",
    "FusedEDMDPMSolverMultistepScheduler",
    "FusedKDPM2AncestralDiscreteScheduler",
    "FusedKDPM2DiscreteScheduler",
    "FusedUniPCMultistepScheduler",
]
