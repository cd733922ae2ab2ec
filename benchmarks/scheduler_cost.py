"""The patch scheduler's cost per step (observe a latent + pick the next factor, full history), per latent shape.

python benchmarks/scheduler_cost.py [--reference OLD_SCHEDULER.py] [--reps 500]

With --reference (a scheduler.py from another revision, e.g. ``git show REV:runtime/scheduler.py > old.py``) both
run interleaved on the same latents, and the factors they pick on random trajectories are compared.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics

import torch

from ddit_export.bench import scheduler_step_ms
from ddit_runtime.scheduler import PatchScheduler

SHAPES = {  # name -> latent [B, C, (F,) H, W]
    "tiny FLUX 256x256": (1, 16, 32, 32),
    "FLUX 1024x1024": (1, 16, 128, 128),
    "tiny Wan 9 frames 256x256": (1, 16, 3, 32, 32),
    "Wan 81 frames 512x896": (1, 16, 21, 64, 112),
}


def _load(path: str):
    spec = importlib.util.spec_from_file_location("reference_scheduler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PatchScheduler


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default=None, help="another scheduler.py to time side by side")
    ap.add_argument("--reps", type=int, default=500)
    ap.add_argument("--tau", type=float, default=0.002)
    ap.add_argument("--rho", type=float, default=0.7)
    args = ap.parse_args(argv)
    kinds = {"this": PatchScheduler} | ({"reference": _load(args.reference)} if args.reference else {})
    header = "| latent | shape | " + " | ".join(f"{k} ms" for k in kinds)
    print(header + (" | speedup | same factor |" if args.reference else " |"))
    print("|---" * (2 + len(kinds) + (2 if args.reference else 0)) + "|")
    gen = torch.Generator().manual_seed(0)
    for name, shape in SHAPES.items():
        latent = torch.randn(shape, generator=gen)
        made = {k: cls((1, 2, 4), 2, args.tau, args.rho, 0) for k, cls in kinds.items()}
        for s in made.values():
            for _ in range(4):
                s.observe(latent)
        ms = {k: [] for k in kinds}
        for _ in range(5):  # interleaved rounds: machine noise hits every kind alike
            for k, s in made.items():
                ms[k].append(scheduler_step_ms(s, latent, args.reps // 5))
        row = f"| {name} | {list(shape)} | " + " | ".join(f"{statistics.median(v):.3f}" for v in ms.values())
        if args.reference:
            agree = 0
            for trial in range(50):  # trajectories smooth to rough, so every factor is picked sometimes
                scale = 10 ** (-4 + 3 * trial / 49)
                for s in made.values():
                    s.reset()
                for i in range(4):
                    z = torch.randn(shape, generator=gen) * scale + i
                    for s in made.values():
                        s.observe(z)
                agree += made["this"].next_factor() == made["reference"].next_factor()
            speedup = statistics.median(ms["reference"]) / statistics.median(ms["this"])
            row += f" | {speedup:.1f}x | {agree}/50"
        print(row + " |")


if __name__ == "__main__":
    main()
