"""``ddit-export flux``: one transformer graph per patch factor, the text encoders, the VAE decoder, the tokenizers,
and a manifest, written into a staging folder that is renamed into place only when everything checked out.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from ddit_profiles import DDiTError, FluxSpec

from .adapters import export_spec, resolve_adapters
from .flux_model import Float32FluxPosEmbed, FluxEngine, FluxTeaCacheProbe, size_variant
from .loading import load_flux, with_vae_normalisation
from .manifest import check_output_folder, export_graphs, source_block, staging_folder, write_manifest
from .onnx_io import check_parity, export_checked, export_onnx


class ClipPooled(nn.Module):
    """input_ids [B, 77] int64 -> pooled_projections [B, P]: CLIP's pooled output, as FLUX consumes it."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids):
        return self.clip(input_ids=input_ids).pooler_output


class T5Hidden(nn.Module):
    """input_ids [B, T] int64 -> encoder_hidden_states [B, T, D]."""

    def __init__(self, t5):
        super().__init__()
        self.t5 = t5

    def forward(self, input_ids):
        return self.t5(input_ids=input_ids).last_hidden_state


class VaeDecode(nn.Module):
    """Unscaled latent [B, 16, h, w] -> image [B, 3, 8h, 8w] in about [-1, 1]. The runtime applies scale/shift."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


#: Modules a typed (fp16/bf16) transformer graph keeps in float32: the RoPE tables.
KEEP_FLOAT32 = (Float32FluxPosEmbed,)


def _transformer_inputs(spec: FluxSpec, batch: int, height: int, width: int, gen: torch.Generator) -> tuple:
    lh, lw = spec.latent_hw(height, width)
    return (
        torch.randn(batch, spec.latent_channels, lh, lw, generator=gen),
        torch.rand(batch, generator=gen),
        torch.full((batch,), spec.scheduler.guidance),
        torch.randn(batch, spec.t5_max_length, spec.joint_attention_dim, generator=gen),
        torch.randn(batch, spec.pooled_dim, generator=gen),
    )


def _parity_sizes(spec: FluxSpec) -> list[tuple[int, int, int]]:
    """(batch, height, width) the parity check runs at: the smallest size, and a non-square one at batch 2."""
    (h0, w0), (_, w1) = spec.min_size, spec.max_size
    return [(1, h0, w0), (2, h0, min(2 * w0, w1))]


@torch.no_grad()
def calibration_inputs(parts, spec: FluxSpec, progress: bool = False) -> list[tuple]:
    """The engine inputs ``--precision fp8`` calibrates on: the native model's own flow-matching Euler trajectory
    at the profile's ``opt_size`` for its ``calibration_prompts`` (one batch, one seeded noise each), at each of
    ``calibration_steps`` steps -> a list of (latent [P, 16, h, w], timestep [P], guidance [P], T5 [P, T, D],
    pooled [P, Dp]). Every size's engine is calibrated on these same full-resolution latents."""
    from tqdm.auto import tqdm

    from ddit_runtime.sigmas import flux_sigmas

    from .train_data import encode_prompts

    prompts = list(spec.calibration_prompts)
    t5, pooled = encode_prompts(parts, spec, prompts, "cpu")
    height, width = spec.opt_size
    lh, lw = spec.latent_hw(height, width)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(len(prompts), spec.latent_channels, lh, lw, generator=gen)
    guidance = torch.full((len(prompts),), spec.scheduler.guidance)
    sigmas = flux_sigmas(spec.calibration_steps, spec.shift.mu(spec.image_seq_len(height, width))).tolist()
    out = []
    with size_variant(parts["transformer"], None, 1):
        engine = FluxEngine(parts["transformer"], spec, 1).eval()
        for s, s_next in tqdm(
            list(zip(sigmas[:-1], sigmas[1:], strict=True)), desc="fp8 calibration", unit="step", disable=not progress
        ):
            args = (z, torch.full((len(prompts),), s), guidance, t5, pooled)
            out.append(args)
            z = z + (s_next - s) * engine(*args)[0]
    return out


