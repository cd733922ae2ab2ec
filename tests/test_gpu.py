"""GPU checks (marked ``gpu``; skipped without CUDA): the CUDA provider with IOBinding on device tensors."""

import pytest
import torch

from ddit_runtime.pipeline import FluxRuntime

pytestmark = pytest.mark.gpu


def test_cuda_runtime_matches_cpu(tiny_engines):
    schedule = [1, 1, 1, 2, 4, 4]
    cpu = FluxRuntime(tiny_engines, provider="cpu").generate("a red circle", steps=6, schedule=schedule, progress=False)
    cuda_rt = FluxRuntime(tiny_engines, provider="cuda")
    assert cuda_rt.device.type == "cuda"
    gpu = cuda_rt.generate("a red circle", steps=6, schedule=schedule, progress=False)
    assert gpu.schedule == schedule
    assert (gpu.image.float() - cpu.image.float()).abs().max() <= 2  # uint8 levels


def test_cuda_scheduler_stays_on_device(tiny_engines):
    rt = FluxRuntime(tiny_engines, provider="cuda")
    result = rt.generate("a red circle", steps=8, tau=1e9, progress=False)
    assert result.schedule == [1, 1, 1, 4, 4, 4, 4, 4]
    assert torch.cuda.is_available()
