"""Per-size step ratios of the runtime against the bare engine call and the FLOP-ideal, in one run.

    python benchmarks/per_size.py ENGINES_DIR [--steps 4] [--rounds 1] [--bare 10] [--height H --width W]
        [--frames N] [--json OUT]

The lean part of ``ddit-bench``: the fixed native, 2p and 4p schedules through the whole runtime step (scheduler
cost added, engine call with its in-graph patchify, Euler update), the bare engine call per size, and the
profile's analytic FLOP ratio. It loads no TeaCache probes and runs no DDiT sweep, so it needs less memory than
the full ``ddit-bench``: on ``flux-dev-shape`` at 1024x1024 it peaked at 22.0 GB resident (2026-11-23, with the
runtime's shared CPU arena; before it, 24.3 GB and OOM-killed), and took 7 minutes on 2 cores. Wan engines
(``wan-1.3b-shape``) run at the profile's opt frame count and size (or ``--frames`` / ``--height`` / ``--width``),
with their guidance batched.

Everything is interleaved: each of ``--rounds`` rounds (a seed each) runs the native, 2p and 4p generations in
turn, then its share of the ``--bare`` calls, round-robin over the sizes. At real widths a native call takes
10-15 s here, so drift over minutes would otherwise land in one size's median, or in the runtime's and not the
bare graph's.
"""

from __future__ import annotations

import argparse
import sys

from ddit_export.bench import Bench, Method, builtin_prompts, markdown, writable_json, write_json
from ddit_profiles import DDiTError
from ddit_runtime import runtime_class


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines")
    ap.add_argument("--steps", type=int, default=4, help="steps per generation (default 4)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds, one seed each (default 1)")
    ap.add_argument("--bare", type=int, default=10, help="bare calls per size, over all rounds (default 10)")
    ap.add_argument("--height", type=int, default=None, help="pixels (default: the profile's opt size)")
    ap.add_argument("--width", type=int, default=None, help="pixels (default: the profile's opt size)")
    ap.add_argument("--frames", type=int, default=None, help="Wan: video frames, 4n+1 (default: the profile's)")
    ap.add_argument("--json", type=writable_json, default=None)
    args = ap.parse_args(argv)
    try:
        runtime = runtime_class(args.engines)(args.engines, provider="cpu")
        prompts = builtin_prompts(runtime.spec.family, 1)
        shape = dict(height=args.height, width=args.width, frames=args.frames)
        bench = Bench(runtime, prompts, seeds=args.rounds, steps=args.steps, progress=True, **shape)
    except DDiTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warm = min(args.steps, 2)
    for _ in range(2):  # the first runs at large token counts are slow: warm every size up (4 calls each)
        for k in runtime.sizes:
            bench._generate(bench.prompts[0], 0, dict(steps=warm, schedule=[k] * warm))
    methods = [Method("native", "baseline", dict(schedule=[1] * args.steps))]
    methods += [Method(f"fixed {k}p", "fixed", dict(schedule=[k] * args.steps)) for k in runtime.sizes if k > 1]
    per_round = max(1, -(-args.bare // args.rounds))  # the bare calls spread over the rounds, beside them
    bench.done = bench.run_methods(methods, between=lambda: bench.bare_engine_ms(per_round))
    stop = bench.interrupted  # Ctrl-C: the rounds every size finished are reported, as ddit-bench does
    if stop is not None and not stop["finished"]:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    bench.tau = runtime.spec.scheduler.tau
    report = bench.report()
    print(markdown(report))
    if args.json:
        write_json(report, args.json)  # atomic: a temporary file, then a rename
    if stop is not None:
        print(f"interrupted: the report covers {stop['finished']} of {stop['of']} rounds", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