def _export_transformer(
    parts, spec, adapters, factor, folder: Path, precision: str = "fp32", merge_lora: bool = True, calibration=None
) -> dict:
    """Export and check size ``factor``'s engine (and TeaCache probe). ``merge_lora=False`` keeps the LoRA as a
    separate branch, so every size's graph holds the base weights unchanged (``benchmarks/weight_sharing.py``).
    fp8 needs ``calibration`` (``calibration_inputs``): each size's engine sets its own activation scales on it.
    Its TeaCache probe is fp16: it holds no block Linear layer."""
    transformer = parts["transformer"]
    gen = torch.Generator().manual_seed(factor)
    patch = spec.patch_pixels(factor)
    (r0, c0), _, (r1, c1) = spec.token_range(factor)
    batch = Dim("batch", min=1, max=spec.max_batch)
    rows, cols = Dim(f"rows_k{factor}", min=r0, max=r1), Dim(f"cols_k{factor}", min=c0, max=c1)
    dynamic = {
        "latent": {0: batch, 2: patch * rows, 3: patch * cols},
        "timestep": {0: batch},
        "guidance": {0: batch},
        "encoder_hidden_states": {0: batch},
        "pooled_projections": {0: batch},
    }
    path = folder / f"transformer_k{factor}.onnx"
    with size_variant(transformer, adapters, factor, merge_lora=merge_lora) as adapter:
        engine = FluxEngine(transformer, spec, factor, adapter, residual=True).eval()
        example = _transformer_inputs(spec, 2, *spec.opt_size, gen)
        feeds = [_transformer_inputs(spec, b, h, w, gen) for b, h, w in _parity_sizes(spec)]
        io = (spec.transformer_inputs, spec.transformer_outputs, dynamic)
        amax = None
        if precision == "fp8":
            from .fp8 import calibrate

            amax = calibrate(engine, calibration or calibration_inputs(parts, spec), spec.fp8_scope)
        entry = export_checked(
            engine, example, io, path, spec, f"transformer k={factor}", feeds, precision, KEEP_FLOAT32, amax
        )
        if precision == "fp8":
            entry["fp8"]["calibration"] = dict(prompts=len(spec.calibration_prompts), steps=spec.calibration_steps)
        probe_precision = "fp16" if precision == "fp8" else precision
        entry["teacache"] = _export_teacache_probe(
            transformer, spec, factor, adapter, engine, (dynamic, rows, cols), folder, gen, probe_precision
        )
    return entry


def _probe_inputs(engine: FluxEngine, feeds: tuple) -> tuple:
    """The probe's inputs for one engine input tuple: the engine's own residual, so the probe's velocity must
    reproduce the engine's velocity exactly (a check that the split is right)."""
    latent, timestep, guidance, _, pooled = feeds
    with torch.no_grad():
        _, residual = engine(*feeds)
    return latent, timestep, guidance, pooled, residual


def _export_teacache_probe(transformer, spec, factor, adapter, engine, dims, folder: Path, gen, precision) -> dict:
    """``teacache_k{factor}.onnx``: ``FluxTeaCacheProbe`` under the same merged weights as the engine.
    ``dims``: the engine's dynamic shapes and its token-grid Dims (rows, cols)."""
    dynamic, rows, cols = dims
    probe = FluxTeaCacheProbe(transformer, spec, factor, adapter).eval()
    probe_dynamic = {k: dynamic[k] for k in ("latent", "timestep", "guidance", "pooled_projections")}
    probe_dynamic["residual"] = {0: dynamic["latent"][0], 1: rows, 2: cols}
    path = folder / f"teacache_k{factor}.onnx"
    example = _probe_inputs(engine, _transformer_inputs(spec, 2, *spec.opt_size, gen))
    feeds = [_probe_inputs(engine, _transformer_inputs(spec, b, h, w, gen)) for b, h, w in _parity_sizes(spec)]
    io = (spec.teacache_inputs, spec.teacache_outputs, probe_dynamic)
    entry = export_checked(probe, example, io, path, spec, f"teacache k={factor}", feeds, precision)
    with torch.no_grad():  # the split is exact: the probe's velocity from the engine's residual is the engine's
        args = _transformer_inputs(spec, 1, *spec.min_size, gen)
        split = (probe(*_probe_inputs(engine, args))[1] - engine(*args)[0]).abs().max().item()
    if split > spec.transformer_tolerance.bound(1.0):
        raise DDiTError(f"teacache k={factor}: the probe's velocity differs from the engine's by {split:.3g}")
    return entry | dict(split_error=split)


def _token_feeds(tokenizer, max_length: int, vocab: int, gen) -> list[tuple]:
    prompts = ["a red circle on a black background", "many small striped blue squares"]
    real = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    rand = torch.randint(0, vocab, (3, max_length), generator=gen)
    rand[:, -1] = tokenizer.eos_token_id
    return [(real.input_ids[:1],), (real.input_ids,), (rand,)]


