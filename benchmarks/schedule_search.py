"""How fast can any patch schedule of these engines go at a given quality? A search over fixed schedules.

    python benchmarks/schedule_search.py ENGINES_DIR [--search 8] [--prompts 16] [--steps N] [--band 0.03]
                                                     [--json OUT]

DDiT's scheduler picks each step's patch size from the latent's third difference. This script asks the question
beneath it: with these engines, is there *any* per-step schedule that reaches a speedup at the baseline's quality,
whatever the scheduler? It runs fixed schedules (``generate(..., schedule=[...])``), so the scheduler plays no part.

1. **Sensitivity**, on search captions disjoint from ``ddit-bench``'s: for every step i and coarse size k, the
   native schedule with only step i at k. Its cost is 1 - SSIM against the native image, averaged over the captions.
2. **Greedy schedules**: the (step, size) candidates sorted by cost per millisecond saved (the step ms per size
   are measured on the same runs), added one step at a time; every second prefix is a schedule to test. Three
   orders: 2p only, 4p only, and the cheaper of the two per step. The costs of single substitutions are assumed to
   add, so this is a search, not a proof of optimality.
3. **Families**: coarse first or last for a quarter, half and three quarters of the steps, at 2p and at 4p, and the
   periodic schedules of one coarse step in two or four.
4. On the held-out captions (``ddit-bench``'s, the same seeds), interleaved (each caption through every schedule in
   turn): native, DDiT at the manifest's tau, every schedule above, and native with fewer steps. It prints speedup,
   evaluator score, SSIM and coarse fraction per schedule, and the fastest schedule within ``--band`` of the
   native score.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from tqdm.auto import tqdm

from ddit_export.bench import HELD_OUT_SEED, builtin_prompts, example, writable_json
from ddit_export.quality import ssim
from ddit_runtime.pipeline import FluxRuntime

SEARCH_OFFSET = 60_000  # search captions: HELD_OUT_SEED + 60 000 + i (ddit-bench uses + 0, teacache_fit + 50 000)


def sensitivity(runtime: FluxRuntime, prompts, steps: int, sizes: list[int]) -> tuple[dict, dict]:
    """({(step, k): mean 1 - SSIM against native}, {k: median step ms}) over ``prompts``, native first per prompt."""
    cost: dict[tuple[int, int], list[float]] = {}
    step_ms: dict[int, list[float]] = {}
    jobs = [(p, i, k) for p in prompts for i in [-1, *range(steps)] for k in ([1] if i < 0 else sizes)]
    native = None
    for prompt, i, k in tqdm(jobs, desc="sensitivity", leave=False):
        schedule = [1] * steps
        if i >= 0:
            schedule[i] = k
        g = runtime.generate(prompt.text, steps=steps, seed=0, schedule=schedule, progress=False)
        for f, ms in zip(g.schedule, g.step_ms, strict=True):
            step_ms.setdefault(f, []).append(ms)
        if i < 0:
            native = g.image
        else:
            cost.setdefault((i, k), []).append(1.0 - ssim(g.image, native))
    return (
        {key: statistics.mean(v) for key, v in cost.items()},
        {k: statistics.median(v) for k, v in step_ms.items()},
    )


def greedy(cost: dict, step_ms: dict, steps: int, sizes: list[int]) -> list[list[int]]:
    """Schedules from the cheapest (step, size) candidates per ms saved: every second prefix of one more coarse
    step, for each order (each size alone, and the cheaper size per step)."""

    def per_ms(candidate: tuple[int, int]) -> float:
        return cost[candidate] / max(step_ms[1] - step_ms[candidate[1]], 1e-6)  # a size no faster ranks last

    orders = {f"{k}p": [(i, k) for i in range(steps)] for k in sizes}
    if len(sizes) > 1:
        orders["mixed"] = [min(((i, k) for k in sizes), key=per_ms) for i in range(steps)]
    out = []
    for candidates in orders.values():
        ranked = sorted(candidates, key=per_ms)
        schedule = [1] * steps
        for n, (i, k) in enumerate(ranked, start=1):
            schedule[i] = k
            if n % 2 == 0:
                out.append(list(schedule))
    return out


def families(steps: int, sizes: list[int]) -> list[list[int]]:
    """Coarse first / last for 1/4, 1/2, 3/4 of the steps, and one coarse step in 2 or 4, per coarse size."""
    out = []
    for k in sizes:
        for frac in (0.25, 0.5, 0.75):
            n = round(steps * frac)
            out.append([k] * n + [1] * (steps - n))
            out.append([1] * (steps - n) + [k] * n)
        for period in (2, 4):
            out.append([k if i % period == period - 1 else 1 for i in range(steps)])
    return out


def label(schedule: list[int]) -> str:
    """[1, 1, 4, 4, 4] -> '1x2,4x3'."""
    runs: list[list[int]] = []
    for k in schedule:
        if runs and runs[-1][0] == k:
            runs[-1][1] += 1
        else:
            runs.append([k, 1])
    text = ",".join(f"{k}x{n}" for k, n in runs)
    return text if len(text) <= 40 else f"{text[:37]}..."


def compare(runtime: FluxRuntime, prompts, steps: int, methods: list[tuple[str, dict]]) -> list[dict]:
    """Every method on every prompt, interleaved; speedup is against the first method's mean time per image."""
    rows = {name: dict(t=[], score=[], ssim=[], coarse=[]) for name, _ in methods}
    for prompt in prompts[:1]:  # warm-up at every size
        for _, options in methods[:4]:
            runtime.generate(prompt.text, **{"steps": steps, **options}, seed=0, progress=False)
    for prompt in tqdm(prompts, desc="held-out captions", leave=False):
        native = None
        for name, options in methods:
            g = runtime.generate(prompt.text, **{"steps": steps, **options}, seed=0, progress=False)
            native = g.image if native is None else native
            row = rows[name]
            row["t"].append(g.total_s)
            row["score"].append(prompt.score(g.image)["score"])
            row["ssim"].append(ssim(g.image, native))
            row["coarse"].append(sum(k > 1 for k in g.schedule) / len(g.schedule))
    base = statistics.mean(rows[methods[0][0]]["t"])
    return [
        dict(
            method=name,
            schedule=options.get("schedule"),
            speedup=base / statistics.mean(rows[name]["t"]),
            score=statistics.mean(rows[name]["score"]),
            ssim=statistics.mean(rows[name]["ssim"]),
            coarse=statistics.mean(rows[name]["coarse"]),
        )
        for name, options in methods
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engines")
    ap.add_argument("--search", type=int, default=8, help="search captions for the sensitivity pass")
    ap.add_argument("--prompts", type=int, default=16, help="held-out captions (ddit-bench's, same seeds)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the manifest's)")
    ap.add_argument("--band", type=float, default=0.03, help="score band below native for 'fastest within'")
    ap.add_argument("--json", type=writable_json, default=None, help="write every row and the sensitivity costs here")
    args = ap.parse_args(argv)

    runtime = FluxRuntime(args.engines)
    if runtime.spec.family != "flux":
        sys.exit("schedule_search.py: FLUX engines only (the evaluator scores images)")
    steps = args.steps or runtime.spec.scheduler.steps
    sizes = [k for k in runtime.sizes if k > 1]
    search = [example("flux", HELD_OUT_SEED + SEARCH_OFFSET + i, i % 2 == 0) for i in range(args.search)]
    cost, step_ms = sensitivity(runtime, search, steps, sizes)
    print("step ms per size (sensitivity runs): " + ", ".join(f"{k}p {ms:.1f}" for k, ms in sorted(step_ms.items())))
    print("1 - SSIM of one coarse step, per step: ")
    for k in sizes:
        print(f"  {k}p: " + " ".join(f"{cost[(i, k)]:.3f}" for i in range(steps)))

    schedules = greedy(cost, step_ms, steps, sizes) + families(steps, sizes)
    seen, methods = set(), [("native", dict(schedule=[1] * steps)), ("DDiT (manifest tau)", {})]
    for s in schedules:
        if tuple(s) not in seen and any(k > 1 for k in s):
            seen.add(tuple(s))
            methods.append((label(s), dict(schedule=s)))
    methods += [(f"native {n} steps", dict(steps=n, schedule=[1] * n)) for n in (5, 7, 9, 12)]
    rows = compare(runtime, builtin_prompts("flux", args.prompts), steps, methods)

    print(f"\n{args.prompts} held-out captions, {steps} steps, {len(methods)} schedules, interleaved\n")
    print("| schedule | speedup | score | SSIM | coarse |\n|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["speedup"]):
        print(f"| {r['method']} | {r['speedup']:.2f}x | {r['score']:.3f} | {r['ssim']:.3f} | {r['coarse']:.0%} |")
    floor = rows[0]["score"] - args.band
    patch = [r for r in rows if r["schedule"] is not None and not r["method"].startswith("native")]
    within = [r for r in patch if r["score"] >= floor - 1e-9]
    best = max(within, key=lambda r: r["speedup"], default=None)
    fewer = max(
        (r for r in rows if r["method"].startswith("native ") and r["score"] >= floor - 1e-9),
        key=lambda r: r["speedup"],
        default=None,
    )
    print(f"\nnative score {rows[0]['score']:.3f}; within {args.band} of it:")
    if best:
        print(f"  fastest fixed patch schedule: {best['method']}  {best['speedup']:.2f}x at {best['score']:.3f}")
    else:
        print("  no fixed patch schedule")
    if fewer:
        print(f"  fastest fewer-steps native:   {fewer['method']}  {fewer['speedup']:.2f}x at {fewer['score']:.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                dict(
                    steps=steps,
                    step_ms=step_ms,
                    cost={f"{i},{k}": v for (i, k), v in cost.items()},
                    rows=rows,
                ),
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
