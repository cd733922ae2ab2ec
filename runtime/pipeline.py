"""Text to image from an engines folder: tokenise, encode, flow-matching Euler with per-step engine choice, decode.

The denoising loop keeps every tensor in preallocated buffers on one device. Switching the patch size for a step
is a choice of session: all transformer engines read the same full-resolution latent and write the same velocity.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ddit_profiles import DDiTError

from .backends import backend_from_provider, open_transformers
from .engine import OrtEngine, elapsed_ms, loop_threads, teacache_probe
from .guidance import CFG_MODES, guided_velocity
from .manifest import Manifest, load_manifest
from .scheduler import PatchScheduler, check_schedule_sizes, tau_and_source
from .sigmas import flux_sigmas
from .teacache import TeaCache, any_compute, polynomials
from .text import PromptTokenizer, check_prompt


@dataclass
class Generation:
    """What one ``generate`` call produced and how."""

    image: torch.Tensor  # [3, H, W] uint8 on the CPU
    schedule: list[int]
    step_ms: list[float]
    total_s: float
    settings: dict = field(default_factory=dict)
    computed: list[bool] = field(default_factory=list)  # per step: the blocks ran (False: TeaCache reused)
    engine_ms: list[float] = field(default_factory=list)  # per step: the part of step_ms spent in engine calls


class FluxRuntime:
    """Loads an engines folder (validated first) and generates images from prompts."""

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
        self.manifest: Manifest = load_manifest(folder, verify=verify)
        self.spec = self.manifest.spec
        self.sizes, self.loader, self.engines = open_transformers(
            self.manifest, folder, sizes, backend_from_provider(backend, provider), verify, cuda_graphs
        )
        self.backend, self.device = self.loader.backend, self.loader.device
        self.probes: dict[int, OrtEngine] = {}  # TeaCache probes, loaded on first use
        self.text = {name: self._text_component(name) for name in ("text_encoder", "text_encoder_2")}
        self.vae = self.loader.open("vae_decoder")

    def _text_component(self, name: str):
        meta = self.manifest.component(name)
        tokenizer = PromptTokenizer(
            self.manifest.path(meta["tokenizer"]),
            meta["max_length"],
            meta["pad_id"],
            meta["pad_token"],
            "CLIP" if name == "text_encoder" else "T5",
        )
        return tokenizer, self.loader.open(name)

    def encode(self, prompt: str, negative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt -> (T5 states [1, T, D], pooled CLIP [1, P]) on the runtime's device (``negative``: may be empty,
        as CFG's default negative prompt is)."""
        if not negative:
            check_prompt(prompt)
        clip_tok, clip = self.text["text_encoder"]
        t5_tok, t5 = self.text["text_encoder_2"]
        return t5(input_ids=t5_tok(prompt)).contiguous(), clip(input_ids=clip_tok(prompt)).contiguous()

    def _probe(self, factor: int) -> OrtEngine:
        if factor not in self.probes:
            self.probes[factor] = teacache_probe(self.manifest, self.engines[factor], factor, self.loader.open)
        return self.probes[factor]

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [1, 16, h, w] -> image [3, 8h, 8w] uint8 on the CPU."""
        scaled = latent / self.spec.vae_scaling_factor + self.spec.vae_shift_factor
        image = self.vae(latent=scaled)[0]
        return ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()

    @torch.inference_mode()  # no autograd bookkeeping: every small torch op of the loop costs less
    def generate(
        self,
        prompt: str,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        seed: int = 0,
        guidance: float | None = None,
        tau: float | None = None,
        rho: float | None = None,
        schedule: list[int] | None = None,
        teacache: float | None = None,
        progress: bool = True,
        true_cfg: float | None = None,
        negative_prompt: str = "",
        teacache_switch: str = "recompute",
        cfg: str = "batched",
        teacache_coefficients: Sequence[float] | None = None,
    ) -> Generation:
        """Run the whole pipeline. ``schedule`` fixes the factor per step; None lets the DDiT scheduler choose.
        ``teacache`` (a threshold such as 0.25 / 0.4 / 0.6) also skips the blocks on steps TeaCache deems cheap.
        ``true_cfg`` above 1 (default: the profile's) guides against ``negative_prompt``:
        v = v_neg + true_cfg * (v - v_neg), one TeaCache accumulator per pass. ``cfg``: the two passes as one engine
        call on a batch of 2 (``batched``, the default) or as two calls (``two-pass``).
        ``teacache_switch``: what a patch-size switch does to TeaCache, ``recompute`` or ``per-size`` (see
        ``teacache``). ``teacache_coefficients`` (highest power first) replace, for every size, the manifest's
        rescaling polynomial and the per-size ones ``ddit-bench --fit-teacache`` recorded for this shape (which are
        used by default where the shape matches; ``settings['teacache_coefficients_source']`` says which ran)."""
        spec, defaults = self.spec, self.spec.scheduler
        height = spec.opt_size[0] if height is None else height
        width = spec.opt_size[1] if width is None else width
        steps = defaults.steps if steps is None else steps
        guidance = defaults.guidance if guidance is None else guidance
        true_cfg = defaults.true_cfg if true_cfg is None else true_cfg
        if not true_cfg >= 1.0:
            raise DDiTError(f"--true-cfg must be at least 1 (1 turns it off), got {true_cfg}")
        if steps < 1:
            raise DDiTError(f"--steps must be at least 1, got {steps}")
        if cfg not in CFG_MODES:
            raise DDiTError(f"unknown --cfg '{cfg}': choose {' or '.join(CFG_MODES)}")
        rho = defaults.rho if rho is None else rho
        spec.check_resolution(height, width, self.sizes)
        if not 0.0 <= rho <= 1.0:
            raise DDiTError(f"--rho is a quantile and must be in [0, 1], got {rho}")
        tau, tau_source = tau_and_source(defaults, tau, height, width, None, steps, self.sizes, rho)
        if schedule is not None and len(schedule) != steps:
            raise DDiTError(f"the schedule has {len(schedule)} entries for {steps} steps: give one per step")
        check_schedule_sizes(schedule, self.sizes)
        guided = true_cfg > 1.0
        caches = None
        if teacache is not None:  # one accumulator per pass: the prompt's, and the negative's when guided
            poly, fitted, poly_source = polynomials(spec.teacache, teacache_coefficients, height, width, None, steps)
            caches = [TeaCache(teacache, poly, steps, teacache_switch, fitted) for _ in range(2 if guided else 1)]
            for k in self.sizes if schedule is None else sorted(set(schedule)):
                self._probe(k)  # fail before any work when the folder has no probes
        started = time.perf_counter()
        text = [self.encode(prompt)] + ([self.encode(negative_prompt, negative=True)] if guided else [])
        with loop_threads(self.device):
            latent, step_ms, used, computed, engine_ms = self._denoise(
                text, height, width, steps, seed, guidance, true_cfg, tau, rho, schedule, cfg, caches, progress
            )
        image = self.decode(latent)
        settings = dict(
            prompt=prompt,
            seed=seed,
            steps=steps,
            height=height,
            width=width,
            guidance=guidance,
            true_cfg=true_cfg,
            negative_prompt=negative_prompt if guided else None,
            cfg=cfg if guided else None,
            tau=tau,
            tau_source=tau_source,
            rho=rho,
            schedule_mode="auto" if schedule is None else "fixed",
            sizes=list(self.sizes),  # the engines DDiT could choose from
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
        return Generation(image, used, step_ms, time.perf_counter() - started, settings, computed, engine_ms)

    def _buffers(self, factor: int, passes: int, height: int, width: int) -> dict[str, torch.Tensor]:
        """Size ``factor``'s residual (and TeaCache signal) buffers [passes, rows, cols, D] / [passes, N, D], zeroed;
        row p is pass p's."""
        rows, cols = self.spec.token_grid(factor, height, width)
        engine = self.engines[factor]
        if "residual" not in engine.output_names:  # folders exported before TeaCache
            return {}
        dim = engine.output_dim("residual")
        return {
            "residual": torch.zeros(passes, rows, cols, dim, device=self.device),
            "modulated": torch.zeros(passes, rows * cols, dim, device=self.device),
        }

    def _denoise(self, text, height, width, steps, seed, guidance, true_cfg, tau, rho, schedule, cfg, caches, progress):
        """``text``: [(T5 states, pooled)] of the prompt, then of the negative prompt when guided.
        Returns (latent, step_ms, schedule, computed, engine_ms).

        Engine calls per step: one, on a batch of both passes (``cfg`` batched), or one per pass (pass 0 the
        prompt's). Every buffer with a pass dimension (velocity, residuals, TeaCache signals) is sliced per call
        along its first dimension, which keeps each slice contiguous, and the guided velocity is formed in place in
        pass 0's row."""
        spec, dev = self.spec, self.device
        lh, lw = spec.latent_hw(height, width)
        gen = torch.Generator("cpu").manual_seed(seed)
        latent = torch.randn(1, spec.latent_channels, lh, lw, generator=gen).to(dev)  # [1, 16, h, w]
        passes = len(text)
        batched = passes == 2 and cfg == "batched"
        n = passes if batched else 1  # the batch of one engine call
        # The engine's latent input: the latent itself, or a [2, 16, h, w] copy of it that both passes read.
        engine_latent = torch.empty(n, *latent.shape[1:], device=dev) if batched else latent
        velocity = torch.empty(passes, *latent.shape[1:], device=dev)  # [passes, 16, h, w]
        sigmas = flux_sigmas(steps, spec.shift.mu(spec.image_seq_len(height, width))).tolist()  # host floats
        timestep = torch.empty(n, device=dev)
        common = {
            "latent": engine_latent,
            "timestep": timestep,
            "guidance": torch.full((n,), float(guidance), device=dev),
        }
        if batched:
            states = {
                "encoder_hidden_states": torch.cat([t5 for t5, _ in text]).contiguous(),
                "pooled_projections": torch.cat([pooled for _, pooled in text]).contiguous(),
            }
            calls = [(slice(0, 2), common | states)]
        else:
            calls = [
                (slice(p, p + 1), common | {"encoder_hidden_states": t5, "pooled_projections": pooled})
                for p, (t5, pooled) in enumerate(text)
            ]
        buffers = {k: self._buffers(k, passes, height, width) for k in self.sizes}
        # Per call, once: its feeds, its rows of the velocity, of every size's buffers and of the caches.
        lanes = [
            (
                feeds,
                velocity[lane],
                {k: {name: b[lane] for name, b in buffers[k].items()} for k in self.sizes},
                None if caches is None else caches[lane],
            )
            for lane, feeds in calls
        ]
        cond, uncond = velocity[:1], velocity[1:]  # the prompt pass's row, and the negative's when guided
        scheduler = PatchScheduler(self.sizes, spec.native_patch, tau, rho, spec.scheduler.warmup)
        if schedule is None:
            scheduler.observe(latent)
        used, step_ms, computed, engine_ms = [], [], [], []
        for i in tqdm(range(steps), desc="denoise", unit="step", disable=not progress, leave=False):
            t0 = time.perf_counter()
            factor = scheduler.next_factor() if schedule is None else schedule[i]  # a host read
            timestep.fill_(sigmas[i])
            if batched:
                engine_latent.copy_(latent.expand_as(engine_latent))
            t1 = time.perf_counter()
            ran = [self._call(factor, i, feeds, v, bufs[factor], cache) for feeds, v, bufs, cache in lanes]
            engine_ms.append(elapsed_ms(t1, dev))
            if passes == 2:  # in place, into the prompt pass's row
                guided_velocity(cond, uncond, true_cfg, out=cond)
            latent.add_(cond, alpha=sigmas[i + 1] - sigmas[i])  # Euler: z += (sigma_next - sigma) * v
            if schedule is None:
                scheduler.observe(latent)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)  # honest step times; the GPU queue is empty here anyway
            step_ms.append((time.perf_counter() - t0) * 1000)
            used.append(factor)
            computed.append(any(ran))
        return latent, step_ms, used, computed, engine_ms

    def _call(self, factor: int, step: int, feeds: dict, velocity, buf: dict, caches) -> bool:
        """One engine call (one pass, or both batched): with ``caches`` (one per pass in the call), the probe writes
        the signals and the velocity from the cached residual, and the blocks run only when TeaCache says so for
        any pass in the call (a host read per pass). Returns whether they ran."""
        compute = True
        if caches is not None:
            self.probes[factor].run(
                feeds | {"residual": buf["residual"]}, {"modulated": buf["modulated"], "velocity": velocity}
            )
            compute = any_compute(caches, buf["modulated"], step, factor)
        if compute:
            self.engines[factor].run(feeds, {"velocity": velocity} | {k: buf[k] for k in ("residual",) if k in buf})
        if caches is not None and self.trace is not None:
            self.trace(factor, step, buf["modulated"], velocity)
        return compute