def _export_text(parts, spec, folder: Path) -> dict:
    out = {}
    gen = torch.Generator().manual_seed(7)
    batch = Dim("batch", min=1, max=spec.max_batch)
    jobs = (
        ("text_encoder", ClipPooled, "tokenizer", spec.clip_max_length, "pooled_projections"),
        ("text_encoder_2", T5Hidden, "tokenizer_2", spec.t5_max_length, "encoder_hidden_states"),
    )
    for name, wrapper, tok_name, length, output in jobs:
        module, tokenizer = wrapper(parts[name]).eval(), parts[tok_name]
        feeds = _token_feeds(tokenizer, length, parts[name].config.vocab_size, gen)
        path = folder / f"{name}.onnx"
        files = export_onnx(module, feeds[1], ("input_ids",), (output,), {"input_ids": {0: batch}}, path, spec.opset)
        err = check_parity(path, module, feeds, ("input_ids",), spec.text_tolerance, name)
        (folder / tok_name).mkdir()
        tokenizer.backend_tokenizer.save(str(folder / tok_name / "tokenizer.json"))
        out[name] = dict(
            onnx=path.name,
            files=[f.name for f in files],
            max_abs_error=err,
            output=output,
            tokenizer=f"{tok_name}/tokenizer.json",
            max_length=length,
            pad_id=tokenizer.pad_token_id,
            pad_token=tokenizer.pad_token,
        )
    return out


def _export_vae(parts, spec, folder: Path) -> dict:
    module = VaeDecode(parts["vae"]).eval()
    gen = torch.Generator().manual_seed(11)
    (h0, w0), (h1, w1) = (spec.latent_hw(*spec.min_size), spec.latent_hw(*spec.max_size))
    dynamic = {
        "latent": {
            0: Dim("batch", min=1, max=spec.max_batch),
            2: Dim("latent_h", min=h0, max=h1),
            3: Dim("latent_w", min=w0, max=w1),
        }
    }
    example = (torch.randn(2, spec.latent_channels, *spec.latent_hw(*spec.opt_size), generator=gen),)
    path = folder / "vae_decoder.onnx"
    files = export_onnx(module, example, ("latent",), ("image",), dynamic, path, spec.opset)
    feeds = [
        (torch.randn(b, spec.latent_channels, *spec.latent_hw(h, w), generator=gen),) for b, h, w in _parity_sizes(spec)
    ]
    err = check_parity(path, module, feeds, ("latent",), spec.vae_tolerance, "vae_decoder")
    return dict(onnx=path.name, files=[f.name for f in files], max_abs_error=err)


def export_flux(
    model: str,
    spec: FluxSpec,
    factors,
    out_dir: str | Path,
    adapters_path: str | None = None,
    force: bool = False,
    progress: bool = True,
    precision: str = "fp32",
) -> dict:
    """Export everything ``ddit-run`` needs into ``out_dir``; return the manifest. ``precision`` types the
    transformer graphs and TeaCache probes (see ``onnx_io.TypedGraph``); the text encoders and the VAE stay float32."""
    factors = spec.check_factors(factors)
    out_dir = Path(out_dir)
    check_output_folder(out_dir, force)
    started = time.time()
    parts = load_flux(model, spec)
    spec = with_vae_normalisation(spec, parts["vae"])  # the manifest records the checkpoint's own
    transformer = parts["transformer"]
    adapters, adapters_file, trained = resolve_adapters(model, adapters_path, transformer, spec, factors)
    spec = export_spec(spec, model, adapters_file, precision)
    calibration = None
    if precision == "fp8":
        calibration = calibration_inputs(parts, spec, progress)
        if spec.fp8_tau is not None:  # the manifest's scheduler defaults are the fp8 engines' own
            spec = dataclasses.replace(spec, scheduler=dataclasses.replace(spec.scheduler, tau=spec.fp8_tau))
    with staging_folder(out_dir, force) as folder:
        components = export_graphs(
            folder,
            factors,
            lambda k, dst: _export_transformer(parts, spec, adapters, k, dst, precision, calibration=calibration),
            lambda dst: _export_text(parts, spec, dst),
            lambda dst: _export_vae(parts, spec, dst),
            progress,
        )
        untrained = "untrained: PI-resize embedding, bilinear de-embedding, no LoRA"
        source = source_block(model, adapters_file, trained, untrained)
        manifest = write_manifest(folder, spec, factors, components, source, time.time() - started, precision=precision)
    return manifest
