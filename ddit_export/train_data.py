"""Training data for the adapters: clean latents with their text embeddings, cached as safetensors shards.

(a) ``--prompts FILE``: the base model generates the latents itself (the paper's approach). FLUX: native-size
    flow-matching Euler with the embedded guidance; Wan: native-size UniPC flow sampling with classifier-free
    guidance against the profile's negative prompt, exactly as the Wan runtime samples.
(b) ``--images DIR`` (FLUX only): images encoded by the VAE; a ``name.txt`` beside ``name.png`` is its caption.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ddit_profiles import DDiTError, FluxSpec, WanSpec
from ddit_runtime.guidance import guided_velocity
from ddit_runtime.manifest import sha256_file
from ddit_runtime.sigmas import flux_sigmas
from ddit_runtime.unipc import UniPCFlowSampler, wan_flow_sigmas, wan_flow_timesteps

from .flux_model import FluxEngine, size_variant
from .shapes import OPPOSITE, clip_caption, scene_from_seed

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SHARD = 64  # samples per cache shard


def builtin_captions(count: int, seed: int = 0) -> list[str]:
    """Captions of the procedural shapes data set, for ``--model tiny`` runs without a prompt file."""
    return [scene_from_seed(seed * 1_000_003 + 500_000_000 + i).caption() for i in range(count)]


def builtin_clip_captions(count: int, seed: int = 0) -> list[str]:
    """Video captions of the procedural shapes data set (a group moving or turning another colour), for
    ``ddit-train wan --model tiny`` without a prompt file: the scenes of ``builtin_captions``, each given a motion."""
    out = []
    for i in range(count):
        scene = scene_from_seed(seed * 1_000_003 + 500_000_000 + i)
        out.append(clip_caption(scene, "move" if scene.position in OPPOSITE and i % 2 == 0 else "recolour"))
    return out


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DDiTError(f"prompt file '{path}' does not exist: give a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    prompts = [p for p in prompts if p]
    if len(prompts) < 2:
        raise DDiTError(f"prompt file '{path}' has {len(prompts)} prompts: give at least 2 (one per line)")
    return prompts


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DDiTError(f"image folder '{folder}' does not exist")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(images) < 2:
        raise DDiTError(f"image folder '{folder}' has {len(images)} images ({', '.join(IMAGE_SUFFIXES)}): need 2+")
    return images


def transformer_autocast(transformer, device):
    """bfloat16 autocast where the transformer holds bfloat16 weights (``ddit-train --base-dtype bf16``), so its
    float32 inputs meet them in bf16 matmuls; a no-op for an fp32 transformer. Any bf16 weight counts, not the
    first one: the swapped-in adapters and LoRA are fp32."""
    if all(p.dtype != torch.bfloat16 for p in transformer.parameters()):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


@torch.no_grad()
def encode_prompts(
    parts: dict, spec: FluxSpec, prompts: list[str], device, chunk: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts -> (T5 states [N, T, D], pooled CLIP [N, P]), tokenised as diffusers' FluxPipeline does, ``chunk``
    prompts per encoder call: T5-XXL's activations for a thousand prompts at 512 tokens would not fit a GPU."""
    clip, t5_encoder = parts["text_encoder"].to(device), parts["text_encoder_2"].to(device)
    t5, pooled = [], []
    for start in range(0, len(prompts), chunk):
        batch = prompts[start : start + chunk]
        tok = parts["tokenizer"](
            batch, padding="max_length", max_length=spec.clip_max_length, truncation=True, return_tensors="pt"
        )
        tok2 = parts["tokenizer_2"](
            batch, padding="max_length", max_length=spec.t5_max_length, truncation=True, return_tensors="pt"
        )
        pooled.append(clip(input_ids=tok.input_ids.to(device)).pooler_output.float().cpu())
        t5.append(t5_encoder(input_ids=tok2.input_ids.to(device)).last_hidden_state.float().cpu())
    return torch.cat(t5), torch.cat(pooled)


