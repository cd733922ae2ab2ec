"""Pretraining of the tiny text encoders on the caption grammar, before they are frozen.

FLUX and Wan take their text encoders pretrained and keep them frozen. Seeded random encoders are a poor stand-in:
their outputs for two captions differ by ~15%, and they do not say which colour word belongs to the background. A
diffusion transformer on a 2-core budget then never learns to follow the text. So the recipe pretrains each
encoder for a few seconds on a text-only task: from the encoder's output, linear heads must name every attribute
of the caption's scene (background, colour, shape, count, position, size). The encoders are then frozen for
everything after: the transformer, the DDiT adapters and the export.

The encoders see exactly what they see in use: T5 without an attention mask, padded to the profile's length, and
CLIP's pooled output (the end-of-text token). T5's head reads the mean over all positions.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from .shapes import (
    CAPTION_STYLES,
    COLOURS,
    COUNTS,
    MOTIONS,
    OPPOSITE,
    POSITIONS,
    SHAPES,
    SIZES,
    Clip,
    Scene,
    sample_clip,
    sample_scene,
)

#: Attribute -> its classes, in the order the heads predict them.
ATTRIBUTE_CLASSES: dict[str, tuple] = {
    "background": COLOURS,
    "colour": COLOURS,
    "shape": SHAPES,
    "count": COUNTS,
    "position": POSITIONS,
    "size": tuple(SIZES),
}
#: Video captions add the motion and its target (the side a ``move`` ends on, the colour a ``recolour`` turns).
CLIP_CLASSES: dict[str, tuple] = {**ATTRIBUTE_CLASSES, "motion": MOTIONS, "target": COLOURS + tuple(OPPOSITE)}


def scene_labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Class index of each attribute, ``{name: [N] int64}``."""
    return {
        name: torch.tensor([classes.index(getattr(s, name)) for s in scenes])
        for name, classes in ATTRIBUTE_CLASSES.items()
    }


def clip_labels(clips: list[Clip]) -> dict[str, torch.Tensor]:
    """``scene_labels`` of the clips' scenes plus ``motion`` and ``target``."""
    labels = scene_labels([c.scene for c in clips])
    for name in ("motion", "target"):
        labels[name] = torch.tensor([CLIP_CLASSES[name].index(getattr(c, name)) for c in clips])
    return labels


class AttributeHeads(nn.Module):
    """One linear classifier per attribute over a ``[N, D]`` feature."""

    def __init__(self, dim: int, classes: dict[str, tuple] = ATTRIBUTE_CLASSES):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(dim, len(v)) for k, v in classes.items()})

    def loss_and_accuracy(self, feature: torch.Tensor, labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        losses, hits = [], []
        for name, head in self.heads.items():
            logits = head(feature)
            losses.append(F.cross_entropy(logits, labels[name]))
            hits.append((logits.argmax(-1) == labels[name]).float().mean())
        return torch.stack(losses).sum(), float(torch.stack(hits).mean())


def _pretrain(encoders: dict, features, sample, classes: dict, steps: int, batch: int, seed: int, progress):
    """Train ``encoders`` ({name: module}) with one set of heads each on ``features(captions) -> {name: [N, D]}``;
    ``sample(rng, style_index) -> (caption, item)`` draws training items. Freezes them; returns held-out accuracy."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        heads = {name: AttributeHeads(dim, classes) for name, (_, dim) in encoders.items()}
    labels_of = clip_labels if "motion" in classes else scene_labels
    modules = nn.ModuleList([m for m, _ in encoders.values()] + list(heads.values())).train().requires_grad_(True)
    opt = torch.optim.AdamW(modules.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        styles = torch.randint(0, len(CAPTION_STYLES), (batch,), generator=gen).tolist()
        captions, items = zip(*(sample(rng, CAPTION_STYLES[i]) for i in styles), strict=True)
        labels = labels_of(list(items))
        feats = features(list(captions))
        loss = sum(heads[name].loss_and_accuracy(feats[name], labels)[0] for name in encoders)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, loss.item())
    modules.eval().requires_grad_(False)
    held_out = random.Random(seed + 1_000_003)
    captions, items = zip(*(sample(held_out, "auto") for _ in range(512)), strict=True)
    with torch.no_grad():
        feats, labels = features(list(captions)), labels_of(list(items))
        return {
            f"{name}_accuracy": round(heads[name].loss_and_accuracy(feats[name], labels)[1], 4) for name in encoders
        }


def _scene_caption(rng: random.Random, style: str):
    scene = sample_scene(rng)
    return scene.caption(style), scene


def _clip_caption(rng: random.Random, style: str):
    clip = sample_clip(rng)
    return clip.caption(style), clip


def pretrain_flux_text_encoders(
    parts: dict, clip_len: int, t5_len: int, steps: int = 400, batch: int = 64, seed: int = 0, progress=None
) -> dict[str, float]:
    """Train ``parts["text_encoder"]`` (CLIP) and ``parts["text_encoder_2"]`` (T5) in place, then freeze them.

    Returns the held-out attribute accuracy of each (1.0 = every attribute of every caption recovered).
    """
    clip, t5 = parts["text_encoder"], parts["text_encoder_2"]

    def features(captions):
        tok = parts["tokenizer"](
            captions, padding="max_length", max_length=clip_len, truncation=True, return_tensors="pt"
        )
        tok2 = parts["tokenizer_2"](
            captions, padding="max_length", max_length=t5_len, truncation=True, return_tensors="pt"
        )
        return {
            "clip": clip(input_ids=tok.input_ids).pooler_output,
            "t5": t5(input_ids=tok2.input_ids).last_hidden_state.mean(1),
        }

    encoders = {"clip": (clip, clip.config.hidden_size), "t5": (t5, t5.config.d_model)}
    return _pretrain(encoders, features, _scene_caption, ATTRIBUTE_CLASSES, steps, batch, seed, progress)


def pretrain_wan_text_encoder(
    parts: dict, t5_len: int, steps: int = 400, batch: int = 64, seed: int = 0, progress=None
) -> dict[str, float]:
    """Train ``parts["text_encoder"]`` (umT5) in place on video captions, then freeze it.

    The feature is what Wan's transformer reads: the masked umT5 states (padding zeroed), averaged over the real
    tokens. The heads name the scene's attributes, the motion and its target. Returns held-out accuracy.
    """
    t5 = parts["text_encoder"]

    def features(captions):
        tok = parts["tokenizer"](
            captions, padding="max_length", max_length=t5_len, truncation=True, return_tensors="pt"
        )
        mask = tok.attention_mask.unsqueeze(-1).float()
        hidden = t5(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state * mask
        return {"umt5": hidden.sum(1) / mask.sum(1)}

    encoders = {"umt5": (t5, t5.config.d_model)}
    return _pretrain(encoders, features, _clip_caption, CLIP_CLASSES, steps, batch, seed, progress)
