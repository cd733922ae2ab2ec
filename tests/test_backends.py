"""The backend layer on the CPU: backend choice and its one-line refusals, the TensorRT release/GPU check, plan names,
the optimisation profiles against the exported graphs, the ddit-build bookkeeping (with a stand-in for TensorRT's
builder), weight-memory accounting, and ddit-build without TensorRT."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from ddit_cli import build_main, run_main
from ddit_export.trt_build import TrtTarget, build_engines, input_profile, plan_name
from ddit_profiles import DDiTError
from ddit_runtime.backends import (
    Backend,
    EngineSet,
    Machine,
    backend_device,
    backend_from_provider,
    check_fits,
    check_trt_compat,
    component_file,
    compute_capability,
    describe_resident,
    free_memory_bytes,
    graphs,
    make_engine,
    resident_weight_bytes,
    select_backend,
)
from ddit_runtime.engine import tensorrt_version
from ddit_runtime.manifest import load_manifest, sha256_file
from ddit_runtime.pipeline import FluxRuntime

H100 = TrtTarget("10.13.0.35", "sm90", "NVIDIA H100 80GB HBM3")
GPU_MACHINE = Machine(cuda=True, ort_cuda=True, trt_version="10.13.0.35", cc="sm90", gpu="NVIDIA H100 80GB HBM3")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks this machine's lack of CUDA")
no_trt = pytest.mark.skipif(tensorrt_version() is not None, reason="checks this machine's lack of TensorRT")


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and text, text
    return text


def fake_plan(onnx_path, plan_path, profile, opt_level, timing_cache):
    """Stands in for TensorRT's builder: a file that depends on the graph and the profile."""
    plan_path.write_bytes(b"plan " + onnx_path.name.encode() + json.dumps(sorted(profile.items())).encode())


@pytest.fixture
def flux_copy(tiny_engines, tmp_path):
    return shutil.copytree(tiny_engines, tmp_path / "engines")


@pytest.fixture
def built(flux_copy):
    """A FLUX folder with stand-in plans recorded as if built on an H100 with TensorRT 10.13."""
    build_engines(flux_copy, target=H100, build_plan=fake_plan, progress=False)
    return flux_copy


# ---- backend choice ----------------------------------------------------------------------------------------------


@no_cuda
def test_auto_without_cuda_is_ort_cpu(tiny_engines):
    choice = select_backend("auto", load_manifest(tiny_engines, verify=False))
    assert choice == Backend("ort-cpu", "no CUDA device")
    assert str(choice) == "backend: ort-cpu (no CUDA device)"
    assert backend_device(choice.name) == torch.device("cpu")


@no_trt
def test_trt_requested_without_tensorrt_is_one_line(tiny_engines):
    with pytest.raises(DDiTError) as error:
        select_backend("trt", load_manifest(tiny_engines, verify=False))
    line = _one_line(error)
    assert line.startswith("--backend trt needs TensorRT (tensorrt does not import)")
    assert "pip install 'ddit-toolchain[trt]'" in line and "--backend auto" in line


def test_trt_requested_on_a_gpu_without_tensorrt_names_only_tensorrt(tiny_engines):
    machine = Machine(cuda=True, ort_cuda=True, cc="sm90", gpu="H100")
    with pytest.raises(DDiTError) as error:
        select_backend("trt", load_manifest(tiny_engines, verify=False), machine=machine)
    assert "TensorRT" in _one_line(error) and "CUDA GPU" not in str(error.value)


@no_cuda
def test_ort_cuda_requested_without_cuda_is_one_line(tiny_engines):
    with pytest.raises(DDiTError) as error:
        select_backend("ort-cuda", load_manifest(tiny_engines, verify=False))
    line = _one_line(error)
    assert "a CUDA GPU (torch.cuda sees none)" in line and "--backend ort-cpu" in line


def test_unknown_backend(tiny_engines):
    with pytest.raises(DDiTError, match="unknown backend 'tensorflow': choose one of auto, ort-cpu, ort-cuda, trt"):
        select_backend("tensorflow", load_manifest(tiny_engines, verify=False))


