"""The embedded tiny FLUX, rebuilt from nothing with fixed seeds: ``ddit-recipe flux -o build/tiny-flux``.

Stages, each skipped when its output exists (so an interrupted recipe resumes at the stage it was in):
tokenizers -> text encoders (frozen, random) -> VAE (trained on the shapes data set) -> latents -> transformer
(flow matching) -> DDiT adapters (ddit-train) -> install into the package (``--install``).
``--smoke`` runs every stage for a few steps: CI uses it to keep the recipe honest.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ddit_profiles import DDiTError

from .cpu_memory import keep_freed_memory
from .flux_model import FluxEngine, size_variant
from .shapes import VOCABULARY, make_example
from .tiny import PACKAGE_MODELS, build_tiny_flux, word_tokenizers


@dataclass(frozen=True)
class RecipeSteps:
    """Step counts of each stage: the full recipe fits ~90 minutes on 2 cores; ``smoke`` takes ~2 minutes."""

    text_steps: int = 1000
    vae_steps: int = 1000
    vae_batch: int = 8
    vae_crop: int = 128
    examples: int = 10000
    transformer_steps: int = 6000
    transformer_batch: int = 16
    transformer_lr: float = 1e-3
    ema: float = 0.998
    shifted_sigmas: bool = False  # True: train at the sampler's shifted sigmas; False: logit-normal around 0.5
    # ``ddit-recipe --fast``: bfloat16 autocast (float32 weights, optimiser and loss) and torch.compile for the
    # transformer phases. On this machine's CPU (AMX) a step of the tiny FLUX takes 0.34 s instead of 0.43; the
    # shipped model is ``RecipeSteps.fast()``'s (these two, and 1.5x the steps)
    transformer_bf16: bool = False
    transformer_compile: bool = False
    finetune_steps: int = 2000  # a second flow-matching phase from the first phase's EMA, at finetune_lr
    finetune_lr: float = 3e-4
    finetune_dropout: float = 0.1  # the fine-tune's rate of empty captions: the unconditional velocity true CFG uses
    adapter_steps: int = 600
    adapter_prompts: int = 128
    adapter_rank: int = 16
    # AdamW 1e-3 beat Prodigy here: held-out 4p MSE 0.50 vs 0.61 (see docs/embedded-models.md).
    adapter_optimizer: str = "adamw"
    adapter_lr: float = 1e-3

    def accelerated(self) -> RecipeSteps:
        """These step counts, trained under bfloat16 autocast with torch.compile (``--smoke --fast``)."""
        return replace(self, transformer_bf16=True, transformer_compile=True)

    @classmethod
    def fast(cls) -> RecipeSteps:
        """``ddit-recipe flux --fast``: bfloat16 autocast and torch.compile, and 1.5x the transformer steps
        (9000 + 3000 instead of 6000 + 2000) in about the recipe's time."""
        return cls(transformer_steps=9000, finetune_steps=3000).accelerated()

    @classmethod
    def smoke(cls) -> RecipeSteps:
        return cls(
            text_steps=3,
            vae_steps=3,
            vae_batch=2,
            examples=24,
            transformer_steps=3,
            transformer_batch=4,
            finetune_steps=2,
            finetune_dropout=0.5,
            adapter_steps=2,
            adapter_prompts=6,
        )


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively here (AVX512-BF16 or AMX); elsewhere autocast would be slower."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend needs, or None (then the recipe trains eagerly)."""
    found = next(filter(None, (shutil.which(c) for c in (os.environ.get("CXX", "g++"), "clang++"))), None)
    if found is None:
        _log("no C++ compiler (g++, clang++ or $CXX): training without torch.compile, about 1.3x slower")
    return found


