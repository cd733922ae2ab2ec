"""DDiT per-patch-size adapters: PI-resized patch embedding, bilinear de-embedding, patch-size embedding,
residual path, and LoRA (peft) on every block's feed-forward layers. Also the adapters file (safetensors).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ddit_profiles import DDiTError, FluxSpec, profile_for

from .manifest import without_profile_calibrations
from .tiny import shipped_adapters

ADAPTERS_FORMAT = "ddit-adapters/1"
# The 1/sigma residual is capped at 5x: a floor of 0.01 (100x) trained worse (2026-11-23; that run is not recorded).
SIGMA_FLOOR = 0.2


def bilinear_matrix(patch: int, new_patch: int) -> torch.Tensor:
    """[new_patch^2, patch^2] float64: column j is the bilinear upsample (half-pixel centres) of unit pixel j."""
    eye = torch.eye(patch * patch, dtype=torch.float64).reshape(patch * patch, 1, patch, patch)
    up = F.interpolate(eye, size=(new_patch, new_patch), mode="bilinear", align_corners=False)
    return up.reshape(patch * patch, new_patch * new_patch).T


def pi_resize_embedding(weight: torch.Tensor, channels: int, patch: int, new_patch: int) -> torch.Tensor:
    """FlexiViT PI-resize of a patch embedding: [D, C*p*p] -> [D, C*q*q] with w_new = pinv(B^T) w per (d, c).

    Gives <x, w> == <B x, w_new> for every patch x, where B = ``bilinear_matrix(p, q)``.
    """
    b = bilinear_matrix(patch, new_patch)  # [q^2, p^2]
    p_inv = torch.linalg.pinv(b.T)  # [q^2, p^2]
    w = weight.double().reshape(weight.shape[0], channels, patch * patch)  # [D, C, p^2]
    return (w @ p_inv.T).reshape(weight.shape[0], -1).to(weight.dtype)  # [D, C*q^2]


def upsample_deembedding(weight: torch.Tensor, bias: torch.Tensor, channels: int, patch: int, new_patch: int):
    """Bilinear de-embedding init: [C*p*p, D], [C*p*p] -> [C*q*q, D], [C*q*q] so output = B (native output)."""
    b = bilinear_matrix(patch, new_patch).to(torch.float64)  # [q^2, p^2]
    w = weight.double().reshape(channels, patch * patch, -1)  # [C, p^2, D]
    new_w = torch.einsum("qp,cpd->cqd", b, w).reshape(channels * new_patch * new_patch, -1)
    new_b = (bias.double().reshape(channels, patch * patch) @ b.T).reshape(-1)
    return new_w.to(weight.dtype), new_b.to(bias.dtype)


class SizeEmbedding(nn.Module):
    """Patch embedding for one coarse size plus its learnable patch-size embedding: tokens -> [B, N, D]."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(in_features, dim)
        self.size_embedding = nn.Parameter(torch.zeros(dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens) + self.size_embedding


class SizeAdapter(nn.Module):
    """Everything size k adds to the frozen base except LoRA: embed, de-embed and the latent residual path."""

    def __init__(self, spec: FluxSpec, factor: int, dim: int):
        super().__init__()
        self.factor = factor
        channels = spec.token_channels(factor)
        self.embed = SizeEmbedding(channels, dim)
        self.unembed = nn.Linear(dim, channels)
        # Residual from the input latent to the velocity: a per-pixel channel mix, zero at init.
        self.residual = nn.Linear(spec.latent_channels, spec.latent_channels)
        nn.init.zeros_(self.residual.weight)
        nn.init.zeros_(self.residual.bias)
        # The same, scaled by 1 / sigma. Where the image is flat, the velocity's detail inside a coarse patch is
        # z_t's detail / sigma (v = (z_t - x0) / sigma): a coarse token cannot carry it and a sigma-blind channel
        # mix cannot scale it. Zero at init; files without it load as zero.
        self.residual_sigma = nn.Linear(spec.latent_channels, spec.latent_channels, bias=False)
        nn.init.zeros_(self.residual_sigma.weight)

    @classmethod
    def from_base(cls, transformer, spec: FluxSpec, factor: int) -> SizeAdapter:
        """The untrained initialisation: PI-resized embedding and bilinear-upsampled de-embedding of the base."""
        adapter = cls(spec, factor, transformer.inner_dim)
        p, q, c = spec.native_patch, spec.patch_pixels(factor), spec.latent_channels
        with torch.no_grad():
            adapter.embed.proj.weight.copy_(pi_resize_embedding(transformer.x_embedder.weight, c, p, q))
            adapter.embed.proj.bias.copy_(transformer.x_embedder.bias)
            w, b = upsample_deembedding(transformer.proj_out.weight, transformer.proj_out.bias, c, p, q)
            adapter.unembed.weight.copy_(w)
            adapter.unembed.bias.copy_(b)
        return adapter

    def residual_velocity(self, latent: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """latent [B, C, H, W], sigma [B] in (0, 1] -> [B, C, H, W]: the residual paths' share of the velocity."""
        x = latent.movedim(1, -1)  # [B, H, W, C]
        scale = 1.0 / sigma.to(x.dtype).clamp_min(SIGMA_FLOOR).view(-1, 1, 1, 1)
        return (self.residual(x) + self.residual_sigma(x) * scale).movedim(-1, 1)


def lora_targets(transformer) -> list[str]:
    """Full names of every block's feed-forward linears (a bare 'proj_out' would also hit the final layer)."""
    if hasattr(transformer, "blocks"):  # Wan: blocks.{i}.ffn is a diffusers FeedForward
        return [f"blocks.{i}.ffn.{lin}" for i in range(len(transformer.blocks)) for lin in ("net.0.proj", "net.2")]
    names = []
    for i in range(len(transformer.transformer_blocks)):
        for ff in ("ff", "ff_context"):
            names += [f"transformer_blocks.{i}.{ff}.net.0.proj", f"transformer_blocks.{i}.{ff}.net.2"]
    for i in range(len(transformer.single_transformer_blocks)):
        names += [f"single_transformer_blocks.{i}.proj_mlp", f"single_transformer_blocks.{i}.proj_out"]
    return names


def lora_config(transformer, rank: int, alpha: float):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=lora_targets(transformer), init_lora_weights=True)


class DDiTAdapters:
    """The adapters of every coarse size: ``SizeAdapter`` modules plus peft LoRA state dicts, keyed by factor."""

    def __init__(
        self,
        sizes: dict[int, SizeAdapter],
        lora: dict[int, dict[str, torch.Tensor]],
        rank: int,
        alpha: float,
        meta: dict,
    ):
        self.sizes, self.lora, self.rank, self.alpha, self.meta = sizes, lora, rank, alpha, meta

    @property
    def factors(self) -> list[int]:
        return sorted(self.sizes)

    def save(self, path: str | Path) -> None:
        tensors = {}
        for k, adapter in self.sizes.items():
            tensors |= {f"size{k}.{n}": t.detach().contiguous() for n, t in adapter.state_dict().items()}
            tensors |= {f"size{k}.lora.{n}": t.detach().contiguous() for n, t in self.lora[k].items()}
        meta = dict(
            self.meta,
            format=ADAPTERS_FORMAT,
            sizes=",".join(map(str, self.factors)),
            rank=str(self.rank),
            alpha=str(self.alpha),
        )
        save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()})


