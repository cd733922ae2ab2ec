"""Guidance as one engine call on a batch of 2, or as two calls: the median step time of each, per patch size,
side by side (the two modes interleaved, so machine drift hits both alike).

    python benchmarks/cfg_modes.py ENGINES_DIR [--frames 9] [--steps 8] [--repeats 3] [--sizes 1,2,4]

FLUX engines are run with their profile's true CFG (the tiny FLUX: 3), Wan engines with their guidance scale.
"""

from __future__ import annotations

import argparse
import statistics

from ddit_runtime import runtime_class

PROMPT = "a red circle on a black background"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines")
    ap.add_argument("--frames", type=int, default=None, help="Wan: frames (default: the profile's)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default=None, help="patch factors to time, each as a fixed schedule (default: all)")
    args = ap.parse_args(argv)
    runtime = runtime_class(args.engines)(args.engines, provider="cpu")
    if runtime.spec.family == "wan":
        extra = dict(frames=args.frames)
    else:
        extra = dict(true_cfg=max(runtime.spec.scheduler.true_cfg, 2.0))  # guided, whatever the profile's default
    sizes = [int(k) for k in args.sizes.split(",")] if args.sizes else runtime.sizes
    modes = ("batched", "two-pass")
    times = {(k, mode): [] for k in sizes for mode in modes}
    for _ in range(args.repeats):
        for k in sizes:
            for mode in modes:  # interleaved
                result = runtime.generate(
                    PROMPT, steps=args.steps, schedule=[k] * args.steps, cfg=mode, progress=False, **extra
                )
                times[k, mode] += result.step_ms[1:]  # the first step of a generation pays for its buffers
    print("| size | batched ms | two-pass ms | two-pass / batched |")
    print("|---|---|---|---|")
    for k in sizes:
        b, t = (statistics.median(times[k, mode]) for mode in modes)
        print(f"| {k}p | {b:.2f} | {t:.2f} | {t / b:.2f} |")


if __name__ == "__main__":
    main()
