"""The model-family spec: architecture facts, I/O names, shape ranges, scheduler defaults and tolerances.

Every piece of shape arithmetic in the project (latent size, tokens per patch factor, divisibility, valid
resolutions, the flow-matching shift) is a method here, used by the exporter and the runtime alike.
The runtime rebuilds the spec from the manifest (``FluxSpec.from_dict``), so an engines folder carries its own.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import DDiTError

#: Precisions a transformer graph can be typed in (``ddit-export --precision``). The graph's inputs and outputs stay
#: float32 (every engine keeps one I/O contract); its weights and arithmetic are in this type, so a strongly typed
#: TensorRT build runs it so, with no builder precision flags.
#: fp8: FP8 E4M3 weights and activations on the blocks' Linear layers (``fp8_scope``), fp16 elsewhere
#: (``ddit_export/fp8.py``); TensorRT runs it on GPUs of compute capability 8.9 and newer (``FP8_MIN_CC``).
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
FP8_MIN_CC = (8, 9)

#: Names of the transformer engine's inputs and outputs: one contract for every patch factor.
FLUX_TRANSFORMER_INPUTS = ("latent", "timestep", "guidance", "encoder_hidden_states", "pooled_projections")
FLUX_TRANSFORMER_OUTPUTS = ("velocity", "residual")  # residual: what the blocks added, for TeaCache
#: The per-size TeaCache probe: the cheap signal, and the velocity from a cached residual.
FLUX_TEACACHE_INPUTS = ("latent", "timestep", "guidance", "pooled_projections", "residual")
FLUX_TEACACHE_OUTPUTS = ("modulated", "velocity")


def check_in_range(spec, height: int, width: int) -> None:
    """One-line ``DDiTError`` unless ``height x width`` lies within the profile's min and max size."""
    (h0, w0), (h1, w1) = spec.min_size, spec.max_size
    if not (h0 <= height <= h1 and w0 <= width <= w1):
        raise DDiTError(
            f"resolution {height}x{width} is outside profile '{spec.name}' ({h0}x{w0} to {h1}x{w1}): "
            f"pick a height and width in that range"
        )


