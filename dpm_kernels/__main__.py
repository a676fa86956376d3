"""Command line: ``python -m dpm_kernels {demo,sample,bench,info}``."""

from __future__ import annotations

import argparse
import sys

from .backends import registry


def _demo(args) -> int:
    from .demo import format_table, run_demo

    results = run_demo(n=args.samples, seed=args.seed, backend=args.backend, progress=not args.no_progress,
                       png=None if args.png == "" else args.png)
    print("Analytic 2-D Gaussian mixture (8 components on a ring), DDPM linear schedule (1000 steps).")
    print(format_table(results))
    err = {(r.name, r.nfe): r.error for r in results}
    for nfe_pp, nfe_ddim in ((10, 10), (20, 50)):
        a, b = err.get(("DPM-Solver++(3M)", nfe_pp)), err.get(("DDIM", nfe_ddim))
        if a and b:
            print(f"DPM-Solver++(3M) at {nfe_pp} NFE: {b / a:.1f}x smaller error than DDIM at {nfe_ddim} NFE.")
    if args.png:
        print(f"wrote {args.png}")
    return 0


def _sample(args) -> int:
    import torch

    from .demo import ddpm_schedule, reference_solution, ring_mixture
    from .model_wrapper import model_wrapper
    from .solver import DPMSolver

    ns = ddpm_schedule()
    gm = ring_mixture(ns)
    fn = model_wrapper(gm, ns, model_type="noise")
    x_T = torch.randn(args.samples, 2, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    solver = DPMSolver(fn, ns, algorithm_type=args.algorithm, backend=args.backend)
    kwargs = dict(steps=args.steps, order=args.order, method=args.method, skip_type=args.skip_type,
                  solver_type=args.solver_type)
    if args.algorithm.startswith("sde"):
        kwargs.update(eta=args.eta, generator=torch.Generator().manual_seed(args.seed + 1))
    from .backends import registry

    x = solver.sample(x_T.to(getattr(torch, args.dtype)), **kwargs)
    nfe = solver.last_nfe if args.method == "adaptive" else solver.plan(
        steps=args.steps, order=args.order, skip_type=args.skip_type, method=args.method).nfe
    print(f"ran: algorithm={args.algorithm} method={args.method} order={args.order} NFE={nfe} "
          f"skip_type={args.skip_type} solver_type={args.solver_type} dtype={args.dtype} "
          f"backend={registry.choose(args.backend, x.device).name}")
    if not args.algorithm.startswith("sde"):
        ref = reference_solution(fn, ns, x_T)
        print(f"mean L2 error vs the exact ODE solution: {float((x.double() - ref).norm(dim=1).mean()):.3e}")
    data = gm.sample_data(100_000, generator=torch.Generator().manual_seed(1))
    fmt = lambda v: "[" + ", ".join(f"{a:.3f}" for a in v.tolist()) + "]"  # noqa: E731
    print(f"samples: mean {fmt(x.double().mean(0))}, std {fmt(x.double().std(0))}; "
          f"data distribution: mean {fmt(data.mean(0))}, std {fmt(data.std(0))}")
    return 0


def _info(args) -> int:
    import torch

    from . import __version__
    from .backends import registry

    print(f"dpm_kernels {__version__}, torch {torch.__version__}")
    for name, why in registry.available().items():
        print(f"  {name:7s} {'available' if why is None else 'unavailable: ' + why}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dpm_kernels", description="Fused DPM-Solver sampling kernels.")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="sample the built-in analytic model; print each solver's error vs the exact "
                                    "solution and write a PNG")
    d.add_argument("--samples", type=int, default=2000, help="number of samples (default 2000)")
    d.add_argument("--seed", type=int, default=0, help="random seed of x_T")
    d.add_argument("--backend", default="auto", choices=registry.CHOICES,
                   help="which implementation runs the steps (auto: the first that can serve the device)")
    d.add_argument("--png", default="dpm_kernels_demo.png", help="output figure ('' to skip)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(fn=_demo)
    s = sub.add_parser("sample", help="run one solver configuration on the built-in model and print what ran")
    s.add_argument("--algorithm", default="dpmsolver++", choices=["dpmsolver++", "dpmsolver", "sde-dpmsolver++"],
                   help="data prediction (dpmsolver++), noise prediction (dpmsolver) or the SDE solver")
    s.add_argument("--method", default="multistep", choices=["multistep", "singlestep", "singlestep_fixed",
                                                             "adaptive"],
                   help="multistep (reuses past outputs), singlestep (DPM-Solver-fast), singlestep_fixed, or "
                        "adaptive step size (ignores --steps)")
    s.add_argument("--order", type=int, default=2, choices=[1, 2, 3], help="solver order (1 = DDIM)")
    s.add_argument("--steps", type=int, default=10, help="number of model evaluations (NFE)")
    s.add_argument("--skip-type", default="logSNR",
                   help="time spacing: time_uniform | logSNR | time_quadratic | karras | exponential")
    s.add_argument("--solver-type", default="dpmsolver", choices=["dpmsolver", "taylor"],
                   help="second-order variant: dpmsolver (midpoint) or taylor (heun)")
    s.add_argument("--eta", type=float, default=1.0, help="SDE noise scale (sde-dpmsolver++; 0 = the ODE)")
    s.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"],
                   help="dtype of the samples")
    s.add_argument("--samples", type=int, default=1000, help="batch size")
    s.add_argument("--seed", type=int, default=0, help="random seed of x_T (and of the SDE noise)")
    s.add_argument("--backend", default="auto", choices=registry.CHOICES,
                   help="which implementation runs the steps (auto: the first that can serve the device)")
    s.set_defaults(fn=_sample)
    sub.add_parser("bench", help="op benchmarks: fused backends vs eager, torch.compile and diffusers "
                                 "(`python -m dpm_kernels bench --help` for its options)")
    i = sub.add_parser("info", help="versions and which backends are available")
    i.set_defaults(fn=_info)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the benchmark has its own options (python -m dpm_kernels bench --help)
        from .benchmark import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
