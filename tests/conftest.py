"""Shared test setup: which backends run here, tolerances, and the float64 reference comparison."""

from __future__ import annotations

import os

import torch

# Triton's interpreter must be chosen before any Triton kernel is defined: on a machine without a GPU the
# Triton backend then runs on CPU tensors (slowly: tests keep shapes small).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from dpm_kernels.backends import registry  # noqa: E402


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends_for(device: str) -> list[str]:
    """Backends that must work for tensors on `device` here, from the registry's one list (a compiled backend
    that fails to build fails the tests that use it instead of being skipped, unless explicitly disabled; Triton
    serves CPU tensors only under its interpreter)."""
    dev = torch.device(device)
    names = []
    for b in registry.BACKENDS:
        if b.devices is not None and dev.type not in b.devices:
            continue
        if b in (registry.CPU, registry.CUDA) and os.environ.get("DPM_KERNELS_NO_EXT") == "1":
            continue
        if b is registry.TRITON and dev.type == "cpu" and not (
                os.environ.get("TRITON_INTERPRET") == "1" and b.why_not(dev) is None):
            continue
        names.append(b.name)
    return names


ALL_BACKEND_CASES = [(d, b) for d in devices() for b in backends_for(d)]
IDS = [f"{d}-{b}" for d, b in ALL_BACKEND_CASES]


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny tensors, where threads only add overhead on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def poison(t: torch.Tensor | None) -> None:
    if t is not None:
        t.fill_(float("nan"))


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max(1, max |ref|), in float64."""
    a64, r64 = a.double(), ref.double()
    if a64.numel() == 0:
        return 0.0
    scale = max(1.0, float(r64.abs().max()))
    return float((a64 - r64).abs().max()) / scale
