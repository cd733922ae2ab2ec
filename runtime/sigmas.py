"""FLUX's flow-matching sigma schedule and Euler step, matching diffusers' FluxPipeline sampling.

mu comes from the native image token count, whatever patch size a step runs at.
"""

import math

import torch

from ddit_profiles import DDiTError


def flux_sigmas(num_steps: int, mu: float, device: torch.device | str | None = None) -> torch.Tensor:
    """-> [num_steps + 1] float32: shifted sigmas from 1.0 down, then a terminal 0.0 (computed in float64 on CPU).

    ``mu`` is the profile's ``FlowShift.mu(native_token_count)``.
    """
    if num_steps < 1:
        raise DDiTError(f"--steps must be at least 1, got {num_steps}")
    sigmas = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    shifted = torch.cat([shifted, torch.zeros(1, dtype=torch.float64)])
    return shifted.to(dtype=torch.float32, device=device)


def euler_step(
    latent: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor | float, sigma_next: torch.Tensor | float
) -> torch.Tensor:
    """[B, C, H, W] latent and velocity -> next latent: latent + (sigma_next - sigma) * velocity."""
    return latent + (sigma_next - sigma) * velocity
