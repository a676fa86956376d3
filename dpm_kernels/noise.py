"""Noise for SDE solvers: reproducible per sample, or supplied by the caller."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def draw(shape: torch.Size, dtype: torch.dtype, device: torch.device,
         generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise of `shape` ([B, ...]) in `dtype` on `device`.

    A list of B generators draws each sample's noise from its own generator, so a sample's noise does not
    depend on its batch position or the batch size. Noise is drawn in float32 (on the generator's device)
    and cast, so runs in different dtypes see the same noise.
    """
    if generator is None:
        return torch.randn(shape, device=device, dtype=torch.float32).to(dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device, dtype)
    gens = list(generator)
    if len(gens) != shape[0]:
        raise ValueError(f"generator: got {len(gens)} generators for a batch of {shape[0]}")
    parts = [torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in gens]
    return torch.stack(parts).to(device, dtype)


class NoiseSource:
    """Noise of each SDE step, from (in order of precedence) a tensor, a sampler callable, or generators.

    noise: a [steps, B, ...] tensor (step i uses noise[i]); noise_sampler: ``f(t_s, t_t) -> [B, ...]``
    (k-diffusion's convention, in the solver's time unit); generator: a Generator or a list of B of them.
    """

    def __init__(self, like: torch.Tensor, noise: torch.Tensor | None = None,
                 noise_sampler: Callable | None = None, generator=None, steps: int | None = None):
        self.like = like
        self.noise = noise
        self.sampler = noise_sampler
        self.generator = generator
        if noise is not None:
            if not isinstance(noise, torch.Tensor):
                raise TypeError(f"noise: expected a tensor [steps, B, ...], got {type(noise).__name__}")
            want = (steps,) + tuple(like.shape) if steps is not None else None
            if want is not None and tuple(noise.shape) != want:
                raise ValueError(f"noise: expected shape {want}, got {tuple(noise.shape)}")

    def __call__(self, i: int, t_s: float, t_t: float) -> torch.Tensor:
        x = self.like
        if self.noise is not None:
            return self.noise[i].to(device=x.device, dtype=x.dtype)
        if self.sampler is not None:
            z = self.sampler(t_s, t_t)
            if not isinstance(z, torch.Tensor) or z.shape != x.shape:
                raise ValueError(f"noise_sampler: must return a tensor of shape {tuple(x.shape)}")
            return z.to(device=x.device, dtype=x.dtype)
        return draw(x.shape, x.dtype, x.device, self.generator)


class BrownianTreeNoise:
    """``f(sigma, sigma_next)``: the normalised increment (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|) of
    a Brownian motion W indexed by sigma over [sigma_min, sigma_max] (torchsde's BrownianTree), built as
    k-diffusion's `BrownianTreeNoiseSampler` builds it, so that one seed gives k-diffusion's noise.

    Queries of overlapping intervals are correlated as Brownian increments are (the SDE samplers that query twice
    per step rely on it), and the result does not depend on query order. seed: an int (one tree of x's shape), a
    list of B ints (one tree per sample), or None (an int drawn from the global torch RNG, as k-diffusion). The
    tree has x's dtype and device.
    """

    def __init__(self, x: torch.Tensor, sigma_min, sigma_max, seed=None):
        try:
            import torchsde
        except ImportError as exc:
            raise ImportError("noise_sampler: the default noise of the SDE samplers is a Brownian tree, as in "
                              "k-diffusion, which needs torchsde (pip install torchsde); or pass noise_sampler="
                              ) from exc
        lo, hi = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        lo, hi, self._sign = (lo, hi, 1) if lo < hi else (hi, lo, -1)
        w0 = torch.zeros_like(x)
        if seed is None:
            seed = torch.randint(0, 2**63 - 1, []).item()
        self._batched = isinstance(seed, Sequence)
        if self._batched:
            if len(seed) != x.shape[0]:
                raise ValueError(f"seed: got {len(seed)} seeds for a batch of {x.shape[0]}")
            seeds, w0 = list(seed), w0[0]
        else:
            seeds = [seed]
        self._trees = [torchsde.BrownianTree(lo, w0, hi, entropy=s) for s in seeds]

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        a, b = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = (a, b, 1) if a < b else (b, a, -1)
        w = torch.stack([tree(lo, hi) for tree in self._trees]) * (self._sign * sign)
        return (w if self._batched else w[0]) / (b - a).abs().sqrt()
