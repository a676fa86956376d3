"""Which compiled backend "auto" prefers on a CUDA device: the one measured faster there.

When both the CUDA C++ and the Triton kernels can serve a device, the first "auto" decision for it times
one representative step (2^22 float32 elements, order 2, in place; a plain and a thresholded one) with
each, a few times after a warm-up, and keeps the faster for the rest of the process. The measurement runs
once per device (~0.1 s) and never inside a captured graph or a traced region (the registry decides
eagerly). `DPM_KERNELS_BACKEND` overrides it.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("dpm_kernels")

_decided: dict[int, list[str]] = {}
STATIC_ORDER = ["cuda", "triton"]


def _time_backend(name: str, device: torch.device, reps: int = 10) -> float:
    """Median milliseconds of a plain plus a thresholded step with backend `name`."""
    from .. import layout as L
    from ..ops import fused_step

    n = 1 << 22
    x = torch.randn(4, n // 4, device=device)
    eps, h1, ho = torch.randn_like(x), torch.randn_like(x), torch.empty_like(x)
    coef = torch.zeros(L.NCOEF, dtype=torch.float64, device=device)
    coef[L.PX], coef[L.PM], coef[L.QM], coef[L.A], coef[L.C0], coef[L.C1] = 1.0, -0.5, 1.0, 0.9, 0.1, -0.05

    def step():
        fused_step(x, eps, coef, out=x, hist_out=ho, hist=[h1], backend=name)
        fused_step(x, eps, coef, out=x, hist_out=ho, hist=[h1], threshold=(0.995, 1.0, float("inf")), backend=name)

    step()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        step()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    return sorted(times)[len(times) // 2]


def cuda_preference(device: torch.device) -> list[str]:
    """Compiled backends for `device`, fastest first (measured once when both are available)."""
    from . import registry

    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx in _decided:
        return _decided[idx]
    usable = [b for b in STATIC_ORDER if registry._why_not(b, device) is None]
    order = usable + [b for b in STATIC_ORDER if b not in usable]
    if len(usable) == 2 and not torch.cuda.is_current_stream_capturing():
        try:
            dev = torch.device("cuda", idx)
            with torch.cuda.device(dev):
                ms = {b: _time_backend(b, dev) for b in usable}
            order = sorted(usable, key=ms.get) + [b for b in STATIC_ORDER if b not in usable]
            log.info("dpm_kernels: backend timings on %s: %s ms -> prefer %s", torch.cuda.get_device_name(dev),
                     {k: round(v, 3) for k, v in ms.items()}, order[0])
        except Exception as e:  # a failed measurement must not break sampling: keep the static order
            log.warning("dpm_kernels: could not time the CUDA backends (%s); preferring %s", e, order[0])
    _decided[idx] = order
    return order
