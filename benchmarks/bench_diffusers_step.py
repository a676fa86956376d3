"""Per-step time of `step()`: the fused diffusers schedulers against diffusers' own (CPU by default).

    python benchmarks/bench_diffusers_step.py                    # the full set (quiet machine: minutes)
    python benchmarks/bench_diffusers_step.py --smoke --out ""   # tiny shapes, checks that the script runs
    python benchmarks/bench_diffusers_step.py --schedulers all --shapes latent64,latent128 --thresholding off
                                                                 # every drop-in against its diffusers class

Configurations: a 1x4x64x64 and a 1x4x128x128 latent and a 2x3x256x256 pixel batch (and, asked for by name, a
1x16x21x60x90 video latent), solver order 2 and 3,
thresholding off and on (sample_max_value 1.5), DPMSolverMultistepScheduler's defaults otherwise (dpmsolver++,
epsilon, 20 steps). `--schedulers` picks the scheduler classes (default: the multistep one; "all": every drop-in,
SDE ones with a seeded generator, the cosine and SDE schedulers with diffusers' Brownian tree, whose queries are
timed on both sides as part of the step; the KDPM2 classes take two step() calls per interval, each timed; the
CogVideoX scheduler is passed its previous x0 and timestep back, as its pipelines do). Providers: "diffusers" (the
diffusers class's step) and "fused-<backend>" (its drop-in with each backend that can serve the device). Only the
scheduler is timed: the model output is a fixed tensor. Each provider runs `--reps` trajectories; every step() call
is timed (CUDA events on a GPU). Reported: the median over the steady-state steps (index >= order, i.e. after the
warm-up steps; this includes the first-order final step), their 20/80% quantiles, the median first step (the fused
scheduler plans the whole trajectory there) and the speed-up of the median over diffusers'. A markdown table goes to
stdout; CSV rows (device, torch and diffusers versions, date) are appended to
<out>/diffusers_step-<device>-<date>.csv, and the table of this run is written beside it (.md); runs with other
schedulers than the multistep one go to diffusers_family-<device>-<date>.*.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import statistics
import time
from pathlib import Path

import diffusers
import torch

from dpm_kernels.backends import registry
from dpm_kernels.benchmark import device_name, load_average, load_line, quantiles, results_csv
from dpm_kernels.integrations import diffusers as fused_diffusers

RESULTS = Path(__file__).resolve().parent / "results"  # this checkout's record, wherever it is run from

SHAPES = {"latent64": (1, 4, 64, 64), "latent128": (1, 4, 128, 128), "pixels256": (2, 3, 256, 256),
          "video": (1, 16, 21, 60, 90)}  # a video latent (Wan / CogVideoX: 16 channels, 21 latent frames, 480x720)
DEFAULT_SHAPES = ("latent64", "latent128", "pixels256")
SMOKE_SHAPES = {"tiny": (1, 4, 8, 8)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# name: (diffusers class name, config, highest order timed); the drop-in is "Fused" + the class name. The SDE
# classes are timed at second order: diffusers has no third-order SDE step in most of them.
SCHEDULERS = {
    "multistep": ("DPMSolverMultistepScheduler", {}, 3),
    "singlestep": ("DPMSolverSinglestepScheduler", {}, 3),
    "inverse": ("DPMSolverMultistepInverseScheduler", {}, 3),
    "multistep-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, 2),
    "edm": ("EDMDPMSolverMultistepScheduler", {}, 3),
    "edm-sde": ("EDMDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, 2),
    "cosine": ("CosineDPMSolverMultistepScheduler", {}, 2),
    "sde": ("DPMSolverSDEScheduler", {"noise_sampler_seed": 0}, 2),
    "unipc": ("UniPCMultistepScheduler", {}, 3),
    "kdpm2": ("KDPM2DiscreteScheduler", {}, 2),  # two step() calls per interval
    "kdpm2-ancestral": ("KDPM2AncestralDiscreteScheduler", {}, 2),
    "cogvideox": ("CogVideoXDPMScheduler", {}, 2),  # its step() takes the previous x0 and timestep back
}


def has_option(scheduler: str, name: str) -> bool:
    return name in inspect.signature(getattr(diffusers, SCHEDULERS[scheduler][0]).__init__).parameters


def providers(device: torch.device) -> list[str]:
    return ["diffusers"] + [f"fused-{b.name}" for b in registry.auto_order(device) if b.why_not(device) is None]


def make_scheduler(provider: str, scheduler: str, order: int, thresholding: bool):
    cls_name, extra, _ = SCHEDULERS[scheduler]
    cls = getattr(diffusers, cls_name) if provider == "diffusers" else getattr(fused_diffusers, "Fused" + cls_name)
    cfg = dict(extra)
    if has_option(scheduler, "solver_order"):
        cfg["solver_order"] = order
    if thresholding:
        cfg.update(thresholding=True, sample_max_value=1.5)
    sched = cls(**cfg)
    if provider != "diffusers":
        sched.fused_backend = provider.removeprefix("fused-")
        assert sched.fused_reason is None, sched.fused_reason
    return sched


def step_once(sched, model_out, t, x, kw: dict, carry: dict):
    """One step() call in the scheduler's own signature; the next sample. CogVideoX's scheduler is passed the previous
    call's x0 and timestep back (`carry`), as its pipelines do."""
    if "old_pred_original_sample" not in inspect.signature(type(sched).step).parameters:
        return sched.step(model_out, t, x, **kw).prev_sample
    x, carry["old"] = sched.step(model_out, carry.get("old"), t, carry.get("t"), x, return_dict=False, **kw)
    carry["t"] = t
    return x


