"""TeaCache (Liu et al. 2024) on top of patch scheduling: skip a step's transformer blocks while a cheap signal says
the output would barely change, and reuse the residual the blocks added last time.

Per step: the probe graph of the step's patch size gives the signal (FLUX: block 0's modulated input). Its
relative L1 change since the previous step, rescaled by the profile's polynomial (or by the one ``ddit-bench
--fit-teacache`` fitted for that size at the generation's shape, see ``polynomials``), is accumulated. While the sum
stays under the threshold the step reuses the cached residual; otherwise the full engine runs, refreshes the
cache, and the sum resets. The first and last steps always run.

At a patch-size switch there are two policies (``switch``):

- ``recompute`` (the default): the switch forces a full step. A cached residual lives on one size's token grid,
  and the signals of two sizes are not comparable either (different token counts).
- ``per-size``: every size keeps its own residual (the runtime already has one buffer per size), its own last
  signal and its own sum. Returning to size k after g steps at other sizes compares k's signal now with k's signal
  g steps ago, and adds g times the rescaled mean per-step change (``g * rescale(l1 / g)``: the polynomial was
  fitted on consecutive steps). A size never computed yet runs in full.

``ddit-bench`` measures both (how many steps ran, how many were forced by a switch, how many reused a residual
across one).
All math stays on the signal's device; ``TeaCache.should_compute`` does one host read.

Wan (TeaCache4Wan2.1): the signal is the timestep embedding, and the conditional and unconditional passes of
classifier-free guidance keep one ``TeaCache`` each. Run as two engine calls (``--cfg two-pass``), each pass
decides alone. Run as one batch of 2 (``--cfg batched``), the call runs the blocks when either pass needs them
(``any_compute``): both residuals are then fresh, so both sums restart; skipping a pass that asked to compute
would reuse a residual its own rule rejected. Wan's signal depends on the timestep only, which both passes share,
so in practice the two decisions agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ddit_profiles import DDiTError


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Two signals of one shape -> 0-dim float32: mean |current - previous| / mean |previous|."""
    return (current.float() - previous.float()).abs().mean() / previous.float().abs().mean().clamp_min(1e-12)


def rescale(x: torch.Tensor, coefficients: Sequence[float]) -> torch.Tensor:
    """The polynomial ``coefficients`` (highest power first, as numpy.poly1d) at the 0-dim ``x``, on its device."""
    out = torch.zeros_like(x)
    for c in coefficients:
        out = out * x + c
    return out


