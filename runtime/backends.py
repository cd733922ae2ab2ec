"""Which engine backend runs an engines folder (ONNX Runtime on the CPU or CUDA, or TensorRT), whether its TensorRT
plans fit this machine, how much weight memory the loaded engines hold, and the factory that makes one engine.

Every engine, whatever the backend, has ``OrtEngine``'s contract: ``input_names``, ``output_names``,
``output_dim(name)``, ``run(feeds, outputs)`` over preallocated torch tensors, ``__call__`` and ``run_all``.
TensorRT is imported only to learn its version or to load a plan; nothing here needs it to be installed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import onnxruntime as ort
import torch

from ddit_profiles import DDiTError

from .engine import TRT_INSTALL, OrtEngine, SharedDeviceMemory, TrtEngine, tensorrt_version
from .manifest import FAMILY_COMPONENTS, Manifest, sha256_file

BACKENDS = ("auto", "ort-cpu", "ort-cuda", "trt")
GPU_INSTALL = "pip install 'ddit-toolchain[gpu]' on a machine with an NVIDIA GPU"


# ---- the machine ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """What this process can run on: torch's CUDA device, ORT's providers, TensorRT's version, the GPU's arch."""

    cuda: bool  # torch sees a CUDA device
    ort_cuda: bool  # onnxruntime offers CUDAExecutionProvider
    trt_version: str | None = None  # tensorrt.__version__, None when it does not import
    cc: str | None = None  # compute capability, e.g. "sm90"
    gpu: str | None = None  # e.g. "NVIDIA H100 80GB HBM3"


def compute_capability(major: int, minor: int) -> str:
    """``sm{major}{minor}``: (9, 0) -> ``sm90``, (8, 9) -> ``sm89``, (10, 0) -> ``sm100``."""
    return f"sm{major}{minor}"


def cuda_device(device: torch.device | int | None = None) -> torch.device:
    """The CUDA device ``device`` names (an index, a torch device, or None for the current one)."""
    if isinstance(device, torch.device) and device.type == "cuda" and device.index is not None:
        return device
    return torch.device("cuda", device if isinstance(device, int) else torch.cuda.current_device())


def probe_machine(device: torch.device | int | None = None, with_trt: bool = True) -> Machine:
    """This machine, as ``select_backend`` sees it. ``with_trt=False`` skips importing tensorrt."""
    cuda = torch.cuda.is_available()
    ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    cc = gpu = None
    if cuda:
        index = cuda_device(device).index
        cc, gpu = compute_capability(*torch.cuda.get_device_capability(index)), torch.cuda.get_device_name(index)
    return Machine(cuda, ort_cuda, tensorrt_version() if with_trt else None, cc, gpu)


# ---- TensorRT plans against this machine ------------------------------------------------------------------------


def _release(version: str) -> tuple[int, ...]:
    """major.minor.patch of a TensorRT version string: engines are portable only within one release."""
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def _short(version: str) -> str:
    return ".".join(version.split(".")[:3])


def trt_mismatch(
    block: dict, local_version: str | None, local_cc: str | None, local_gpu: str | None = None
) -> str | None:
    """None when plans built as ``block`` says run on this machine, else what differs, as a phrase."""
    built, cc = block.get("version", "?"), block.get("compute_capability", "?")
    if local_version is not None and local_cc is not None:
        if _release(built) == _release(local_version) and cc == local_cc:
            return None
    gpu = f" ({block['gpu']})" if block.get("gpu") else ""
    here_trt = f"TensorRT {_short(local_version)}" if local_version else "no TensorRT"
    here_gpu = "no CUDA GPU"
    if local_cc:
        here_gpu = f"{local_cc} ({local_gpu})" if local_gpu else local_cc
    return f"built for TensorRT {_short(built)} on {cc}{gpu}; this machine has {here_trt} on {here_gpu}"


def check_trt_compat(
    block: dict | None,
    local_version: str | None,
    local_cc: str | None,
    folder: str | Path,
    local_gpu: str | None = None,
) -> None:
    """One-line ``DDiTError`` unless the manifest's ``tensorrt`` block was built for this TensorRT release and GPU."""
    if not block:
        raise DDiTError(f"engines folder '{folder}' has no TensorRT engines: build them with ddit-build {folder}")
    problem = trt_mismatch(block, local_version, local_cc, local_gpu)
    if problem:
        raise DDiTError(f"engines in {folder} were {problem}: rebuild with ddit-build {folder}")


def missing_plans(manifest: Manifest, sizes=None) -> list[str]:
    """The graphs (of ``sizes``' transformers and the encoders and decoder) that have no TensorRT plan."""
    plans = (manifest.data.get("tensorrt") or {}).get("plans", {})
    return [key for key in graphs(manifest.data, sizes, teacache=False) if key not in plans]


