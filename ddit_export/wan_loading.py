"""Load a Wan 2.1 checkpoint's components: ``tiny``, a local diffusers folder, or a hub id (offline cache honoured).

``--model tiny`` uses the recipe-trained tiny model under ``tiny_models/wan`` when one is installed, else seeded
random weights of the real classes (WanTransformer3DModel, UMT5EncoderModel, AutoencoderKLWan) with a word-level
T5-style tokenizer over the caption vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ddit_profiles import DDiTError, WanSpec, profile_for, random_configs

from .loading import offline_note
from .tiny import CAPTION_WORDS, _word_tokenizer, save_components, shipped_model

COMPONENTS = ("transformer", "text_encoder", "vae", "tokenizer")
#: diffusers' Wan 2.1 scheduler (UniPCMultistepScheduler with flow sigmas), used when a folder has none.
DEFAULT_SCHEDULER = dict(
    _class_name="UniPCMultistepScheduler",
    num_train_timesteps=1000,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    solver_order=2,
    solver_type="bh2",
    predict_x0=True,
    lower_order_final=True,
    final_sigmas_type="zero",
    timestep_spacing="linspace",
)


def tiny_wan_tokenizer(spec: WanSpec):
    """A umT5-style word-level fast tokenizer: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, template ``$A </s>``."""
    return _word_tokenizer(
        CAPTION_WORDS,
        ["<pad>", "</s>", "<unk>"],
        "$A </s>",
        pad="<pad>",
        eos="</s>",
        bos=None,
        max_len=spec.t5_max_length,
    )


def build_tiny_wan(spec: WanSpec, seed: int = 0, tokenizer=None) -> dict:
    """Seeded random tiny Wan components, keyed like a diffusers WanPipeline folder."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = spec.tiny_configs
    tok = tokenizer or tiny_wan_tokenizer(spec)
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**cfg["transformer"])
    text_config = UMT5Config(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
        **cfg["text_encoder"],
    )
    vae_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg["vae"].items()}
    return dict(
        transformer=transformer,
        text_encoder=UMT5EncoderModel(text_config),
        vae=AutoencoderKLWan(**vae_cfg),
        tokenizer=tok,
        scheduler=dict(DEFAULT_SCHEDULER),
    )


def save_wan_components(parts: dict, folder: str | Path) -> Path:
    """Write components as a diffusers Wan folder (safetensors weights, one subfolder each, scheduler config)."""
    folder = save_components({k: v for k, v in parts.items() if k in COMPONENTS}, folder)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(parts["scheduler"], indent=2) + "\n")
    (folder / "model_index.json").write_text('{"_class_name": "WanPipeline", "_diffusers_version": "0.42.0"}\n')
    return folder


def load_wan(model: str, spec: WanSpec, transformer_dtype: torch.dtype = torch.float32) -> dict:
    """Components keyed as in a WanPipeline folder (plus ``scheduler``: its config dict), eval mode: fp32, but for
    the transformer in ``transformer_dtype`` (see ``loading.load_flux``)."""
    if model == "random":
        random_configs(spec)  # one-line error for a profile without configs
        parts = build_tiny_wan(spec)
    elif model == "tiny":
        shipped = shipped_model(spec.family) if spec.name == profile_for(spec.family, "tiny").name else None
        parts = _from_pretrained(str(shipped), transformer_dtype) if shipped else build_tiny_wan(spec)
    else:
        parts = _from_pretrained(model, transformer_dtype)
    if next(parts["transformer"].parameters()).dtype != transformer_dtype:  # built ones (random, tiny unbuilt)
        parts["transformer"] = parts["transformer"].to(transformer_dtype)
    for name in ("transformer", "text_encoder", "vae"):
        parts[name] = parts[name].eval().requires_grad_(False)
    parts["text_encoder"].set_attn_implementation("eager")  # sdpa's T5 path does not export with dynamo
    check_against_profile(parts, spec)
    return parts


def _source(model: str) -> str:
    local = Path(model).expanduser()
    if local.exists():
        missing = [c for c in COMPONENTS if not (local / c).is_dir()]
        if missing:
            raise DDiTError(f"'{model}' is not a diffusers Wan folder: it lacks {', '.join(missing)}")
        return str(local)
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return model  # a hub id: huggingface_hub reads the cache and honours HF_HUB_OFFLINE
    raise DDiTError(f"model '{model}' is neither a local diffusers folder nor a hub id (org/name), nor 'tiny'")


def _scheduler_config(source: str) -> dict:
    """The folder's scheduler config, or diffusers' Wan 2.1 defaults when it has none."""
    try:
        from diffusers import UniPCMultistepScheduler

        return dict(UniPCMultistepScheduler.load_config(source, subfolder="scheduler"))
    except (OSError, ValueError):
        return dict(DEFAULT_SCHEDULER)


def _from_pretrained(model: str, transformer_dtype: torch.dtype = torch.float32) -> dict:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    source = _source(model)
    kw = dict(use_safetensors=True, torch_dtype=torch.float32)  # never unpickle weights; export in fp32
    try:
        return dict(
            transformer=WanTransformer3DModel.from_pretrained(
                source, subfolder="transformer", **dict(kw, torch_dtype=transformer_dtype)
            ),
            text_encoder=UMT5EncoderModel.from_pretrained(source, subfolder="text_encoder", **kw),
            vae=AutoencoderKLWan.from_pretrained(source, subfolder="vae", **kw),
            tokenizer=AutoTokenizer.from_pretrained(source, subfolder="tokenizer"),
            scheduler=_scheduler_config(source),
        )
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DDiTError(f"could not load '{model}'{offline_note()}: {first}") from None


def check_against_profile(parts: dict, spec: WanSpec) -> None:
    """Refuse a checkpoint whose architecture facts differ from the profile's, naming the mismatch."""
    cfg, vae = parts["transformer"].config, parts["vae"].config
    facts = {
        "transformer in_channels": (cfg.in_channels, spec.latent_channels),
        "transformer out_channels": (cfg.out_channels, spec.latent_channels),
        "transformer patch_size": (tuple(cfg.patch_size), (1, spec.native_patch, spec.native_patch)),
        "transformer num_layers": (cfg.num_layers, spec.num_layers),
        "transformer num_attention_heads": (cfg.num_attention_heads, spec.num_heads),
        "transformer attention_head_dim": (cfg.attention_head_dim, spec.head_dim),
        "transformer ffn_dim": (cfg.ffn_dim, spec.ffn_dim),
        "transformer text_dim": (cfg.text_dim, spec.text_dim),
        "transformer image_dim": (cfg.image_dim, None),  # text-to-video only
        "umT5 d_model": (parts["text_encoder"].config.d_model, spec.text_dim),
        "VAE z_dim": (vae.z_dim, spec.latent_channels),
        "VAE is_residual": (bool(vae.is_residual), False),  # the Wan 2.1 VAE, not 2.2's
        "VAE patch_size": (vae.patch_size, None),
        "VAE spatial compression": (2 ** (len(vae.dim_mult) - 1), spec.vae_scale_factor),
        "VAE temporal compression": (2 ** sum(vae.temperal_downsample), spec.vae_temporal_factor),
    }
    bad = [f"{k} is {got}, expected {want}" for k, (got, want) in facts.items() if got != want]
    if bad:
        raise DDiTError(
            f"checkpoint does not match profile '{spec.name}': {'; '.join(bad)} (pass --profile with a matching one)"
        )
