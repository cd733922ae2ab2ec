"""``ddit-export --precision fp8``: FP8 E4M3 Q/DQ on the blocks' Linear layers, calibrated, run by ONNX Runtime."""

import onnx
import pytest
import torch
from click.testing import CliRunner

from ddit_cli import export_main
from ddit_export.flux_export import export_flux
from ddit_export.flux_model import FluxEngine
from ddit_export.fp8 import E4M3_MAX, calibrate, linears_in_scope, quantize_graph
from ddit_export.onnx_io import TypedGraph, export_checked, export_onnx, ort_session
from ddit_export.trt_build import TrtTarget, _precision, check_fp8_target
from ddit_profiles import DDiTError
from ddit_runtime.manifest import load_manifest
from ddit_runtime.pipeline import FluxRuntime

PROMPT = "a red circle on a black background"


@pytest.fixture(scope="module")
def fp8_engines(tmp_path_factory, tiny_spec):
    out = tmp_path_factory.mktemp("fp8") / "engines"
    export_flux("tiny", tiny_spec, [1, 2], out, adapters_path="none", progress=False, precision="fp8")
    return out


def _ops(path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    out: dict[str, int] = {}
    for node in model.graph.node:
        out[node.op_type] = out.get(node.op_type, 0) + 1
    return out


def _fake_quant(x: torch.Tensor, amax: float) -> torch.Tensor:
    """E4M3 quantise-dequantise as the graph does it: per-tensor scale amax / 448, saturating."""
    scale = torch.tensor(amax / E4M3_MAX, dtype=torch.float16).float()
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale


def test_fp8_export_quantises_every_block_linear_and_nothing_else(fp8_engines, tiny_spec):
    from ddit_export.loading import load_flux

    data = load_manifest(fp8_engines, verify=True).data
    assert data["precision"] == "fp8"
    engine = FluxEngine(load_flux("tiny", tiny_spec)["transformer"], tiny_spec, 1)
    expected = linears_in_scope(engine, tiny_spec.fp8_scope)
    assert any("norm1.linear" in n for n in expected) and not any("x_embedder" in n for n in expected)
    for k in ("1", "2"):
        comp = data["components"]["transformer"][k]
        assert comp["precision"] == "fp8" and comp["teacache"]["precision"] == "fp16"
        assert comp["fp8"]["layers"] == comp["fp8"]["weights"] == len(expected)
        path = fp8_engines / comp["onnx"]
        model = onnx.load(str(path))
        fp8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
        assert len(fp8) == len(expected) + 1  # every weight, and the shared zero point
        assert not any(
            "transformer_blocks" in t.name and t.data_type == onnx.TensorProto.FLOAT16
            for t in model.graph.initializer
            if t.name.endswith(".weight")
        )
        ops = _ops(path)
        assert ops["QuantizeLinear"] == comp["fp8"]["activation_scales"]
        assert ops["DequantizeLinear"] == comp["fp8"]["activation_scales"] + len(expected)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
        io = {v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
        assert io == {onnx.TensorProto.FLOAT}  # one I/O contract for every engine


def test_fp8_graph_is_near_float32_and_really_quantised(fp8_engines, tiny_engines, tiny_spec):
    g = torch.Generator().manual_seed(3)
    lh, lw = tiny_spec.latent_hw(*tiny_spec.opt_size)
    feeds = {
        "latent": torch.randn(1, 16, lh, lw, generator=g).numpy(),
        "timestep": torch.full((1,), 0.6).numpy(),
        "guidance": torch.full((1,), 3.5).numpy(),
        "encoder_hidden_states": torch.randn(1, tiny_spec.t5_max_length, tiny_spec.joint_attention_dim, generator=g)
        .mul(0.3)
        .numpy(),
        "pooled_projections": torch.randn(1, tiny_spec.pooled_dim, generator=g).mul(0.3).numpy(),
    }
    full = torch.from_numpy(ort_session(tiny_engines / "transformer_k2.onnx").run(None, feeds)[0])
    fp8 = torch.from_numpy(ort_session(fp8_engines / "transformer_k2.onnx").run(None, feeds)[0])
    rel = ((fp8 - full).norm() / full.norm()).item()
    assert 2e-3 < rel < 0.15, rel  # fp16 alone is ~1e-3 off; E4M3 (3 mantissa bits) adds a few percent


def test_fp8_manifest_carries_the_fp8_tau(fp8_engines, tiny_spec):
    manifest = load_manifest(fp8_engines, verify=True)
    assert tiny_spec.fp8_tau is not None and tiny_spec.fp8_tau != tiny_spec.scheduler.tau
    assert manifest.data["scheduler"]["tau"] == tiny_spec.fp8_tau
    assert manifest.spec.scheduler.tau == tiny_spec.fp8_tau  # what the runtime's DDiT default reads


def test_runtime_runs_fp8_engines_like_the_float32_ones(fp8_engines, tiny_engines):
    schedule = [1, 2, 2, 1]
    fp8 = FluxRuntime(fp8_engines, provider="cpu").generate(PROMPT, steps=4, seed=0, schedule=schedule, progress=False)
    full = FluxRuntime(tiny_engines, provider="cpu").generate(
        PROMPT, steps=4, seed=0, schedule=schedule, progress=False
    )
    assert fp8.schedule == full.schedule == schedule
    diff = (fp8.image.float() - full.image.float()).abs().mean()
    assert 0 < diff < 6.0, diff  # of 255


def test_quantize_graph_matches_a_torch_fake_quant_reference_with_external_data(tmp_path):
    """Two Linear layers (fp16 graph) rewritten with weights in external data: ONNX Runtime's output equals
    torch's E4M3 quantise-dequantise of activations and weights, within fp16 rounding."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
    x = torch.randn(4, 32) * 2
    amax = calibrate(net, [(x,)], r"^\d+$")
    assert set(amax) == {"0", "2"} and amax["0"] == pytest.approx(x.abs().max().item())
    path = tmp_path / "net.onnx"
    dynamic = (({0: torch.export.Dim("b")},),)  # TypedGraph takes *args: dynamic shapes by position
    export_onnx(TypedGraph(net, "fp16").eval(), (x,), ("x",), ("y",), dynamic, path, 18, keep_metadata=True)
    block = quantize_graph(path, amax, external_bytes=0)
    assert block["layers"] == block["weights"] == 2 and block["activation_scales"] == 2
    assert (tmp_path / "net.onnx.data").is_file()
    graph = onnx.load(str(path), load_external_data=False).graph
    assert block["metadata_props_removed"] > 0  # the exporter's scopes were read, then dropped
    assert not [p.key for n in graph.node for p in n.metadata_props if p.key.startswith("pkg.torch.")]
    got = torch.from_numpy(ort_session(path).run(None, {"x": x.numpy()})[0])
    with torch.no_grad():
        h = _fake_quant(x, amax["0"]) @ _fake_quant(net[0].weight, net[0].weight.abs().max().item()).T + net[0].bias
        h = torch.nn.functional.gelu(h)
        ref = _fake_quant(h, amax["2"]) @ _fake_quant(net[2].weight, net[2].weight.abs().max().item()).T + net[2].bias
    assert (got - ref).abs().max() < 0.05 * ref.abs().max(), (got - ref).abs().max()
    assert (got - net(x)).abs().max() > (got - ref).abs().max()  # nearer the fp8 reference than float32


def test_calibration_that_matches_nothing_and_layers_missing_from_the_graph_are_errors(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    with pytest.raises(DDiTError, match="fp8_scope"):
        calibrate(net, [(torch.randn(2, 8),)], r"transformer_blocks")
    path = tmp_path / "net.onnx"
    export_onnx(
        TypedGraph(net, "fp16").eval(), (torch.randn(2, 8),), ("x",), ("y",), None, path, 18, keep_metadata=True
    )
    with pytest.raises(DDiTError, match="not found"):
        quantize_graph(path, {"0": 1.0, "blocks.9.ff": 1.0}, external_bytes=1 << 30)


def test_fp8_export_without_calibration_is_refused_before_exporting(tmp_path, tiny_spec):
    path = tmp_path / "net.onnx"
    net = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    with pytest.raises(DDiTError, match="calibrated activation ranges"):
        export_checked(net, (torch.randn(2, 8),), (("x",), ("y",), {}), path, tiny_spec, "net", [], "fp8")
    assert not path.exists()


def test_fp8_for_wan_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "e"
    result = CliRunner().invoke(export_main, ["wan", "--precision", "fp8", "-o", str(out), "--quiet"])
    assert result.exit_code == 2 and "FLUX only" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_tensorrt_refuses_fp8_on_a_gpu_without_fp8_and_builds_probes_in_fp16():
    data = {"precision": "fp8"}
    assert _precision(data, "transformer_k2") == "fp8" and _precision(data, "teacache_k2") == "fp16"
    assert _precision(data, "vae_decoder") == "fp32"
    for cc in ("sm89", "sm90", "sm100"):
        check_fp8_target(data, TrtTarget("10.13.0.35", cc, "GPU"))
    with pytest.raises(DDiTError, match="no FP8 tensor cores"):
        check_fp8_target(data, TrtTarget("10.13.0.35", "sm86", "NVIDIA A10"))
    check_fp8_target({"precision": "fp16"}, TrtTarget("10.13.0.35", "sm75", "T4"))
