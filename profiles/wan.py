"""Wan 2.1 text-to-video: the ``WanSpec`` shape arithmetic, the 1.3B profile, and its embedded tiny variant.

A Wan latent is ``[B, 16, F, H, W]`` with ``F = (frames - 1) / 4 + 1`` and ``H, W = height / 8, width / 8``.
The native token is a (1, 2, 2) patch; patch factor k uses (1, 2k, 2k) (the temporal patch stays 1).
Resolutions only need to tile the native patch (multiples of 16 pixels): the coarse engines pad the latent up to
a multiple of 2k inside the graph (replicate padding) and crop the velocity back (see ``padded_latent_hw``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import DDiTError
from .spec import FluxSpec, SchedulerDefaults, TeaCacheSpec, Tolerance, check_in_range, rebuild, suggest_size

WAN_TRANSFORMER_INPUTS = ("latent", "timestep", "encoder_hidden_states")
WAN_TRANSFORMER_OUTPUTS = ("velocity", "residual")  # residual: what the blocks added, for TeaCache
#: The per-size TeaCache probe: the timestep embedding (the signal), and the velocity from a cached residual.
WAN_TEACACHE_INPUTS = ("latent", "timestep", "residual")
WAN_TEACACHE_OUTPUTS = ("temb", "velocity")
#: How the coarse engines fill the latent up to a multiple of their patch: ONNX Pad mode "edge".
PAD_MODE = "replicate"


#: TeaCache4Wan2.1's fit for T2V 1.3B (its default mode): the signal is the timestep embedding ``e`` (diffusers'
#: ``temb``), one accumulator per CFG pass; thresholds 0.05 (~1.5x) to 0.08 (~2x) at its 50 steps.
WAN_13B_TEACACHE = TeaCacheSpec(
    signal="timestep_embedding",
    coefficients=(2.39676752e03, -1.31110545e03, 2.01331979e02, -8.29855975e00, 1.37887774e-01),
    presets=(0.05, 0.065, 0.08),
)


@dataclass(frozen=True)
class WanSpec:
    """One Wan-family model: what the exporter checks the checkpoint against and the runtime sizes buffers from."""

    name: str
    hub_id: str | None
    description: str
    # Architecture facts (diffusers WanTransformer3DModel, UMT5EncoderModel, AutoencoderKLWan).
    latent_channels: int = 16
    vae_scale_factor: int = 8  # spatial compression
    vae_temporal_factor: int = 4  # temporal compression: frames = 4 n + 1
    native_patch: int = 2  # (1, 2, 2): latent pixels per token side at the native size
    num_layers: int = 30
    num_heads: int = 12
    head_dim: int = 128
    ffn_dim: int = 8960
    text_dim: int = 4096  # umT5 width
    t5_max_length: int = 512
    # What an export offers.
    patch_factors: tuple[int, ...] = (1, 2, 4)
    min_size: tuple[int, int] = (256, 256)  # (height, width) in pixels
    opt_size: tuple[int, int] = (480, 832)
    max_size: tuple[int, int] = (720, 1280)
    min_frames: int = 5
    opt_frames: int = 81
    max_frames: int = 81
    max_batch: int = 2  # the conditional and unconditional passes of classifier-free guidance
    opset: int = 18
    scheduler: SchedulerDefaults = SchedulerDefaults(tau=0.001, rho=0.4, warmup=3, steps=50, guidance=5.0)
    negative_prompt: str = ""
    # UniPC flow sigmas: shift 3.0 up to 480p (by pixel area), 5.0 above (720p).
    flow_shift_low: float = 3.0
    flow_shift_high: float = 5.0
    flow_shift_area: int = 480 * 832
    num_train_timesteps: int = 1000
    transformer_tolerance: Tolerance = Tolerance(atol=1e-3, rtol=5e-3)
    text_tolerance: Tolerance = Tolerance(atol=1e-3, rtol=5e-3)
    vae_tolerance: Tolerance = Tolerance(atol=1e-3, rtol=5e-3)
    fp16_tolerance: Tolerance = Tolerance(atol=1e-2, rtol=3e-2)  # as FluxSpec's
    tiny_configs: dict = field(default_factory=dict, compare=False, repr=False)
    family: str = "wan"
    transformer_inputs: tuple[str, ...] = WAN_TRANSFORMER_INPUTS
    transformer_outputs: tuple[str, ...] = WAN_TRANSFORMER_OUTPUTS
    teacache: TeaCacheSpec = WAN_13B_TEACACHE
    teacache_inputs: tuple[str, ...] = WAN_TEACACHE_INPUTS
    teacache_outputs: tuple[str, ...] = WAN_TEACACHE_OUTPUTS

    # ---- shape arithmetic -------------------------------------------------------------------------------------

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def guidance_scale(self) -> float:
        """Classifier-free guidance scale (Wan has no embedded guidance input)."""
        return self.scheduler.guidance

    def latent_frames(self, frames: int) -> int:
        """Latent frames for a video of ``frames`` frames (4 n + 1 -> n + 1)."""
        return (frames - 1) // self.vae_temporal_factor + 1

    def video_frames(self, latent_frames: int) -> int:
        """The inverse of ``latent_frames``: what the VAE decodes ``latent_frames`` into."""
        return (latent_frames - 1) * self.vae_temporal_factor + 1

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def patch_pixels(self, factor: int) -> int:
        """Latent pixels per token side (spatial) at patch factor ``factor``: 2, 4, 8. The temporal patch is 1."""
        return self.native_patch * factor

    def token_channels(self, factor: int) -> int:
        """Values one token covers: ``C * 1 * p * p`` (the de-embedding's output width)."""
        return self.latent_channels * self.patch_pixels(factor) ** 2

    def padded_latent_hw(self, factor: int, height: int, width: int) -> tuple[int, int]:
        """Latent height and width after the engine pads them up to a multiple of ``patch_pixels(factor)``."""
        p = self.patch_pixels(factor)
        lh, lw = self.latent_hw(height, width)
        return math.ceil(lh / p) * p, math.ceil(lw / p) * p

    def token_grid(self, factor: int, height: int, width: int) -> tuple[int, int]:
        p = self.patch_pixels(factor)
        ph, pw = self.padded_latent_hw(factor, height, width)
        return ph // p, pw // p

    def tokens_for(self, factor: int, frames: int, height: int, width: int) -> int:
        """Video tokens per sample at ``factor`` (after padding): latent frames x token rows x token columns."""
        rows, cols = self.token_grid(factor, height, width)
        return self.latent_frames(frames) * rows * cols

    def step_flops(self, factor: int, frames: int, height: int, width: int, batch: int = 1) -> float:
        """Analytic FLOPs (2 per multiply-add) of one transformer call at patch factor ``factor``.

        With N video tokens, T text tokens, width D and FFN width F, a block runs self-attention projections
        (4 D^2 per token) and the cross-attention query and output (2 D^2) on the N tokens, the cross-attention
        keys and values (2 D^2) on the T tokens, the FFN (2 D F) on the N tokens, and attention scores and sums
        over N x N (self) and N x T (cross), 2 N L D each. Plus the patch embedding and output head (C p^2 D each,
        per token) and the text embedder (text_dim D + D^2 per text token). The per-sample time/AdaLN vectors
        do not scale with tokens and are left out.
        """
        n, t, d = self.tokens_for(factor, frames, height, width), self.t5_max_length, self.inner_dim
        per_block = n * (6 * d * d + 2 * d * self.ffn_dim) + t * 2 * d * d + 2 * n * n * d + 2 * n * t * d
        embed = 2 * n * self.token_channels(factor) * d + t * (self.text_dim * d + d * d)
        return 2.0 * batch * (self.num_layers * per_block + embed)

    def resolution_multiple(self, factors: tuple[int, ...] = (1,)) -> int:
        """Pixel multiple of height and width: the native patch must tile; coarse sizes pad (``factors`` unused)."""
        return self.vae_scale_factor * self.native_patch

    def check_factors(self, factors) -> tuple[int, ...]:
        """The same rules as FLUX: powers of two offered by the profile, the native size 1 among them."""
        return FluxSpec.check_factors(self, factors)  # type: ignore[arg-type]

    def check_resolution(self, height: int, width: int, factors: tuple[int, ...] = (1,)) -> None:
        """Raise a one-line ``DDiTError`` unless ``height x width`` is in range and a multiple of 16 pixels.

        Coarse factors need no divisibility: their engines pad the latent (PAD policy) and crop the velocity.
        """
        check_in_range(self, height, width)
        mult = self.resolution_multiple(factors)
        if height % mult or width % mult:
            raise DDiTError(
                f"resolution {height}x{width} is not a multiple of {mult} pixels (the VAE's 8 times the native patch "
                f"2): use e.g. {suggest_size(self, height, width, mult)}"
            )

    def valid_frames(self) -> list[int]:
        step = self.vae_temporal_factor
        first = self.min_frames + (1 - self.min_frames) % step
        return list(range(first, self.max_frames + 1, step))

    def check_frames(self, frames: int) -> None:
        """Raise a one-line ``DDiTError`` unless ``frames`` is 4 n + 1 and within the profile's range."""
        valid = self.valid_frames()
        if frames in valid:
            return
        below = [f for f in valid if f <= frames][-1:]
        above = [f for f in valid if f >= frames][:1]
        picks = " or ".join(str(f) for f in below + above) or str(valid[0])
        listing = ", ".join(map(str, valid)) if len(valid) <= 8 else f"{valid[0]}, {valid[1]}, ..., {valid[-1]}"
        raise DDiTError(
            f"{frames} frames is not valid for profile '{self.name}': the count must be 4n+1 from "
            f"{self.min_frames} to {self.max_frames} ({listing}); use e.g. {picks}"
        )

    def flow_shift(self, height: int, width: int) -> float:
        """UniPC flow-sigma shift: 3.0 up to 480p (by pixel area), 5.0 above (720p)."""
        return self.flow_shift_low if height * width <= self.flow_shift_area else self.flow_shift_high

    def frame_range(self) -> tuple[int, int, int]:
        """(min, opt, max) latent frames: the transformer engines' dynamic frame range."""
        return tuple(self.latent_frames(f) for f in (self.min_frames, self.opt_frames, self.max_frames))

    # ---- serialisation (the manifest carries the spec) --------------------------------------------------------

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("tiny_configs")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WanSpec:
        return rebuild(cls, d)


WAN = WanSpec(
    name="wan",
    hub_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    description="Wan 2.1 T2V 1.3B: 30 layers, 12 heads x 128 (1536), ffn 8960, umT5 (4096, 512), VAE /8 and /4",
)

#: The tiny variant: the same diffusers classes at toy size (trained by ``ddit-recipe wan``; seeded random weights
#: where no trained one is installed). 256x256 with 9 frames gives 3 latent frames of 32x32, so 768 / 192 / 48
#: tokens at k = 1 / 2 / 4. Six layers with ffn 512 (1.76 M parameters): three layers with ffn 256 scored 0.33
#: against 0.41 on 16 built-in captions (torch sampling) after the same recipe (colour 0.17 -> 0.30, count 0.22 -> 0.44).
WAN_TINY = WanSpec(
    name="wan-tiny",
    hub_id=None,
    description="tiny Wan 2.1 (6 layers, 4 heads x 32, umT5 width 64) of the real diffusers classes",
    num_layers=6,
    num_heads=4,
    head_dim=32,
    ffn_dim=512,
    text_dim=64,
    t5_max_length=32,
    min_size=(128, 128),
    opt_size=(256, 256),
    max_size=(512, 512),
    min_frames=5,
    opt_frames=9,
    max_frames=17,
    max_batch=4,
    # tau calibrated on the trained tiny Wan with 16 calibration captions (seeds disjoint from the held-out ones):
    # 0.003 ran 4% of the steps coarse, 0.006 9% (score 0.228 against native 0.244); 0.001 ran none. See docs/embedded-models.md.
    scheduler=SchedulerDefaults(tau=0.006, rho=0.4, warmup=3, steps=20, guidance=5.0),
    # At 20 steps the timestep embedding moves 2.5x as far per step as at the fit's 50, so the published 0.05-0.08
    # computed every step (ddit-bench, 16 captions). Measured on the trained tiny Wan (ddit-bench --count 8
    # --teacache-thresholds 0.15,0.25,0.4): 95% / 70% / 50% of the steps computed, 1.03x / 1.26x / 1.53x.
    teacache=dataclasses.replace(WAN_13B_TEACACHE, presets=(0.15, 0.25, 0.4)),
    transformer_tolerance=Tolerance(atol=1e-4, rtol=1e-3),
    text_tolerance=Tolerance(atol=1e-4, rtol=1e-3),
    vae_tolerance=Tolerance(atol=1e-4, rtol=1e-3),
    tiny_configs={
        "transformer": dict(
            patch_size=(1, 2, 2),
            num_attention_heads=4,
            attention_head_dim=32,
            in_channels=16,
            out_channels=16,
            text_dim=64,
            freq_dim=64,
            ffn_dim=512,
            num_layers=6,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=1024,
        ),
        "text_encoder": dict(  # UMT5Config; vocab_size and special ids come from the tiny tokenizer
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
        ),
        "vae": dict(  # AutoencoderKLWan; latents_mean / latents_std keep diffusers' defaults (the 2.1 values)
            base_dim=16,  # at 8 the recipe's VAE stays on the loss plateau where it predicts the mean colour
            z_dim=16,
            dim_mult=(1, 2, 4, 4),
            num_res_blocks=1,
            temperal_downsample=(False, True, True),
        ),
    },
)

#: A benchmark profile: Wan 2.1 1.3B's real widths (12 heads x 128 = 1536, ffn 8960, umT5 4096 x 512 tokens) at 2
#: layers, random weights (``--model random``), at 480x832 and a small frame count (5 frames = 2 latent frames:
#: 3120 / 780 / 208 video tokens at k = 1 / 2 / 4, with 4p padding 60 latent rows up to 64).
WAN_13B_SHAPE = WanSpec(
    name="wan-1.3b-shape",
    hub_id=None,
    description="Wan 2.1 1.3B widths (12 heads x 128, ffn 8960, umT5 4096 x 512) at 2 layers, random weights: "
    "a benchmark profile",
    num_layers=2,
    min_size=(256, 256),
    opt_size=(480, 832),
    max_size=(480, 832),
    min_frames=5,
    opt_frames=5,
    max_frames=9,
    scheduler=SchedulerDefaults(tau=0.001, rho=0.4, warmup=3, steps=50, guidance=5.0),
    tiny_configs={
        "transformer": dict(
            patch_size=(1, 2, 2),
            num_attention_heads=12,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=8960,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=1024,
        ),
        "text_encoder": dict(  # one narrow umT5 layer that produces the real 4096 width
            d_model=4096,
            d_kv=64,
            d_ff=256,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=32,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
        ),
        "vae": WAN_TINY.tiny_configs["vae"],
    },
)
