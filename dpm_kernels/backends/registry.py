"""The backends of the fused step as one list of objects, and the choice among them.

Each `Backend` knows its name, the device types it serves, why it cannot serve a device (loading or building its
kernels the first time it is asked), whether it checks its own arguments, and its implementation (a callable
taking the op schema's positional arguments). `BACKENDS` is in priority order. A backend is chosen by name:

- ``"auto"``: deterministic -- the first backend of `BACKENDS` that takes part in "auto" for the device type and
  can serve the device (CUDA: cuda, triton, torch; CPU: cpu, torch). Same inputs, same machine: same backend and
  the same bits in every run. Falling back to the reference is logged once per device type, with the reasons.
  Where both GPU backends load, a bound step ("auto") runs its large plain steps on Triton by a written-down size
  rule (`large_step_backend`), never by timing at run time.
- ``"fastest"``: the same as "auto" (it once timed the backends at run time; the size rule replaced that).
- a backend's own name: that backend, or a ValueError saying why it cannot serve the device.

Decisions are cached per (name, device) -- device index included, so two GPUs of one process decide alone.

The public op ``torch.ops.dpm_kernels.fused_step`` is "auto" itself, usable as soon as dpm_kernels is imported:
its CompositeExplicitAutograd kernel, which the dispatcher uses for any device whose C++ kernel is not
registered, loads (or builds) the C++ kernels at the first call; once loaded they are registered for their
dispatch key (CPU, CUDA) and serve every later call directly. Where they cannot load, that kernel serves the
device with the next backend of the "auto" order, checking the arguments by the same rules.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import opdef
from . import reference

log = logging.getLogger("dpm_kernels")


@dataclass(frozen=True, eq=False)
class Backend:
    """One implementation of the fused-step op."""

    name: str
    summary: str
    devices: tuple[str, ...] | None  # device types it can ever serve (None: any)
    auto_for: tuple[str, ...] | None  # device types for which "auto" considers it (None: any)
    self_checking: bool  # refuses bad arguments itself, by opdef's rules (so callers need not check first)
    _why: Callable[[torch.device], str | None]  # None when it can serve the device (may load its kernels)
    _impl: Callable[[], Callable[..., None]]
    # what eager code calls, when that is not the op itself: the op's Python implementation, without the custom-op
    # dispatch (about 80 us a call for a Python op here, against 8 us for the C++ ones); traced code calls `impl`
    _eager: Callable[[], Callable[..., None]] | None = None

    def why_not(self, device: torch.device) -> str | None:
        """None when this backend can serve tensors on `device`, else the reason (loads kernels on first use)."""
        if self.devices is not None and device.type not in self.devices:
            return f"{self.name}: serves {' or '.join(self.devices)} tensors, got {device.type}"
        return self._why(device)

    @property
    def impl(self) -> Callable[..., None]:
        """The implementation: op-schema positional arguments, writes out and hist_out."""
        return self._impl()

    @property
    def eager_impl(self) -> Callable[..., None]:
        """The same implementation for eager calls (not inside code torch.compile traces): the op's own Python
        function where the op is a Python op, so that no dispatcher round trip is paid per step."""
        return self._impl() if self._eager is None else self._eager()

    def takes_part_in_auto(self, device: torch.device) -> bool:
        return self.auto_for is None or device.type in self.auto_for


def _cpu_why(device: torch.device) -> str | None:
    from . import cpu

    return cpu.why_unavailable()


def _cuda_why(device: torch.device) -> str | None:
    from . import cuda

    return cuda.why_unavailable()


def _triton_why(device: torch.device) -> str | None:
    from . import triton_backend

    return triton_backend.why_unavailable(device)


def _public_op():
    return torch.ops.dpm_kernels.fused_step.default


def _triton_op():
    return torch.ops.dpm_kernels.fused_step_triton.default


def _triton_eager():
    from . import triton_backend

    return triton_backend.fused_step_triton


CUDA = Backend("cuda", "CUDA C++ kernels (csrc/cuda), built on first use", ("cuda",), ("cuda",), True, _cuda_why,
               _public_op)
TRITON = Backend("triton", "Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1)", ("cuda", "cpu"), ("cuda",),
                 True, _triton_why, _triton_op, _triton_eager)
CPU = Backend("cpu", "C++ kernels (csrc/cpu), built on first use", ("cpu",), ("cpu",), True, _cpu_why, _public_op)
TORCH = Backend("torch", "the PyTorch reference (plain tensor code, torch.compile can fuse it)", None, None, False,
                lambda device: None, lambda: reference.op_impl)
BACKENDS: tuple[Backend, ...] = (CUDA, TRITON, CPU, TORCH)  # the priority order of "auto"
NAMES: tuple[str, ...] = tuple(b.name for b in BACKENDS)
CHOICES: tuple[str, ...] = ("auto", "fastest") + NAMES  # what a `backend=` argument accepts

# What the traced code of torch.compile calls for "auto" before an eager decision exists: the public op, which
# chooses (and loads) at run time, and whose every kernel checks its arguments.
AUTO_OP = Backend("auto", "the public op (chooses its kernel at run time)", None, None, True, lambda device: None,
                  _public_op)

_by_name = {b.name: b for b in BACKENDS}
_resolved: dict[tuple[str, torch.device], Backend] = {}
_warned: set[str] = set()
_lock = threading.Lock()


def by_name(name: str) -> Backend:
    if name not in _by_name:
        raise ValueError(f"backend: unknown backend {name!r}; expected one of {CHOICES}")
    return _by_name[name]


def validate(name: str) -> str:
    """`name` if it is a valid ``backend=`` value, else a ValueError listing the valid ones."""
    if name not in CHOICES:
        raise ValueError(f"backend: expected one of {CHOICES}, got {name!r}")
    return name


def auto_order(device: torch.device) -> list[Backend]:
    return [b for b in BACKENDS if b.takes_part_in_auto(device)]


def choose(name: str, device: torch.device | str) -> Backend:
    """The backend that serves `name` on `device` (not cached); ValueError with every reason when none can."""
    device = torch.device(device)
    validate(name)
    if name not in ("auto", "fastest"):
        b = by_name(name)
        why = b.why_not(device)
        if why is not None:
            raise ValueError(f"backend: {why}")
        return b
    reasons = []
    for b in auto_order(device):
        why = b.why_not(device)
        if why is None:
            if reasons and b is TORCH and device.type not in _warned:
                _warned.add(device.type)
                log.warning("dpm_kernels: using the PyTorch reference for %s tensors (%s)", device.type,
                            "; ".join(reasons))
            return b
        reasons.append(why)
    raise ValueError("backend: no backend can serve these tensors: " + "; ".join(reasons))


def resolve(name: str, device: torch.device) -> Backend:
    """`choose`, decided once per (name, device). Inside code traced by torch.compile, where kernels cannot be
    loaded, an undecided "auto" is the public op (it decides at run time); another name must be decided eagerly
    first (any eager step, or `prepare`)."""
    key = (name, device)
    b = _resolved.get(key)
    if b is not None:
        return b
    if torch.compiler.is_compiling():
        if name == "auto":
            return AUTO_OP
        raise RuntimeError(f"backend: {name!r} for {device} was not chosen before tracing; call "
                           f"dpm_kernels.backends.registry.prepare({name!r}, {str(device)!r}) (or run one step "
                           "eagerly) first")
    b = _resolved[key] = choose(name, device)
    return b


# The size rule of "auto" on a CUDA device where both GPU backends load, from one H100's measurements (2026-12-05,
# torch 2.11, benchmarks/gpu_check.sh re-measures it): a plain step of 2^24+ elements is device-bound and Triton's
# runs closer to the byte floor (1.04-1.07x at 2^24 and 1.00x at 2^26, against CUDA's 1.08-1.12x and 1.04-1.05x);
# below that a step is host-bound at latent sizes (the CUDA path's host cost was the lower), and a thresholded step
# is faster on CUDA at every size (2.3-2.9x the floor against 4.3-6.1x at 2^24-2^26).
TRITON_MIN_ELEMENTS = 1 << 24


def large_step_backend(name: str, device: torch.device, thresholding: bool) -> Backend | None:
    """The backend that runs "auto"'s plain steps of at least `TRITON_MIN_ELEMENTS` elements on `device` when it is
    not the one `resolve` chose (Triton beside the CUDA kernels); None where the rule changes nothing."""
    if (name not in ("auto", "fastest") or thresholding or device.type != "cuda"
            or resolve(name, device) is not CUDA or TRITON.why_not(device) is not None):
        return None
    return TRITON


def prepare(name: str, device: torch.device | str) -> str:
    """Decide (and load) backend `name` for `device` eagerly; returns the name of the backend that serves it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return resolve(name, device).name


