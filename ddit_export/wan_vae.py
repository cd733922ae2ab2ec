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


# ---- training helpers (the recipe's video VAE) ----------------------------------------------------------------------


def init_per_frame(vae) -> int:
    """Make a fresh ``AutoencoderKLWan`` a per-frame image VAE; return how many causal convs were changed.

    Every causal conv with a temporal kernel keeps only its last (current-frame) tap; the earlier taps are zeroed.
    The temporal resamplers' ``time_conv`` become identities on the current frame: the encoder's ``downsample3d``
    keeps the later frame of each pair, the decoder's ``upsample3d`` repeats a frame. The VAE then encodes frame
    4 i of a clip as latent frame i, exactly as it encodes that frame alone, and decodes each latent frame to 4
    copies of one image (tested).

    Why: a single-frame clip never reaches the earlier taps (they read the causal zero padding), so a 2D warm-up
    on single frames leaves them random, and a random ``time_conv`` scrambles every later frame. Starting per-frame,
    the 2D warm-up is a good video VAE for static clips, and the clip phase learns only what moves.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    changed = 0
    with torch.no_grad():
        for name, module in vae.named_modules():
            if isinstance(module, WanCausalConv3d) and name.endswith("time_conv"):
                weight = torch.zeros_like(module.weight)  # [copies * dim, dim, 3, 1, 1]
                dim = weight.shape[1]
                eye = torch.eye(dim, dtype=weight.dtype)
                for copy in range(weight.shape[0] // dim):
                    weight[copy * dim : (copy + 1) * dim, :, -1, 0, 0] = eye
                module.weight.copy_(weight)
                module.bias.zero_()
                changed += 1
            elif isinstance(module, WanCausalConv3d) and module.weight.shape[2] > 1:
                module.weight[:, :, :-1].zero_()
                changed += 1
    return changed


def decode_unclamped(vae, latent: torch.Tensor) -> torch.Tensor:
    """``AutoencoderKLWan.decode`` before its final clamp to [-1, 1]: ``[B, 16, F, h, w] -> [B, 3, 4 (F - 1) + 1, 8h,
    8w]``.

    For training: the clamp passes no gradient at saturated pixels, and our clips are mostly saturated colours, so
    a decoder that overshoots once can never come back. diffusers decodes frame by frame through ``vae.decoder``;
    a forward hook collects those outputs (Wan 2.1 has no output patchify).
    """
    if vae.use_tiling or vae.config.patch_size is not None:
        raise ValueError("decode_unclamped needs an untiled Wan 2.1 VAE (no tiling, no output patchify)")
    outputs = []
    handle = vae.decoder.register_forward_hook(lambda module, args, out: outputs.append(out))
    try:
        vae.decode(latent)
    finally:
        handle.remove()
    return torch.cat(outputs, dim=2)
