"""ONNX Runtime's CPU worker spinning, by policy: whole runtime steps per patch size, DDiT end to end and the
scheduler's cost in the loop, the policies side by side in one run.

    python benchmarks/cpu_spinning.py ENGINES_DIR [--prompts 4] [--repeats 3] [--policies during-run,off]
    python benchmarks/cpu_spinning.py ENGINES_DIR --bare 4      # real widths: bare calls only

One runtime per policy (``ddit_runtime.engine.SPINNING``; the sessions read it when they are created), so the
engines are loaded once per policy: meant for the tiny models, whose engines fit twice. For each prompt and repeat,
interleaved, every policy runs each size as a fixed schedule, then a DDiT generation (the manifest's tau and rho),
then DDiT's schedule again as a fixed one (the same engine calls without the scheduler). The first repeat is a
warm-up and is not counted, nor is the first step of a generation (it pays for its buffers). "scheduler in loop"
is the median native step of the DDiT runs after a native step (the scheduler ran before it) less the median of the
same steps in the forced runs.

``--bare N`` times only the transformer calls, at the profile's opt shape and the runtime's call batch: one size at
a time, that size's graph opened once per policy and the policies' calls alternated N times (after one warm-up
call each). Two copies of one graph fit where two whole runtimes do not (``flux-dev-shape``: 2.1 GB a graph).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ddit_runtime.engine as engine
from ddit_export.bench import bare_feeds, bare_outputs, builtin_prompts, call_batch
from ddit_runtime import runtime_class
from ddit_runtime.manifest import load_manifest
from ddit_runtime.scheduler import HISTORY


def with_policy(policy: str, make):
    """``make()`` with ``policy`` as the spinning policy of the sessions it creates; the setting is restored after."""
    before, engine.CPU_SPINNING = engine.CPU_SPINNING, policy
    try:
        return make()
    finally:
        engine.CPU_SPINNING = before


def bare(folder: str, policies: list[str], calls: int, sizes: list[int] | None) -> None:
    """Bare transformer calls per size, the policies alternated on one graph opened once per policy."""
    manifest = load_manifest(folder)
    spec, cpu = manifest.spec, torch.device("cpu")
    height, width = spec.opt_size
    batch = call_batch(spec)
    feeds = bare_feeds(spec, height, width, batch, cpu)
    print(f"{spec.name}: bare calls at {height}x{width}, batch {batch}, median ms of {calls} per policy")
    print("| size | " + " | ".join(policies) + f" | {policies[-1]} / {policies[0]} |")
    print("|---|" + "---|" * (len(policies) + 1))
    for k in sizes or manifest.sizes:
        path = manifest.transformer_path(k)
        sessions = {p: with_policy(p, lambda path=path: engine.OrtEngine(path, cpu)) for p in policies}
        outputs = bare_outputs(spec, sessions[policies[0]], k, feeds, height, width)
        times = {p: [] for p in policies}
        for i in range(calls + 1):
            for p, session in sessions.items():
                t0 = time.perf_counter()
                session.run(feeds, outputs)
                if i:  # the first call of each is a warm-up
                    times[p].append((time.perf_counter() - t0) * 1000)
        med = {p: statistics.median(t) for p, t in times.items()}
        cells = " | ".join(f"{med[p]:.1f} ({', '.join(f'{t:.0f}' for t in times[p])})" for p in policies)
        print(f"| {k}p | {cells} | {med[policies[-1]] / med[policies[0]]:.2f} |")
        del sessions


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policies", default="during-run,off", help=f"comma list of {', '.join(engine.SPINNING)}")
    ap.add_argument("--bare", type=int, default=0, help="time N bare transformer calls per size and policy instead")
    ap.add_argument("--sizes", default=None, help="--bare: the sizes to time, e.g. 1,4 (default: all)")
    args = ap.parse_args(argv)
    policies = args.policies.split(",")
    unknown = [p for p in policies if p not in engine.SPINNING]
    if unknown:
        ap.error(f"unknown policy {unknown[0]}: choose from {', '.join(engine.SPINNING)}")
    if args.bare:
        bare(args.engines, policies, args.bare, [int(k) for k in args.sizes.split(",")] if args.sizes else None)
        return
    runtimes = {p: with_policy(p, lambda: runtime_class(args.engines)(args.engines, provider="cpu")) for p in policies}
    first = next(iter(runtimes.values()))
    sizes, steps = first.sizes, first.spec.scheduler.steps
    prompts = builtin_prompts(first.spec.family, args.prompts)
    step = {(p, k): [] for p in policies for k in sizes}
    total = {(p, m): [] for p in policies for m in ("native", "ddit")}
    after_1p = {(p, m): [] for p in policies for m in ("ddit", "forced")}
    coarse = {p: [] for p in policies}
    for rep in range(args.repeats):
        for i, prompt in enumerate(prompts):
            for p, runtime in runtimes.items():
                for k in sizes:
                    fixed = runtime.generate(prompt.text, seed=i, schedule=[k] * steps, progress=False)
                    if rep:
                        step[p, k] += fixed.step_ms[1:]
                        if k == 1:
                            total[p, "native"].append(fixed.total_s)
                ddit = runtime.generate(prompt.text, seed=i, progress=False)
                forced = runtime.generate(prompt.text, seed=i, schedule=ddit.schedule, progress=False)
                if not rep:
                    continue
                total[p, "ddit"].append(ddit.total_s)
                coarse[p].append(sum(k > 1 for k in ddit.schedule) / steps)
                for m, run in (("ddit", ddit), ("forced", forced)):
                    after_1p[p, m] += [
                        ms
                        for s, ms in enumerate(run.step_ms)
                        if s >= HISTORY and run.schedule[s] == 1 and run.schedule[s - 1] == 1
                    ]
    med = {key: statistics.median(v) for key, v in step.items()}
    print(f"{first.spec.name}: median step ms, {args.prompts} prompts x {args.repeats - 1} repeats, {steps} steps")
    head = " | ".join(f"{k}p ms | {k}p ratio" for k in sizes)
    print(f"| spinning | {head} | native s | DDiT s | DDiT speedup | coarse | scheduler in loop |")
    print("|---|" + "---|" * (2 * len(sizes) + 5))
    for p in policies:
        cells = " | ".join(f"{med[p, k]:.2f} | {med[p, 1] / med[p, k]:.2f}x" for k in sizes)
        native, ddit = (statistics.median(total[p, m]) for m in ("native", "ddit"))
        ddit_1p, forced_1p = after_1p[p, "ddit"], after_1p[p, "forced"]
        extra = statistics.median(ddit_1p) - statistics.median(forced_1p) if ddit_1p else float("nan")
        print(
            f"| {p} | {cells} | {native:.3f} | {ddit:.3f} | {native / ddit:.2f}x | {statistics.mean(coarse[p]):.0%} "
            f"| {extra:+.2f} ms ({100 * extra / med[p, 1]:+.1f}%, {len(ddit_1p)} steps) |"
        )
    for k in sizes[1:]:
        a, b = policies[0], policies[-1]
        print(f"{k}p step, {b} / {a}: {med[b, k] / med[a, k]:.2f}", end="; ")
    if len(policies) > 1:
        print(f"1p step, {policies[-1]} / {policies[0]}: {med[policies[-1], 1] / med[policies[0], 1]:.2f}")


if __name__ == "__main__":
    main()
