"""Load `k_diffusion.sampling` without running the `k_diffusion` package `__init__`.

k-diffusion's package `__init__` imports every submodule (models, evaluation, ...) and `k_diffusion/utils.py`
imports `torchvision.transforms.functional`; torchvision is not installed here (its wheels break against this
torch) and `sampling` only needs `utils.append_dims`. So:

1. a bare module object stands in for the package `k_diffusion` (with the real package's `__path__`, so that
   `k_diffusion.utils` and `k_diffusion.sampling` are found in site-packages and the package `__init__` never runs);
2. only while `k_diffusion.utils` is imported, and only if torchvision is not importable, stub modules
   `torchvision`, `torchvision.transforms` and `torchvision.transforms.functional` sit in `sys.modules`;
3. afterwards every module this helper put in `sys.modules` (the stubs and the `k_diffusion*` entries) is removed
   again, so nothing else in the test session sees a fake torchvision or a half-imported k_diffusion (diffusers, for
   one, probes for torchvision). The loaded `sampling` module is kept here, in a cache.

A missing k-diffusion (or one of the dependencies `sampling` itself imports: scipy, torchdiffeq, torchsde, tqdm) is
an error, not a skip: k-diffusion is a required test dependency of the equivalence tests.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types

_SAMPLING: types.ModuleType | None = None

_STUBS = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


def _stub_modules() -> dict[str, types.ModuleType]:
    mods = {name: types.ModuleType(name) for name in _STUBS}
    mods["torchvision"].transforms = mods["torchvision.transforms"]
    mods["torchvision.transforms"].functional = mods["torchvision.transforms.functional"]
    for name, mod in mods.items():
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=not name.endswith("functional"))
    return mods


def load_sampling() -> types.ModuleType:
    """The module `k_diffusion.sampling` (loaded once per process)."""
    global _SAMPLING
    if _SAMPLING is not None:
        return _SAMPLING
    if "k_diffusion.sampling" in sys.modules:  # someone imported the real package already
        _SAMPLING = sys.modules["k_diffusion.sampling"]
        return _SAMPLING
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is a required test dependency (pip install --no-deps k-diffusion==0.1.1.post1)")
    added: list[str] = []

    def put(name: str, mod: types.ModuleType) -> None:
        sys.modules[name] = mod
        added.append(name)

    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = importlib.machinery.ModuleSpec("k_diffusion", None, is_package=True)
    pkg.__spec__.submodule_search_locations = pkg.__path__
    pkg.__package__ = "k_diffusion"
    put("k_diffusion", pkg)
    try:
        stub = "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None
        if stub:
            for name, mod in _stub_modules().items():
                put(name, mod)
        try:
            utils = importlib.import_module("k_diffusion.utils")
        finally:
            if stub:
                for name in _STUBS:
                    sys.modules.pop(name, None)
                    added.remove(name)
        added.append("k_diffusion.utils")
        pkg.utils = utils
        sampling = importlib.import_module("k_diffusion.sampling")
        added.append("k_diffusion.sampling")
    finally:
        for name in added:
            sys.modules.pop(name, None)
    _SAMPLING = sampling
    return sampling
