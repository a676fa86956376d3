"""The Triton backend (placeholder until the Triton kernels land)."""

from __future__ import annotations

import torch


def why_unavailable(device: torch.device) -> str | None:
    return "triton: not implemented yet"
