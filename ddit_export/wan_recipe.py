"""The embedded tiny Wan, rebuilt from nothing with fixed seeds: ``ddit-recipe wan -o build/tiny-wan``.

The same stages as the FLUX recipe (see ``recipe.py``), on the Wan classes and on video: a word-level umT5
tokenizer -> umT5 pretrained on the clip captions, then frozen -> AutoencoderKLWan trained on short clips (its
per-channel ``latents_mean`` / ``latents_std`` measured) -> clip latents -> WanTransformer3DModel by flow matching,
with caption dropout so classifier-free guidance against the empty negative prompt works -> DDiT adapters.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .recipe import RecipeBase, _image_tensor, _log
from .shapes import make_clip_example
from .wan_loading import DEFAULT_SCHEDULER, build_tiny_wan, tiny_wan_tokenizer
from .wan_model import WanEngine
from .wan_vae import decode_unclamped, init_per_frame


@dataclass(frozen=True)
class WanRecipeSteps:
    """Step counts of each stage of the Wan recipe; ``smoke`` takes a minute or two."""

    text_steps: int = 1000
    vae_image_steps: int = 1000  # phase 1: single frames, from a per-frame init (wan_vae.init_per_frame)
    vae_image_batch: int = 8
    vae_steps: int = 400  # phase 2: clips, so the causal temporal path learns what moves
    vae_batch: int = 2
    vae_crop: int = 128
    vae_frames: int = 5  # 1 + 4 n: two latent frames
    vae_lr: float = 3e-4  # held in phase 1; 1e-3 (the FLUX VAE's) drives this VAE into saturation for good
    vae_clip_lr: float = 1e-4  # phase 2 anneals from here
    vae_full_steps: int = 200  # phase 3: clips of the model's length, where a recolour falls inside a latent frame
    vae_full_lr: float = 5e-5  # phase 3 anneals from here
    examples: int = 2000
    transformer_steps: int = 3000
    transformer_batch: int = 8
    transformer_lr: float = 1e-3
    ema: float = 0.998
    caption_dropout: float = 0.1  # the empty prompt instead, so the model also learns the unconditional velocity
    # Phase 2 of the transformer: sigmas shifted like the sampler's (logit-normal around mu, about ln 3 = the flow
    # shift at this size). Phase 1's logit-normal around 0.5 almost never draws sigma > 0.95, where sampling starts:
    # 600 steps here took 8 held-out clips from 0.34 to 0.40 (background 0.57 -> 0.86); 600 more at mu 0, 0.33.
    finetune_steps: int = 600
    finetune_mu: float = 1.0986
    finetune_lr: float = 3e-4
    adapter_steps: int = 200
    adapter_prompts: int = 64
    adapter_rank: int = 16
    adapter_optimizer: str = "prodigy"
    adapter_lr: float = 1.0

    @classmethod
    def smoke(cls) -> WanRecipeSteps:
        return cls(
            text_steps=3,
            vae_image_steps=2,
            vae_image_batch=2,
            vae_steps=2,
            vae_full_steps=1,
            vae_batch=1,
            vae_crop=64,
            examples=6,
            transformer_steps=3,
            transformer_batch=2,
            finetune_steps=2,
            adapter_steps=2,
            adapter_prompts=4,
        )


def _clip_tensor(frames) -> torch.Tensor:
    """list of F PIL RGB frames -> [3, F, H, W] float in [-1, 1]."""
    return torch.stack([_image_tensor(f) for f in frames], dim=1)


class WanRecipe(RecipeBase):
    """The tiny Wan 2.1: umT5 pretrained on the clip captions, AutoencoderKLWan, WanTransformer3DModel."""

    family = "wan"
    pipeline_class = "WanPipeline"
    text_encoder_folder = "text_encoder"

    def __init__(self, spec, out, steps, seed: int = 0, progress: bool = True):
        super().__init__(spec, out, steps, seed, progress)
        self.frames = spec.opt_frames

    # ---- tokenizer and text encoder -------------------------------------------------------------------------------

    def components(self) -> dict:
        from transformers import UMT5EncoderModel

        from .text_pretrain import pretrain_wan_text_encoder

        parts = build_tiny_wan(self.spec, seed=self.seed, tokenizer=tiny_wan_tokenizer(self.spec))
        folder = self.model_dir / "text_encoder"
        if folder.is_dir():
            parts["text_encoder"] = UMT5EncoderModel.from_pretrained(folder, use_safetensors=True)
        else:
            _log("pretraining the umT5 text encoder on the clip captions")
            bar, progress = self._progress(self.steps.text_steps, "text encoder")
            accuracy = pretrain_wan_text_encoder(
                parts, self.spec.t5_max_length, steps=self.steps.text_steps, seed=self.seed + 4, progress=progress
            )
            bar.close()
            _log(f"text encoder: held-out attribute accuracy {accuracy}")
            self.summary["text_encoders"] = accuracy
            parts["tokenizer"].save_pretrained(self.model_dir / "tokenizer")
            (self.model_dir / "scheduler").mkdir(parents=True, exist_ok=True)
            (self.model_dir / "scheduler" / "scheduler_config.json").write_text(
                json.dumps(DEFAULT_SCHEDULER, indent=2) + "\n"
            )
            parts["text_encoder"].save_pretrained(folder, safe_serialization=True)
        parts["text_encoder"].eval().requires_grad_(False)
        return parts

    # ---- VAE ------------------------------------------------------------------------------------------------------

    def train_vae(self, parts: dict) -> None:
        from diffusers import AutoencoderKLWan

        folder = self.model_dir / "vae"
        if folder.is_dir():
            parts["vae"] = AutoencoderKLWan.from_pretrained(folder, use_safetensors=True)
            return
        _log("training the video VAE: single frames, short clips, then clips of the model's length")
        vae, s = parts["vae"], self.steps
        init_per_frame(vae)
        phase = dict(decode=decode_unclamped, deterministic=True)  # both: see _vae_loop and decode_unclamped
        self._vae_loop(
            vae,
            lambda rng: self._clips(rng, s.vae_image_batch, 1),
            s.vae_image_steps,
            lr=s.vae_lr,
            anneal=False,
            **phase,
        )
        self._vae_loop(
            vae, lambda rng: self._clips(rng, s.vae_batch), s.vae_steps, lr=s.vae_clip_lr, seed_offset=1, **phase
        )
        self._vae_loop(
            vae,
            lambda rng: self._clips(rng, s.vae_batch, self.frames),
            s.vae_full_steps,
            lr=s.vae_full_lr,
            seed_offset=2,
            **phase,
        )
        mean, std = self._latent_stats(vae)
        vae.register_to_config(latents_mean=mean, latents_std=std)
        vae.save_pretrained(folder, safe_serialization=True)
        parts["vae"] = vae

    def _clips(self, rng, batch: int, count: int | None = None) -> torch.Tensor:
        """``batch`` crops (``_crop``) in ``channels_last_3d``: [B, 3, F, c, c]. The VAE's 3-D convolutions run
        10-17% faster on it on the CPU, to within float rounding of the contiguous result."""
        return torch.stack([self._crop(rng, count) for _ in range(batch)]).to(memory_format=torch.channels_last_3d)

    def _crop(self, rng, count: int | None = None) -> torch.Tensor:
        """One clip of ``count`` frames (default ``vae_frames``), cropped to ``vae_crop`` squared at a random place:
        [3, F, c, c]."""
        frames, _, _ = make_clip_example(rng.randrange(1 << 30), count or self.steps.vae_frames, size=self.size)
        c = self.steps.vae_crop
        x, y = rng.randrange(0, self.size - c + 1, 8), rng.randrange(0, self.size - c + 1, 8)
        return _clip_tensor([f.crop((x, y, x + c, y + c)) for f in frames])

    @torch.no_grad()
    def _latent_stats(self, vae) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the latents of 8 full clips: Wan's ``latents_mean`` / ``latents_std``."""
        x = torch.stack([_clip_tensor(make_clip_example(20_000_000 + i, self.frames, self.size)[0]) for i in range(8)])
        z = vae.encode(x).latent_dist.mean  # [8, 16, F', h, w]
        dims = (0, 2, 3, 4)
        return z.mean(dims).tolist(), z.std(dims).clamp_min(1e-3).tolist()

    # ---- latents and text states ------------------------------------------------------------------------------------

    @torch.no_grad()
    def latents(self, parts: dict) -> dict:
        from .train_data import encode_wan_prompts

        path = self.out / "latents.safetensors"
        if path.is_file():
            data = load_file(str(path))
            data["captions"] = json.loads((self.out / "captions.json").read_text())
            return data
        _log(f"encoding {self.steps.examples} clips of {self.frames} frames")
        vae = parts["vae"]
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape)
        std = torch.tensor(vae.config.latents_std).view(shape)
        lat, captions = [], []
        # Batches of 4 in channels_last_3d: 3x faster than batches of 8 in the default layout on 2 cores (with
        # cpu_memory.keep_freed_memory), equal to within 1e-6.
        for start in tqdm(range(0, self.steps.examples, 4), desc="latents", disable=not self.progress):
            batch = [
                make_clip_example(self.seed * 1_000_003 + i, self.frames, size=self.size)
                for i in range(start, min(start + 4, self.steps.examples))
            ]
            x = torch.stack([_clip_tensor(frames) for frames, _, _ in batch]).to(memory_format=torch.channels_last_3d)
            lat.append(((vae.encode(x).latent_dist.mean - mean) / std).contiguous())
            captions += [cap for _, cap, _ in batch]
        data = {
            "latent": torch.cat(lat).contiguous(),
            "text": encode_wan_prompts(parts, self.spec, captions, "cpu").contiguous(),
            "negative": encode_wan_prompts(parts, self.spec, [self.spec.negative_prompt], "cpu").contiguous(),
        }
        save_file(data, str(path))
        (self.out / "captions.json").write_text(json.dumps(captions))
        data["captions"] = captions
        return data

    # ---- transformer ------------------------------------------------------------------------------------------------

    def train_transformer(self, parts: dict, data: dict) -> None:
        from diffusers import WanTransformer3DModel

        folder = self.model_dir / "transformer"
        if folder.is_dir():
            parts["transformer"] = WanTransformer3DModel.from_pretrained(folder, use_safetensors=True)
            return
        _log("training the transformer by flow matching")
        model = parts["transformer"]
        ema = self._flow_matching(
            model, lambda: contextlib.nullcontext(WanEngine(model, self.spec, 1)), data, self._call(data), mu=0.0
        )
        ema.save_pretrained(folder, safe_serialization=True)
        parts["transformer"] = ema

    def _call(self, data: dict):
        """``call(engine, zt, sigma, idx, gen)`` for ``_flow_matching``: the rows' text states, ``caption_dropout``
        of them replaced by the negative prompt's (the unconditional velocity classifier-free guidance uses)."""
        dropout = self.steps.caption_dropout

        def call(engine, zt, sigma, idx, gen):
            text = data["text"][idx]
            drop = torch.rand(len(idx), generator=gen) < dropout
            text = torch.where(drop.view(-1, 1, 1), data["negative"].expand_as(text), text)
            return engine(zt, sigma * 1000, text)  # Wan's timestep is sigma * 1000

        return call

    def finetune_transformer(self, parts: dict, data: dict) -> None:
        """Phase 2: ``finetune_steps`` from phase 1's EMA at sigmas shifted like the sampler's (``finetune_mu``),
        replacing the model's transformer through a temporary folder; ``finetune.json`` marks it done."""
        marker = self.out / "finetune.json"
        if marker.is_file():
            return
        s = self.steps
        _log(
            f"fine-tuning the transformer: {s.finetune_steps} steps at the sampler's shifted sigmas (mu {s.finetune_mu})"
        )
        model = parts["transformer"]
        ema = self._flow_matching(
            model,
            lambda: contextlib.nullcontext(WanEngine(model, self.spec, 1)),
            data,
            self._call(data),
            mu=s.finetune_mu,
            steps=s.finetune_steps,
            lr=s.finetune_lr,
            seed_offset=7,
        )
        self._replace_transformer(parts, ema, dict(steps=s.finetune_steps, mu=s.finetune_mu, lr=s.finetune_lr))

    # ---- adapters ---------------------------------------------------------------------------------------------------

    def adapter_options(self) -> dict:
        return dict(frames=self.frames)
