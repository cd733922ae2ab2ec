"""Writing an engines folder: the staging folder renamed into place at the end, and ``manifest.json``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from ddit_profiles import CalibratedTau, DDiTError, FittedTeaCache, FluxSpec, spec_from_dict
from ddit_runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file
from ddit_runtime.outputs import check_folder_writable

from . import __version__


def check_output_folder(out_dir: Path, force: bool) -> None:
    """Refuse an engines folder before the model loads (minutes at real sizes): one that exists without ``force``,
    or one whose parent, where the export stages it, cannot be written."""
    if out_dir.exists() and not force:
        raise DDiTError(f"output folder '{out_dir}' already exists: pass --force to replace it, or pick another -o")
    if out_dir.exists() and not out_dir.is_dir():
        raise DDiTError(f"-o '{out_dir}' is a file: give a folder")
    check_folder_writable(out_dir.resolve().parent, "-o", out_dir)


@contextlib.contextmanager
def staging_folder(out_dir: Path, force: bool):
    """Yield a fresh sibling folder; on success rename it to ``out_dir`` (replacing it if ``force``), else delete it.

    A failed or interrupted export leaves ``out_dir`` exactly as it was.
    """
    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = parent / f".{out_dir.name}.partial-{os.getpid()}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
    except OSError as e:
        raise DDiTError(f"cannot write into '{parent}' ({e.strerror}): pick a writable -o") from None
    try:
        yield stage
        if out_dir.exists():
            if not force:
                raise DDiTError(
                    f"output folder '{out_dir}' appeared during the export: pass --force or pick another -o"
                )
            old = parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
            stage.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            stage.rename(out_dir)
    finally:  # also on KeyboardInterrupt
        shutil.rmtree(stage, ignore_errors=True)


def io_contract(spec: FluxSpec, text: dict) -> dict:
    """Names, dtypes and symbolic shapes of every graph's inputs and outputs."""
    f32, i64 = "float32", "int64"
    latent = ["batch", spec.latent_channels, "latent_height", "latent_width"]
    return {
        "transformer": {
            "inputs": {
                "latent": [f32, latent],
                "timestep": [f32, ["batch"]],
                "guidance": [f32, ["batch"]],
                "encoder_hidden_states": [f32, ["batch", spec.t5_max_length, spec.joint_attention_dim]],
                "pooled_projections": [f32, ["batch", spec.pooled_dim]],
            },
            "outputs": {"velocity": [f32, latent]},
            "timestep_meaning": "flow-matching sigma in [0, 1] (the graph multiplies by 1000 as diffusers does)",
        },
        "text_encoder": {
            "inputs": {"input_ids": [i64, ["batch", text["text_encoder"]["max_length"]]]},
            "outputs": {"pooled_projections": [f32, ["batch", spec.pooled_dim]]},
        },
        "text_encoder_2": {
            "inputs": {"input_ids": [i64, ["batch", text["text_encoder_2"]["max_length"]]]},
            "outputs": {"encoder_hidden_states": [f32, ["batch", spec.t5_max_length, spec.joint_attention_dim]]},
        },
        "vae_decoder": {
            "inputs": {"latent": [f32, latent]},
            "outputs": {"image": [f32, ["batch", 3, "height", "width"]]},
            "input_meaning": "latent / scaling_factor + shift_factor (the runtime applies it)",
        },
    }


def flux_blocks(spec: FluxSpec, factors, components: dict) -> dict:
    """FLUX's family-specific manifest blocks: io, shapes, scheduler, latent, sigmas."""
    return {
        "io": io_contract(spec, components),
        "shapes": {
            "batch": [1, 1, spec.max_batch],
            "height": [spec.min_size[0], spec.opt_size[0], spec.max_size[0]],
            "width": [spec.min_size[1], spec.opt_size[1], spec.max_size[1]],
            "multiple": spec.resolution_multiple(factors),
        },
        "scheduler": scheduler_block(spec),
        "latent": {
            "channels": spec.latent_channels,
            "vae_scale_factor": spec.vae_scale_factor,
            "scaling_factor": spec.vae_scaling_factor,
            "shift_factor": spec.vae_shift_factor,
        },
        "sigmas": {
            "type": "flow_match_euler",
            "shift": "exponential, mu from the native token count",
            "base_seq_len": spec.shift.base_seq_len,
            "max_seq_len": spec.shift.max_seq_len,
            "base_shift": spec.shift.base_shift,
            "max_shift": spec.shift.max_shift,
        },
    }


def scheduler_block(spec) -> dict:
    """The DDiT scheduler defaults every family's manifest carries."""
    return {
        "tau": spec.scheduler.tau,
        "rho": spec.scheduler.rho,
        "warmup": spec.scheduler.warmup,
        "steps": spec.scheduler.steps,
        "guidance": spec.scheduler.guidance,
    }


