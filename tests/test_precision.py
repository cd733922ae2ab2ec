"""``ddit-export --precision``: transformer graphs typed in fp16 / bf16 behind float32 I/O, checked against float32
torch (fp16) and recorded as unchecked where ONNX Runtime's CPU provider cannot run them (bf16)."""

import json

import onnx
import pytest
import torch
from click.testing import CliRunner

from ddit_cli import export_main
from ddit_export.flux_export import export_flux
from ddit_export.onnx_io import TypedGraph, ort_session
from ddit_export.trt_build import _precision
from ddit_runtime.manifest import load_manifest
from ddit_runtime.pipeline import FluxRuntime

PROMPT = "a red circle on a black background"


def _initializer_bytes(path) -> dict[int, int]:
    """Bytes of the graph's initializers by ONNX element type (external data included)."""
    model = onnx.load(str(path))
    out: dict[int, int] = {}
    for t in model.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        size = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2}.get(
            t.data_type, 0
        )
        out[t.data_type] = out.get(t.data_type, 0) + n * size
    return out


def _io_types(path) -> set[int]:
    model = onnx.load(str(path), load_external_data=False)
    return {v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}


def _feeds(spec, seed=5):
    g = torch.Generator().manual_seed(seed)
    lh, lw = spec.latent_hw(*spec.min_size)
    return {
        "latent": torch.randn(1, 16, lh, lw, generator=g).numpy(),
        "timestep": torch.rand(1, generator=g).numpy(),
        "guidance": torch.full((1,), 3.5).numpy(),
        "encoder_hidden_states": torch.randn(1, spec.t5_max_length, spec.joint_attention_dim, generator=g).numpy(),
        "pooled_projections": torch.randn(1, spec.pooled_dim, generator=g).numpy(),
    }


@pytest.fixture(scope="module")
def fp16_engines(tmp_path_factory, tiny_spec):
    out = tmp_path_factory.mktemp("fp16") / "engines"
    export_flux("tiny", tiny_spec, [1, 2], out, adapters_path="none", progress=False, precision="fp16")
    return out


def test_typed_graph_casts_a_copy_and_keeps_float32_io():
    lin = torch.nn.Linear(4, 4)
    before = lin.weight.detach().clone()
    typed = TypedGraph(lin, "fp16")
    assert lin.weight.dtype == torch.float32 and torch.equal(lin.weight, before)  # the original is untouched
    assert typed.module.weight.dtype == torch.float16
    x = torch.randn(2, 4)
    y = typed(x)
    assert y.dtype == torch.float32
    assert 0 < (y - lin(x)).abs().max() < 1e-2  # really computed in half precision, and close
    kept = TypedGraph(torch.nn.Sequential(lin, torch.nn.LayerNorm(4)), "bf16", keep=(torch.nn.LayerNorm,))
    assert kept.module[0].weight.dtype == torch.bfloat16 and kept.module[1].weight.dtype == torch.float32


def test_fp16_export_types_the_transformers_and_stays_close_to_float32(fp16_engines, tiny_engines, tiny_spec):
    data = load_manifest(fp16_engines, verify=True).data
    assert data["precision"] == "fp16"
    bound = tiny_spec.fp16_tolerance.bound(1.0)
    for k in ("1", "2"):
        comp = data["components"]["transformer"][k]
        assert comp["precision"] == "fp16" and comp["teacache"]["precision"] == "fp16"
        assert comp["max_abs_error"] is not None and comp["max_abs_error"] <= bound * 10  # scaled by |velocity|
        for name in (comp["onnx"], comp["teacache"]["onnx"]):
            sizes = _initializer_bytes(fp16_engines / name)
            # the weights are half precision; what stays float32 is the RoPE table and a few scalars
            assert sizes[onnx.TensorProto.FLOAT16] > 50 * sizes.get(onnx.TensorProto.FLOAT, 0), sizes
            assert _io_types(fp16_engines / name) == {onnx.TensorProto.FLOAT}  # one I/O contract for every engine
    for name in ("text_encoder", "text_encoder_2", "vae_decoder"):
        sizes = _initializer_bytes(fp16_engines / data["components"][name]["onnx"])
        assert onnx.TensorProto.FLOAT16 not in sizes  # the encoders and the VAE stay float32
    feeds = _feeds(tiny_spec)
    half = ort_session(fp16_engines / "transformer_k2.onnx").run(None, feeds)[0]
    full = ort_session(tiny_engines / "transformer_k2.onnx").run(None, feeds)[0]
    diff = abs(half - full).max()
    assert 0 < diff <= tiny_spec.fp16_tolerance.bound(float(abs(full).max())), diff


