"""Where the host time of a fused scheduler step goes, per backend: torch.profiler and cProfile over steady-state steps.

    python benchmarks/profile_step.py --device cuda --out OUT/profile.txt     # on a GPU: cuda and triton
    python benchmarks/profile_step.py --smoke                                 # tiny, on the CPU: the script runs

For each backend, a `FusedDPMSolverMultistepScheduler` (DPM-Solver++(2M), epsilon) runs one long trajectory: its
first step (planning, upload) and a warm-up stretch are not profiled; then `--trajectories` x 20 steady-state
`step()` calls are profiled twice (and the same for diffusers' own step):
- torch.profiler (CPU activities, and CUDA ones on a GPU): the operators, launches and synchronisations of the steps,
  sorted by self CPU time -- what the dispatcher and the kernels' launch path cost;
- cProfile: the Python functions of the steps, sorted by their own time -- what the front end costs.
Also printed: the per-step host time without any profiler, and the number of kernel launches per step (GPU).
The text goes to stdout and, with --out, to a file.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler

from dpm_kernels.backends import registry
from dpm_kernels.integrations.diffusers import FusedDPMSolverMultistepScheduler

STEPS = 20


class Steps:
    """One long trajectory whose first step (planning, upload) ran already: each call runs the next `k` steps."""

    def __init__(self, sched, x0, eps, total: int, device: torch.device):
        self.sched, self.eps, self.device = sched, eps, device
        sched.set_timesteps(total + 1, device=device)
        self.ts = iter(sched.timesteps)
        self.x = sched.step(eps, next(self.ts), x0.clone()).prev_sample

    def __call__(self, k: int) -> float:
        """Seconds per step of the next k steps, synchronised at the end only."""
        t0 = time.perf_counter()
        for _ in range(k):
            self.x = self.sched.step(self.eps, next(self.ts), self.x).prev_sample
        dt = time.perf_counter() - t0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return dt / k


def profile_backend(backend: str, shape, device: torch.device, n: int, rows: int) -> str:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g).to(device)
    eps = (0.1 * torch.randn(shape, generator=g)).to(device)
    if backend == "diffusers":
        sched = DPMSolverMultistepScheduler(solver_order=2)
    else:
        sched = FusedDPMSolverMultistepScheduler(solver_order=2)
        sched.fused_backend = backend
    k = n * STEPS
    steps = Steps(sched, x0, eps, 4 * k, device)
    steps(k)  # warm-up
    per_step = steps(k)
    out = [f"## {backend}: {per_step * 1e6:.1f} us/step host time without a profiler ({k} steady-state steps, "
           f"{'x'.join(map(str, shape))})"]
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                     if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        steps(k)
    avg = prof.key_averages()
    if device.type == "cuda":
        launches = sum(e.count for e in avg if "LaunchKernel" in e.key or e.key == "cuLaunchKernel")
        out.append(f"kernel launches per step: {launches / k:.2f}")
    out.append(avg.table(sort_by="self_cpu_time_total", row_limit=rows))
    pr = cProfile.Profile()
    pr.enable()
    steps(k)
    pr.disable()
    out.append(python_table(pstats.Stats(pr), k, rows))
    return "\n".join(out)


def python_table(stats: pstats.Stats, steps: int, rows: int) -> str:
    """The functions with the most own time, in microseconds per step (pstats prints seconds to 3 decimals)."""
    lines = ["| own us/step | total us/step | calls/step | function |", "|---|---|---|---|"]
    items = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:rows]
    for (path, line, name), (_, ncalls, tottime, cumtime, _) in items:
        where = f"{Path(path).name}:{line}({name})" if line else name
        lines.append(f"| {tottime / steps * 1e6:.2f} | {cumtime / steps * 1e6:.2f} | {ncalls / steps:.1f} | {where} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--backends", default="", help="comma-separated (default: every backend serving the device, "
                                                  "and diffusers' own step)")
    p.add_argument("--shape", default="1,4,128,128", help="sample shape, comma-separated")
    p.add_argument("--trajectories", type=int, default=10, help="profiled trajectories per profiler")
    p.add_argument("--rows", type=int, default=25, help="rows per table")
    p.add_argument("--smoke", action="store_true", help="1x4x8x8, 1 trajectory, 10 rows")
    p.add_argument("--out", default="", help="also write the text to this file")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.smoke:
        a.shape, a.trajectories, a.rows = "1,4,8,8", 1, 10
    shape = tuple(int(v) for v in a.shape.split(","))
    names = a.backends.split(",") if a.backends else [
        b.name for b in registry.BACKENDS if b.why_not(device) is None and not (device.type == "cuda" and
                                                                               b is registry.TORCH)] + ["diffusers"]
    for n in names:
        if n != "diffusers" and (n not in registry.NAMES or registry.by_name(n).why_not(device) is not None):
            p.error(f"argument --backends: {n!r} cannot serve {device} here")
    text = f"# Host time of a fused scheduler step, {device}, torch {torch.__version__}\n\n" + "\n\n".join(
        profile_backend(n, shape, device, a.trajectories, a.rows) for n in names)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
