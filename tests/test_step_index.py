"""The first step of a fused scheduler finds its place in the grid as diffusers does -- the second of several equal
timesteps (an img2img start), else the only one -- but on the host: a timestep that is an element of
`scheduler.timesteps` (what a pipeline's ``for t in scheduler.timesteps`` passes) is located by its storage offset
and read from the host copy set_timesteps made, so the first step does not synchronise with the device even without
`set_begin_index` (on a GPU: tests/test_integration_diffusers.py::test_cuda_no_host_sync)."""

from __future__ import annotations

import pytest
import torch

import dpm_kernels.integrations.diffusers as D

CLASSES = [getattr(D, n) for n in D.__all__ if n != "FusedCogVideoXDPMScheduler"]  # CogVideoX keeps no step index
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),  # torchsde clamps queries at the tree's ends
              # diffusers' KDPM2 and SDE set_timesteps: NumPy 2 deprecation warnings per element
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")]


def _parent(cls):
    return next(b for b in cls.__mro__[1:] if b.__module__.startswith("diffusers."))


def _first_index(s, t) -> int:
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    s.step(0.1 * x, t, x)
    return s.step_index - 1


def _starts(s):
    """Timesteps a first step may be given: elements of the grid (its start, an img2img start), a Python number and a
    CPU tensor copy of one. Even indices: the two-call schedulers refuse to begin at an interval's second call."""
    mid = (len(s.timesteps) // 2) & ~1
    return [("element", lambda s, i=i: s.timesteps[i]) for i in (0, mid)] + [
        ("int", lambda s, i=mid: s.timesteps[i].item()), ("copy", lambda s, i=mid: s.timesteps[i].clone())]


# drop-ins that begin a grid whose first timestep repeats at index 0, where diffusers' rule takes index 1 (README)
BEGIN_AT_ZERO = ("FusedKDPM2DiscreteScheduler", "FusedKDPM2AncestralDiscreteScheduler", "FusedUniPCMultistepScheduler")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_first_index_is_diffusers(cls):
    for steps, kw in ((10, {}), (25, dict(num_train_timesteps=25, timestep_spacing="trailing"))):
        try:
            probe = cls(**kw)
        except TypeError:  # a class without that option
            continue
        probe.set_timesteps(steps)
        for name, pick in _starts(probe):
            got, want = [], []
            for c, out in ((cls, got), (_parent(cls), want)):
                s = c(**kw)
                s.set_timesteps(steps)
                out.append(_first_index(s, pick(s)))
            if got != want:  # only the documented difference
                ts = probe.timesteps
                assert cls.__name__ in BEGIN_AT_ZERO and bool(ts[0] == ts[1]) and (got, want) == ([0], [1]), (
                    name, steps, got, want)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_an_element_of_the_grid_is_located_without_reading_the_device(cls, monkeypatch):
    """Elements of `timesteps` are found by their storage offset: neither the timestep nor the grid tensor is read
    (the reads that synchronise with a GPU: item, nonzero, bool, tolist) during the first step's index search."""
    s = cls()
    s.set_timesteps(10)
    t = s.timesteps[3]
    want = _parent(cls)()
    want.set_timesteps(10)
    want_index = _first_index(want, want.timesteps[3])

    def no_read(*args, **kw):
        raise AssertionError("a tensor was read on the host during the index search")

    with monkeypatch.context() as m:
        for name in ("item", "nonzero", "__bool__", "tolist"):
            m.setattr(torch.Tensor, name, no_read)
        s._init_step_index(t)
    assert s.step_index == want_index