def parse_coefficients(text: str) -> tuple[float, ...]:
    """'12.574,-1.3008,0.041905' -> (12.574, -1.3008, 0.041905): a rescaling polynomial, highest power first (what
    ``benchmarks/teacache_fit.py`` prints), to use in place of the manifest's."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise DDiTError(
            f"--teacache-coefficients takes finite numbers separated by commas, highest power first "
            f"(e.g. 12.574,-1.3008,0.041905), got '{text}'"
        )
    return values


SWITCH_POLICIES = ("recompute", "per-size")


def polynomials(teacache_spec, given: Sequence[float] | None, height: int, width: int, frames, steps: int):
    """A generation's rescaling polynomials: (the default one, {size: its own} or None, where they came from).

    ``given`` (``--teacache-coefficients``) serves every size ('given'); else the polynomials ``ddit-bench
    --fit-teacache`` fitted per size at exactly this shape ('fitted: 512x512, 20 steps'), the manifest's for a
    size without one; else the manifest's ('manifest'). ``teacache_spec``: the manifest's ``TeaCacheSpec``."""
    if given is not None:
        return tuple(given), None, "given"
    entry = teacache_spec.fitted_for(height, width, frames, steps)
    if entry is None:
        return teacache_spec.coefficients, None, "manifest"
    return teacache_spec.coefficients, entry.coefficients, f"fitted: {entry.shape()}"


def _finite_polynomial(coefficients: Sequence[float]) -> tuple[float, ...]:
    coefficients = tuple(float(c) for c in coefficients)
    if not coefficients or not all(math.isfinite(c) for c in coefficients):
        raise DDiTError(f"TeaCache's rescaling polynomial needs finite coefficients, got {coefficients}")
    return coefficients


class TeaCache:
    """The skip decision of one generation. ``threshold`` 0 computes every step (TeaCache off). ``switch``: what a
    patch-size switch does (see the module docstring): ``recompute`` or ``per-size``. ``size_coefficients``: patch
    size -> its own polynomial (``ddit-bench --fit-teacache``), in place of ``coefficients`` at that size."""

    def __init__(
        self,
        threshold: float,
        coefficients: Sequence[float],
        steps: int,
        switch: str = "recompute",
        size_coefficients: dict[int, Sequence[float]] | None = None,
    ):
        if threshold < 0:
            raise DDiTError(f"--teacache is a threshold >= 0 (e.g. 0.25, 0.4, 0.6), got {threshold}")
        if switch not in SWITCH_POLICIES:
            raise DDiTError(f"--teacache-switch must be one of {', '.join(SWITCH_POLICIES)}, got '{switch}'")
        self.threshold, self.coefficients, self.steps = float(threshold), _finite_polynomial(coefficients), steps
        self.size_coefficients = {int(k): _finite_polynomial(v) for k, v in (size_coefficients or {}).items()}
        self.per_size = switch == "per-size"
        self.reset()

    def reset(self) -> None:
        self.previous: dict[int, torch.Tensor] = {}  # size -> its signal the last time it ran (blocks or not)
        self.seen: dict[int, int] = {}  # size -> that step
        self.accumulated: dict[int, torch.Tensor] = {}  # size -> rescaled change since its residual was computed
        self.previous_factor: int | None = None
        self.forced_by_switch = 0
        self.reused_across_switch = 0

    def should_compute(self, signal: torch.Tensor, step: int, factor: int) -> bool:
        """Whether step ``step`` (0-based) at patch factor ``factor`` must run the blocks, given its ``signal``."""
        switched = self.previous_factor is not None and factor != self.previous_factor
        previous = self.previous.get(factor)
        cached = previous is not None and previous.shape == signal.shape and (self.per_size or not switched)
        interior = 0 < step < self.steps - 1
        if not cached or not interior or self.threshold == 0:
            compute = True
            self.forced_by_switch += int(switched and interior)
            self.accumulated[factor] = torch.zeros((), device=signal.device)
        else:
            gap = step - self.seen[factor]  # 1 unless the steps since were run at other sizes
            accumulated = self.accumulated[factor]
            poly = self.size_coefficients.get(factor, self.coefficients)
            accumulated += gap * rescale(relative_l1(signal, previous) / gap, poly)
            compute = bool(accumulated >= self.threshold)  # the one host read
            if compute:
                accumulated.zero_()
            self.reused_across_switch += int(switched and not compute)
        if previous is not None and previous.shape == signal.shape:
            previous.copy_(signal)
        else:
            self.previous[factor] = signal.detach().clone()
        self.seen[factor] = step
        self.previous_factor = factor
        return compute

    def refresh(self) -> None:
        """The blocks ran although this cache would have skipped them: the residual is fresh, restart the sum."""
        if self.previous_factor in self.accumulated:
            self.accumulated[self.previous_factor].zero_()


def any_compute(caches: Sequence[TeaCache], signal: torch.Tensor, step: int, factor: int) -> bool:
    """One engine call for a batch of passes, ``signal`` [len(caches), ...] (row j is pass j's): run the blocks
    when any pass's cache says so, and then restart every pass's sum (each sees its own signal every step)."""
    wants = [cache.should_compute(signal[j : j + 1], step, factor) for j, cache in enumerate(caches)]
    if any(wants):
        for cache in caches:
            cache.refresh()
    return any(wants)