def test_auto_on_a_gpu_without_plans_is_ort_cuda_and_says_how_to_build(tiny_engines):
    choice = select_backend("auto", load_manifest(tiny_engines, verify=False), machine=GPU_MACHINE)
    assert choice.name == "ort-cuda" and f"ddit-build {tiny_engines}" in choice.reason


def test_auto_on_a_gpu_without_onnxruntime_gpu_is_ort_cpu(tiny_engines):
    machine = Machine(cuda=True, ort_cuda=False, cc="sm90", gpu="H100")
    choice = select_backend("auto", load_manifest(tiny_engines, verify=False), machine=machine)
    assert choice.name == "ort-cpu" and "CUDAExecutionProvider" in choice.reason


def test_auto_picks_trt_only_for_matching_plans(built):
    manifest = load_manifest(built)
    assert select_backend("auto", manifest, machine=GPU_MACHINE).name == "trt"
    assert select_backend("trt", manifest, machine=GPU_MACHINE).name == "trt"
    older = Machine(cuda=True, ort_cuda=True, trt_version="10.9.0.34", cc="sm90", gpu="NVIDIA H100 80GB HBM3")
    choice = select_backend("auto", manifest, machine=older)
    assert choice.name == "ort-cuda" and "10.13.0" in choice.reason and "10.9.0" in choice.reason
    no_ort_gpu = Machine(cuda=True, ort_cuda=False, trt_version="10.13.0.35", cc="sm89", gpu="NVIDIA L4")
    assert select_backend("auto", manifest, machine=no_ort_gpu).name == "ort-cpu"


def test_trt_requested_with_plans_for_another_gpu_is_refused(built):
    l4 = Machine(cuda=True, ort_cuda=True, trt_version="10.13.0.35", cc="sm89", gpu="NVIDIA L4")
    with pytest.raises(DDiTError) as error:
        select_backend("trt", load_manifest(built), machine=l4)
    assert _one_line(error) == (
        f"engines in {built} were built for TensorRT 10.13.0 on sm90 (NVIDIA H100 80GB HBM3); this machine has "
        f"TensorRT 10.13.0 on sm89 (NVIDIA L4): rebuild with ddit-build {built}"
    )


def test_plans_missing_for_a_size(flux_copy):
    build_engines(flux_copy, sizes=[1, 2], target=H100, build_plan=fake_plan, progress=False)
    manifest = load_manifest(flux_copy)
    assert select_backend("trt", manifest, sizes=[1, 2], machine=GPU_MACHINE).name == "trt"
    choice = select_backend("auto", manifest, sizes=[1, 2, 4], machine=GPU_MACHINE)
    assert choice.name == "ort-cuda" and "transformer_k4" in choice.reason
    with pytest.raises(DDiTError, match="no TensorRT engine for transformer_k4"):
        select_backend("trt", manifest, sizes=[1, 4], machine=GPU_MACHINE)


@no_trt
def test_trt_engine_without_tensorrt_is_one_line(built):
    path = component_file(load_manifest(built), "transformer_k1", "trt")
    with pytest.raises(DDiTError) as error:
        make_engine("trt", path, torch.device("cpu"))
    assert _one_line(error).startswith("the trt backend needs TensorRT (pip install 'ddit-toolchain[trt]'")


def test_make_engine_for_ort_cpu_runs_the_graph(tiny_engines):
    manifest = load_manifest(tiny_engines, verify=False)
    engine = make_engine("ort-cpu", component_file(manifest, "text_encoder", "ort-cpu"), torch.device("cpu"))
    assert engine(input_ids=torch.ones(1, manifest.spec.clip_max_length, dtype=torch.int64)).shape == (
        1,
        manifest.spec.pooled_dim,
    )


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("during-run", {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"}),
        ("off", {"session.intra_op.allow_spinning": "0"}),
    ],
)
def test_cpu_sessions_spin_only_during_a_run(tiny_engines, monkeypatch, policy, expected):
    """The default keeps ORT's workers spinning inside a run and stops them when it returns, so the torch ops between
    engine calls get the cores (benchmarks/cpu_spinning.py measures both policies)."""
    import ddit_runtime.engine as engine_module

    assert engine_module.CPU_SPINNING == "during-run"  # the default
    monkeypatch.setattr(engine_module, "CPU_SPINNING", policy)
    manifest = load_manifest(tiny_engines, verify=False)
    engine = make_engine("ort-cpu", component_file(manifest, "text_encoder", "ort-cpu"), torch.device("cpu"))
    options = engine.session.get_session_options()
    assert {key: options.get_session_config_entry(key) for key in expected} == expected


