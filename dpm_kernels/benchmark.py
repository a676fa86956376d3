"""Op benchmarks: one multistep DPM-Solver++ step, side by side, on the available device.

Providers, all computing the same step (eps -> x0 conversion, optional dynamic thresholding, order 1-3
combination, history write, in place):
- each compiled backend of `backends.registry` available for the device (C++ on a CPU; CUDA C++ and Triton on a GPU);
- "eager": the PyTorch reference step in eager mode (`backends/reference.py`);
- "compile": `torch.compile` of that reference step;
- "diffusers": `DPMSolverMultistepScheduler.step` of diffusers (same math), when diffusers is installed.

Reported per configuration: median time and 20/80% quantiles, GB/s of the bytes the fused step must move,
and the ratio to the floor. The floor is those bytes over the device's copy bandwidth measured with `dst.copy_(src)`
(copy = 1 read + 1 write) whose src and dst together span as many bytes as the tensors the step touches, so that
both run from the same level of the memory hierarchy. The bytes: (order + 3) tensors of n elements (docs/math.md,
"How fast a step can be"), plus one more read of x0 with thresholding (the order statistic needs a full pass before
the step can write).

A shared machine disturbs timings (another process starts, the whole run is 7x slower than the last), and a
disturbed run must say so. Per configuration the providers are timed interleaved, round by round, so that a change
of the machine's speed hits all of them alike -- the copy floor too, timed in the same rounds, so the ratios to it
hold; a floor whose own spread in the row exceeds 1.25x marks the row, as do a wide spread and a step "faster" than
1/4 of the copy floor. Per run: the load average at the
start and the end against the CPU count, and the copy bandwidth against the earlier runs on the same device in the
results directory. A run-level finding labels the run DISTURBED -- its numbers are not to be used -- and many marked
measurements label it NOISY (the unmarked figures stand), in the table and on stderr.
Results go to a results directory (default ~/.cache/dpm_kernels/benchmarks; `--out benchmarks/results` in a
checkout) as CSV rows and a markdown table with the device (the CPU's model name and core count), torch version,
date and the run's conditions.
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import coefficients as C
from . import layout as L
from . import planner as P
from .backends import reference, registry
from .ops import fused_step
from .schedule import NoiseScheduleVP

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
THR = (0.995, 1.0, math.inf)


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name: /proc/cpuinfo's "model name" (Linux), else what `platform` knows."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """What result files call the device: the GPU's name, or the CPU's model, its logical cores and the threads used."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} logical cores), {torch.get_num_threads()} threads"


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_one(fn, device: torch.device, clock) -> float:
    if device.type == "cuda":
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        return e0.elapsed_time(e1) / 1e3
    t0 = clock()
    fn()
    return clock() - t0


def measure_rounds(fns: dict[str, Callable[[], object]], device: torch.device, min_time: float = 0.3,
                   min_reps: int = 5, max_reps: int = 200, clock=time.perf_counter) -> dict[str, list[float]]:
    """Per-call wall times in seconds of each function, interleaved: after a warm-up call of each, rounds of one call
    of each (the order rotating), at least min_reps rounds and min_time seconds per function. `clock` is injectable
    (tests); CUDA calls are timed with events."""
    names = list(fns)
    for fn in fns.values():
        fn()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    start, r = clock(), 0
    while r < max_reps and (r < min_reps or clock() - start < min_time * len(names)):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(_time_one(fns[n], device, clock))
        r += 1
    return times


def measure(fn, device: torch.device, min_time: float = 0.3, min_reps: int = 5, max_reps: int = 200,
            clock=time.perf_counter) -> list[float]:
    """Per-call wall times in seconds (after a warm-up call), at least min_reps or min_time worth."""
    return measure_rounds({"fn": fn}, device, min_time, min_reps, max_reps, clock)["fn"]


