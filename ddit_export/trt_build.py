"""``ddit-build``: one TensorRT plan per graph of an engines folder (every transformer size, the TeaCache probes,
the text encoders, the VAE decoder), recorded in the manifest's ``tensorrt`` block. The ONNX files stay.

- **Profiles.** One optimisation profile per graph, min/opt/max per input, from the manifest's spec
  (``token_range``, ``latent_hw``, ``frame_range``, ``max_batch``...): ``input_profile`` only arranges those facts
  into shapes. Wan's transformers are optimised for batch 2 (classifier-free guidance as one batch, the default).
- **Precision.** Whatever the ONNX graph is typed in: the network is parsed strongly typed, with no builder
  precision flags.
- **Names.** ``transformer_k2.trt10.13.sm90.plan``: a plan runs only on the TensorRT release and GPU architecture
  that built it, and the runtime checks both against the manifest before it loads one.
- **Atomic.** Each plan is written to a temporary file and renamed; the manifest is rewritten the same way at the
  end. A plan already built from the same graph with the same settings on this release and GPU is kept.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ddit_profiles import FP8_MIN_CC, DDiTError, spec_from_dict
from ddit_runtime.backends import compute_capability, graphs
from ddit_runtime.engine import import_tensorrt
from ddit_runtime.manifest import load_manifest, sha256_file

from . import __version__
from .manifest import write_manifest_atomic

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # (min, opt, max)
#: ``build_plan(onnx_path, plan_path, profile, opt_level, timing_cache)`` writes one plan.
PlanBuilder = Callable[[Path, Path, dict, "int | None", "Path | None"], None]
TIMING_CACHE = "trt_timing.cache"


@dataclass(frozen=True)
class TrtTarget:
    """What plans are built for: a TensorRT release on a GPU architecture."""

    version: str  # tensorrt.__version__
    cc: str  # "sm90"
    gpu: str  # "NVIDIA H100 80GB HBM3"


def require_tensorrt() -> str:
    """TensorRT's version, or the one-line error ``ddit-build`` ends with when tensorrt does not import."""
    return import_tensorrt("ddit-build").__version__


def detect_target() -> TrtTarget:
    """This machine's TensorRT release and GPU (the one torch calls current)."""
    version = require_tensorrt()
    if int(version.split(".")[0]) < 10:
        raise DDiTError(f"ddit-build needs TensorRT 10 or newer, found {version}: pip install 'ddit-toolchain[trt]'")
    if not torch.cuda.is_available():
        raise DDiTError(
            "ddit-build needs the CUDA GPU the engines will run on, and torch.cuda sees none: run it on that machine "
            "with a CUDA build of torch"
        )
    index = torch.cuda.current_device()
    return TrtTarget(
        version, compute_capability(*torch.cuda.get_device_capability(index)), torch.cuda.get_device_name(index)
    )


def plan_name(onnx_name: str, trt_version: str, cc: str) -> str:
    """``transformer_k2.onnx`` -> ``transformer_k2.trt10.13.sm90.plan`` (TensorRT major.minor, GPU arch)."""
    major, minor = trt_version.split(".")[:2]
    return f"{Path(onnx_name).name.removesuffix('.onnx')}.trt{major}.{minor}.{cc}.plan"


# ---- optimisation profiles --------------------------------------------------------------------------------------


def _points(shape: Callable[..., Shape], *ranges) -> ShapeRange:
    """``shape`` applied at min, opt and max: each of ``ranges`` is a (min, opt, max) triple of its arguments."""
    return tuple(shape(*args) for args in zip(*ranges, strict=True))


def _size_range(spec, to_latent: Callable) -> tuple:
    return tuple(to_latent(*size) for size in (spec.min_size, spec.opt_size, spec.max_size))


def _flux_profile(spec, key: str) -> dict[str, ShapeRange]:
    batch = (1, 1, spec.max_batch)
    vec = _points(lambda b: (b,), batch)
    if key.startswith(("transformer_k", "teacache_k")):
        k = int(key.rsplit("_k", 1)[1])
        p, grids = spec.patch_pixels(k), spec.token_range(k)  # grids: (rows, cols) at min, opt, max
        latent = _points(lambda b, g: (b, spec.latent_channels, p * g[0], p * g[1]), batch, grids)
        common = {"latent": latent, "timestep": vec, "guidance": vec}
        pooled = _points(lambda b: (b, spec.pooled_dim), batch)
        if key.startswith("teacache_k"):
            residual = _points(lambda b, g: (b, g[0], g[1], spec.inner_dim), batch, grids)
            return common | {"pooled_projections": pooled, "residual": residual}
        text = _points(lambda b: (b, spec.t5_max_length, spec.joint_attention_dim), batch)
        return common | {"encoder_hidden_states": text, "pooled_projections": pooled}
    if key == "text_encoder":
        return {"input_ids": _points(lambda b: (b, spec.clip_max_length), batch)}
    if key == "text_encoder_2":
        return {"input_ids": _points(lambda b: (b, spec.t5_max_length), batch)}
    if key == "vae_decoder":
        hw = _size_range(spec, spec.latent_hw)
        return {"latent": _points(lambda b, s: (b, spec.latent_channels, *s), batch, hw)}
    raise DDiTError(f"no TensorRT profile for graph {key} of a FLUX folder: this ddit-build is older than the export")