# ---- the TensorRT release and GPU check -------------------------------------------------------------------------


BLOCK = {"version": "10.13.0.35", "compute_capability": "sm90", "gpu": "NVIDIA H100 80GB HBM3"}


@pytest.mark.parametrize("local", ["10.13.0.35", "10.13.0.40", "10.13.0"])
def test_compat_passes_within_one_release(local):
    check_trt_compat(BLOCK, local, "sm90", "engines")


def test_compat_version_mismatch_names_both():
    with pytest.raises(DDiTError) as error:
        check_trt_compat(BLOCK, "10.9.0.34", "sm90", "engines", "NVIDIA H100 PCIe")
    assert _one_line(error) == (
        "engines in engines were built for TensorRT 10.13.0 on sm90 (NVIDIA H100 80GB HBM3); this machine has "
        "TensorRT 10.9.0 on sm90 (NVIDIA H100 PCIe): rebuild with ddit-build engines"
    )


def test_compat_patch_release_mismatch():
    with pytest.raises(DDiTError, match="TensorRT 10.13.0 on sm90 .*this machine has TensorRT 10.13.1 on sm90"):
        check_trt_compat(BLOCK, "10.13.1.2", "sm90", "engines")


def test_compat_cc_mismatch():
    with pytest.raises(DDiTError) as error:
        check_trt_compat(BLOCK, "10.13.0.35", "sm89", "/srv/engines")
    line = _one_line(error)
    assert "on sm90 (NVIDIA H100 80GB HBM3); this machine has TensorRT 10.13.0 on sm89" in line
    assert line.endswith("rebuild with ddit-build /srv/engines")


def test_compat_without_tensorrt_or_gpu_here():
    with pytest.raises(DDiTError, match="this machine has no TensorRT on no CUDA GPU"):
        check_trt_compat(BLOCK, None, None, "engines")


@pytest.mark.parametrize("block", [None, {}])
def test_compat_missing_block(block):
    with pytest.raises(DDiTError) as error:
        check_trt_compat(block, "10.13.0.35", "sm90", "engines")
    assert _one_line(error) == "engines folder 'engines' has no TensorRT engines: build them with ddit-build engines"


# ---- plan names -------------------------------------------------------------------------------------------------


def test_plan_names():
    assert plan_name("transformer_k2.onnx", "10.13.0.35", "sm90") == "transformer_k2.trt10.13.sm90.plan"
    assert plan_name("vae_decoder_step.onnx", "10.9.0", "sm89") == "vae_decoder_step.trt10.9.sm89.plan"
    assert plan_name("text_encoder_2.onnx", "11.0.1", "sm100") == "text_encoder_2.trt11.0.sm100.plan"
    assert [compute_capability(*cc) for cc in [(9, 0), (8, 9), (10, 0), (12, 0)]] == ["sm90", "sm89", "sm100", "sm120"]


# ---- optimisation profiles against the graphs --------------------------------------------------------------------


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _bind(dim, size: int, symbols: dict) -> None:
    """Check one graph dim against a profile size: a static dim must equal it; ``s`` or ``N*s`` binds symbol ``s``
    (consistently across every input at that point)."""
    if isinstance(dim, int):
        assert size == dim, (dim, size)
        return
    factor, _, name = dim.rpartition("*")
    assert name.isidentifier() and (not factor or factor.isdigit()), f"unexpected input dim {dim!r}"
    factor = int(factor or 1)
    assert size % factor == 0, (dim, size)
    assert symbols.setdefault(name, size // factor) == size // factor, (dim, size, symbols)


def _check_against_graph(folder, data, key) -> dict:
    """The profile of ``key`` names exactly the graph's inputs, agrees with every static and symbolic dim at min,
    opt and max, and is ordered min <= opt <= max; returns it."""
    profile = input_profile(data, key)
    graph = onnx.load(str(folder / graphs(data)[key].onnx), load_external_data=False).graph
    inputs = {v.name: _dims(v) for v in graph.input}
    assert list(profile) == list(inputs), key
    for point in range(3):
        symbols: dict = {}
        for name, dims in inputs.items():
            shape = profile[name][point]
            assert len(shape) == len(dims), (key, name)
            for dim, size in zip(dims, shape, strict=True):
                _bind(dim, size, symbols)
    for low, opt, high in profile.values():
        assert all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True))
    return profile


