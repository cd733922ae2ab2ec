"""Image-quality measures for comparing a schedule's output against the native baseline: SSIM and PSNR."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] @ g[None, :])[None, None]  # [1, 1, size, size]


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of two uint8 images [3, H, W] (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, per channel)."""
    x, y = a.double()[:, None] / 255.0, b.double()[:, None] / 255.0  # [3, 1, H, W]
    w = _gaussian_window().to(x)
    mu_x, mu_y = F.conv2d(x, w), F.conv2d(y, w)
    var_x = F.conv2d(x * x, w) - mu_x**2
    var_y = F.conv2d(y * y, w) - mu_y**2
    cov = F.conv2d(x * y, w) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s.mean())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two uint8 images (inf when identical)."""
    mse = ((a.double() - b.double()) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * torch.log10(255.0**2 / mse))