def _cache_range(batch: tuple, hw: tuple, cache: dict) -> ShapeRange:
    """Wan VAE cache j: ``[B, channels_j, frames_j, latent_h * scale_j, latent_w * scale_j]`` (see ``wan_vae``)."""
    c, f, scale = cache["channels"], cache["frames"], cache["scale"]
    return _points(lambda b, s: (b, c, f, s[0] * scale, s[1] * scale), batch, hw)


def _wan_profile(spec, key: str, vae: dict) -> dict[str, ShapeRange]:
    batch = (1, 1, spec.max_batch)
    cfg_batch = (1, min(2, spec.max_batch), spec.max_batch)  # cond + uncond as one batch: the runtime's default
    hw = _size_range(spec, spec.latent_hw)
    if key.startswith(("transformer_k", "teacache_k")):
        k, frames = int(key.rsplit("_k", 1)[1]), spec.frame_range()
        latent = _points(lambda b, f, s: (b, spec.latent_channels, f, *s), cfg_batch, frames, hw)
        timestep = _points(lambda b: (b,), cfg_batch)
        if key.startswith("teacache_k"):
            grids = _size_range(spec, lambda h, w: spec.token_grid(k, h, w))  # after the engine's padding
            residual = _points(lambda b, f, g: (b, f, *g, spec.inner_dim), cfg_batch, frames, grids)
            return {"latent": latent, "timestep": timestep, "residual": residual}
        text = _points(lambda b: (b, spec.t5_max_length, spec.text_dim), cfg_batch)
        return {"latent": latent, "timestep": timestep, "encoder_hidden_states": text}
    if key == "text_encoder":
        ids = _points(lambda b: (b, spec.t5_max_length), batch)
        return {"input_ids": ids, "attention_mask": ids}
    if key in ("vae_decoder", "vae_decoder_step"):
        frame = {"latent": _points(lambda b, s: (b, spec.latent_channels, 1, *s), batch, hw)}
        if key == "vae_decoder":
            return frame
        caches = zip(vae["cache_inputs"], vae["cache_shapes"], strict=True)
        return frame | {name: _cache_range(batch, hw, cache) for name, cache in caches}
    raise DDiTError(f"no TensorRT profile for graph {key} of a Wan folder: this ddit-build is older than the export")


def input_profile(data: dict, key: str) -> dict[str, ShapeRange]:
    """(min, opt, max) shape of every input of graph ``key`` (a ``graphs`` key) of manifest ``data``."""
    spec = spec_from_dict(data["profile"])
    if data["family"] == "wan":
        return _wan_profile(spec, key, data["components"]["vae_decoder"])
    return _flux_profile(spec, key)


# ---- building ---------------------------------------------------------------------------------------------------


def build_plan_polygraphy(
    onnx_path: Path, plan_path: Path, profile: dict, opt_level: int | None, timing_cache: Path | None
) -> None:
    """Parse ``onnx_path`` strongly typed, build with one optimisation profile, write the plan to ``plan_path``.
    The timing cache is loaded if it exists and saved (merged) after the build."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
    from polygraphy.exception import PolygraphyException

    shapes = Profile()
    for name, (low, opt, high) in profile.items():
        shapes.add(name, min=low, opt=opt, max=high)
    cache = str(timing_cache) if timing_cache else None
    config = CreateConfig(profiles=[shapes], load_timing_cache=cache, builder_optimization_level=opt_level)
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    try:
        plan = EngineBytesFromNetwork(network, config=config, save_timing_cache=cache)()
    except PolygraphyException as e:
        raise DDiTError(f"TensorRT could not build {onnx_path.name}: {str(e).strip().splitlines()[0]}") from None
    plan_path.write_bytes(plan)


def _precision(data: dict, key: str) -> str:
    """The type graph ``key`` was exported in: the manifest's ``precision`` for the transformers and their TeaCache
    probes (``ddit-export --precision``), float32 for the encoders and the VAE."""
    precision = data.get("precision", "fp32") if key.startswith(("transformer_k", "teacache_k")) else "fp32"
    return "fp16" if precision == "fp8" and key.startswith("teacache_k") else precision  # fp8's probes are fp16


def check_fp8_target(data: dict, target: TrtTarget) -> None:
    """One-line error when the folder's transformers are fp8 and the GPU has no FP8 tensor cores (before 8.9)."""
    if data.get("precision") != "fp8":
        return
    major, minor = FP8_MIN_CC
    if int(target.cc.removeprefix("sm")) < major * 10 + minor:
        raise DDiTError(
            f"these engines are fp8, and {target.gpu} ({target.cc}) has no FP8 tensor cores (compute capability "
            f"{major}.{minor}+: Ada, Hopper, Blackwell): re-export with --precision fp16 or bf16 for this GPU"
        )


