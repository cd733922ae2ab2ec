"""The training-free per-step patch scheduler: pick a coarser patch where the latent trajectory is smooth.

From the last four latents it takes the third difference D3 (the "acceleration"), cuts it into candidate-size
patches, and picks the largest patch size whose rho-quantile of per-patch std is below tau. All math stays on the
latent's device; ``PatchScheduler.next_factor`` does the one host sync per step.
"""

import math
from collections import deque
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ddit_profiles import DDiTError

HISTORY = 4  # latents needed for a third difference


def third_difference(z0: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, z3: torch.Tensor) -> torch.Tensor:
    """Four latents oldest to newest (z_{t+2}, z_{t+1}, z_t, z_{t-1}) -> D3 = z3 - 3 z2 + 3 z1 - z0, same shape."""
    return torch.add(z3 - z0, z1 - z2, alpha=3)


def _check_tiles(delta: torch.Tensor, patch: int) -> None:
    if delta.dim() < 4 or patch < 1:
        raise DDiTError(
            f"cannot cut a latent of shape {tuple(delta.shape)} into {patch}x{patch} patches: "
            "it needs [B, C, ..., H, W] and a positive patch side"
        )


def _pad_to(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, 1, H, W] -> replicate-padded at the bottom and right to multiples of ``patch``, as the engines pad a
    latent whose side the patch does not divide (Wan at 480p: 60 latent rows, 4p tiles of 8 -> 64)."""
    h, w = x.shape[-2:]
    if h % patch == 0 and w % patch == 0:
        return x
    return F.pad(x, (0, (-w) % patch, 0, (-h) % patch), mode="replicate")


def _centred_pool(x: torch.Tensor, mean: torch.Tensor, r: int) -> torch.Tensor:
    """x [N, 1, H, W], its r x r tile means [N, 1, H/r, W/r] -> mean of (x - tile mean)^2 per tile, [N, 1, H/r, W/r]."""
    n, _, h, w = x.shape
    # Each tile mean repeated along its row of W first, so the subtraction runs over contiguous rows of W: about
    # twice as fast as broadcasting over a [N, H/r, r, W/r, r] view (whose innermost run is only r long).
    wide = mean.view(n, h // r, 1, w // r, 1).expand(n, h // r, 1, w // r, r).reshape(n, h // r, 1, w)
    centred = x.view(n, h // r, r, w) - wide  # [N, H/r, r, W], contiguous
    return F.avg_pool2d(centred.view(n, 1, h, w).square_(), r)


def patch_std_maps(delta: torch.Tensor, patches: Sequence[int]) -> list[torch.Tensor]:
    """[B, C, *S, H, W] -> one [B, *S, ceil(H/p), ceil(W/p)] float32 map per patch side p: the population std
    inside each p x p tile per channel, averaged over C. A side p does not divide is replicate-padded at the
    bottom and right first, as the engines tile such a latent, so each map has one value per token of that size.

    Two-pass (the mean first, then the mean squared deviation) with pooling, which is several times faster than
    a reduction over strided tile dims. A side that is a multiple of the previous one is built from that one's tile
    moments by the law of total variance (var = mean of the sub-tile variances + variance of their means), so
    the latent is read once for 2p and 4p."""
    for patch in patches:
        _check_tiles(delta, patch)
    *lead, h, w = delta.shape
    x = delta.float().reshape(-1, 1, h, w)  # [B*C*S, 1, H, W]
    maps, prev = [], None
    for patch in patches:
        divides = h % patch == 0 and w % patch == 0
        if prev is not None and patch % prev[0] == 0 and divides:  # then prev's side divides H and W too
            side, mean, var = prev
            r = patch // side
            coarse = F.avg_pool2d(mean, r)
            var = F.avg_pool2d(var, r).add_(_centred_pool(mean, coarse, r))
            mean = coarse
        else:
            padded = _pad_to(x, patch)
            mean = F.avg_pool2d(padded, patch)
            var = _centred_pool(padded, mean, patch)
        prev = (patch, mean, var) if divides else None
        maps.append(var.sqrt().reshape(*lead, *mean.shape[-2:]).mean(dim=1))
    return maps


def patch_std_map(delta: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, *S, H, W] -> [B, *S, ceil(H/patch), ceil(W/patch)]: population std inside each tile per channel, mean
    over C (see ``patch_std_maps`` for sides the patch does not divide)."""
    return patch_std_maps(delta, [patch])[0]


def quantile(values: torch.Tensor, rho: float) -> torch.Tensor:
    """[N] -> 0-dim: the rho-quantile with linear interpolation (torch.quantile's default, numpy's percentile).
    The positions come from N alone, so nothing is read back to the host."""
    n = values.numel()
    position = rho * (n - 1)
    lo = min(math.floor(position), n - 1)
    ordered = values.sort().values
    return torch.lerp(ordered[lo], ordered[min(lo + 1, n - 1)], position - lo)


def patch_sigma(delta: torch.Tensor, patch: int, rho: float) -> torch.Tensor:
    """[B, C, *S, H, W] -> 0-dim float32: the rho-quantile of every per-patch value in the whole batch."""
    return patch_sigmas(delta, [patch], rho)[0]


def patch_sigmas(delta: torch.Tensor, sides: Sequence[int], rho: float) -> torch.Tensor:
    """[B, C, *S, H, W] -> [len(sides)] float32 on delta's device: sigma(p) for each patch side p, the
    rho-quantile of its per-patch std map."""
    return torch.stack([quantile(m.flatten(), rho) for m in patch_std_maps(delta, sides)])


