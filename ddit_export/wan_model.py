"""The exported Wan engine: one patch factor behind the shared I/O contract, built on the untouched diffusers model.

``WanEngine`` takes the full-resolution latent ``[B, 16, F, H, W]`` and returns the velocity of the same shape.
Inside: pad H and W up to a multiple of the factor's patch (replicate padding), patchify with a (1, 2k, 2k) Conv3d,
RoPE cos/sin from coarse-token centres (float32, no complex numbers), the base model's condition embedder and
blocks, the de-embedding and unpatchify, the crop back to H x W, and the size's latent residual. The exported
engine also returns what the blocks added to the tokens (TeaCache's cache), and ``WanTeaCacheProbe`` is the cheap
rest: the timestep embedding (TeaCache's signal) and the velocity from a cached residual.

The engine reuses the diffusers model's submodules (``condition_embedder``, ``blocks``, ``norm_out``,
``scale_shift_table``) and mirrors ``WanTransformer3DModel.forward`` for text-to-video (1-D timestep, no image
conditioning); at k = 1 it equals that forward (tested). ``wan_size_variant`` merges size k's LoRA into the blocks
for the duration of an export or a reference run.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ddit_profiles import WanSpec

from .adapters import DDiTAdapters, pi_resize_embedding, upsample_deembedding
from .flux_model import applied_lora

ROPE_THETA = 10000.0  # WanRotaryPosEmbed's default; the model config does not expose it


def rope_dims(head_dim: int) -> tuple[int, int, int]:
    """(t, h, w) channel split of a head, as diffusers' WanRotaryPosEmbed: h = w = 2 * (head_dim // 6)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def token_positions(frames, rows, cols, factor: int, device=None):
    """1-D RoPE positions per axis: frames 0..F-1; rows and columns at fine-grid centres k*i + (k-1)/2."""
    offset = (factor - 1) / 2
    t = torch.arange(frames, device=device, dtype=torch.float32)
    h = torch.arange(rows, device=device, dtype=torch.float32) * factor + offset
    w = torch.arange(cols, device=device, dtype=torch.float32) * factor + offset
    return t, h, w


