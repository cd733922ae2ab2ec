"""Fit TeaCache's rescaling polynomial for a FLUX engines folder, as the TeaCache authors fit FLUX.1-dev's.

    python benchmarks/teacache_fit.py ENGINES_DIR [--prompts 16] [--steps N] [--degree 4] [--height H --width W]
        [--size K] [--json OUT]

For captions disjoint from ``ddit-bench``'s it runs the runtime's own native generation (``generate`` with
TeaCache at threshold 0: the probe runs every step and so do the blocks), with the profile's guidance: under true
CFG both passes, each with its own signal, as the runtime's accumulators see them. Between consecutive steps it
records, per pass, the relative L1 change of the signal (block 0's modulated input, from the TeaCache probe) and
of the model output (the pass's velocity, before guidance). A least-squares polynomial maps the first to the
second; the coefficients (highest power first) go to ``ddit-run`` / ``ddit-bench --teacache-coefficients``, or
into the profile's ``TeaCacheSpec``. It prints the fit and how well the published FLUX.1-dev polynomial predicts
the same data, and what each polynomial sums to over a generation (the threshold scale: a threshold of about
sum / n computes about every n-th step). ``ddit-bench --fit-teacache`` fits one per loaded size and records them
in the engines folder; this script prints more about one size's fit. ``--height``/``--width`` fit at another resolution than the profile's, and
``--size K`` on the trajectory of patch size K on every step (its probe's signal, its velocity): the size DDiT runs
most steps at, e.g. 2 for a model that DDiT runs at 2p after its warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from ddit_export.bench import FIT_OFFSET, HELD_OUT_SEED, example, writable_json
from ddit_export.teacache_fit import r_squared, trajectories
from ddit_profiles import TeaCacheSpec
from ddit_runtime.pipeline import FluxRuntime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--degree", type=int, default=4)
    ap.add_argument("--height", type=int, default=None, help="image height (default: the profile's)")
    ap.add_argument("--width", type=int, default=None, help="image width (default: the profile's)")
    ap.add_argument("--size", type=int, default=1, help="the patch size run on every step (default 1, native)")
    ap.add_argument("--json", type=writable_json, default=None)
    args = ap.parse_args(argv)
    runtime = FluxRuntime(args.engines, provider="cpu", sizes=[args.size])
    steps = args.steps or runtime.spec.scheduler.steps
    height = args.height or runtime.spec.opt_size[0]
    width = args.width or runtime.spec.opt_size[1]
    texts = [example(runtime.spec.family, HELD_OUT_SEED + FIT_OFFSET + i).text for i in range(args.prompts)]

    def generate(text, seed, schedule):
        runtime.generate(text, height, width, steps=steps, seed=seed, schedule=schedule, teacache=0.0, progress=False)

    x, y, at = trajectories(generate, runtime, texts, steps, args.size)
    fit = np.polyfit(x, y, args.degree)
    fitted, published = np.poly1d(fit), np.poly1d(TeaCacheSpec().coefficients)
    shipped = np.poly1d(runtime.spec.teacache.coefficients)

    def r2(pred):
        return r_squared(y, pred)

    passes = len(x) // (args.prompts * (steps - 1))
    print(
        f"{len(x)} step pairs from {args.prompts} prompts x {steps} steps x {passes} pass(es), "
        f"{height}x{width}, {args.size}p on every step"
    )
    print(f"signal change: median {np.median(x):.4f}, range {x.min():.4f}..{x.max():.4f}")
    print(f"output change: median {np.median(y):.4f}, range {y.min():.4f}..{y.max():.4f}")
    print(f"fitted coefficients (highest power first): {[float(f'{c:.8e}') for c in fit]}")
    print(f"R^2: fitted {r2(fitted(x)):.3f}, published FLUX.1-dev polynomial {r2(published(x)):.3f}")
    grid = fitted(np.linspace(x.min(), x.max(), 64))
    if grid.min() < 0 or (np.diff(grid) < 0).any():  # a negative or falling rescale would undo accumulated change
        print(
            f"warning: the degree-{args.degree} fit is negative or decreasing inside the data's range"
            + (
                "; try --degree 2"
                if args.degree > 2
                else ": its low end rescales a small change to more than a larger one"
            )
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
