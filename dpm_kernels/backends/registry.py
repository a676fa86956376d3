"""Backend selection: which implementation serves a fused step for given tensors.

Each backend says whether it can serve a device and, if not, why; an explicit backend that cannot serve
raises with that reason, and "auto" walks a priority list (xformers-style) and reports every reason when
nothing fits. "auto" never fails for CPU tensors: the reference always serves, and the first fallback from
a missing compiled backend is logged once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from . import reference

log = logging.getLogger("dpm_kernels")

BACKENDS = ("torch", "cpu", "cuda", "triton")
_warned: set[str] = set()
_chosen: dict[tuple[str, str], str] = {}  # (requested backend, device type) -> backend name


def _torch_impl(x, model_out, model_cond, x_eval, hist1, hist2, noise, coef, cfg, thr, ratio, lo, hi, out, hist_out):
    m_dtype = hist_out.dtype if hist_out is not None else x.dtype
    res, m = reference.fused_step(x, model_out, coef, model_cond, x_eval, hist1, hist2, noise, cfg, thr, ratio, lo, hi,
                                  m_dtype)
    if hist_out is not None:
        hist_out.copy_(m)
    out.copy_(res)


def _why_not(name: str, device: torch.device) -> str | None:
    """None when backend `name` can serve tensors on `device`, else the reason."""
    if name == "torch":
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"cpu: serves CPU tensors, got {device.type}"
        from . import cpu

        return cpu.why_unavailable()
    if name == "cuda":
        if device.type != "cuda":
            return f"cuda: serves CUDA tensors, got {device.type}"
        from . import cuda

        return cuda.why_unavailable()
    if name == "triton":
        from . import triton_backend

        return triton_backend.why_unavailable(device)
    return f"{name}: unknown backend; expected one of {('auto',) + BACKENDS}"


def _impl(name: str) -> Callable[..., None]:
    if name == "torch":
        return _torch_impl
    if name == "triton":
        return torch.ops.dpm_kernels.fused_step_triton.default
    return torch.ops.dpm_kernels.fused_step.default


def _auto_order(device: torch.device) -> list[str]:
    forced = os.environ.get("DPM_KERNELS_BACKEND")
    if forced:
        return [forced]
    if device.type == "cpu":
        return ["cpu", "torch"]
    if device.type == "cuda":
        from . import tuning

        return tuning.cuda_preference(device) + ["torch"]
    return ["triton", "torch"]


def choose(backend: str, device: torch.device) -> str:
    """The backend name that serves `device`; raises ValueError with every reason when none can."""
    if backend != "auto":
        why = _why_not(backend, device)
        if why is not None:
            raise ValueError(f"backend: {why}")
        return backend
    reasons = []
    order = _auto_order(device)
    for name in order:
        why = _why_not(name, device)
        if why is None:
            if reasons and name == "torch" and device.type not in _warned:
                _warned.add(device.type)
                log.warning("dpm_kernels: using the PyTorch reference for %s tensors (%s)", device.type,
                            "; ".join(reasons))
            return name
        reasons.append(why)
    raise ValueError("backend: no backend can serve these tensors: " + "; ".join(reasons))


# The C++ bindings check every argument themselves, with the same rules and messages as
# `ops.check_step_args` (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE raise ValueError / TypeError), before writing.
SELF_CHECKING = ("cpu", "cuda")


def resolve_name(backend: str, x: torch.Tensor) -> str:
    """The backend that serves `backend` for x's device (decided once per device type)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    key = (backend, x.device.type)
    name = _chosen.get(key)
    if name is None:  # the first call per (backend, device type) decides (and may build an extension)
        name = _chosen[key] = choose(backend, x.device)
    return name


def resolve(backend: str, x: torch.Tensor) -> Callable[..., None]:
    """The implementation (op-schema positional arguments) for `backend` and x's device."""
    return _impl(resolve_name(backend, x))


def resolve_cached(backend: str, x: torch.Tensor) -> Callable[..., None]:
    """`resolve` for code being traced by torch.compile: uses the decision made eagerly before.

    Loading an extension (locks, a compiler run) cannot be traced; `prepare` (or any eager call) makes
    the decision first.
    """
    key = (backend, x.device.type)
    if key not in _chosen:
        raise RuntimeError(
            f"backend: {backend!r} for {x.device.type} tensors was not resolved before tracing; call "
            "dpm_kernels.backends.registry.prepare(backend, device) (or run one step eagerly) first"
        )
    return _impl(_chosen[key])


def prepare(backend: str, device: torch.device | str) -> str:
    """Resolve (and load) `backend` for `device` eagerly; returns the backend name that will serve it."""
    device = torch.device(device)
    name = choose(backend, device)
    _chosen[(backend, device.type)] = name
    return name


def available() -> dict[str, str | None]:
    """Each backend's availability on this machine: None when usable, else why not."""
    devs = {"torch": torch.device("cpu"), "cpu": torch.device("cpu"), "cuda": torch.device("cuda"), "triton": None}
    res = {}
    for name, dev in devs.items():
        if dev is None:
            dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        res[name] = _why_not(name, dev)
    return res
