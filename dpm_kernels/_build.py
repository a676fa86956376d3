"""Loading the compiled extensions: ahead-of-time builds if installed, else a build on first use.

The kernels are optional at import (torchao-style): each extension is loaded lazily the first time a
backend needs it. Order of attempts for extension ``name`` ("cpu" or "cuda"):

1. the module ``dpm_kernels._<name>`` built by ``setup.py`` (``DPM_KERNELS_BUILD_EXT=1``);
2. a JIT build with ``torch.utils.cpp_extension.load`` from the C++ sources (cached in
   ``TORCH_EXTENSIONS_DIR``, default ~/.cache/torch_extensions; rebuilt only when a source changes).

``DPM_KERNELS_NO_EXT=1`` disables both; ``DPM_KERNELS_NO_JIT=1`` disables only the JIT build.
A failure is remembered with its reason, which the backend registry reports.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("dpm_kernels")

_lock = threading.Lock()
_state: dict[str, str | None] = {}  # name -> None when loaded, else the reason it is not


def csrc_dir() -> Path:
    """The C++/CUDA sources: the copy installed inside the package, else the source tree's csrc/."""
    here = Path(__file__).resolve().parent
    for cand in (here / "_csrc", here.parent / "csrc"):
        if (cand / "dpm_math.h").is_file():
            return cand
    raise FileNotFoundError("dpm_kernels: C++ sources not found (neither dpm_kernels/_csrc nor csrc/)")


def cpu_sources() -> list[Path]:
    d = csrc_dir()
    return [d / "cpu" / "fused_step_cpu.cpp"]


def cuda_sources() -> list[Path]:
    """The kernels (every .cu of csrc/cuda: torch-free, C ABI) and the torch binding."""
    d = csrc_dir() / "cuda"
    return sorted(d.glob("*.cu")) + [d / "fused_step_binding.cpp"]


def cpu_cflags() -> list[str]:
    # OpenMP so that at::parallel_for (OpenMP backend in the official wheels) really runs in parallel.
    # No -std: torch adds the standard its headers need (C++20 from torch 2.14; a later -std=c++17 breaks it).
    return ["-O3", "-fopenmp"]


def cuda_flags() -> list[str]:
    # No --use_fast_math, and -fmad=false: no multiply-add contraction, so every product and sum rounds as in the
    # reference (and the CPU kernel): a fused a*b+c differs where terms cancel, and would make the history slot
    # differ from the reference's m in the last bits. No -std either: torch adds the standard it was built with
    # (its headers need C++20 from 2.14); the .cu files take 17 or 20.
    return ["-O3", "-lineinfo", "-fmad=false"]


def _jit(name: str) -> None:
    from torch.utils import cpp_extension

    build_dir = None
    if os.environ.get("DPM_KERNELS_BUILD_DIR"):
        build_dir = os.environ["DPM_KERNELS_BUILD_DIR"]
        os.makedirs(build_dir, exist_ok=True)
    if name == "cpu":
        cpp_extension.load(
            name="dpm_kernels_cpu",
            sources=[str(p) for p in cpu_sources()],
            extra_cflags=cpu_cflags(),
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(csrc_dir())],
            is_python_module=False,
            build_directory=build_dir,
            verbose=os.environ.get("DPM_KERNELS_VERBOSE_BUILD") == "1",
        )
    else:
        cpp_extension.load(
            name="dpm_kernels_cuda",
            sources=[str(p) for p in cuda_sources()],
            extra_cflags=["-O3"],  # the binding includes ATen: torch picks the C++ standard
            extra_cuda_cflags=cuda_flags(),
            extra_include_paths=[str(csrc_dir())],
            is_python_module=False,
            build_directory=build_dir,
            verbose=os.environ.get("DPM_KERNELS_VERBOSE_BUILD") == "1",
        )


def load(name: str) -> str | None:
    """Load extension `name` ("cpu" | "cuda"); None on success, else the reason it is unavailable."""
    with _lock:
        if name in _state:
            return _state[name]
        reason = _load_locked(name)
        _state[name] = reason
        if reason is not None:
            log.info("dpm_kernels: %s extension unavailable: %s", name, reason)
        return reason


def _load_locked(name: str) -> str | None:
    if os.environ.get("DPM_KERNELS_NO_EXT") == "1":
        return "disabled by DPM_KERNELS_NO_EXT=1"
    import torch  # noqa: F401  (the op schema must be defined before the kernels register)

    from . import opdef  # noqa: F401

    try:
        importlib.import_module(f"dpm_kernels._{name}")
        return None
    except ImportError as e:
        aot_error = str(e)
    if os.environ.get("DPM_KERNELS_NO_JIT") == "1":
        return f"no prebuilt dpm_kernels._{name} ({aot_error}) and JIT disabled by DPM_KERNELS_NO_JIT=1"
    try:
        _jit(name)
        return None
    except Exception as e:  # a compiler error, a missing toolchain, ...
        msg = str(e).strip().splitlines()
        return f"build failed: {msg[-1] if msg else type(e).__name__}"
