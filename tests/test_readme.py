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