@torch.no_grad()
def generate_latents(
    parts,
    spec: FluxSpec,
    t5,
    pooled,
    height: int,
    width: int,
    steps: int,
    seed: int,
    device,
    progress: bool,
    empty=None,
) -> torch.Tensor:
    """The base model's own samples: native-size flow-matching Euler from seeded noise -> latents [N, 16, h, w].

    With ``empty`` (the empty prompt's T5 states [1, T, D] and pooled [1, P]) and the profile's ``true_cfg`` above 1,
    each step is guided as the runtime guides it: v = v_empty + true_cfg * (v_prompt - v_empty).
    """
    transformer = parts["transformer"].to(device)
    lh, lw = spec.latent_hw(height, width)
    sigmas = flux_sigmas(steps, spec.shift.mu(spec.image_seq_len(height, width))).tolist()
    scale = spec.scheduler.true_cfg
    guided = empty is not None and scale > 1.0
    rows = 2 if guided else 1
    out = []
    with size_variant(transformer, None, 1), transformer_autocast(transformer, device):
        engine = FluxEngine(transformer, spec, 1)
        guidance = torch.full((rows,), spec.scheduler.guidance, device=device)
        for i in tqdm(range(t5.shape[0]), desc="generate latents", unit="sample", disable=not progress):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            z = torch.randn(1, spec.latent_channels, lh, lw, generator=gen).to(device)
            text, vec = t5[i : i + 1].to(device), pooled[i : i + 1].to(device)
            if guided:  # one batch of two: the prompt, then the empty prompt
                text, vec = torch.cat([text, empty[0].to(device)]), torch.cat([vec, empty[1].to(device)])
            for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
                v = engine(z.expand(rows, -1, -1, -1), torch.full((rows,), s, device=device), guidance, text, vec)
                v = v.float()  # the latent stays fp32 under a bf16 base's autocast
                v = guided_velocity(v[:1], v[1:], scale) if guided else v
                z = z + (s_next - s) * v
            out.append(z.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_wan_prompts(parts: dict, spec: WanSpec, prompts: list[str], device, chunk: int = 16) -> torch.Tensor:
    """prompts -> umT5 states [N, T, D] with padded positions zeroed: what the exported text encoder computes
    (``Umt5Embeds``: right padding to ``t5_max_length``, the tokenizer's attention mask)."""
    from .wan_export import Umt5Embeds

    module = Umt5Embeds(parts["text_encoder"].to(device))
    out = []
    for start in range(0, len(prompts), chunk):
        tok = parts["tokenizer"](
            prompts[start : start + chunk],
            padding="max_length",
            max_length=spec.t5_max_length,
            truncation=True,
            return_tensors="pt",
        )
        out.append(module(tok.input_ids.to(device), tok.attention_mask.to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def generate_wan_latents(
    parts, spec: WanSpec, text, negative, frames: int, height: int, width: int, steps: int, seed: int, device, progress
) -> torch.Tensor:
    """The base model's own videos: native-size UniPC flow sampling from seeded noise, classifier-free guidance with
    ``spec.guidance_scale`` against ``negative`` ([1, T, D], the negative prompt's states), as ``WanRuntime`` does
    (batched cond/uncond, diffusers' integer timesteps) -> latents [N, 16, F_lat, h, w]."""
    from .wan_model import WanEngine

    transformer = parts["transformer"].to(device)
    lh, lw = spec.latent_hw(height, width)
    shape = (1, spec.latent_channels, spec.latent_frames(frames), lh, lw)
    shift, scale = spec.flow_shift(height, width), spec.guidance_scale
    sampler = UniPCFlowSampler(wan_flow_sigmas(steps, shift))
    timesteps = wan_flow_timesteps(steps, shift).tolist()
    guided = scale > 1.0
    engine = WanEngine(transformer, spec, 1).to(device)
    autocast = transformer_autocast(transformer, device)  # decided once: it reads every weight's dtype
    out = []
    for i in tqdm(range(text.shape[0]), desc="generate latents", unit="video", disable=not progress):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        z = torch.randn(shape, generator=gen).to(device)
        hidden = torch.cat([text[i : i + 1], negative]) if guided else text[i : i + 1]
        hidden = hidden.to(device)
        n = hidden.shape[0]
        for j in range(steps):
            with autocast:  # around the transformer only: the sampler's combinations stay fp32
                v = engine(z.expand(n, *shape[1:]), torch.full((n,), float(timesteps[j]), device=device), hidden)
            v = v.float()  # the sampler's state stays fp32 under a bf16 base's autocast
            if guided:
                v = guided_velocity(v[:1], v[1:], scale)
            z = sampler.step(v, j, z)
        out.append(z.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_images(parts, spec: FluxSpec, images: list[Path], height: int, width: int, device) -> torch.Tensor:
    """Images -> scaled latents [N, 16, h, w] (resize and centre-crop to height x width, VAE mean)."""
    from PIL import Image

    vae = parts["vae"].to(device)
    out = []
    for path in images:
        try:
            img = Image.open(path).convert("RGB")
        except OSError as e:
            raise DDiTError(f"cannot read image '{path}' ({e})") from None
        scale = max(width / img.width, height / img.height)
        img = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))))
        left, top = (img.width - width) // 2, (img.height - height) // 2
        img = img.crop((left, top, left + width, top + height))
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
        x = (x.permute(2, 0, 1).float() / 127.5 - 1.0)[None].to(device)
        latent = vae.encode(x).latent_dist.mean
        out.append(((latent - spec.vae_shift_factor) * spec.vae_scaling_factor).float().cpu())
    return torch.cat(out)


