"""Command-line entry points: ``ddit-export`` and ``ddit-run``. Installed as the module ``ddit_cli``.

Bad input ends in one line on stderr and exit status 2; the runtime command never imports the exporter.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from ddit_profiles import PRECISIONS, PROFILES, DDiTError


def _one_line_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DDiTError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)

    return wrapper


def _parse_sizes(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise DDiTError(f"cannot parse --sizes '{text}': give comma-separated powers of two such as 1,2,4") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("family", metavar="FAMILY")
@click.option(
    "--sizes",
    default="1,2,4",
    show_default=True,
    help="Patch factors to export, comma-separated: 1 is the native patch, 2 and 4 run on 4x and 16x "
    "fewer image tokens.",
)
@click.option(
    "--model",
    default="tiny",
    show_default=True,
    help="'tiny' (the embedded model), 'random' (seeded random weights at the profile's configs, e.g. with "
    "--profile flux-dev-shape for real-width benchmarks), a local diffusers folder, or a hub id (read from the "
    "local cache; HF_HUB_OFFLINE=1 is honoured).",
)
@click.option(
    "--profile",
    "profile_name",
    default=None,
    help=f"Profile to check the checkpoint against and size the graphs by (default: the family's, or its "
    f"tiny variant for --model tiny). Known: {', '.join(PROFILES)}.",
)
@click.option(
    "--adapters",
    default=None,
    metavar="FILE",
    help="DDiT adapters (.safetensors from ddit-train); 'none' for the untrained PI-resize initialisation. "
    "Default: the shipped trained adapters for --model tiny, else none. The manifest says which.",
)
@click.option("-o", "--output", default="engines", show_default=True, help="Engines folder to create.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists (only once the export succeeded).")
@click.option(
    "--trt",
    is_flag=True,
    help="Also build a TensorRT engine per graph for this GPU (as ddit-build does after the export). Needs the "
    "[trt] extra and an NVIDIA GPU; checked before anything is exported.",
)
@click.option(
    "--opt-level",
    type=click.IntRange(0, 5),
    default=None,
    help="With --trt: TensorRT builder optimisation level, 0-5 (default: TensorRT's, 3).",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="fp32",
    show_default=True,
    help="Type of the transformer graphs (and TeaCache probes): their weights and arithmetic, with float32 "
    "inputs and outputs, so a strongly typed TensorRT build runs them so. fp16 is checked against float32 torch "
    "here; bf16 has no ONNX Runtime CPU kernels, so its check is left to a GPU. fp8 (FLUX): FP8 E4M3 weights and "
    "activations on the blocks' Linear layers as Q/DQ in the graph, scales calibrated on the model's own "
    "trajectory, fp16 elsewhere; checked here, runs as FP8 under TensorRT on compute capability 8.9+ (probes "
    "fp16). Text encoders and VAE stay fp32.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_one_line_errors
def export_main(family, sizes, model, profile_name, adapters, output, force, trt, opt_level, precision, quiet):
    """Export FAMILY (flux or wan) to one ONNX graph per patch size, plus text encoders, VAE decoder, tokenizers.

    Every graph is checked against torch with ONNX Runtime before the folder is renamed into place.

    \b
    Example:
      ddit-export flux --sizes 1,2,4 --model tiny -o engines/
    """
    from ddit_profiles import get_profile, profile_for

    spec = get_profile(profile_name) if profile_name else profile_for(family, model)
    if spec.family != family:
        raise DDiTError(f"profile '{spec.name}' is for family '{spec.family}', not '{family}'")
    factors = spec.check_factors(_parse_sizes(sizes))
    if precision == "fp8" and spec.family != "flux":
        raise DDiTError("--precision fp8 is written for FLUX only: export Wan with --precision fp16 or bf16")
    if opt_level is not None and not trt:
        raise DDiTError("--opt-level applies to the TensorRT build: add --trt, or leave it out")
    if trt:
        from ddit_export.trt_build import check_fp8_target, detect_target

        # one line, before any export work, when TensorRT or a GPU is missing, or the GPU cannot run fp8
        check_fp8_target({"precision": precision}, detect_target())
    if family == "wan":  # heavy imports only once the arguments are sound
        from ddit_export.wan_export import export_wan as export
    else:
        from ddit_export.flux_export import export_flux as export
    _hush_loaders(quiet)

    manifest = export(
        model, spec, factors, output, adapters_path=adapters, force=force, progress=not quiet, precision=precision
    )
    errs = {f"k={k}": c["max_abs_error"] for k, c in manifest["components"]["transformer"].items()}
    parity = (
        f"max |onnx - torch| {', '.join(f'{k} {v:.2g}' for k, v in errs.items())}"
        if all(v is not None for v in errs.values())
        else "bf16 graphs not run here (ONNX Runtime's CPU provider has no bfloat16 kernels)"
    )
    click.echo(
        f"wrote {output}: sizes {manifest['sizes']}, {precision} transformers, "
        f"{manifest['source']['initialisation']}; {parity}",
        err=True,
    )
    if trt:
        _build_and_say(output, None, opt_level, None, force=False, quiet=quiet)


def _backend_options(fn):
    """``--backend`` (and ``--provider``, its older ONNX Runtime-only spelling, hidden)."""
    fn = click.option(
        "--provider",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default=None,
        hidden=True,
        help="Older name: cpu = --backend ort-cpu, cuda = --backend ort-cuda.",
    )(fn)
    return click.option(
        "--backend",
        type=click.Choice(["auto", "ort-cpu", "ort-cuda", "trt"]),
        default=None,
        help="What runs the engines. auto (the default) picks TensorRT when the folder has engines built for this "
        "GPU and TensorRT release (ddit-build), else ONNX Runtime CUDA (onnxruntime-gpu), else ONNX Runtime on the "
        "CPU, and says which and why.",
    )(fn)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("engines", metavar="ENGINES_DIR")
@click.option("--prompt", required=True, help="Text prompt.")
@click.option("-o", "--output", default=None, help="PNG (FLUX) or MP4 (Wan) to write [default: ddit.png / ddit.mp4].")
@click.option("--steps", type=int, default=None, help="Denoising steps (default: the manifest's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial noise.")
@click.option("--height", type=int, default=None, help="Height in pixels (default: the profile's opt size).")
@click.option("--width", type=int, default=None, help="Width in pixels (default: the profile's opt size).")
@click.option("--guidance", type=float, default=None, help="FLUX: embedded guidance (default: the manifest's).")
@click.option(
    "--true-cfg",
    type=float,
    default=None,
    help="FLUX: classifier-free guidance scale against --negative-prompt (default: the manifest's; the embedded "
    "tiny model uses 3, FLUX.1 profiles 1 = off). Above 1 each step runs the prompt and --negative-prompt (see --cfg).",
)
@click.option(
    "--tau",
    type=float,
    default=None,
    help="Scheduler threshold: the largest patch whose rho-quantile of per-patch std of the third "
    "difference is below tau is chosen. Larger is faster, smaller is finer (default: the tau ddit-bench --save-tau "
    "recorded for this shape, steps, --sizes and rho, else the manifest's).",
)
@click.option(
    "--rho",
    type=float,
    default=None,
    help="Quantile in [0, 1] of the per-patch stds (default: the manifest's: 0.7 for the tiny FLUX, the paper's 0.4 otherwise).",
)
@click.option(
    "--schedule",
    default="auto",
    show_default=True,
    help="'auto' (DDiT decides per step), a fixed factor such as 1 (the native baseline), or one factor "
    "per step such as 1,1,1,4,4,2,...",
)
@click.option(
    "--sizes",
    default=None,
    help="Patch sizes to load and let DDiT choose from, e.g. 1,2 to leave 4p out without re-exporting (default: "
    "every size in the folder). DDiT needs 1; only these engines are opened.",
)
@click.option(
    "--teacache",
    type=float,
    default=None,
    help="Also skip the transformer blocks on steps where TeaCache's rescaled signal change, accumulated, stays "
    "under this threshold (faster as it grows; FLUX 0.25 / 0.4 / 0.6, Wan 0.05 / 0.065 / 0.08, the tiny Wan at its "
    "20 steps 0.15 / 0.25 / 0.4; one accumulator "
    "per guidance pass; with polynomials ddit-bench --fit-teacache fitted for this shape, the thresholds it "
    "printed, e.g. 0.1-0.2). Composes with the patch schedule.",
)
@click.option(
    "--teacache-coefficients",
    default=None,
    help="TeaCache's rescaling polynomial for every patch size, highest power first, comma-separated, in place of "
    "the manifest's (FLUX.1-dev's or Wan 2.1 1.3B's published one, or the per-size ones ddit-bench --fit-teacache "
    "recorded for this shape). Needs --teacache.",
)
@click.option(
    "--teacache-switch",
    type=click.Choice(["recompute", "per-size"]),
    default="recompute",
    show_default=True,
    help="What a patch-size switch does to TeaCache: 'recompute' runs the blocks at every switch; 'per-size' keeps "
    "a residual, signal and sum per size and may reuse a size's residual from before the switch.",
)
@click.option("--frames", type=int, default=None, help="Wan: video frames, 4n+1 (default: the profile's).")
@click.option(
    "--negative-prompt",
    default=None,
    help="Negative prompt for classifier-free guidance (Wan: default the profile's; FLUX: default empty, used "
    "when --true-cfg is above 1).",
)
@click.option("--guidance-scale", type=float, default=None, help="Wan: classifier-free guidance scale (1 = off).")
@click.option(
    "--cfg",
    type=click.Choice(["batched", "two-pass"]),
    default="batched",
    show_default=True,
    help="With guidance (Wan's --guidance-scale, FLUX's --true-cfg above 1): run the two passes as one engine call "
    "on a batch of 2, or as two calls. Same images; batched is faster (tiny FLUX on this CPU: 1.10x per step at 1p, "
    "1.22x at 2p, 1.26x at 4p).",
)
@click.option("--frames-dir", default=None, help="Wan: write PNG frames into this folder instead of an MP4.")
@click.option("--fps", type=int, default=16, show_default=True, help="Wan: MP4 frame rate.")
@_backend_options
@click.option(
    "--cuda-graphs",
    is_flag=True,
    help="trt: capture a CUDA graph per (engine, shape) on first use and replay it after.",
)
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the engine files (sizes are still checked).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the schedule and timings on stdout.")
@_one_line_errors
def run_main(engines, prompt, output, steps, schedule, backend, provider, cuda_graphs, no_verify, as_json, **opts):
    """Generate from ENGINES_DIR (made by ddit-export), switching patch-size engines per step.

    FLUX engines write a PNG; Wan engines write an MP4 (or PNG frames with --frames-dir).

    \b
    Example:
      ddit-run engines/ --prompt "a red circle on a black background" -o out.png
    """
    from ddit_runtime.manifest import peek_family
    from ddit_runtime.scheduler import parse_schedule
    from ddit_runtime.text import check_prompt

    check_prompt(prompt)
    opts["teacache_coefficients"] = _teacache_coefficients(opts["teacache_coefficients"], opts["teacache"] is not None)
    sizes = None if opts["sizes"] is None else _parse_sizes(opts["sizes"])
    available = "exported" if sizes is None else "loaded (--sizes)"
    family = peek_family(engines)
    if family == "wan":
        load = dict(backend=backend, provider=provider, cuda_graphs=cuda_graphs, verify=not no_verify, sizes=sizes)
        runtime, result, path = _run_wan(engines, prompt, output, steps, schedule, load, as_json, opts, available)
    else:
        wan_only = [k for k in ("frames", "guidance_scale", "frames_dir") if opts[k] is not None]
        if wan_only:
            raise DDiTError(f"--{wan_only[0].replace('_', '-')} applies to Wan engines; '{engines}' holds FLUX ones")
        from ddit_runtime.image import check_png_path, save_png
        from ddit_runtime.pipeline import FluxRuntime

        output = check_png_path(output or "ddit.png")
        runtime = FluxRuntime(
            engines, backend=backend, provider=provider, cuda_graphs=cuda_graphs, verify=not no_verify, sizes=sizes
        )
        _say_backend(runtime, as_json)
        steps = runtime.spec.scheduler.steps if steps is None else steps
        fixed = parse_schedule(schedule, steps, runtime.sizes, available)
        keys = ("seed", "height", "width", "guidance", "true_cfg", "tau", "rho", "teacache", "teacache_switch", "cfg")
        keys += ("teacache_coefficients",)
        negative = {} if opts["negative_prompt"] is None else {"negative_prompt": opts["negative_prompt"]}
        result = runtime.generate(
            prompt, steps=steps, schedule=fixed, progress=not as_json, **{k: opts[k] for k in keys}, **negative
        )
        path = save_png(result.image, output, result.settings, result.schedule)
    _report(runtime, result, path, as_json)


def _run_wan(engines, prompt, output, steps, schedule, load, as_json, opts, available):
    from ddit_runtime.outputs import check_frames_dir
    from ddit_runtime.scheduler import parse_schedule
    from ddit_runtime.video import check_video_path, save_frames, save_mp4
    from ddit_runtime.wan_pipeline import WanRuntime

    for flux_only in ("guidance", "true_cfg"):
        if opts[flux_only] is not None:
            raise DDiTError(f"--{flux_only.replace('_', '-')} is FLUX's: use --guidance-scale for Wan engines")
    if opts["frames_dir"] is None:
        output = check_video_path(output or "ddit.mp4")
    else:
        check_frames_dir(opts["frames_dir"])
    runtime = WanRuntime(engines, **load)
    _say_backend(runtime, as_json)
    steps = runtime.spec.scheduler.steps if steps is None else steps
    fixed = parse_schedule(schedule, steps, runtime.sizes, available)
    keys = ("negative_prompt", "frames", "height", "width", "seed", "guidance_scale", "tau", "rho", "cfg")
    keys += ("teacache", "teacache_switch", "teacache_coefficients")
    result = runtime.generate(prompt, steps=steps, schedule=fixed, progress=not as_json, **{k: opts[k] for k in keys})
    settings = dict(result.settings, schedule=result.schedule)
    if opts["frames_dir"] is not None:
        path = save_frames(result.image, opts["frames_dir"], settings)
    else:
        path = save_mp4(result.image, output, settings, fps=opts["fps"])
    return runtime, result, path


def _teacache_coefficients(text: str | None, teacache_on: bool) -> tuple[float, ...] | None:
    """--teacache-coefficients -> the polynomial, or None for the manifest's; only with TeaCache on."""
    if text is None:
        return None
    if not teacache_on:
        raise DDiTError("--teacache-coefficients rescales TeaCache's signal: add --teacache THRESH (e.g. 0.4)")
    from ddit_runtime.teacache import parse_coefficients

    return parse_coefficients(text)


