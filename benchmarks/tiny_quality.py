"""Quality of an embedded tiny model (FLUX or Wan), and of DDiT on it, measured side by side in one run.

    python benchmarks/tiny_quality.py ENGINES_DIR [--captions 100] [--per-kind 50] [--steps 20] [--tau T] [--rho R]
        [--sizes 1,2] [--offset N] [--height H --width W] [--json F]

For held-out captions (seeds never used in training) it generates the native fixed schedule and DDiT's schedule
from the same seeds, scores both with the shapes evaluator (per frame for Wan: ``evaluate_frames``, which adds
the motion score), and reports SSIM/PSNR of DDiT against native (mean over frames for video) and the mean fraction
of coarse steps. Then it compares the coarse fraction of simple and detailed captions.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

from ddit_export.bench import HELD_OUT_SEED, example, frames_of, writable_json, write_json
from ddit_export.quality import psnr, ssim
from ddit_runtime.manifest import load_manifest
from ddit_runtime.pipeline import FluxRuntime
from ddit_runtime.wan_pipeline import WanRuntime


def _mean(xs):
    return statistics.fmean(xs) if xs else float("nan")


def compare(
    runtime,
    seeds: list[int],
    simple: bool | None,
    steps: int,
    tau: float | None,
    rho: float | None = None,
    shape: dict | None = None,
) -> dict:
    """``shape``: ``height``/``width`` for ``generate`` (default: the profile's)."""
    shape = shape or {}
    rows = []
    for seed in seeds:
        prompt = example(runtime.spec.family, seed, simple)
        caption, score = prompt.text, prompt.score
        native = runtime.generate(caption, steps=steps, seed=seed, schedule=[1] * steps, progress=False, **shape)
        ddit = runtime.generate(caption, steps=steps, seed=seed, tau=tau, rho=rho, progress=False, **shape)
        pairs = list(zip(frames_of(ddit.image), frames_of(native.image), strict=True))
        rows.append(
            dict(
                caption=caption,
                native=score(native.image),
                ddit=score(ddit.image),
                ssim=_mean([ssim(a, b) for a, b in pairs]),
                psnr=_mean([psnr(a, b) for a, b in pairs]),
                coarse=sum(k > 1 for k in ddit.schedule) / steps,
                schedule=ddit.schedule,
                native_s=native.total_s,
                ddit_s=ddit.total_s,
            )
        )
        if prompt.frame_scores is not None:  # Wan: per frame
            rows[-1]["native_frames"] = prompt.frame_scores(native.image)
            rows[-1]["ddit_frames"] = prompt.frame_scores(ddit.image)
    attrs = [k for k in rows[0]["native"] if k != "score"]
    return dict(
        n=len(rows),
        native_score=_mean([r["native"]["score"] for r in rows]),
        ddit_score=_mean([r["ddit"]["score"] for r in rows]),
        native_attributes={a: _mean([r["native"][a] for r in rows]) for a in attrs},
        ddit_attributes={a: _mean([r["ddit"][a] for r in rows]) for a in attrs},
        ssim=_mean([r["ssim"] for r in rows]),
        psnr=_mean([r["psnr"] for r in rows if r["psnr"] != float("inf")]),
        coarse_fraction=_mean([r["coarse"] for r in rows]),
        time_ratio=sum(r["native_s"] for r in rows) / sum(r["ddit_s"] for r in rows),
        rows=rows,
    ) | _per_frame(rows)


def _per_frame(rows: list[dict]) -> dict:
    """Wan: the mean score of each frame index over the captions, native and DDiT."""
    if "native_frames" not in rows[0]:
        return {}
    return {
        f"{name}_per_frame": [_mean(list(col)) for col in zip(*(r[f"{name}_frames"] for r in rows), strict=True)]
        for name in ("native", "ddit")
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines")
    ap.add_argument("--captions", type=int, default=100)
    ap.add_argument("--per-kind", type=int, default=50)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--tau", type=float, default=None)
    ap.add_argument("--rho", type=float, default=None, help="the scheduler's quantile (default: the profile's)")
    ap.add_argument("--sizes", default=None, help="load only these exported patch sizes, e.g. 1,2 (default: all)")
    ap.add_argument("--offset", type=int, default=0, help="shift the held-out seeds (e.g. for a calibration set)")
    ap.add_argument("--height", type=int, default=None, help="image height (default: the profile's)")
    ap.add_argument("--width", type=int, default=None, help="image width (default: the profile's)")
    ap.add_argument("--json", type=writable_json, default=None)
    args = ap.parse_args(argv)
    started = time.time()
    family = load_manifest(args.engines, verify=False).spec.family
    sizes = None if args.sizes is None else [int(k) for k in args.sizes.split(",")]
    runtime = (WanRuntime if family == "wan" else FluxRuntime)(args.engines, provider="cpu", sizes=sizes)
    steps = args.steps or runtime.spec.scheduler.steps
    base = HELD_OUT_SEED + args.offset
    shape = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    run = functools.partial(compare, runtime, steps=steps, tau=args.tau, rho=args.rho, shape=shape)
    overall = run(list(range(base, base + args.captions)), None)
    simple = run(list(range(base + 10_000, base + 10_000 + args.per_kind)), True)
    detailed = run(list(range(base + 20_000, base + 20_000 + args.per_kind)), False)
    tau = runtime.spec.scheduler.tau if args.tau is None else args.tau
    report = dict(
        engines=args.engines,
        steps=steps,
        tau=tau,
        rho=runtime.spec.scheduler.rho if args.rho is None else args.rho,
        seconds=round(time.time() - started, 1),
        overall=overall,
        simple_coarse_fraction=simple["coarse_fraction"],
        detailed_coarse_fraction=detailed["coarse_fraction"],
        simple=simple,
        detailed=detailed,
    )
    size = f"{args.height or runtime.spec.opt_size[0]}x{args.width or runtime.spec.opt_size[1]}"
    print(f"held-out captions: {overall['n']}, {size}, {steps} steps, tau {tau}, rho {report['rho']}")
    print("| schedule | evaluator score | " + " | ".join(overall["native_attributes"]) + " |")
    print("|---|---|" + "---|" * len(overall["native_attributes"]))
    for name in ("native", "ddit"):
        attrs = overall[f"{name}_attributes"]
        print(f"| {name} | {overall[f'{name}_score']:.3f} | " + " | ".join(f"{v:.2f}" for v in attrs.values()) + " |")
    print(
        f"DDiT vs native: SSIM {overall['ssim']:.3f}, PSNR {overall['psnr']:.1f} dB, "
        f"coarse steps {overall['coarse_fraction']:.1%}, wall-clock ratio {overall['time_ratio']:.2f}x"
    )
    if "native_per_frame" in overall:
        print("| per frame | " + " | ".join(str(i) for i in range(len(overall["native_per_frame"]))) + " |")
        print("|---|" + "---|" * len(overall["native_per_frame"]))
        for name in ("native", "ddit"):
            print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in overall[f"{name}_per_frame"]) + " |")
    print(
        f"coarse fraction: simple captions {report['simple_coarse_fraction']:.1%} "
        f"({simple['n']}), detailed captions {report['detailed_coarse_fraction']:.1%} ({detailed['n']})"
    )
    if args.json:
        write_json(report, args.json)  # atomic: a temporary file, then a rename
    return 0


if __name__ == "__main__":
    sys.exit(main())
