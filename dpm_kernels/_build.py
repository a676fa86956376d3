"""Loading the compiled extensions: ahead-of-time builds if installed, else a build on first use.

The kernels are optional at import (torchao-style): each extension is loaded lazily the first time a
backend needs it. Order of attempts for extension ``name`` ("cpu" or "cuda"):

1. the module ``dpm_kernels._<name>`` built by ``setup.py`` (``DPM_KERNELS_BUILD_EXT=1``);
2. a JIT build with ``torch.utils.cpp_extension.load`` from the C++ sources, into a directory keyed on what the
   binary depends on (`build_dir`: sources, flags, torch/CUDA/Python versions, source location) under
   ``TORCH_EXTENSIONS_DIR`` (default ~/.cache/torch_extensions); a line on stderr says when a one-time build runs
   and where.

``DPM_KERNELS_NO_EXT=1`` disables both; ``DPM_KERNELS_NO_JIT=1`` disables only the JIT build.
A failure is remembered with its reason, which the backend registry reports.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("dpm_kernels")

_lock = threading.Lock()
_state: dict[str, str | None] = {}  # name -> None when loaded, else the reason it is not
_where: dict[str, str] = {}  # name -> the file the loaded extension came from


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


SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]


def sanitized() -> bool:
    """DPM_KERNELS_SANITIZE=1: the CPU kernels built with AddressSanitizer and UndefinedBehaviorSanitizer (for
    tests/sanitize.sh, which preloads the sanitizer runtimes into Python); the prebuilt module is then skipped."""
    return os.environ.get("DPM_KERNELS_SANITIZE") == "1"


def cpu_cflags() -> list[str]:
    # OpenMP so that at::parallel_for (OpenMP backend in the official wheels) really runs in parallel.
    # No -std: torch adds the standard its headers need (C++20 from torch 2.14; a later -std=c++17 breaks it).
    return ["-O1", "-fopenmp"] + SANITIZE_FLAGS if sanitized() else ["-O3", "-fopenmp"]


def cuda_flags() -> list[str]:
    # No --use_fast_math, and -fmad=false: no multiply-add contraction, so every product and sum rounds as in the
    # reference (and the CPU kernel): a fused a*b+c differs where terms cancel, and would make the history slot
    # differ from the reference's m in the last bits. No -std either: torch adds the standard it was built with
    # (its headers need C++20 from 2.14); the .cu files take 17 or 20.
    return ["-O3", "-lineinfo", "-fmad=false"]


def _sources(name: str) -> list[Path]:
    return cpu_sources() if name == "cpu" else cuda_sources()


def _build_options(name: str) -> dict:
    """What `torch.utils.cpp_extension.load` gets for extension `name` (the build directory aside)."""
    common = dict(name=f"dpm_kernels_{name}", sources=[str(p) for p in _sources(name)],
                  extra_include_paths=[str(csrc_dir())], is_python_module=False,
                  verbose=os.environ.get("DPM_KERNELS_VERBOSE_BUILD") == "1")
    if name == "cpu":
        return dict(common, extra_cflags=cpu_cflags(),
                    extra_ldflags=["-fopenmp"] + (SANITIZE_FLAGS[:1] if sanitized() else []))
    # the binding includes ATen: torch picks the C++ standard
    return dict(common, extra_cflags=["-O3"], extra_cuda_cflags=cuda_flags())


def build_key(name: str) -> str:
    """A digest of everything the binary depends on: the sources and headers (their bytes and where they are:
    the build files name absolute paths), the flags, the torch, CUDA and Python versions and the platform.
    Two checkouts or environments of the same commit differ in it where their binaries would, and never
    rebuild each other's extension."""
    import platform
    import sys

    import torch

    h = hashlib.sha256()
    opts = _build_options(name)
    for part in (name, torch.__version__, str(torch.version.cuda), sys.version.split()[0], platform.machine(),
                 repr(opts.get("extra_cflags")), repr(opts.get("extra_cuda_cflags")), repr(opts.get("extra_ldflags")),
                 os.environ.get("TORCH_CUDA_ARCH_LIST", "") if name == "cuda" else "", str(csrc_dir())):
        h.update(part.encode() + b"\0")
    for f in sorted(p for p in csrc_dir().rglob("*") if p.is_file() and p.suffix in (".h", ".cuh", ".cpp", ".cu")):
        h.update(str(f.relative_to(csrc_dir())).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_dir(name: str) -> Path:
    """Where extension `name` is built: DPM_KERNELS_BUILD_DIR, else <torch extensions dir>/dpm_kernels/<name>-<key>
    (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions)."""
    if os.environ.get("DPM_KERNELS_BUILD_DIR"):
        return Path(os.environ["DPM_KERNELS_BUILD_DIR"])
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "torch_extensions")
    return Path(base) / "dpm_kernels" / f"{name}-{build_key(name)}"


# Seconds a first build takes on this project's 2-core CI machine (measured 2026-12-01), for the message.
BUILD_SECONDS = {"cpu": 30, "cuda": 120}


def _jit(name: str) -> str:
    """Builds (first use) and loads extension `name`; returns the library's path."""
    from torch.utils import cpp_extension

    opts = _build_options(name)
    out = build_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    fresh = not any(out.glob(f"{opts['name']}*.so"))
    if fresh:
        print(f"dpm_kernels: building the {name.upper()} kernels once for this environment (about "
              f"{BUILD_SECONDS[name]} s on 2 cores) in {out}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    cpp_extension.load(build_directory=str(out), **opts)
    if fresh:
        print(f"dpm_kernels: built the {name.upper()} kernels in {time.perf_counter() - t0:.0f} s", file=sys.stderr,
              flush=True)
    return str(next(out.glob(f"{opts['name']}*.so"), out))


def location(name: str) -> str | None:
    """The file extension `name` was loaded from (None: not loaded)."""
    return _where.get(name)


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
        if sanitized():
            raise ImportError("skipped: DPM_KERNELS_SANITIZE=1 builds instrumented kernels")
        _where[name] = importlib.import_module(f"dpm_kernels._{name}").__file__
        return None
    except ImportError as e:
        aot_error = str(e)
    if os.environ.get("DPM_KERNELS_NO_JIT") == "1":
        return f"no prebuilt dpm_kernels._{name} ({aot_error}) and JIT disabled by DPM_KERNELS_NO_JIT=1"
    try:
        _where[name] = _jit(name)
        return None
    except Exception as e:  # a compiler error, a missing toolchain, ...
        msg = str(e).strip().splitlines()
        return f"build failed: {msg[-1] if msg else type(e).__name__}"
