"""``ddit-export wan``: one transformer graph and one TeaCache probe per patch factor, the umT5 encoder, the VAE
decoder (two graphs that decode one latent frame per call, see ``wan_vae``), the tokenizer, and a manifest, written
into a staging folder that is renamed into place only when everything checked out (parity, no float64, no complex
tensors).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from ddit_profiles import DDiTError, WanSpec

from .adapters import export_spec, resolve_adapters
from .manifest import check_output_folder, export_graphs, source_block, staging_folder, write_manifest
from .onnx_io import check_parity, export_checked, export_onnx, ort_session
from .wan_loading import load_wan
from .wan_manifest import wan_blocks
from .wan_model import WanEngine, WanPositionRope, WanTeaCacheProbe, wan_size_variant
from .wan_vae import VaeDecodeFirst, VaeDecodeStep, cache_names, decode_chunked


class Umt5Embeds(nn.Module):
    """(input_ids, attention_mask) [B, T] int64 -> encoder_hidden_states [B, T, D], padded positions zeroed.

    WanPipeline._get_t5_prompt_embeds runs umT5 with the mask, keeps the first ``mask.sum()`` rows and pads with
    zeros; with right padding (the tokenizer's) that is the output times the mask.
    """

    def __init__(self, t5):
        super().__init__()
        self.t5 = t5

    def forward(self, input_ids, attention_mask):
        hidden = self.t5(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)


#: Modules a typed (fp16/bf16) transformer graph keeps in float32: the RoPE tables.
KEEP_FLOAT32 = (WanPositionRope,)


def transformer_inputs(spec: WanSpec, batch: int, frames: int, height: int, width: int, gen) -> tuple:
    """Random engine inputs for a ``frames``-frame ``height x width`` video: latent, timestep (0..1000), umT5."""
    lh, lw = spec.latent_hw(height, width)
    return (
        torch.randn(batch, spec.latent_channels, spec.latent_frames(frames), lh, lw, generator=gen),
        torch.rand(batch, generator=gen) * spec.num_train_timesteps,
        torch.randn(batch, spec.t5_max_length, spec.text_dim, generator=gen),
    )


def parity_sizes(spec: WanSpec) -> list[tuple[int, int, int, int]]:
    """(batch, frames, height, width) the parity checks run at: the smallest video, and a non-square one at batch 2
    whose latent (e.g. 18 x 26 for the tiny profile) is padded by the coarse engines."""
    (h0, w0), (h1, w1) = spec.min_size, spec.max_size
    frames = min(spec.min_frames + spec.vae_temporal_factor, spec.max_frames)
    return [(1, spec.min_frames, h0, w0), (2, frames, min(h0 + 16, h1), min(w0 + 80, w1))]


def _export_transformer(parts, spec: WanSpec, adapters, factor: int, folder: Path, precision: str = "fp32") -> dict:
    transformer = parts["transformer"]
    gen = torch.Generator().manual_seed(factor)
    (lh0, lw0), (lh1, lw1) = spec.latent_hw(*spec.min_size), spec.latent_hw(*spec.max_size)
    f0, _, f1 = spec.frame_range()
    batch = Dim("batch", min=1, max=spec.max_batch)
    dims = {
        0: batch,
        2: Dim("latent_frames", min=f0, max=f1),
        3: Dim("latent_height", min=lh0, max=lh1),
        4: Dim("latent_width", min=lw0, max=lw1),
    }
    dynamic = {"latent": dims, "timestep": {0: batch}, "encoder_hidden_states": {0: batch}}
    path = folder / f"transformer_k{factor}.onnx"
    names, outputs = spec.transformer_inputs, spec.transformer_outputs
    with wan_size_variant(transformer, adapters, factor) as adapter:
        engine = WanEngine(transformer, spec, factor, adapter, residual=True).eval()
        example = transformer_inputs(spec, 2, spec.opt_frames, *spec.opt_size, gen)
        feeds = [transformer_inputs(spec, *size, gen) for size in parity_sizes(spec)]
        io = (names, outputs, dynamic)
        entry = export_checked(
            engine, example, io, path, spec, f"transformer k={factor}", feeds, precision, KEEP_FLOAT32
        )
        entry["teacache"] = _export_teacache_probe(
            transformer, spec, factor, adapter, engine, dims, folder, gen, precision
        )
    return entry


def _probe_inputs(engine: WanEngine, feeds: tuple) -> tuple:
    """The probe's inputs for one engine input tuple: the engine's own residual, so the probe's velocity must
    reproduce the engine's velocity (a check that the split is right)."""
    latent, timestep, _ = feeds
    with torch.no_grad():
        _, residual = engine(*feeds)
    return latent, timestep, residual


def _export_teacache_probe(
    transformer, spec: WanSpec, factor, adapter, engine, dims: dict, folder: Path, gen, precision: str = "fp32"
) -> dict:
    """``teacache_k{factor}.onnx``: ``WanTeaCacheProbe`` under the same merged weights as the engine.
    ``dims``: the engine's latent Dims; the residual's token rows and columns get Dims of their own."""
    (r0, c0), (r1, c1) = (spec.token_grid(factor, *size) for size in (spec.min_size, spec.max_size))
    grid = {2: Dim(f"rows_k{factor}", min=r0, max=r1), 3: Dim(f"cols_k{factor}", min=c0, max=c1)}
    dynamic = {"latent": dims, "timestep": {0: dims[0]}, "residual": {0: dims[0], 1: dims[2]} | grid}
    probe = WanTeaCacheProbe(transformer, spec, factor, adapter).eval()
    path = folder / f"teacache_k{factor}.onnx"
    names, outputs = spec.teacache_inputs, spec.teacache_outputs
    example = _probe_inputs(engine, transformer_inputs(spec, 2, spec.opt_frames, *spec.opt_size, gen))
    feeds = [_probe_inputs(engine, transformer_inputs(spec, *size, gen)) for size in parity_sizes(spec)]
    entry = export_checked(
        probe, example, (names, outputs, dynamic), path, spec, f"teacache k={factor}", feeds, precision, KEEP_FLOAT32
    )
    split = 0.0
    with torch.no_grad():  # the split is exact: the probe's velocity from the engine's residual is the engine's
        for size in parity_sizes(spec):
            args = transformer_inputs(spec, *size, gen)
            split = max(split, (probe(*_probe_inputs(engine, args))[1] - engine(*args)[0]).abs().max().item())
    if split > spec.transformer_tolerance.bound(1.0):
        raise DDiTError(f"teacache k={factor}: the probe's velocity differs from the engine's by {split:.3g}")
    return entry | dict(split_error=split)


def _token_feeds(tokenizer, max_length: int, vocab: int, gen, max_batch: int) -> list[tuple]:
    """Parity feeds for the text encoder, none over ``max_batch`` (the real Wan profiles allow 2: one guidance
    pair). The second is the export's example: a batch of 2 where allowed, so the batch dim is traced dynamic."""
    prompts = ["a red circle on a black background", "many small striped blue squares", ""]
    real = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    ids, mask = real.input_ids, real.attention_mask
    b = min(2, max_batch)
    rand = torch.randint(0, vocab, (b, max_length), generator=gen)
    return [(ids[:1], mask[:1]), (ids[:b], mask[:b]), (ids[2:], mask[2:]), (rand, torch.ones_like(rand))]


def _export_text(parts, spec: WanSpec, folder: Path) -> dict:
    module, tokenizer = Umt5Embeds(parts["text_encoder"]).eval(), parts["tokenizer"]
    gen = torch.Generator().manual_seed(7)
    length = spec.t5_max_length
    feeds = _token_feeds(tokenizer, length, parts["text_encoder"].config.vocab_size, gen, spec.max_batch)
    batch = Dim("batch", min=1, max=spec.max_batch)
    names = ("input_ids", "attention_mask")
    path = folder / "text_encoder.onnx"
    dynamic = {"input_ids": {0: batch}, "attention_mask": {0: batch}}
    files = export_onnx(module, feeds[1], names, ("encoder_hidden_states",), dynamic, path, spec.opset)
    err = check_parity(path, module, feeds, names, spec.text_tolerance, "text_encoder")
    (folder / "tokenizer").mkdir()
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer" / "tokenizer.json"))
    return dict(
        onnx=path.name,
        files=[f.name for f in files],
        max_abs_error=err,
        inputs=list(names),
        output="encoder_hidden_states",
        tokenizer="tokenizer/tokenizer.json",
        max_length=length,
        pad_id=tokenizer.pad_token_id,
        pad_token=tokenizer.pad_token,
        eos_id=tokenizer.eos_token_id,
        padding="right, to max_length, truncation on; the template appends </s>",
        attention_mask="1 for every real token (</s> included), 0 for padding",
        prompt_clean=(
            "WanPipeline.prompt_clean: ftfy.fix_text if installed, html.unescape twice, collapse whitespace, strip"
        ),
    )


def _vae_dynamic(spec: WanSpec, caches, latent_h: int, latent_w: int) -> tuple[dict, tuple]:
    (lh0, lw0), (lh1, lw1) = spec.latent_hw(*spec.min_size), spec.latent_hw(*spec.max_size)
    batch = Dim("batch", min=1, max=spec.max_batch)
    h, w = Dim("latent_height", min=lh0, max=lh1), Dim("latent_width", min=lw0, max=lw1)

    def scaled(dim, size, base):
        s = size // base
        return dim if s == 1 else dim * s

    latent = {0: batch, 3: h, 4: w}
    cache = tuple({0: batch, 3: scaled(h, c.shape[3], latent_h), 4: scaled(w, c.shape[4], latent_w)} for c in caches)
    return latent, cache


def _session_fn(path: Path, names: tuple[str, ...]):
    session = ort_session(path)

    def run(*args):
        out = session.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})
        return [torch.from_numpy(o) for o in out]

    return run