# ---- choosing a backend -----------------------------------------------------------------------------------------


class Backend(NamedTuple):
    """The chosen backend and why, e.g. ``backend: ort-cpu (no CUDA device)`` (its ``str``, what the CLI prints)."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"backend: {self.name} ({self.reason})"


def select_backend(
    requested: str,
    manifest: Manifest,
    device: torch.device | int | None = None,
    sizes=None,
    machine: Machine | None = None,
) -> Backend:
    """``auto``: TensorRT when the folder has plans for this GPU and TensorRT release (and ``sizes``), else ORT CUDA
    when torch and onnxruntime both have CUDA, else ORT on the CPU. An explicit request that this machine or folder
    cannot meet is a one-line ``DDiTError``. ``machine`` overrides ``probe_machine(device)`` (for tests)."""
    if requested not in BACKENDS:
        raise DDiTError(f"unknown backend '{requested}': choose one of {', '.join(BACKENDS)}")
    if requested == "ort-cpu":
        return Backend("ort-cpu", "requested")
    wants_trt = requested == "trt" or (requested == "auto" and bool(manifest.data.get("tensorrt")))
    machine = machine or probe_machine(device, with_trt=wants_trt)
    if requested == "auto":
        return _auto(manifest, machine, sizes)
    missing = _missing(requested, machine)
    if missing:
        hint = TRT_INSTALL if requested == "trt" else GPU_INSTALL
        fallback = "auto" if requested == "trt" else "ort-cpu"
        raise DDiTError(f"--backend {requested} needs {' and '.join(missing)}: {hint}, or use --backend {fallback}")
    if requested == "ort-cuda":
        return Backend("ort-cuda", f"requested, on {machine.gpu}")
    _require_plans(manifest, machine, sizes)
    return Backend("trt", f"requested, TensorRT {_short(machine.trt_version)} on {machine.cc}")


def _missing(requested: str, machine: Machine) -> list[str]:
    missing = []
    if requested == "trt" and machine.trt_version is None:
        missing.append("TensorRT (tensorrt does not import)")
    if requested == "ort-cuda" and not machine.ort_cuda:
        missing.append("onnxruntime-gpu (onnxruntime has no CUDAExecutionProvider)")
    if not machine.cuda:
        missing.append("a CUDA GPU (torch.cuda sees none)")
    return missing


def _require_plans(manifest: Manifest, machine: Machine, sizes) -> None:
    folder = manifest.folder
    check_trt_compat(manifest.data.get("tensorrt"), machine.trt_version, machine.cc, folder, machine.gpu)
    if absent := missing_plans(manifest, sizes):
        raise DDiTError(
            f"engines folder '{folder}' has no TensorRT engine for {', '.join(absent)}: "
            f"build it with ddit-build {folder}, or load only the sizes that have one"
        )


def _trt_problem(manifest: Manifest, machine: Machine, sizes) -> str | None:
    """Why ``auto`` cannot use TensorRT here (a short phrase), or None when it can."""
    block = manifest.data.get("tensorrt")
    if not block:
        return f"no TensorRT engines in the folder; ddit-build {manifest.folder} makes them"
    if machine.trt_version is None:
        return "the folder has TensorRT engines but tensorrt does not import"
    if problem := trt_mismatch(block, machine.trt_version, machine.cc, machine.gpu):
        return f"the TensorRT engines were {problem}"
    if absent := missing_plans(manifest, sizes):
        return f"no TensorRT engine for {', '.join(absent)}"
    return None


def _auto(manifest: Manifest, machine: Machine, sizes) -> Backend:
    if not machine.cuda:
        return Backend("ort-cpu", "no CUDA device")
    problem = _trt_problem(manifest, machine, sizes)
    if problem is None:
        return Backend("trt", f"TensorRT {_short(machine.trt_version)} engines for this {machine.cc} GPU")
    if machine.ort_cuda:
        return Backend("ort-cuda", f"{machine.gpu}; {problem}")
    return Backend("ort-cpu", f"onnxruntime has no CUDAExecutionProvider ({GPU_INSTALL}); {problem}")


def backend_device(backend: str, device: torch.device | int | None = None) -> torch.device:
    """The torch device whose memory the engines of ``backend`` read and write."""
    return torch.device("cpu") if backend == "ort-cpu" else cuda_device(device)


# ---- the graphs of a folder, and the file each backend loads ----------------------------------------------------


class Graph(NamedTuple):
    onnx: str  # the graph file
    files: tuple[str, ...]  # the graph and its external data


def _graph(onnx: str, files) -> Graph:
    return Graph(onnx, tuple(f for f in files if f == onnx or f.startswith(onnx + ".")))


def graphs(data: dict, sizes=None, teacache: bool = True) -> dict[str, Graph]:
    """Every graph of a manifest, by key: ``transformer_k{k}`` (and ``teacache_k{k}``) for ``sizes`` (default: all),
    then the family's encoders and decoder (``text_encoder``, ``text_encoder_2``, ``vae_decoder``, and Wan's
    ``vae_decoder_step``). TensorRT plans use the same keys."""
    comps, out = data["components"], {}
    for k in data["sizes"] if sizes is None else sizes:
        if str(k) not in comps["transformer"]:
            raise DDiTError(f"patch size {k} was not exported (the folder has {data['sizes']}): drop it or re-export")
        meta = comps["transformer"][str(k)]
        out[f"transformer_k{k}"] = _graph(meta["onnx"], meta.get("files", [meta["onnx"]]))
        if teacache and "teacache" in meta:
            probe = meta["teacache"]
            out[f"teacache_k{k}"] = _graph(probe["onnx"], probe.get("files", [probe["onnx"]]))
    for name in FAMILY_COMPONENTS[data["family"]]:
        meta = comps[name]
        out[name] = _graph(meta["onnx"], meta.get("files", [meta["onnx"]]))
        if "step_onnx" in meta:
            out[f"{name}_step"] = _graph(meta["step_onnx"], meta.get("files", [meta["step_onnx"]]))
    return out


def _plan_entry(manifest: Manifest, key: str) -> dict:
    plans = (manifest.data.get("tensorrt") or {}).get("plans", {})
    if key not in plans:
        folder = manifest.folder
        raise DDiTError(
            f"engines folder '{folder}' has no TensorRT engine for {key}: build it with ddit-build {folder}"
        )
    return plans[key]


def component_file(manifest: Manifest, key: str, backend: str, verify: bool = True) -> Path:
    """The file ``backend`` loads for graph ``key``: the ONNX graph, or the TensorRT plan (size checked, and its
    sha256 too when ``verify``; ``load_manifest`` checks the ONNX files)."""
    if backend != "trt":
        return manifest.path(graphs(manifest.data)[key].onnx)
    entry = _plan_entry(manifest, key)
    path = manifest.path(entry["plan"])
    rebuild = f"rebuild it with ddit-build {manifest.folder}"
    if not path.is_file() or path.stat().st_size != entry["bytes"]:
        raise DDiTError(f"TensorRT engine {entry['plan']} is missing or has the wrong size: {rebuild}")
    if verify and sha256_file(path) != entry["sha256"]:
        raise DDiTError(f"TensorRT engine {entry['plan']} does not match its sha256 in the manifest: {rebuild}")
    return path


def make_engine(
    backend: str,
    path: str | Path,
    device: torch.device,
    shared_memory: SharedDeviceMemory | None = None,
    cuda_graphs: bool = False,
) -> OrtEngine | TrtEngine:
    """One engine for ``path`` (an ONNX graph for ``ort-*``, a plan for ``trt``). TensorRT engines of one runtime
    should share one ``SharedDeviceMemory`` (one stream, one scratch block sized for the largest)."""
    if backend in ("ort-cpu", "ort-cuda"):
        return OrtEngine(Path(path), device)
    if backend == "trt":
        return TrtEngine(Path(path), device, shared_memory, cuda_graphs=cuda_graphs)
    raise DDiTError(f"unknown backend '{backend}': choose one of {', '.join(BACKENDS[1:])}")


# ---- weight memory ----------------------------------------------------------------------------------------------


def resident_components(manifest: Manifest, sizes, backend: str, teacache: bool = False) -> dict[str, int]:
    """Bytes each loaded graph holds, by key: its ONNX file and external data, or its plan. Merged LoRA means every
    size carries a full copy of the weights, so this grows with every size loaded."""
    keys = graphs(manifest.data, sizes, teacache)
    if backend == "trt":
        return {key: int(_plan_entry(manifest, key)["bytes"]) for key in keys}
    files = manifest.data["files"]
    return {key: sum(int(files[f]["bytes"]) for f in graph.files) for key, graph in keys.items()}


def resident_weight_bytes(manifest: Manifest, sizes, backend: str, teacache: bool = False) -> int:
    """Total bytes of the graphs a runtime with ``sizes`` loads on ``backend`` (see ``resident_components``)."""
    return sum(resident_components(manifest, sizes, backend, teacache).values())


def format_bytes(n: int) -> str:
    """``48.3 GiB`` from 1 GiB up, else ``12.5 MiB``."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_fits(required_bytes: int, free_bytes: int, what: str, where: str = "the GPU") -> None:
    """One-line ``DDiTError`` when ``required_bytes`` of weights (for ``what``, e.g. ``sizes 1,2,4``) exceed
    ``free_bytes``."""
    if required_bytes > free_bytes:
        raise DDiTError(
            f"the engines need {format_bytes(required_bytes)} of weights for {what} but {where} has "
            f"{format_bytes(free_bytes)} free: load fewer sizes with --sizes, or use a device with more memory"
        )


