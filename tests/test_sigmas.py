"""FLUX's shifted flow-matching sigmas against diffusers, and the Euler step."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ddit_profiles import DDiTError, FlowShift
from ddit_runtime.sigmas import euler_step, flux_sigmas

shift_mu = FlowShift().mu


@pytest.mark.parametrize("num_steps", [4, 20, 50])
@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_flux_sigmas_match_diffusers(num_steps, seq_len):
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=shift_mu(seq_len))
    got = flux_sigmas(num_steps, shift_mu(seq_len))
    assert got.dtype == torch.float32 and got.shape == (num_steps + 1,)
    torch.testing.assert_close(got, scheduler.sigmas, atol=1e-6, rtol=0)


def test_shift_mu_endpoints():
    assert shift_mu(256) == pytest.approx(0.5)
    assert shift_mu(4096) == pytest.approx(1.15)
    assert shift_mu(256) < shift_mu(1024) < shift_mu(4096)


@pytest.mark.parametrize("num_steps", [1, 4, 50])
def test_flux_sigmas_shape_of_schedule(num_steps):
    sigmas = flux_sigmas(num_steps, shift_mu(4096), device="cpu")
    assert sigmas[0] <= 1.0 and sigmas[0] == pytest.approx(1.0)
    assert sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def test_euler_lands_on_data_for_straight_flow():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 8, 8, generator=gen, dtype=torch.float64)
    noise = torch.randn(2, 16, 8, 8, generator=gen, dtype=torch.float64)
    sigmas = flux_sigmas(20, shift_mu(1024))
    latent = (1 - sigmas[0]) * x0 + sigmas[0] * noise
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        latent = euler_step(latent, noise - x0, sigma, sigma_next)
    assert latent.dtype == torch.float64
    torch.testing.assert_close(latent, x0, atol=1e-6, rtol=0)


def test_euler_step_accepts_floats():
    latent, velocity = torch.ones(3), torch.full((3,), 2.0)
    torch.testing.assert_close(euler_step(latent, velocity, 0.75, 0.25), torch.zeros(3))


@pytest.mark.parametrize("num_steps", [0, -3])
def test_flux_sigmas_rejects_no_steps(num_steps):
    with pytest.raises(DDiTError, match="steps"):
        flux_sigmas(num_steps, shift_mu(1024))