def image_captions(images: list[Path]) -> list[str]:
    return [p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").is_file() else "" for p in images]


def _fingerprint(kind: str, items: list[str], settings: dict) -> str:
    digest = hashlib.sha256(json.dumps([kind, items, settings], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def load_or_build(cache: Path, source: dict, settings: dict, build: Callable[[], dict]) -> dict[str, torch.Tensor]:
    """The training tensors (``latent`` [N, ...] plus the family's conditioning, each [N, ...]): read from ``cache``
    when it was built for the same data and ``settings``, else ``build()`` and written there (shard by shard, each
    atomically)."""
    if source["kind"] == "images":
        items = [f"{p.name}:{sha256_file(p)}" for p in source["images"]]
    else:
        items = source["prompts"]
    key = _fingerprint(source["kind"], items, settings)
    index = cache / f"{key}.json"
    if index.is_file():
        shards = json.loads(index.read_text())["shards"]
        if all((cache / s).is_file() for s in shards):
            parts_ = [load_file(str(cache / s)) for s in shards]
            return {k: torch.cat([p[k] for p in parts_]) for k in parts_[0]}
    cache.mkdir(parents=True, exist_ok=True)
    data = build()
    count = data["latent"].shape[0]
    shards = []
    for n, start in enumerate(range(0, count, SHARD)):
        name = f"{key}-{n:05d}.safetensors"
        tmp = cache / f".{name}.partial"
        save_file({k: v[start : start + SHARD].contiguous() for k, v in data.items()}, str(tmp))
        tmp.replace(cache / name)
        shards.append(name)
    index.write_text(json.dumps({"shards": shards, "settings": settings, "count": count}, indent=1))
    return data


def build_flux_data(parts, spec: FluxSpec, source: dict, cfg, device, progress: bool) -> dict[str, torch.Tensor]:
    """{'latent': [N,16,h,w], 't5': [N,T,D], 'pooled': [N,P]} from prompts (generated) or images (VAE-encoded).

    When the profile guides (``true_cfg`` > 1), generated samples are guided, and every latent (generated or
    encoded) comes twice: with its prompt, then with the empty prompt, so the adapters also learn the
    unconditional pass the runtime runs.
    """
    images = source.get("images")
    prompts = image_captions(images) if images else source["prompts"]
    t5, pooled = encode_prompts(parts, spec, prompts, device)
    empty = encode_prompts(parts, spec, [""], device) if spec.scheduler.true_cfg > 1.0 else None
    for name in ("text_encoder", "text_encoder_2"):  # T5-XXL is about 19 GB in fp32: off the accelerator now
        parts[name].to("cpu")
    if images:
        latent = encode_images(parts, spec, images, cfg.height, cfg.width, device)
    else:
        latent = generate_latents(
            parts, spec, t5, pooled, cfg.height, cfg.width, cfg.gen_steps, cfg.seed, device, progress, empty
        )
    if empty is None:
        return {"latent": latent, "t5": t5, "pooled": pooled}
    n = latent.shape[0]  # interleaved (prompt, empty) pairs, so the held-out tail keeps both kinds
    return {
        "latent": latent.repeat_interleave(2, dim=0),
        "t5": torch.stack([t5, empty[0].expand(n, -1, -1)], dim=1).flatten(0, 1),
        "pooled": torch.stack([pooled, empty[1].expand(n, -1)], dim=1).flatten(0, 1),
    }


def build_wan_data(parts, spec: WanSpec, source: dict, cfg, device, progress: bool) -> dict[str, torch.Tensor]:
    """{'latent': [N,16,F_lat,h,w], 'text': [N,T,D]}: the base model's own videos of the prompts."""
    text = encode_wan_prompts(parts, spec, source["prompts"], device)
    negative = encode_wan_prompts(parts, spec, [spec.negative_prompt], device)
    parts["text_encoder"].to("cpu")  # umT5-XXL is about 23 GB in fp32: off the accelerator while the videos sample
    latent = generate_wan_latents(
        parts, spec, text, negative, cfg.frames, cfg.height, cfg.width, cfg.gen_steps, cfg.seed, device, progress
    )
    return {"latent": latent, "text": text}