class WanPositionRope(nn.Module):
    """Wan's 3-axis RoPE in float32 from (fractional) positions: returns (cos, sin), each ``[1, N, 1, head_dim]``.

    Same frequency layout as diffusers' WanRotaryPosEmbed (t/h/w split, ``repeat_interleave_real``), but computed
    from positions instead of sliced out of a table by integer index, so coarse tokens keep the full extent.
    """

    def __init__(self, head_dim: int, theta: float = ROPE_THETA):
        super().__init__()
        self.dims = rope_dims(head_dim)
        for axis, dim in zip("thw", self.dims, strict=True):
            freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim)
            self.register_buffer(f"freqs_{axis}", freqs.float(), persistent=False)

    def forward(self, frames, rows, cols, factor: int):
        t, h, w = token_positions(frames, rows, cols, factor, self.freqs_t.device)
        at = torch.outer(t, self.freqs_t)[:, None, None, :].expand(-1, rows, cols, -1)
        ah = torch.outer(h, self.freqs_h)[None, :, None, :].expand(frames, -1, cols, -1)
        aw = torch.outer(w, self.freqs_w)[None, None, :, :].expand(frames, rows, -1, -1)
        angles = torch.cat([at, ah, aw], dim=-1).reshape(1, -1, 1, sum(self.dims) // 2)  # [1, N, 1, D/2]
        return angles.cos().repeat_interleave(2, dim=-1), angles.sin().repeat_interleave(2, dim=-1)


def pad_to_multiple(latent: torch.Tensor, patch: int) -> torch.Tensor:
    """Replicate-pad ``[B, C, F, H, W]`` at the bottom and right so H and W are multiples of ``patch``."""
    height, width = latent.shape[-2:]
    return F.pad(latent, (0, (-width) % patch, 0, (-height) % patch, 0, 0), mode="replicate")


def _deembedding_to_channel_major(weight, bias, channels: int, patch: int):
    """Wan's proj_out rows are (ph, pw, c) with c innermost; ``upsample_deembedding`` wants (c, ph, pw)."""
    w = weight.reshape(patch, patch, channels, -1).permute(2, 0, 1, 3).reshape(channels * patch * patch, -1)
    b = bias.reshape(patch, patch, channels).permute(2, 0, 1).reshape(-1)
    return w, b


def _deembedding_to_wan_order(weight, bias, channels: int, patch: int):
    w = weight.reshape(channels, patch, patch, -1).permute(1, 2, 0, 3).reshape(patch * patch * channels, -1)
    b = bias.reshape(channels, patch, patch).permute(1, 2, 0).reshape(-1)
    return w, b


class WanSizeEmbedding(nn.Module):
    """Conv3d patch embedding with kernel = stride = (1, q, q) plus the learnable patch-size embedding."""

    def __init__(self, channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv3d(channels, dim, kernel_size=(1, patch, patch), stride=(1, patch, patch))
        self.size_embedding = nn.Parameter(torch.zeros(dim))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] (H, W multiples of q) -> tokens [B, F*(H/q)*(W/q), D]."""
        return self.proj(latent).flatten(2).transpose(1, 2) + self.size_embedding


class WanSizeAdapter(nn.Module):
    """Everything size k adds to the frozen Wan base except LoRA: embed, de-embed and the latent residual path.

    The de-embedding ``unembed`` is Linear(D -> q*q*C) in Wan's (ph, pw, c) output order.
    """

    def __init__(self, spec: WanSpec, factor: int, dim: int):
        super().__init__()
        self.factor = factor
        c, q = spec.latent_channels, spec.patch_pixels(factor)
        self.embed = WanSizeEmbedding(c, dim, q)
        self.unembed = nn.Linear(dim, spec.token_channels(factor))
        self.residual = nn.Linear(c, c)  # per-pixel channel mix from the latent to the velocity, zero at init
        nn.init.zeros_(self.residual.weight)
        nn.init.zeros_(self.residual.bias)

    @classmethod
    def from_base(cls, transformer, spec: WanSpec, factor: int) -> WanSizeAdapter:
        """The untrained initialisation: PI-resized Conv3d kernel and bilinear-upsampled de-embedding of the base."""
        conv = transformer.patch_embedding
        adapter = cls(spec, factor, conv.out_channels)
        p, q, c = spec.native_patch, spec.patch_pixels(factor), spec.latent_channels
        with torch.no_grad():
            w = pi_resize_embedding(conv.weight.reshape(conv.out_channels, -1), c, p, q)
            adapter.embed.proj.weight.copy_(w.reshape(conv.out_channels, c, 1, q, q))
            adapter.embed.proj.bias.copy_(conv.bias)
            w, b = _deembedding_to_channel_major(transformer.proj_out.weight, transformer.proj_out.bias, c, p)
            w, b = upsample_deembedding(w, b, c, p, q)
            w, b = _deembedding_to_wan_order(w, b, c, q)
            adapter.unembed.weight.copy_(w)
            adapter.unembed.bias.copy_(b)
        return adapter

    def residual_velocity(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] -> [B, C, F, H, W]: the residual path's contribution to the velocity."""
        return self.residual(latent.movedim(1, -1)).movedim(-1, 1)


def unpatchify(tokens: torch.Tensor, frames, rows, cols, patch: int) -> torch.Tensor:
    """[B, F*rows*cols, q*q*C] in Wan's (pt=1, ph, pw, c) order -> [B, C, F, rows*q, cols*q], as diffusers does."""
    b = tokens.shape[0]
    x = tokens.reshape(b, frames, rows, cols, 1, patch, patch, -1)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, F, 1, rows, q, cols, q]
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)


