"""``backend="fastest"``: the compiled backend measured fastest on a device -- an explicit opt-in.

"auto" is deterministic (the registry's priority order); "fastest" instead times one representative step
(2^22 float32 elements, order 2, in place; a plain and a thresholded one) with each compiled backend that can
serve the device, a few times after a warm-up, and keeps the faster for the rest of the process (per device
index). Only CUDA devices have two compiled backends (CUDA C++ and Triton); elsewhere "fastest" is "auto". The
measurement never runs inside a captured graph or traced code (the registry decides eagerly); a measurement that
fails keeps the priority order.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger("dpm_kernels")

_decided: dict[torch.device, str] = {}


def _time_backend(name: str, device: torch.device, reps: int = 10) -> float:
    """Median milliseconds of a plain plus a thresholded step with backend `name`."""
    from .. import coefficients as C
    from .. import planner as P
    from ..ops import fused_step
    from ..schedule import NoiseScheduleVP

    pts = P.point(NoiseScheduleVP("linear"), np.array([0.55, 0.5, 0.45]))
    upd = C.multistep("dpmsolver++", "dpmsolver", 2, [pts[1], pts[0]], pts[2])
    coef = torch.from_numpy(P.coefficient_rows(pts[1], P.Conversion("noise", "x0"), upd)).to(device)
    n = 1 << 22
    x = torch.randn(4, n // 4, device=device)
    eps, h1, ho = torch.randn_like(x), torch.randn_like(x), torch.empty_like(x)

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


def fastest(device: torch.device) -> str:
    """The name of the backend measured fastest for `device` (measured once per device)."""
    from . import registry

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device in _decided:
        return _decided[device]
    usable = [b for b in registry.auto_order(device) if b is not registry.TORCH and b.why_not(device) is None]
    if device.type != "cuda" or len(usable) < 2 or torch.cuda.is_current_stream_capturing():
        return registry.choose("auto", device).name
    name = usable[0].name
    try:
        with torch.cuda.device(device):
            ms = {b.name: _time_backend(b.name, device) for b in usable}
        name = min(ms, key=ms.get)
        log.info("dpm_kernels: backend timings on %s: %s ms -> %s", torch.cuda.get_device_name(device),
                 {k: round(v, 3) for k, v in ms.items()}, name)
    except Exception as e:  # a failed measurement must not break sampling: keep the priority order
        log.warning("dpm_kernels: could not time the CUDA backends (%s); using %s", e, name)
    _decided[device] = name
    return name
