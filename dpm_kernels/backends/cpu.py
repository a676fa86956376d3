"""The C++ CPU backend: kernels in csrc/cpu, registered for the CPU key of dpm_kernels::fused_step."""

from __future__ import annotations


def why_unavailable() -> str | None:
    """None when the CPU kernels are loaded (building them on first use), else the reason."""
    from .. import _build

    reason = _build.load("cpu")
    return None if reason is None else f"cpu: C++ extension unavailable ({reason})"
