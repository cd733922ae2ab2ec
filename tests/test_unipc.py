"""Wan 2.1's UniPC flow sampler against diffusers' UniPCMultistepScheduler as the Wan checkpoints configure it."""

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from ddit_profiles import DDiTError
from ddit_runtime.unipc import (
    UniPCFlowSampler,
    flow_euler_step,
    timesteps_from_sigmas,
    wan_flow_sigmas,
    wan_flow_timesteps,
)

SHAPE = (1, 16, 3, 8, 8)


def wan_scheduler(num_steps: int, shift: float, order: int = 2) -> UniPCMultistepScheduler:
    """The scheduler of the Wan 2.1 diffusers checkpoints, set up as WanPipeline.__call__ does."""
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        solver_order=order,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        disable_corrector=[],
        final_sigmas_type="zero",
        timestep_spacing="linspace",
    )
    scheduler.set_timesteps(num_steps)
    scheduler.set_begin_index(0)
    return scheduler


def fake_model(sample: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.tanh(sample) * (1 + sigma) - 0.3 * sample * sigma


def start_latent(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def run_sampler(sampler: UniPCFlowSampler, x: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for i in range(sampler.num_steps):
        x = sampler.step(fake_model(x, sampler.sigmas[i]), i, x)
        out.append(x)
    return out


@pytest.mark.parametrize("num_steps", [4, 10, 50])
@pytest.mark.parametrize("shift", [3.0, 5.0])
def test_sigmas_and_timesteps_match_diffusers(num_steps, shift):
    scheduler = wan_scheduler(num_steps, shift)
    sigmas = wan_flow_sigmas(num_steps, shift)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (num_steps + 1,) and sigmas[-1].item() == 0.0
    torch.testing.assert_close(sigmas, scheduler.sigmas, atol=1e-6, rtol=0)
    assert torch.equal(sigmas, scheduler.sigmas)  # in fact bit-equal
    for timesteps in (timesteps_from_sigmas(sigmas), wan_flow_timesteps(num_steps, shift)):
        assert timesteps.dtype == torch.int64 and timesteps.shape == (num_steps,)
        assert torch.equal(timesteps, scheduler.timesteps)


def test_wan_flow_timesteps_truncate_like_diffusers():
    """Diffusers truncates float64 sigma * 1000; shift 1.0 with 9 steps puts sigmas right at integer boundaries."""
    for num_steps, shift in [(9, 1.0), (27, 1.0), (222, 3.0)]:
        assert torch.equal(wan_flow_timesteps(num_steps, shift), wan_scheduler(num_steps, shift).timesteps)


@pytest.mark.parametrize("num_steps", [4, 10, 20])
@pytest.mark.parametrize("shift", [3.0, 5.0])
def test_sampling_loop_matches_diffusers_every_step(num_steps, shift):
    scheduler = wan_scheduler(num_steps, shift)
    sampler = UniPCFlowSampler(wan_flow_sigmas(num_steps, shift))
    ours = run_sampler(sampler, start_latent())
    x = start_latent()
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(fake_model(x, float(scheduler.sigmas[i])), t, x).prev_sample
        assert ours[i].dtype == x.dtype and ours[i].shape == x.shape
        torch.testing.assert_close(ours[i], x, atol=1e-5, rtol=0, msg=f"step {i}")


@pytest.mark.parametrize("order", [1, 3])
def test_other_orders_match_diffusers_solver_order(order):
    scheduler = wan_scheduler(12, 5.0, order=order)
    ours = run_sampler(UniPCFlowSampler(wan_flow_sigmas(12, 5.0), order=order), start_latent(1))
    x = start_latent(1)
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(fake_model(x, float(scheduler.sigmas[i])), t, x).prev_sample
        torch.testing.assert_close(ours[i], x, atol=1e-5, rtol=0, msg=f"step {i}")


def test_bf16_velocity_matches_diffusers():
    """WanPipeline's transformer returns bf16 velocities while latents stay float32."""
    scheduler = wan_scheduler(8, 3.0)
    sampler = UniPCFlowSampler(wan_flow_sigmas(8, 3.0))
    ref, ours = start_latent(2), start_latent(2)
    for i, t in enumerate(scheduler.timesteps):
        velocity = fake_model(ref, float(scheduler.sigmas[i])).bfloat16()  # same velocity for both
        ref = scheduler.step(velocity, t, ref).prev_sample
        ours = sampler.step(velocity, i, ours)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0, msg=f"step {i}")


def test_first_step_is_euler_and_later_steps_are_not():
    sigmas = wan_flow_sigmas(10, 3.0)
    x = start_latent()
    sampler = UniPCFlowSampler(sigmas)
    v0 = fake_model(x, sigmas[0].item())
    x1 = sampler.step(v0, 0, x)
    torch.testing.assert_close(x1, flow_euler_step(x, v0, sigmas[0], sigmas[1]), atol=1e-5, rtol=0)
    v1 = fake_model(x1, sigmas[1].item())
    x2 = sampler.step(v1, 1, x1)
    assert (x2 - flow_euler_step(x1, v1, sigmas[1], sigmas[2])).abs().max() > 1e-4  # corrector + 2nd order


def test_order_changes_the_result():
    sigmas = wan_flow_sigmas(10, 3.0)
    first, second = (run_sampler(UniPCFlowSampler(sigmas, order=k), start_latent()) for k in (1, 2))
    euler = start_latent()
    for i in range(10):
        euler = flow_euler_step(euler, fake_model(euler, sigmas[i].item()), sigmas[i], sigmas[i + 1])
    assert (first[-1] - second[-1]).abs().max() > 1e-3
    assert (first[-1] - euler).abs().max() > 1e-3  # order 1 still runs the UniC corrector
    assert (second[-1] - euler).abs().max() > 1e-3


@pytest.mark.parametrize("num_steps", [1, 2, 7])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_linear_flow_is_integrated_exactly(num_steps, order):
    """x_t = (1 - t) x0 + t noise with its exact velocity (noise - x0): every sample stays on the line, lands on x0."""
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    sigmas = wan_flow_sigmas(num_steps, 5.0)
    sampler = UniPCFlowSampler(sigmas, order=order)
    x = (1 - sigmas[0]) * x0 + sigmas[0] * noise
    for i in range(num_steps):
        x = sampler.step(noise - x0, i, x)
        on_line = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * noise
        torch.testing.assert_close(x, on_line, atol=1e-5, rtol=0)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


def test_any_latent_shape_and_no_host_reads():
    """Meta tensors have no data: any .item()/.tolist()/bool() on a latent inside step would raise."""
    sampler = UniPCFlowSampler(wan_flow_sigmas(6, 5.0))
    x = torch.empty(2, 16, 21, 60, 104, device="meta")
    for i in range(6):
        x = sampler.step(torch.empty_like(x), i, x)
    assert x.shape == (2, 16, 21, 60, 104) and x.device.type == "meta"
    flat = torch.randn(3, 5)
    assert UniPCFlowSampler(wan_flow_sigmas(2, 3.0)).step(torch.ones_like(flat), 0, flat).shape == (3, 5)


def test_restart_at_step_zero_repeats_the_trajectory():
    sampler = UniPCFlowSampler(wan_flow_sigmas(5, 3.0))
    first = run_sampler(sampler, start_latent())
    second = run_sampler(sampler, start_latent())
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("num_steps", [0, -3])
def test_num_steps_below_one_raises(num_steps):
    with pytest.raises(DDiTError, match="at least 1"):
        wan_flow_sigmas(num_steps, 3.0)
    with pytest.raises(DDiTError, match="at least 1"):
        wan_flow_timesteps(num_steps, 3.0)


def test_bad_inputs_raise_ddit_error():
    sigmas = wan_flow_sigmas(4, 3.0)
    with pytest.raises(DDiTError, match="order"):
        UniPCFlowSampler(sigmas, order=0)
    with pytest.raises(DDiTError, match="decreasing"):
        UniPCFlowSampler(torch.tensor([0.5, 0.7, 0.0]))
    with pytest.raises(DDiTError, match="lie in"):
        UniPCFlowSampler(torch.tensor([1.0, 0.5, 0.0]))
    with pytest.raises(DDiTError, match="terminal"):
        UniPCFlowSampler(torch.tensor([0.5]))
    with pytest.raises(DDiTError, match="shift"):
        wan_flow_sigmas(4, 0.0)
    sampler = UniPCFlowSampler(sigmas)
    x = start_latent()
    with pytest.raises(DDiTError, match="in order"):
        sampler.step(x, 1, x)
    for i in range(4):
        x = sampler.step(fake_model(x, sampler.sigmas[i]), i, x)
    with pytest.raises(DDiTError, match="past the last"):
        sampler.step(x, 4, x)
    with pytest.raises(DDiTError, match="shape"):
        sampler.step(x[:, :8], 0, x)
