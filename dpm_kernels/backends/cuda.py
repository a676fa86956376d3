"""The CUDA C++ backend: kernels in csrc/cuda, registered for the CUDA key of dpm_kernels::fused_step."""

from __future__ import annotations

import torch


def why_unavailable() -> str | None:
    """None when the CUDA kernels are loaded (building them on first use), else the reason."""
    if not torch.cuda.is_available():
        return "cuda: no CUDA device visible to PyTorch"
    if torch.version.cuda is None:
        return "cuda: this PyTorch build has no CUDA support"
    from .. import _build

    reason = _build.load("cuda")
    return None if reason is None else f"cuda: CUDA extension unavailable ({reason})"
