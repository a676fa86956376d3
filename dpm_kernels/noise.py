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
