"""Text to video from a Wan engines folder: umT5 encode, UniPC flow sampling with classifier-free guidance and a
per-step engine choice, then the causal VAE decoder one latent frame at a time.

The sampler is what diffusers' WanPipeline uses (UniPC multistep, flow sigmas, shift 3.0 at 480p and 5.0 above).
The DDiT scheduler reads the same latent trajectory, with spatial patches per latent frame. With ``teacache``,
each engine call is preceded by its size's probe (the timestep embedding, and the velocity from the cached
residual), and the blocks run only when TeaCache says so (see ``teacache`` for the per-pass accumulators).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ddit_profiles import DDiTError

from .backends import backend_from_provider, open_transformers
from .engine import OrtEngine, elapsed_ms, loop_threads, teacache_probe
from .guidance import CFG_MODES, guided_velocity
from .manifest import load_manifest
from .pipeline import Generation
from .scheduler import PatchScheduler, check_schedule_sizes, tau_and_source
from .teacache import TeaCache, any_compute, polynomials
from .text import PromptTokenizer
from .unipc import UniPCFlowSampler, wan_flow_sigmas, wan_flow_timesteps


class WanRuntime:
    """Loads a Wan engines folder (validated first) and generates videos from prompts."""

    #: Called as ``trace(factor, step, signal, velocity)`` after every engine call that ran a TeaCache probe, with
    #: the call's buffers ([passes in the call, ...] each; copy what you keep): ``ddit-bench --fit-teacache`` records
    #: each size's signal and output change through it. None: nothing is called.
    trace = None

    def __init__(
        self,
        folder: str | Path,
        provider: str | None = None,
        verify: bool = True,
        sizes=None,
        backend: str | None = None,
        cuda_graphs: bool = False,
    ):
        """``backend``: auto|ort-cpu|ort-cuda|trt (``provider`` auto|cpu|cuda is the older name for the ORT ones)."""
        self.manifest = load_manifest(folder, verify=verify)
        if self.manifest.data["family"] != "wan":
            raise DDiTError(f"'{folder}' holds {self.manifest.data['family']} engines, not Wan ones")
        self.spec = self.manifest.spec
        self.sizes, self.loader, self.engines = open_transformers(
            self.manifest, folder, sizes, backend_from_provider(backend, provider), verify, cuda_graphs
        )
        self.backend, self.device = self.loader.backend, self.loader.device
        self.probes: dict[int, OrtEngine] = {}  # TeaCache probes, loaded on first use
        text = self.manifest.component("text_encoder")
        self.tokenizer = PromptTokenizer(
            self.manifest.path(text["tokenizer"]), text["max_length"], text["pad_id"], text["pad_token"], "umT5"
        )
        self.text_encoder = self.loader.open("text_encoder")
        vae = self.manifest.component("vae_decoder")
        self.vae_first = self.loader.open("vae_decoder")
        self.vae_step = self.loader.open("vae_decoder_step")
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

    def _probe(self, factor: int) -> OrtEngine:
        if factor not in self.probes:
            self.probes[factor] = teacache_probe(self.manifest, self.engines[factor], factor, self.loader.open)
        return self.probes[factor]

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

    @torch.inference_mode()  # no autograd bookkeeping: every small torch op of the loop costs less
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
        teacache: float | None = None,
        progress: bool = True,
        teacache_switch: str = "recompute",
        teacache_coefficients: Sequence[float] | None = None,
    ) -> Generation:
        """Run the whole pipeline. ``schedule`` fixes the factor per step; None lets the DDiT scheduler choose.
        ``teacache`` (a threshold such as 0.05 / 0.065 / 0.08; the tiny Wan's 20 steps: 0.15 / 0.25 / 0.4) also skips the blocks on steps TeaCache deems cheap,
        with one accumulator per classifier-free-guidance pass; ``teacache_switch`` (``recompute`` or ``per-size``)
        is what a patch-size switch does to it (see ``teacache``); ``teacache_coefficients`` (highest power first)
        replace, for every size, the manifest's rescaling polynomial and the per-size ones ``ddit-bench
        --fit-teacache`` recorded for this shape (used by default where the shape matches)."""
        spec, d = self.spec, self.spec.scheduler
        frames = spec.opt_frames if frames is None else frames
        height = spec.opt_size[0] if height is None else height
        width = spec.opt_size[1] if width is None else width
        steps = d.steps if steps is None else steps
        scale = d.guidance if guidance_scale is None else guidance_scale
        rho = d.rho if rho is None else rho
        negative = spec.negative_prompt if negative_prompt is None else negative_prompt
        if not prompt or not prompt.strip():
            raise DDiTError("the prompt is empty: pass --prompt with some text")
        spec.check_frames(frames)
        spec.check_resolution(height, width, self.sizes)
        if steps < 1:
            raise DDiTError(f"--steps must be at least 1, got {steps}")
        tau, tau_source = tau_and_source(d, tau, height, width, frames, steps, self.sizes, rho)
        if cfg not in CFG_MODES:
            raise DDiTError(f"unknown --cfg '{cfg}': choose {' or '.join(CFG_MODES)}")
        if schedule is not None and len(schedule) != steps:
            raise DDiTError(f"the schedule has {len(schedule)} entries for {steps} steps: give one per step")
        check_schedule_sizes(schedule, self.sizes)
        caches = None
        if teacache is not None:  # one accumulator per pass: conditional, and unconditional when guided
            passes = 2 if scale > 1.0 else 1
            poly, fitted, poly_source = polynomials(spec.teacache, teacache_coefficients, height, width, frames, steps)
            caches = [TeaCache(teacache, poly, steps, teacache_switch, fitted) for _ in range(passes)]
            for k in self.sizes if schedule is None else sorted(set(schedule)):
                self._probe(k)  # fail before any work when the folder has no probes
        started = time.perf_counter()
        text = [self.encode(prompt)] + ([self.encode(negative)] if scale > 1.0 else [])
        with loop_threads(self.device):
            latent, step_ms, used, computed, engine_ms = self._denoise(
                text, (frames, height, width), steps, seed, scale, tau, rho, schedule, cfg, caches, progress
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
            tau_source=tau_source,
            rho=rho,
            cfg=cfg,
            schedule_mode="auto" if schedule is None else "fixed",
            sizes=list(self.sizes),  # the engines DDiT could choose from
            sampler="unipc_flow",
            flow_shift=spec.flow_shift(height, width),
            teacache=teacache,
        )
        if caches is not None:  # every pass sees the same schedule: count the steps once
            settings["teacache_switch"] = teacache_switch
            settings["teacache_coefficients"] = list(caches[0].coefficients)
            settings["teacache_coefficients_source"] = poly_source
            if fitted:  # the fitted sizes' own polynomials
                settings["teacache_fitted"] = {str(k): list(v) for k, v in caches[0].size_coefficients.items()}
            settings["teacache_forced_by_switch"] = caches[0].forced_by_switch
            settings["teacache_reused_across_switch"] = caches[0].reused_across_switch
        return Generation(video, used, step_ms, time.perf_counter() - started, settings, computed, engine_ms)

    def _residuals(self, passes: int, frames: int, height: int, width: int, shared: bool) -> dict[int, torch.Tensor]:
        """Per size, the residual buffer [passes, F, rows_k, cols_k, D] (pass 0 conditional, 1 unconditional).

        ``shared`` (no TeaCache, or its ``recompute`` switch policy): all sizes are views of one storage sized for
        the largest grid. A cached residual is then only reused at the size that wrote it with no other size in
        between (a switch forces a full step), so the sizes never need theirs at once. Under ``per-size`` a size's
        residual must survive the steps run at other sizes, so each size gets its own. Empty for folders exported
        before TeaCache (their engines have no residual output)."""
        if any("residual" not in self.engines[k].output_names for k in self.sizes):
            return {}
        dim = self.engines[self.sizes[0]].output_dim("residual")  # the model width, the same for every size
        shapes = {
            k: (passes, self.spec.latent_frames(frames), *self.spec.token_grid(k, height, width), dim)
            for k in self.sizes
        }
        if not shared:
            return {k: torch.zeros(shape, device=self.device) for k, shape in shapes.items()}
        storage = torch.zeros(max(math.prod(s) for s in shapes.values()), device=self.device)
        return {k: storage[: math.prod(s)].view(s) for k, s in shapes.items()}

    def _call(self, factor: int, step: int, feeds: dict, velocity, residual, signal, caches) -> bool:
        """One engine call (one pass, or both batched): with ``caches``, the probe writes the signal
        [passes, D] and the velocity from the cached ``residual``, and the blocks run only when TeaCache says so.
        Returns whether they ran."""
        compute = True
        if caches:
            outputs = {self.spec.teacache_outputs[0]: signal, "velocity": velocity}
            self.probes[factor].run(feeds | {"residual": residual}, outputs)
            compute = any_compute(caches, signal, step, factor)  # a host read per pass
        if compute:
            self.engines[factor].run(
                feeds, {"velocity": velocity} | ({} if residual is None else {"residual": residual})
            )
        if caches and self.trace is not None:
            self.trace(factor, step, signal, velocity)
        return compute

    def _signal(self, passes: int) -> torch.Tensor:
        """The TeaCache signal buffer [passes, D] (the probes' first output)."""
        name = self.spec.teacache_outputs[0]
        return torch.empty(passes, self.probes[next(iter(self.probes))].output_dim(name), device=self.device)

    def _denoise(self, text, video, steps, seed, scale, tau, rho, schedule, cfg, caches, progress):
        """``video`` is (frames, height, width). Returns (latent, step_ms, schedule, computed,
        engine_ms).

        Engine calls per step: one batch of both passes (batched CFG) or one call per pass; pass 0 is the
        conditional one. Buffers with a pass dimension (residuals, the TeaCache signal) are sliced per call."""
        spec, dev = self.spec, self.device
        frames, height, width = video
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
        calls = (
            [(slice(0, 2), torch.cat(text).contiguous())]
            if batched
            else [(slice(p, p + 1), t) for p, t in enumerate(text)]
        )
        shared = not caches or not caches[0].per_size
        residuals = self._residuals(len(text), frames, height, width, shared)
        signal = self._signal(len(text)) if caches else None
        scheduler = PatchScheduler(self.sizes, spec.native_patch, tau, rho, spec.scheduler.warmup)
        if schedule is None:
            scheduler.observe(latent)
        used, step_ms, computed, engine_ms = [], [], [], []
        for i in tqdm(range(steps), desc="denoise", unit="step", disable=not progress, leave=False):
            t0 = time.perf_counter()
            factor = scheduler.next_factor() if schedule is None else schedule[i]
            res = residuals.get(factor)
            t_buf.fill_(float(timesteps[i]))
            buf.copy_(latent.expand(n, *shape[1:]))
            ran, in_engines = [], 0.0
            for lane, states in calls:
                feeds = {"latent": buf, "timestep": t_buf, "encoder_hidden_states": states}
                lanes = [None if x is None else x[lane] for x in (res, signal, caches)]
                t1 = time.perf_counter()
                ran.append(self._call(factor, i, feeds, velocity, *lanes))
                in_engines += elapsed_ms(t1, dev)
                if not batched and lane.start == 0:
                    v = velocity.clone()  # the conditional velocity, before the unconditional pass overwrites it
            engine_ms.append(in_engines)
            if batched:
                v = guided_velocity(velocity[:1], velocity[1:], scale)
            elif guided:
                v = guided_velocity(v, velocity, scale)
            latent = sampler.step(v, i, latent)
            if schedule is None:
                scheduler.observe(latent)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            step_ms.append((time.perf_counter() - t0) * 1000)
            used.append(factor)
            computed.append(any(ran))
        return latent, step_ms, used, computed, engine_ms
