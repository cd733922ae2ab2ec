"""Classifier-free guidance as one batch of 2 or as two calls: median step time of each, side by side.

python benchmarks/wan_cfg.py ENGINES_DIR [--frames 9] [--steps 8] [--repeats 3] [--schedule 1]
"""

from __future__ import annotations

import argparse
import statistics

from ddit_runtime.wan_pipeline import WanRuntime


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--schedule", type=int, default=1, help="fixed patch factor for every step")
    args = ap.parse_args(argv)
    runtime = WanRuntime(args.engines, provider="cpu")
    times = {"batched": [], "two-pass": []}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        for mode in times:
            result = runtime.generate(
                "a red circle on a black background",
                frames=args.frames,
                steps=args.steps,
                schedule=[args.schedule] * args.steps,
                cfg=mode,
                progress=False,
            )
            times[mode] += result.step_ms[1:]
    med = {mode: statistics.median(ts) for mode, ts in times.items()}
    for mode, ms in med.items():
        print(f"{mode:9s} median step {ms:8.2f} ms over {len(times[mode])} steps")
    print(f"two-pass / batched = {med['two-pass'] / med['batched']:.2f}")


if __name__ == "__main__":
    main()
