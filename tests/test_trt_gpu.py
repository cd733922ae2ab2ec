"""TensorRT on a GPU (marked ``gpu``: skipped without CUDA, and skipped without tensorrt): ddit-build on the tiny
FLUX and Wan folders, every plan against ONNX Runtime, the shared device-memory block, CUDA graphs, and denoising
steps switching sizes through ``TrtEngine``.

TensorRT runs fp32 graphs with TF32 matmuls by default, so parity is checked to 2% of the output's scale."""

import shutil

import pytest
import torch

from ddit_export.trt_build import build_engines, input_profile
from ddit_profiles import DDiTError
from ddit_runtime.backends import (
    check_fits,
    component_file,
    compute_capability,
    free_memory_bytes,
    graphs,
    make_engine,
    resident_weight_bytes,
    select_backend,
)
from ddit_runtime.engine import OrtEngine, SharedDeviceMemory, TrtEngine
from ddit_runtime.manifest import load_manifest
from ddit_runtime.sigmas import flux_sigmas

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def tensorrt():
    return pytest.importorskip("tensorrt")


@pytest.fixture(scope="module")
def dev():
    return torch.device("cuda", torch.cuda.current_device())


def _build(source, tmp_path_factory, name):
    folder = shutil.copytree(source, tmp_path_factory.mktemp(name) / "engines")
    build_engines(folder, opt_level=2, progress=False)
    return load_manifest(folder)


@pytest.fixture(scope="module")
def flux_trt(tiny_engines, tmp_path_factory, tensorrt):
    return _build(tiny_engines, tmp_path_factory, "flux-trt")


@pytest.fixture(scope="module")
def wan_trt(wan_engines, tmp_path_factory, tensorrt):
    return _build(wan_engines, tmp_path_factory, "wan-trt")


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float = 2e-2) -> bool:
    got, ref = got.float().cpu(), ref.float().cpu()
    return got.shape == ref.shape and (got - ref).abs().max().item() <= 1e-3 + rel * ref.abs().max().item()


