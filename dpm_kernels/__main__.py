"""Command line: ``python -m dpm_kernels {demo,sample,bench,info}`` (installed as ``dpm-kernels`` too).

Bad options are answered with one line on stderr and exit status 2, before any work is done.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import _cli
from .backends import registry

PROG = "python -m dpm_kernels"
DEMO_PNG = _cli.cache_dir("dpm_kernels_demo.png")


def _check_backend(backend: str) -> None:
    """Refuse, up front, a backend that cannot serve the commands' CPU tensors (with its reason)."""
    import torch

    try:
        registry.choose(backend, torch.device("cpu"))
    except ValueError as e:
        why = str(e).removeprefix("backend: ")
        raise ValueError(f"--backend: {backend} cannot run this command's CPU tensors ({why})") from None


def _demo(args) -> int:
    from .demo import CURVE_NFE, REFERENCE_NFE, format_table, run_demo

    _check_backend(args.backend)
    if args.png is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--png: the demo's picture needs matplotlib: pip install 'dpm_kernels[plot]' (or pass "
                             "--png '' to skip the picture)") from None
        args.png.parent.mkdir(parents=True, exist_ok=True)
    results, ref_err = run_demo(n=args.samples, seed=args.seed, backend=args.backend, progress=not args.no_progress,
                                png=args.png)
    print(f"Analytic 2-D Gaussian mixture (8 components on a ring), DDPM linear schedule (1000 steps), "
          f"{args.samples} samples.")
    print(f"Mean L2 error of each solver against the reference ODE solution ({REFERENCE_NFE}-step third-order "
          f"solve in float64, itself within {ref_err:.1e} of a {REFERENCE_NFE // 2}-step one):")
    print(format_table(results))
    err = {(r.name, r.nfe): r.error for r in results}
    for nfe_pp, nfe_ddim in ((10, 10), (20, 50)):
        a, b = err.get(("DPM-Solver++(3M)", nfe_pp)), err.get(("DDIM", nfe_ddim))
        if a and b:
            print(f"DPM-Solver++(3M) at {nfe_pp} NFE: {b / a:.1f}x smaller error than DDIM at {nfe_ddim} NFE.")
    print(f"Below 10 NFE the errors do not fall steadily (every step is long, and the last steps drop to lower "
          f"orders below 10 steps, the authors' rule): the picture plots each NFE of {list(CURVE_NFE)}.")
    if args.png is not None:
        print(f"wrote {args.png}")
    return 0


