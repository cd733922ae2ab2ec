"""Image-quality measures for comparing a schedule's output against the native baseline: SSIM and PSNR."""

from __future__ import annotations

import torch


def _gaussian_1d(size: int = 11, sigma: float = 1.5) -> list[float]:
    """The normalised 1-D Gaussian whose outer product with itself is SSIM's 2-D window."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).tolist()


def _blur(maps: torch.Tensor, g: list[float]) -> torch.Tensor:
    """[N, H, W] -> [N, H - n + 1, W - n + 1]: the 'valid' correlation with the separable window outer(g, g),
    as sums of shifted slices (rows, then columns). The float64 ``conv2d`` with the 11x11 window this replaces took
    0.5-0.9 s per pair of 256x256 images here: torch has no optimised float64 convolution on the CPU and unfolds
    each map to 121 times its size, about 214,000 fresh pages (880 MB) per pair. This takes about 10 ms and 200
    pages, and agrees with it to 1e-15 (``tests/test_quality.py``)."""
    n = len(g)
    h, w = maps.shape[-2] - n + 1, maps.shape[-1] - n + 1
    rows = maps[:, 0:h, :] * g[0]
    for i in range(1, n):
        rows.add_(maps[:, i : i + h, :], alpha=g[i])
    out = rows[:, :, 0:w] * g[0]
    for j in range(1, n):
        out.add_(rows[:, :, j : j + w], alpha=g[j])
    return out


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of two uint8 images [3, H, W] (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, per channel,
    over the positions where the window fits), in float64."""
    x, y = a.double() / 255.0, b.double() / 255.0  # [3, H, W]
    mu_x, mu_y, xx, yy, xy = _blur(torch.cat([x, y, x * x, y * y, x * y]), _gaussian_1d()).chunk(5)
    var_x = xx - mu_x**2
    var_y = yy - mu_y**2
    cov = xy - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s.mean())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two uint8 images (inf when identical)."""
    mse = ((a.double() - b.double()) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * torch.log10(255.0**2 / mse))
