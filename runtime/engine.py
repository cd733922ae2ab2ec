"""Engines that read and write torch tensors in place: ONNX Runtime sessions (IOBinding, CPU or CUDA) and TensorRT
plans (tensor addresses on one CUDA stream). Both take ``run(feeds, outputs)`` over preallocated buffers.

TensorRT and polygraphy are imported lazily, inside ``TrtEngine``: this module loads without them.
"""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ddit_profiles import DDiTError

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}


@functools.cache
def _shared_cpu_arena() -> None:
    """Register one CPU arena for every session of the process, growing by what is asked (not to the next power of 2).

    By default each ORT session keeps its own arena, grown to its largest shape and never returned. Three
    ``flux-dev-shape`` sessions at 1024x1024 (2.1 GB of weights each) then peaked at 24.3 GB and were OOM-killed;
    sharing one arena, they peak at 11.3 GB (weights 6.2 GB + the native step's activations), since only one engine
    runs at a time (measured 2026-11-23, ORT 1.32, CPU).
    """
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))  # 1 = kSameAsRequested


def elapsed_ms(t0: float, device: torch.device) -> float:
    """Milliseconds since ``t0`` (``time.perf_counter``), after the device's queue has drained on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1000


#: torch threads for the denoising loop's own ops when the engines run on the CPU (None: leave torch's setting)
LOOP_THREADS: int | None = 1


@contextlib.contextmanager
def loop_threads(device: torch.device):
    """Run the denoising loop's own torch ops on ``LOOP_THREADS`` threads when the engines run on the CPU; restore
    torch's setting after.

    Between ONNX Runtime calls the loop runs a few small torch ops (the scheduler, the Euler update, guidance).
    Some of them (``avg_pool2d``) always fork torch's OpenMP pool, whose worker then spins on a core that ORT's
    next call needs. Measured on the tiny FLUX (2 cores, 2026-11-24): a DDiT step at 1p took 1.9 ms longer than a
    fixed-schedule 1p step (10% of the step) with torch on 2 threads, and 0.3-0.4 ms longer on 1. The ops are
    small at every size (the scheduler on a FLUX 1024x1024 latent: about 1.5 ms on one thread, against seconds
    for an ORT step), so nothing is lost. On a GPU the host threads do not run the math, and nothing changes.
    """
    if device.type != "cpu" or LOOP_THREADS is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(LOOP_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: ORT intra-op worker spinning, by policy. ORT's workers spin after a run by default, and their spinning starved
#: the torch ops between engine calls (the scheduler's few ms became ~140 ms per step), so until 2026-12-04 the
#: runtime turned spinning off ("off"). But then every parallel section inside a run has to wake a sleeping
#: worker. "during-run" keeps them spinning inside a run and stops them when it returns (ORT's
#: ``session.force_spinning_stop``), so torch still gets the cores between calls. On 2 cores (2026-12-04,
#: ``benchmarks/cpu_spinning.py``, four runs) "off" made the tiny FLUX's steps 1.15-1.21x / 1.24-1.36x /
#: 1.18-1.37x slower at 1p / 2p / 4p and the tiny Wan's 1.13-1.16x, with the scheduler's cost in the loop within
#: the noise under both; at flux-dev-shape's real widths the two were within the machine's noise ("off" /
#: "during-run" 0.93-1.03 per size, 7 comparisons in 4 runs).
SPINNING = {
    "during-run": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"},
    "off": {"session.intra_op.allow_spinning": "0"},
}
CPU_SPINNING = "during-run"  # read when a session is created


class OrtEngine:
    """One graph. ``run`` binds the given input and output tensors by address: no copies, no host round trip."""

    def __init__(self, path: Path, device: torch.device):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for key, value in SPINNING[CPU_SPINNING].items():
            opts.add_session_config_entry(key, value)
        if device.type == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
            _shared_cpu_arena()
            opts.add_session_config_entry("session.use_env_allocators", "1")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # ORT raises its own exception types for bad graphs
            raise DDiTError(f"ONNX Runtime cannot load {path.name}: {str(e).splitlines()[0]}: re-export it") from None
        self.device, self.name = device, path.name
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.binding = self.session.io_binding()

    def output_dim(self, name: str) -> int:
        """The static last dimension of output ``name`` (e.g. the transformer's width for ``residual``)."""
        shape = next(o.shape for o in self.session.get_outputs() if o.name == name)
        if not isinstance(shape[-1], int):
            raise DDiTError(f"{self.name}: output {name} has a dynamic last dimension; re-export it")
        return shape[-1]

    def _bind(self, bind, name: str, tensor: torch.Tensor) -> None:
        if not tensor.is_contiguous():
            raise ValueError(f"{self.name}: tensor for {name} must be contiguous")
        bind(
            name, self.device.type, self.device.index or 0, _NUMPY[tensor.dtype], tuple(tensor.shape), tensor.data_ptr()
        )

    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Read ``inputs`` and write into the preallocated ``outputs`` (same device as the engine)."""
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        for name in self.input_names:
            self._bind(self.binding.bind_input, name, inputs[name])
        for name in self.output_names:
            self._bind(self.binding.bind_output, name, outputs[name])
        self.session.run_with_iobinding(self.binding)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Convenience for one-off graphs (encoders, decoder): ORT allocates the single output."""
        return self.run_all(**inputs)[0]

    def run_all(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        """Every output, in graph order, for graphs run a few times per generation (ORT allocates them)."""
        feeds = {n: inputs[n].detach().cpu().numpy() for n in self.input_names}
        return [torch.from_numpy(o).to(self.device) for o in self.session.run(None, feeds)]


# ---- TensorRT ---------------------------------------------------------------------------------------------------

TRT_INSTALL = "pip install 'ddit-toolchain[trt]' on a machine with an NVIDIA GPU and TensorRT 10"


def import_tensorrt(who: str):
    """The ``tensorrt`` module, or a one-line ``DDiTError`` saying that ``who`` needs it and how to get it."""
    try:
        import tensorrt
    except Exception:  # ImportError, or OSError when the wheel is there but its libraries are not
        raise DDiTError(f"{who} needs TensorRT ({TRT_INSTALL})") from None
    return tensorrt


def tensorrt_version() -> str | None:
    """``tensorrt.__version__`` (e.g. ``10.13.0.35``), or None when it does not import."""
    try:
        return import_tensorrt("this").__version__
    except DDiTError:
        return None


@functools.cache
def _trt_runtime():
    """One ``trt.Runtime`` per process, on polygraphy's logger; it outlives every engine it deserialises."""
    trt = import_tensorrt("the trt backend")
    from polygraphy.backend.trt.util import get_trt_logger

    return trt.Runtime(get_trt_logger())


def _torch_dtype(trt, dtype) -> torch.dtype:
    names = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64}
    names |= {"INT32": torch.int32, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
    table = {getattr(trt.DataType, n): t for n, t in names.items() if hasattr(trt.DataType, n)}
    if dtype not in table:
        raise DDiTError(f"TensorRT tensor type {dtype} has no torch equivalent here: re-export the graph in fp32")
    return table[dtype]


class SharedDeviceMemory:
    """One CUDA stream and one device-memory block for every TensorRT engine of a runtime, sized for the largest.

    The engines run one after another on that stream, so their activations can live in the same scratch block.
    ``generation`` changes whenever the block is reallocated: contexts then rebind it and drop captured graphs.
    """

    def __init__(self, device: torch.device, stream: torch.cuda.Stream | None = None):
        self.device = device
        self.stream = stream if stream is not None else torch.cuda.Stream(device)
        self.block = torch.empty(0, dtype=torch.uint8, device=device)  # [nbytes]
        self.generation = 0

    @property
    def nbytes(self) -> int:
        return self.block.numel()

    @property
    def ptr(self) -> int:
        return self.block.data_ptr()

    def reserve(self, nbytes: int) -> None:
        """Grow the block to at least ``nbytes``. Growing waits for the stream, since work may still use the old one."""
        if nbytes <= self.nbytes:
            return
        self.stream.synchronize()
        with torch.cuda.stream(self.stream):  # allocated on the stream that uses it
            self.block = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.generation += 1


class TrtEngine:
    """One TensorRT plan with ``OrtEngine``'s contract: ``run`` binds the given tensors by address, no copies.

    The context has no device memory of its own (``USER_MANAGED``): it uses ``memory``'s shared block. ``run``
    enqueues on ``memory.stream`` after the caller's stream, and the caller's stream waits for it (events, no host
    sync). With ``cuda_graphs``, the first call for a given set of shapes and addresses runs normally and then
    captures a CUDA graph (that capture synchronizes once); later calls with the same buffers replay it.
    """

    def __init__(
        self, plan: Path, device: torch.device, memory: SharedDeviceMemory | None = None, cuda_graphs: bool = False
    ):
        trt = import_tensorrt("the trt backend")
        if device.type != "cuda":
            raise DDiTError(f"TensorRT engines run on a CUDA device, not {device}: use an ort backend on the CPU")
        self.name, self.device, self.cuda_graphs = Path(plan).name, device, cuda_graphs
        self.memory = memory if memory is not None else SharedDeviceMemory(device)
        self.stream = self.memory.stream
        with torch.cuda.device(device):
            self.engine = self._deserialize(Path(plan))
            self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = {n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        self.input_names = [n for n in names if n in inputs]
        self.output_names = [n for n in names if n not in inputs]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self._v2 = hasattr(self.engine, "device_memory_size_v2")  # TensorRT >= 10.1
        self.device_memory_bytes = self.engine.device_memory_size_v2 if self._v2 else self.engine.device_memory_size
        self.memory.reserve(self.device_memory_bytes)
        self._bound: tuple | None = None  # (binding key, memory generation) the context holds
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._graphs_generation = self.memory.generation

    def _deserialize(self, plan: Path):
        from polygraphy.backend.trt import EngineFromBytes
        from polygraphy.exception import PolygraphyException

        try:
            return EngineFromBytes(plan.read_bytes(), runtime=_trt_runtime())()
        except (PolygraphyException, OSError) as e:
            raise DDiTError(
                f"TensorRT cannot load {plan.name} ({str(e).strip().splitlines()[0]}): rebuild it"
            ) from None

    def output_dim(self, name: str) -> int:
        """The static last dimension of output ``name`` (e.g. the transformer's width for ``residual``)."""
        last = self.engine.get_tensor_shape(name)[-1]
        if last < 0:
            raise DDiTError(f"{self.name}: output {name} has a dynamic last dimension; re-export it")
        return int(last)

    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Read ``inputs`` and write into the preallocated ``outputs`` (CUDA tensors on the engine's device)."""
        self._run(inputs, outputs, self.cuda_graphs)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Convenience for one-off graphs (encoders, decoder): the single (first) output, allocated here."""
        return self.run_all(**inputs)[0]

    def run_all(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        """Every output, in engine order, allocated here at the shapes TensorRT infers from ``inputs``."""
        feeds = {n: inputs[n].to(self.device, self.dtypes[n]).contiguous() for n in self.input_names}
        self._set_shapes(feeds)
        outputs = {
            n: torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self.dtypes[n], device=self.device)
            for n in self.output_names
        }
        self._run(feeds, outputs, graphs=False)  # fresh buffers each call: nothing worth capturing
        return [outputs[n] for n in self.output_names]

    def _run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], graphs: bool) -> None:
        tensors = [(n, inputs[n]) for n in self.input_names] + [(n, outputs[n]) for n in self.output_names]
        for name, tensor in tensors:
            self._check(name, tensor)
        key = tuple((n, tuple(t.shape), t.data_ptr()) for n, t in tensors)
        caller = torch.cuda.current_stream(self.device)
        if caller != self.stream:
            self.stream.wait_stream(caller)  # the inputs were written on the caller's stream
        with torch.cuda.stream(self.stream):
            self._enqueue(key, tensors, graphs)
        if caller != self.stream:
            caller.wait_stream(self.stream)  # and the caller reads the outputs after the engine wrote them

    def _check(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.device != self.device or tensor.dtype != self.dtypes[name] or not tensor.is_contiguous():
            raise ValueError(
                f"{self.name}: tensor for {name} must be a contiguous {self.dtypes[name]} tensor on {self.device}, "
                f"got {tensor.dtype} on {tensor.device}"
            )

    def _enqueue(self, key: tuple, tensors: list[tuple[str, torch.Tensor]], graphs: bool) -> None:
        if self._graphs_generation != self.memory.generation:  # the shared block moved: captured graphs are stale
            self._graphs.clear()
            self._graphs_generation = self.memory.generation
        if graphs and key in self._graphs:
            self._graphs[key].replay()
            return
        self._bind(key, tensors)
        self._execute()
        if graphs:
            self._graphs[key] = self._capture()

    def _set_shapes(self, inputs: dict[str, torch.Tensor]) -> None:
        self._bound = None  # the context's shapes change: whatever it held is gone
        for name, tensor in inputs.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise DDiTError(
                    f"{self.name}: input {name} of shape {tuple(tensor.shape)} is outside the engine's optimisation "
                    "profile: use a resolution, frame count and batch within the profile, or rebuild with ddit-build"
                )

    def _bind(self, key: tuple, tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Shapes, addresses and the shared memory block, unless the context already holds exactly these."""
        if self._bound == (key, self.memory.generation):
            return
        self._set_shapes({n: t for n, t in tensors if n in self.input_names})
        for name, tensor in tensors:
            if name in self.output_names and tuple(self.context.get_tensor_shape(name)) != tuple(tensor.shape):
                raise ValueError(
                    f"{self.name}: output buffer {name} has shape {tuple(tensor.shape)}, the engine writes "
                    f"{tuple(self.context.get_tensor_shape(name))}"
                )
            self.context.set_tensor_address(name, tensor.data_ptr())
        if self._v2:
            self.context.set_device_memory(self.memory.ptr, self.memory.nbytes)
        else:
            self.context.device_memory = self.memory.ptr
        self._bound = (key, self.memory.generation)

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise DDiTError(f"TensorRT failed to run {self.name} (its log above says why)")

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Capture one enqueue (already warmed up by a normal run) as a CUDA graph on the engine's stream."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):  # synchronizes once: the only host wait in run
            self._execute()
        return graph


def teacache_probe(manifest, engine, factor: int, open_graph):
    """The TeaCache probe of size ``factor`` beside its transformer ``engine``, opened by ``open_graph(key)``
    (``EngineSet.open``); a one-line error for folders exported before TeaCache (no probe in the manifest, or no
    ``residual`` output on the engine)."""
    meta = manifest.data["components"]["transformer"][str(factor)].get("teacache")
    if meta is None or "residual" not in engine.output_names:
        raise DDiTError(
            f"engines folder '{manifest.folder}' has no TeaCache probes (exported before TeaCache): "
            "re-export it with ddit-export to use --teacache"
        )
    return open_graph(f"teacache_k{factor}")
