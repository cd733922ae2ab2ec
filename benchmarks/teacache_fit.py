"""Fit TeaCache's rescaling polynomial for a FLUX engines folder, as the TeaCache authors fit FLUX.1-dev's.

    python benchmarks/teacache_fit.py ENGINES_DIR [--prompts 16] [--steps 20] [--degree 4]

For held-out captions it runs the native schedule step by step and records, between consecutive steps, the
relative L1 change of the signal (block 0's modulated input, from the TeaCache probe) and of the model output
(the velocity). A least-squares polynomial maps the first to the second; the coefficients (highest power first)
go into the profile's ``TeaCacheSpec``. It prints the fit and how well the published FLUX.1-dev polynomial
predicts the same data, for comparison.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from ddit_export.bench import HELD_OUT_SEED, example
from ddit_profiles import TeaCacheSpec
from ddit_runtime.pipeline import FluxRuntime
from ddit_runtime.sigmas import flux_sigmas
from ddit_runtime.teacache import relative_l1


def trajectories(runtime: FluxRuntime, prompts: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    spec = runtime.spec
    h, w = spec.opt_size
    lh, lw = spec.latent_hw(h, w)
    engine, probe = runtime.engines[1], runtime._probe(1)
    rows, cols = spec.token_grid(1, h, w)
    dim = engine.output_dim("residual")
    xs, ys = [], []
    for i in range(prompts):
        text = example(spec.family, HELD_OUT_SEED + 50_000 + i).text  # not the benchmark's captions
        t5, pooled = runtime.encode(text)
        latent = torch.randn(1, spec.latent_channels, lh, lw, generator=torch.Generator().manual_seed(i))
        sigmas = flux_sigmas(steps, spec.shift.mu(spec.image_seq_len(h, w))).tolist()
        timestep = torch.empty(1)
        feeds = dict(
            latent=latent,
            timestep=timestep,
            guidance=torch.full((1,), spec.scheduler.guidance),
            encoder_hidden_states=t5,
            pooled_projections=pooled,
        )
        residual = torch.zeros(1, rows, cols, dim)
        modulated, velocity = torch.zeros(1, rows * cols, dim), torch.empty_like(latent)
        previous = None
        for j in range(steps):
            timestep.fill_(sigmas[j])
            probe.run(feeds | {"residual": residual}, {"modulated": modulated, "velocity": velocity})
            engine.run(feeds, {"velocity": velocity, "residual": residual})
            if previous is not None:
                xs.append(relative_l1(modulated, previous[0]).item())
                ys.append(relative_l1(velocity, previous[1]).item())
            previous = (modulated.clone(), velocity.clone())
            latent.add_(velocity, alpha=sigmas[j + 1] - sigmas[j])
    return np.array(xs), np.array(ys)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--degree", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    runtime = FluxRuntime(args.engines, provider="cpu", sizes=[1])
    steps = args.steps or runtime.spec.scheduler.steps
    x, y = trajectories(runtime, args.prompts, steps)
    fit = np.polyfit(x, y, args.degree)
    published = np.poly1d(TeaCacheSpec().coefficients)

    def r2(pred):
        return 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()

    print(f"{len(x)} step pairs from {args.prompts} prompts x {steps} steps")
    print(f"signal change: median {np.median(x):.4f}, range {x.min():.4f}..{x.max():.4f}")
    print(f"output change: median {np.median(y):.4f}, range {y.min():.4f}..{y.max():.4f}")
    print(f"fitted coefficients (highest power first): {[float(f'{c:.8e}') for c in fit]}")
    print(f"R^2: fitted {r2(np.poly1d(fit)(x)):.3f}, published FLUX.1-dev polynomial {r2(published(x)):.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(x=x.tolist(), y=y.tolist(), coefficients=fit.tolist()), f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