def _feeds(session, profile: dict, shape_of) -> dict:
    gen = np.random.default_rng(0)
    types = {i.name: i.type for i in session.get_inputs()}
    return {
        name: np.ones(shape_of(r), np.int64) if "int64" in types[name] else gen.standard_normal(shape_of(r), np.float32)
        for name, r in profile.items()
    }


def _run_at_extremes(folder, data, key, profile: dict) -> None:
    """ONNX Runtime runs the graph at the profile's min shapes, at its max spatial/frame shapes (batch at its min),
    and at its max batch (the rest at min): every dynamic dim at both ends, without the costly full-max product."""
    session = ort.InferenceSession(str(folder / graphs(data)[key].onnx), providers=["CPUExecutionProvider"])
    points = [
        lambda r: r[0],
        lambda r: (r[0][0], *r[2][1:]),
        lambda r: (r[2][0], *r[0][1:]),
    ]
    for shape_of in points:
        feeds = _feeds(session, profile, shape_of)
        outputs = session.run(None, feeds)
        batch = next(iter(feeds.values())).shape[0]
        assert all(o.shape[0] == batch and np.isfinite(o).all() for o in outputs), key
        if "latent" in feeds and key.startswith(("transformer", "teacache")):
            velocity = outputs[[o.name for o in session.get_outputs()].index("velocity")]
            assert velocity.shape == feeds["latent"].shape


