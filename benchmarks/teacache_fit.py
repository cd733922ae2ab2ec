"""Fit TeaCache's rescaling polynomial for a FLUX engines folder, as the TeaCache authors fit FLUX.1-dev's.

    python benchmarks/teacache_fit.py ENGINES_DIR [--prompts 16] [--steps N] [--degree 4] [--json OUT]

For captions disjoint from ``ddit-bench``'s it runs the runtime's own native generation (``generate`` with
TeaCache at threshold 0: the probe runs every step and so do the blocks), with the profile's guidance: under true
CFG both passes, each with its own signal, as the runtime's accumulators see them. Between consecutive steps it
records, per pass, the relative L1 change of the signal (block 0's modulated input, from the TeaCache probe) and
of the model output (the pass's velocity, before guidance). A least-squares polynomial maps the first to the
second; the coefficients (highest power first) go to ``ddit-run`` / ``ddit-bench --teacache-coefficients``, or
into the profile's ``TeaCacheSpec``. It prints the fit and how well the published FLUX.1-dev polynomial predicts
the same data, and what each polynomial sums to over a generation (the threshold scale: a threshold of about
sum / n computes about every n-th step).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from ddit_export.bench import HELD_OUT_SEED, example, writable_json
from ddit_profiles import TeaCacheSpec
from ddit_runtime.pipeline import FluxRuntime
from ddit_runtime.teacache import relative_l1

FIT_OFFSET = 50_000  # fit captions: HELD_OUT_SEED + 50 000 + i, not the benchmark's


def trajectories(runtime: FluxRuntime, prompts: int, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signal change, output change, step index) per pass and pair of consecutive steps, over ``prompts``
    native generations of the runtime's own loop."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = runtime._call

    def recording(factor, step, feeds, velocity, buf, caches):
        ran = original(factor, step, feeds, velocity, buf, caches)
        calls.append((buf["modulated"].clone(), velocity.clone()))  # [passes in the call, ...] each
        return ran

    runtime._call = recording
    xs, ys, at = [], [], []
    try:
        for i in range(prompts):
            calls.clear()
            text = example(runtime.spec.family, HELD_OUT_SEED + FIT_OFFSET + i).text
            runtime.generate(text, steps=steps, seed=i, schedule=[1] * steps, teacache=0.0, progress=False)
            per_step = len(calls) // steps  # 1 (batched or unguided) or 2 (two-pass CFG)
            for j in range(1, steps):
                for c in range(per_step):
                    (m0, v0), (m1, v1) = calls[(j - 1) * per_step + c], calls[j * per_step + c]
                    for p in range(m1.shape[0]):
                        xs.append(relative_l1(m1[p], m0[p]).item())
                        ys.append(relative_l1(v1[p], v0[p]).item())
                        at.append(j)
    finally:
        runtime._call = original
    return np.array(xs), np.array(ys), np.array(at)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--degree", type=int, default=4)
    ap.add_argument("--json", type=writable_json, default=None)
    args = ap.parse_args(argv)
    runtime = FluxRuntime(args.engines, provider="cpu", sizes=[1])
    steps = args.steps or runtime.spec.scheduler.steps
    x, y, at = trajectories(runtime, args.prompts, steps)
    fit = np.polyfit(x, y, args.degree)
    fitted, published = np.poly1d(fit), np.poly1d(TeaCacheSpec().coefficients)
    shipped = np.poly1d(runtime.spec.teacache.coefficients)

    def r2(pred):
        return 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()

    passes = len(x) // (args.prompts * (steps - 1))
    print(f"{len(x)} step pairs from {args.prompts} prompts x {steps} steps x {passes} pass(es)")
    print(f"signal change: median {np.median(x):.4f}, range {x.min():.4f}..{x.max():.4f}")
    print(f"output change: median {np.median(y):.4f}, range {y.min():.4f}..{y.max():.4f}")
    print(f"fitted coefficients (highest power first): {[float(f'{c:.8e}') for c in fit]}")
    print(f"R^2: fitted {r2(fitted(x)):.3f}, published FLUX.1-dev polynomial {r2(published(x)):.3f}")
    grid = fitted(np.linspace(x.min(), x.max(), 64))
    if grid.min() < 0 or (np.diff(grid) < 0).any():  # a negative or falling rescale would undo accumulated change
        print(
            f"warning: the degree-{args.degree} fit is negative or decreasing inside the data's range; try --degree 2"
        )
    interior = at < steps - 1  # the steps TeaCache may skip (at starts at 1): not the first or the last
    for name, poly in (("measured output change", None), ("fitted", fitted), ("published", published)):
        total = (y if poly is None else poly(x))[interior].sum() / (args.prompts * passes)
        print(f"sum over a generation's interior steps, {name}: {total:.3f}")
    if shipped.coeffs.tolist() != published.coeffs.tolist():
        print(f"R^2 of the engines' own polynomial: {r2(shipped(x)):.3f}")
    per_step = [float(np.median(y[at == j])) for j in range(1, steps)]
    print("median output change per step: " + " ".join(f"{v:.3f}" for v in per_step))
    poly = ",".join(f"{c:.6g}" for c in fit)
    print(f"to use the fit: ddit-run {args.engines} --teacache T --teacache-coefficients {poly} (or ddit-bench)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(x=x.tolist(), y=y.tolist(), step=at.tolist(), coefficients=fit.tolist()), f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