def _sample(args) -> int:
    import torch

    from .demo import ddpm_schedule, reference_solution, ring_mixture
    from .model_wrapper import model_wrapper
    from .solver import DPMSolver

    sde = args.algorithm.startswith("sde")
    eta = getattr(args, "eta", None)  # None: not given
    if eta is not None and not sde:
        raise ValueError(f"--eta: the noise scale of the SDE algorithms; {args.algorithm} is an ODE solver (use "
                         "--algorithm sde-dpmsolver++ or sde-dpmsolver, or leave --eta out)")
    eta = 1.0 if eta is None else eta
    if sde and args.method != "multistep":
        raise ValueError(f"--method: SDE algorithms run multistep only, got {args.method!r}")
    if args.method == "adaptive" and args.order == 1:
        raise ValueError("--order: the adaptive method needs order 2 or 3")
    _check_backend(args.backend)  # after the checks that need no work: this one may build the kernels
    ns = ddpm_schedule()
    gm = ring_mixture(ns)
    fn = model_wrapper(gm, ns, model_type="noise")
    x_T = torch.randn(args.samples, 2, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    solver = DPMSolver(fn, ns, algorithm_type=args.algorithm, backend=args.backend)
    kwargs = dict(steps=args.steps, order=args.order, method=args.method, skip_type=args.skip_type,
                  solver_type=args.solver_type)
    if sde:
        kwargs.update(eta=eta, generator=torch.Generator().manual_seed(args.seed + 1))
    x = solver.sample(x_T.to(getattr(torch, args.dtype)), **kwargs)
    if args.method == "adaptive":
        nfe, why = solver.last_nfe, " (adaptive: the steps the error control took; --steps is not used)"
    else:
        nfe = solver.plan(steps=args.steps, order=args.order, skip_type=args.skip_type, method=args.method).nfe
        why = ""
        if nfe != args.steps:
            blocks = args.steps // args.order or 1
            why = (f" (singlestep_fixed runs whole blocks: {args.steps} steps // order {args.order} = {blocks} "
                   f"block(s) of {nfe // blocks} evaluations)")
    print(f"ran: algorithm={args.algorithm} method={args.method} order={args.order} NFE={nfe}{why} "
          f"skip_type={args.skip_type} solver_type={args.solver_type} dtype={args.dtype} "
          f"backend={registry.choose(args.backend, x.device).name}")
    if not sde or eta == 0.0:
        ref = reference_solution(fn, ns, x_T)
        what = "the exact ODE solution" if not sde else "the exact ODE solution (eta = 0: the SDE solver is the ODE)"
        print(f"mean L2 error vs {what}: {float((x.double() - ref).norm(dim=1).mean()):.3e}")
    else:
        print(f"an SDE run (eta = {eta}) has no exact per-sample endpoint; compare the sample statistics:")
    data = gm.sample_data(100_000, generator=torch.Generator().manual_seed(1))
    fmt = lambda v: "[" + ", ".join(f"{a:.3f}" for a in v.tolist()) + "]"  # noqa: E731
    print(f"samples: mean {fmt(x.double().mean(0))}, std {fmt(x.double().std(0))}; "
          f"data distribution: mean {fmt(data.mean(0))}, std {fmt(data.std(0))}")
    return 0


def _info(args) -> int:
    import torch

    from . import __version__, _build

    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    print(f"dpm_kernels {__version__}, torch {torch.__version__} ({cuda})")
    print(f"loading the compiled kernels (their first use in an environment builds them, about "
          f"{_build.BUILD_SECONDS['cpu']} s for the CPU ones; a line on stderr says so)...", flush=True)
    for name, why in registry.available().items():
        where = _build.location(name)
        state = "unavailable: " + why if why is not None else "available" + (f" ({where})" if where else "")
        print(f"  {name:7s} {state}")
    print(f"this environment's CPU kernels are built in {_build.build_dir('cpu')} (TORCH_EXTENSIONS_DIR or "
          "DPM_KERNELS_BUILD_DIR move it)")
    return 0


def _command(sub, name: str, about: str) -> _cli.Parser:
    """A subcommand whose one line in the command list is also the first line of its own --help."""
    return sub.add_parser(name, help=about, description=about[0].upper() + about[1:] + ".")


def build_parser() -> _cli.Parser:
    from .coefficients import ALGORITHMS
    from .planner import METHODS, SKIP_TYPES

    p = _cli.Parser(prog=PROG, description="Fused DPM-Solver sampling kernels.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_cli.Parser)
    backend_help = "which implementation runs the steps (auto: the first that can serve the device)"
    d = _command(sub, "demo", "sample the built-in analytic model; print each solver's error against the exact ODE "
                              "solution and draw a picture")
    d.add_argument("--samples", type=_cli.positive_int, default=2000, help="number of samples")
    d.add_argument("--seed", type=int, default=0, help="random seed of x_T")
    d.add_argument("--backend", default="auto", choices=registry.CHOICES, help=backend_help)
    d.add_argument("--png", type=_cli.writable_file, default=DEMO_PNG,
                   help="where to write the picture ('' to skip it; needs matplotlib: pip install dpm_kernels[plot])")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(fn=_demo)
    s = _command(sub, "sample", "run one solver configuration on the built-in model and print what ran")
    s.add_argument("--algorithm", default="dpmsolver++", choices=ALGORITHMS,
                   help="data prediction (dpmsolver++), noise prediction (dpmsolver) or their SDE solvers")
    s.add_argument("--method", default="multistep", choices=METHODS,
                   help="multistep (reuses past outputs), singlestep (DPM-Solver-fast), singlestep_fixed (blocks "
                        "of --order evaluations), or adaptive step size (ignores --steps)")
    s.add_argument("--order", type=int, default=2, choices=[1, 2, 3], help="solver order (1 = DDIM)")
    s.add_argument("--steps", type=_cli.positive_int, default=10, help="number of model evaluations (NFE)")
    s.add_argument("--skip-type", default="logSNR", choices=SKIP_TYPES,
                   help="time spacing (uniform_lambda and exponential are logSNR's aliases)")
    s.add_argument("--solver-type", default="dpmsolver", choices=["dpmsolver", "taylor"],
                   help="second-order variant: dpmsolver (midpoint) or taylor (heun)")
    s.add_argument("--eta", type=_cli.non_negative_float, default=argparse.SUPPRESS,
                   help="SDE noise scale, for the SDE algorithms only; 0 = the ODE (default: 1.0)")
    s.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"],
                   help="dtype of the samples")
    s.add_argument("--samples", type=_cli.positive_int, default=1000, help="batch size")
    s.add_argument("--seed", type=int, default=0, help="random seed of x_T (and of the SDE noise)")
    s.add_argument("--backend", default="auto", choices=registry.CHOICES, help=backend_help)
    s.set_defaults(fn=_sample)
    sub.add_parser("bench", help="op benchmarks: fused backends vs eager, torch.compile and diffusers "
                                 "(`python -m dpm_kernels bench --help` for its options)", add_help=False)
    i = _command(sub, "info", "versions, which backends are available, and where the compiled kernels are")
    i.set_defaults(fn=_info)
    return p


COMMANDS = ("demo", "sample", "bench", "info")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"{PROG} {argv[0]}" if argv[:1] and argv[0] in COMMANDS else PROG  # as the command's own parser says it
    try:
        if argv[:1] == ["bench"]:  # the benchmark has its own options (python -m dpm_kernels bench --help)
            from .benchmark import main as bench_main

            rc = bench_main(argv[1:])
        else:
            args = build_parser().parse_args(argv)
            rc = args.fn(args)
        sys.stdout.flush()  # here, not at exit: a closed pipe (`| head`) is then caught below
        return rc
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, TypeError, OSError) as e:  # bad input the option checks could not see: one line, status 2
        print(_cli.error_line(prog, str(e)), end="", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