def _log(msg: str) -> None:
    print(f"[recipe {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _image_tensor(img) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float in [-1, 1]."""
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(img.height, img.width, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0


class RecipeBase:
    """What every family's recipe shares: resumable timed stages, the flow-matching loop, adapters, install."""

    family = ""
    pipeline_class = ""

    def __init__(self, spec, out: Path, steps, seed: int = 0, progress: bool = True):
        self.spec, self.out, self.steps, self.seed, self.progress = spec, Path(out), steps, seed, progress
        self.model_dir = self.out / "model"
        self.size = spec.opt_size[0]

    def run(self) -> dict:
        """Run every stage not done yet; returns the summary also written to ``recipe.json``."""
        keep_freed_memory()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DDiTError(
                f"cannot create output folder '{self.out}' ({e.strerror or e}): pick a writable -o"
            ) from None
        self.summary = json.loads(self._stages.read_text()) if self._stages.is_file() else {}
        m = self.model_dir
        parts = self._stage("text_encoders", m / self.text_encoder_folder, self.components)
        self._stage("vae", m / "vae", self.train_vae, parts)
        data = self._stage("latents", self.out / "latents.safetensors", self.latents, parts)
        self._stage("transformer", m / "transformer", self.train_transformer, parts, data)
        if getattr(self.steps, "finetune_steps", 0):
            self._stage("finetune", self.out / "finetune.json", self.finetune_transformer, parts, data)
        (m / "model_index.json").write_text(json.dumps({"_class_name": self.pipeline_class}) + "\n")
        self.summary["adapters_eval"] = self._stage(
            "adapters", self.out / "adapters" / "adapters.json", self.train_adapters, data
        )
        self._stages.write_text(json.dumps(self.summary, indent=2) + "\n")
        seconds = sum(v for k, v in self.summary.items() if k.endswith("_seconds"))
        summary = dict(seconds=round(seconds, 1), steps=self.steps.__dict__, seed=self.seed, **self.summary)
        (self.out / "recipe.json").write_text(json.dumps(summary, indent=2) + "\n")
        _log(f"done: {seconds:.0f} s of stage time in all")
        return summary

    @property
    def _stages(self) -> Path:
        return self.out / "stages.json"  # per-stage results and seconds, kept across resumed runs

    def _stage(self, name: str, output: Path, fn, *args):
        """Run ``fn(*args)``; when ``output`` did not exist before, record the stage's seconds."""
        ran = not output.exists()
        started = time.time()
        result = fn(*args)
        if ran:
            self.summary[f"{name}_seconds"] = round(time.time() - started, 1)
            self._stages.write_text(json.dumps(self.summary, indent=2) + "\n")
        return result

    def _replace_transformer(self, parts: dict, ema, settings: dict) -> None:
        """End of a ``finetune`` stage: ``ema`` replaces the model's transformer through a temporary folder, then
        ``finetune.json`` (``settings``) marks the stage done."""
        folder, tmp = self.model_dir / "transformer", self.model_dir / ".transformer.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        ema.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(folder)
        tmp.rename(folder)
        parts["transformer"] = ema
        (self.out / "finetune.json").write_text(json.dumps(settings) + "\n")

    def _progress(self, total: int, desc: str):
        """A tqdm bar and a ``progress(step, loss)`` callback that advances it."""
        bar = tqdm(total=total, desc=desc, disable=not self.progress)
        return bar, lambda _, loss: (bar.update(), bar.set_postfix(loss=f"{loss:.3f}"))

    def _vae_loop(
        self,
        vae,
        batch_fn,
        steps: int,
        lr: float = 1e-3,
        anneal: bool = True,
        decode=None,
        deterministic: bool = False,
        seed_offset: int = 0,
    ) -> None:
        """Train ``vae`` on ``batch_fn(rng)`` images or clips in [-1, 1]: L1 + MSE + a whisper of KL.

        The learning rate warms up over 5% of the steps, then anneals (one-cycle) or, without ``anneal``, holds.
        ``decode(vae, z)`` defaults to ``vae.decode(z).sample``. ``deterministic`` decodes the posterior mean instead
        of a sample (a narrow encoder's first latents are far weaker than the unit sampling noise). A phase after
        the first passes a ``seed_offset`` so it draws other batches.
        """
        torch.manual_seed(self.seed + seed_offset)
        vae.train().requires_grad_(True)
        opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
        if anneal:
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
        else:
            warm = max(1, steps // 20)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm))
        rng = random.Random(self.seed + 1 + seed_offset)
        bar = tqdm(range(steps), desc="vae", disable=not self.progress)
        for _ in bar:
            x = batch_fn(rng)
            post = vae.encode(x).latent_dist
            z = post.mode() if deterministic else post.sample()
            recon = vae.decode(z).sample if decode is None else decode(vae, z)
            loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * post.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        vae.eval().requires_grad_(False)

    def _flow_matching(self, model, engine_context, data: dict, call, mu: float, steps=None, lr=None, seed_offset=0):
        """Train ``model`` by rectified flow on ``data["latent"]``; return its EMA copy.

        ``engine_context()`` is a context manager yielding the native engine over ``model``; ``call(engine, zt,
        sigma, idx, gen)`` runs it on a batch (``idx`` picks the conditioning rows).
        The velocity target is ``noise - x0``; sigma is logit-normal, shifted by ``mu`` (0: centred on 0.5).
        ``steps`` / ``lr`` default to the recipe's ``transformer_steps`` / ``transformer_lr``; a second phase passes
        its own, and a ``seed_offset`` so it draws other batches.
        """
        s = self.steps
        steps = s.transformer_steps if steps is None else steps
        lr = s.transformer_lr if lr is None else lr
        torch.manual_seed(self.seed + 2 + seed_offset)
        model.train().requires_grad_(True)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        warm = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda i: min(1.0, (i + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * i / steps))),
        )
        gen = torch.Generator().manual_seed(self.seed + 3 + seed_offset)
        with engine_context() as engine:
            compiled = getattr(s, "transformer_compile", False) and _cpp_compiler() is not None
            if compiled:
                engine = torch.compile(engine)
            self.summary["transformer_training"] = dict(bf16_autocast=self._bf16(), compiled=compiled)
            self._flow_matching_loop(model, ema, engine, data, call, mu, opt, sched, gen, steps)
        return ema

    def _flow_matching_loop(self, model, ema, engine, data, call, mu, opt, sched, gen, steps) -> None:
        s, bf16 = self.steps, self._bf16()
        bar = tqdm(range(steps), desc="transformer", disable=not self.progress)
        for step in bar:
            idx, x0, mu = self._draw(data, gen, step, mu)
            u = torch.sigmoid(torch.randn(s.transformer_batch, generator=gen))
            sigma = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
            noise = torch.randn(x0.shape, generator=gen)
            view = (-1,) + (1,) * (x0.dim() - 1)
            zt = (1 - sigma.view(view)) * x0 + sigma.view(view) * noise
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                velocity = call(engine, zt, sigma, idx, gen)
            loss = F.mse_loss(velocity.float(), noise - x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                    pe.lerp_(pm, 1 - s.ema)
            bar.set_postfix(loss=f"{loss.item():.4f}")

    def _draw(self, data: dict, gen: torch.Generator, step: int, mu: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Step ``step``'s batch: the conditioning rows ``idx`` [B], their latents ``data["latent"][idx]`` [B, ...]
        and the sigma shift ``mu``. A recipe that trains on more than one latent size overrides this."""
        idx = torch.randint(0, data["latent"].shape[0], (self.steps.transformer_batch,), generator=gen)
        return idx, data["latent"][idx], mu

    def _bf16(self) -> bool:
        """bfloat16 autocast for the transformer phases: asked for, and the CPU has native bfloat16 matmuls."""
        return getattr(self.steps, "transformer_bf16", False) and cpu_has_bf16()

    # ---- adapters -----------------------------------------------------------------------------------------------

    def train_adapters(self, data: dict) -> dict:
        from .train import TrainConfig, Trainer

        out = self.out / "adapters"
        if (out / "adapters.json").is_file():
            return json.loads((out / "adapters.json").read_text())["eval"]
        _log("training the DDiT adapters")
        prompts = self.out / "adapter_prompts.txt"
        prompts.write_text("\n".join(self.adapter_prompts(data)) + "\n")
        options = dict(
            model=str(self.model_dir),
            sizes=(2, 4),
            output=out,
            prompts=str(prompts),
            steps=self.steps.adapter_steps,
            rank=self.steps.adapter_rank,
            optimizer=self.steps.adapter_optimizer,
            lr=self.steps.adapter_lr,
            seed=self.seed,
            checkpoint_every=100,
        )
        cfg = TrainConfig(**(options | self.adapter_options()))
        return Trainer(cfg, self.spec, progress=self.progress).run()["eval"]

    def adapter_prompts(self, data: dict) -> list[str]:
        """The first training captions: the base model generates the adapters' teacher data from them."""
        return data["captions"][: self.steps.adapter_prompts]

    def adapter_options(self) -> dict:
        """The family's ``TrainConfig`` overrides."""
        return {}

    # ---- install ------------------------------------------------------------------------------------------------

    def install(self, target: Path | None = None) -> Path:
        """Copy the model folder and the adapters into the package (what ``--model tiny`` loads)."""
        target = PACKAGE_MODELS / self.family if target is None else Path(target)
        tmp = target.with_name(f".{target.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.model_dir, tmp)
        shutil.copy2(self.out / "adapters" / "adapters.safetensors", tmp / "adapters.safetensors")
        shutil.copy2(self.out / "recipe.json", tmp / "recipe.json")
        for config in tmp.glob("*/config.json"):  # a reloaded component records where it came from: not shipped
            fields = json.loads(config.read_text())
            if fields.pop("_name_or_path", None) is not None:
                config.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        return target


class FluxRecipe(RecipeBase):
    """The tiny FLUX: CLIP + T5 pretrained on the captions, AutoencoderKL, FluxTransformer2DModel."""

    family = "flux"
    pipeline_class = "FluxPipeline"
    text_encoder_folder = "text_encoder_2"

    def __init__(self, spec, out: Path, steps, seed: int = 0, progress: bool = True):
        super().__init__(spec, out, steps, seed, progress)
        self.size = spec.recipe_size or spec.opt_size[0]

    def adapter_options(self) -> dict:
        return dict(height=self.size, width=self.size)

    # ---- tokenizers and text encoders (pretrained on the captions, then frozen) -------------------------------

    def components(self) -> dict:
        """Tokenizers over the data set's vocabulary, seeded random components, and pretrained text encoders."""
        from transformers import CLIPTextModel, T5EncoderModel

        from .text_pretrain import pretrain_flux_text_encoders

        clip_tok, t5_tok = word_tokenizers(self.spec, VOCABULARY)
        parts = build_tiny_flux(self.spec, seed=self.seed, tokenizers=(clip_tok, t5_tok))
        encoders = {"text_encoder": CLIPTextModel, "text_encoder_2": T5EncoderModel}
        if all((self.model_dir / name).is_dir() for name in encoders):
            for name, cls in encoders.items():
                parts[name] = cls.from_pretrained(self.model_dir / name, use_safetensors=True)
        else:
            _log("pretraining the text encoders on the caption grammar")
            bar, progress = self._progress(self.steps.text_steps, "text encoders")
            accuracy = pretrain_flux_text_encoders(
                parts,
                self.spec.clip_max_length,
                self.spec.t5_max_length,
                steps=self.steps.text_steps,
                seed=self.seed + 4,
                progress=progress,
            )
            bar.close()
            _log(f"text encoders: held-out attribute accuracy {accuracy}")
            self.summary["text_encoders"] = accuracy
            for name in ("tokenizer", "tokenizer_2", *encoders):
                kw = {} if name.startswith("tokenizer") else {"safe_serialization": True}
                parts[name].save_pretrained(self.model_dir / name, **kw)
        for name in encoders:
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
        vae = parts["vae"]
        self._vae_loop(
            vae, lambda rng: torch.stack([self._crop(rng) for _ in range(self.steps.vae_batch)]), self.steps.vae_steps
        )
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
        seeds = [self.seed * 1_000_003 + i for i in range(self.steps.examples)]
        latent, captions = self.encode_scenes(parts["vae"], seeds, self.size)
        t5, pooled = self._encode_text(parts, captions)
        data = {"latent": latent, "t5": t5, "pooled": pooled}
        save_file(data, str(path))
        (self.out / "captions.json").write_text(json.dumps(captions))
        data["captions"] = captions
        return data

    @torch.no_grad()
    def encode_scenes(self, vae, seeds: list[int], size: int) -> tuple[torch.Tensor, list[str]]:
        """The shapes scenes of ``seeds`` rendered at ``size`` pixels and encoded by ``vae``: latents [N, C, size/8,
        size/8], shifted and scaled as the transformer sees them, and the N captions."""
        lat, captions = [], []
        for start in tqdm(range(0, len(seeds), 32), desc=f"latents at {size}", disable=not self.progress):
            batch = [make_example(seed, size=size) for seed in seeds[start : start + 32]]
            z = vae.encode(torch.stack([_image_tensor(img) for img, _, _ in batch])).latent_dist.mean
            lat.append((z - vae.config.shift_factor) * vae.config.scaling_factor)
            captions += [cap for _, cap, _ in batch]
        return torch.cat(lat).contiguous(), captions

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
        ema = self._train_flux(parts["transformer"], data)
        ema.save_pretrained(folder, safe_serialization=True)
        parts["transformer"] = ema

    def finetune_transformer(self, parts: dict, data: dict) -> None:
        """The second phase: ``finetune_steps`` more from the first phase's EMA at ``finetune_lr`` (warm-up, cosine),
        replacing the model's transformer (through a temporary folder); ``finetune.json`` marks it done."""
        marker = self.out / "finetune.json"
        if marker.is_file():
            return
        s = self.steps
        _log(
            f"fine-tuning the transformer: {s.finetune_steps} more steps at lr {s.finetune_lr}, "
            f"{s.finetune_dropout:.0%} of captions dropped"
        )
        empty = self._encode_text(parts, [""]) if s.finetune_dropout > 0 else None
        ema = self._train_flux(
            parts["transformer"],
            data,
            empty=empty,
            dropout=s.finetune_dropout,
            steps=s.finetune_steps,
            lr=s.finetune_lr,
            seed_offset=100,
        )
        self._replace_transformer(
            parts, ema, dict(steps=s.finetune_steps, lr=s.finetune_lr, dropout=s.finetune_dropout)
        )

    def _train_flux(self, model, data: dict, empty=None, dropout: float = 0.0, **phase):
        """Flow matching on the FLUX transformer. ``empty`` (the empty caption's T5 states [1, T, D] and pooled
        [1, P]) replaces each row's caption with probability ``dropout``, as classifier-free guidance needs."""
        spec, s = self.spec, self.steps
        mu = spec.shift.mu(spec.image_seq_len(self.size, self.size)) if s.shifted_sigmas else 0.0
        guidance = torch.full((s.transformer_batch,), spec.scheduler.guidance)

        def call(engine, zt, sigma, idx, gen):
            t5, pooled = data["t5"][idx], data["pooled"][idx]
            if empty is not None and dropout > 0:
                drop = torch.rand(len(idx), generator=gen) < dropout  # [B]
                t5 = torch.where(drop.view(-1, 1, 1), empty[0], t5)
                pooled = torch.where(drop.view(-1, 1), empty[1], pooled)
            return engine(zt, sigma, guidance, t5, pooled)

        @contextlib.contextmanager
        def engine_context():
            with size_variant(model, None, 1):  # the float32 RoPE the export uses
                yield FluxEngine(model, spec, 1)

        return self._flow_matching(model, engine_context, data, call, mu, **phase)


Recipe = FluxRecipe  # the first family's name, kept for callers
