"""Can the tiny FLUX learn a larger image, where coarse patches cost less quality? A fine-tune at another size.

    python benchmarks/hires_finetune.py -o build/ft512 [--size 512] [--steps 1000] [--batch 8] [--examples 3000]
                                        [--adapter-steps 400] [--adapter-prompts 128] [--shifted]
                                        [--model FOLDER]

At 256x256 a 4p token of the tiny FLUX covers 64x64 pixels, more than its shapes (36 pixels), and every patch
schedule with more than half its steps coarse loses quality (docs/measurements.md). At 512x512 a 2p token covers
32x32 pixels of shapes 72 pixels wide, as a 1p token does at 256, which is the regime the paper's premise needs.
The shipped model draws only the background at 512 (it never saw that size), so this script fine-tunes it there.

It copies ``--model`` (default: the shipped tiny FLUX) into ``OUT/model`` and runs ``ddit-recipe``'s stages from
the latents on, at ``--size``: ``--examples`` scenes of the shapes data set rendered at that size and encoded by the
model's VAE, ``--steps`` of flow matching from the model's weights (the recipe's fine-tune phase: lr 3e-4, 10% empty
captions, bfloat16 autocast and torch.compile where the CPU has them), then the DDiT adapters trained at that size.
``--shifted`` draws the training sigmas around the profile's resolution shift instead of 0.5. Like the recipe, a
stage whose output exists is skipped, so a second run with the same ``-o`` resumes; continue a fine-tune by pointing
``--model`` at an earlier run's ``OUT/model`` with a new ``-o``.

Then: ``ddit-export flux --model OUT/model --profile flux-tiny --adapters OUT/adapters/adapters.safetensors -o E``
and ``ddit-bench E --height 512 --width 512``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from ddit_export.recipe import FluxRecipe, RecipeSteps
from ddit_export.tiny import PACKAGE_MODELS
from ddit_profiles import DDiTError, get_profile


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", required=True, type=Path, help="working folder (resumable)")
    ap.add_argument("--model", type=Path, default=PACKAGE_MODELS / "flux", help="the model folder to start from")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=1000, help="fine-tune steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--examples", type=int, default=3000, help="training scenes rendered at --size")
    ap.add_argument("--adapter-steps", type=int, default=400, help="adapter steps per coarse size")
    ap.add_argument("--adapter-prompts", type=int, default=128, help="captions the adapters' teacher samples use")
    ap.add_argument("--shifted", action="store_true", help="train at the profile's shifted sigmas for --size")
    args = ap.parse_args(argv)
    try:
        base = get_profile("flux-tiny")
        base.check_resolution(args.size, args.size, base.patch_factors)
        if min(args.steps, args.batch, args.examples, args.adapter_steps, args.adapter_prompts) < 1:
            raise DDiTError("--steps, --batch, --examples, --adapter-steps and --adapter-prompts must be at least 1")
        for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            if not (args.model / part).is_dir():
                raise DDiTError(f"{args.model} has no {part}/ folder: point --model at a tiny FLUX model folder")
        spec = replace(base, opt_size=(args.size, args.size))
        steps = replace(
            RecipeSteps.fast(),
            examples=args.examples,
            transformer_batch=args.batch,
            finetune_steps=args.steps,
            adapter_steps=args.adapter_steps,
            adapter_prompts=min(args.adapter_prompts, args.examples),
            shifted_sigmas=args.shifted,
        )
        model = args.output / "model"
        if not model.is_dir():
            args.output.mkdir(parents=True, exist_ok=True)
            tmp = args.output / ".model.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(args.model, tmp, ignore=shutil.ignore_patterns("adapters.safetensors", "recipe.json"))
            tmp.rename(model)
        FluxRecipe(spec, args.output, steps).run()
    except DDiTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