def suggest_size(spec, height: int, width: int, mult: int) -> str:
    """'HxW' with the multiples of ``mult`` nearest to the asked size, within the profile's range."""

    def near(value: int, lo: int, hi: int) -> str:
        down, up = (value // mult) * mult, math.ceil(value / mult) * mult
        picks = [v for v in (down, up) if lo <= v <= hi]
        return " or ".join(str(v) for v in dict.fromkeys(picks)) or str(lo)

    (h0, w0), (h1, w1) = spec.min_size, spec.max_size
    return f"{near(height, h0, h1)}x{near(width, w0, w1)}"


@dataclass(frozen=True)
class Tolerance:
    """ONNX-versus-torch parity bound: ``max|onnx - torch| <= atol + rtol * max|torch|``."""

    atol: float
    rtol: float

    def bound(self, reference_scale: float) -> float:
        return self.atol + self.rtol * reference_scale


def _shape_text(height: int, width: int, frames: int | None, steps: int) -> str:
    """'512x512, 20 steps', or '9 frames of 256x256, 20 steps' for Wan: the shape a calibration was made at."""
    prefix = f"{frames} frames of " if frames is not None else ""
    return f"{prefix}{height}x{width}, {steps} steps"


@dataclass(frozen=True)
class CalibratedTau:
    """A tau that ``ddit-bench --save-tau`` chose for one engines folder at one generation shape: the largest of the
    taus it ran whose quality met its bar there.

    The statistic's scale moves with the shape (FLUX's sigma shift grows with the token count, and a third
    difference scales with the step size cubed), with rho, and with which sizes DDiT may pick, so the runtime takes
    it only where every field below matches the generation; elsewhere the profile's ``tau`` stays.
    """

    height: int
    width: int
    frames: int | None  # Wan's frame count; None for FLUX
    steps: int
    sizes: tuple[int, ...]  # the transformer sizes loaded (ddit-run --sizes)
    rho: float
    tau: float
    evidence: str = ""  # what the bench measured at that tau, for people reading the manifest

    def __post_init__(self):
        object.__setattr__(self, "sizes", tuple(sorted(int(k) for k in self.sizes)))

    def key(self) -> tuple:
        return (self.height, self.width, self.frames, self.steps, self.sizes, self.rho)

    def shape(self) -> str:
        """'512x512, 20 steps, sizes 1,2, rho 0.7' (frames first for Wan)."""
        sizes = ",".join(map(str, self.sizes))
        return f"{_shape_text(self.height, self.width, self.frames, self.steps)}, sizes {sizes}, rho {self.rho:g}"


@dataclass(frozen=True)
class SchedulerDefaults:
    """DDiT scheduler and sampler defaults (paper: tau = 0.001, rho = 0.4).

    ``calibrated``: taus measured for particular shapes: a profile's own (the tiny FLUX ships one), copied into the
    manifest of an export of the weights they were measured on, and those ``ddit-bench --save-tau`` adds to an
    engines folder's manifest. ``tau_for`` picks the one for a generation, else ``tau``.
    """

    tau: float = 0.001
    rho: float = 0.4  # a quantile in [0, 1]: 0.4 is the 40th percentile of the per-patch stds
    warmup: int = 3  # native steps before four latents exist for the third difference
    steps: int = 50
    guidance: float = 3.5  # FLUX: the embedded guidance input; Wan: the classifier-free guidance scale
    # FLUX only: true classifier-free guidance against the empty prompt (diffusers' true_cfg_scale). 1 is off: FLUX.1
    # is guidance-distilled, while the embedded tiny FLUX learnt the unconditional velocity and needs it.
    true_cfg: float = 1.0
    calibrated: tuple[CalibratedTau, ...] = ()

    def __post_init__(self):  # a manifest's JSON gives a list of dicts
        entries = tuple(e if isinstance(e, CalibratedTau) else CalibratedTau(**e) for e in self.calibrated)
        object.__setattr__(self, "calibrated", entries)

    def tau_for(
        self, height: int, width: int, frames: int | None, steps: int, sizes, rho: float
    ) -> tuple[float, CalibratedTau | None]:
        """The tau for a generation of this shape with these sizes loaded and this rho: a calibrated one that
        matches all of them, else the profile's ``tau`` (and None)."""
        key = CalibratedTau(height, width, frames, steps, tuple(sizes), rho, 0.0).key()
        entry = next((e for e in self.calibrated if e.key() == key), None)
        return (self.tau, None) if entry is None else (entry.tau, entry)

    def with_calibrated(self, entry: CalibratedTau) -> SchedulerDefaults:
        """These defaults with ``entry`` added, replacing any calibrated tau of the same shape."""
        kept = tuple(e for e in self.calibrated if e.key() != entry.key())
        return dataclasses.replace(self, calibrated=(*kept, entry))


@dataclass(frozen=True)
class FittedTeaCache:
    """TeaCache rescaling polynomials that ``ddit-bench --fit-teacache`` fitted for one engines folder at one
    generation shape, one per patch size: each maps that size's signal change between consecutive steps to its
    output change, measured on that size's own trajectories.

    The relation moves with the weights, the resolution, the step count and the patch size (the published FLUX.1-dev
    polynomial predicts the tiny FLUX's output change worse than a constant), so the runtime takes these only where
    height, width, frames and steps all match the generation; a size without a polynomial here, and every other
    shape, keeps the manifest's ``coefficients``. ``presets``: the thresholds ``ddit-bench`` sweeps with them
    (fitted polynomials predict the output's own change, so their thresholds are on another scale than the
    published polynomials')."""

    height: int
    width: int
    frames: int | None  # Wan's frame count; None for FLUX
    steps: int
    coefficients: dict  # patch size -> polynomial, highest power first
    presets: tuple[float, ...] = ()
    evidence: str = ""  # how well each fit predicts, on what, for people reading the manifest

    def __post_init__(self):  # a manifest's JSON gives string keys and lists
        polys = {int(k): tuple(float(c) for c in v) for k, v in dict(self.coefficients).items()}
        object.__setattr__(self, "coefficients", dict(sorted(polys.items())))
        object.__setattr__(self, "presets", tuple(float(h) for h in self.presets))

    def key(self) -> tuple:
        return (self.height, self.width, self.frames, self.steps)

    def shape(self) -> str:
        """'512x512, 20 steps' (frames first for Wan)."""
        return _shape_text(self.height, self.width, self.frames, self.steps)


@dataclass(frozen=True)
class TeaCacheSpec:
    """TeaCache (Liu et al. 2024): skip the transformer blocks while the accumulated, rescaled relative L1 change
    of a cheap per-step signal stays under a threshold, and reuse the residual the blocks last added.

    ``coefficients`` (highest power first) map the signal's relative L1 change to the output's; the published
    fits are FLUX.1-dev's (block 0's modulated input) and Wan 2.1 1.3B's (the timestep embedding).
    ``presets`` are the thresholds ``ddit-bench`` sweeps, slow to fast.
    """

    signal: str = "block0_modulated"
    coefficients: tuple[float, ...] = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)
    presets: tuple[float, ...] = (0.25, 0.4, 0.6)
    fitted: tuple[FittedTeaCache, ...] = ()  # per shape: a profile's own, and those ddit-bench --fit-teacache adds

    def __post_init__(self):  # a manifest's JSON gives a list of dicts
        entries = tuple(e if isinstance(e, FittedTeaCache) else FittedTeaCache(**e) for e in self.fitted)
        object.__setattr__(self, "fitted", entries)

    def fitted_for(self, height: int, width: int, frames: int | None, steps: int) -> FittedTeaCache | None:
        """The polynomials fitted at exactly this shape, if any."""
        key = (height, width, frames, steps)
        return next((e for e in self.fitted if e.key() == key), None)

    def with_fitted(self, entry: FittedTeaCache) -> TeaCacheSpec:
        """This spec with ``entry`` added, replacing any fit of the same shape."""
        kept = tuple(e for e in self.fitted if e.key() != entry.key())
        return dataclasses.replace(self, fitted=(*kept, entry))

    def rescale(self, x: float) -> float:
        """The polynomial at ``x`` (Horner)."""
        out = 0.0
        for c in self.coefficients:
            out = out * x + c
        return out


