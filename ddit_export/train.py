"""``ddit-train``: distil each coarse size's adapters from the frozen base model (the paper's Eq. 1).

loss = || student(z_t at size k, t, text) - teacher(z_t at the native size, t, text) ||^2, with z_t = (1 - s) x0
+ s * noise and s drawn from the model's own shifted sigma schedule. The teacher is the same diffusers model with
the adapters switched off, so the base weights exist once. Sizes train one after another; a checkpoint (adapters,
optimizer, RNG, step) is written atomically every N steps and a rerun of the same command resumes from it.

What differs between families lives in a small backend (``FluxBackend``, ``WanBackend``): loading, the engine class
and its ``size_variant``, the conditioning tensors and the engine's argument list, the sigma grid t is drawn from,
and how the training latents are made. FLUX: shifted Euler sigmas, sigma is the timestep, embedded guidance, T5 +
pooled CLIP. Wan: UniPC flow sigmas with the profile's ``flow_shift(height, width)``, timestep = sigma * 1000
(float), umT5 states; latents are videos ``[N, 16, F_lat, h, w]`` the base samples with classifier-free guidance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ddit_profiles import DDiTError, FluxSpec, WanSpec
from ddit_runtime.sigmas import flux_sigmas
from ddit_runtime.unipc import wan_flow_sigmas

from . import __version__
from .adapters import DDiTAdapters, load_adapters, model_signature, untrained_adapters
from .cpu_memory import keep_freed_memory
from .flux_model import FluxEngine, _lora_layers, size_variant
from .loading import load_flux, with_vae_normalisation
from .train_data import (
    build_flux_data,
    build_wan_data,
    builtin_captions,
    builtin_clip_captions,
    list_images,
    load_or_build,
    read_prompts,
)
from .wan_loading import load_wan
from .wan_model import WanEngine, wan_size_variant

ADAPTERS_FILE, REPORT_FILE, CHECKPOINT_FILE = "adapters.safetensors", "adapters.json", "checkpoint.safetensors"
WEIGHTINGS = ("uniform", "high-noise", "low-noise")
OPTIMIZERS = ("prodigy", "adamw")
BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class TrainConfig:
    model: str
    sizes: tuple[int, ...]
    output: Path
    prompts: str | None = None
    images: str | None = None
    steps: int = 200  # per size
    batch_size: int = 4
    rank: int = 32
    alpha: float | None = None  # LoRA scale = alpha / rank; default alpha = rank
    optimizer: str | None = None  # default: the family's (prodigy for FLUX, adamw for Wan)
    lr: float | None = None  # default 1.0 for prodigy, 1e-4 for adamw
    height: int | None = None
    width: int | None = None
    frames: int | None = None  # Wan only: video frames of the training latents (default: the profile's opt_frames)
    gen_steps: int | None = None
    builtin_prompts: int = 64
    t_weighting: str = "uniform"
    checkpoint_every: int = 50
    holdout: float = 0.1
    seed: int = 0
    gradient_checkpointing: bool = False
    device: str = "auto"
    # The frozen base transformer's weights (teacher and student share them). bf16 halves them (FLUX.1-dev: 48 ->
    # 24 GB) and every forward then runs under bfloat16 autocast; what trains (LoRA, adapters, optimiser) stays fp32.
    base_dtype: str = "fp32"

    def identity(self) -> dict:
        """What a checkpoint must agree with to be resumed (not bookkeeping such as checkpoint_every)."""
        d = dataclasses.asdict(self)
        for key in ("output", "checkpoint_every", "device"):
            d.pop(key)
        if d["frames"] is None:  # FLUX: identical to checkpoints written before Wan training existed
            d.pop("frames")
        if d["base_dtype"] == "fp32":  # identical to checkpoints written before --base-dtype existed
            d.pop("base_dtype")
        return d


# ---- per-family backends ------------------------------------------------------------------------------------------


class FluxBackend:
    """FLUX: T5 + pooled CLIP, shifted Euler sigmas, sigma in [0, 1] as the timestep, the embedded guidance."""

    engine_class = FluxEngine
    size_variant = staticmethod(size_variant)
    swapped = ("x_embedder", "proj_out")  # what size_variant swaps into the transformer: the teacher needs the base's
    default_optimizer = "prodigy"  # the paper's FLUX setting
    builtin_prompts = staticmethod(builtin_captions)
    data_options = "--prompts FILE (the base model generates latents) or --images DIR"

    def __init__(self, spec: FluxSpec):
        self.spec = spec

    def check(self, cfg: TrainConfig) -> dict:
        if cfg.frames is not None:
            raise DDiTError("--frames applies to Wan: FLUX trains on images")
        return {}

    def load(self, model: str, dtype: torch.dtype) -> dict:
        parts = load_flux(model, self.spec, dtype)
        self.spec = with_vae_normalisation(self.spec, parts["vae"])  # --images latents use the VAE's own
        return parts

    def sigmas(self, cfg: TrainConfig) -> torch.Tensor:
        spec = self.spec
        return flux_sigmas(cfg.gen_steps, spec.shift.mu(spec.image_seq_len(cfg.height, cfg.width)))[:-1]  # no 0

    def engine_args(self, z, sigma, cond: dict, device) -> tuple:
        return (
            z,
            sigma.to(device),
            torch.full((z.shape[0],), self.spec.scheduler.guidance, device=device),
            cond["t5"].to(device),
            cond["pooled"].to(device),
        )

    def cache_settings(self, cfg: TrainConfig) -> dict:
        settings = dict(height=cfg.height, width=cfg.width, gen_steps=cfg.gen_steps, seed=cfg.seed)
        if cfg.base_dtype != "fp32":  # a bf16 base samples other latents; fp32 caches stay valid
            settings["base_dtype"] = cfg.base_dtype
        true_cfg = self.spec.scheduler.true_cfg
        return settings | (dict(true_cfg=true_cfg) if true_cfg > 1.0 else {})  # unguided caches stay valid

    def build_data(self, parts, source: dict, cfg: TrainConfig, device, progress: bool) -> dict:
        return build_flux_data(parts, self.spec, source, cfg, device, progress)


class WanBackend(FluxBackend):
    """Wan 2.1: umT5 states, UniPC flow sigmas with the profile's flow shift, timestep = sigma * 1000 (float)."""

    engine_class = WanEngine
    size_variant = staticmethod(wan_size_variant)
    swapped = ()  # wan_size_variant leaves the base modules in place; the engine takes the adapter itself
    default_optimizer = "adamw"  # the paper's Wan setting (lr 1e-4)
    builtin_prompts = staticmethod(builtin_clip_captions)
    data_options = "--prompts FILE (the base model generates the training videos)"

    def check(self, cfg: TrainConfig) -> dict:
        if cfg.images:
            raise DDiTError("--images is for FLUX: Wan trains on videos the base model generates from --prompts")
        frames = cfg.frames if cfg.frames is not None else self.spec.opt_frames
        self.spec.check_frames(frames)
        return dict(frames=frames)

    def load(self, model: str, dtype: torch.dtype) -> dict:
        return load_wan(model, self.spec, dtype)

    def sigmas(self, cfg: TrainConfig) -> torch.Tensor:
        return wan_flow_sigmas(cfg.gen_steps, self.spec.flow_shift(cfg.height, cfg.width))[:-1]  # no 0

    def engine_args(self, z, sigma, cond: dict, device) -> tuple:
        return z, (sigma * self.spec.num_train_timesteps).to(device), cond["text"].to(device)

    def cache_settings(self, cfg: TrainConfig) -> dict:
        guidance = dict(guidance_scale=self.spec.guidance_scale, negative_prompt=self.spec.negative_prompt)
        return dict(super().cache_settings(cfg), frames=cfg.frames, **guidance)

    def build_data(self, parts, source: dict, cfg: TrainConfig, device, progress: bool) -> dict:
        return build_wan_data(parts, self.spec, source, cfg, device, progress)