def test_runtime_runs_fp16_engines_like_the_float32_ones(fp16_engines, tiny_engines):
    """The runtime needs no change for typed engines (float32 I/O): the same seed gives nearly the same image."""
    schedule = [1, 2, 2, 1]
    half = FluxRuntime(fp16_engines, provider="cpu").generate(
        PROMPT, steps=4, seed=0, schedule=schedule, progress=False
    )
    full = FluxRuntime(tiny_engines, provider="cpu").generate(
        PROMPT, steps=4, seed=0, schedule=schedule, progress=False
    )
    assert half.schedule == full.schedule == schedule
    assert (half.image.float() - full.image.float()).abs().mean() < 2.0  # of 255


def test_bf16_export_is_typed_and_says_its_check_is_left_to_a_gpu(tmp_path, tiny_spec):
    out = tmp_path / "engines"
    result = CliRunner().invoke(
        export_main, ["flux", "--sizes", "1", "--adapters", "none", "--precision", "bf16", "-o", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert "bf16 transformers" in result.output and "no bfloat16 kernels" in result.output
    assert "Loading weights" not in result.output  # --quiet hushes transformers' and diffusers' bars too
    data = json.loads((out / "manifest.json").read_text())
    comp = data["components"]["transformer"]["1"]
    assert data["precision"] == "bf16" and comp["precision"] == "bf16"
    assert comp["max_abs_error"] is None and "GPU" in comp["parity"]
    sizes = _initializer_bytes(out / comp["onnx"])
    assert sizes[onnx.TensorProto.BFLOAT16] > 50 * sizes.get(onnx.TensorProto.FLOAT, 0), sizes
    assert _io_types(out / comp["onnx"]) == {onnx.TensorProto.FLOAT}


def test_unknown_precision_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(export_main, ["flux", "--precision", "int4", "-o", str(tmp_path / "e")])
    assert result.exit_code == 2 and "int4" in result.output and "fp16" in result.output
    assert not (tmp_path / "e").exists()


def test_tensorrt_settings_record_each_graph_s_own_type():
    data = {"precision": "fp16"}
    assert _precision(data, "transformer_k2") == "fp16" and _precision(data, "teacache_k4") == "fp16"
    assert _precision(data, "text_encoder_2") == "fp32" and _precision(data, "vae_decoder_step") == "fp32"
    assert _precision({}, "transformer_k1") == "fp32"  # manifests written before --precision


def test_wan_fp16_transformer_export_is_checked(tmp_path, wan_parts, wan_spec):
    """Wan's engine, with its RoPE kept in float32, typed in fp16 and checked by ONNX Runtime against float32."""
    from ddit_export.adapters import resolve_adapters
    from ddit_export.wan_export import _export_transformer

    adapters = resolve_adapters("tiny", "none", wan_parts["transformer"], wan_spec, [2])[0]
    entry = _export_transformer(wan_parts, wan_spec, adapters, 2, tmp_path, "fp16")
    assert entry["precision"] == "fp16" and entry["max_abs_error"] is not None
    assert entry["teacache"]["max_abs_error"] is not None
    sizes = _initializer_bytes(tmp_path / entry["onnx"])
    assert sizes[onnx.TensorProto.FLOAT16] > 10 * sizes.get(onnx.TensorProto.FLOAT, 0), sizes
    assert next(iter(wan_parts["transformer"].parameters())).dtype == torch.float32  # the base stays float32