NOISY_SPREAD = 0.5  # a measurement whose 20-80% range exceeds half its median says little about a ratio
IMPLAUSIBLE_X_FLOOR = 0.25  # a step can beat copy_ (no write-allocate on out), but not by 4x: the floor was disturbed
FLOOR_DRIFT = 1.25  # the copy floor's 80% over its 20% quantile in a row's rounds: the machine's speed moved
OTHER_RUNS = 1.5  # this run's copy bandwidth this far from the earlier runs' on the same device: one of them disturbed
NOISY_RUN = 0.2  # the share of suspect measurements that labels a whole run disturbed
COPY = "copy floor"  # the copy timed with the providers of a row (not a provider of the results)


def is_noisy(median: float, lo: float, hi: float) -> bool:
    """True when the spread (hi - lo) of a measurement is too wide for its median to support a ratio."""
    return (hi - lo) > NOISY_SPREAD * median


def row_reasons(median: float, lo: float, hi: float, x_floor: float, compiled: bool, floor_drift: float) -> list[str]:
    """Why one measurement is suspect (empty: it is not). floor_drift: the 80% over the 20% quantile of the copy
    floor timed in the same rounds."""
    why = []
    if is_noisy(median, lo, hi):
        why.append(f"spread {(hi - lo) / median:.0%} of the median")
    if compiled and x_floor < IMPLAUSIBLE_X_FLOOR:
        why.append(f"{1 / x_floor:.0f}x faster than the copy floor")
    if floor_drift > FLOOR_DRIFT:
        why.append(f"copy floor moved {floor_drift:.2f}x during the row")
    return why


def run_reasons(rows: list[dict], earlier: list[dict], load: tuple, cpus: int, threads: int) -> list[str]:
    """Why a whole run is disturbed (empty: no sign of it): the load average at its start (others filling the CPUs)
    and end (beyond what its own threads add), and its copy bandwidth against `earlier` runs' rows on the device."""
    why = []
    start, end = load
    if start is not None and start >= cpus:
        why.append(f"load average {start:.1f} on {cpus} cores when the run began (other processes were running)")
    if end is not None and end >= cpus + threads:
        why.append(f"load average {end:.1f} on {cpus} cores at the end (more than this run's {threads} threads)")
    key = lambda r: (str(r["dtype"]), int(r["n"]), int(r["order"]))  # noqa: E731  the copy's footprint
    past: dict = {}
    for r in earlier:
        if r.get("copy_GBps"):
            past.setdefault(key(r), []).append(float(r["copy_GBps"]))
    ratios = [statistics.median(past[key(r)]) / float(r["copy_GBps"]) for r in rows if key(r) in past]
    if ratios:
        ratio = statistics.median(ratios)
        runs = sorted({str(r.get("run") or r.get("date")) for r in earlier})
        seen = f"{len(runs)} earlier run(s) on this device ({runs[0]} .. {runs[-1]})"
        if ratio > OTHER_RUNS:
            why.append(f"copy bandwidth {ratio:.1f}x below {seen}: this run was slowed down")
        elif ratio < 1 / OTHER_RUNS:
            why.append(f"copy bandwidth {1 / ratio:.1f}x above {seen}: those were slowed down, or the machine changed")
    return why


def quantiles(ts: list[float]) -> tuple[float, float, float]:
    s = sorted(ts)
    q = lambda p: s[min(len(s) - 1, int(p * (len(s) - 1) + 0.5))]  # noqa: E731
    return statistics.median(s), q(0.2), q(0.8)