BACKENDS = {"flux": FluxBackend, "wan": WanBackend}


def backend_for(spec) -> FluxBackend:
    return BACKENDS[spec.family](spec)


def check_config(cfg: TrainConfig, spec: FluxSpec | WanSpec) -> TrainConfig:
    """Validate and fill defaults; every problem is one line."""
    backend = backend_for(spec)
    sizes = sorted(set(cfg.sizes))
    if not sizes or 1 in sizes:
        raise DDiTError("--sizes lists the coarse sizes to train, e.g. 2,4: size 1 is the untouched base model")
    spec.check_factors([1, *sizes])
    if cfg.prompts and cfg.images:
        raise DDiTError("give --prompts or --images, not both")
    family = backend.check(cfg)
    if not cfg.prompts and not cfg.images and cfg.model not in ("tiny", "random"):
        raise DDiTError(f"no training data: pass {backend.data_options}")
    if cfg.prompts:
        read_prompts(cfg.prompts)  # fail before loading any model
    if cfg.images:
        list_images(cfg.images)
    optimizer = cfg.optimizer or backend.default_optimizer
    if optimizer not in OPTIMIZERS:
        raise DDiTError(f"unknown optimizer '{optimizer}': choose {' or '.join(OPTIMIZERS)}")
    if cfg.base_dtype not in BASE_DTYPES:
        raise DDiTError(f"unknown --base-dtype '{cfg.base_dtype}': choose {' or '.join(BASE_DTYPES)}")
    if cfg.t_weighting not in WEIGHTINGS:
        raise DDiTError(f"unknown --t-weighting '{cfg.t_weighting}': choose one of {', '.join(WEIGHTINGS)}")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.rank < 1 or cfg.checkpoint_every < 1:
        raise DDiTError("--steps, --batch-size, --rank and --checkpoint-every must be at least 1")
    if not 0.0 < cfg.holdout < 1.0:
        raise DDiTError(f"--holdout is a fraction in (0, 1), got {cfg.holdout}")
    height, width = cfg.height or spec.opt_size[0], cfg.width or spec.opt_size[1]
    spec.check_resolution(height, width, (1, *sizes))
    lr = cfg.lr if cfg.lr is not None else (1.0 if optimizer == "prodigy" else 1e-4)
    return dataclasses.replace(
        cfg,
        sizes=tuple(sizes),
        height=height,
        width=width,
        optimizer=optimizer,
        lr=lr,
        gen_steps=cfg.gen_steps or spec.scheduler.steps,
        alpha=float(cfg.alpha if cfg.alpha is not None else cfg.rank),
        **family,
    )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DDiTError("--device cuda but torch sees no CUDA GPU: use --device cpu")
    return torch.device(name)