def test_flux_profiles_match_the_spec_and_the_graphs(tiny_engines):
    data = load_manifest(tiny_engines, verify=False).data
    keys = list(graphs(data))
    assert keys[:2] == ["transformer_k1", "teacache_k1"]
    assert keys[-3:] == ["text_encoder", "text_encoder_2", "vae_decoder"]
    profiles = {key: _check_against_graph(tiny_engines, data, key) for key in keys}
    # flux-tiny: 128..512 px (opt 256) -> latent 16..64 (opt 32); batch 1..4; every size tiles these exactly.
    for k in (1, 2, 4):
        assert profiles[f"transformer_k{k}"]["latent"] == ((1, 16, 16, 16), (1, 16, 32, 32), (4, 16, 64, 64))
        rows = [(b, latent // (2 * k)) for b, latent in ((1, 16), (1, 32), (4, 64))]  # token grid, 128 wide
        assert profiles[f"teacache_k{k}"]["residual"] == tuple((b, r, r, 128) for b, r in rows)
    assert profiles["transformer_k1"]["encoder_hidden_states"] == ((1, 32, 64), (1, 32, 64), (4, 32, 64))
    assert profiles["text_encoder"]["input_ids"] == ((1, 77), (1, 77), (4, 77))
    assert profiles["vae_decoder"]["latent"] == ((1, 16, 16, 16), (1, 16, 32, 32), (4, 16, 64, 64))
    for key, profile in profiles.items():
        _run_at_extremes(tiny_engines, data, key, profile)


def test_wan_profiles_match_the_spec_and_the_graphs(wan_engines):
    data = load_manifest(wan_engines, verify=False).data
    keys = list(graphs(data))
    assert keys[-3:] == ["text_encoder", "vae_decoder", "vae_decoder_step"]
    profiles = {key: _check_against_graph(wan_engines, data, key) for key in keys}
    # wan-tiny: 128..512 px (opt 256), 5..17 frames (opt 9) -> 2..5 latent frames (opt 3); CFG batch 2 at opt.
    for k in (1, 2, 4):
        latent = profiles[f"transformer_k{k}"]["latent"]
        assert latent == ((1, 16, 2, 16, 16), (2, 16, 3, 32, 32), (4, 16, 5, 64, 64))
    assert profiles["text_encoder"]["attention_mask"] == ((1, 32), (1, 32), (4, 32))
    assert profiles["vae_decoder"]["latent"] == ((1, 16, 1, 16, 16), (1, 16, 1, 32, 32), (4, 16, 1, 64, 64))
    caches = [n for n in profiles["vae_decoder_step"] if n.startswith("cache_in_")]
    assert caches == data["components"]["vae_decoder"]["cache_inputs"]
    for key, profile in profiles.items():
        _run_at_extremes(wan_engines, data, key, profile)


# ---- ddit-build's bookkeeping (a stand-in builder; TensorRT's own build runs in test_trt_gpu) ----------------------


def test_build_records_every_plan_and_keeps_the_onnx(built):
    manifest = load_manifest(built)  # still valid, sha256 of every ONNX file included
    block = manifest.data["tensorrt"]
    assert (block["version"], block["compute_capability"], block["gpu"]) == (H100.version, H100.cc, H100.gpu)
    assert list(block["plans"]) == list(graphs(manifest.data))
    for key, entry in block["plans"].items():
        assert entry["plan"] == plan_name(entry["onnx"], H100.version, H100.cc)
        assert sha256_file(built / entry["plan"]) == entry["sha256"]
        assert (built / entry["plan"]).stat().st_size == entry["bytes"]
        assert entry["onnx_sha256"] == manifest.data["files"][entry["onnx"]]["sha256"]
        assert entry["settings"]["profile"] == json.loads(json.dumps(input_profile(manifest.data, key)))
        assert entry["settings"]["strongly_typed"] is True and entry["settings"]["precision"] == "fp32"
        assert (built / entry["onnx"]).is_file()
    assert not [p.name for p in built.iterdir() if ".partial-" in p.name]


def test_build_again_keeps_plans_and_rebuilds_on_change(built):
    calls = []

    def counting(onnx_path, plan_path, profile, opt_level, timing_cache):
        calls.append(onnx_path.name)
        fake_plan(onnx_path, plan_path, profile, opt_level, timing_cache)

    build_engines(built, target=H100, build_plan=counting, progress=False)
    assert calls == []
    build_engines(built, target=H100, build_plan=counting, progress=False, opt_level=5)
    assert len(calls) == len(graphs(load_manifest(built).data))


def test_build_for_another_release_replaces_the_old_plans(built):
    old = {e["plan"] for e in load_manifest(built).data["tensorrt"]["plans"].values()}
    newer = TrtTarget("10.14.1.48", "sm90", H100.gpu)
    block = build_engines(built, sizes=[1], target=newer, build_plan=fake_plan, progress=False)
    assert {"transformer_k1", "text_encoder", "vae_decoder"} <= set(block["plans"])
    assert "transformer_k2" not in block["plans"]
    assert all(".trt10.14.sm90." in e["plan"] for e in block["plans"].values())
    assert not [name for name in old if (built / name).exists()]


def test_failed_build_leaves_the_manifest_alone(flux_copy):
    before = (flux_copy / "manifest.json").read_text()

    def failing(onnx_path, plan_path, profile, opt_level, timing_cache):
        plan_path.write_bytes(b"half a plan")
        if onnx_path.name == "transformer_k2.onnx":
            raise DDiTError("TensorRT could not build transformer_k2.onnx: out of memory")

    with pytest.raises(DDiTError, match="transformer_k2"):
        build_engines(flux_copy, target=H100, build_plan=failing, progress=False)
    assert (flux_copy / "manifest.json").read_text() == before
    assert not [p.name for p in flux_copy.iterdir() if ".partial-" in p.name]


def test_build_refuses_sizes_not_exported(flux_copy):
    with pytest.raises(DDiTError, match="patch size 8 was not exported"):
        build_engines(flux_copy, sizes=[1, 8], target=H100, build_plan=fake_plan, progress=False)


def test_plan_file_checks(built):
    manifest = load_manifest(built)
    path = component_file(manifest, "transformer_k2", "trt")
    assert path == built / plan_name("transformer_k2.onnx", H100.version, H100.cc)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DDiTError, match="does not match its sha256 in the manifest: rebuild it with ddit-build"):
        component_file(manifest, "transformer_k2", "trt")
    assert component_file(manifest, "transformer_k2", "trt", verify=False) == path
    path.unlink()
    with pytest.raises(DDiTError, match="missing or has the wrong size"):
        component_file(manifest, "transformer_k2", "trt", verify=False)
    assert component_file(manifest, "transformer_k2", "ort-cpu") == built / "transformer_k2.onnx"


# ---- weight memory ----------------------------------------------------------------------------------------------


def _on_disk(folder, stems) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.split(".")[0] in stems)


