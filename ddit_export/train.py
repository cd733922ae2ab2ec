"""``ddit-train``: distil each coarse size's adapters from the frozen base model (the paper's Eq. 1).

loss = || student(z_t at size k, t, text) - teacher(z_t at the native size, t, text) ||^2, with z_t = (1 - s) x0
+ s * noise and s drawn from the model's own shifted sigma schedule. The teacher is the same diffusers model with
the adapters switched off, so the base weights exist once. Sizes train one after another; a checkpoint (adapters,
optimizer, RNG, step) is written atomically every N steps and a rerun of the same command resumes from it.
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

from ddit_profiles import DDiTError, FluxSpec
from ddit_runtime.sigmas import flux_sigmas

from . import __version__
from .adapters import DDiTAdapters, load_adapters, model_signature, untrained_adapters
from .flux_model import FluxEngine, _lora_layers, size_variant
from .loading import load_flux
from .train_data import builtin_captions, list_images, load_or_build, read_prompts

ADAPTERS_FILE, REPORT_FILE, CHECKPOINT_FILE = "adapters.safetensors", "adapters.json", "checkpoint.safetensors"
WEIGHTINGS = ("uniform", "high-noise", "low-noise")
OPTIMIZERS = ("prodigy", "adamw")


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
    optimizer: str = "prodigy"
    lr: float | None = None  # default 1.0 for prodigy, 1e-4 for adamw
    height: int | None = None
    width: int | None = None
    gen_steps: int | None = None
    builtin_prompts: int = 64
    t_weighting: str = "uniform"
    checkpoint_every: int = 50
    holdout: float = 0.1
    seed: int = 0
    gradient_checkpointing: bool = False
    device: str = "auto"

    def identity(self) -> dict:
        """What a checkpoint must agree with to be resumed (not bookkeeping such as checkpoint_every)."""
        d = dataclasses.asdict(self)
        for key in ("output", "checkpoint_every", "device"):
            d.pop(key)
        return d


def check_config(cfg: TrainConfig, spec: FluxSpec) -> TrainConfig:
    """Validate and fill defaults; every problem is one line."""
    sizes = sorted(set(cfg.sizes))
    if not sizes or 1 in sizes:
        raise DDiTError("--sizes lists the coarse sizes to train, e.g. 2,4: size 1 is the untouched base model")
    spec.check_factors([1, *sizes])
    if cfg.prompts and cfg.images:
        raise DDiTError("give --prompts or --images, not both")
    if not cfg.prompts and not cfg.images and cfg.model != "tiny":
        raise DDiTError("no training data: pass --prompts FILE (the base model generates latents) or --images DIR")
    if cfg.prompts:
        read_prompts(cfg.prompts)  # fail before loading any model
    if cfg.images:
        list_images(cfg.images)
    if cfg.optimizer not in OPTIMIZERS:
        raise DDiTError(f"unknown optimizer '{cfg.optimizer}': choose {' or '.join(OPTIMIZERS)}")
    if cfg.t_weighting not in WEIGHTINGS:
        raise DDiTError(f"unknown --t-weighting '{cfg.t_weighting}': choose one of {', '.join(WEIGHTINGS)}")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.rank < 1 or cfg.checkpoint_every < 1:
        raise DDiTError("--steps, --batch-size, --rank and --checkpoint-every must be at least 1")
    if not 0.0 < cfg.holdout < 1.0:
        raise DDiTError(f"--holdout is a fraction in (0, 1), got {cfg.holdout}")
    height, width = cfg.height or spec.opt_size[0], cfg.width or spec.opt_size[1]
    spec.check_resolution(height, width, (1, *sizes))
    lr = cfg.lr if cfg.lr is not None else (1.0 if cfg.optimizer == "prodigy" else 1e-4)
    return dataclasses.replace(
        cfg,
        sizes=tuple(sizes),
        height=height,
        width=width,
        lr=lr,
        gen_steps=cfg.gen_steps or spec.scheduler.steps,
        alpha=float(cfg.alpha if cfg.alpha is not None else cfg.rank),
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
    def __init__(self, cfg: TrainConfig, spec: FluxSpec, progress: bool = True, force: bool = False):
        self.cfg, self.spec, self.progress = check_config(cfg, spec), spec, progress
        self.out = Path(cfg.output)
        self.device = _device(cfg.device)
        self._prepare_output(force)
        self.parts = load_flux(cfg.model, spec)
        self.transformer = self.parts["transformer"].to(self.device)
        if self.cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.signature = model_signature(self.transformer, spec)
        self.final_losses: dict[int, list[float]] = {}
        h, w = self.cfg.height, self.cfg.width
        self.sigmas = flux_sigmas(self.cfg.gen_steps, spec.shift.mu(spec.image_seq_len(h, w)))[:-1]  # [S], no 0
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
            prompts = read_prompts(cfg.prompts) if cfg.prompts else builtin_captions(cfg.builtin_prompts, cfg.seed)
            source = dict(kind="prompts", prompts=prompts)
        source["model_signature"] = dict(self.signature, model=cfg.model)
        data = load_or_build(
            self.out / "cache",
            self.parts,
            self.spec,
            source,
            cfg.height,
            cfg.width,
            cfg.gen_steps,
            cfg.seed,
            self.device,
            self.progress,
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
        x0 = batch["latent"]
        s = self.sigmas[sigma_idx].view(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=gen)
        z = ((1.0 - s) * x0 + s * noise).to(self.device)
        args = (
            z,
            self.sigmas[sigma_idx].to(self.device),
            torch.full((z.shape[0],), self.spec.scheduler.guidance, device=self.device),
            batch["t5"].to(self.device),
            batch["pooled"].to(self.device),
        )
        return args

    @contextlib.contextmanager
    def _teacher_mode(self, base_modules: dict, adapter):
        """Inside a student context: the base model's own embed/de-embed, LoRA switched off."""
        layers = [layer for _, layer in _lora_layers(self.transformer)]
        self.transformer.x_embedder, self.transformer.proj_out = base_modules["x"], base_modules["out"]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)
            if adapter is not None:
                self.transformer.x_embedder, self.transformer.proj_out = adapter.embed, adapter.unembed

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _pair(self, adapter, factor: int, args: tuple, base_modules: dict):
        with torch.no_grad(), self._teacher_mode(base_modules, adapter), self._autocast():
            target = FluxEngine(self.transformer, self.spec, 1)(*args).float()
        with self._autocast():
            pred = FluxEngine(self.transformer, self.spec, factor, adapter)(*args).float()
        return pred, target

    # ---- training -----------------------------------------------------------------------------------------------

    def run(self) -> dict:
        if (self.out / ADAPTERS_FILE).is_file():
            raise DDiTError(
                f"'{self.out / ADAPTERS_FILE}' exists already: pass --force to retrain, or --eval alone to evaluate it"
            )
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
        base = {"x": self.transformer.x_embedder, "out": self.transformer.proj_out}
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + k)
        with size_variant(self.transformer, adapters, k, trainable=True):
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
                pred, target = self._pair(adapter, k, args, base)
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
        base = {"x": self.transformer.x_embedder, "out": self.transformer.proj_out}
        total = 0.0
        with size_variant(self.transformer, adapters, k, merge_lora=False) as adapter:
            adapter.to(self.device)
            for args in cases:
                pred, target = self._pair(adapter, k, args, base)
                total += torch.nn.functional.mse_loss(pred, target).item()
        return total / len(cases)

    def evaluate_existing(self) -> dict:
        _, held = self.data()
        adapters = load_adapters(self.out / ADAPTERS_FILE, self.transformer, self.spec, [1, *self.cfg.sizes])
        return self.evaluate(adapters, held)
