"""The README's Python examples run as written and compute what they claim.

Blocks are taken from README.md by their section heading; names a block leaves to the reader (`unet`, `denoiser`,
`x`, `sigmas`) are supplied by the test, nothing else. The diffusers block needs downloaded weights and is not run
here (tests/test_integration_diffusers.py drives the same scheduler in a pipeline).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

import dpm_kernels as dk

README = Path(__file__).resolve().parent.parent / "README.md"


def _block(section: str, k: int = 0) -> str:
    """The k-th Python block of a section."""
    text = README.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    blocks = re.compile(r"```python\n(.*?)```", re.S).findall(text, start, end if end > 0 else len(text))
    assert len(blocks) > k, section
    return blocks[k]


def test_sampling_in_ten_lines_converges():
    g = {}
    torch.manual_seed(0)  # the block draws x_T from the global generator
    exec(_block("Sampling in ten lines"), g)  # noqa: S102
    x_T, x_0 = g["x_T"], g["x_0"]
    assert x_0.shape == x_T.shape and x_0.dtype == x_T.dtype and bool(x_0.isfinite().all())
    # against the same solver at 800 steps (converged to ~1e-3); DDIM at the same NFE does much worse
    solver = g["solver"]
    fine = solver.sample(x_T, steps=800, order=2, skip_type="logSNR", method="multistep")
    err = lambda y: float((y - fine).norm() / fine.norm())  # noqa: E731
    ddim = solver.sample(x_T, steps=20, order=1, skip_type="logSNR", method="multistep")
    assert err(x_0) < 0.02
    assert err(ddim) > 3 * err(x_0)


def test_custom_loop_equals_the_solver():
    """The multistep_update loop of the README (3rd order, logSNR spacing, warm-up with lower orders) computes what
    DPMSolver.sample computes for the same network and configuration."""
    net = lambda x, t: 0.3 * x + 0.05 * torch.sin(3 * x)  # noqa: E731  a smooth stand-in noise predictor
    g = {"unet": net}
    torch.manual_seed(0)
    exec(_block("Your own loop: `multistep_update`"), g)  # noqa: S102
    x_loop = g["x"]
    torch.manual_seed(0)
    x_T = torch.randn(4, 3, 64, 64)
    ns = dk.NoiseScheduleVP("linear")
    solver = dk.DPMSolver(lambda x, t: net(x, t), ns, algorithm_type="dpmsolver++")
    x_ref = solver.sample(
        x_T, steps=10, t_start=1.0, t_end=1e-3, order=3, skip_type="logSNR", method="multistep", lower_order_final=False
    )
    assert bool(x_loop.isfinite().all())
    torch.testing.assert_close(x_loop, x_ref, rtol=1e-5, atol=1e-5)


def test_k_diffusion_block_samples_the_data_distribution():
    """With the exact denoiser of N(0, I) data, the README's 3M SDE call brings N(0, 101 I) noise to unit variance."""
    denoiser = lambda x, sigma, **kw: x / (1 + sigma[:, None] ** 2)  # noqa: E731  exact for N(0, I) data
    sigmas = torch.cat([torch.exp(torch.linspace(2.3026, -2.3026, 15, dtype=torch.float64)).float(), torch.zeros(1)])
    torch.manual_seed(1)
    x = torch.randn(64, 256) * float(sigmas[0])
    g = {"denoiser": denoiser, "sigmas": sigmas, "x": x}
    exec(_block("k-diffusion style"), g)  # noqa: S102
    x0 = g["x0"]
    assert x0.shape == x.shape and bool(x0.isfinite().all())
    assert abs(float(x0.std()) - 1.0) < 0.05, float(x0.std())


def test_one_level_down_block_is_one_step():
    """The README's row-and-op example computes the second-order multistep update it describes."""
    g0 = torch.Generator().manual_seed(3)
    x, eps, x0_prev = (torch.randn(2, 8, generator=g0, dtype=torch.float64) for _ in range(3))
    ns = dk.NoiseScheduleVP("linear")
    g = {"torch": torch, "ns": ns, "x": x, "eps": eps, "x0_prev": x0_prev, "x0_slot": torch.empty_like(x)}
    exec(_block("Your own loop: `multistep_update`", 1), g)  # noqa: S102
    from dpm_kernels import planner as P

    p_prev, p_s, p_t = (P.point(ns, t) for t in (0.6, 0.5, 0.4))
    x0 = (x - p_s.sigma * eps) / p_s.alpha
    h, h0 = p_t.lam - p_s.lam, p_s.lam - p_prev.lam
    want = p_t.sigma / p_s.sigma * x - p_t.alpha * math.expm1(-h) * (x0 + 0.5 * (x0 - x0_prev) * h / h0)
    torch.testing.assert_close(g["x_next"], want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g["x0_slot"], x0, rtol=1e-13, atol=1e-13)