def _vae_parity(spec: WanSpec, vae, first: Path, step: Path, step_names, gen) -> float:
    """Chain the two graphs over whole latents and compare with ``AutoencoderKLWan.decode``."""
    run_first, run_step = _session_fn(first, ("latent",)), _session_fn(step, step_names)
    worst = 0.0
    for batch, frames, height, width in parity_sizes(spec):
        z = torch.randn(
            batch, spec.latent_channels, spec.latent_frames(frames), *spec.latent_hw(height, width), generator=gen
        )
        with torch.no_grad():
            ref = vae.decode(z, return_dict=False)[0]
        got = decode_chunked(run_first, run_step, z)
        if got.shape != ref.shape:
            raise DDiTError(f"vae_decoder: chained ONNX video shape {tuple(got.shape)} != torch {tuple(ref.shape)}")
        err = (got - ref).abs().max().item()
        bound = spec.vae_tolerance.bound(ref.abs().max().item())
        worst = max(worst, err)
        if not err <= bound:
            raise DDiTError(
                f"vae_decoder: ONNX Runtime differs from AutoencoderKLWan.decode by {err:.3g} at latent shape "
                f"{tuple(z.shape)} (tolerance {bound:.3g}); the export is not trustworthy"
            )
    return worst


def _export_vae(parts, spec: WanSpec, folder: Path) -> dict:
    vae = parts["vae"]
    first, step = VaeDecodeFirst(vae).eval(), VaeDecodeStep(vae).eval()
    gen = torch.Generator().manual_seed(11)
    lh, lw = spec.latent_hw(*spec.opt_size)
    example = torch.randn(2, spec.latent_channels, 2, lh, lw, generator=gen)
    with torch.no_grad():
        caches = first(example[:, :, :1])[1:]
    latent_dyn, cache_dyn = _vae_dynamic(spec, caches, lh, lw)
    cache_in, cache_out = cache_names(vae, "cache_in"), cache_names(vae, "cache_out")
    paths = folder / "vae_decoder_first.onnx", folder / "vae_decoder_step.onnx"
    files = export_onnx(
        first, (example[:, :, :1],), ("latent",), ("video", *cache_out), {"latent": latent_dyn}, paths[0], spec.opset
    )
    step_names = ("latent", *cache_in)
    dyn = {"latent": latent_dyn, "caches": cache_dyn}
    files += export_onnx(
        step, (example[:, :, 1:], *caches), step_names, ("video", *cache_out), dyn, paths[1], spec.opset
    )
    err = _vae_parity(spec, vae, paths[0], paths[1], step_names, gen)
    return dict(
        mode="chunked",
        onnx=paths[0].name,
        step_onnx=paths[1].name,
        files=[f.name for f in files],
        max_abs_error=err,
        cache_inputs=cache_in,
        cache_outputs=cache_out,
        # cache j is [batch, channels_j, 2, latent_height * scale_j, latent_width * scale_j]
        cache_shapes=[dict(channels=c.shape[1], frames=c.shape[2], scale=c.shape[3] // lh) for c in caches],
        frames_first=1,
        frames_per_step=spec.vae_temporal_factor,
        loop=(
            "video = first(z[:, :, 0:1]) -> (video_0, caches); for i >= 1: step(z[:, :, i:i+1], caches) -> "
            "(video_i, caches); concatenate the videos along frames; cache_out_j feeds cache_in_j"
        ),
    )


def export_wan(
    model: str,
    spec: WanSpec,
    factors,
    out_dir: str | Path,
    adapters_path: str | None = None,
    force: bool = False,
    progress: bool = True,
    precision: str = "fp32",
) -> dict:
    """Export everything a Wan runtime needs into ``out_dir``; return the manifest.

    ``model``: ``tiny``, a local diffusers Wan folder, or a hub id. ``adapters_path``: a ddit-train adapters
    file, ``"none"`` for the untrained initialisation, or None (the tiny model's shipped file, else untrained).
    ``precision`` types the transformer graphs and TeaCache probes; the text encoder and the VAE stay float32.
    """
    factors = spec.check_factors(factors)
    out_dir = Path(out_dir)
    check_output_folder(out_dir, force)
    started = time.time()
    parts = load_wan(model, spec)
    adapters, adapters_file, trained = resolve_adapters(model, adapters_path, parts["transformer"], spec, factors)
    spec = export_spec(spec, model, adapters_file, precision)
    with staging_folder(out_dir, force) as folder:
        components = export_graphs(
            folder,
            factors,
            lambda k, dst: _export_transformer(parts, spec, adapters, k, dst, precision),
            lambda dst: {"text_encoder": _export_text(parts, spec, dst)},
            lambda dst: _export_vae(parts, spec, dst),
            progress,
        )
        untrained = "untrained: PI-resized Conv3d embedding, bilinear de-embedding, no LoRA"
        source = source_block(model, adapters_file, trained, untrained)
        blocks = wan_blocks(spec, factors, components, parts["vae"].config, parts["scheduler"])
        seconds = time.time() - started
        manifest = write_manifest(folder, spec, factors, components, source, seconds, blocks, precision)
    return manifest