def free_memory_bytes(device: torch.device) -> int:
    """Free memory where ``device``'s engines live: the GPU's (``cudaMemGetInfo``), or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def describe_resident(manifest: Manifest, sizes, backend: str, teacache: bool = False) -> str:
    """One line for the runtime to print at load, e.g.
    ``resident weights 38.4 MiB on ort-cpu: transformer_k1 11.9 MiB, transformer_k2 12.1 MiB, ...``."""
    parts = resident_components(manifest, sizes, backend, teacache)
    listing = ", ".join(f"{key} {format_bytes(n)}" for key, n in parts.items())
    return f"resident weights {format_bytes(sum(parts.values()))} on {backend}: {listing}"


# ---- one runtime's engines --------------------------------------------------------------------------------------

PROVIDER_BACKENDS = {"auto": "auto", "cpu": "ort-cpu", "cuda": "ort-cuda"}  # the older ``--provider`` names


def open_transformers(manifest: Manifest, folder, sizes, backend: str, verify: bool, cuda_graphs: bool):
    """A runtime's start: (sizes, EngineSet, {size: transformer engine}).

    ``sizes`` (any order; repeats ignored) defaults to every exported one; only those engines are opened, and a
    size the folder lacks is a one-line error. ``backend`` is what ``backend_from_provider`` resolved.
    """
    wanted = manifest.sizes if sizes is None else tuple(sorted({int(k) for k in sizes}))
    if not wanted:
        raise DDiTError(f"no patch sizes given: pick some of {list(manifest.sizes)}, e.g. --sizes 1,2")
    missing = [k for k in wanted if k not in manifest.sizes]
    if missing:
        raise DDiTError(
            f"patch sizes {missing} were not exported to '{folder}' (it has "
            f"{list(manifest.sizes)}): re-export with them or drop them"
        )
    loader = EngineSet(manifest, backend, wanted, verify=verify, cuda_graphs=cuda_graphs)
    return wanted, loader, {k: loader.open(f"transformer_k{k}") for k in wanted}


def backend_from_provider(backend: str | None, provider: str | None) -> str:
    """The backend a runtime was asked for: ``backend``, else the older ``provider`` (auto|cpu|cuda), else auto."""
    if backend is not None and provider is not None:
        raise DDiTError("give --backend or --provider, not both (--provider cpu is --backend ort-cpu)")
    if provider is not None:
        if provider not in PROVIDER_BACKENDS:
            raise DDiTError(f"unknown provider '{provider}': choose one of auto, cpu, cuda (or use --backend)")
        return PROVIDER_BACKENDS[provider]
    return "auto" if backend is None else backend


class EngineSet:
    """Opens the graphs of one engines folder on one backend, after checking that their weights fit.

    ``select_backend`` -> ``backend_device`` -> ``check_fits(resident_weight_bytes)`` -> ``make_engine`` per graph
    key. TensorRT engines share one stream and one scratch block (``SharedDeviceMemory``); ``TrtEngine.run`` orders
    itself after the caller's stream with events, so the denoising loop needs no stream switch.
    ``backend.reason`` and ``resident`` are what the CLI prints at load.
    """

    def __init__(
        self,
        manifest: Manifest,
        backend: str = "auto",
        sizes=None,
        device: torch.device | int | None = None,
        verify: bool = True,
        cuda_graphs: bool = False,
        machine: Machine | None = None,
    ):
        self.manifest, self.verify, self.cuda_graphs = manifest, verify, cuda_graphs
        self.backend = select_backend(backend, manifest, device, sizes, machine)
        self.device = backend_device(self.backend.name, device)
        name = self.backend.name
        sizes = manifest.sizes if sizes is None else tuple(sizes)
        where = "the GPU" if self.device.type == "cuda" else "this machine"
        check_fits(
            resident_weight_bytes(manifest, sizes, name),
            free_memory_bytes(self.device),
            f"sizes {','.join(map(str, sizes))}",
            where,
        )
        self.resident = describe_resident(manifest, sizes, name)
        self.shared = SharedDeviceMemory(self.device) if name == "trt" else None

    @property
    def name(self) -> str:
        return self.backend.name

    def open(self, key: str) -> OrtEngine | TrtEngine:
        """The engine of graph ``key`` (``transformer_k2``, ``teacache_k4``, ``text_encoder``, ``vae_decoder``...)."""
        path = component_file(self.manifest, key, self.name, verify=self.verify)
        return make_engine(self.name, path, self.device, self.shared, self.cuda_graphs)
