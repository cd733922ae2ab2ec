"""TeaCache (Liu et al. 2024) on top of patch scheduling: skip a step's transformer blocks while a cheap signal says
the output would barely change, and reuse the residual the blocks added last time.

Per step: the probe graph of the step's patch size gives the signal (FLUX: block 0's modulated input). Its
relative L1 change since the previous step, rescaled by the profile's polynomial, is accumulated. While the sum
stays under the threshold the step reuses the cached residual; otherwise the full engine runs, refreshes the
cache, and the sum resets. The first and last steps always run.

A patch-size switch also forces a full step: a cached residual lives on one size's token grid, and the signals of
two sizes are not comparable either (different token counts). The alternative, one cache per size, would reuse a
residual from steps ago, computed at another noise level; DDiT's schedules switch a few times per generation,
so the recompute costs only those few steps (``ddit-bench`` reports how many).
All math stays on the signal's device; ``TeaCache.should_compute`` does one host read.

Wan (TeaCache4Wan2.1): the signal is the timestep embedding, and the conditional and unconditional passes of
classifier-free guidance keep one ``TeaCache`` each. Run as two engine calls (``--cfg two-pass``), each pass
decides alone. Run as one batch of 2 (``--cfg batched``), the call runs the blocks when either pass needs them
(``any_compute``): both residuals are then fresh, so both sums restart; skipping a pass that asked to compute
would reuse a residual its own rule rejected. Wan's signal depends on the timestep only, which both passes share,
so in practice the two decisions agree.
"""

from __future__ import annotations

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


class TeaCache:
    """The skip decision of one generation. ``threshold`` 0 computes every step (TeaCache off)."""

    def __init__(self, threshold: float, coefficients: Sequence[float], steps: int):
        if threshold < 0:
            raise DDiTError(f"--teacache is a threshold >= 0 (e.g. 0.25, 0.4, 0.6), got {threshold}")
        self.threshold, self.coefficients, self.steps = float(threshold), tuple(coefficients), steps
        self.reset()

    def reset(self) -> None:
        self.previous: torch.Tensor | None = None
        self.previous_factor: int | None = None
        self.accumulated: torch.Tensor | None = None
        self.forced_by_switch = 0

    def should_compute(self, signal: torch.Tensor, step: int, factor: int) -> bool:
        """Whether step ``step`` (0-based) at patch factor ``factor`` must run the blocks, given its ``signal``."""
        switched = self.previous_factor is not None and factor != self.previous_factor
        if self.previous is None or switched or step == 0 or step == self.steps - 1 or self.threshold == 0:
            compute = True
            self.forced_by_switch += int(switched and 0 < step < self.steps - 1)
            self.accumulated = torch.zeros((), device=signal.device)
        else:
            self.accumulated += rescale(relative_l1(signal, self.previous), self.coefficients)
            compute = bool(self.accumulated >= self.threshold)  # the one host read
            if compute:
                self.accumulated.zero_()
        if self.previous is not None and self.previous.shape == signal.shape:
            self.previous.copy_(signal)
        else:
            self.previous = signal.detach().clone()
        self.previous_factor = factor
        return compute

    def refresh(self) -> None:
        """The blocks ran although this cache would have skipped them: the residual is fresh, restart the sum."""
        if self.accumulated is not None:
            self.accumulated.zero_()


def any_compute(caches: Sequence[TeaCache], signal: torch.Tensor, step: int, factor: int) -> bool:
    """One engine call for a batch of passes, ``signal`` [len(caches), ...] (row j is pass j's): run the blocks
    when any pass's cache says so, and then restart every pass's sum (each sees its own signal every step)."""
    wants = [cache.should_compute(signal[j : j + 1], step, factor) for j, cache in enumerate(caches)]
    if any(wants):
        for cache in caches:
            cache.refresh()
    return any(wants)
