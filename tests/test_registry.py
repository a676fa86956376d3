"""The backends as one list: a deterministic "auto", decisions per device (index included), and the public op
usable straight after ``import dpm_kernels`` -- eagerly and under torch.compile -- with or without the C++ kernels."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dpm_kernels import layout as L
from dpm_kernels import ops
from dpm_kernels.backends import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_fresh(code: str, **env) -> str:
    """`code` in a new interpreter (nothing of dpm_kernels loaded yet); returns its stdout."""
    full_env = {**os.environ, "PYTHONPATH": ROOT, **env}
    full_env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600,
                         env=full_env, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


STEP = """
    import torch
    import dpm_kernels
    from dpm_kernels import layout
    from dpm_kernels.backends import reference

    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    coef = torch.zeros(layout.NCOEF, dtype=torch.float64)
    coef[1], coef[2], coef[4], coef[5], coef[6] = 1.0, -0.4, 1.0, 0.8, 0.3   # px, pm, qm, a, c0
    want = reference.fused_step(x, eps, coef)[0]

    def step(x, eps, coef, out, m):
        torch.ops.dpm_kernels.fused_step(x, eps, None, None, None, None, None, None, coef, 0, False, 0.0, 1.0, 1.0, out,
                                         m)
        return out
"""


@pytest.mark.slow
def test_public_op_under_torch_compile_before_any_eager_call():
    out = _run_fresh(STEP + """
    compiled = torch.compile(step, fullgraph=True)
    out, m = torch.empty_like(x), torch.empty_like(x)
    compiled(x, eps, coef, out, m)
    assert torch.allclose(out, want, rtol=1e-6, atol=1e-6), (out - want).abs().max()
    y = dpm_kernels.ops.fused_step   # the Python entry point with backend="auto", traced first as well
    f = torch.compile(lambda x, e, c: y(x, e, c), fullgraph=True)
    assert torch.allclose(f(x, eps, coef), want, rtol=1e-6, atol=1e-6)
    from dpm_kernels.backends import registry
    print(registry.choose("auto", x.device).name)
    """)
    assert out.split()[-1] == "cpu"  # the C++ kernels were loaded at run time by the first call


def test_public_op_eager_right_after_import():
    out = _run_fresh(STEP + """
    out, m = torch.empty_like(x), torch.empty_like(x)
    step(x, eps, coef, out, m)
    assert torch.allclose(out, want, rtol=1e-6, atol=1e-6)
    print("ok")
    """)
    assert out.split()[-1] == "ok"


def test_public_op_without_the_extensions_runs_the_reference():
    out = _run_fresh(STEP + """
    out, m = torch.empty_like(x), torch.empty_like(x)
    step(x, eps, coef, out, m)
    assert torch.equal(out, want)   # the reference itself
    from dpm_kernels.backends import registry
    try:
        step(x, eps.double(), coef, out, m)
    except TypeError as e:        # the reference fallback checks by the same rules
        assert str(e).startswith("model_out:"), e
    else:
        raise AssertionError("bad input accepted")
    print(registry.choose("auto", x.device).name)
    """, DPM_KERNELS_NO_EXT="1")
    assert out.split()[-1] == "torch"


def test_auto_is_deterministic_and_fastest_is_auto():
    cpu = torch.device("cpu")
    picks = {registry.choose("auto", cpu) for _ in range(5)}
    assert len(picks) == 1
    want = next(b for b in registry.auto_order(cpu) if b.why_not(cpu) is None)
    assert picks == {want}
    assert registry.choose("fastest", cpu) is want  # no timing at run time: the size rule replaced it


def test_auto_size_rule_picks_triton_for_large_plain_steps(monkeypatch):
    """The size rule of "auto" where both GPU backends load (registry.large_step_backend), wired into a bound step:
    plain steps of TRITON_MIN_ELEMENTS+ elements on Triton, smaller or thresholded ones and named backends on CUDA.
    The GPU is simulated (resolve and availability patched; each backend's eager implementation records its name)."""
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(registry, "resolve", lambda name, device: registry.by_name(name) if name in registry.NAMES
                        else registry.CUDA)
    monkeypatch.setattr(registry.Backend, "why_not", lambda self, device: None)
    assert registry.large_step_backend("auto", gpu, False) is registry.TRITON
    assert registry.large_step_backend("fastest", gpu, False) is registry.TRITON
    assert registry.large_step_backend("auto", gpu, True) is None  # thresholded: CUDA at every size
    assert registry.large_step_backend("cuda", gpu, False) is None  # a named backend is that backend
    assert registry.large_step_backend("auto", torch.device("cpu"), False) is None
    calls = []
    monkeypatch.setattr(registry.Backend, "eager_impl", property(lambda self: lambda *a: calls.append(self.name)))
    monkeypatch.setattr(registry, "TRITON_MIN_ELEMENTS", 64)
    coef = torch.zeros(L.NCOEF, dtype=torch.float64)
    for backend, thr, n, want in (("auto", None, 63, "cuda"), ("auto", None, 64, "triton"),
                                  ("auto", (0.995, 1.0, 1.0), 64, "cuda"), ("cuda", None, 64, "cuda")):
        x = torch.zeros(1, n)
        ops.BoundStep(backend, gpu, threshold=thr).mutating(x, x, coef, torch.empty_like(x))
        assert calls.pop() == want, (backend, thr, n)


def test_decisions_are_per_device_index():
    a, b = torch.device("cuda", 0), torch.device("cuda", 1)
    registry.resolve("torch", a)
    registry.resolve("torch", b)
    assert ("torch", a) in registry._resolved and ("torch", b) in registry._resolved


def test_one_list_of_backends():
    assert registry.NAMES == tuple(b.name for b in registry.BACKENDS)
    assert set(registry.CHOICES) == {"auto", "fastest", *registry.NAMES}
    with pytest.raises(ValueError, match="backend"):
        registry.validate("fortran")
    for b in registry.BACKENDS:
        reason = b.why_not(torch.device("meta")) if b.devices is not None else None
        assert reason is None or reason.startswith(b.name + ":")