def _make_optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=cfg.lr, weight_decay=0.0, safeguard_warmup=True)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)


# ---- checkpoints (safetensors only: tensors + JSON metadata) -------------------------------------------------------


def _optimizer_tensors(opt) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(opt, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _adapter_tensors(adapters: DDiTAdapters) -> dict:
    tensors = {}
    for k, adapter in adapters.sizes.items():
        tensors |= {f"size{k}.{n}": t.detach().cpu().contiguous() for n, t in adapter.state_dict().items()}
        tensors |= {f"size{k}.lora.{n}": t.detach().cpu().contiguous() for n, t in adapters.lora[k].items()}
    return tensors


def _atomic_save(tensors: dict, path: Path, meta: dict) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


class Trainer:
    def __init__(self, cfg: TrainConfig, spec: FluxSpec | WanSpec, progress: bool = True, force: bool = False):
        self.cfg, self.spec, self.progress = check_config(cfg, spec), spec, progress
        self.backend = backend_for(spec)
        self.out = Path(cfg.output)
        self.device = _device(cfg.device)
        if self.cfg.base_dtype == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DDiTError("--base-dtype bf16 needs a GPU with bfloat16 (Ampere or newer): use --base-dtype fp32")
        self._prepare_output(force)
        self.parts = self.backend.load(cfg.model, BASE_DTYPES[self.cfg.base_dtype])
        self.transformer = self.parts["transformer"].to(self.device)
        if self.cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.signature = model_signature(self.transformer, spec)
        self.final_losses: dict[int, list[float]] = {}
        self.sigmas = self.backend.sigmas(self.cfg)  # [S], no 0
        self.weights = {
            "uniform": torch.ones_like(self.sigmas),
            "high-noise": self.sigmas,
            "low-noise": 1.0 - self.sigmas + 1e-3,
        }[self.cfg.t_weighting]

    def _prepare_output(self, force: bool) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise DDiTError(
                f"cannot write to output folder '{self.out}' ({e.strerror or e}): pick a writable -o"
            ) from None
        if force:
            for name in (ADAPTERS_FILE, REPORT_FILE, CHECKPOINT_FILE):
                (self.out / name).unlink(missing_ok=True)

    # ---- data ----------------------------------------------------------------------------------------------------

    def data(self) -> tuple[dict, dict]:
        cfg = self.cfg
        if cfg.images:
            source = dict(kind="images", images=list_images(cfg.images))
        else:
            prompts = (
                read_prompts(cfg.prompts)
                if cfg.prompts
                else self.backend.builtin_prompts(cfg.builtin_prompts, cfg.seed)
            )
            source = dict(kind="prompts", prompts=prompts)
        settings = dict(self.backend.cache_settings(cfg), model=dict(self.signature, model=cfg.model))
        data = load_or_build(
            self.out / "cache",
            source,
            settings,
            lambda: self.backend.build_data(self.parts, source, cfg, self.device, self.progress),
        )
        n = data["latent"].shape[0]
        hold = max(1, round(n * cfg.holdout))
        if n - hold < 1:
            raise DDiTError(f"only {n} samples: need at least 2 so one can be held out for evaluation")
        train = {k: v[: n - hold] for k, v in data.items()}
        held = {k: v[n - hold :] for k, v in data.items()}
        return train, held

    # ---- one forward pair ---------------------------------------------------------------------------------------

    def _noisy(self, batch: dict, gen: torch.Generator, sigma_idx: torch.Tensor):
        """The engine arguments for ``z_t = (1 - s) x0 + s * noise`` of a batch at sigma indices ``sigma_idx``."""
        x0 = batch["latent"]
        sigma = self.sigmas[sigma_idx]
        s = sigma.view(-1, *[1] * (x0.ndim - 1))
        noise = torch.randn(x0.shape, generator=gen)
        z = ((1.0 - s) * x0 + s * noise).to(self.device)
        cond = {k: v for k, v in batch.items() if k != "latent"}
        return self.backend.engine_args(z, sigma, cond, self.device)

    def _base_modules(self) -> dict:
        """The base model's modules that a size variant replaces (FLUX: embed/de-embed; Wan: none)."""
        return {name: getattr(self.transformer, name) for name in self.backend.swapped}

    @contextlib.contextmanager
    def _teacher_mode(self, base_modules: dict):
        """Inside a student context: the base model's own embed/de-embed, LoRA switched off."""
        layers = [layer for _, layer in _lora_layers(self.transformer)]
        student = {name: getattr(self.transformer, name) for name in base_modules}
        for name, module in base_modules.items():
            setattr(self.transformer, name, module)
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)
            for name, module in student.items():
                setattr(self.transformer, name, module)

    def _engines(self, factor: int, adapter) -> tuple:
        """(student at ``factor`` with ``adapter``, teacher at the native size), on the training device."""
        cls = self.backend.engine_class
        return tuple(cls(self.transformer, self.spec, k, a).to(self.device) for k, a in ((factor, adapter), (1, None)))

    def _autocast(self):
        """bfloat16 autocast on CUDA, and wherever the base is bf16 (its fp32 inputs meet bf16 weights)."""
        if self.device.type == "cuda" or self.cfg.base_dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _pair(self, engines: tuple, args: tuple, base_modules: dict):
        student, teacher = engines
        with torch.no_grad(), self._teacher_mode(base_modules), self._autocast():
            target = teacher(*args).float()
        with self._autocast():
            pred = student(*args).float()
        return pred, target

    # ---- training -----------------------------------------------------------------------------------------------

    def run(self) -> dict:
        if (self.out / ADAPTERS_FILE).is_file():
            raise DDiTError(
                f"'{self.out / ADAPTERS_FILE}' exists already: pass --force to retrain, or --eval alone to evaluate it"
            )
        keep_freed_memory()
        train, held = self.data()
        adapters, done, resume = self._start()
        for k in self.cfg.sizes:
            if k not in done:
                self._train_size(adapters, k, train, resume if resume and resume["size"] == k else None)
                done.append(k)
                resume = None
        report = self._finish(adapters, held)
        return report

    def _start(self):
        ckpt = self.out / CHECKPOINT_FILE
        fresh = untrained_adapters(self.transformer, self.spec, [1, *self.cfg.sizes], rank=self.cfg.rank)
        fresh.alpha = self.cfg.alpha
        if not ckpt.is_file():
            return fresh, [], None
        with safe_open(str(ckpt), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state = json.loads(meta.get("ddit_checkpoint", "{}"))
        if state.get("identity") != json.loads(json.dumps(self.cfg.identity())):
            raise DDiTError(
                f"'{ckpt}' is from a different training run (other model, sizes or settings): pass "
                f"--force to start over, or use another -o"
            )
        for k, adapter in fresh.sizes.items():
            own = {
                n[len(f"size{k}.") :]: t
                for n, t in tensors.items()
                if n.startswith(f"size{k}.") and not n.startswith(f"size{k}.lora.")
            }
            adapter.load_state_dict(own)
            fresh.lora[k] = {
                n[len(f"size{k}.lora.") :]: t for n, t in tensors.items() if n.startswith(f"size{k}.lora.")
            }
        opt = {n: t for n, t in tensors.items() if n.startswith("opt.")}
        resume = dict(
            size=state["size"],
            step=state["step"],
            rng=tensors["rng"],
            opt=opt,
            opt_meta=state["opt"],
            losses=state.get("losses", []),
        )
        print(f"resuming from {ckpt}: size {state['size']}, step {state['step']}/{self.cfg.steps}")
        return fresh, list(state["done"]), resume

    def _checkpoint(self, adapters, k: int, step: int, opt, gen, done: list[int], losses: list[float]) -> None:
        tensors = _adapter_tensors(adapters)
        opt_tensors, opt_meta = _optimizer_tensors(opt)
        tensors |= opt_tensors
        tensors["rng"] = gen.get_state()
        state = dict(identity=self.cfg.identity(), size=k, step=step, done=done, opt=opt_meta, losses=losses[-200:])
        _atomic_save(tensors, self.out / CHECKPOINT_FILE, {"ddit_checkpoint": json.dumps(state)})

    def _train_size(self, adapters: DDiTAdapters, k: int, train: dict, resume: dict | None) -> None:
        cfg, n = self.cfg, train["latent"].shape[0]
        adapter = adapters.sizes[k].to(self.device).train().requires_grad_(True)
        base = self._base_modules()
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + k)
        with self.backend.size_variant(self.transformer, adapters, k, trainable=True):
            engines = self._engines(k, adapter)
            lora = [p for name, p in self.transformer.named_parameters() if "lora_" in name]
            opt = _make_optimizer(cfg, list(adapter.parameters()) + lora)
            start, losses = 0, []
            if resume:
                if resume["step"] > 0:
                    _load_optimizer(opt, resume["opt"], resume["opt_meta"])
                gen.set_state(resume["rng"])
                start, losses = resume["step"], list(resume["losses"])
            bar = tqdm(
                range(start, cfg.steps),
                desc=f"train size {k}",
                unit="step",
                disable=not self.progress,
                initial=start,
                total=cfg.steps,
            )
            for step in bar:
                idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
                sigma_idx = torch.multinomial(self.weights, cfg.batch_size, replacement=True, generator=gen)
                args = self._noisy({key: v[idx] for key, v in train.items()}, gen, sigma_idx)
                pred, target = self._pair(engines, args, base)
                loss = torch.nn.functional.mse_loss(pred, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4g}")
                if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                    self._sync_lora(adapters, k)
                    done = [s for s in cfg.sizes if s < k]
                    self._checkpoint(adapters, k, step + 1, opt, gen, done, losses)
            self.final_losses[k] = losses[-20:]
        adapter.eval().requires_grad_(False)
        done = [s for s in cfg.sizes if s <= k]
        nxt = next((s for s in cfg.sizes if s > k), None)
        if nxt is not None:  # a finished size is a checkpoint too: a kill during the next size loses nothing here
            self._checkpoint_between(adapters, nxt, done)

    def _sync_lora(self, adapters: DDiTAdapters, k: int) -> None:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.transformer, adapter_name=f"ddit_size{k}")
        adapters.lora[k] = {name: t.detach().cpu().clone() for name, t in state.items()}

    def _checkpoint_between(self, adapters, nxt: int, done: list[int]) -> None:
        tensors = _adapter_tensors(adapters)
        tensors["rng"] = torch.Generator().manual_seed(self.cfg.seed * 7919 + nxt).get_state()
        state = dict(
            identity=self.cfg.identity(),
            size=nxt,
            step=0,
            done=done,
            opt={"param_groups": [], "scalars": {}},
            losses=[],
        )
        _atomic_save(tensors, self.out / CHECKPOINT_FILE, {"ddit_checkpoint": json.dumps(state)})

    def _finish(self, adapters: DDiTAdapters, held: dict) -> dict:
        adapters.meta = dict(self.signature, trained="true", model=self.cfg.model)
        path = self.out / ADAPTERS_FILE
        tmp = self.out / f".{ADAPTERS_FILE}.partial"
        adapters.save(tmp)
        tmp.replace(path)
        report = dict(
            adapters=str(path),
            config={k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self.cfg).items()},
            model_signature=self.signature,
            ddit_version=__version__,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            final_loss={str(k): sum(v) / len(v) for k, v in self.final_losses.items() if v},
            eval=self.evaluate(adapters, held),
        )
        (self.out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        (self.out / CHECKPOINT_FILE).unlink(missing_ok=True)
        return report

    # ---- evaluation ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, adapters: DDiTAdapters, held: dict, points: int = 4) -> dict:
        """Held-out student-vs-teacher velocity MSE per size, for the PI-resize init and for ``adapters``."""
        init = untrained_adapters(self.transformer, self.spec, [1, *self.cfg.sizes], rank=self.cfg.rank)
        gen = torch.Generator().manual_seed(12345)
        n = held["latent"].shape[0]
        picks = torch.linspace(0, len(self.sigmas) - 1, points).round().long()
        cases = []
        for i in range(n):
            for s in picks:
                batch = {k: v[i : i + 1] for k, v in held.items()}
                cases.append(self._noisy(batch, gen, s.view(1)))
        out = {}
        for k in self.cfg.sizes:
            out[str(k)] = {name: self._mse(which, k, cases) for name, which in (("init", init), ("trained", adapters))}
        return out

    def _mse(self, adapters: DDiTAdapters, k: int, cases: list[tuple]) -> float:
        base = self._base_modules()
        total = 0.0
        with self.backend.size_variant(self.transformer, adapters, k, merge_lora=False) as adapter:
            engines = self._engines(k, adapter.to(self.device))
            for args in cases:
                pred, target = self._pair(engines, args, base)
                total += torch.nn.functional.mse_loss(pred, target).item()
        return total / len(cases)

    def evaluate_existing(self) -> dict:
        _, held = self.data()
        adapters = load_adapters(self.out / ADAPTERS_FILE, self.transformer, self.spec, [1, *self.cfg.sizes])
        return self.evaluate(adapters, held)
