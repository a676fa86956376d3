"""One rank of a sharded sampling job (run by tests/test_distributed.py through torchrun, gloo on CPU).

Every sample i has its own x_T (seed i) and, for the SDE solvers, its own noise generator (seed 1000 + i), so a
sample's trajectory does not depend on which rank or batch it runs in. Each rank samples its contiguous shard of
the batch; the shards are gathered on rank 0 and saved. `run(indices)` is also called in one process over the
whole batch, for the comparison.

    torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py OUT.pt [cpu|cuda]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import dpm_kernels as dk

BATCH = 6
SHAPE = (2,)


def _model(ns):
    gm = dk.GaussianMixtureModel([[1.0, -0.5], [-1.0, 0.5]], [0.4, 0.6], noise_schedule=ns)
    return gm


def _x_T(indices, device):
    return torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)) for i in indices]).to(device)


def _gens(indices, device):
    return [torch.Generator(device=device).manual_seed(1000 + i) for i in indices]


def run(indices: list[int], device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every configuration of the test, for the samples `indices`."""
    from diffusers import DPMSolverMultistepScheduler

    from dpm_kernels.integrations.diffusers import FusedDPMSolverMultistepScheduler

    ns = dk.NoiseScheduleVP("discrete", alphas_cumprod=DPMSolverMultistepScheduler().alphas_cumprod)
    gm = _model(ns)
    if device != "cpu":  # the analytic model computes on the host; the samples and solver state stay on the GPU
        base = gm
        gm = lambda x, t: base(x, t).to(x.device)  # noqa: E731
    out = {}
    for alg in ("dpmsolver++", "sde-dpmsolver++"):
        solver = dk.DPMSolver(dk.model_wrapper(gm, ns), ns, algorithm_type=alg)
        out[f"DPMSolver-{alg}"] = solver.sample(_x_T(indices, device), steps=10, order=2, skip_type="logSNR",
                                                generator=_gens(indices, device)).cpu()
        sched = FusedDPMSolverMultistepScheduler(algorithm_type=alg, solver_order=2)
        sched.set_timesteps(10, device=device)
        x, gens = _x_T(indices, device), _gens(indices, device)
        for t in sched.timesteps:
            x = sched.step(gm(x, t.expand(len(indices))), t, x, generator=gens).prev_sample
        assert sched.fused_reason is None, sched.fused_reason
        out[f"diffusers-{alg}"] = x.cpu()
    return out


def started_marker(path: str | Path, rank: int) -> Path:
    """The file a rank writes once it runs the job: the test retries a launch only when no rank wrote one."""
    return Path(f"{path}.rank{rank}.started")


def main(path: str, device_type: str = "cpu") -> None:
    import torch.distributed as dist

    started_marker(path, int(os.environ["RANK"])).touch()
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{rank}" if device_type == "cuda" else "cpu"
    per = BATCH // world
    mine = run(list(range(rank * per, (rank + 1) * per)), device)
    gathered = {}
    for key, val in sorted(mine.items()):
        val = val.to(device).contiguous()
        parts = [torch.empty_like(val) for _ in range(world)]
        dist.all_gather(parts, val)
        gathered[key] = torch.cat(parts).cpu()
    if rank == 0:
        torch.save(gathered, path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
    # The job is done and its result saved. Leave without interpreter finalization: a gloo worker thread
    # (ProcessGroupGloo::runLoop) may still be releasing the last all_gather's tensors, which needs the GIL; once
    # Python is finalizing, that thread is unwound inside a noexcept destructor and the process aborts
    # ("terminate called without an active exception", SIGABRT) -- an upstream race that hit ~1 run in 3 here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
