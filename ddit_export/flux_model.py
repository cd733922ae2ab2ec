"""The exported FLUX engine: one patch factor behind the shared I/O contract, built on the untouched diffusers model.

``FluxEngine`` takes the full-resolution latent and returns the full-resolution velocity; packing, RoPE ids at
coarse-token centres, and the residual path are inside the graph. ``size_variant`` swaps a size's adapters into
the diffusers model (and merges its LoRA) for the duration of an export or a reference run.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ddit_profiles import DDiTError, FluxSpec
from ddit_runtime.patchify import pack, unpack

from .adapters import DDiTAdapters, SizeAdapter, lora_config

#: peft's LoRA A init is random: seeded per size factor, whatever the caller's RNG state (bit-identical runs).
LORA_INIT_SEED = 20260211


class Float32FluxPosEmbed(nn.Module):
    """diffusers' FluxPosEmbed in float32: TensorRT has no float64. ids [N, 3] -> (cos, sin), each [N, sum(axes)]."""

    def __init__(self, theta: int, axes_dim):
        super().__init__()
        self.axes_dim = list(axes_dim)
        freqs = [1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d) for d in self.axes_dim]
        self.register_buffer("freqs", torch.cat(freqs).float(), persistent=False)

    def forward(self, ids: torch.Tensor):
        cos, sin, start = [], [], 0
        for axis, dim in enumerate(self.axes_dim):
            angles = torch.outer(ids[:, axis].float(), self.freqs[start : start + dim // 2])  # [N, dim/2]
            start += dim // 2
            cos.append(angles.cos().repeat_interleave(2, dim=1))
            sin.append(angles.sin().repeat_interleave(2, dim=1))
        return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def image_ids(rows: int, cols: int, factor: int, device=None, reference: int | None = None) -> torch.Tensor:
    """[rows*cols, 3] RoPE ids (0, row, col) of coarse tokens at their fine-grid centres: k*i + (k-1)/2.

    ``reference`` (fine-grid tokens per side, or None): on a fine grid whose longer side has more tokens than that,
    every position is scaled by ``reference / longer side``, so the ids keep the span the model was trained on
    (position interpolation; the aspect ratio is kept). FLUX itself uses absolute positions (None).
    """
    offset = (factor - 1) / 2
    r = torch.arange(rows, device=device, dtype=torch.float32) * factor + offset
    c = torch.arange(cols, device=device, dtype=torch.float32) * factor + offset
    if reference is not None:  # tensor arithmetic on the (symbolic) grid size: the exported graph stays dynamic
        longer = torch.maximum(
            torch.full((), rows * factor, device=device), torch.full((), cols * factor, device=device)
        )
        scale = torch.clamp(reference / longer.float(), max=1.0)
        r, c = r * scale, c * scale
    grid = torch.stack(
        [torch.zeros(rows, cols, device=device), r[:, None].expand(rows, cols), c[None, :].expand(rows, cols)], dim=-1
    )
    return grid.reshape(rows * cols, 3)


class FluxEngine(nn.Module):
    """latent [B,16,H,W], timestep [B] (sigma in [0,1]), guidance [B], T5 [B,T,D], pooled [B,P] -> velocity [B,16,H,W].

    With ``residual=True`` (the exported graph) it also returns what the blocks added to the image tokens,
    ``residual`` [B, rows_k, cols_k, D] (the input of ``norm_out`` minus the output of ``x_embedder``, tokens
    row-major as packed): TeaCache's cache.
    Use inside ``size_variant(transformer, adapter)`` so the transformer carries size ``factor``'s adapters.
    """

    def __init__(
        self, transformer, spec: FluxSpec, factor: int, adapter: SizeAdapter | None = None, residual: bool = False
    ):
        super().__init__()
        self.transformer, self.spec, self.factor, self.adapter = transformer, spec, factor, adapter
        self.residual = residual

    def forward(self, latent, timestep, guidance, encoder_hidden_states, pooled_projections):
        _, _, height, width = latent.shape
        t = self.transformer
        patch = self.spec.patch_pixels(self.factor)
        tokens = pack(latent, patch)  # [B, N, C*patch^2]
        img_ids = image_ids(height // patch, width // patch, self.factor, latent.device, self.spec.rope_reference)
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=latent.device)
        seen: dict = {}
        hooks = []
        if self.residual:  # the diffusers forward stays untouched: read the two tensors as they pass (hooks -> None)
            hooks.append(t.x_embedder.register_forward_hook(lambda m, args, out: seen.update(embedded=out)))
            hooks.append(t.norm_out.register_forward_pre_hook(lambda m, args: seen.update(blocks=args[0])))
        try:
            out = t(
                hidden_states=tokens,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance,
                return_dict=False,
            )[0]
        finally:
            for hook in hooks:
                hook.remove()
        velocity = unpack(out, patch, height, width)
        if self.adapter is not None:
            velocity = velocity + self.adapter.residual_velocity(latent, timestep)
        if self.residual:
            return velocity, (seen["blocks"] - seen["embedded"]).unflatten(1, (height // patch, width // patch))
        return velocity


class FluxTeaCacheProbe(nn.Module):
    """Size ``factor``'s TeaCache probe: the cheap parts of the forward around a cached residual.

    latent [B,16,H,W], timestep [B], guidance [B], pooled [B,P], residual [B,rows_k,cols_k,D] ->
    (modulated [B,N_k,D]: block 0's modulated input norm1(x_embedder(tokens), temb), the signal;
     velocity [B,16,H,W]: the head (norm_out, proj_out, unpack, adapter residual) on x_embedder(tokens) + residual).
    Built inside the same ``size_variant`` as the size's ``FluxEngine``, so it sees the same merged weights.
    """

    def __init__(self, transformer, spec: FluxSpec, factor: int, adapter: SizeAdapter | None = None):
        super().__init__()
        self.transformer, self.spec, self.factor, self.adapter = transformer, spec, factor, adapter

    def forward(self, latent, timestep, guidance, pooled_projections, residual):
        t = self.transformer
        _, _, height, width = latent.shape
        patch = self.spec.patch_pixels(self.factor)
        hidden = t.x_embedder(pack(latent, patch))
        sigma, timestep = timestep, timestep.to(hidden.dtype) * 1000  # as FluxTransformer2DModel.forward
        if t.config.guidance_embeds:
            temb = t.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled_projections)
        else:
            temb = t.time_text_embed(timestep, pooled_projections)
        modulated = t.transformer_blocks[0].norm1(hidden, emb=temb)[0]
        hidden = hidden + residual.flatten(1, 2)
        velocity = unpack(t.proj_out(t.norm_out(hidden, temb)), patch, height, width)
        if self.adapter is not None:
            velocity = velocity + self.adapter.residual_velocity(latent, sigma)
        return modulated, velocity


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _replace(model, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@contextlib.contextmanager
def applied_lora(transformer, adapters: DDiTAdapters, factor: int, merge: bool = True, trainable: bool = False):
    """Inject size ``factor``'s LoRA with peft and load its weights; with ``merge``, fold it in (W += s * B @ A)
    and leave plain Linears behind, as the exported graph needs. Unmerged is the trainer's and the reference's view.

    ``trainable`` injects even with no saved weights (peft's init: B = 0), leaves the LoRA parameters trainable,
    and writes their final values back into ``adapters.lora[factor]`` on exit.
    On exit the merge is undone and the peft wrappers are removed, so the base serves the next size.
    """
    state = adapters.lora.get(factor) or {}
    if not state and not trainable:
        yield
        return
    from peft import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

    name = f"ddit_size{factor}"
    with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global RNG: make the init reproducible
        torch.manual_seed(LORA_INIT_SEED + factor)
        inject_adapter_in_model(lora_config(transformer, adapters.rank, adapters.alpha), transformer, adapter_name=name)
    for pname, param in transformer.named_parameters():  # peft makes them in the base's dtype: a bf16 base
        if "lora_" in pname and param.dtype != torch.float32:  # (ddit-train --base-dtype bf16) still trains,
            param.data = param.data.float()  # loads and saves its LoRA in fp32
    layers = _lora_layers(transformer)
    try:
        try:
            result = set_peft_model_state_dict(transformer, state, adapter_name=name) if state else None
        except RuntimeError as e:
            raise DDiTError(
                f"adapters LoRA for size {factor} does not fit the model: {str(e).splitlines()[0]}"
            ) from None
        unexpected = getattr(result, "unexpected_keys", None) or []
        if unexpected:
            raise DDiTError(f"adapters LoRA for size {factor} has keys the model lacks, e.g. {unexpected[0]}")
        if merge:
            for lname, layer in layers:
                layer.merge(adapter_names=[name])
                _replace(transformer, lname, layer.get_base_layer())
        for pname, param in transformer.named_parameters():
            if "lora_" in pname:
                param.requires_grad_(trainable)
        yield
    finally:
        if trainable:
            saved = get_peft_model_state_dict(transformer, adapter_name=name)
            adapters.lora[factor] = {k: v.detach().clone() for k, v in saved.items()}
        for lname, layer in layers:
            _replace(transformer, lname, layer)
            if layer.merged:
                layer.unmerge()
            _replace(transformer, lname, layer.get_base_layer())
        configs = getattr(transformer, "peft_config", None)
        if isinstance(configs, dict):
            configs.pop(name, None)
            if not configs:
                del transformer.peft_config


@contextlib.contextmanager
def size_variant(
    transformer, adapters: DDiTAdapters | None, factor: int, merge_lora: bool = True, trainable: bool = False
):
    """Swap size ``factor``'s embedding/de-embedding and a float32 RoPE into ``transformer``; restore on exit.

    Factor 1 only swaps the RoPE (numerically the base's, without float64). ``merge_lora=False`` keeps the LoRA
    as a separate peft branch (the student as trained); ``trainable`` is the trainer's view (see ``applied_lora``).
    Yields the ``SizeAdapter`` or None.
    """
    saved = dict(x_embedder=transformer.x_embedder, proj_out=transformer.proj_out, pos_embed=transformer.pos_embed)
    transformer.pos_embed = Float32FluxPosEmbed(saved["pos_embed"].theta, saved["pos_embed"].axes_dim)
    adapter = adapters.sizes[factor] if (adapters is not None and factor > 1) else None
    try:
        if adapter is None:
            yield None
            return
        transformer.x_embedder, transformer.proj_out = adapter.embed, adapter.unembed
        with applied_lora(transformer, adapters, factor, merge=merge_lora and not trainable, trainable=trainable):
            yield adapter
    finally:
        for key, module in saved.items():
            setattr(transformer, key, module)