def write_manifest(
    folder: Path,
    spec,
    factors,
    components: dict,
    source: dict,
    seconds: float,
    blocks: dict | None = None,
    precision: str = "fp32",
) -> dict:
    """Hash every file in ``folder`` and write ``manifest.json``; ``blocks`` are the family-specific sections
    (io, shapes, scheduler, latent, sigmas, ...), FLUX's when None. ``precision``: the transformer graphs' type
    (every graph's inputs and outputs are float32; the encoders and the VAE are float32 throughout)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        files[str(path.relative_to(folder))] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": spec.family,
        "profile": spec.to_dict(),
        "sizes": list(factors),
        "precision": precision,
        "source": source,
        "files": files,
        "components": components,
        **(blocks if blocks is not None else flux_blocks(spec, factors, components)),
        "exporter": {
            "ddit_version": __version__,
            "seconds": round(seconds, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def export_graphs(folder: Path, factors, transformer, text, vae, progress: bool) -> dict:
    """Every graph of an engines folder under one progress bar, then the dtype check; returns ``components``.

    ``transformer(k, folder)``, ``text(folder)`` (a dict of text components) and ``vae(folder)`` each export one
    part and return its manifest entry.
    """
    from tqdm.auto import tqdm

    from .onnx_io import check_graph_dtypes

    components: dict = {"transformer": {}}
    tasks = [(f"transformer k={k}", k) for k in factors] + [("text encoders", None), ("vae decoder", None)]
    bar = tqdm(tasks, desc="export", unit="graph", disable=not progress)
    for name, k in bar:
        bar.set_postfix_str(name)
        if k is not None:
            components["transformer"][str(k)] = transformer(k, folder)
        elif name == "text encoders":
            components |= text(folder)
        else:
            components["vae_decoder"] = vae(folder)
    check_graph_dtypes(folder)
    return components


def source_block(model: str, adapters_file: Path | None, trained: bool, untrained: str) -> dict:
    """Where the weights came from: the model, the adapters file and its sha256, and whether it was trained."""
    return dict(
        model=model,
        adapters=adapters_file.name if adapters_file else None,
        adapters_sha256=sha256_file(adapters_file) if adapters_file else None,
        adapters_trained=trained,
        initialisation="trained adapters" if trained else untrained,
    )


def write_manifest_atomic(folder: Path, data: dict) -> None:
    """Replace ``folder/manifest.json`` by a temporary file and a rename: readers see the old or the new one."""
    partial = folder / f".{MANIFEST}.partial-{os.getpid()}"
    try:
        partial.write_text(json.dumps(data, indent=2) + "\n")
        partial.replace(folder / MANIFEST)
    finally:
        partial.unlink(missing_ok=True)


def _update_profile(folder: str | Path, change, what: str) -> Path:
    """Replace ``folder``'s manifest with its profile block passed through ``change`` (a spec -> that block's new
    dict), keeping the rest as it is. The manifest is read again here, so a change made while a bench ran
    (``ddit-build``) is not lost; it is replaced whole, through a temporary file and a rename."""
    folder = Path(folder)
    try:
        data = json.loads((folder / MANIFEST).read_text())
        data["profile"] = change(spec_from_dict(data["profile"]), data["profile"])
        write_manifest_atomic(folder, data)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DDiTError(f"cannot record {what} in '{folder / MANIFEST}' ({e}): check the folder is writable") from None
    return folder / MANIFEST


def save_calibrated_tau(folder: str | Path, entry: CalibratedTau) -> Path:
    """Record ``entry`` in ``folder``'s manifest (the profile block's scheduler defaults, which the runtime reads),
    replacing any tau calibrated for the same shape; the rest of the manifest is kept as it is."""

    def change(spec, profile: dict) -> dict:
        return profile | dict(scheduler=dataclasses.asdict(spec.scheduler.with_calibrated(entry)))

    return _update_profile(folder, change, "the tau")


def without_profile_calibrations(spec):
    """``spec`` without the calibrated taus and fitted TeaCache polynomials its profile ships. A profile's own were
    measured on its embedded model's shipped weights and adapters, in float32 (the tiny FLUX's, at 512x512); an
    export of anything else keeps the profile's general tau and the published polynomial, so its manifest does not
    claim a calibration made on another model. ``ddit-bench --save-tau`` / ``--fit-teacache`` measure its own."""
    scheduler = dataclasses.replace(spec.scheduler, calibrated=())
    return dataclasses.replace(spec, scheduler=scheduler, teacache=dataclasses.replace(spec.teacache, fitted=()))


def save_fitted_teacache(folder: str | Path, entry: FittedTeaCache) -> Path:
    """Record ``entry`` in ``folder``'s manifest (the profile block's TeaCache spec, which the runtime reads),
    replacing any fit for the same shape; the rest of the manifest is kept as it is."""

    def change(spec, profile: dict) -> dict:
        return profile | dict(teacache=dataclasses.asdict(spec.teacache.with_fitted(entry)))

    return _update_profile(folder, change, "the TeaCache fit")
