"""Host cost per step of each front end, against the bare op call, with a model that costs nothing.

    python benchmarks/bench_overhead.py                          # 1x4x64x64 and 2x4x128x128, float32, CPU
    python benchmarks/bench_overhead.py --smoke --out ""         # tiny shapes: checks that the script runs

A 20-step DPM-Solver++(2M) trajectory (epsilon model, discrete DDPM schedule, no thresholding), run by each
provider side by side, interleaved round by round (one trajectory of each provider per round, the order rotating):

- ``bare``: ``torch.ops.dpm_kernels.fused_step`` on precomputed coefficient rows and ring slots (the floor of any
  front end: one op call per step);
- ``fused-scheduler``: `FusedDPMSolverMultistepScheduler.step` (set_timesteps + 20 steps);
- ``multistep_update``: a custom loop with a `History` and float times;
- ``DPMSolver.sample``: the authors' API with `model_wrapper` (its model wrapper runs every step);
- ``k_diffusion.2m``: `dpm_kernels.k_diffusion.sample_dpmpp_2m` with a denoiser;
- ``diffusers``: diffusers' own `DPMSolverMultistepScheduler.step`.

The model returns one precomputed tensor. Per-step time = trajectory time / 20; on a GPU it is the host time (no
synchronisation inside the trajectory), and the script also reports whether a timed trajectory synchronised
(torch.cuda.set_sync_debug_mode). The first round warms everything up (kernels, caches, plans) and is not counted:
what is measured is the steady state of a sampler that generates image after image. Reported: median per-step time
over rounds, its 25-75% range, and the ratio of medians to ``bare``; a row whose range is wider than a third of its
median is flagged ``noisy``. CSV rows (device, torch, diffusers, date) are appended to
<out>/overhead-<device>-<date>.csv and the markdown table is written beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler

import dpm_kernels as dk
from dpm_kernels import planner as P
from dpm_kernels.benchmark import device_name, results_csv
from dpm_kernels.integrations.diffusers import FusedDPMSolverMultistepScheduler
from dpm_kernels.k_diffusion import sample_dpmpp_2m

RESULTS = Path(__file__).resolve().parent / "results"  # this checkout's record, wherever it is run from

STEPS = 20
SHAPES = {"latent64": (1, 4, 64, 64), "latent128": (2, 4, 128, 128)}
SMOKE_SHAPES = {"tiny": (1, 4, 8, 8)}
PROVIDERS = ("bare", "fused-scheduler", "multistep_update", "DPMSolver.sample", "k_diffusion.2m", "diffusers")


class Case:
    """Everything the providers need for one shape, built once (model output, schedule, planned grid)."""

    def __init__(self, shape, device):
        g = torch.Generator().manual_seed(0)
        self.device = device
        self.x0 = torch.randn(shape, generator=g).to(device)
        self.eps = (0.1 * torch.randn(shape, generator=g)).to(device)
        sched = DPMSolverMultistepScheduler(solver_order=2)
        self.ns = dk.NoiseScheduleVP("discrete", alphas_cumprod=sched.alphas_cumprod)
        self.times = P.time_steps(self.ns, "logSNR", 1.0, 1.0 / self.ns.total_N, STEPS)
        self.t_list = self.times.tolist()
        plan = P.plan_multistep(self.ns, "dpmsolver++", "dpmsolver", self.times, P.multistep_orders(STEPS, 2, True, 10))
        self.plan = plan
        self.rows = P.DeviceTable(plan.table(P.Conversion("noise", "x0")), device).rows
        self.slots = torch.empty((plan.n_slots, *shape), device=device).unbind(0)
        self.sigmas = torch.cat([torch.from_numpy(np.exp(-P.point(self.ns, self.times[:-1]).lam)).float(),
                                 torch.zeros(1)]).to(device)
        self.sched_fused = FusedDPMSolverMultistepScheduler(solver_order=2)
        self.sched_diffusers = DPMSolverMultistepScheduler(solver_order=2)
        self.solver = dk.DPMSolver(dk.model_wrapper(lambda x, t: self.eps, self.ns), self.ns)

    def run(self, name: str) -> float:
        """Runs one trajectory of provider `name`; returns the seconds that count (all but set_timesteps)."""
        self.excluded = 0.0
        self.t_start = time.perf_counter()
        getattr(self, "_" + name.replace("-", "_").replace(".", "_"))()
        return time.perf_counter() - self.t_start - self.excluded

    def _bare(self):
        op = torch.ops.dpm_kernels.fused_step.default
        x = self.x0.clone()
        rows, slots, eps = self.rows, self.slots, self.eps
        for i, ev in enumerate(self.plan.evals):
            h = [slots[s] for s in ev.read_slots] + [None]
            op(x, eps, None, None, h[0], None, None, None, rows[i], 0, False, 0.0, 1.0, 1.0, x,
               None if ev.write_slot is None else slots[ev.write_slot])
        return x

    def _fused_scheduler(self):
        return self._scheduler(self.sched_fused)

    def _diffusers(self):
        return self._scheduler(self.sched_diffusers)

    def _scheduler(self, sched):
        """Only the step() calls count (set_timesteps is diffusers' own, the same for both schedulers)."""
        sched.set_timesteps(STEPS, device=self.device)
        x = self.x0.clone()
        start = time.perf_counter()
        for t in sched.timesteps:
            x = sched.step(self.eps, t, x).prev_sample
        self.excluded = start - self.t_start
        return x

    def _multistep_update(self):
        x = self.x0.clone()
        hist = dk.History(x, order=2)
        ts = self.t_list
        for i in range(STEPS):
            dk.multistep_update(x, self.eps, hist, t=ts[i], t_next=ts[i + 1], noise_schedule=self.ns, order=2, out=x)
        return x

    def _DPMSolver_sample(self):
        return self.solver.sample(self.x0, steps=STEPS, order=2, skip_type="logSNR", method="multistep")

    def _k_diffusion_2m(self):
        eps, x0 = self.eps, self.x0
        return sample_dpmpp_2m(lambda x, s: eps, x0, self.sigmas, disable=True)


def time_trajectory(case: Case, name: str) -> tuple[float, bool]:
    """(seconds per step, whether the trajectory synchronised with the host)."""
    cuda = case.device.type == "cuda"
    synced = False
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
    if cuda:
        import warnings

        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            t = case.run(name)
        synced = any("synchroniz" in str(m.message) for m in w)
        torch.cuda.set_sync_debug_mode(0)
    else:
        t = case.run(name)
    if cuda:
        torch.cuda.synchronize()
    return t / STEPS, synced


def run(shapes: dict, device: torch.device, rounds: int, providers=PROVIDERS) -> list[dict]:
    rows = []
    for shape_name, shape in shapes.items():
        case = Case(shape, device)
        for name in providers:  # warm-up round: kernels built and loaded, plans and caches filled
            case.run(name)
        times = {p: [] for p in providers}
        synced = {p: False for p in providers}
        for r in range(rounds):
            k = r % len(providers)
            for name in providers[k:] + providers[:k]:
                t, s = time_trajectory(case, name)
                times[name].append(t)
                synced[name] |= s
        bare = statistics.median(times["bare"])
        for name in providers:
            ts = sorted(times[name])
            med = statistics.median(ts)
            q25, q75 = ts[len(ts) // 4], ts[(3 * len(ts)) // 4]
            rows.append({
                "date": dt.date.today().isoformat(), "device": device_name(device), "torch": torch.__version__,
                "diffusers": diffusers.__version__, "shape": "x".join(map(str, shape)), "name": shape_name,
                "provider": name, "steps": STEPS, "rounds": rounds, "median_us": med * 1e6, "q25_us": q25 * 1e6,
                "q75_us": q75 * 1e6, "x_bare": med / bare, "noisy": int((q75 - q25) > med / 3),
                "host_sync": int(synced[name]),
            })
    return rows


def markdown(rows: list[dict], device: torch.device) -> str:
    cuda = device.type == "cuda"
    head = "| shape | provider | median us/step | 25-75% us | x bare |" + (" host sync |" if cuda else "")
    lines = [head, "|---|---|---|---|---|" + ("---|" if cuda else "")]
    for r in rows:
        flag = " (noisy)" if r["noisy"] else ""
        line = (f"| {r['shape']} | {r['provider']} | {r['median_us']:.1f}{flag} | {r['q25_us']:.1f}-{r['q75_us']:.1f} "
                f"| {r['x_bare']:.2f} |")
        lines.append(line + (f" {'yes' if r['host_sync'] else 'no'} |" if cuda else ""))
    fused = {r["shape"]: r for r in rows if r["provider"] == "fused-scheduler"}
    lines.append("")
    for r in rows:
        if r["provider"] == "diffusers":
            lines.append(f"fused scheduler vs diffusers' step at {r['shape']}: "
                         f"{r['median_us'] / fused[r['shape']]['median_us']:.1f}x faster per step")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds (one trajectory of each provider each)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--smoke", action="store_true", help="one tiny shape, 3 rounds")
    p.add_argument("--out", default=str(RESULTS), help="results directory ('' to skip writing)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    shapes, rounds = (SMOKE_SHAPES, 3) if a.smoke else (SHAPES, a.rounds)
    rows = run(shapes, device, rounds)
    head = (f"device: {device_name(device)}; torch {torch.__version__}; diffusers {diffusers.__version__}; "
            f"{dt.date.today().isoformat()}; float32, {STEPS}-step DPM-Solver++(2M), {rounds} interleaved rounds")
    table = markdown(rows, device)
    print(head + "\n")
    print(table)
    if a.out:
        csv_path = results_csv(rows, Path(a.out), "overhead", device)
        md_path = csv_path.with_suffix(".md")
        md_path.write_text(f"# Host cost per step of each front end\n\n{head}\n\n{table}\n")
        print(f"\nappended to {csv_path}; table in {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