def test_resident_bytes_are_the_loaded_files(tiny_engines):
    manifest = load_manifest(tiny_engines, verify=False)
    common = {"text_encoder", "text_encoder_2", "vae_decoder"}
    every = {"transformer_k1", "transformer_k2", "transformer_k4"} | common
    assert resident_weight_bytes(manifest, (1, 2, 4), "ort-cpu") == _on_disk(tiny_engines, every)
    assert resident_weight_bytes(manifest, (1,), "ort-cuda") == _on_disk(tiny_engines, {"transformer_k1"} | common)
    with_probes = every | {"teacache_k1", "teacache_k2", "teacache_k4"}
    assert resident_weight_bytes(manifest, (1, 2, 4), "ort-cpu", teacache=True) == _on_disk(tiny_engines, with_probes)


def test_resident_bytes_of_plans(built):
    manifest = load_manifest(built)
    stems = {"transformer_k1", "transformer_k4", "text_encoder", "text_encoder_2", "vae_decoder"}
    expected = sum(p.stat().st_size for p in built.glob("*.plan") if p.name.split(".")[0] in stems)
    assert resident_weight_bytes(manifest, (1, 4), "trt") == expected


def test_check_fits_refuses_with_one_line():
    check_fits(40 * 2**30, 40 * 2**30, "sizes 1,2,4")
    with pytest.raises(DDiTError) as error:
        check_fits(int(48.3 * 2**30), int(40.1 * 2**30), "sizes 1,2,4")
    assert _one_line(error) == (
        "the engines need 48.3 GiB of weights for sizes 1,2,4 but the GPU has 40.1 GiB free: load fewer sizes with "
        "--sizes, or use a device with more memory"
    )
    with pytest.raises(DDiTError, match="need 12.5 MiB of weights for sizes 1 but this machine has 3.0 MiB free"):
        check_fits(int(12.5 * 2**20), 3 * 2**20, "sizes 1", where="this machine")


def test_describe_resident_and_free_memory(tiny_engines):
    manifest = load_manifest(tiny_engines, verify=False)
    line = describe_resident(manifest, (1, 2), "ort-cpu")
    total = resident_weight_bytes(manifest, (1, 2), "ort-cpu")
    assert line.startswith(f"resident weights {total / 2**20:.1f} MiB on ort-cpu: transformer_k1 ")
    assert "transformer_k2" in line and "transformer_k4" not in line and "vae_decoder" in line
    assert free_memory_bytes(torch.device("cpu")) > 0


# ---- the runtimes on a backend: EngineSet, --backend ------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "provider", "expected"),
    [(None, None, "auto"), ("trt", None, "trt"), (None, "cpu", "ort-cpu"), (None, "cuda", "ort-cuda")],
)
def test_backend_from_provider(backend, provider, expected):
    assert backend_from_provider(backend, provider) == expected


def test_backend_and_provider_together_is_one_line():
    with pytest.raises(DDiTError) as e:
        backend_from_provider("ort-cpu", "cpu")
    assert "not both" in _one_line(e)
    with pytest.raises(DDiTError) as e:
        backend_from_provider(None, "rocm")
    assert "rocm" in _one_line(e)


def test_engine_set_opens_every_graph_on_ort_cpu(tiny_engines):
    manifest = load_manifest(tiny_engines, verify=False)
    engines = EngineSet(manifest, "ort-cpu", sizes=(1, 4))
    assert engines.backend == Backend("ort-cpu", "requested") and engines.device.type == "cpu"
    assert engines.shared is None and engines.resident == describe_resident(manifest, (1, 4), "ort-cpu")
    for key in ("transformer_k1", "transformer_k4", "teacache_k4", "text_encoder", "text_encoder_2", "vae_decoder"):
        engine = engines.open(key)
        assert engine.session._model_path.endswith(graphs(manifest.data)[key].onnx)


