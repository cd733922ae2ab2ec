"""Can the tiny FLUX learn a larger image, where coarse patches cost less quality? A fine-tune at another size.

    python benchmarks/hires_finetune.py -o build/ft512 [--size 512] [--steps 1000] [--batch 8] [--lr 3e-4]
                                        [--examples 3000] [--adapter-steps 400] [--adapter-prompts 128] [--shifted]
                                        [--model FOLDER] [--latents-from FOLDER]
                                        [--mix-size 256 [--mix-every 3] [--mix-examples 3000]]

At 256x256 a 4p token of the tiny FLUX covers 64x64 pixels, more than its shapes (36 pixels), and every patch
schedule with more than half its steps coarse loses quality (docs/measurements.md). At 512x512 a 2p token covers
32x32 pixels of shapes 72 pixels wide, as a 1p token does at 256, which is the regime the paper's premise needs.
With absolute RoPE positions the shipped model draws only the background at 512 (it never saw positions past 16
tokens a side), so this script fine-tunes it there. Since 2026-12-07 the ``flux-tiny`` profile interpolates the
positions of a larger image onto 16 (``rope_reference``), so a fine-tune starts from a model that already draws
shapes at 512, and one that mixes in 256 sees the same span of positions at both sizes; the runs before that
(``ft512`` to ``ft512f`` in docs/measurements.md) used absolute positions.

It copies ``--model`` (default: the shipped tiny FLUX, which since 2026-12-07 is this script's own 512
fine-tune; start from ``ddit-recipe flux --fast``'s ``OUT/model`` to rebuild it) into ``OUT/model`` and runs
``ddit-recipe``'s stages from the latents on, at ``--size``: ``--examples`` scenes of the shapes data set
rendered at that size and encoded by the model's VAE, ``--steps`` of flow matching from the model's weights (the
recipe's fine-tune phase: lr 3e-4, 10% empty captions, bfloat16 autocast and torch.compile where the CPU has them),
then the DDiT adapters trained at that size.
``--shifted`` draws the training sigmas around the profile's resolution shift instead of 0.5. Like the recipe, a
stage whose output exists is skipped, so a second run with the same ``-o`` resumes; continue a fine-tune by pointing
``--model`` at an earlier run's ``OUT/model`` with a new ``-o``, and ``--latents-from`` at that run's folder to reuse
its encoded scenes.

A fine-tune at 512 alone loses 256 (the 6200-step model scores 0.556 there on 100 held-out captions, the recipe's
model 0.802). ``--mix-size 256`` keeps both: every ``--mix-every``-th step trains on ``--mix-examples`` other scenes
rendered at that size (encoded once into ``OUT/latents-256.safetensors``), at that size's sigma shift.

Then: ``ddit-export flux --model OUT/model --profile flux-tiny --adapters OUT/adapters/adapters.safetensors -o E``
and ``ddit-bench E --height 512 --width 512``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ddit_export.recipe import FluxRecipe, RecipeSteps
from ddit_export.tiny import PACKAGE_MODELS
from ddit_profiles import DDiTError, get_profile

MIX_SEED = 200_000  # the mixed size's scenes: seeds 200 000 + i, apart from the main size's (0 + i) and held-out


class MixedSizeRecipe(FluxRecipe):
    """The FLUX recipe, with every ``mix_every``-th training step drawn from scenes at a second size ``mix_size``."""

    def __init__(self, *args, mix_size: int = 0, mix_every: int = 3, mix_examples: int = 3000, **kw):
        super().__init__(*args, **kw)
        self.mix_size, self.mix_every, self.mix_examples = mix_size, mix_every, mix_examples

    @torch.no_grad()
    def latents(self, parts: dict) -> dict:
        """The main size's data, and with ``mix_size``: ``latent_mix`` [M, C, h, w], its rows of ``t5`` and
        ``pooled`` appended after the main size's N (so row ``N + j`` conditions ``latent_mix[j]``)."""
        data = super().latents(parts)
        if not self.mix_size:
            return data
        path = self.out / f"latents-{self.mix_size}.safetensors"
        if path.is_file():
            mix = load_file(str(path))
        else:
            seeds = [MIX_SEED + i for i in range(self.mix_examples)]
            latent, captions = self.encode_scenes(parts["vae"], seeds, self.mix_size)
            t5, pooled = self._encode_text(parts, captions)
            mix = {"latent": latent, "t5": t5, "pooled": pooled}
            tmp = path.with_name(f".{path.name}.partial")
            save_file(mix, str(tmp))
            tmp.rename(path)
            (self.out / f"captions-{self.mix_size}.json").write_text(json.dumps(captions))
        data["latent_mix"] = mix["latent"]
        data["t5"] = torch.cat([data["t5"], mix["t5"]])
        data["pooled"] = torch.cat([data["pooled"], mix["pooled"]])
        return data

    def _draw(self, data: dict, gen: torch.Generator, step: int, mu: float):
        if "latent_mix" not in data or step % self.mix_every != self.mix_every - 1:
            return super()._draw(data, gen, step, mu)
        n, m = data["latent"].shape[0], data["latent_mix"].shape[0]
        j = torch.randint(0, m, (self.steps.transformer_batch,), generator=gen)
        if self.steps.shifted_sigmas:
            mu = self.spec.shift.mu(self.spec.image_seq_len(self.mix_size, self.mix_size))
        return j + n, data["latent_mix"][j], mu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", required=True, type=Path, help="working folder (resumable)")
    ap.add_argument("--model", type=Path, default=PACKAGE_MODELS / "flux", help="the model folder to start from")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=1000, help="fine-tune steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=RecipeSteps.finetune_lr, help="the fine-tune's peak learning rate")
    ap.add_argument("--examples", type=int, default=3000, help="training scenes rendered at --size")
    ap.add_argument("--adapter-steps", type=int, default=400, help="adapter steps per coarse size")
    ap.add_argument("--adapter-prompts", type=int, default=128, help="captions the adapters' teacher samples use")
    ap.add_argument("--shifted", action="store_true", help="train at the profile's shifted sigmas for --size")
    ap.add_argument("--latents-from", type=Path, help="an earlier run's folder whose encoded scenes to reuse")
    ap.add_argument("--mix-size", type=int, default=0, help="a second image side to keep training at (0: none)")
    ap.add_argument("--mix-every", type=int, default=3, help="every N-th fine-tune step is at --mix-size")
    ap.add_argument("--mix-examples", type=int, default=3000, help="scenes rendered at --mix-size")
    args = ap.parse_args(argv)
    try:
        base = get_profile("flux-tiny")
        base.check_resolution(args.size, args.size, base.patch_factors)
        if min(args.steps, args.batch, args.examples, args.adapter_steps, args.adapter_prompts) < 1:
            raise DDiTError("--steps, --batch, --examples, --adapter-steps and --adapter-prompts must be at least 1")
        if args.adapter_prompts < 2:  # the adapters' trainer holds one out: refuse now, not after the fine-tune
            raise DDiTError("--adapter-prompts must be at least 2 (one is held out to evaluate the adapters)")
        if not args.lr > 0:
            raise DDiTError(f"--lr must be positive, not {args.lr}")
        if args.mix_size:
            base.check_resolution(args.mix_size, args.mix_size, base.patch_factors)
            if args.mix_every < 2 or args.mix_examples < 1:
                raise DDiTError("--mix-every must be at least 2 and --mix-examples at least 1")
        if args.latents_from is not None:
            for name in ("latents.safetensors", "captions.json"):
                if not (args.latents_from / name).is_file():
                    raise DDiTError(f"{args.latents_from} has no {name}: point --latents-from at an earlier run's -o")
        for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            if not (args.model / part).is_dir():
                raise DDiTError(f"{args.model} has no {part}/ folder: point --model at a tiny FLUX model folder")
        spec = replace(base, opt_size=(args.size, args.size), recipe_size=args.size)
        steps = replace(
            RecipeSteps.fast(),
            examples=args.examples,
            transformer_batch=args.batch,
            finetune_steps=args.steps,
            finetune_lr=args.lr,
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
        if args.latents_from is not None and not (args.output / "latents.safetensors").is_file():
            shutil.copy2(args.latents_from / "captions.json", args.output / "captions.json")
            shutil.copy2(args.latents_from / "latents.safetensors", args.output / ".latents.partial")
            (args.output / ".latents.partial").rename(args.output / "latents.safetensors")
        if args.mix_size:
            torch._dynamo.config.automatic_dynamic_shapes = False  # one static graph per size, not a dynamic one
        mix = dict(mix_size=args.mix_size, mix_every=args.mix_every, mix_examples=args.mix_examples)
        MixedSizeRecipe(spec, args.output, steps, **mix).run()
    except DDiTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
