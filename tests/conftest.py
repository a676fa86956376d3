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


def assert_drop_in_surface(src, fused_cls, tmp_path, methods=("set_timesteps", "step", "scale_model_input",
                                                               "add_noise")):
    """A drop-in made from diffusers scheduler `src`'s config has diffusers' whole surface: the same config keys and
    values (fused_backend is an attribute, not config), from_config and save/load round trips both ways, diffusers'
    `_compatibles`, and the signatures of `methods` (pipelines introspect them). Returns the drop-in."""
    import inspect

    parent = type(src)
    ours = fused_cls.from_config(src.config)
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert strip(ours.config) == strip(src.config)
    assert ours.fused_backend == "auto" and "fused_backend" not in ours.config and ours.fused_reason is None
    ours.save_config(tmp_path)
    assert strip(fused_cls.from_pretrained(tmp_path).config) == strip(src.config)
    assert strip(parent.from_config(ours.config).config) == strip(src.config)
    assert set(parent._compatibles) <= set(fused_cls._compatibles)
    for name in methods:
        params = [[(q.name, q.default) for q in inspect.signature(getattr(o, name)).parameters.values()]
                  for o in (ours, src)]
        assert params[0] == params[1], name
    return ours