def _say_backend(runtime, as_json: bool) -> None:
    """At load, on stderr: which backend runs the engines and why, and the weight memory they hold."""
    if not as_json:
        click.echo(f"{runtime.backend}; {runtime.loader.resident}", err=True)


def _report(runtime, result, path, as_json: bool) -> None:
    coarse = sum(k > 1 for k in result.schedule) / len(result.schedule)
    if as_json:
        click.echo(
            json.dumps(
                dict(
                    schedule=result.schedule,
                    step_ms=[round(t, 3) for t in result.step_ms],
                    engine_ms=[round(t, 3) for t in result.engine_ms],
                    total_s=round(result.total_s, 4),
                    output=str(path),
                    engines=list(runtime.sizes),
                    coarse_fraction=round(coarse, 4),
                    computed=result.computed or None,
                    device=str(runtime.device),
                    backend=runtime.backend.name,
                    **result.settings,
                )
            )
        )
    else:
        s = result.settings
        click.echo(
            f"wrote {path} ({s['height']}x{s['width']}, {s['steps']} steps, {result.total_s:.2f} s); "
            f"schedule {''.join(map(str, result.schedule))}, {coarse:.0%} of steps coarse"
            + (f", {sum(result.computed)}/{len(result.computed)} steps computed" if not all(result.computed) else "")
            + (f"; {_tau_note(runtime, s)}" if s["schedule_mode"] == "auto" else "")
            + (f"; {_teacache_note(s)}" if s.get("teacache") else ""),
            err=True,
        )


