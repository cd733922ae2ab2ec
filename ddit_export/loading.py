"""Load a FLUX checkpoint's components: ``tiny``, a local diffusers folder, or a hub id (offline cache honoured)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ddit_profiles import DDiTError, FluxSpec, profile_for, random_configs

from .tiny import build_tiny_flux, shipped_model

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2")


def load_flux(model: str, spec: FluxSpec, transformer_dtype: torch.dtype = torch.float32) -> dict:
    """Components keyed as in a FluxPipeline folder, eval mode, checked against ``spec``: fp32, but for the
    transformer in ``transformer_dtype`` (``ddit-train --base-dtype bf16``: read from the checkpoint in that dtype,
    so FLUX.1-dev's 12B never exist in fp32 on the host)."""
    if model == "random":
        random_configs(spec)  # one-line error for a profile without configs
        parts = build_tiny_flux(spec)
    elif model == "tiny":
        shipped = shipped_model(spec.family) if spec.name == profile_for(spec.family, "tiny").name else None
        parts = _from_pretrained(str(shipped), transformer_dtype) if shipped else build_tiny_flux(spec)
    else:
        parts = _from_pretrained(model, transformer_dtype)
    if next(parts["transformer"].parameters()).dtype != transformer_dtype:  # built ones (random, tiny unbuilt)
        parts["transformer"] = parts["transformer"].to(transformer_dtype)
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        parts[name] = parts[name].eval().requires_grad_(False)
    parts["text_encoder_2"].set_attn_implementation("eager")  # sdpa's T5 path does not export with dynamo
    check_against_profile(parts, spec)
    return parts


def _from_pretrained(model: str, transformer_dtype: torch.dtype = torch.float32) -> dict:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    local = Path(model).expanduser()
    if local.exists():
        missing = [c for c in COMPONENTS if not (local / c).is_dir()]
        if missing:
            raise DDiTError(f"'{model}' is not a diffusers FLUX folder: it lacks {', '.join(missing)}")
        source = str(local)
    elif model.count("/") == 1 and not model.startswith((".", "/")):
        source = model  # a hub id: huggingface_hub reads the cache and honours HF_HUB_OFFLINE
    else:
        raise DDiTError(f"model '{model}' is neither a local diffusers folder nor a hub id (org/name), nor 'tiny'")
    kw = dict(use_safetensors=True, torch_dtype=torch.float32)  # never unpickle weights; export in fp32
    try:
        return dict(
            transformer=FluxTransformer2DModel.from_pretrained(
                source, subfolder="transformer", **dict(kw, torch_dtype=transformer_dtype)
            ),
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw),
            text_encoder_2=T5EncoderModel.from_pretrained(source, subfolder="text_encoder_2", **kw),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **kw),
            tokenizer=AutoTokenizer.from_pretrained(source, subfolder="tokenizer"),
            tokenizer_2=AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2"),
        )
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DDiTError(f"could not load '{model}'{offline_note()}: {first}") from None


def offline_note() -> str:
    """What a failed hub load adds when huggingface_hub is offline. Its own flag, not the environment: the hub reads
    HF_HUB_OFFLINE once, at import, so a variable set later changes nothing and must not be claimed."""
    from huggingface_hub import constants

    return " (HF_HUB_OFFLINE is set, so only the local cache was searched)" if constants.is_offline_mode() else ""


def with_vae_normalisation(spec: FluxSpec, vae) -> FluxSpec:
    """``spec`` with the checkpoint's own latent normalisation: ``latent' = (latent - shift_factor) * scaling_factor``.

    The profile's values are FLUX.1's (0.3611, 0.1159). A VAE trained elsewhere, such as the embedded tiny one,
    measures its own, and the transformer was trained on latents normalised with them: the manifest (so the
    runtime's decode) and ``ddit-train --images`` must use the VAE's, never the profile's.
    """
    shift = vae.config.get("shift_factor")  # None in VAEs without a shift (SD's): no shift
    return dataclasses.replace(
        spec, vae_scaling_factor=float(vae.config.scaling_factor), vae_shift_factor=float(shift or 0.0)
    )


def check_against_profile(parts: dict, spec: FluxSpec) -> None:
    """Refuse a checkpoint whose architecture facts differ from the profile's, naming the mismatch."""
    cfg = parts["transformer"].config
    facts = {
        "transformer in_channels": (cfg.in_channels, spec.token_channels(1)),
        "transformer patch_size": (cfg.patch_size, 1),
        "transformer joint_attention_dim": (cfg.joint_attention_dim, spec.joint_attention_dim),
        "transformer pooled_projection_dim": (cfg.pooled_projection_dim, spec.pooled_dim),
        "transformer guidance_embeds": (bool(cfg.guidance_embeds), spec.guidance_embedded),
        "transformer num_layers": (cfg.num_layers, spec.num_layers),
        "transformer num_single_layers": (cfg.num_single_layers, spec.num_single_layers),
        "transformer num_attention_heads": (cfg.num_attention_heads, spec.num_heads),
        "transformer attention_head_dim": (cfg.attention_head_dim, spec.head_dim),
        "CLIP hidden size": (parts["text_encoder"].config.hidden_size, spec.pooled_dim),
        "T5 d_model": (parts["text_encoder_2"].config.d_model, spec.joint_attention_dim),
        "VAE latent_channels": (parts["vae"].config.latent_channels, spec.latent_channels),
    }
    bad = [f"{k} is {got}, expected {want}" for k, (got, want) in facts.items() if got != want]
    if bad:
        raise DDiTError(
            f"checkpoint does not match profile '{spec.name}': {'; '.join(bad)} (pass --profile with a matching one)"
        )
