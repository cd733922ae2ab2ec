"""SSIM and PSNR, the quality columns of ddit-bench, tiny_quality.py and schedule_search.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from ddit_export.quality import psnr, ssim


def _ssim_2d_window(a: torch.Tensor, b: torch.Tensor) -> float:
    """Wang et al.'s SSIM written directly: the 11x11 Gaussian window (sigma 1.5) as one float64 conv2d."""
    x = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(x**2) / (2 * 1.5**2))
    g = g / g.sum()
    w = (g[:, None] @ g[None, :])[None, None]
    x, y = a.double()[:, None] / 255.0, b.double()[:, None] / 255.0
    mu_x, mu_y = F.conv2d(x, w), F.conv2d(y, w)
    var_x, var_y = F.conv2d(x * x, w) - mu_x**2, F.conv2d(y * y, w) - mu_y**2
    cov = F.conv2d(x * y, w) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s.mean())


@pytest.mark.parametrize("shape", [(3, 11, 11), (3, 40, 64), (3, 64, 33)])
def test_ssim_equals_the_2d_window_definition(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    a = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    noise = torch.randint(-60, 60, shape, generator=gen)
    b = (a.int() + noise).clamp(0, 255).to(torch.uint8)
    assert ssim(a, b) == pytest.approx(_ssim_2d_window(a, b), abs=1e-12)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, b) < 0.99


def test_ssim_of_two_flat_images_is_the_luminance_term():
    a = torch.full((3, 32, 32), 40, dtype=torch.uint8)
    b = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    mu_a, mu_b, c1 = 40 / 255, 200 / 255, 0.01**2
    assert ssim(a, b) == pytest.approx((2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1), abs=1e-12)


def test_psnr():
    a = torch.zeros(3, 8, 8, dtype=torch.uint8)
    assert psnr(a, a) == float("inf")
    b = a + 10  # MSE 100
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100))
