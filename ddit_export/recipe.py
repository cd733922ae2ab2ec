"""The embedded tiny FLUX, rebuilt from nothing with fixed seeds: ``ddit-recipe flux -o build/tiny-flux``.

Stages, each skipped when its output exists (so an interrupted recipe resumes at the stage it was in):
tokenizers -> text encoders (frozen, random) -> VAE (trained on the shapes data set) -> latents -> transformer
(flow matching) -> DDiT adapters (ddit-train) -> install into the package (``--install``).
``--smoke`` runs every stage for a few steps: CI uses it to keep the recipe honest.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ddit_profiles import FluxSpec

from .flux_model import FluxEngine, size_variant
from .shapes import VOCABULARY, make_example
from .tiny import PACKAGE_MODELS, build_tiny_flux, word_tokenizers


@dataclass(frozen=True)
class RecipeSteps:
    """Step counts of each stage: the full recipe fits ~90 minutes on 2 cores; ``smoke`` takes ~2 minutes."""

    vae_steps: int = 1000
    vae_batch: int = 8
    vae_crop: int = 128
    examples: int = 6000
    transformer_steps: int = 2500
    transformer_batch: int = 16
    transformer_lr: float = 5e-4
    ema: float = 0.998
    adapter_steps: int = 300
    adapter_prompts: int = 128

    @classmethod
    def smoke(cls) -> RecipeSteps:
        return cls(
            vae_steps=3,
            vae_batch=2,
            examples=24,
            transformer_steps=3,
            transformer_batch=4,
            adapter_steps=2,
            adapter_prompts=6,
        )


def _log(msg: str) -> None:
    print(f"[recipe {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _image_tensor(img) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float in [-1, 1]."""
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(img.height, img.width, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0


class Recipe:
    def __init__(self, spec: FluxSpec, out: Path, steps: RecipeSteps, seed: int = 0, progress: bool = True):
        self.spec, self.out, self.steps, self.seed, self.progress = spec, Path(out), steps, seed, progress
        self.model_dir = self.out / "model"
        self.size = spec.opt_size[0]

    def run(self) -> dict:
        started = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        parts = self.components()
        self.train_vae(parts)
        data = self.latents(parts)
        self.train_transformer(parts, data)
        (self.model_dir / "model_index.json").write_text('{"_class_name": "FluxPipeline"}\n')
        adapters = self.train_adapters(data)
        summary = dict(
            seconds=round(time.time() - started, 1), steps=self.steps.__dict__, seed=self.seed, adapters_eval=adapters
        )
        (self.out / "recipe.json").write_text(json.dumps(summary, indent=2) + "\n")
        _log(f"done in {summary['seconds']:.0f} s")
        return summary

    # ---- tokenizers and text encoders (frozen, random) ---------------------------------------------------------

    def components(self) -> dict:
        """Tokenizers over the data set's vocabulary and seeded random components; saved once."""
        clip_tok, t5_tok = word_tokenizers(self.spec, VOCABULARY)
        parts = build_tiny_flux(self.spec, seed=self.seed, tokenizers=(clip_tok, t5_tok))
        for name in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"):
            if not (self.model_dir / name).is_dir():
                kw = {} if name.startswith("tokenizer") else {"safe_serialization": True}
                parts[name].save_pretrained(self.model_dir / name, **kw)
        for name in ("text_encoder", "text_encoder_2"):
            parts[name].eval().requires_grad_(False)
        return parts

    # ---- VAE -----------------------------------------------------------------------------------------------------

    def train_vae(self, parts: dict) -> None:
        from diffusers import AutoencoderKL

        folder = self.model_dir / "vae"
        if folder.is_dir():
            parts["vae"] = AutoencoderKL.from_pretrained(folder, use_safetensors=True)
            return
        _log("training the VAE")
        torch.manual_seed(self.seed)
        vae, s = parts["vae"].train(), self.steps
        opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=s.vae_steps, pct_start=0.05)
        rng = random.Random(self.seed + 1)
        bar = tqdm(range(s.vae_steps), desc="vae", disable=not self.progress)
        for _ in bar:
            x = torch.stack([self._crop(rng) for _ in range(s.vae_batch)])
            post = vae.encode(x).latent_dist
            recon = vae.decode(post.sample()).sample
            loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * post.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        vae.eval().requires_grad_(False)
        scale, shift = self._latent_stats(vae)
        vae.register_to_config(scaling_factor=scale, shift_factor=shift)
        vae.save_pretrained(folder, safe_serialization=True)
        parts["vae"] = vae

    def _crop(self, rng: random.Random) -> torch.Tensor:
        img, _, _ = make_example(rng.randrange(1 << 30), size=self.size)
        c = self.steps.vae_crop
        x, y = rng.randrange(0, self.size - c + 1, 8), rng.randrange(0, self.size - c + 1, 8)
        return _image_tensor(img.crop((x, y, x + c, y + c)))

    @torch.no_grad()
    def _latent_stats(self, vae) -> tuple[float, float]:
        """FLUX-style normalisation: latent' = (latent - shift) * scale has unit std."""
        x = torch.stack([_image_tensor(make_example(10_000_000 + i, size=self.size)[0]) for i in range(16)])
        z = vae.encode(x).latent_dist.mean
        return float(1.0 / z.std()), float(z.mean())

    # ---- latents and text embeddings ------------------------------------------------------------------------------

    @torch.no_grad()
    def latents(self, parts: dict) -> dict:
        path = self.out / "latents.safetensors"
        if path.is_file():
            data = load_file(str(path))
            data["captions"] = json.loads((self.out / "captions.json").read_text())
            return data
        _log(f"encoding {self.steps.examples} examples")
        vae = parts["vae"]
        lat, captions = [], []
        for start in tqdm(range(0, self.steps.examples, 32), desc="latents", disable=not self.progress):
            batch = [
                make_example(self.seed * 1_000_003 + i, size=self.size)
                for i in range(start, min(start + 32, self.steps.examples))
            ]
            x = torch.stack([_image_tensor(img) for img, _, _ in batch])
            z = vae.encode(x).latent_dist.mean
            lat.append((z - vae.config.shift_factor) * vae.config.scaling_factor)
            captions += [cap for _, cap, _ in batch]
        t5, pooled = self._encode_text(parts, captions)
        data = {"latent": torch.cat(lat).contiguous(), "t5": t5, "pooled": pooled}
        save_file(data, str(path))
        (self.out / "captions.json").write_text(json.dumps(captions))
        data["captions"] = captions
        return data

    @torch.no_grad()
    def _encode_text(self, parts: dict, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from .train_data import encode_prompts

        t5, pooled = [], []
        for start in range(0, len(captions), 256):
            a, b = encode_prompts(parts, self.spec, captions[start : start + 256], "cpu")
            t5.append(a)
            pooled.append(b)
        return torch.cat(t5).contiguous(), torch.cat(pooled).contiguous()

    # ---- transformer --------------------------------------------------------------------------------------------

    def train_transformer(self, parts: dict, data: dict) -> None:
        from diffusers import FluxTransformer2DModel

        folder = self.model_dir / "transformer"
        if folder.is_dir():
            parts["transformer"] = FluxTransformer2DModel.from_pretrained(folder, use_safetensors=True)
            return
        _log("training the transformer by flow matching")
        spec, s = self.spec, self.steps
        torch.manual_seed(self.seed + 2)
        model = parts["transformer"].train()
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=s.transformer_lr, weight_decay=0.01)
        warm = max(1, s.transformer_steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda i: (
                min(1.0, (i + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * i / s.transformer_steps)))
            ),
        )
        gen = torch.Generator().manual_seed(self.seed + 3)
        n = data["latent"].shape[0]
        mu = spec.shift.mu(spec.image_seq_len(self.size, self.size))
        bar = tqdm(range(s.transformer_steps), desc="transformer", disable=not self.progress)
        with size_variant(model, None, 1):
            engine = FluxEngine(model, spec, 1)
            for _ in bar:
                idx = torch.randint(0, n, (s.transformer_batch,), generator=gen)
                x0 = data["latent"][idx]
                u = torch.sigmoid(torch.randn(s.transformer_batch, generator=gen))  # logit-normal
                sigma = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
                noise = torch.randn(x0.shape, generator=gen)
                zt = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
                guidance = torch.full((s.transformer_batch,), spec.scheduler.guidance)
                v = engine(zt, sigma, guidance, data["t5"][idx], data["pooled"][idx])
                loss = F.mse_loss(v, noise - x0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                with torch.no_grad():
                    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                        pe.lerp_(pm, 1 - s.ema)
                bar.set_postfix(loss=f"{loss.item():.4f}")
        ema.save_pretrained(folder, safe_serialization=True)
        parts["transformer"] = ema

    # ---- adapters -----------------------------------------------------------------------------------------------

    def train_adapters(self, data: dict) -> dict:
        from .train import TrainConfig, Trainer

        out = self.out / "adapters"
        if (out / "adapters.json").is_file():
            return json.loads((out / "adapters.json").read_text())["eval"]
        _log("training the DDiT adapters")
        prompts = self.out / "adapter_prompts.txt"
        captions = data["captions"][: self.steps.adapter_prompts]
        prompts.write_text("\n".join(captions) + "\n")
        cfg = TrainConfig(
            model=str(self.model_dir),
            sizes=(2, 4),
            output=out,
            prompts=str(prompts),
            steps=self.steps.adapter_steps,
            rank=16,
            optimizer="prodigy",
            seed=self.seed,
            checkpoint_every=100,
        )
        return Trainer(cfg, self.spec, progress=self.progress).run()["eval"]

    # ---- install ------------------------------------------------------------------------------------------------

    def install(self, target: Path = PACKAGE_MODELS / "flux") -> Path:
        """Copy the model folder and the adapters into the package (what ``--model tiny`` loads)."""
        tmp = target.with_name(f".{target.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.model_dir, tmp)
        shutil.copy2(self.out / "adapters" / "adapters.safetensors", tmp / "adapters.safetensors")
        shutil.copy2(self.out / "recipe.json", tmp / "recipe.json")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        return target