def test_engine_set_refuses_weights_that_do_not_fit(tiny_engines, monkeypatch):
    import ddit_runtime.backends as backends

    monkeypatch.setattr(backends, "free_memory_bytes", lambda device: 1024)
    with pytest.raises(DDiTError) as e:
        EngineSet(load_manifest(tiny_engines, verify=False), "ort-cpu", sizes=(1, 2))
    text = _one_line(e)
    assert "for sizes 1,2 but this machine has 0.0 MiB free" in text, text
    assert "--sizes" in text


@no_cuda
def test_runtime_backend_auto_on_the_cpu_says_why(tiny_engines):
    runtime = FluxRuntime(tiny_engines, verify=False, sizes=(1,))
    assert runtime.backend == Backend("ort-cpu", "no CUDA device") and runtime.device.type == "cpu"
    assert FluxRuntime(tiny_engines, provider="cpu", verify=False, sizes=(1,)).backend.name == "ort-cpu"


def test_runtime_backends_agree_on_the_cpu(tiny_engines):
    """``--backend ort-cpu`` and the older ``--provider cpu`` load the same graphs: identical images."""
    a = FluxRuntime(tiny_engines, backend="ort-cpu", verify=False).generate("a red circle", steps=3, progress=False)
    b = FluxRuntime(tiny_engines, provider="cpu", verify=False).generate("a red circle", steps=3, progress=False)
    assert torch.equal(a.image, b.image)


@no_cuda
@pytest.mark.parametrize("backend", ["trt", "ort-cuda"])
def test_ddit_run_gpu_backend_without_a_gpu_is_one_line(tiny_engines, tmp_path, backend):
    out = tmp_path / "x.png"
    args = [str(tiny_engines), "--prompt", "a red circle", "--backend", backend, "-o", str(out)]
    result = CliRunner().invoke(run_main, args)
    assert result.exit_code == 2, (result.output, result.exception)
    line = result.stderr.strip()
    assert line.startswith(f"error: --backend {backend} needs ") and "\n" not in line, line
    assert not out.exists()


def test_ddit_run_says_which_backend(tiny_engines, tmp_path):
    out = tmp_path / "x.png"
    args = [str(tiny_engines), "--prompt", "a red circle", "--backend", "ort-cpu", "--steps", "2", "-o", str(out)]
    result = CliRunner().invoke(run_main, args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "backend: ort-cpu (requested); resident weights " in result.stderr and out.is_file()
    json_run = CliRunner().invoke(run_main, [*args, "--json", "--provider", "cpu"])
    assert json_run.exit_code == 2 and "not both" in json_run.stderr


# ---- ddit-build without TensorRT, and the import boundary ------------------------------------------------------


@no_trt
def test_ddit_build_without_tensorrt_prints_one_line(tiny_engines):
    before = (tiny_engines / "manifest.json").read_text()
    result = CliRunner().invoke(build_main, [str(tiny_engines), "--opt-level", "3"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.strip() == (
        "error: ddit-build needs TensorRT (pip install 'ddit-toolchain[trt]' on a machine with an NVIDIA GPU and "
        "TensorRT 10)"
    )
    assert (tiny_engines / "manifest.json").read_text() == before


def test_ddit_build_refuses_a_bad_opt_level(tiny_engines):
    result = CliRunner().invoke(build_main, [str(tiny_engines), "--opt-level", "9"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_backends_import_no_exporter_and_no_tensorrt():
    code = (
        "import sys, ddit_runtime.backends, ddit_runtime.engine; "
        "bad=[m for m in sys.modules if m.split('.')[0] in "
        "('ddit_export','diffusers','transformers','peft','tensorrt','polygraphy')]; print(bad); assert not bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@no_trt
def test_ddit_export_trt_without_tensorrt_fails_before_exporting(tmp_path):
    from ddit_cli import export_main

    out = tmp_path / "engines"
    result = CliRunner().invoke(export_main, ["flux", "--sizes", "1", "--trt", "-o", str(out), "--quiet"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.strip().startswith("error: ddit-build needs TensorRT") and not out.exists()
    bad = CliRunner().invoke(export_main, ["flux", "--sizes", "1", "--opt-level", "3", "-o", str(out)])
    assert bad.exit_code == 2 and "add --trt" in bad.stderr and not out.exists()
