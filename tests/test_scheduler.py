"""The per-step patch scheduler: third difference, per-patch std, quantile, factor choice and the CLI schedule."""

import numpy as np
import pytest
import torch

from ddit_profiles import DDiTError
from ddit_runtime.scheduler import (
    PatchScheduler,
    choose_factor,
    parse_schedule,
    patch_sigma,
    patch_std_map,
    patch_std_maps,
    quantile,
    third_difference,
)

NATIVE = 2
FACTORS = (1, 2, 4)
TAU = 1e-3
RHO = 0.4


def reference_std_map(delta: torch.Tensor, patch: int) -> torch.Tensor:
    """Loop over tiles: [B, C, *S, H, W] -> [B, *S, H/patch, W/patch]."""
    b, c, *extra, h, w = delta.shape
    flat = delta.reshape(b, c, -1, h, w)  # fold the extra dims into one
    out = torch.empty(b, flat.shape[2], h // patch, w // patch, dtype=delta.dtype)
    for i in range(b):
        for s in range(flat.shape[2]):
            for r in range(h // patch):
                for q in range(w // patch):
                    tile = flat[i, :, s, r * patch : (r + 1) * patch, q * patch : (q + 1) * patch]
                    out[i, s, r, q] = torch.stack([torch.std(tile[ch], correction=0) for ch in range(c)]).mean()
    return out.reshape(b, *extra, h // patch, w // patch)


def trajectory(d3: torch.Tensor, steps: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Latents z_k = a + b k + (k^3 / 6) d3 (oldest first), so their third difference is d3 plus a smooth drift."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d3.shape, generator=gen)
    b = torch.randn(d3.shape, generator=gen) * 0.1
    return [a + b * k + (k**3 / 6) * d3 for k in range(steps)]


def blocky(shape: tuple[int, ...], block: int, seed: int = 1) -> torch.Tensor:
    """[B, C, H, W] pattern constant inside block x block tiles and random between them."""
    b, c, h, w = shape
    coarse = torch.randn(b, c, h // block, w // block, generator=torch.Generator().manual_seed(seed))
    return coarse.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3)


# ---------------------------------------------------------------- third difference


def test_third_difference_matches_formula():
    z = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    torch.testing.assert_close(third_difference(*z), z[3] - 3 * z[2] + 3 * z[1] - z[0])
    assert third_difference(*z).abs().max() > 0


def test_third_difference_of_cubic_is_6dh3():
    gen = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(1, 4, 6, 6, generator=gen, dtype=torch.float64) for _ in range(4))
    t0, h = 0.9, -0.15  # sampling time decreases step by step

    def z(t: float) -> torch.Tensor:
        return a + b * t + c * t**2 + d * t**3

    d3 = third_difference(*(z(t0 + k * h) for k in range(4)))
    assert d3.abs().max() > 1e-3
    torch.testing.assert_close(d3, 6 * d * h**3)


def test_third_difference_of_quadratic_is_zero():
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(1, 4, 6, 6, generator=gen, dtype=torch.float64) for _ in range(3))
    zs = [a + b * t + c * t**2 for t in (1.0, 0.8, 0.6, 0.4)]
    torch.testing.assert_close(third_difference(*zs), torch.zeros_like(a), atol=1e-12, rtol=0)


# ---------------------------------------------------------------- per-patch std and quantile


@pytest.mark.parametrize("patch", [2, 4, 8])
@pytest.mark.parametrize("shape", [(2, 3, 16, 24), (2, 3, 2, 16, 8)])
def test_patch_std_map_matches_loop(patch, shape):
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(patch))
    got = patch_std_map(delta, patch)
    expected = reference_std_map(delta, patch)
    assert got.shape == (shape[0], *shape[2:-2], shape[-2] // patch, shape[-1] // patch)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("patches", [(2, 4, 8), (4, 6, 12), (12,)])
def test_patch_std_maps_built_from_finer_tiles_match_loop(patches):
    # (2, 4, 8): each side from the previous one's moments; (4, 6, 12): 6 is not a multiple of 4, so computed afresh
    delta = torch.randn(2, 3, 24, 48, generator=torch.Generator().manual_seed(5))
    for patch, got in zip(patches, patch_std_maps(delta, patches), strict=True):
        torch.testing.assert_close(got, reference_std_map(delta, patch))


def test_patch_std_map_is_not_fooled_by_a_large_offset():
    # one-pass E[x^2] - E[x]^2 in float32 would turn a 1e3 offset into a std of ~0.1; two passes keep it exact
    delta = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1e-3
    offset = delta + 1000.0
    torch.testing.assert_close(patch_std_map(offset, 4), reference_std_map(delta, 4).float(), atol=2e-5, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 16, 61])
@pytest.mark.parametrize("rho", [0.0, 0.25, 0.4, 0.7, 0.999, 1.0])
def test_quantile_matches_torch_quantile(n, rho):
    values = torch.randn(n, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(quantile(values, rho), torch.quantile(values, rho, interpolation="linear"))


@pytest.mark.parametrize("patches", [(4, 8), (8,), (2, 4, 8)])
def test_ragged_latent_is_tiled_as_the_engines_pad_it(patches):
    # Wan at 480x832: 60 latent rows; 4p tiles are 8 rows, so the engine replicate-pads to 64 (one token row more)
    delta = torch.randn(1, 3, 2, 12, 20, generator=torch.Generator().manual_seed(3))
    for patch, got in zip(patches, patch_std_maps(delta, patches), strict=True):
        padded = torch.nn.functional.pad(delta, (0, (-20) % patch, 0, (-12) % patch, 0, 0), mode="replicate")
        assert got.shape == (1, 2, -(-12 // patch), -(-20 // patch))
        torch.testing.assert_close(got, reference_std_map(padded, patch))


def test_patch_std_map_rejects_a_latent_without_spatial_dims():
    with pytest.raises(DDiTError, match="8x8"):
        patch_std_map(torch.randn(12, 16), 8)


@pytest.mark.parametrize("rho", [0.0, 0.4, 0.5, 0.93, 1.0])
@pytest.mark.parametrize("shape", [(3, 4, 16, 16), (2, 4, 3, 8, 16)])
def test_patch_sigma_matches_numpy_percentile(rho, shape):
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(torch.float64)
    values = reference_std_map(delta, 4).flatten().numpy()
    got = patch_sigma(delta, 4, rho)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert got.item() == pytest.approx(np.percentile(values, 100 * rho), rel=1e-5)


# ---------------------------------------------------------------- factor choice


def test_choose_factor_smooth_trajectory_picks_largest():
    zs = trajectory(torch.zeros(2, 16, 32, 32))  # pure linear drift: D3 is only rounding
    factor = choose_factor(third_difference(*zs), FACTORS, NATIVE, TAU, RHO)
    assert factor.dim() == 0 and factor.dtype == torch.int64
    assert factor.item() == 4


def test_choose_factor_high_frequency_detail_stays_native():
    detail = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(3)) * 0.1
    zs = trajectory(detail)
    assert choose_factor(third_difference(*zs), FACTORS, NATIVE, TAU, RHO).item() == 1


def test_choose_factor_intermediate_picks_two():
    # D3 constant inside 4x4 latent tiles (factor 2's patch) but varying between them (factor 4's 8x8 patch).
    zs = trajectory(blocky((2, 16, 32, 32), block=4))
    delta = third_difference(*zs)
    assert patch_sigma(delta, 4, RHO) < TAU < patch_sigma(delta, 8, RHO)
    assert choose_factor(delta, FACTORS, NATIVE, TAU, RHO).item() == 2


def test_choose_factor_ignores_factors_not_offered():
    zs = trajectory(blocky((1, 4, 32, 32), block=8))  # smooth enough for 4, but only 2 was exported
    assert choose_factor(third_difference(*zs), (1, 2), NATIVE, TAU, RHO).item() == 2
    assert choose_factor(third_difference(*zs), (1,), NATIVE, TAU, RHO).item() == 1


# ---------------------------------------------------------------- PatchScheduler


def run_scheduler(sched: PatchScheduler, latents: list[torch.Tensor]) -> list[int]:
    decisions = []
    for z in latents:
        sched.observe(z)
        decisions.append(sched.next_factor())
    return decisions


def test_scheduler_warms_up_then_goes_coarse():
    zs = trajectory(torch.zeros(1, 16, 32, 32), steps=8)
    assert run_scheduler(PatchScheduler(FACTORS, NATIVE, TAU, RHO), zs) == [1, 1, 1, 4, 4, 4, 4, 4]
    assert run_scheduler(PatchScheduler(FACTORS, NATIVE, TAU, RHO, warmup=5), zs) == [1, 1, 1, 1, 1, 4, 4, 4]


def test_scheduler_rough_trajectory_stays_native():
    detail = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(5))
    zs = trajectory(detail, steps=8)
    assert run_scheduler(PatchScheduler(FACTORS, NATIVE, TAU, RHO), zs) == [1] * 8


def test_scheduler_native_only_always_one():
    zs = trajectory(torch.zeros(1, 16, 32, 32), steps=8)
    assert run_scheduler(PatchScheduler((1,), NATIVE, TAU, RHO), zs) == [1] * 8


@pytest.mark.parametrize("factors", [FACTORS, (1, 2), (1, 4), (4, 1, 2)])
def test_scheduler_picks_as_choose_factor_does(factors):
    """next_factor compares the sigmas on the host; choose_factor on the device. They agree on D3s from smooth to
    rough, where every factor gets picked."""
    gen = torch.Generator().manual_seed(11)
    picked = set()
    for scale, noise in [(a, b) for a in torch.logspace(-5, -1, 13).tolist() for b in (1e-5, 3e-4, 1e-3, 1e-2)]:
        d3 = blocky((1, 4, 16, 16), 4, seed=len(picked)) * scale + torch.randn(1, 4, 16, 16, generator=gen) * noise
        zs = trajectory(d3)
        sched = PatchScheduler(factors, NATIVE, TAU, RHO, warmup=0)
        got = run_scheduler(sched, zs)[-1]
        assert got == choose_factor(third_difference(*zs), factors, NATIVE, TAU, RHO).item(), scale
        picked.add(got)
    assert picked == set(factors), picked


def test_scheduler_history_is_bounded():
    sched = PatchScheduler(FACTORS, NATIVE, TAU, RHO)
    run_scheduler(sched, trajectory(torch.zeros(1, 4, 16, 16), steps=10))
    assert len(sched.history) == 4
    sched.reset()
    assert len(sched.history) == 0 and sched.next_factor() == 1


def test_scheduler_copies_observed_latents():
    detail = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(5))
    zs = trajectory(detail, steps=6)
    buffer = torch.empty_like(zs[0])
    sched = PatchScheduler(FACTORS, NATIVE, TAU, RHO)
    decisions = []
    for z in zs:
        buffer.copy_(z)  # one caller buffer reused in place: an aliasing history would see D3 == 0
        sched.observe(buffer)
        decisions.append(sched.next_factor())
    assert decisions == [1] * 6

    smooth = trajectory(torch.zeros(1, 16, 32, 32), steps=4)
    sched.reset()
    for z in smooth:
        sched.observe(z)
    smooth[-1].add_(detail)  # mutate after observing
    assert sched.next_factor() == 4


# ---------------------------------------------------------------- --schedule


def test_parse_schedule_forms():
    assert parse_schedule("auto", 5, FACTORS) is None
    assert parse_schedule(" AUTO ", 5, FACTORS) is None
    assert parse_schedule("2", 5, FACTORS) == [2] * 5
    assert parse_schedule("1,1,2,4,4", 5, FACTORS) == [1, 1, 2, 4, 4]
    assert parse_schedule("1, 2 ,4", 3, FACTORS) == [1, 2, 4]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,1,2,4,4", "has 5 entries but --steps is 20"),
        ("8", "patch size 8, which was not exported \\(exported: 1, 2, 4\\)"),
        ("1,2,8" + ",1" * 17, "patch size 8"),
        ("0", "patch size 0"),
        ("abc", "cannot parse schedule 'abc'"),
        ("1,,2", "cannot parse schedule"),
        ("", "cannot parse schedule"),
        ("2.5", "cannot parse schedule"),
    ],
)
def test_parse_schedule_errors(text, message):
    with pytest.raises(DDiTError, match=message):
        parse_schedule(text, 20, FACTORS)