def available() -> dict[str, str | None]:
    """Each backend's availability on this machine (CUDA tensors where a GPU is visible): None or why not."""
    devices = ([torch.device("cuda", torch.cuda.current_device())] if torch.cuda.is_available() else []) + [
        torch.device("cpu")]
    res = {}
    for b in BACKENDS:
        cands = [d for d in devices if b.devices is None or d.type in b.devices]
        reasons = [b.why_not(d) for d in cands] or [f"{b.name}: no CUDA device visible to PyTorch"]
        res[b.name] = None if None in reasons else reasons[0]
    return res


def checked(b: Backend, eager: bool = False) -> Callable[..., None]:
    """b's implementation (eager: `eager_impl`) preceded by the argument rules, unless it checks them itself."""
    impl = b.eager_impl if eager else b.impl
    if b.self_checking:
        return impl

    def run(*args) -> None:
        opdef.check_step_args(*args)
        impl(*args)

    return run


# ---- the public op's first-use kernel ----
_serving: dict[str, Callable[..., None]] = {}  # device type -> what serves the public op there (not C++)


def _serve(device: torch.device) -> Callable[..., None]:
    with _lock:
        impl = _serving.get(device.type)
        if impl is None:
            b = choose("auto", device)  # loads the C++ kernels when they can serve: they register themselves
            # (called from the public op's own kernel: eager already, no second dispatch for a Python op)
            impl = _serving[device.type] = b.impl if b in (CPU, CUDA) else checked(b, eager=True)
        return impl


def _first_use_kernel(x, *rest) -> None:
    impl = _serving.get(x.device.type) or _serve(x.device)
    impl(x, *rest)


_lazy_lib = torch.library.Library(opdef.NAMESPACE, "IMPL")
_lazy_lib.impl(opdef.OP, _first_use_kernel, "CompositeExplicitAutograd")
