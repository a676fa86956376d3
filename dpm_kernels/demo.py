"""The built-in demo: sample an analytic 2-D Gaussian mixture and measure each solver's error.

The model is exact (docs/math.md, "Analytic test model"), so every error is the solver's alone. For each
x_T the reference endpoint is the same ODE solved to high accuracy (third-order singlestep DPM-Solver
with many steps, float64); errors are the mean L2 distance to it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .analytic import GaussianMixtureModel
from .model_wrapper import model_wrapper
from .schedule import NoiseScheduleVP
from .solver import DPMSolver


def ring_mixture(ns: NoiseScheduleVP, k: int = 8, radius: float = 2.0, std: float = 0.5) -> GaussianMixtureModel:
    ang = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    means = torch.stack([radius * torch.cos(ang), radius * torch.sin(ang)], dim=1)
    return GaussianMixtureModel(means, torch.full((k,), std), noise_schedule=ns)


def ddpm_schedule() -> NoiseScheduleVP:
    """DDPM's linear betas over 1000 steps, as a discrete schedule (the common pixel-space setting)."""
    return NoiseScheduleVP("discrete", betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))


@dataclass
class Result:
    name: str
    nfe: int
    error: float
    seconds: float
    samples: torch.Tensor


SOLVERS = {
    # name: (algorithm_type, order, method, skip_type); each with the spacing that suits it on this model
    # (logSNR for DPM-Solver++, as the paper recommends for low-dimensional data; quadratic for DDIM).
    "DPM-Solver++(2M)": ("dpmsolver++", 2, "multistep", "logSNR"),
    "DPM-Solver++(3M)": ("dpmsolver++", 3, "multistep", "logSNR"),
    "DPM-Solver-3 (singlestep)": ("dpmsolver", 3, "singlestep", "logSNR"),
    "DDIM": ("dpmsolver", 1, "multistep", "time_quadratic"),
}


def run_solver(fn, ns, x_T, name, nfe, backend="auto", dtype=torch.float32) -> tuple[torch.Tensor, float]:
    alg, order, method, skip = SOLVERS[name]
    solver = DPMSolver(fn, ns, algorithm_type=alg, backend=backend)
    x = x_T.to(dtype)
    t0 = time.perf_counter()
    out = solver.sample(x, steps=nfe, order=order, method=method, skip_type=skip)
    return out, time.perf_counter() - t0


def reference_solution(fn, ns, x_T: torch.Tensor, nfe: int = 600) -> torch.Tensor:
    solver = DPMSolver(fn, ns, algorithm_type="dpmsolver++", backend="torch")
    return solver.sample(x_T.double(), steps=nfe, order=3, method="singlestep_fixed", skip_type="logSNR")


def run_demo(n: int = 2000, seed: int = 0, backend: str = "auto", plan=None, progress: bool = True,
             png: str | None = None) -> list[Result]:
    ns = ddpm_schedule()
    gm = ring_mixture(ns)
    fn = model_wrapper(gm, ns, model_type="noise")
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    ref = reference_solution(fn, ns, x_T)
    run_solver(fn, ns, x_T[:2], "DDIM", 2, backend)  # loads (or builds) the backend outside the timings
    plan = plan or [("DPM-Solver++(2M)", 5), ("DPM-Solver++(2M)", 10), ("DPM-Solver++(2M)", 20),
                    ("DPM-Solver++(3M)", 5), ("DPM-Solver++(3M)", 10), ("DPM-Solver++(3M)", 20),
                    ("DDIM", 10), ("DDIM", 50)]
    results = []
    items = plan
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(plan, desc="solvers", leave=False)
    for name, nfe in items:
        out, secs = run_solver(fn, ns, x_T, name, nfe, backend)
        err = float((out.double() - ref).norm(dim=1).mean())
        results.append(Result(name, nfe, err, secs, out.double()))
    if png:
        save_png(png, gm, results, gen)
    return results


def format_table(results: list[Result]) -> str:
    lines = ["| solver | NFE | mean L2 error vs exact ODE solution | time (s) |", "|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.name} | {r.nfe} | {r.error:.2e} | {r.seconds:.3f} |")
    return "\n".join(lines)


def save_png(path: str, gm: GaussianMixtureModel, results: list[Result], gen: torch.Generator) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = gm.sample_data(len(results[0].samples), generator=gen)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    axes[0].scatter(data[:, 0], data[:, 1], s=2, alpha=0.5)
    axes[0].set_title("exact data distribution")
    shown = [r for r in results if r.nfe == 10 and r.name in ("DPM-Solver++(3M)", "DDIM")]
    for r in shown:
        axes[1].scatter(r.samples[:, 0], r.samples[:, 1], s=2, alpha=0.5, label=f"{r.name}, {r.nfe} NFE")
    axes[1].set_title("samples at 10 NFE")
    axes[1].legend(markerscale=5)
    for ax in axes[:2]:
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
    names = sorted({r.name for r in results})
    for name in names:
        pts = sorted((r.nfe, r.error) for r in results if r.name == name)
        axes[2].loglog([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    axes[2].set_xlabel("NFE")
    axes[2].set_ylabel("mean L2 error vs exact ODE solution")
    axes[2].grid(True, which="both", alpha=0.3)
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
