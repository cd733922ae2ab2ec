"""What the DDiT scheduler costs inside the denoising loop, not alone: native steps of DDiT runs against the steps of
fixed native runs, with the loop's torch ops on one thread (the runtime's setting) and on torch's default, side by
side in one run.

python benchmarks/scheduler_in_loop.py ENGINES_DIR [--prompts 4] [--repeats 3]

For each prompt and repeat, interleaved: a fixed native run and a DDiT run (the manifest's tau and rho) at each
thread setting. Native steps of the DDiT runs are split into warm-up steps (the scheduler has fewer than four
latents and does nothing), steps after a native step (the scheduler's cost in the loop) and steps after a coarse
step (the scheduler plus the switch back to the native engine). The first repeat is a warm-up and is not counted;
so are the first 4 (``HISTORY``) steps of the fixed runs.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import ddit_runtime.engine as engine
from ddit_export.bench import builtin_prompts
from ddit_runtime import runtime_class
from ddit_runtime.scheduler import HISTORY

SETTINGS = {"1 thread (runtime)": 1, f"torch default ({torch.get_num_threads()})": None}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    runtime = runtime_class(args.engines)(args.engines, provider="cpu")
    prompts = builtin_prompts(runtime.spec.family, args.prompts)
    steps = runtime.spec.scheduler.steps
    times = {name: {"fixed": [], "warm-up": [], "after 1p": [], "after coarse": []} for name in SETTINGS}
    coarse = {name: [] for name in SETTINGS}
    for rep in range(args.repeats):
        for i, prompt in enumerate(prompts):
            for name, threads in SETTINGS.items():
                engine.LOOP_THREADS = threads
                fixed = runtime.generate(prompt.text, seed=i, schedule=[1] * steps, progress=False)
                ddit = runtime.generate(prompt.text, seed=i, progress=False)
                if rep == 0:
                    continue
                times[name]["fixed"] += fixed.step_ms[HISTORY:]
                coarse[name].append(sum(k > 1 for k in ddit.schedule) / steps)
                for s in range(1, steps):
                    if ddit.schedule[s] != 1:
                        continue
                    kind = "warm-up" if s < HISTORY else "after 1p" if ddit.schedule[s - 1] == 1 else "after coarse"
                    times[name][kind].append(ddit.step_ms[s])
    engine.LOOP_THREADS = 1
    print(f"{runtime.spec.name}: native steps (median ms; n), {args.prompts} prompts x {args.repeats - 1} repeats")
    print(
        "| loop's torch threads | fixed 1p | DDiT 1p, warm-up | DDiT 1p after 1p | DDiT 1p after a coarse step "
        "| after 1p - fixed | % of a native step | coarse |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, t in times.items():
        med = {k: statistics.median(v) if v else float("nan") for k, v in t.items()}
        extra = med["after 1p"] - med["fixed"]
        cells = " | ".join(f"{med[k]:.2f} ({len(t[k])})" for k in ("fixed", "warm-up", "after 1p", "after coarse"))
        print(
            f"| {name} | {cells} | {extra:+.2f} | {100 * extra / med['fixed']:+.1f}% "
            f"| {statistics.mean(coarse[name]):.0%} |"
        )


if __name__ == "__main__":
    main()
