"""The embedded ``tiny`` models: real diffusers/transformers classes at toy size, with word-level tokenizers.

``ddit-recipe flux --install`` trains them and installs them under ``tiny_models/flux`` in the package, which
``--model tiny`` then loads through the real ``from_pretrained`` path. Without that folder, ``--model tiny`` falls
back to seeded random weights of the same classes (what the recipe starts from).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from ddit_profiles import FluxSpec

from .shapes import VOCABULARY

#: Where the recipe installs the trained tiny models (diffusers layout, plus adapters.safetensors and recipe.json).
PACKAGE_MODELS = Path(__file__).parent / "tiny_models"


def shipped_model(family: str = "flux") -> Path | None:
    """The trained tiny model folder shipped in the package, or None when it has not been built."""
    folder = PACKAGE_MODELS / family
    return folder if (folder / "model_index.json").is_file() else None


def shipped_adapters(family: str = "flux") -> Path | None:
    folder = shipped_model(family)
    return folder / "adapters.safetensors" if folder and (folder / "adapters.safetensors").is_file() else None


#: Every word a caption of the procedural shapes data set can contain (image and clip captions).
CAPTION_WORDS = tuple(VOCABULARY)


def _word_tokenizer(words, specials: list[str], template: str, pad: str, eos: str, bos: str | None, max_len: int):
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(words) - set(specials)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in specials if t in template]
    )
    kw = dict(unk_token="<unk>", pad_token=pad, eos_token=eos, model_max_length=max_len)
    if bos:
        kw["bos_token"] = bos
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


def tiny_tokenizers(spec: FluxSpec):
    """(CLIP-style, T5-style) fast tokenizers over the caption vocabulary."""
    return word_tokenizers(spec, CAPTION_WORDS)


def word_tokenizers(spec: FluxSpec, words):
    """(CLIP-style, T5-style) word-level fast tokenizers over ``words``, lower-cased, unknown words -> <unk>."""
    clip = _word_tokenizer(
        words,
        ["<|startoftext|>", "<|endoftext|>", "<unk>"],
        "<|startoftext|> $A <|endoftext|>",
        pad="<|endoftext|>",
        eos="<|endoftext|>",
        bos="<|startoftext|>",
        max_len=spec.clip_max_length,
    )
    t5 = _word_tokenizer(
        words, ["<pad>", "</s>", "<unk>"], "$A </s>", pad="<pad>", eos="</s>", bos=None, max_len=spec.t5_max_length
    )
    return clip, t5


def build_tiny_flux(spec: FluxSpec, seed: int = 0, tokenizers=None) -> dict:
    """Seeded random tiny FLUX components, keyed like a diffusers FluxPipeline folder."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    cfg = spec.tiny_configs
    clip_tok, t5_tok = tokenizers or tiny_tokenizers(spec)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**cfg["transformer"])
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
            **cfg["text_encoder"],
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,
            **cfg["text_encoder_2"],
        )
    )
    vae = AutoencoderKL(**cfg["vae"])
    return dict(
        transformer=transformer, text_encoder=clip, text_encoder_2=t5, vae=vae, tokenizer=clip_tok, tokenizer_2=t5_tok
    )


def save_components(parts: dict, folder: str | Path) -> Path:
    """Write components as a diffusers FLUX folder (safetensors weights, one subfolder each)."""
    folder = Path(folder)
    for name, component in parts.items():
        kw = {} if name.startswith("tokenizer") else {"safe_serialization": True}
        component.save_pretrained(folder / name, **kw)
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline", "_diffusers_version": "0.42.0"}\n')
    return folder
