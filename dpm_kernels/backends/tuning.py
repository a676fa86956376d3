"""Which compiled backend "auto" prefers on a CUDA device."""

from __future__ import annotations

import torch


def cuda_preference(device: torch.device) -> list[str]:
    return ["cuda", "triton"]
