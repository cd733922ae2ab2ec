"""Classifier-free guidance: the one formula every sampler here (the runtimes and the trainer's teacher) uses."""

import torch

CFG_MODES = ("batched", "two-pass")  # both guidance passes as one batch of 2, or one engine call per pass


def guided_velocity(
    cond: torch.Tensor, uncond: torch.Tensor, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """cond, uncond [B, ...] -> uncond + scale * (cond - uncond), [B, ...]; ``out`` (may be ``cond``) receives it
    without allocating."""
    if out is None:
        return uncond + scale * (cond - uncond)
    return torch.sub(cond, uncond, out=out).mul_(scale).add_(uncond)