@dataclass(frozen=True)
class FlowShift:
    """FLUX's resolution-dependent shift: ``mu = m * seq_len + b`` through (base_seq, base_shift), (max_seq, max_shift)."""

    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    def mu(self, image_seq_len: int) -> float:
        m = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        b = self.base_shift - m * self.base_seq_len
        return image_seq_len * m + b


@dataclass(frozen=True)
class FluxSpec:
    """One FLUX-family model: what the exporter checks the checkpoint against and the runtime sizes buffers from."""

    name: str
    hub_id: str | None
    description: str
    # Architecture facts (diffusers FluxTransformer2DModel, CLIP-L, T5, AutoencoderKL).
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38
    num_heads: int = 24
    head_dim: int = 128
    mlp_ratio: float = 4.0
    latent_channels: int = 16
    vae_scale_factor: int = 8
    native_patch: int = 2  # latent pixels per token side at the native size (the 2x2 packing)
    joint_attention_dim: int = 4096
    pooled_dim: int = 768
    guidance_embedded: bool = True
    t5_max_length: int = 512
    clip_max_length: int = 77
    vae_scaling_factor: float = 0.3611
    vae_shift_factor: float = 0.1159
    # RoPE position interpolation: fine-grid tokens per side the model was trained at (None: FLUX's absolute
    # positions). On a larger grid the image ids are scaled back onto that span (``flux_model.image_ids``).
    rope_reference: int | None = None
    # What an export offers.
    patch_factors: tuple[int, ...] = (1, 2, 4)
    min_size: tuple[int, int] = (256, 256)  # (height, width) in pixels
    opt_size: tuple[int, int] = (1024, 1024)
    max_size: tuple[int, int] = (2048, 2048)
    # The image side ``ddit-recipe`` trains the embedded model and its adapters at (None: ``opt_size``'s height).
    recipe_size: int | None = None
    max_batch: int = 4
    opset: int = 18
    scheduler: SchedulerDefaults = SchedulerDefaults()
    shift: FlowShift = FlowShift()
    transformer_tolerance: Tolerance = Tolerance(atol=1e-4, rtol=1e-3)
    text_tolerance: Tolerance = Tolerance(atol=1e-4, rtol=1e-3)
    vae_tolerance: Tolerance = Tolerance(atol=1e-4, rtol=1e-3)
    # An fp16 transformer graph against the float32 torch model (bf16 has no ONNX Runtime CPU kernels to check with).
    fp16_tolerance: Tolerance = Tolerance(atol=1e-2, rtol=3e-2)
    # ``--precision fp8``: the Linear layers quantised (a regex on the module path in the engine: every Linear of the
    # double and single blocks, their AdaLN modulation included, as NVIDIA ModelOpt's FLUX recipe does; not the
    # embedders, ``norm_out``, ``proj_out`` or the DDiT size adapters), how far an fp8 graph may be from
    # the float32 model (E4M3 keeps 3 mantissa bits: about 6% per value), and the calibration run that sets the
    # activation scales: the native model's Euler trajectory at ``opt_size`` for these prompts.
    fp8_scope: str = r"transformer_blocks\.\d+\."
    fp8_tolerance: Tolerance = Tolerance(atol=5e-2, rtol=0.25)
    calibration_prompts: tuple[str, ...] = (
        "a photo of a red fox sitting in the snow, detailed fur, soft light",
        "a city street at night with neon signs, rain, reflections",
        "a bowl of fruit on a wooden table, still life painting",
        "",
    )
    calibration_steps: int = 8
    # The DDiT tau an fp8 export writes into its manifest (None: the profile's own). FP8's rounding makes each step's
    # velocity slightly rough, which the third difference of the latents sees: on the tiny FLUX, tau 0.002 ran no
    # coarse step at all in fp8 (16.5% in float32), and 0.016 ran 22% (see docs/measurements.md, "fp8 engines").
    fp8_tau: float | None = None
    # Random-init component configs for the embedded tiny models (empty for real checkpoints).
    tiny_configs: dict = field(default_factory=dict, compare=False, repr=False)
    family: str = "flux"
    transformer_inputs: tuple[str, ...] = FLUX_TRANSFORMER_INPUTS
    transformer_outputs: tuple[str, ...] = FLUX_TRANSFORMER_OUTPUTS
    teacache: TeaCacheSpec = TeaCacheSpec()
    teacache_inputs: tuple[str, ...] = FLUX_TEACACHE_INPUTS
    teacache_outputs: tuple[str, ...] = FLUX_TEACACHE_OUTPUTS

    # ---- shape arithmetic -------------------------------------------------------------------------------------

    def patch_pixels(self, factor: int) -> int:
        """Latent pixels per token side for patch factor ``factor`` (FLUX: 2, 4, 8 for k = 1, 2, 4)."""
        return self.native_patch * factor

    def token_channels(self, factor: int) -> int:
        """Channels of one packed token: ``C * (patch_pixels)^2`` (FLUX: 64, 256, 1024)."""
        return self.latent_channels * self.patch_pixels(factor) ** 2

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        """Latent height and width for an image of ``height x width`` pixels."""
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def token_grid(self, factor: int, height: int, width: int) -> tuple[int, int]:
        """Token rows and columns at patch factor ``factor`` for an image of ``height x width`` pixels."""
        lh, lw = self.latent_hw(height, width)
        p = self.patch_pixels(factor)
        return lh // p, lw // p

    def tokens_for(self, factor: int, height: int, width: int) -> int:
        """Image tokens per sample at patch factor ``factor``."""
        rows, cols = self.token_grid(factor, height, width)
        return rows * cols

    def resolution_multiple(self, factors: tuple[int, ...]) -> int:
        """Pixel multiple that height and width must have so that every factor in ``factors`` tiles the latent."""
        return self.vae_scale_factor * self.native_patch * max(factors)

    def check_factors(self, factors) -> tuple[int, ...]:
        """Validate requested patch factors; return them sorted and de-duplicated, native first."""
        out = sorted(set(int(f) for f in factors))
        if not out:
            raise DDiTError("no patch sizes given: pass e.g. --sizes 1,2,4")
        bad = [f for f in out if f < 1 or f & (f - 1)]
        if bad:
            raise DDiTError(f"patch sizes must be powers of two, got {bad}: use a subset of {list(self.patch_factors)}")
        unsupported = [f for f in out if f not in self.patch_factors]
        if unsupported:
            raise DDiTError(
                f"patch sizes {unsupported} are not offered by profile '{self.name}': use a subset of "
                f"{list(self.patch_factors)}"
            )
        if out[0] != 1:
            raise DDiTError("the native size 1 must be among the sizes (it is the fallback of every schedule): add 1")
        return tuple(out)

    def check_resolution(self, height: int, width: int, factors: tuple[int, ...]) -> None:
        """Raise a ``DDiTError`` naming valid sizes unless ``height x width`` is in range and tiles every factor."""
        check_in_range(self, height, width)
        mult = self.resolution_multiple(factors)
        if height % mult or width % mult:
            raise DDiTError(
                f"resolution {height}x{width} does not tile patch sizes {list(factors)}: height and width must be "
                f"multiples of {mult} pixels, e.g. {suggest_size(self, height, width, mult)}"
            )

    def token_range(self, factor: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(min, opt, max) token-grid (rows, cols) at ``factor``: the dynamic-dim ranges of that engine."""
        return tuple(self.token_grid(factor, *size) for size in (self.min_size, self.opt_size, self.max_size))

    def image_seq_len(self, height: int, width: int) -> int:
        """Native token count, which sets FLUX's shift ``mu`` whatever patch size a step uses."""
        return self.tokens_for(1, height, width)

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    def step_flops(self, factor: int, height: int, width: int, batch: int = 1) -> float:
        """Analytic FLOPs (2 per multiply-add) of one transformer call at patch factor ``factor``.

        With N image tokens, T text tokens, L = N + T and width D, MLP width r*D:
        a double block runs per stream qkv (3D^2), out (D^2) and the MLP (2rD^2) on its own tokens, so
        (4 + 2r) D^2 per token of L; a single block runs qkv (3D^2), the MLP in (rD^2) and the fused out
        ((1 + r) D^2), the same (4 + 2r) D^2 per token. Attention over L is 4 L^2 D either way (QK^T and AV).
        Plus the embeddings (x_embedder, context_embedder) and proj_out. AdaLN modulation acts on one vector per
        sample and is left out (it does not scale with tokens).
        """
        n = self.tokens_for(factor, height, width)
        t, d = self.t5_max_length, self.inner_dim
        seq = n + t
        per_block = 2 * (4 + 2 * self.mlp_ratio) * d * d * seq + 4 * seq * seq * d
        embed = 2 * n * self.token_channels(factor) * d * 2 + 2 * t * self.joint_attention_dim * d
        return batch * ((self.num_layers + self.num_single_layers) * per_block + embed)

    # ---- serialisation (the manifest carries the spec) --------------------------------------------------------

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("tiny_configs")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FluxSpec:
        kw = dict(d)
        try:
            kw["scheduler"] = SchedulerDefaults(**kw["scheduler"])
            kw["shift"] = FlowShift(**kw["shift"])
            if "teacache" in kw:  # absent from manifests written before TeaCache
                kw["teacache"] = _teacache(kw["teacache"])
            for key in ("transformer_tolerance", "text_tolerance", "vae_tolerance"):
                kw[key] = Tolerance(**kw[key])
            for key in ("fp16_tolerance", "fp8_tolerance"):  # absent from manifests written before them
                if key in kw:
                    kw[key] = Tolerance(**kw[key])
            for key in (
                "patch_factors",
                "min_size",
                "opt_size",
                "max_size",
                "transformer_inputs",
                "transformer_outputs",
                "teacache_inputs",
                "teacache_outputs",
                "calibration_prompts",
            ):
                if key in kw:
                    kw[key] = tuple(kw[key])
            return cls(**kw)
        except (KeyError, TypeError) as e:
            raise DDiTError(f"the manifest's profile block is malformed ({e}): re-export the engines folder") from None


def rebuild(cls, d: dict):
    """A spec dataclass from its ``to_dict()``: nested tolerances/defaults rebuilt, lists back to tuples.

    Any missing or unknown key gives a one-line ``DDiTError`` (the manifest's profile block is malformed).
    """
    kw = dict(d)
    try:
        for f in dataclasses.fields(cls):
            if f.name not in kw:
                continue
            if isinstance(f.default, TeaCacheSpec):
                kw[f.name] = _teacache(kw[f.name])
            elif isinstance(f.default, (Tolerance, SchedulerDefaults, FlowShift)):
                kw[f.name] = type(f.default)(**kw[f.name])
            elif isinstance(f.default, tuple):
                kw[f.name] = tuple(tuple(v) if isinstance(v, list) else v for v in kw[f.name])
        return cls(**kw)
    except (KeyError, TypeError) as e:
        raise DDiTError(f"the manifest's profile block is malformed ({e}): re-export the engines folder") from None


def _teacache(d: dict) -> TeaCacheSpec:
    return TeaCacheSpec(d["signal"], tuple(d["coefficients"]), tuple(d["presets"]), tuple(d.get("fitted", ())))
