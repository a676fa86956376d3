"""Host cost per step of each front end on each backend, against the bare op call, with a model that costs nothing;
and the first-use cost of a trajectory.

    python benchmarks/bench_overhead.py                          # 1x4x64x64 and 2x4x128x128, float32, CPU
    python benchmarks/bench_overhead.py --device cuda            # the same on a GPU: cuda and triton backends
    python benchmarks/bench_overhead.py --smoke --out ""         # tiny shapes: checks that the script runs

A 20-step DPM-Solver++(2M) trajectory (epsilon model, discrete DDPM schedule, no thresholding), run by each
provider side by side, interleaved round by round (one trajectory of each provider per round, the order rotating).
Every fused provider runs on each backend asked for (`--backends`, default: every backend that serves the device):

- ``bare``: the backend's op called directly on precomputed coefficient rows and ring slots (the floor of any front
  end: one op call per step);
- ``fused-scheduler``: `FusedDPMSolverMultistepScheduler.step`, one scheduler reused (set_timesteps + 20 steps, as a
  pipeline does; set_timesteps is not counted);
- ``fresh-scheduler``: a new scheduler object, set_timesteps and 20 steps per trajectory, all counted (a script that
  builds its scheduler per image);
- ``multistep_update``: a custom loop with a `History` and float times;
- ``DPMSolver.sample``: the authors' API with `model_wrapper` (its model wrapper runs every step), one solver reused;
- ``fresh-DPMSolver``: a new `DPMSolver` per `sample()` call, as the authors' examples do;
- ``k_diffusion.2m``: `dpm_kernels.k_diffusion.sample_dpmpp_2m` with a denoiser;
- ``diffusers``: diffusers' own `DPMSolverMultistepScheduler.step` (once, not per backend).

The model returns one precomputed tensor. Per-step time = trajectory time / 20; on a GPU it is the host time (no
synchronisation inside the trajectory), and the script also reports whether a timed trajectory synchronised
(torch.cuda.set_sync_debug_mode). The first round warms everything up (kernels, caches, plans) and is not counted:
what is measured is the steady state of a sampler that generates image after image. Reported: median per-step time
over rounds, its 25-75% range, and the ratio of medians to ``bare`` of the same backend; a row whose range is wider
than a third of its median is flagged ``noisy``.

First use (``first-use`` rows, microseconds per trajectory, not per step): a new fused scheduler on a sigma grid no
earlier trajectory used (beta_end moved by a hair each round), set_timesteps, and its first step -- construction,
planning and upload all counted -- against diffusers' scheduler doing the same. CSV rows (device, torch, diffusers,
date) are appended to <out>/overhead-<device>-<date>.csv and the markdown table is written beside it.
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
from dpm_kernels.backends import registry
from dpm_kernels.benchmark import device_name, load_average, load_line, results_csv
from dpm_kernels.integrations.diffusers import FusedDPMSolverMultistepScheduler
from dpm_kernels.k_diffusion import sample_dpmpp_2m

RESULTS = Path(__file__).resolve().parent / "results"  # this checkout's record, wherever it is run from

STEPS = 20
SHAPES = {"latent64": (1, 4, 64, 64), "latent128": (2, 4, 128, 128)}
SMOKE_SHAPES = {"tiny": (1, 4, 8, 8)}
FRONT_ENDS = ("bare", "fused-scheduler", "fresh-scheduler", "multistep_update", "DPMSolver.sample", "fresh-DPMSolver",
              "k_diffusion.2m")
FIRST_USE_ROUNDS = 10


def default_backends(device: torch.device) -> list[str]:
    """Every backend that can serve `device` here (the reference included on a CPU: its host cost is a baseline)."""
    names = [b.name for b in registry.BACKENDS if b.why_not(device) is None]
    return [n for n in names if n != "torch"] if device.type == "cuda" else names


def providers_for(backends: list[str]) -> list[tuple[str, str | None]]:
    """(front end, backend) pairs, diffusers last (backend None)."""
    return [(fe, b) for b in backends for fe in FRONT_ENDS] + [("diffusers", None)]


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
        self.sched_diffusers = DPMSolverMultistepScheduler(solver_order=2)
        self.model_fn = dk.model_wrapper(lambda x, t: self.eps, self.ns)
        self.sched_fused, self.solver = {}, {}

    def run(self, front_end: str, backend: str | None) -> float:
        """Runs one trajectory of `front_end` on `backend`; returns the seconds that count."""
        self.excluded = 0.0
        self.t_start = time.perf_counter()
        getattr(self, "_" + front_end.replace("-", "_").replace(".", "_"))(backend)
        return time.perf_counter() - self.t_start - self.excluded

    def _bare(self, backend):
        op = registry.by_name(backend).impl
        x = self.x0.clone()
        rows, slots, eps = self.rows, self.slots, self.eps
        if not registry.by_name(backend).self_checking:  # the reference: what a caller must check itself
            op = registry.checked(registry.by_name(backend))
        for i, ev in enumerate(self.plan.evals):
            h = [slots[s] for s in ev.read_slots] + [None]
            op(x, eps, None, None, h[0], None, None, None, rows[i], 0, False, 0.0, 1.0, 1.0, x,
               None if ev.write_slot is None else slots[ev.write_slot])
        return x

    def _new_scheduler(self, backend):
        s = FusedDPMSolverMultistepScheduler(solver_order=2)
        s.fused_backend = backend
        return s

    def _fused_scheduler(self, backend):
        if backend not in self.sched_fused:
            self.sched_fused[backend] = self._new_scheduler(backend)
        return self._scheduler(self.sched_fused[backend], exclude_set_timesteps=True)

    def _fresh_scheduler(self, backend):
        return self._scheduler(self._new_scheduler(backend), exclude_set_timesteps=False)

    def _diffusers(self, backend):
        return self._scheduler(self.sched_diffusers, exclude_set_timesteps=True)

    def _scheduler(self, sched, exclude_set_timesteps: bool):
        sched.set_timesteps(STEPS, device=self.device)
        x = self.x0.clone()
        start = time.perf_counter()
        for t in sched.timesteps:
            x = sched.step(self.eps, t, x).prev_sample
        if exclude_set_timesteps:
            self.excluded = start - self.t_start
        return x

    def _multistep_update(self, backend):
        x = self.x0.clone()
        hist = dk.History(x, order=2)
        ts = self.t_list
        for i in range(STEPS):
            dk.multistep_update(x, self.eps, hist, t=ts[i], t_next=ts[i + 1], noise_schedule=self.ns, order=2, out=x,
                                backend=backend)
        return x

    def _DPMSolver_sample(self, backend):
        if backend not in self.solver:
            self.solver[backend] = dk.DPMSolver(self.model_fn, self.ns, backend=backend)
        return self.solver[backend].sample(self.x0, steps=STEPS, order=2, skip_type="logSNR", method="multistep")

    def _fresh_DPMSolver(self, backend):
        solver = dk.DPMSolver(self.model_fn, self.ns, backend=backend)
        return solver.sample(self.x0, steps=STEPS, order=2, skip_type="logSNR", method="multistep")

    def _k_diffusion_2m(self, backend):
        eps, x0 = self.eps, self.x0
        return sample_dpmpp_2m(lambda x, s: eps, x0, self.sigmas, disable=True, backend=backend)

    def first_use(self, backend: str | None, k: int) -> float:
        """Seconds for a new scheduler on a never-planned grid (k-th): construction, set_timesteps, first step."""
        cfg = dict(solver_order=2, beta_end=0.02 * (1 + 1e-6 * k))
        _sync(self.device)
        t0 = time.perf_counter()
        s = DPMSolverMultistepScheduler(**cfg) if backend is None else FusedDPMSolverMultistepScheduler(**cfg)
        if backend is not None:
            s.fused_backend = backend
        s.set_timesteps(STEPS, device=self.device)
        s.step(self.eps, s.timesteps[0], self.x0)
        _sync(self.device)
        return time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_trajectory(case: Case, front_end: str, backend: str | None) -> tuple[float, bool]:
    """(seconds per step, whether the trajectory synchronised with the host)."""
    cuda = case.device.type == "cuda"
    if not cuda:
        return case.run(front_end, backend) / STEPS, False
    import warnings

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t = case.run(front_end, backend)
    torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return t / STEPS, any("synchroniz" in str(m.message) for m in w)


def _label(front_end: str, backend: str | None) -> str:
    return front_end if backend is None else f"{front_end}:{backend}"


def _row(device, shape_name, shape, provider, backend, times, rounds, unit, ref=None, synced=False) -> dict:
    ts = sorted(times)
    med = statistics.median(ts)
    q25, q75 = ts[len(ts) // 4], ts[(3 * len(ts)) // 4]
    return {
        "date": dt.date.today().isoformat(), "device": device_name(device), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "shape": "x".join(map(str, shape)), "name": shape_name,
        "provider": provider, "backend": backend or "", "unit": unit, "steps": STEPS, "rounds": rounds,
        "median_us": med * 1e6, "q25_us": q25 * 1e6, "q75_us": q75 * 1e6,
        "x_bare": "" if ref is None else med / ref, "noisy": int((q75 - q25) > med / 3), "host_sync": int(synced),
    }


def run(shapes: dict, device: torch.device, rounds: int, backends: list[str], first_use_rounds: int = FIRST_USE_ROUNDS
        ) -> list[dict]:
    rows = []
    providers = providers_for(backends)
    for shape_name, shape in shapes.items():
        case = Case(shape, device)
        for fe, b in providers:  # warm-up round: kernels built and loaded, plans and caches filled
            case.run(fe, b)
        times = {p: [] for p in providers}
        synced = {p: False for p in providers}
        for r in range(rounds):
            k = r % len(providers)
            for p in providers[k:] + providers[:k]:
                t, s = time_trajectory(case, *p)
                times[p].append(t)
                synced[p] |= s
        bare = {b: statistics.median(times[("bare", b)]) for b in backends}
        for fe, b in providers:
            rows.append(_row(device, shape_name, shape, fe, b, times[(fe, b)], rounds, "us/step",
                             bare.get(b), synced[(fe, b)]))
        first = {b: [] for b in [*backends, None]}
        for k in range(first_use_rounds):
            for b in first:
                first[b].append(case.first_use(b, 1 + k + first_use_rounds * len(rows)))
        for b, ts in first.items():
            rows.append(_row(device, shape_name, shape, "first-use" if b else "first-use-diffusers", b, ts,
                             first_use_rounds, "us/trajectory"))
    return rows


def markdown(rows: list[dict], device: torch.device) -> str:
    cuda = device.type == "cuda"
    head = "| shape | provider | backend | median us | 25-75% us | x bare |" + (" host sync |" if cuda else "")
    lines = [head, "|---|---|---|---|---|---|" + ("---|" if cuda else "")]
    for r in rows:
        flag = " (noisy)" if r["noisy"] else ""
        unit = "" if r["unit"] == "us/step" else " per trajectory"
        ratio = f"{r['x_bare']:.2f}" if r["x_bare"] != "" else ""
        line = (f"| {r['shape']} | {r['provider']}{unit} | {r['backend']} | {r['median_us']:.1f}{flag} | "
                f"{r['q25_us']:.1f}-{r['q75_us']:.1f} | {ratio} |")
        lines.append(line + (f" {'yes' if r['host_sync'] else 'no'} |" if cuda else ""))
    lines.append("")
    by = {(r["shape"], r["provider"], r["backend"]): r for r in rows}
    for r in rows:
        if r["provider"] == "diffusers":
            for b in sorted({q["backend"] for q in rows if q["provider"] == "fused-scheduler"}):
                fused = by[(r["shape"], "fused-scheduler", b)]
                lines.append(f"fused scheduler ({b}) vs diffusers' step at {r['shape']}: "
                             f"{r['median_us'] / fused['median_us']:.1f}x faster per step")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--backends", default="", help="comma-separated backends (default: every one serving the device)")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds (one trajectory of each provider each)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--smoke", action="store_true", help="one tiny shape, 3 rounds")
    p.add_argument("--out", default=str(RESULTS), help="results directory ('' to skip writing)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    backends = a.backends.split(",") if a.backends else default_backends(device)
    for b in backends:
        if b not in registry.NAMES:
            p.error(f"argument --backends: {b!r} is not one of {', '.join(registry.NAMES)}")
        why = registry.by_name(b).why_not(device)
        if why is not None:
            p.error(f"argument --backends: {why}")
    shapes, rounds = (SMOKE_SHAPES, 3) if a.smoke else (SHAPES, a.rounds)
    load = load_average()
    rows = run(shapes, device, rounds, backends, 2 if a.smoke else FIRST_USE_ROUNDS)
    head = (f"device: {device_name(device)}; torch {torch.__version__}; diffusers {diffusers.__version__}; "
            f"{dt.date.today().isoformat()}; float32, {STEPS}-step DPM-Solver++(2M), {rounds} interleaved rounds; "
            f"{load_line(load, load_average())}")
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
