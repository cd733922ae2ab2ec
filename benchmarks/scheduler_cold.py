"""Why the scheduler costs more in the denoising loop than timed alone: what runs before it, not where it runs.

python benchmarks/scheduler_cold.py [ENGINES_DIR] [--reps 30] [--mib 0.25,1,4,8,16,32]

Times ``PatchScheduler.next_factor`` (full history, a tiny-FLUX latent [1, 16, 32, 32], the loop's one torch thread
and ``torch.inference_mode``) right after each of these, interleaved, and prints the median of each:
- nothing (the call before it was the same ``next_factor``: everything it touches is in the caches);
- 5 ms asleep, and 5 ms of a pure-Python busy loop (time passing, the core idle or busy on other code);
- writing a buffer of N MiB over and over, 160 MiB in all, with Python's own ``bytearray`` copy (C ``memcpy``: no
  torch, no ONNX Runtime), for each N of ``--mib``: the caches then hold the last N MiB of that buffer;
- with ENGINES_DIR: one bare call of each transformer engine, on the runtime's bound buffers, as in the loop.

If the cost follows the size of the data written before it, what the loop pays is torch's call path (its code and
data) fetched back from memory after the engine call has streamed its weights through the caches.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ddit_runtime.scheduler import PatchScheduler


def _timer(scheduler: PatchScheduler):
    def once() -> float:
        t0 = time.perf_counter()
        scheduler.next_factor()
        return (time.perf_counter() - t0) * 1000

    return once


def _writer(mib: float, total_mib: float = 160):
    """A function that writes ``mib`` MiB over and over, ``total_mib`` in all, without torch."""
    n = max(1, int(mib * 2**20))
    src, dst = bytearray(b"\x01") * n, bytearray(n)
    rounds = max(1, round(total_mib / mib))

    def write() -> None:
        for _ in range(rounds):
            dst[:] = src

    return write


def _busy(seconds: float) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pass


def _engine_calls(engines: str) -> dict:
    """One bound bare call per transformer size of ``engines``, as ``ddit-bench`` times them."""
    from ddit_export.bench import Bench, bare_feeds, bare_outputs, call_batch
    from ddit_runtime import runtime_class

    runtime = runtime_class(engines)(engines, provider="cpu")
    bench = Bench(runtime, [], seeds=1, steps=1, progress=False)
    feeds = bare_feeds(runtime.spec, bench.height, bench.width, call_batch(runtime.spec), runtime.device, bench.frames)
    calls = {}
    for k, engine in runtime.engines.items():
        outputs = bare_outputs(runtime.spec, engine, k, feeds, bench.height, bench.width)
        engine.run(feeds, outputs)  # warm

        def call(engine=engine, outputs=outputs) -> None:
            engine.run(feeds, outputs)

        calls[f"one {k}p engine call"] = call
    return calls


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines", nargs="?", default=None, help="an engines folder: also time after its engine calls")
    ap.add_argument("--reps", type=int, default=30, help="timings per variant (the first 3 are dropped)")
    ap.add_argument("--mib", default="0.25,1,4,8,16,32", help="buffer sizes to write before, comma-separated")
    args = ap.parse_args(argv)

    before = {"nothing": lambda: None, "5 ms asleep": lambda: time.sleep(0.005), "5 ms busy": lambda: _busy(0.005)}
    for mib in (float(m) for m in args.mib.split(",")):
        before[f"writing {mib:g} MiB (160 MiB in all)"] = _writer(mib)
    if args.engines:
        before.update(_engine_calls(args.engines))

    torch.set_num_threads(1)  # the loop's own ops run on one thread (runtime/engine.py LOOP_THREADS)
    scheduler = PatchScheduler([1, 2, 4], 2, 0.002, 0.7, 3)
    for _ in range(4):
        scheduler.observe(torch.randn(1, 16, 32, 32))
    scheduler.observed = 10
    time_it = _timer(scheduler)
    times: dict[str, list[float]] = {name: [] for name in before}
    with torch.inference_mode():
        for _ in range(30):
            time_it()
        for _ in range(args.reps):
            for name, run in before.items():  # interleaved: drift hits every variant alike
                run()
                times[name].append(time_it())
    print("| next_factor right after | median ms |")
    print("|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts[3:]):.3f} |")


if __name__ == "__main__":
    main()
