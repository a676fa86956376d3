"""Mistakes a user makes, answered by a named error (or by one documented rule), on every front end alike."""

from __future__ import annotations

import pytest
import torch

import dpm_kernels as dk
from dpm_kernels.k_diffusion import sample_dpmpp_2m

NS = dk.NoiseScheduleVP("linear")
X = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))


def step(**kw):
    args = dict(t=0.5, t_next=0.4, noise_schedule=NS, order=2, backend="torch")
    args.update(kw)
    return dk.multistep_update(X, torch.ones_like(X), dk.History(X, order=2), **args)


@pytest.mark.parametrize("kw,exc,name", [
    (dict(thresholding=(0.995, 1.0)), TypeError, "thresholding"),
    (dict(thresholding=0.995), TypeError, "thresholding"),
    (dict(thresholding=("a", 1.0, 2.0)), TypeError, "thresholding"),
    (dict(noise_schedule=torch.zeros(3)), TypeError, "noise_schedule"),
    (dict(t=[0.5, 0.5, 0.5, 0.5]), TypeError, "t"),
    (dict(t_next="0.4"), TypeError, "t_next"),
    (dict(t=float("nan")), ValueError, "t"),
    (dict(t=torch.tensor([0.5, 0.4])), ValueError, "t"),
    (dict(order=4), ValueError, "order"),
    (dict(algorithm_type="ddim"), ValueError, "algorithm_type"),
    (dict(model_type="eps"), ValueError, "model_type"),
    (dict(cfg="both"), ValueError, "cfg"),
    (dict(backend="fortran"), ValueError, "backend"),
    (dict(algorithm_type="sde-dpmsolver++"), ValueError, "noise"),
])
def test_multistep_update_names_the_argument(kw, exc, name):
    with pytest.raises(exc) as info:
        step(**kw)
    assert str(info.value).startswith(f"{name}:"), str(info.value)


def test_multistep_update_zero_length_second_order_step_is_the_identity():
    hist = dk.History(X, order=2)
    dk.multistep_update(X, torch.ones_like(X), hist, t=0.6, t_next=0.5, noise_schedule=NS, order=2, backend="torch")
    y = dk.multistep_update(X, torch.ones_like(X), hist, t=0.5, t_next=0.5, noise_schedule=NS, order=2,
                            backend="torch")
    assert torch.equal(y, X)


GM = dk.GaussianMixtureModel([[1.0, 0.0, 0.0]], [0.5], noise_schedule=NS)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_floating_model_outputs_of_another_dtype_are_cast_everywhere(dtype):
    """One rule for every front end: a floating output is cast to x's dtype; the result is x's dtype and equals the
    run with the output cast by hand."""
    def model(x, t):
        return GM(x, t).to(dtype)

    solver = dk.DPMSolver(dk.model_wrapper(model, NS), NS, backend="torch")
    y = solver.sample(X, steps=4, order=2)
    want = dk.DPMSolver(dk.model_wrapper(lambda x, t: model(x, t).to(X.dtype), NS), NS, backend="torch").sample(
        X, steps=4, order=2)
    assert y.dtype == X.dtype and torch.equal(y, want)
    out = dk.multistep_update(X, torch.ones_like(X, dtype=dtype), dk.History(X), t=0.5, t_next=0.4,
                              noise_schedule=NS, backend="torch")
    ref = dk.multistep_update(X, torch.ones_like(X), dk.History(X), t=0.5, t_next=0.4, noise_schedule=NS,
                              backend="torch")
    assert out.dtype == X.dtype and torch.equal(out, ref)


def test_non_floating_model_outputs_are_refused_everywhere():
    solver = dk.DPMSolver(dk.model_wrapper(lambda x, t: torch.zeros(x.shape, dtype=torch.int64), NS), NS,
                          backend="torch")
    with pytest.raises(TypeError, match="^model_fn:"):
        solver.sample(X, steps=3)
    with pytest.raises(TypeError, match="^model_output:"):
        dk.multistep_update(X, torch.zeros(X.shape, dtype=torch.int64), dk.History(X), t=0.5, t_next=0.4,
                            noise_schedule=NS)
    sigmas = torch.tensor([10.0, 1.0, 0.0])
    with pytest.raises(TypeError, match="^model:"):
        sample_dpmpp_2m(lambda x, s: torch.zeros(x.shape, dtype=torch.int32), X * 10, sigmas, disable=True)
    with pytest.raises(TypeError, match="^model_fn:"):
        dk.DPMSolver(dk.model_wrapper(lambda x, t: "eps", NS), NS, backend="torch").sample(X, steps=2)