def model_signature(transformer, spec: FluxSpec) -> dict:
    """What an adapters file must agree with: family and the transformer's shape-defining config."""
    c = transformer.config
    sig = dict(family=spec.family, inner_dim=inner_dim(transformer), num_layers=c.num_layers)
    if getattr(c, "num_single_layers", None) is not None:  # FLUX
        sig["num_single_layers"] = c.num_single_layers
    return dict(sig, in_channels=c.in_channels)


def inner_dim(transformer) -> int:
    """The transformer's token width (FLUX has ``inner_dim``; Wan's is heads x head_dim)."""
    if hasattr(transformer, "inner_dim"):
        return transformer.inner_dim
    return transformer.config.num_attention_heads * transformer.config.attention_head_dim


def size_adapter_class(spec):
    """The per-size adapter module of ``spec``'s family: ``SizeAdapter`` (FLUX) or ``WanSizeAdapter``."""
    if spec.family == "wan":
        from .wan_model import WanSizeAdapter

        return WanSizeAdapter
    return SizeAdapter


def load_adapters(path: str | Path, transformer, spec: FluxSpec, factors: list[int]) -> DDiTAdapters:
    """Read an adapters file and check it fits ``transformer`` and covers every coarse size in ``factors``."""
    path = Path(path)
    if not path.is_file():
        raise DDiTError(f"adapters file '{path}' does not exist: pass the .safetensors file ddit-train wrote")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise DDiTError(f"adapters file '{path}' is not a readable safetensors file ({e})") from None
    if meta.get("format") != ADAPTERS_FORMAT:
        raise DDiTError(
            f"'{path}' is not a DDiT adapters file (format {meta.get('format')!r}, expected {ADAPTERS_FORMAT!r})"
        )
    want = model_signature(transformer, spec)
    bad = [f"{k} {meta.get(k)} != {v}" for k, v in want.items() if meta.get(k) != str(v)]
    if bad:
        raise DDiTError(f"adapters file '{path}' was trained for another model ({'; '.join(bad)})")
    have = [int(s) for s in meta.get("sizes", "").split(",") if s]
    missing = [k for k in factors if k > 1 and k not in have]
    if missing:
        raise DDiTError(
            f"adapters file '{path}' has sizes {have} but not {missing}: train those or drop them from --sizes"
        )
    rank, alpha = int(meta["rank"]), float(meta["alpha"])
    sizes, lora = {}, {}
    for k in [k for k in factors if k > 1]:
        adapter = size_adapter_class(spec)(spec, k, inner_dim(transformer))
        prefix, lora_prefix = f"size{k}.", f"size{k}.lora."
        own = {
            n[len(prefix) :]: t for n, t in tensors.items() if n.startswith(prefix) and not n.startswith(lora_prefix)
        }
        if hasattr(adapter, "residual_sigma"):  # files from before the 1/sigma residual: zero, as at init
            own.setdefault("residual_sigma.weight", torch.zeros_like(adapter.residual_sigma.weight))
        try:
            adapter.load_state_dict(own, strict=True)
        except RuntimeError as e:
            raise DDiTError(
                f"adapters file '{path}' size {k} does not fit the model: {str(e).splitlines()[0]}"
            ) from None
        sizes[k] = adapter.eval().requires_grad_(False)
        lora[k] = {n[len(lora_prefix) :]: t for n, t in tensors.items() if n.startswith(lora_prefix)}
    return DDiTAdapters(sizes, lora, rank, alpha, meta)