def choose_factor(
    delta: torch.Tensor, factors: Sequence[int], native_patch: int, tau: float, rho: float
) -> torch.Tensor:
    """[B, C, *S, H, W] -> 0-dim int64 on delta's device: the largest k > 1 with sigma(native_patch*k) < tau, else 1."""
    coarse = sorted({int(k) for k in factors if k > 1})
    if not coarse:
        return torch.ones((), dtype=torch.int64, device=delta.device)
    sigmas = patch_sigmas(delta, [native_patch * k for k in coarse], rho)
    ks = torch.tensor(coarse, dtype=torch.int64, device=delta.device)
    return torch.where(sigmas < tau, ks, torch.ones_like(ks)).max()


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


class PatchScheduler:
    """Keeps the last four latents and decides the patch factor for the next step.

    Runs native (factor 1) until four latents exist and at least ``warmup`` steps were taken.
    """

    def __init__(self, factors: Sequence[int], native_patch: int, tau: float, rho: float, warmup: int = 3):
        if not 0.0 <= rho <= 1.0:
            raise DDiTError(f"rho must lie in [0, 1], got {rho}: 0.4 means the 40th percentile")
        if native_patch < 1:
            raise DDiTError(f"native patch side must be a positive integer, got {native_patch}")
        self.factors = tuple(int(k) for k in factors)
        self._coarse = sorted({k for k in self.factors if k > 1})
        self.native_patch = native_patch
        self.tau = tau
        self.rho = rho
        self.warmup = warmup
        self.reset()

    def reset(self) -> None:
        """Forget the trajectory; call before every new generation."""
        self.history: deque[torch.Tensor] = deque(maxlen=HISTORY)
        self.observed = 0

    def observe(self, latent: torch.Tensor) -> None:
        """Store a copy of ``latent`` (reusing the oldest buffer once the history is full)."""
        oldest = self.history[0] if len(self.history) == HISTORY else None
        if oldest is not None and _same_layout(oldest, latent):
            self.history.popleft()
            buffer = oldest.copy_(latent)
        else:
            buffer = latent.detach().clone()
        self.history.append(buffer)  # maxlen drops the oldest if it was not reused
        self.observed += 1

    def next_factor(self) -> int:
        """The patch factor for the next step: 1 during warm-up, else the largest k > 1 with sigma(k p) < tau on
        D3, as ``choose_factor`` picks it. The sigmas are computed on the latent's device; reading those few values
        back is the step's one host sync (the host needs the factor to pick the engine anyway), and comparing them
        there saves the small device ops a device-side pick costs."""
        coarse = self._coarse
        if not coarse or len(self.history) < HISTORY or self.observed - 1 < self.warmup:
            return 1
        delta = third_difference(*self.history)
        sigmas = patch_sigmas(delta, [self.native_patch * k for k in coarse], self.rho).tolist()
        return max((k for k, sigma in zip(coarse, sigmas, strict=True) if sigma < self.tau), default=1)


def tau_and_source(
    defaults, tau: float | None, height: int, width: int, frames: int | None, steps: int, sizes, rho: float
) -> tuple[float, str]:
    """A generation's tau and where it came from: ``tau`` itself when given ('given'), else the tau ``ddit-bench
    --save-tau`` calibrated for exactly this shape, step count, loaded sizes and rho ('calibrated: 512x512, ...'),
    else the profile's ('profile'). ``defaults``: the manifest's ``SchedulerDefaults``."""
    if tau is not None:
        return tau, "given"
    tau, entry = defaults.tau_for(height, width, frames, steps, sizes, rho)
    return tau, "profile" if entry is None else f"calibrated: {entry.shape()}"


def check_schedule_sizes(schedule: Sequence[int] | None, loaded: Sequence[int]) -> None:
    """A generation's schedule against the sizes loaded: DDiT's (``None``) needs the native factor 1, as its
    warm-up steps and any step no coarse size fits run at 1p; a fixed one may use the loaded sizes only."""
    if schedule is None and 1 not in loaded:
        raise DDiTError(
            f"DDiT's schedule needs the native size 1 (its warm-up steps and its fallback run at 1p), but only "
            f"{', '.join(map(str, sorted(loaded)))} are loaded: add 1 to --sizes, or give a fixed --schedule"
        )
    unloaded = sorted(set(schedule or ()) - set(loaded))
    if unloaded:
        raise DDiTError(f"the schedule uses patch sizes {unloaded}, but only {list(loaded)} are loaded")


def parse_schedule(text: str, steps: int, factors: Sequence[int], available: str = "exported") -> list[int] | None:
    """The ``--schedule`` value: 'auto' -> None, '2' -> [2] * steps, '1,2,4,...' -> that list (one per step).
    ``available`` names what ``factors`` are in the error for a factor outside them ('exported', 'loaded')."""
    text = text.strip()
    if text.lower() == "auto":
        return None
    try:
        schedule = [int(part) for part in text.split(",")]
    except ValueError:
        raise DDiTError(
            f"cannot parse schedule '{text}': use 'auto', a factor such as 2, or a comma list such as 1,2,4,..."
        ) from None
    if len(schedule) == 1:
        schedule = schedule * steps
    elif len(schedule) != steps:
        raise DDiTError(
            f"schedule has {len(schedule)} entries but --steps is {steps}: "
            "give one factor per step, a single factor, or 'auto'"
        )
    exported = sorted({int(k) for k in factors})
    for k in schedule:
        if k not in exported:
            raise DDiTError(
                f"schedule uses patch size {k}, which was not {available} ({available}: "
                f"{', '.join(map(str, exported))})"
            )
    return schedule