def copy_case(footprint: int, dtype: torch.dtype, device: torch.device) -> tuple[Callable[[], object], int]:
    """(dst.copy_(src), the bytes it moves: one read and one write) with src and dst together `footprint` bytes.

    The copy spans as many bytes as the step it is the floor of, so both run from the same level of the memory
    hierarchy: a copy of only n elements would stay in a cache that the step's tensors overflow.
    """
    n = max(1, footprint // (2 * dtype.itemsize))
    src = torch.randn(n, device=device).to(dtype)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * n * src.element_size()


def _reference_step(x, eps, coef, hist_out, h1, h2, thr: bool) -> None:
    """The eager PyTorch step, in place like the fused one (x <- x_next, hist_out <- m)."""
    o, m = reference.fused_step(x, eps, coef, None, None, h1, h2, None, None, L.CFG_NONE, thr, *THR)
    x.copy_(o)
    hist_out.copy_(m)


_COMPILED: dict = {}


def _compiled(thr: bool):
    """torch.compile of the reference step, shapes dynamic: one graph per (flag, dtype, order, device)."""
    if thr not in _COMPILED:
        import torch._dynamo

        # every configuration of the sweep is its own graph; the default limit (8) would silently fall
        # back to eager for the rest, and "compile" would time eager code
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        _COMPILED[thr] = torch.compile(_reference_step, dynamic=True)
    return _COMPILED[thr]


class StepCase:
    """Inputs of one benchmarked step: x [B, 4, n/4B], eps, order-1 history entries, a coefficient row."""

    def __init__(self, n: int, order: int, dtype: torch.dtype, device: torch.device, thresholding: bool):
        b = 4 if n >= 64 * 1024 else 1
        shape = (b, 4, n // (4 * b))  # [B, C, HW]: diffusers' thresholding needs a channel dimension
        g = torch.Generator(device="cpu").manual_seed(0)
        mk = lambda s=1.0: (torch.randn(shape, generator=g) * s).to(device=device, dtype=dtype)  # noqa: E731
        self.x, self.eps = mk(), mk()
        self.hist = [mk(0.5) for _ in range(order - 1)]
        self.hist_out = torch.empty_like(self.x)
        self.order, self.thr, self.n, self.dtype = order, thresholding, n, dtype
        # a realistic mid-trajectory step: history at t = 0.6, 0.55, current point 0.5, target 0.45
        pts = P.point(NoiseScheduleVP("linear"), np.array([0.6, 0.55, 0.5, 0.45]))
        upd = C.multistep("dpmsolver++", "dpmsolver", order, [pts[2], pts[1], pts[0]][:order], pts[3])
        self.coef = torch.from_numpy(P.coefficient_rows(pts[2], P.Conversion("noise", "x0"), upd)).to(device)

    def footprint(self) -> int:
        """Bytes of the tensors the step touches: x, eps, the order - 1 history entries read, the one written."""
        return (self.order + 2) * self.n * self.x.element_size()

    def bytes_moved(self) -> int:
        tensors = self.order + 3 + (1 if self.thr else 0)
        return tensors * self.n * self.x.element_size()

    def fused(self, backend: str):
        thr = THR if self.thr else None
        return lambda: fused_step(self.x, self.eps, self.coef, out=self.x, hist_out=self.hist_out, hist=self.hist,
                                  threshold=thr, backend=backend)

    def _args(self):
        h = self.hist + [None, None]
        return self.x, self.eps, self.coef, self.hist_out, h[0], h[1]

    def eager(self):
        thr = self.thr
        return lambda: _reference_step(*self._args(), thr)

    def compiled(self):
        fn = _compiled(self.thr)
        return lambda: fn(*self._args(), self.thr)

    def diffusers(self):
        from diffusers import DPMSolverMultistepScheduler

        sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, solver_order=self.order,
                                            algorithm_type="dpmsolver++", thresholding=self.thr,
                                            dynamic_thresholding_ratio=THR[0], sample_max_value=1e30,
                                            lower_order_final=False)
        sched.set_timesteps(20, device=self.x.device)
        i0 = 8
        hist = list(self.hist)

        def call():
            sched._step_index = i0
            sched.lower_order_nums = self.order
            sched.model_outputs = [None] * (self.order - len(hist)) + hist[::-1]
            t = sched.timesteps[i0]
            sched.step(self.eps, t, self.x, return_dict=False)

        return call


def run(sizes, orders, dtypes, thresholds, providers, device, out_dir: Path | None, progress=True, min_time=0.3,
        clock=time.perf_counter) -> list[dict]:
    """One row per (configuration, provider); written to `out_dir` with the run's verdict (`noise_summary`)."""
    combos = [(d, e, o, t) for d in dtypes for e in sizes for o in orders for t in thresholds]
    it = combos
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(combos, desc="bench", unit="config")
    earlier = earlier_rows(out_dir, device) if out_dir is not None else []
    started, load_start = _dt.datetime.now().isoformat(timespec="seconds"), load_average()
    rows = []
    natives = [b.name for b in registry.BACKENDS if b is not registry.TORCH and b.why_not(device) is None]
    for dname, exp, order, thr in it:
        dtype, n = DTYPES[dname], 1 << exp
        case = StepCase(n, order, dtype, device, thr)
        fns = {}
        for b in natives:
            if b in providers or "fused" in providers:
                fns[b] = case.fused(b)
        if "eager" in providers:
            fns["eager"] = case.eager()
        if "compile" in providers:
            fns["compile"] = case.compiled()
        if "diffusers" in providers:
            try:
                fns["diffusers"] = case.diffusers()
            except ImportError:
                pass
        # the copy floor timed round by round with the providers: whatever slows the machine during the row slows
        # both, so the ratios to the floor hold; the floor's own spread says how much the machine's speed moved
        copy, copy_bytes = copy_case(case.footprint(), dtype, device)
        times = measure_rounds({**fns, COPY: copy}, device, min_time, clock=clock)
        c_med, c20, c80 = quantiles(times.pop(COPY))
        bw = copy_bytes / c_med
        floor, drift = case.bytes_moved() / bw, c80 / c20
        for name, ts in times.items():
            med, q20, q80 = quantiles(ts)
            why = row_reasons(med, q20, q80, med / floor, name in natives, drift)
            rows.append({
                "date": _dt.date.today().isoformat(), "device": device_name(device), "torch": torch.__version__,
                "dtype": dname, "n": n, "order": order, "thresholding": int(thr), "provider": name,
                "median_ms": med * 1e3, "p20_ms": q20 * 1e3, "p80_ms": q80 * 1e3,
                "GBps": case.bytes_moved() / med / 1e9, "floor_ms": floor * 1e3, "x_floor": med / floor,
                "copy_GBps": bw / 1e9, "spread": (q80 - q20) / med, "suspect": int(bool(why)),
                "run": started, "floor_q20_ms": floor * c20 / c_med * 1e3, "floor_q80_ms": floor * c80 / c_med * 1e3,
                "floor_drift": drift,
                "load_start": load_start, "why": "; ".join(why),
            })
    load_end = load_average()
    for r in rows:
        r["load_end"] = load_end
    if out_dir is not None:
        write_results(rows, out_dir, device, earlier)
    return rows


def earlier_rows(out_dir: Path, device: torch.device) -> list[dict]:
    """The rows of the earlier runs on this device recorded in `out_dir` (every date)."""
    name = device_name(device)
    rows: list[dict] = []
    for path in sorted(Path(out_dir).glob(f"fused_step-{device_slug(device)}-*.csv")):
        with path.open(newline="") as f:
            rows += [r for r in csv.DictReader(f) if r.get("device") == name]
    return rows


def markdown(rows) -> str:
    """One line per configuration; a "?" marks a time or ratio resting on a suspect measurement (`row_reasons`: its
    20-80% spread over half its median, a step that would beat the copy floor 4x, or a copy floor that moved during
    the row)."""
    provs = []
    for r in rows:
        if r["provider"] not in provs:
            provs.append(r["provider"])
    fused = [p for p in provs if p in registry.NAMES and p != registry.TORCH.name]
    head = ["dtype", "n", "order", "thr", "floor ms"] + [f"{p} ms" for p in provs]
    head += [f"{f} x floor" for f in fused]
    others = [p for p in provs if p not in fused]
    head += [f"{f} vs {o}" for f in fused for o in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = []
    for r in rows:
        k = (r["dtype"], r["n"], r["order"], r["thresholding"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        sel = {r["provider"]: r for r in rows if (r["dtype"], r["n"], r["order"], r["thresholding"]) == k}
        q = lambda *ps, sel=sel: "?" if any(sel[p].get("suspect") for p in ps) else ""  # noqa: E731
        any_r = next(iter(sel.values()))
        cells = [k[0], f"2^{int(math.log2(k[1]))}", str(k[2]), "on" if k[3] else "off", f"{any_r['floor_ms']:.3f}"]
        cells += [f"{sel[p]['median_ms']:.3f}{q(p)}" if p in sel else "-" for p in provs]
        cells += [f"{sel[f]['x_floor']:.2f}{q(f)}" if f in sel else "-" for f in fused]
        cells += [f"{sel[o]['median_ms'] / sel[f]['median_ms']:.1f}x{q(f, o)}" if f in sel and o in sel else "-"
                  for f in fused for o in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def noise_summary(rows, earlier=(), cpus: int | None = None, threads: int | None = None) -> tuple[bool, str]:
    """(flagged, one line). A run is DISTURBED when something outside it changed the machine's speed for the whole run
    (`run_reasons`: the load average, the copy bandwidth against `earlier` runs' rows): its numbers are not to be
    used. It is NOISY when over a fifth of its measurements are marked (`row_reasons`: their own spread, a floor that
    moved within their row -- its providers were timed in the same rounds, so a move hits them alike and only widens
    their spread): the unmarked figures stand. On this project's 2-core VM the copy bandwidth itself wanders within
    a row and the eager reference's allocations spread widely."""
    bad = sum(1 for r in rows if r.get("suspect"))
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    threads = torch.get_num_threads() if threads is None else threads
    load = (rows[0].get("load_start"), rows[0].get("load_end")) if rows else (None, None)
    why = run_reasons(rows, list(earlier), load, cpus, threads)
    line = (f"{bad} of {len(rows)} measurements suspect (\"?\": 20-80% spread over {NOISY_SPREAD:.0%} of the median,"
            f" x floor under {IMPLAUSIBLE_X_FLOOR}, or the copy floor moving over {FLOOR_DRIFT}x during the row)")
    if why:
        return True, "DISTURBED RUN -- do not use these numbers, rerun on a quiet machine: " + "; ".join(why) + ". " + \
            line
    if bad > NOISY_RUN * max(1, len(rows)):
        return True, (f"NOISY RUN -- over {NOISY_RUN:.0%} of the measurements spread widely: only the figures "
                      "without \"?\" stand (rerun, or a longer --min-time, for the rest). " + line)
    return False, line


def run_label(line: str) -> str:
    """' (DISTURBED RUN)', ' (NOISY RUN)' or '' for a results file's title, from `noise_summary`'s line."""
    return next((f" ({w})" for w in ("DISTURBED RUN", "NOISY RUN") if line.startswith(w)), "")


def conditions(rows) -> str:
    """The run's conditions as result files state them: the load average at its start and end."""
    return load_line(rows[0].get("load_start"), rows[0].get("load_end")) if rows else ""


def load_line(start, end) -> str:
    """'load average S at the start, E at the end, on N logical cores': how busy the machine was (every results file
    says it; a load above the core count means other processes competed for the CPUs)."""
    fmt = lambda v: "n/a" if v in (None, "") else f"{float(v):.2f}"  # noqa: E731
    return f"load average {fmt(start)} at the start, {fmt(end)} at the end, on {os.cpu_count()} logical cores"


def device_slug(device: torch.device) -> str:
    """The device's name as a file-name part: lower-case letters, digits and single dashes."""
    return re.sub(r"[^0-9a-z]+", "-", device_name(device).lower()).strip("-")


def results_csv(rows: list[dict], out_dir: Path, kind: str, device: torch.device) -> Path:
    """Appends rows to out_dir/<kind>-<device>-<date>.csv (header when new); returns its path. Rows with columns
    the file lacks widen it: the file is rewritten with the union of the columns (earlier rows leave them empty)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{kind}-{device_slug(device)}-{_dt.date.today().isoformat()}.csv"
    fields = list(rows[0].keys())
    old: list[dict] = []
    if path.exists():
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            have = list(reader.fieldnames or [])
            if have != fields:
                old = list(reader)
        if have == fields:
            with path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=fields).writerows(rows)
            return path
        fields = have + [k for k in fields if k not in have]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(old + rows)
    return path


def write_results(rows, out_dir: Path, device: torch.device, earlier=()) -> tuple[Path, Path]:
    csv_path = results_csv(rows, out_dir, "fused_step", device)
    stamp = _dt.date.today().isoformat()
    md_path = csv_path.with_suffix(".md")
    _, summary = noise_summary(rows, earlier)
    header = (f"# Fused step benchmark{run_label(summary)}\n\ndevice: {device_name(device)}; "
              f"torch {torch.__version__}; date {stamp}; {conditions(rows)}\n\n"
              "Times are medians of one step; `x floor` = time / (bytes the fused step must move / copy bandwidth "
              f"measured over the same footprint); `A vs B` = B's time / A's time. {summary}\n\n")
    md_path.write_text(header + markdown(rows) + "\n")
    return csv_path, md_path


def main(argv=None) -> int:
    from . import _cli

    p = _cli.Parser(prog="python -m dpm_kernels bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=_cli.int_list, default="14,16,18,20,22,24",
                   help="log2 of the element counts, comma-separated")
    p.add_argument("--orders", type=_cli.int_list, default="1,2,3", help="solver orders, comma-separated")
    p.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated, of {', '.join(DTYPES)}")
    p.add_argument("--thresholding", default="both", choices=["both", "on", "off"],
                   help="dynamic thresholding (ratio 0.995) off, on, or both")
    p.add_argument("--providers", default="fused,eager,compile,diffusers",
                   help="comma list of fused (every compiled backend), " + ", ".join(
                       b.name for b in registry.BACKENDS if b is not registry.TORCH) + ", eager, compile, diffusers")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--out", default=str(_cli.cache_dir("benchmarks")),
                   help="results directory ('' to skip writing; benchmarks/results records them in a checkout)")
    p.add_argument("--quick", action="store_true", help="2^20 and 2^22, orders 2 and 3, float32")
    p.add_argument("--min-time", type=_cli.non_negative_float, default=0.3,
                   help="seconds of timing per provider and config")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.orders, a.dtypes = [20, 22], [2, 3], "float32"
    dtypes = a.dtypes.split(",")
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"argument --dtypes: {d!r} is not one of {', '.join(DTYPES)}")
    if any(o not in (1, 2, 3) for o in a.orders):
        p.error(f"argument --orders: orders are 1, 2 or 3, got {a.orders}")
    if any(not 4 <= e <= 31 for e in a.sizes):
        p.error(f"argument --sizes: log2 sizes between 4 and 31, got {a.sizes}")
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: no CUDA device is visible to PyTorch")
    thr = {"both": [False, True], "on": [True], "off": [False]}[a.thresholding]
    out = Path(a.out) if a.out else None
    earlier = earlier_rows(out, device) if out is not None else []
    rows = run(a.sizes, a.orders, dtypes, thr, a.providers.split(","), device, out, not a.no_progress, a.min_time)
    print(f"device: {device_name(device)}; torch {torch.__version__}; {_dt.date.today().isoformat()}; "
          f"{conditions(rows)}")
    print(markdown(rows))
    disturbed, summary = noise_summary(rows, earlier)
    print(summary)
    if disturbed:
        print("warning: " + summary, file=sys.stderr)
    if a.out:
        print(f"results appended to {Path(a.out)}")
    return 0
