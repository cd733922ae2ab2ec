"""The Wan 2.1 VAE decoder as two ONNX graphs that decode one latent frame per call, with explicit caches.

``AutoencoderKLWan.decode`` runs its causal decoder one latent frame at a time, carrying a feature cache (the
last two input frames of every causal conv) from call to call; the frame loop is Python, so one graph cannot
decode a dynamic frame count. We export that loop's body instead:

- ``vae_decoder_first``: latent frame 0 ``[B, 16, 1, h, w]`` -> ``video`` ``[B, 3, 1, 8h, 8w]`` + caches;
- ``vae_decoder_step``: latent frame i > 0 plus the caches -> ``video`` ``[B, 3, 4, 8h, 8w]`` + new caches.

Every cache is ``[B, c, 2, h', w']`` (two frames). diffusers' first-call states are normalised to that: a
one-frame cache gets a zero frame in front (the causal conv zero-pads there anyway) and the temporal upsampler's
"Rep" marker becomes two zero frames (its causal conv zero-pads the same). ``decode_chunked`` is the loop the
runtime runs; it equals ``AutoencoderKLWan.decode`` (tested). Memory stays that of one latent frame per call.
The input is the denormalised latent ``latent * latents_std + latents_mean``; the output is clamped to [-1, 1].
"""

from __future__ import annotations

import torch
from torch import nn

CACHE_FRAMES = 2  # diffusers' CACHE_T


def cache_count(vae) -> int:
    """How many caches the decoder carries: one per causal conv with a temporal kernel (1x1x1 shortcuts take none).

    diffusers allocates a slot per causal conv (``_conv_num``) and uses the first ``cache_count`` of them.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) and m._padding[4] > 0 for m in vae.decoder.modules())


def cache_names(vae, prefix: str) -> list[str]:
    return [f"{prefix}_{i}" for i in range(cache_count(vae))]


def _temporal_upsamplers(vae) -> list[nn.Module]:
    return [m for m in vae.decoder.modules() if getattr(m, "mode", None) == "upsample3d"]


class VaeDecodeFirst(nn.Module):
    """latent frame 0 ``[B, 16, 1, h, w]`` -> (video ``[B, 3, 1, 8h, 8w]``, cache_0, ..., cache_{n-1})."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        seen: list[torch.Tensor] = []  # the temporal upsamplers' inputs, in the order they take cache slots
        hooks = [
            m.register_forward_pre_hook(lambda _m, args: seen.append(args[0])) for m in _temporal_upsamplers(self.vae)
        ]
        try:
            feat: list = [None] * cache_count(self.vae)  # the slots used, in order
            x = self.vae.post_quant_conv(latent)
            video = self.vae.decoder(x, feat_cache=feat, feat_idx=[0], first_chunk=True)
        finally:
            for h in hooks:
                h.remove()
        reps = iter(seen)
        caches = []
        for c in feat:
            if isinstance(c, str):  # "Rep": the upsampler's causal conv will see two zero frames
                c = torch.zeros_like(next(reps)).expand(-1, -1, CACHE_FRAMES, -1, -1).contiguous()
            elif c.shape[2] < CACHE_FRAMES:
                c = torch.cat([torch.zeros_like(c[:, :, :1]), c], dim=2)
            caches.append(c)
        return (video.clamp(-1.0, 1.0), *caches)


class VaeDecodeStep(nn.Module):
    """(latent frame i > 0 ``[B, 16, 1, h, w]``, caches) -> (video ``[B, 3, 4, 8h, 8w]``, new caches)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent, *caches):
        feat = list(caches)
        x = self.vae.post_quant_conv(latent)
        video = self.vae.decoder(x, feat_cache=feat, feat_idx=[0], first_chunk=False)
        return (video.clamp(-1.0, 1.0), *feat)


def decode_chunked(first, step, latent: torch.Tensor) -> torch.Tensor:
    """Decode ``[B, 16, F, h, w]`` with the two callables (torch modules or ONNX sessions wrapped alike).

    The runtime's loop: frame 0 through ``first``, every later frame through ``step`` with the previous caches;
    concatenate the videos along time. Returns ``[B, 3, 4 (F - 1) + 1, 8h, 8w]``.
    """
    video, *caches = first(latent[:, :, :1])
    parts = [video]
    for i in range(1, latent.shape[2]):
        video, *caches = step(latent[:, :, i : i + 1], *caches)
        parts.append(video)
    return torch.cat(parts, dim=2)