def time_trajectories(provider: str, scheduler: str, shape, dtype, device, order: int, thresholding: bool, steps: int,
                      reps: int):
    """(steady-state step times, first-step times) in seconds over `reps` trajectories."""
    sched = make_scheduler(provider, scheduler, order, thresholding)
    kw = {"generator": None} if "generator" in inspect.signature(sched.step).parameters else {}
    g = torch.Generator().manual_seed(0)
    model_out = torch.randn(shape, generator=g).to(device, dtype)
    x0 = torch.randn(shape, generator=g).to(device, dtype)
    steady, first = [], []
    for _ in range(reps + 1):  # the first trajectory warms up (extension load, allocator, caches)
        sched.set_timesteps(steps, device=device)
        if kw:
            kw["generator"] = torch.Generator(device).manual_seed(1)
        x, times, carry = x0, [], {}
        for t in sched.timesteps:
            if device.type == "cuda":
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                x = step_once(sched, model_out, t, x, kw, carry)
                e1.record()
                e1.synchronize()
                times.append(e0.elapsed_time(e1) / 1e3)
            else:
                t0 = time.perf_counter()
                x = step_once(sched, model_out, t, x, kw, carry)
                times.append(time.perf_counter() - t0)
        if _ > 0:
            first.append(times[0])
            steady += times[order:]
    return steady, first


def run(shapes: dict, orders, thresholds, dtype_name: str, device: torch.device, steps: int, reps: int,
        schedulers=("multistep",)) -> list[dict]:
    rows = []
    for scheduler, shape_name, order, thr in ((a, b, c, d) for a in schedulers for b in shapes for c in orders
                                              for d in thresholds):
        if order > SCHEDULERS[scheduler][2] or (thr and not has_option(scheduler, "thresholding")):
            continue
        shape = shapes[shape_name]
        base = None
        for prov in providers(device):
            steady, first = time_trajectories(prov, scheduler, shape, DTYPES[dtype_name], device, order, thr, steps,
                                              reps)
            med, q20, q80 = quantiles(steady)
            base = med if prov == "diffusers" else base
            rows.append({
                "date": dt.date.today().isoformat(), "device": device_name(device), "torch": torch.__version__,
                "diffusers": diffusers.__version__, "scheduler": scheduler, "provider": prov,
                "shape": "x".join(map(str, shape)), "name": shape_name, "dtype": dtype_name, "order": order,
                "thresholding": thr, "steps": steps, "median_ms": med * 1e3, "q20_ms": q20 * 1e3,
                "q80_ms": q80 * 1e3, "first_step_ms": statistics.median(first) * 1e3, "speedup": base / med,
            })
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| scheduler | shape | order | thr | provider | median ms | q20-q80 ms | first step ms | speed-up |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheduler']} | {r['shape']} | {r['order']} | {'on' if r['thresholding'] else 'off'} | "
                     f"{r['provider']} | "
                     f"{r['median_ms']:.3f} | {r['q20_ms']:.3f}-{r['q80_ms']:.3f} | {r['first_step_ms']:.3f} | "
                     f"{r['speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--steps", type=int, default=20, help="steps per trajectory")
    p.add_argument("--reps", type=int, default=5, help="timed trajectories per configuration")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--smoke", action="store_true", help="one tiny shape, 6 steps, 1 trajectory")
    p.add_argument("--out", default=str(RESULTS), help="results directory ('' to skip writing)")
    p.add_argument("--schedulers", default="multistep",
                   help=f"comma-separated of {', '.join(SCHEDULERS)}, or 'all' (default: %(default)s)")
    p.add_argument("--shapes", default="all", help=f"comma-separated of {', '.join(SHAPES)}, or 'all' (all but "
                                                   "video)")
    p.add_argument("--kind", default="", help="results file kind (default: diffusers_step for the multistep "
                                              "scheduler alone, else diffusers_family)")
    p.add_argument("--orders", default="2,3", help="solver orders (default: %(default)s)")
    p.add_argument("--thresholding", default="both", choices=("off", "on", "both"))
    a = p.parse_args(argv)
    schedulers = list(SCHEDULERS) if a.schedulers == "all" else a.schedulers.split(",")
    unknown = [n for n in schedulers if n not in SCHEDULERS] + [
        n for n in ([] if a.shapes == "all" else a.shapes.split(",")) if n not in SHAPES]
    if unknown:
        p.error(f"unknown scheduler or shape: {', '.join(unknown)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    shapes = {n: SHAPES[n] for n in (DEFAULT_SHAPES if a.shapes == "all" else a.shapes.split(","))}
    shapes, steps, reps = (SMOKE_SHAPES, 6, 1) if a.smoke else (shapes, a.steps, a.reps)
    thresholds = {"off": (False,), "on": (True,), "both": (False, True)}[a.thresholding]
    load = load_average()
    rows = run(shapes, tuple(int(o) for o in a.orders.split(",")), thresholds, a.dtype, device, steps, reps,
               schedulers)
    head = (f"device: {device_name(device)}; torch {torch.__version__}; diffusers {diffusers.__version__}; "
            f"{dt.date.today().isoformat()}; {a.dtype}, {steps} steps, median over steps >= order; "
            f"{load_line(load, load_average())}\n")
    table = markdown(rows)
    print(head)
    print(table)
    if a.out:
        kind = a.kind or ("diffusers_step" if schedulers == ["multistep"] else "diffusers_family")
        csv_path = results_csv(rows, Path(a.out), kind, device)
        md_path = csv_path.with_suffix(".md")
        md_path.write_text(f"# diffusers scheduler step() benchmark\n\n{head}\n{table}\n")
        print(f"\nappended to {csv_path}; table in {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