def _settings(profile: dict, opt_level: int | None, precision: str) -> dict:
    return {
        "profile": {name: [list(s) for s in shapes] for name, shapes in profile.items()},
        "opt_level": opt_level,
        "strongly_typed": True,
        "precision": precision,
    }


def _reusable(folder: Path, old: dict | None, target: TrtTarget, key: str, entry: dict) -> bool:
    """An existing plan for ``key`` stays when it was built on this release and GPU from the same graph with the
    same settings, and the file is still intact."""
    if not old or old.get("version") != target.version or old.get("compute_capability") != target.cc:
        return False
    previous = old.get("plans", {}).get(key)
    if not previous or any(previous.get(f) != entry[f] for f in ("plan", "onnx_sha256", "settings")):
        return False
    path = folder / previous["plan"]
    return path.is_file() and path.stat().st_size == previous["bytes"] and sha256_file(path) == previous["sha256"]


def _build_one(folder: Path, entry: dict, onnx: str, build_plan: PlanBuilder, timing_cache: Path | None) -> dict:
    plan_path = folder / entry["plan"]
    partial = plan_path.with_name(f".{plan_path.name}.partial-{os.getpid()}")
    started = time.time()
    try:
        settings = entry["settings"]
        profile = {name: tuple(tuple(s) for s in shapes) for name, shapes in settings["profile"].items()}
        build_plan(folder / onnx, partial, profile, settings["opt_level"], timing_cache)
        partial.replace(plan_path)
    finally:
        partial.unlink(missing_ok=True)
    seconds = round(time.time() - started, 1)
    return entry | {"sha256": sha256_file(plan_path), "bytes": plan_path.stat().st_size, "seconds": seconds}


def build_engines(
    folder: str | Path,
    sizes=None,
    opt_level: int | None = None,
    timing_cache: str | Path | None = None,
    force: bool = False,
    target: TrtTarget | None = None,
    build_plan: PlanBuilder = build_plan_polygraphy,
    progress: bool = True,
) -> dict:
    """Build a plan for every graph of ``folder`` (transformers of ``sizes``, default all) and record them in the
    manifest's ``tensorrt`` block; return that block. ``target`` and ``build_plan`` default to this machine and
    polygraphy (tests pass their own)."""
    from tqdm.auto import tqdm

    manifest = load_manifest(folder, verify=True)
    folder, data = manifest.folder, manifest.data
    sizes = manifest.sizes if sizes is None else tuple(sorted(set(sizes)))  # graphs() refuses sizes not exported
    target = target or detect_target()
    check_fp8_target(data, target)
    cache = Path(timing_cache) if timing_cache else folder / TIMING_CACHE
    old = data.get("tensorrt")
    keep = old if old and (old.get("version"), old.get("compute_capability")) == (target.version, target.cc) else {}
    plans = dict(keep.get("plans", {}))  # other sizes built earlier on this release and GPU stay
    bar = tqdm(graphs(data, sizes).items(), desc="ddit-build", unit="plan", disable=not progress)
    for key, graph in bar:
        bar.set_postfix_str(key)
        entry = {
            "plan": plan_name(graph.onnx, target.version, target.cc),
            "onnx": graph.onnx,
            "onnx_sha256": data["files"][graph.onnx]["sha256"],
            "settings": _settings(input_profile(data, key), opt_level, _precision(data, key)),
        }
        reuse = not force and _reusable(folder, old, target, key, entry)
        plans[key] = old["plans"][key] if reuse else _build_one(folder, entry, graph.onnx, build_plan, cache)
    block = {
        "version": target.version,
        "compute_capability": target.cc,
        "gpu": target.gpu,
        "plans": plans,
        "timing_cache": str(cache),
        "builder": {"ddit_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    write_manifest_atomic(folder, data | {"tensorrt": block})
    _remove_stale(folder, old, block)
    return block


def _remove_stale(folder: Path, old: dict | None, new: dict) -> None:
    """Delete plans the previous block listed that the new one does not (built for another release or GPU)."""
    current = {entry["plan"] for entry in new["plans"].values()}
    for entry in (old or {}).get("plans", {}).values():
        name = str(entry.get("plan", ""))
        if name not in current and name.endswith(".plan") and Path(name).name == name:  # only plans in the folder
            (folder / name).unlink(missing_ok=True)
