"""The Triton backend: ``torch.ops.dpm_kernels.fused_step_triton``, registered on first use.

The op is a `torch.library.triton_op` (torch.compile traces into it and sees the kernels) with the
schema of `opdef.SCHEMA` and the shared fake implementation (`opdef.fake_impl()`, the same validation as every
backend). It serves CUDA tensors, and CPU tensors when the kernels were defined under the Triton interpreter
(TRITON_INTERPRET=1 set before this backend was first used), which is how CI without a GPU runs it.

The op checks its arguments by the rules every backend shares (`opdef.check_step_args`). It takes any layout:
inputs are made contiguous, and an output that is not contiguous is computed into a contiguous temporary and
copied back; out may be x or x_eval itself (the update is elementwise).
"""

import contextlib
import os
import threading

import torch

OP_NAME = "fused_step_triton"
_state: dict[str, str | None] = {}  # "load" -> None once registered, else why it failed
_lock = threading.Lock()


def _load() -> str | None:
    """Import Triton and the kernels and register the op (once, whichever thread asks first); None on success,
    else the reason."""
    if "load" in _state:
        return _state["load"]
    with _lock:
        if "load" not in _state:
            _state["load"] = _load_locked()
    return _state["load"]


def _load_locked() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install failing its own import
        return f"triton: cannot import triton ({type(e).__name__}: {e})"
    try:
        _register()
    except Exception as e:
        return f"triton: could not register the Triton op ({type(e).__name__}: {e})"
    return None


def interpreted() -> bool:
    """True when the kernels were defined under the Triton interpreter (they then run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    from . import triton_kernels

    return isinstance(triton_kernels._step_kernel, InterpretedFunction)


def why_unavailable(device: torch.device) -> str | None:
    """None when the Triton op can serve tensors on `device` (and is registered), else the reason."""
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        return f"triton: serves CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device.type}"
    why = _load()
    if why is not None:
        return why
    if device.type == "cpu" and not interpreted():
        if os.environ.get("TRITON_INTERPRET") == "1":
            return ("triton: TRITON_INTERPRET=1 was set after the Triton kernels were defined; set it before "
                    "importing dpm_kernels' Triton backend to run on CPU tensors")
        return "triton: serves CUDA tensors; CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "triton: CUDA is not available to this PyTorch build"
    return None


def _contig_out(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or t.is_contiguous():
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def fused_step_triton(
    x: torch.Tensor,
    model_out: torch.Tensor,
    model_cond: torch.Tensor | None,
    x_eval: torch.Tensor | None,
    hist1: torch.Tensor | None,
    hist2: torch.Tensor | None,
    hist3: torch.Tensor | None,
    noise: torch.Tensor | None,
    coef: torch.Tensor,
    cfg: int,
    threshold: bool,
    thr_ratio: float,
    thr_min: float,
    thr_max: float,
    out: torch.Tensor,
    hist_out: torch.Tensor | None,
) -> None:
    """The op's implementation (arguments as in `opdef.SCHEMA`; `ops.fused_step` documents them). It checks its
    arguments by the op's rules before writing anything (when traced, the fake implementation does)."""
    from .. import opdef
    from . import triton_kernels

    if not torch.compiler.is_compiling():
        opdef.check_step_args(x, model_out, model_cond, x_eval, hist1, hist2, hist3, noise, coef, cfg, threshold,
                              thr_ratio, thr_min, thr_max, out, hist_out)

    def c(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.contiguous()

    # An input that is out itself stays that very tensor, so the kernel reads and writes the same memory
    # element by element; a non-contiguous one was copied by c() before anything is written.
    o, ho = _contig_out(out), _contig_out(hist_out)
    # Triton launches on the current device: make it x's (a no-op on one GPU and for CPU tensors)
    # (entering and leaving a device context costs a few us a step: only where x is not on the current device)
    switch = x.device.type == "cuda" and x.device.index != torch.cuda.current_device()
    with torch.cuda.device(x.device) if switch else contextlib.nullcontext():
        triton_kernels.fused_step(c(x), c(model_out), c(model_cond), c(x_eval), c(hist1), c(hist2), c(hist3),
                                  c(noise), c(coef), cfg, threshold, thr_ratio, thr_min, thr_max, o, ho)
    if o is not out:
        out.copy_(o)
    if ho is not hist_out:
        hist_out.copy_(ho)


def _register() -> None:
    from .. import opdef

    name = f"{opdef.NAMESPACE}::{OP_NAME}"
    # `schema` documents intent; the torch versions we support infer the identical schema from the annotations
    # (tests compare the two).
    torch.library.triton_op(name, fused_step_triton, mutates_args={"out", "hist_out"}, schema=opdef.SCHEMA)
    _record_kernels(name)
    torch.library.register_fake(name, opdef.fake_impl())


def _record_kernels(name: str) -> None:
    """Tell torch which Triton kernels the op launches. triton_op finds them by scanning the source for
    `wrap_triton(<kernel>)`; ours go through `triton_select.launch`, which that scan cannot follow, so the
    compile caches would key on no kernel source and could serve stale code after an edit or upgrade."""
    from . import triton_kernels, triton_select

    kernels = [triton_kernels._step_kernel, triton_select._select_small, triton_select._hist_pass,
               triton_select._finalize]
    try:
        from torch._library import triton as library_triton  # private: present in torch 2.6 through 2.13

        table = library_triton.triton_ops_to_kernels
    except (ImportError, AttributeError):
        return
    known = table.get(name, [])
    table[name] = list(known) + [k for k in kernels if k not in known]