def _teacache_note(settings: dict) -> str:
    """'TeaCache 0.15 with the polynomials fitted for this shape by ddit-bench --fit-teacache', or whose."""
    source = settings.get("teacache_coefficients_source", "manifest")
    whose = {"given": "--teacache-coefficients", "manifest": "the manifest's polynomial"}.get(
        source, "the polynomials fitted for this shape (the profile's or ddit-bench --fit-teacache's)"
    )
    return f"TeaCache {settings['teacache']:g} with {whose}"


def _tau_note(runtime, settings: dict) -> str:
    """'tau 0.05 (calibrated for this shape)', or the profile's, naming the shapes the folder has taus for."""
    tau, source = settings["tau"], settings["tau_source"]
    if source == "given":
        return f"tau {tau:g}"
    if source.startswith("calibrated"):
        return f"tau {tau:g} (calibrated for this shape, these sizes and rho: the profile's or ddit-bench --save-tau's)"
    calibrated = runtime.spec.scheduler.calibrated
    elsewhere = f"; calibrated only for {' | '.join(e.shape() for e in calibrated)}" if calibrated else ""
    return f"tau {tau:g} (the profile's{elsewhere})"


def _hush_loaders(quiet: bool) -> None:
    """--quiet: also no progress bars from transformers and diffusers while they load weights."""
    if quiet:
        import diffusers
        import transformers

        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.disable_progress_bar()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("family", metavar="FAMILY")
