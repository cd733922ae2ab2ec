"""The embedded ``tiny`` models: real diffusers/transformers classes at toy size, with word-level tokenizers.

For now the weights are random (seeded, so every export of ``--model tiny`` is identical); the embedded-model
recipe replaces them with trained ones. ``save_tiny_flux`` writes a diffusers-layout folder, which tests load back
through the real ``from_pretrained`` path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from ddit_profiles import FluxSpec

#: Caption vocabulary of the procedural shapes data set (colours, shapes, counts, sizes, places, patterns).
CAPTION_WORDS = (
    "a an the one two three four five six many several few some of on in at with and"
    " red green blue yellow orange purple pink white black gray grey brown cyan magenta"
    " circle circles square squares triangle triangles stripe stripes striped dot dots dotted ring rings star stars"
    " small large big tiny huge medium bright dark light plain solid"
    " background left right top bottom center centre middle corner upper lower"
    " image picture photo of shape shapes pattern checkered gradient scene"
).split()


def _word_tokenizer(specials: list[str], template: str, pad: str, eos: str, bos: str | None, max_len: int):
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(CAPTION_WORDS)))}
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
    clip = _word_tokenizer(
        ["<|startoftext|>", "<|endoftext|>", "<unk>"],
        "<|startoftext|> $A <|endoftext|>",
        pad="<|endoftext|>",
        eos="<|endoftext|>",
        bos="<|startoftext|>",
        max_len=spec.clip_max_length,
    )
    t5 = _word_tokenizer(
        ["<pad>", "</s>", "<unk>"], "$A </s>", pad="<pad>", eos="</s>", bos=None, max_len=spec.t5_max_length
    )
    return clip, t5


def build_tiny_flux(spec: FluxSpec, seed: int = 0) -> dict:
    """Seeded random tiny FLUX components, keyed like a diffusers FluxPipeline folder."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    cfg = spec.tiny_configs
    clip_tok, t5_tok = tiny_tokenizers(spec)
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


def save_tiny_flux(spec: FluxSpec, folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny components as a diffusers FLUX folder (safetensors weights, one subfolder each)."""
    folder = Path(folder)
    for name, component in build_tiny_flux(spec, seed).items():
        kw = {} if name.startswith("tokenizer") else {"safe_serialization": True}
        component.save_pretrained(folder / name, **kw)
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline", "_diffusers_version": "0.42.0"}\n')
    return folder
