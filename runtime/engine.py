"""ONNX Runtime sessions that read and write torch tensors in place (IOBinding), on the CPU or CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ddit_profiles import DDiTError

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}
PROVIDERS = ("auto", "cpu", "cuda")


def pick_device(provider: str) -> torch.device:
    """The torch device whose memory the sessions read: ``auto`` prefers CUDA when both torch and ORT have it."""
    if provider not in PROVIDERS:
        raise DDiTError(f"unknown provider '{provider}': choose one of {', '.join(PROVIDERS)}")
    ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if provider == "cuda" and not (ort_cuda and torch.cuda.is_available()):
        raise DDiTError(
            "--provider cuda needs onnxruntime-gpu and a CUDA build of torch with a GPU: "
            "pip install 'ddit-toolchain[gpu]', or use --provider cpu"
        )
    use_cuda = provider == "cuda" or (provider == "auto" and ort_cuda and torch.cuda.is_available())
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


class OrtEngine:
    """One graph. ``run`` binds the given input and output tensors by address: no copies, no host round trip."""

    def __init__(self, path: Path, device: torch.device):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's CPU workers spin after a run by default, starving the torch ops between engine calls
        # (measured: the scheduler's few ms became ~140 ms per step). Hand the cores back instead.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if device.type == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
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
