"""Text to video from a Wan engines folder: umT5 encode, UniPC flow sampling with classifier-free guidance and a
per-step engine choice, then the causal VAE decoder one latent frame at a time.

The sampler is what diffusers' WanPipeline uses (UniPC multistep, flow sigmas, shift 3.0 at 480p and 5.0 above).
The DDiT scheduler reads the same latent trajectory, with spatial patches per latent frame.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ddit_profiles import DDiTError

from .engine import OrtEngine, pick_device
from .manifest import load_manifest
from .pipeline import Generation
from .scheduler import PatchScheduler
from .text import PromptTokenizer
from .unipc import UniPCFlowSampler, wan_flow_sigmas, wan_flow_timesteps

CFG_MODES = ("batched", "two-pass")


class WanRuntime:
    """Loads a Wan engines folder (validated first) and generates videos from prompts."""

    def __init__(self, folder: str | Path, provider: str = "auto", verify: bool = True, sizes=None):
        self.manifest = load_manifest(folder, verify=verify)
        if self.manifest.data["family"] != "wan":
            raise DDiTError(f"'{folder}' holds {self.manifest.data['family']} engines, not Wan ones")
        self.spec, self.device = self.manifest.spec, pick_device(provider)
        self.sizes = tuple(sizes) if sizes is not None else self.manifest.sizes
        missing = [k for k in self.sizes if k not in self.manifest.sizes]
        if missing:
            raise DDiTError(
                f"patch sizes {missing} were not exported to '{folder}' (it has {list(self.manifest.sizes)})"
            )
        self.engines = {k: OrtEngine(self.manifest.transformer_path(k), self.device) for k in self.sizes}
        text = self.manifest.component("text_encoder")
        self.tokenizer = PromptTokenizer(
            self.manifest.path(text["tokenizer"]), text["max_length"], text["pad_id"], text["pad_token"], "umT5"
        )
        self.text_encoder = OrtEngine(self.manifest.path(text["onnx"]), self.device)
        vae = self.manifest.component("vae_decoder")
        self.vae_first = OrtEngine(self.manifest.path(vae["onnx"]), self.device)
        self.vae_step = OrtEngine(self.manifest.path(vae["step_onnx"]), self.device)
        self.cache_in, self.cache_out = vae["cache_inputs"], vae["cache_outputs"]
        latent = self.manifest.data["latent"]
        shape = (1, self.spec.latent_channels, 1, 1, 1)
        self.latents_mean = torch.tensor(latent["latents_mean"], device=self.device).view(shape)
        self.latents_std = torch.tensor(latent["latents_std"], device=self.device).view(shape)

    def encode(self, prompt: str) -> torch.Tensor:
        """prompt -> umT5 states [1, T, D] with padded positions zeroed (an empty prompt is allowed: CFG's negative)."""
        ids = self.tokenizer(prompt)
        mask = (ids != self.tokenizer.pad_id).to(torch.int64)
        return self.text_encoder(input_ids=ids, attention_mask=mask).contiguous()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [1, 16, f, h, w] -> video [F, 3, 8h, 8w] uint8 on the CPU, F = 4 (f - 1) + 1."""
        z = latent * self.latents_std + self.latents_mean
        out = self.vae_first.run_all(latent=z[:, :, :1].contiguous())
        videos, caches = [out[0]], out[1:]
        for i in range(1, z.shape[2]):
            feeds = {"latent": z[:, :, i : i + 1].contiguous()} | dict(zip(self.cache_in, caches, strict=True))
            out = self.vae_step.run_all(**feeds)
            videos.append(out[0])
            caches = out[1:]
        video = torch.cat(videos, dim=2)[0]  # [3, F, H, W]
        return ((video.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 0, 2, 3).cpu()

    def generate(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        seed: int = 0,
        guidance_scale: float | None = None,
        tau: float | None = None,
        rho: float | None = None,
        schedule: list[int] | None = None,
        cfg: str = "batched",
        progress: bool = True,
    ) -> Generation:
        spec, d = self.spec, self.spec.scheduler
        frames = spec.opt_frames if frames is None else frames
        height = spec.opt_size[0] if height is None else height
        width = spec.opt_size[1] if width is None else width
        steps = d.steps if steps is None else steps
        scale = d.guidance if guidance_scale is None else guidance_scale
        tau, rho = d.tau if tau is None else tau, d.rho if rho is None else rho
        negative = spec.negative_prompt if negative_prompt is None else negative_prompt
        if not prompt or not prompt.strip():
            raise DDiTError("the prompt is empty: pass --prompt with some text")
        spec.check_frames(frames)
        spec.check_resolution(height, width, self.sizes)
        if steps < 1:
            raise DDiTError(f"--steps must be at least 1, got {steps}")
        if cfg not in CFG_MODES:
            raise DDiTError(f"unknown --cfg '{cfg}': choose {' or '.join(CFG_MODES)}")
        if schedule is not None and len(schedule) != steps:
            raise DDiTError(f"the schedule has {len(schedule)} entries for {steps} steps: give one per step")
        started = time.perf_counter()
        text = [self.encode(prompt)] + ([self.encode(negative)] if scale > 1.0 else [])
        latent, step_ms, used = self._denoise(
            text, frames, height, width, steps, seed, scale, tau, rho, schedule, cfg, progress
        )
        video = self.decode(latent)
        settings = dict(
            prompt=prompt,
            negative_prompt=negative,
            seed=seed,
            steps=steps,
            frames=frames,
            height=height,
            width=width,
            guidance_scale=scale,
            tau=tau,
            rho=rho,
            cfg=cfg,
            schedule_mode="auto" if schedule is None else "fixed",
            sampler="unipc_flow",
            flow_shift=spec.flow_shift(height, width),
        )
        return Generation(video, used, step_ms, time.perf_counter() - started, settings)

    def _denoise(self, text, frames, height, width, steps, seed, scale, tau, rho, schedule, cfg, progress):
        spec, dev = self.spec, self.device
        lh, lw = spec.latent_hw(height, width)
        shape = (1, spec.latent_channels, spec.latent_frames(frames), lh, lw)
        gen = torch.Generator("cpu").manual_seed(seed)
        latent = torch.randn(shape, generator=gen).to(dev)
        shift = spec.flow_shift(height, width)
        sampler = UniPCFlowSampler(wan_flow_sigmas(steps, shift))
        timesteps = wan_flow_timesteps(steps, shift).tolist()
        guided = len(text) == 2
        batched = guided and cfg == "batched"
        n = 2 if batched else 1
        buf = torch.empty((n, *shape[1:]), device=dev)  # the engine's latent input
        velocity = torch.empty_like(buf)
        t_buf = torch.empty(n, device=dev)
        hidden = torch.cat(text).contiguous() if batched else None
        scheduler = PatchScheduler(self.sizes, spec.native_patch, tau, rho, spec.scheduler.warmup)
        if schedule is None:
            scheduler.observe(latent)
        used, step_ms = [], []
        for i in tqdm(range(steps), desc="denoise", unit="step", disable=not progress, leave=False):
            t0 = time.perf_counter()
            factor = scheduler.next_factor() if schedule is None else schedule[i]
            engine = self.engines[factor]
            t_buf.fill_(float(timesteps[i]))
            if batched:
                buf.copy_(latent.expand(2, *shape[1:]))
                engine.run({"latent": buf, "timestep": t_buf, "encoder_hidden_states": hidden}, {"velocity": velocity})
                v = velocity[1:] + scale * (velocity[:1] - velocity[1:])
            else:
                buf.copy_(latent)
                engine.run({"latent": buf, "timestep": t_buf, "encoder_hidden_states": text[0]}, {"velocity": velocity})
                v = velocity.clone()
                if guided:
                    engine.run(
                        {"latent": buf, "timestep": t_buf, "encoder_hidden_states": text[1]}, {"velocity": velocity}
                    )
                    v = velocity + scale * (v - velocity)
            latent = sampler.step(v, i, latent)
            if schedule is None:
                scheduler.observe(latent)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            step_ms.append((time.perf_counter() - t0) * 1000)
            used.append(factor)
        return latent, step_ms, used
