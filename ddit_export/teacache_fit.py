"""Fit TeaCache's rescaling polynomial per patch size for one engines folder at one shape (``ddit-bench
--fit-teacache``), as the TeaCache authors fitted FLUX.1-dev's and Wan 2.1's.

For each loaded patch size k, the runtime's own generation runs with k on every step and TeaCache at threshold 0
(the probe runs every step and so do the blocks), with the profile's guidance: under classifier-free guidance each
pass has its own signal, as the runtime's accumulators see them. Between consecutive steps it records, per pass,
the relative L1 change of the signal (FLUX: block 0's modulated input; Wan: the timestep embedding) and of the
model output (the pass's velocity, before guidance). A least-squares polynomial maps the first to the second.

Why per size and per shape: a polynomial fitted on another model, resolution or patch size predicts the output
change badly (the published FLUX.1-dev polynomial has R^2 below 0 on the tiny FLUX, at 256 and at 512), and DDiT
runs most steps at a coarse size, whose signal moves differently from the native size's.
"""

from __future__ import annotations

import datetime

import numpy as np
import torch
from tqdm.auto import tqdm

from ddit_profiles import DDiTError, FittedTeaCache
from ddit_runtime.teacache import relative_l1

#: ``ddit-bench``'s default TeaCache thresholds with fitted polynomials, as multiples of the mean predicted output
#: change per interior step (a threshold of n times it computes about every n-th step).
PRESET_MULTIPLES = (1.5, 2.0, 3.0)
DEFAULT_DEGREE = 2  # the TeaCache authors' 4 overfits the few hundred step pairs a fit here has, and can go negative


def trajectories(generate, runtime, prompts: list[str], steps: int, size: int) -> tuple[np.ndarray, ...]:
    """(signal change, output change, step index) for every pass and pair of consecutive steps of ``generate(text,
    seed, schedule)`` over ``prompts`` at patch size ``size`` on every step, recorded through ``runtime.trace``."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(factor, step, signal, velocity):
        calls.append((signal.detach().clone(), velocity.detach().clone()))  # [passes in the call, ...] each

    xs, ys, at = [], [], []
    runtime.trace = record
    try:
        for i, text in enumerate(prompts):
            calls.clear()
            generate(text, i, [size] * steps)
            per_step = len(calls) // steps  # 1 (batched or unguided) or 2 (two-pass CFG)
            for j in range(1, steps):
                for c in range(per_step):
                    (s0, v0), (s1, v1) = calls[(j - 1) * per_step + c], calls[j * per_step + c]
                    for p in range(s1.shape[0]):
                        xs.append(relative_l1(s1[p], s0[p]).item())
                        ys.append(relative_l1(v1[p], v0[p]).item())
                        at.append(j)
    finally:
        runtime.trace = None
    return np.array(xs), np.array(ys), np.array(at)


def r_squared(y: np.ndarray, predicted: np.ndarray) -> float:
    return float(1 - ((y - predicted) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30))


def fit_polynomial(x: np.ndarray, y: np.ndarray, degree: int = DEFAULT_DEGREE) -> np.ndarray:
    """Least-squares coefficients (highest power first) of ``degree`` or, where that one goes negative inside the
    data's range (it would take change away from the sum), of the highest lower degree that does not. A degree-1
    fit that still goes negative is refused: no polynomial of this form suits the data."""
    grid = np.linspace(x.min(), x.max(), 64)
    for d in range(degree, 0, -1):
        fit = np.polyfit(x, y, d)
        if np.poly1d(fit)(grid).min() >= 0:
            return fit
    raise DDiTError(
        "TeaCache's polynomial fit goes negative inside the measured range at every degree: the output change does "
        "not grow with the signal's on this model; keep the manifest's polynomial (drop --fit-teacache)"
    )


def fit_teacache(
    runtime,
    generate,
    prompts: list[str],
    height: int,
    width: int,
    frames: int | None,
    steps: int,
    degree: int = DEFAULT_DEGREE,
    progress: bool = True,
) -> tuple[FittedTeaCache, list[str]]:
    """Fit one polynomial per size ``runtime`` loaded, on ``prompts`` (each with seed = its index), at this shape.

    ``generate(text, seed, schedule)`` runs one generation with TeaCache at threshold 0 (every step computed).
    Returns the entry to record and one line per size on the fit (R^2 against the manifest's polynomial)."""
    if steps < 3:
        raise DDiTError(
            f"--fit-teacache needs at least 3 steps (TeaCache never skips the first or the last), got {steps}"
        )
    if not prompts:
        raise DDiTError("--fit-teacache needs at least one prompt to fit on")
    manifest_poly = np.poly1d(runtime.spec.teacache.coefficients)
    polys, lines, evidence, step_means = {}, [], [], []
    bar = tqdm(total=len(runtime.sizes) * len(prompts), desc="fitting TeaCache", unit="gen", disable=not progress)

    def counted(text, seed, schedule):
        generate(text, seed, schedule)
        bar.update()

    try:
        for k in sorted(runtime.sizes):
            x, y, at = trajectories(counted, runtime, prompts, steps, k)
            fit = fit_polynomial(x, y, degree)
            poly = np.poly1d(fit)
            r2, r2_manifest = r_squared(y, poly(x)), r_squared(y, manifest_poly(x))
            interior = at < steps - 1  # the steps TeaCache may skip (``at`` starts at 1): not the last
            step_means.append(float(poly(x[interior]).mean()) if interior.any() else float(poly(x).mean()))
            polys[k] = tuple(float(c) for c in fit)
            note = (
                f"{k}p: degree {len(fit) - 1}, R^2 {r2:.3f} (the manifest's polynomial: {r2_manifest:.3f}) "
                f"on {len(x)} step pairs"
            )
            lines.append(f"{note}; coefficients {', '.join(f'{c:.6g}' for c in fit)}")
            evidence.append(note)
    finally:
        bar.close()
    per_step = float(np.median(step_means))
    presets = tuple(float(f"{m * per_step:.3g}") for m in PRESET_MULTIPLES)
    day = datetime.date.today().isoformat()
    entry = FittedTeaCache(
        height,
        width,
        frames,
        steps,
        polys,
        presets,
        evidence=f"{'; '.join(evidence)}; {len(prompts)} prompts, {runtime.device} ({runtime.backend.name}), {day}",
    )
    return entry, lines