@click.option("--model", default="tiny", show_default=True, help="'tiny', a local diffusers folder, or a hub id.")
@click.option("--profile", "profile_name", default=None, help="Profile override (as for ddit-export).")
@click.option("--sizes", default="2,4", show_default=True, help="Coarse patch factors to train (not 1: the base).")
@click.option(
    "-o",
    "--output",
    default="adapters",
    show_default=True,
    help="Folder for adapters.safetensors, adapters.json, the checkpoint and the latent cache.",
)
@click.option(
    "--prompts",
    default=None,
    metavar="FILE",
    help="One prompt per line; the base model generates the training latents (cached; Wan: videos, sampled with "
    "classifier-free guidance). For --model tiny without data, built-in procedural captions are used.",
)
@click.option("--images", default=None, metavar="DIR", help="FLUX: images (name.txt beside name.png is the caption).")
@click.option(
    "--builtin-prompts",
    type=int,
    default=64,
    show_default=True,
    help="How many built-in captions a --model tiny run without --prompts/--images generates from.",
)
@click.option("--steps", type=int, default=200, show_default=True, help="Optimiser steps per size.")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--rank", type=int, default=32, show_default=True, help="LoRA rank on every feed-forward layer.")
@click.option("--alpha", type=float, default=None, help="LoRA alpha (scale = alpha / rank; default = rank).")
@click.option(
    "--optimizer",
    type=click.Choice(["prodigy", "adamw"]),
    default=None,
    help="Prodigy (lr 1.0) as the paper does for FLUX; AdamW (lr 1e-4) as for Wan. Default: the family's "
    "(prodigy for flux, adamw for wan).",
)
@click.option("--lr", type=float, default=None, help="Learning rate (default: 1.0 prodigy, 1e-4 adamw).")
@click.option("--height", type=int, default=None, help="Training resolution (default: the profile's opt size).")
@click.option("--width", type=int, default=None)
@click.option(
    "--frames",
    type=int,
    default=None,
    help="Wan: video frames of the training latents, 4n+1 (default: the profile's opt frames).",
)
@click.option(
    "--gen-steps",
    type=int,
    default=None,
    help="Sampling steps when generating latents; also the sigma grid t is drawn from (default: the profile's).",
)
@click.option(
    "--t-weighting",
    type=click.Choice(["uniform", "high-noise", "low-noise"]),
    default="uniform",
    show_default=True,
    help="How t is drawn from the sigma schedule.",
)
@click.option("--checkpoint-every", type=int, default=50, show_default=True, help="Steps between checkpoints.")
@click.option("--holdout", type=float, default=0.1, show_default=True, help="Fraction of latents held out for eval.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--gradient-checkpointing", is_flag=True, help="Trade compute for memory.")
@click.option(
    "--base-dtype",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    show_default=True,
    help="The frozen base transformer's weights. bf16 halves them (FLUX.1-dev: 48 -> 24 GB) and runs every "
    "forward under bfloat16 autocast; LoRA, adapters and the optimiser stay fp32. The adapters export as usual.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="bf16 autocast is used on CUDA.",
)
@click.option(
    "--eval",
    "eval_only",
    is_flag=True,
    help="Evaluate the adapters already in the output folder (init vs trained) instead of training.",
)
@click.option("--force", is_flag=True, help="Discard a previous result and checkpoint in the output folder.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_one_line_errors
def train_main(family, model, profile_name, sizes, output, eval_only, force, quiet, **opts):
    """Distil DDiT adapters (patch embed/de-embed, size embedding, residual, LoRA) from the frozen base model.

    A rerun of the same command resumes from the last checkpoint. The held-out student-vs-teacher error of the
    PI-resize initialisation and of the trained adapters is printed and stored in adapters.json.

    \b
    Examples:
      ddit-train flux --model tiny --sizes 2,4 --steps 200 -o adapters/
      ddit-export flux --adapters adapters/adapters.safetensors -o engines/
      ddit-train wan --model tiny --sizes 2,4 --frames 9 -o wan-adapters/
      ddit-export wan --adapters wan-adapters/adapters.safetensors -o wan-engines/
    """
    from ddit_profiles import get_profile, profile_for

    spec = get_profile(profile_name) if profile_name else profile_for(family, model)
    if spec.family != family:
        raise DDiTError(f"profile '{spec.name}' is for family '{spec.family}', not '{family}'")
    from pathlib import Path

    from ddit_export.train import TrainConfig, Trainer

    cfg = TrainConfig(model=model, sizes=tuple(_parse_sizes(sizes)), output=Path(output), **opts)
    _hush_loaders(quiet)
    trainer = Trainer(cfg, spec, progress=not quiet, force=force and not eval_only)
    if eval_only:
        result = trainer.evaluate_existing()
    else:
        report = trainer.run()
        result = report["eval"]
        click.echo(f"wrote {report['adapters']}", err=True)
    click.echo("held-out velocity MSE vs the teacher (lower is better):", err=True)
    for k, row in result.items():
        click.echo(f"  size {k}: PI-resize init {row['init']:.4g} -> trained {row['trained']:.4g}", err=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("family", metavar="FAMILY")
@click.option("-o", "--output", default=None, help="Working folder of the recipe.  [default: build/tiny-FAMILY]")
@click.option("--smoke", is_flag=True, help="A few steps per stage (about two minutes): checks the recipe runs.")
@click.option("--install", is_flag=True, help="Copy the result into the package: what --model tiny then loads.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--fast",
    is_flag=True,
    help="flux: train the transformer under bfloat16 autocast with torch.compile (0.34 s a step instead of 0.43 on "
    "a CPU with AMX; needs g++ or clang++, else it trains eagerly) and 1.5x the steps (9000 + 3000): the recipe "
    "of the shipped tiny FLUX.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_one_line_errors
def recipe_main(family, output, smoke, install, seed, fast, quiet):
    """Rebuild the embedded tiny FAMILY model (flux or wan) from nothing, with fixed seeds (2 cores: flux about 76 min, or 92 with --fast as shipped; wan about 82).

    Stages: tokenizers, frozen text encoders, VAE, latents, transformer (flow matching), DDiT adapters. A stage
    whose output exists in the working folder is skipped, so an interrupted recipe resumes where it stopped.
    """
    from pathlib import Path

    from ddit_profiles import profile_for

    spec = profile_for(family, "tiny")
    if spec.family == "wan":
        from ddit_export.wan_recipe import WanRecipe as Recipe
        from ddit_export.wan_recipe import WanRecipeSteps as Steps
    else:
        from ddit_export.recipe import FluxRecipe as Recipe
        from ddit_export.recipe import RecipeSteps as Steps

    steps = Steps.smoke() if smoke else Steps()
    if fast:
        if spec.family != "flux":
            raise DDiTError(f"--fast is measured on the flux recipe only, not {spec.family}: drop --fast")
        steps = steps.accelerated() if smoke else Steps.fast()
    output = Path(output or f"build/tiny-{spec.family}")
    _hush_loaders(quiet)
    recipe = Recipe(spec, output, steps, seed, progress=not quiet)
    recipe.run()
    if install:
        click.echo(f"installed into {recipe.install()}", err=True)


def _float_list(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DDiTError(f"cannot parse {option} '{text}': give comma-separated numbers such as 0.25,0.4") from None
    if not values or any(v < 0 for v in values):
        raise DDiTError(f"{option} needs one or more numbers >= 0, got '{text}'")
    return values


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("engines", metavar="ENGINES_DIR")
@click.option("--prompts", "prompts_file", default=None, help="Text file, one prompt per line (default: built-in).")
@click.option(
    "--count",
    type=int,
    default=8,
    show_default=True,
    help="Built-in prompts: held-out captions of the shapes grammar, half simple, half detailed, scored by the "
    "evaluator (ignored with --prompts).",
)
@click.option("--seeds", type=int, default=1, show_default=True, help="Seeds per prompt.")
@click.option("--steps", type=int, default=None, help="Denoising steps (default: the manifest's).")
@click.option(
    "--height",
    type=int,
    default=None,
    help="Height in pixels of every generation, bare call and FLOP count (default: the profile's opt size).",
)
@click.option("--width", type=int, default=None, help="Width in pixels (default: the profile's opt size).")
@click.option("--frames", type=int, default=None, help="Wan: video frames, 4n+1 (default: the profile's).")
@click.option(
    "--taus",
    default=None,
    help="DDiT tau presets, comma-separated (default: tau/2, tau, 2 tau, where tau is the one --save-tau recorded "
    "for this shape, else the manifest's).",
)
@click.option(
    "--sizes",
    default=None,
    help="Patch sizes to load, e.g. 1,2: DDiT chooses among them and the fixed schedules cover them (default: "
    "every size in the folder; 1, the baseline's, is needed).",
)
@click.option(
    "--teacache-thresholds",
    default=None,
    help="TeaCache thresholds, comma-separated (default: those of the polynomials --fit-teacache fitted for this "
    "shape, else the profile's presets: FLUX 0.25,0.4,0.6; Wan 0.05,0.065,0.08; the tiny Wan 0.15,0.25,0.4).",
)
@click.option(
    "--teacache-coefficients",
    default=None,
    help="TeaCache's rescaling polynomial for every TeaCache method and patch size, highest power first, "
    "comma-separated, in place of the manifest's (and of a --fit-teacache fit).",
)
@_backend_options
@click.option("--json", "json_out", default=None, help="Write the full report (every run) as JSON here.")
@click.option("--plot", "plot_out", default=None, help="Write quality-vs-speed and schedule plots (PNG) here.")
@click.option(
    "--save-tau",
    is_flag=True,
    help="After the run, record in ENGINES_DIR's manifest the largest (so fastest) of --taus whose quality met the "
    "bar (--min-ssim, and --max-score-drop on the built-in prompts) for this shape: height, width, frames, steps, "
    "--sizes and rho. ddit-run and ddit-bench then use it there when --tau / --taus is not given; elsewhere the "
    "profile's tau stays. Nothing is written when no tau met it.",
)
@click.option(
    "--max-score-drop",
    type=click.FloatRange(0.0),
    default=0.03,
    show_default=True,
    help="--save-tau's bar on the built-in prompts: the most the evaluator's score may fall below the baseline's.",
)
@click.option(
    "--min-ssim",
    type=click.FloatRange(-1.0, 1.0),
    default=0.85,
    show_default=True,
    help="--save-tau's bar: the least mean SSIM against the baseline's images (the only measure with --prompts).",
)
@click.option(
    "--fit-teacache",
    is_flag=True,
    help="Before the run, fit TeaCache's rescaling polynomial for each loaded patch size at this shape (height, "
    "width, frames, steps), on --fit-prompts generations per size, record the fit in ENGINES_DIR's manifest, and "
    "bench with it; its own thresholds become the default --teacache-thresholds. ddit-run and ddit-bench then use "
    "it at that shape unless --teacache-coefficients is given.",
)
@click.option(
    "--fit-prompts",
    type=int,
    default=16,
    show_default=True,
    help="--fit-teacache: generations per size to fit on (built-in captions disjoint from the benchmark's; with "
    "--prompts, the file's first ones).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_one_line_errors
def bench_main(
    engines,
    prompts_file,
    count,
    seeds,
    steps,
    height,
    width,
    frames,
    taus,
    sizes,
    teacache_thresholds,
    teacache_coefficients,
    backend,
    provider,
    json_out,
    plot_out,
    save_tau,
    max_score_drop,
    min_ssim,
    fit_teacache,
    fit_prompts,
    quiet,
):
    """Measure every schedule on ENGINES_DIR side by side, in one process, on the same prompts and seeds.

    \b
    Methods: the native fixed schedule (the baseline), fixed 2p and 4p, DDiT at each tau preset, TeaCache alone,
    DDiT + TeaCache, and the baseline with fewer steps matched to the time of DDiT and of each DDiT + TeaCache
    threshold (step reduction, against a second baseline pass run beside it). The methods run interleaved (each
    prompt through every method in turn), so the machine's drift hits them alike.
    Reported: median step ms per patch size with its ratio to native, the bare engine's ratio, the FLOP-ideal
    ratio from the profile's analytic count and the efficiency; end-to-end speedup with its 95% interval over the
    prompts; scheduler overhead; memory; quality (PSNR/SSIM against the baseline's images, and the evaluator's
    score on the built-in prompts, with its change against the baseline and that change's standard error); and
    each method against the step-reduction run matched to its time, score difference and standard error included.
    Ctrl-C stops early and still prints and writes (--json, --plot) the report of the prompts and seeds that every
    method finished, marked INTERRUPTED, then exits with status 130.

    \b
    Examples:
      ddit-bench engines/ --count 16 --json bench.json --plot bench.png
      ddit-bench engines/ --prompts my_prompts.txt --height 768 --width 1360 --json bench.json
      ddit-bench engines/ --sizes 1,2 --height 512 --width 512 --taus 0.02,0.05 --save-tau
      ddit-bench engines/ --sizes 1,2 --height 512 --width 512 --fit-teacache
    """
    from ddit_export.bench import check_plot_path, markdown, plot, run_bench, write_json
    from ddit_runtime.outputs import check_folder_writable, check_writable

    if json_out:  # checked before the run: it can take minutes, and its report must have somewhere to go
        check_writable(json_out, "--json")
    if plot_out:
        check_plot_path(plot_out)
    for flag, on in (("--save-tau", save_tau), ("--fit-teacache", fit_teacache)):
        if on and Path(engines).is_dir():  # a missing folder gets run_bench's own error
            check_folder_writable(Path(engines), f"{flag} into", Path(engines))
    report = run_bench(
        engines,
        prompts_file,
        count,
        seeds,
        steps,
        _float_list(taus, "--taus"),
        _float_list(teacache_thresholds, "--teacache-thresholds"),
        backend=backend,
        provider=provider,
        progress=not quiet,
        teacache_coefficients=_teacache_coefficients(teacache_coefficients, True),
        height=height,
        width=width,
        frames=frames,
        sizes=None if sizes is None else _parse_sizes(sizes),
        fit_teacache=fit_prompts if fit_teacache else None,
    )
    click.echo(markdown(report))
    if json_out:
        click.echo(f"wrote {write_json(report, json_out)}", err=True)
    if plot_out:
        click.echo(f"wrote {plot(report, plot_out)}", err=True)
    stop = report.get("interrupted")
    if save_tau and stop:
        click.echo("--save-tau: the run was interrupted, so no tau is recorded", err=True)
    elif save_tau:
        _save_tau(engines, report, min_ssim, max_score_drop)
    if stop:  # what finished was reported and written; the status still says the run did not complete
        click.echo(f"interrupted: the report covers {stop['finished']} of {stop['of']} prompt x seed runs", err=True)
        sys.exit(130)


def _save_tau(engines: str, report: dict, min_ssim: float, max_score_drop: float) -> None:
    """ddit-bench --save-tau: each tau's verdict, then the largest tau that met the bar into the manifest."""
    from ddit_export.bench import calibrated_tau, choose_tau
    from ddit_export.manifest import save_calibrated_tau

    row, lines = choose_tau(report, max_score_drop, min_ssim)
    for line in lines:
        click.echo(f"--save-tau: {line}", err=True)
    if row is None:
        taus = ", ".join(f"{r['options']['tau']:g}" for r in report["methods"] if r["kind"] == "ddit")
        raise DDiTError(
            f"--save-tau: no tau of {taus} met the bar, so the manifest is unchanged: give smaller --taus, or "
            "loosen --min-ssim / --max-score-drop"
        )
    entry = calibrated_tau(report, row)
    path = save_calibrated_tau(engines, entry)
    click.echo(
        f"--save-tau: recorded tau {entry.tau:g} for {entry.shape()} in {path}; ddit-run uses it at that shape "
        "unless --tau is given",
        err=True,
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("engines", metavar="ENGINES_DIR")
@click.option(
    "--opt-level",
    type=click.IntRange(0, 5),
    default=None,
    help="TensorRT builder optimisation level, 0-5 (default: TensorRT's, 3). Higher builds slower and may run faster.",
)
@click.option(
    "--timing-cache",
    default=None,
    metavar="FILE",
    help="Tactic timing cache, loaded if it exists and updated after each build [default: ENGINES_DIR/trt_timing.cache].",
)
@click.option("--sizes", default=None, help="Transformer patch sizes to build, e.g. 1,2 (default: all exported).")
@click.option("--force", is_flag=True, help="Rebuild every plan, even those built from the same graph and settings.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_one_line_errors
def build_main(engines, opt_level, timing_cache, sizes, force, quiet):
    """Build one TensorRT engine per graph of ENGINES_DIR (made by ddit-export), for this GPU and TensorRT release.

    Every transformer size, the TeaCache probes, the text encoders and the VAE decoder get a plan named after the
    TensorRT version and the GPU's compute capability (transformer_k2.trt10.13.sm90.plan), in the precision the ONNX
    graph is typed in. The manifest records them (sha256, settings); the ONNX files stay.

    \b
    Example:
      ddit-build engines/ --opt-level 3
    """
    from ddit_export.trt_build import require_tensorrt

    require_tensorrt()  # before anything else: one line when TensorRT is missing
    _build_and_say(engines, _parse_sizes(sizes) if sizes else None, opt_level, timing_cache, force, quiet)


def _build_and_say(engines, chosen, opt_level, timing_cache, force: bool, quiet: bool) -> None:
    from ddit_export.trt_build import build_engines
    from ddit_runtime.backends import format_bytes

    block = build_engines(engines, chosen, opt_level, timing_cache, force, progress=not quiet)
    plans = block["plans"]
    click.echo(
        f"wrote {len(plans)} TensorRT engines into {engines} for TensorRT {block['version']} on "
        f"{block['compute_capability']} ({block['gpu']}), {format_bytes(sum(p['bytes'] for p in plans.values()))}",
        err=True,
    )


if __name__ == "__main__":
    export_main()