def test_a_calibrated_tau_applies_only_where_its_whole_shape_matches():
    """``ddit-bench --save-tau`` records a tau for one shape: height, width, frames, steps, the sizes loaded and rho.
    A generation takes it only where all of them match; elsewhere the profile's tau, and the source says which."""
    from ddit_profiles import CalibratedTau, SchedulerDefaults
    from ddit_runtime.scheduler import tau_and_source

    at_512 = CalibratedTau(512, 512, None, 20, (2, 1), 0.7, 0.05, "2.44x")
    defaults = SchedulerDefaults(tau=0.002, rho=0.7).with_calibrated(at_512)
    assert at_512.sizes == (1, 2) and at_512.shape() == "512x512, 20 steps, sizes 1,2, rho 0.7"
    assert defaults.tau_for(512, 512, None, 20, [2, 1], 0.7) == (0.05, at_512)
    for other in [(256, 512, None, 20, [1, 2], 0.7), (512, 512, 5, 20, [1, 2], 0.7), (512, 512, None, 10, [1, 2], 0.7)]:
        assert defaults.tau_for(*other) == (0.002, None)
    assert defaults.tau_for(512, 512, None, 20, [1, 2, 4], 0.7) == (0.002, None)  # 4p loaded: DDiT may pick it
    assert defaults.tau_for(512, 512, None, 20, [1, 2], 0.4) == (0.002, None)  # tau is a bar on rho's quantile
    assert tau_and_source(defaults, None, 512, 512, None, 20, (1, 2), 0.7) == (0.05, f"calibrated: {at_512.shape()}")
    assert tau_and_source(defaults, None, 256, 256, None, 20, (1, 2), 0.7) == (0.002, "profile")
    assert tau_and_source(defaults, 0.01, 512, 512, None, 20, (1, 2), 0.7) == (0.01, "given")
    # A second calibration of the same shape replaces the first; one of another shape is kept beside it.
    again = defaults.with_calibrated(CalibratedTau(512, 512, None, 20, (1, 2), 0.7, 0.02))
    assert [e.tau for e in again.calibrated] == [0.02]
    video = CalibratedTau(256, 256, 9, 20, (1, 2, 4), 0.4, 0.006)
    assert [e.tau for e in again.with_calibrated(video).calibrated] == [0.02, 0.006]
    assert video.shape() == "9 frames of 256x256, 20 steps, sizes 1,2,4, rho 0.4"


def test_calibrated_taus_survive_the_manifests_json_and_a_bad_one_is_one_line():
    import dataclasses
    import json

    from ddit_profiles import CalibratedTau, get_profile, spec_from_dict

    for name, frames in (("flux-tiny", None), ("wan-tiny", 9)):
        spec = get_profile(name)
        entry = CalibratedTau(256, 256, frames, 20, (1, 2, 4), spec.scheduler.rho, 0.004, "1.26x")
        spec = dataclasses.replace(spec, scheduler=spec.scheduler.with_calibrated(entry))
        back = spec_from_dict(json.loads(json.dumps(spec.to_dict())))
        own = get_profile(name).scheduler.calibrated  # a profile's own (the tiny FLUX ships one) stay first
        assert back.scheduler.calibrated == (*own, entry) and back.scheduler == spec.scheduler
        old = spec.to_dict()
        del old["scheduler"]["calibrated"]  # a manifest written before --save-tau
        assert spec_from_dict(old).scheduler.calibrated == ()
        bad = spec.to_dict()
        bad["scheduler"]["calibrated"] = [{"height": 256, "tau": 0.1}]
        with pytest.raises(DDiTError, match="profile block is malformed"):
            spec_from_dict(bad)