RESULTS = README.parent / "benchmarks" / "results"


def _section(name: str) -> str:
    text = README.read_text()
    start = text.index(f"## {name}\n")
    return text[start:text.find("\n## ", start + 1)]


def _close(shown: str, value: float) -> bool:
    """`shown` is `value` to the digits shown ("13" for 13.4, "9.8" for 9.77)."""
    digits = len(shown.split(".")[1]) if "." in shown else 0
    return abs(float(shown) - value) <= 0.5 * 10.0**-digits + 1e-9


def _md_rows(path: Path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


def _speedups(rows, schedulers, thr) -> list[float]:
    return [float(r["speed-up"].rstrip("x")) for r in rows if r["provider"] == "fused-cpu" and r["thr"] == thr
            and r.get("scheduler", "multistep") in schedulers]


def test_performance_figures_come_from_the_newest_results_files_they_name():
    """The README's speed-ups were those of an older file (2026-11-26) than the newest (2026-12-01): every figure now
    names its results file and date, the file is the newest of its kind, and the figures are that file's."""
    text = " ".join(_section("Performance").split())
    cited = re.findall(r"`((fused_step|diffusers_step|diffusers_family|diffusers_samplers)-[a-z0-9-]+-"
                       r"(\d{4}-\d{2}-\d{2})\.md)`, (\d{4}-\d{2}-\d{2})", text)
    assert sorted(kind for _, kind, _, _ in cited) == ["diffusers_family", "diffusers_samplers", "diffusers_step",
                                                       "fused_step"], cited
    files = {}
    for name, kind, date, said in cited:
        assert (RESULTS / name).is_file() and said == date, name
        newest = max(re.search(r"(\d{4}-\d{2}-\d{2})\.md$", p.name).group(1) for p in RESULTS.glob(f"{kind}-*.md"))
        assert date == newest, f"{name}: a newer {kind} file exists ({newest})"
        files[kind] = _md_rows(RESULTS / name)
    # the fused-step table: each row is the cited file's row at 2^22 elements
    table = [[c.strip() for c in line.strip("|").split("|")] for line in _section("Performance").splitlines()
             if re.match(r"^\| (float32|bfloat16) \|", line)]
    assert len(table) >= 4
    for dtype, order, thr, ms, x_floor, eager, compiled, diffusers in table:
        row = next(r for r in files["fused_step"] if (r["dtype"], r["n"], r["order"], r["thr"]) ==
                   (dtype, "2^22", order, thr))
        for shown, col in ((ms, "cpu ms"), (x_floor, "cpu x floor"), (eager, "cpu vs eager"),
                           (compiled, "cpu vs compile"), (diffusers, "cpu vs diffusers")):
            assert _close(shown.rstrip("x"), float(row[col].rstrip("x?"))), (dtype, order, thr, col, shown, row[col])
    # the drop-in ranges: the smallest and largest fused-cpu speed-ups of the cited files
    ranges = [
        (r"scheduler is (\S+)-(\S+)x faster than diffusers' without thresholding", "diffusers_step", {"multistep"},
         "off"),
        (r"and (\S+)-(\S+)x with it on 1x4x64x64 to 2x3x256x256", "diffusers_step", {"multistep"}, "on"),
        (r"\(singlestep, inverse, EDM\) (\S+)-(\S+)x without", "diffusers_family", {"singlestep", "inverse", "edm"},
         "off"),
        (r"EDM\) \S+ without and (\S+)-(\S+)x with thresholding", "diffusers_family", {"singlestep", "inverse", "edm"},
         "on"),
        (r"SDE schedulers gain less \((\S+)-(\S+)x without", "diffusers_family", {"multistep-sde", "edm-sde"}, "off"),
        (r"UniPC (\S+)-(\S+)x", "diffusers_samplers", {"unipc"}, "off"),
        (r"KDPM2 (\S+)-(\S+)x", "diffusers_samplers", {"kdpm2"}, "off"),
        (r"KDPM2 ancestral (\S+)-(\S+)x", "diffusers_samplers", {"kdpm2-ancestral"}, "off"),
        (r"CogVideoX (\S+)-(\S+)x", "diffusers_samplers", {"cogvideox"}, "off"),
    ]
    for pattern, kind, schedulers, thr in ranges:
        lo, hi = re.search(pattern, text).groups()
        got = _speedups(files[kind], schedulers, thr)
        assert got and _close(lo, min(got)) and _close(hi, max(got)), (pattern, lo, hi, min(got), max(got))


def test_set_up_says_which_torch_is_tested_and_how_to_get_the_cpu_build():
    """"`torch==2.13.0` pins the CPU build" held only where pip sees a local CPU wheel (elsewhere on Linux it brings
    the CUDA build), and "any torch >= 2.4 works" was never tested: the set-up names the version CI pins as the one
    tested, setup.py's lower bound as untested, PyTorch's CPU index, and what a CUDA machine needs."""
    root = README.parent
    setup = " ".join(_section("Set up").split())
    ci_pin = re.search(r"TEST_CMD='pip install torch==([\d.]+) ", (root / ".ci" / "run").read_text()).group(1)
    lower = re.search(r'"torch>=([\d.]+)"', (root / "setup.py").read_text()).group(1)
    assert f"Tested: torch {ci_pin}, CPU build, by CI" in setup
    assert f"torch >= {lower}, but no version other than those two has been tested" in setup
    assert f"pip install torch=={ci_pin} --index-url https://download.pytorch.org/whl/cpu" in setup
    assert "pins the CPU build" not in setup and "nvcc" in setup and "Triton" in setup
def test_fork_drop_in_block_is_sanas_sampling():
    """The README's SANA block (DPMS with flow matching, interval guidance, progress, the shifted flow grid) computes
    the forks' rules as tests/test_forks.py states them."""
    from test_forks import COND, UNCOND, Net, rel, sana_flow_reference, x_T

    from dpm_kernels.forks import sana

    ns = sana.NoiseScheduleFlow("discrete_flow")
    net = Net(ns, "flow")

    class Model:
        def forward_with_dpmsolver(self, x, t, cond, mask=None):
            assert mask == "m"
            return net(x, t, cond)

    seen = []
    g = {"model": Model(), "caption_embs": COND, "null_y": UNCOND, "model_kwargs": {"mask": "m"}, "z": x_T(),
         "progress_fn": lambda step, total: seen.append((step, total))}
    exec(_block("Drop-in for the authors' code"), g)  # noqa: S102
    ref = sana_flow_reference(Net(ns, "flow"), 20, 2, 3.0, (0.0, 1.0), g=4.5)
    assert rel(g["samples"], ref) < 1e-9
    assert seen == [(i, 21) for i in range(1, 22)]


def test_gradients_block_differentiates_the_loop():
    """The Gradients section's loop: x.grad and a network parameter's grad equal central finite differences of the
    same loop run without autograd (float64)."""
    from dpm_kernels.planner import time_steps

    ns = dk.NoiseScheduleVP("linear")
    ts = time_steps(ns, "logSNR", 1.0, 1e-3, 10)
    w = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    g = {"dk": dk, "ns": ns, "ts": ts, "x_T": x_T, "loss": lambda y: (y * y).sum(),
         "unet": lambda x, t: w * x + 0.05 * torch.sin(3 * x)}
    exec(_block("Gradients"), g)  # noqa: S102

    def loss_at(x0, wv):
        with torch.no_grad():
            hist, xt = dk.History(x0, order=2), x0.clone()
            for i in range(10):
                xt = dk.multistep_update(xt, wv * xt + 0.05 * torch.sin(3 * xt), hist, t=ts[i], t_next=ts[i + 1],
                                         noise_schedule=ns, order=2)
            return float((xt * xt).sum())

    v, eps = torch.randn(x_T.shape, generator=gen, dtype=torch.float64), 1e-6
    fd_x = (loss_at(x_T + eps * v, 0.3) - loss_at(x_T - eps * v, 0.3)) / (2 * eps)
    fd_w = (loss_at(x_T, 0.3 + eps) - loss_at(x_T, 0.3 - eps)) / (2 * eps)
    assert math.isclose(float((g["x"].grad * v).sum()), fd_x, rel_tol=1e-6)
    assert math.isclose(float(w.grad), fd_w, rel_tol=1e-6)