class WanEngine(nn.Module):
    """latent [B,16,F,H,W], timestep [B] (sigma * 1000, in [0, 1000]), umT5 [B,T,D] -> velocity [B,16,F,H,W].

    With ``residual=True`` (the exported graph) it also returns what the blocks added to the tokens,
    ``residual`` [B, F, rows_k, cols_k, D] on the size's padded token grid (the blocks' output minus the patch
    embedding's): TeaCache's cache.
    Use inside ``wan_size_variant(transformer, adapters, factor)`` so the blocks carry size ``factor``'s LoRA.
    """

    def __init__(
        self, transformer, spec: WanSpec, factor: int, adapter: WanSizeAdapter | None = None, residual: bool = False
    ):
        super().__init__()
        self.transformer, self.spec, self.factor, self.adapter = transformer, spec, factor, adapter
        self.residual = residual
        self.rope = WanPositionRope(transformer.config.attention_head_dim)

    def _embed(self, latent: torch.Tensor) -> torch.Tensor:
        if self.adapter is not None:
            return self.adapter.embed(latent)
        return self.transformer.patch_embedding(latent).flatten(2).transpose(1, 2)

    def _tokens(self, latent: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[B, C, F, H, W] -> (embedded tokens [B, F*rows*cols, D] of the padded latent, (F, rows, cols))."""
        patch = self.spec.patch_pixels(self.factor)
        padded = pad_to_multiple(latent, patch)
        grid = latent.shape[2], padded.shape[3] // patch, padded.shape[4] // patch
        return self._embed(padded).contiguous(), grid

    def _head(self, hidden: torch.Tensor, temb: torch.Tensor, latent: torch.Tensor, grid) -> torch.Tensor:
        """The blocks' output [B, N, D] and temb [B, D] -> velocity [B, C, F, H, W]: norm_out with the scale-shift
        table, the de-embedding, unpatchify, the crop back to the latent's H x W, and the size's latent residual."""
        t = self.transformer
        shift, scale = (t.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = (t.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        proj = self.adapter.unembed if self.adapter is not None else t.proj_out
        height, width = latent.shape[-2:]
        out = unpatchify(proj(hidden), *grid, self.spec.patch_pixels(self.factor))[:, :, :, :height, :width]
        if self.adapter is not None:
            out = out + self.adapter.residual_velocity(latent)
        return out

    def forward(self, latent, timestep, encoder_hidden_states):
        t = self.transformer
        embedded, grid = self._tokens(latent)
        rotary = self.rope(*grid, self.factor)
        temb, timestep_proj, context, _ = t.condition_embedder(timestep, encoder_hidden_states, None)
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
        checkpointing = torch.is_grad_enabled() and t.gradient_checkpointing  # as WanTransformer3DModel.forward
        hidden = embedded
        for block in t.blocks:
            if checkpointing:
                hidden = t._gradient_checkpointing_func(block, hidden, context, timestep_proj, rotary)
            else:
                hidden = block(hidden, context, timestep_proj, rotary)
        out = self._head(hidden, temb, latent, grid)
        if self.residual:
            return out, (hidden - embedded).unflatten(1, grid)
        return out


class WanTeaCacheProbe(WanEngine):
    """Size ``factor``'s TeaCache probe: the cheap parts of ``WanEngine`` around a cached residual.

    latent [B,16,F,H,W], timestep [B], residual [B,F,rows_k,cols_k,D] ->
    (temb [B, D]: the timestep embedding (diffusers' ``temb``, the original Wan's ``e``), the signal;
     velocity [B,16,F,H,W]: ``WanEngine``'s head on the patch embedding plus ``residual``).
    Built inside the same ``wan_size_variant`` as the size's ``WanEngine``, so it sees the same weights.
    """

    def forward(self, latent, timestep, residual):
        embedded, grid = self._tokens(latent)
        temb = timestep_embedding(self.transformer.condition_embedder, timestep).type_as(embedded)
        return temb, self._head(embedded + residual.flatten(1, 3), temb, latent, grid)


def timestep_embedding(embedder, timestep: torch.Tensor) -> torch.Tensor:
    """timestep [B] -> temb [B, D]: ``WanTimeTextImageEmbedding.forward``'s time path, without the text."""
    proj = embedder.timesteps_proj(timestep)
    dtype = next(iter(embedder.time_embedder.parameters())).dtype
    if proj.dtype != dtype and dtype != torch.int8:
        proj = proj.to(dtype)
    return embedder.time_embedder(proj)


@contextlib.contextmanager
def wan_size_variant(
    transformer, adapters: DDiTAdapters | None, factor: int, merge_lora: bool = True, trainable: bool = False
):
    """Yield size ``factor``'s ``WanSizeAdapter`` (None at k = 1) with its LoRA applied to the blocks' FFNs.

    ``merge_lora=False`` keeps the LoRA as a separate peft branch (the student as trained); ``trainable`` is the
    trainer's view (see ``flux_model.applied_lora``). The base modules are never replaced, so nothing to restore.
    """
    adapter = adapters.sizes[factor] if (adapters is not None and factor > 1) else None
    if adapter is None:
        yield None
        return
    with applied_lora(transformer, adapters, factor, merge=merge_lora and not trainable, trainable=trainable):
        yield adapter
