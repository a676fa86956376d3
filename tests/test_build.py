"""Building and shipping the C++ kernels: the JIT build directory is keyed on what the binary depends on, a
one-time build says so on stderr, and a platform wheel carries the extension so that nothing is built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dpm_kernels import _build

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow,  # compiler runs: two builds and a wheel
              pytest.mark.skipif(os.environ.get("DPM_KERNELS_NO_EXT") == "1", reason="DPM_KERNELS_NO_EXT=1")]

CPU_STEP = """
    import sys, torch, dpm_kernels, dpm_kernels.layout
    from dpm_kernels.backends import registry
    x = torch.randn(2, 8)
    c = torch.zeros(dpm_kernels.layout.NCOEF, dtype=torch.float64)
    c[5] = 1.0
    y = dpm_kernels.ops.fused_step(x, x.clone(), c, backend="cpu")
    assert torch.equal(y, x)
    print("module:", "dpm_kernels._cpu" in sys.modules, dpm_kernels.__file__)
"""


def _python(code: str, cwd, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("DPM_KERNELS_BUILD_DIR", "TRITON_INTERPRET")}
    full.update(env)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd,
                         env=full, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_build_key_follows_sources_location_and_torch(tmp_path, monkeypatch):
    here = _build.build_key("cpu")
    assert here == _build.build_key("cpu")  # deterministic
    copy = tmp_path / "a" / "csrc"
    shutil.copytree(_build.csrc_dir(), copy)
    monkeypatch.setattr(_build, "csrc_dir", lambda: copy)
    moved = _build.build_key("cpu")
    assert moved != here  # another checkout: its own build directory
    (copy / "dpm_math.h").write_text((copy / "dpm_math.h").read_text() + "\n// edited\n")
    edited = _build.build_key("cpu")
    assert edited not in (here, moved)
    monkeypatch.setattr(torch, "__version__", "0.0.0+other")
    assert _build.build_key("cpu") != edited
    assert _build.build_dir("cpu").name == f"cpu-{_build.build_key('cpu')}"


EIGHT_THREADS = """
    import threading, torch, dpm_kernels, dpm_kernels.layout
    from dpm_kernels.backends import registry
    start, results, errors = threading.Barrier(8), [None] * 8, []

    def first_step(i):
        x = torch.full((2, 64), float(i))
        c = torch.zeros(dpm_kernels.layout.NCOEF, dtype=torch.float64)
        c[5] = 2.0
        start.wait()  # all eight at the same moment, before anything is built or loaded
        try:
            results[i] = dpm_kernels.ops.fused_step(x, x.clone(), c, backend=BACKEND)
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=first_step, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(torch.equal(r, torch.full((2, 64), 2.0 * i)) for i, r in enumerate(results))
    print("backend:", registry.choose(BACKEND, torch.device("cpu")).name)
"""


def test_first_build_is_announced_and_reused(tmp_path):
    """A fresh extensions directory and eight threads making their first step at once: one build, announced on
    stderr with its directory, every thread served; the next process loads it silently."""
    ext = tmp_path / "ext"
    first = _python("    BACKEND = 'auto'" + EIGHT_THREADS, ROOT, TORCH_EXTENSIONS_DIR=str(ext))
    assert first.stderr.count("building the CPU kernels once") == 1 and str(ext) in first.stderr, first.stderr
    assert "built the CPU kernels in" in first.stderr and first.stdout.split()[-1] == "cpu"
    again = _python(CPU_STEP, ROOT, TORCH_EXTENSIONS_DIR=str(ext))  # another process: loads, builds nothing
    assert "building" not in again.stderr, again.stderr
    assert len(list((ext / "dpm_kernels").iterdir())) == 1


def test_platform_wheel_runs_a_cpu_step_without_building(tmp_path):
    dist = tmp_path / "dist"
    env = {**os.environ, "DPM_KERNELS_BUILD_EXT": "1"}
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                          str(dist), str(ROOT)], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = dist.glob("dpm_kernels-*.whl")
    assert not wheel.name.endswith("-none-any.whl"), wheel.name  # a platform wheel: it holds a binary
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                          str(wheel)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    empty = tmp_path / "no-builds-here"
    out = _python(CPU_STEP, tmp_path, PYTHONPATH=str(site), DPM_KERNELS_NO_JIT="1", TORCH_EXTENSIONS_DIR=str(empty))
    assert out.stdout.split()[1] == "True" and out.stdout.split()[2].startswith(str(site)), out.stdout
    assert "building" not in out.stderr and not empty.exists()


def test_eight_threads_make_their_first_triton_step_at_once():
    """Under the interpreter (CPU tensors): the op is registered once, no thread sees a half-registered op."""
    pytest.importorskip("triton")
    out = _python("    BACKEND = 'triton'" + EIGHT_THREADS, ROOT, TRITON_INTERPRET="1")
    assert out.stdout.split()[-1] == "triton"