def untrained_adapters(transformer, spec: FluxSpec, factors: list[int], rank: int = 32) -> DDiTAdapters:
    """PI-resize/bilinear initialisation with no LoRA (B = 0 in peft's init, so it would be a no-op)."""
    cls = size_adapter_class(spec)
    sizes = {k: cls.from_base(transformer, spec, k).eval().requires_grad_(False) for k in factors if k > 1}
    return DDiTAdapters(
        sizes, {k: {} for k in sizes}, rank, float(rank), dict(model_signature(transformer, spec), trained="false")
    )


def export_spec(spec, model: str, adapters_file, precision: str):
    """``spec`` as an export's manifest records it: the profile's own calibrated taus and fitted TeaCache
    polynomials stay only for a float32 export of the embedded model with its shipped adapters, what they were
    measured on (``manifest.without_profile_calibrations``)."""
    shipped = model == "tiny" and adapters_file is not None and adapters_file == shipped_adapters(spec.family)
    return spec if shipped and precision == "fp32" else without_profile_calibrations(spec)


def resolve_adapters(model: str, adapters_path, transformer, spec, factors) -> tuple:
    """(adapters, path or None, trained): the given file, the tiny model's shipped one, or the untrained init."""
    if adapters_path is None and model == "tiny" and spec.name == profile_for(spec.family, "tiny").name:
        adapters_path = shipped_adapters(spec.family)  # the embedded model ships its trained adapters, if built
    if adapters_path == "none":
        adapters_path = None
    if not adapters_path:
        return untrained_adapters(transformer, spec, list(factors)), None, False
    adapters = load_adapters(adapters_path, transformer, spec, list(factors))
    return adapters, Path(adapters_path), adapters.meta.get("trained", "true") == "true"
