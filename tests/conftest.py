"""Shared fixtures: one tiny engines folder per test session (exporting takes about a minute on 2 cores)."""

import dataclasses

import pytest
import torch

from ddit_profiles import get_profile


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_spec():
    """``flux-tiny`` as an export of other adapters than the shipped ones records it (``tiny_engines``): without the
    profile's own calibrated tau and fitted TeaCache polynomials, which describe the shipped weights only. Its
    optimum (and so the runtime's default) shape is 256x256 instead of 512x512: a quarter of the tokens, the same
    code. Tests of the shipped defaults themselves use ``get_profile("flux-tiny")``."""
    from ddit_export.manifest import without_profile_calibrations

    return without_profile_calibrations(dataclasses.replace(get_profile("flux-tiny"), opt_size=(256, 256)))


@pytest.fixture(scope="session")
def tiny_engines(tmp_path_factory, tiny_spec):
    """Engines folder from ``--model tiny`` with sizes 1, 2, 4 and the untrained adapters. Do not modify it."""
    from ddit_export.flux_export import export_flux

    out = tmp_path_factory.mktemp("shared") / "engines"
    export_flux("tiny", tiny_spec, [1, 2, 4], out, adapters_path="none", progress=False)
    return out


def random_adapters(transformer, spec, factors, rank=4, seed=0):
    """Adapters as if trained: perturbed embeddings, nonzero size embedding and residual, random LoRA A and B."""
    import copy

    from peft import get_peft_model_state_dict, inject_adapter_in_model

    from ddit_export.adapters import lora_config, untrained_adapters

    gen = torch.Generator().manual_seed(seed)
    adapters = untrained_adapters(transformer, spec, factors, rank=rank)
    adapters.alpha = 2.0 * rank
    adapters.meta["trained"] = "true"
    for k, adapter in adapters.sizes.items():
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        probe = copy.deepcopy(transformer)
        inject_adapter_in_model(lora_config(probe, rank, adapters.alpha), probe, adapter_name="x")
        state = get_peft_model_state_dict(probe, adapter_name="x")
        adapters.lora[k] = {n: 0.05 * torch.randn(t.shape, generator=gen) for n, t in state.items()}
    return adapters


@pytest.fixture(scope="session")
def tiny_parts(tiny_spec):
    from ddit_export.loading import load_flux

    return load_flux("tiny", tiny_spec)


@pytest.fixture(scope="session")
def wan_spec():
    return get_profile("wan-tiny")


@pytest.fixture(scope="session")
def wan_parts(wan_spec):
    from ddit_export.wan_loading import load_wan

    return load_wan("tiny", wan_spec)


@pytest.fixture(scope="session")
def wan_engines(tmp_path_factory, wan_spec):
    """One tiny Wan export, sizes 1, 2, 4, untrained adapters (about 100 s on 2 cores). Do not modify it."""
    from ddit_export.wan_export import export_wan

    out = tmp_path_factory.mktemp("wan") / "engines"
    export_wan("tiny", wan_spec, [1, 2, 4], out, adapters_path="none", progress=False)
    return out


def ort_optimised_ops(path, tmp_path) -> dict:
    """Op counts of the graph at ``path`` after ONNX Runtime's CPU optimiser (what a runtime session executes)."""
    import collections

    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / f"optimised_{path.name}")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