def _opt_feeds(manifest, key: str, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of graph ``key`` at its profile's opt shapes: token ids, masks, timesteps in range, else noise."""
    gen = torch.Generator().manual_seed(seed)
    wan = manifest.data["family"] == "wan"
    feeds = {}
    for name, (_, opt, _) in input_profile(manifest.data, key).items():
        if name == "input_ids":
            feeds[name] = torch.randint(1, 10, opt, generator=gen)
        elif name == "attention_mask":
            feeds[name] = torch.ones(opt, dtype=torch.int64)
        elif name == "timestep":
            feeds[name] = torch.rand(opt, generator=gen) * (1000.0 if wan else 1.0)
        elif name == "guidance":
            feeds[name] = torch.full(opt, 3.5)
        else:
            feeds[name] = torch.randn(opt, generator=gen)
    return {name: t.to(device) for name, t in feeds.items()}


def _ort(manifest, key: str, feeds: dict) -> dict[str, torch.Tensor]:
    engine = OrtEngine(component_file(manifest, key, "ort-cpu"), torch.device("cpu"))
    outputs = engine.run_all(**{n: t.cpu() for n, t in feeds.items()})
    return dict(zip(engine.output_names, outputs, strict=True))


def _trt(manifest, key: str, feeds: dict, dev) -> dict[str, torch.Tensor]:
    engine = TrtEngine(component_file(manifest, key, "trt"), dev)
    outputs = engine.run_all(**feeds)
    torch.cuda.synchronize(dev)
    return dict(zip(engine.output_names, outputs, strict=True))


def test_build_writes_plans_for_this_gpu(flux_trt, tensorrt, dev):
    block = flux_trt.data["tensorrt"]
    assert block["version"] == tensorrt.__version__
    assert block["compute_capability"] == compute_capability(*torch.cuda.get_device_capability(dev))
    assert set(block["plans"]) == set(graphs(flux_trt.data))
    for key in block["plans"]:
        assert component_file(flux_trt, key, "trt").is_file()  # size and sha256 checked
        assert (flux_trt.folder / graphs(flux_trt.data)[key].onnx).is_file()  # the ONNX graphs stay
    assert select_backend("auto", flux_trt, dev).name == "trt"
    assert select_backend("trt", flux_trt, dev).name == "trt"


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_every_plan_matches_onnx_runtime(family, request, dev):
    """Each size's transformer (and TeaCache probe), the text encoders and the VAE decoder, at the opt shapes."""
    manifest = request.getfixturevalue(f"{family}_trt")
    for key in graphs(manifest.data):
        feeds = _opt_feeds(manifest, key, dev)
        ref, got = _ort(manifest, key, feeds), _trt(manifest, key, feeds, dev)
        assert set(got) == set(ref), key
        for name in ref:
            assert _close(got[name], ref[name]), (key, name, (got[name].cpu() - ref[name]).abs().max().item())


def _step_buffers(manifest, dev) -> tuple[dict, dict]:
    """FLUX transformer inputs at the opt shapes, and per-size output buffers (velocity shared, residual per size)."""
    feeds = _opt_feeds(manifest, "transformer_k1", dev)
    outputs = {}
    for k in manifest.sizes:
        rows_cols = input_profile(manifest.data, f"teacache_k{k}")["residual"][1]
        outputs[k] = {"velocity": torch.empty_like(feeds["latent"]), "residual": torch.empty(rows_cols, device=dev)}
    return feeds, outputs


def test_engines_share_one_device_memory_block(flux_trt, dev):
    memory = SharedDeviceMemory(dev)
    plans = {k: component_file(flux_trt, f"transformer_k{k}", "trt") for k in flux_trt.sizes}
    engines = {k: make_engine("trt", plans[k], dev, shared_memory=memory) for k in flux_trt.sizes}
    assert memory.nbytes == max(e.device_memory_bytes for e in engines.values()) > 0
    feeds, outputs = _step_buffers(flux_trt, dev)
    first = {}
    for k in (*flux_trt.sizes, flux_trt.sizes[0]):  # native again after the others used the block
        engines[k].run(feeds, outputs[k])
        torch.cuda.synchronize(dev)
        if k in first:
            assert torch.allclose(outputs[k]["velocity"], first[k], atol=1e-6, rtol=0)
        first[k] = outputs[k]["velocity"].clone()
    for k in flux_trt.sizes:  # an engine with a block of its own computes the same
        alone = TrtEngine(plans[k], dev)
        alone.run(feeds, outputs[k])
        torch.cuda.synchronize(dev)
        assert torch.allclose(outputs[k]["velocity"], first[k], atol=1e-5, rtol=1e-5)


def test_cuda_graphs_replay_matches_plain_runs(flux_trt, dev):
    plan = component_file(flux_trt, "transformer_k2", "trt")
    memory = SharedDeviceMemory(dev)
    graphed, plain = TrtEngine(plan, dev, memory, cuda_graphs=True), TrtEngine(plan, dev, memory)
    feeds, outputs = _step_buffers(flux_trt, dev)
    replayed = {name: torch.empty_like(t) for name, t in outputs[2].items()}
    for seed in range(3):  # the first call captures, the next two replay on new values in the same buffers
        for name, t in _opt_feeds(flux_trt, "transformer_k1", dev, seed).items():
            feeds[name].copy_(t)
        graphed.run(feeds, replayed)
        plain.run(feeds, outputs[2])
        torch.cuda.synchronize(dev)
        assert torch.allclose(replayed["velocity"], outputs[2]["velocity"], atol=1e-5, rtol=1e-5)
    assert len(graphed._graphs) == 1


def test_denoising_steps_through_trt_match_ort(flux_trt, dev):
    """Euler steps switching sizes 1 -> 2 -> 4 -> 1 over one set of buffers: TensorRT (shared memory, CUDA graphs,
    one host sync at the end) against ONNX Runtime on the CPU."""
    schedule = [1, 2, 4, 1]
    sigmas = flux_sigmas(len(schedule), 0.8).tolist()
    memory = SharedDeviceMemory(dev)
    trt_engines = {
        k: TrtEngine(component_file(flux_trt, f"transformer_k{k}", "trt"), dev, memory, cuda_graphs=True)
        for k in set(schedule)
    }
    ort_engines = {
        k: OrtEngine(component_file(flux_trt, f"transformer_k{k}", "ort-cpu"), torch.device("cpu"))
        for k in set(schedule)
    }
    feeds, outputs = _step_buffers(flux_trt, dev)
    cpu_feeds = {n: t.cpu().clone() for n, t in feeds.items()}
    cpu_out = {k: {n: t.cpu().clone() for n, t in o.items()} for k, o in outputs.items()}
    for i, k in enumerate(schedule):
        for f, engines, out in ((feeds, trt_engines, outputs), (cpu_feeds, ort_engines, cpu_out)):
            f["timestep"].fill_(sigmas[i])
            engines[k].run(f, out[k])
            f["latent"].add_(out[k]["velocity"], alpha=sigmas[i + 1] - sigmas[i])
    torch.cuda.synchronize(dev)
    assert _close(feeds["latent"], cpu_feeds["latent"])


def test_input_outside_the_profile_is_refused(flux_trt, dev):
    engine = TrtEngine(component_file(flux_trt, "transformer_k1", "trt"), dev)
    feeds, outputs = _step_buffers(flux_trt, dev)
    (_, _, high) = input_profile(flux_trt.data, "transformer_k1")["latent"]
    feeds["latent"] = torch.zeros(1, high[1], high[2] + 16, high[3], device=dev)
    with pytest.raises(DDiTError, match="outside the engine's optimisation profile"):
        engine.run(feeds, outputs[1])


def test_resident_plans_fit_the_gpu(flux_trt, dev):
    required = resident_weight_bytes(flux_trt, flux_trt.sizes, "trt")
    on_disk = sum(component_file(flux_trt, key, "trt").stat().st_size for key in graphs(flux_trt.data, teacache=False))
    assert required == on_disk > 0
    check_fits(required, free_memory_bytes(dev), "sizes 1,2,4")


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_runtime_on_trt_matches_ort_cpu_end_to_end(family, request, dev):
    """The whole pipeline (encoders, switching transformer sizes, decoder) on ``--backend trt``, and ``auto`` picking
    it, against ONNX Runtime on the CPU: the same schedule and seed give nearly the same pixels."""
    from ddit_runtime.pipeline import FluxRuntime
    from ddit_runtime.wan_pipeline import WanRuntime

    manifest = request.getfixturevalue(f"{family}_trt")
    runtime_class = WanRuntime if family == "wan" else FluxRuntime
    auto = runtime_class(manifest.folder)
    assert auto.backend.name == "trt", auto.backend
    cpu = runtime_class(manifest.folder, backend="ort-cpu")
    schedule = [1, 2, 4, 1]
    got = auto.generate("a red circle", steps=4, schedule=schedule, progress=False)
    ref = cpu.generate("a red circle", steps=4, schedule=schedule, progress=False)
    diff = (got.image.float() - ref.image.float()).abs()
    assert got.image.shape == ref.image.shape and diff.mean().item() < 4.0, diff.mean().item()
    graphed = runtime_class(manifest.folder, backend="trt", cuda_graphs=True)
    again = graphed.generate("a red circle", steps=4, schedule=schedule, progress=False)
    assert (again.image.float() - got.image.float()).abs().mean().item() < 1.0
