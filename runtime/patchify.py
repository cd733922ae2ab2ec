"""Pack a latent into patch tokens and back: FLUX's (c, ph, pw) order, c outermost, for any patch side.

Used inside every exported transformer graph (so all engines take the full-resolution latent) and by the trainer.
"""

import torch


def pack(latent: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/patch)*(W/patch), C*patch*patch]; token order row-major, channels (c, ph, pw)."""
    b, c, h, w = latent.shape
    x = latent.reshape(b, c, h // patch, patch, w // patch, patch)  # [B, C, h, p, w, p]
    x = x.permute(0, 2, 4, 1, 3, 5)  # [B, h, w, C, p, p]
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """[B, (H/patch)*(W/patch), C*patch*patch] -> [B, C, H, W]; the inverse of ``pack`` for latent size H x W."""
    b, _, d = tokens.shape
    c, h, w = d // (patch * patch), height // patch, width // patch
    x = tokens.reshape(b, h, w, c, patch, patch)  # [B, h, w, C, p, p]
    x = x.permute(0, 3, 1, 4, 2, 5)  # [B, C, h, p, w, p]
    return x.reshape(b, c, height, width)
