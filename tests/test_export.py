"""Exported engines folders: manifest, parity, no float64, trained adapters, from_pretrained, and failure hygiene."""

import json

import onnx
import pytest
import torch
from conftest import ort_optimised_ops, random_adapters
from onnx import TensorProto, helper

from ddit_export import flux_export, onnx_io
from ddit_export.flux_export import export_flux
from ddit_export.flux_model import FluxEngine, size_variant
from ddit_export.loading import load_flux, with_vae_normalisation
from ddit_export.onnx_io import double_tensors, export_onnx, ort_session
from ddit_export.tiny import save_components
from ddit_profiles import DDiTError
from ddit_runtime.manifest import load_manifest


def _feeds(spec, batch=1, height=128, width=320, seed=3):
    g = torch.Generator().manual_seed(seed)
    lh, lw = spec.latent_hw(height, width)
    return dict(
        latent=torch.randn(batch, 16, lh, lw, generator=g),
        timestep=torch.rand(batch, generator=g),
        guidance=torch.full((batch,), 3.5),
        encoder_hidden_states=torch.randn(batch, spec.t5_max_length, spec.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, spec.pooled_dim, generator=g),
    )


def _run(path, feeds):
    return torch.from_numpy(ort_session(path).run(None, {k: v.numpy() for k, v in feeds.items()})[0])


def test_manifest_records_checked_components(tiny_engines, tiny_spec, tiny_parts):
    m = load_manifest(tiny_engines, verify=True)
    assert m.sizes == (1, 2, 4) and m.spec == with_vae_normalisation(tiny_spec, tiny_parts["vae"])
    data = m.data
    assert data["source"]["adapters_trained"] is False and "untrained" in data["source"]["initialisation"]
    for k in ("1", "2", "4"):
        comp = data["components"]["transformer"][k]
        assert comp["max_abs_error"] <= tiny_spec.transformer_tolerance.bound(1.0)
        assert (tiny_engines / comp["onnx"]).name in data["files"]
    for name in ("text_encoder", "text_encoder_2", "vae_decoder"):
        assert data["components"][name]["max_abs_error"] < 1e-3
    assert data["shapes"]["multiple"] == 64 and data["latent"]["scaling_factor"] == m.spec.vae_scaling_factor
    assert set(data["io"]["transformer"]["inputs"]) == set(tiny_spec.transformer_inputs)


def test_runtime_decodes_with_the_vae_s_own_latent_normalisation(tiny_engines, tiny_parts):
    """The shipped VAE measured its own scaling/shift factors (not FLUX.1's 0.3611 / 0.1159), and the transformer
    learned latents normalised with them. An image encoded that way must come back in its colours from the runtime's
    decode, which reads the factors from the manifest. (With FLUX.1's factors cyan came back green.)"""
    from ddit_runtime.pipeline import FluxRuntime

    vae = tiny_parts["vae"]
    latent_block = json.loads((tiny_engines / "manifest.json").read_text())["latent"]
    assert latent_block["scaling_factor"] == pytest.approx(vae.config.scaling_factor)
    assert latent_block["shift_factor"] == pytest.approx(vae.config.shift_factor)
    image = torch.zeros(3, 256, 256, dtype=torch.uint8)
    image[1:] = 255  # cyan background
    image[:, 96:160, 96:160] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)  # a red square
    with torch.no_grad():
        z = vae.encode(image[None].float() / 127.5 - 1).latent_dist.mean
    latent = (z - vae.config.shift_factor) * vae.config.scaling_factor
    decoded = FluxRuntime(tiny_engines).decode(latent).float()
    error = (decoded - image.float()).abs()
    assert error[:, 8:40, 8:40].mean() < 20 and error[:, 112:144, 112:144].mean() < 20, error.mean(dim=(1, 2))


def test_transformer_graphs_share_one_dynamic_io_contract(tiny_engines):
    signatures = []
    for k in (1, 2, 4):
        model = onnx.load(str(tiny_engines / f"transformer_k{k}.onnx"), load_external_data=False)
        sig = [
            (v.name, v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim))
            for v in list(model.graph.input) + list(model.graph.output)
        ]
        latent = model.graph.input[0].type.tensor_type.shape.dim
        assert latent[0].dim_param and latent[2].dim_param and latent[3].dim_param  # batch, H, W are dynamic
        assert latent[1].dim_value == 16
        signatures.append(sig)
    assert signatures[0] == signatures[1] == signatures[2]
    assert [s[0] for s in signatures[0]] == [
        "latent",
        "timestep",
        "guidance",
        "encoder_hidden_states",
        "pooled_projections",
        "velocity",
        "residual",  # what the blocks added: TeaCache's cache, at the size's own token grid
    ]


def test_teacache_probes_share_one_io_contract(tiny_engines):
    signatures = []
    for k in (1, 2, 4):
        model = onnx.load(str(tiny_engines / f"teacache_k{k}.onnx"), load_external_data=False)
        signatures.append([v.name for v in list(model.graph.input) + list(model.graph.output)])
    assert signatures[0] == signatures[1] == signatures[2]
    assert signatures[0] == [
        "latent",
        "timestep",
        "guidance",
        "pooled_projections",
        "residual",
        "modulated",
        "velocity",
    ]


def test_no_float64_anywhere(tiny_engines):
    graphs = sorted(tiny_engines.glob("*.onnx"))
    assert len(graphs) == 9  # 3 transformers, 3 TeaCache probes, 2 text encoders, the VAE decoder
    for path in graphs:
        assert double_tensors(path) == [], path.name


def test_graphs_carry_no_exporter_metadata(tiny_engines, tmp_path):
    """The dynamo exporter's per-node stack traces and scopes are dropped from every shipped graph, and only them."""
    for path in sorted(tiny_engines.glob("*.onnx")):
        model = onnx.load(str(path), load_external_data=False)
        keys = {p.key for n in model.graph.node for p in n.metadata_props}
        assert not {k for k in keys if k.startswith("pkg.torch.")}, path.name
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU()).eval()
    for keep in (True, False):
        out = tmp_path / f"net_{keep}.onnx"
        export_onnx(net, (torch.randn(2, 4),), ("x",), ("y",), None, out, 18, keep_metadata=keep)
        keys = {p.key for n in onnx.load(str(out)).graph.node for p in n.metadata_props}
        assert ("pkg.torch.onnx.name_scopes" in keys) == keep, keys


@pytest.mark.parametrize("external", [False, True])
def test_rmsnorm_and_tanh_gelu_reach_ort_in_forms_it_fuses(tmp_path, monkeypatch, external):
    """Exported as torch decomposes them, RMSNorm and the tanh GELU ran as 7-10 kernels each; ``fusable_forms``
    rewrites them so ORT fuses each into one, and the graph still matches torch (also when the weights are saved
    as external data, as real-width graphs are)."""
    from diffusers.models.normalization import RMSNorm

    if external:
        monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_BYTES", 0)
    net = torch.nn.Sequential(
        RMSNorm(32, eps=1e-6), torch.nn.Linear(32, 64), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(64, 8)
    ).eval()
    x = torch.randn(2, 5, 32)
    path = tmp_path / "net.onnx"
    files = export_onnx(net, (x,), ("x",), ("y",), None, path, 18)
    assert len(files) == (2 if external else 1), files
    ops = ort_optimised_ops(path, tmp_path)
    assert ops["SimplifiedLayerNormalization"] == 1 and ops["Reciprocal"] == 0, ops
    assert ops["FastGelu"] + ops["BiasGelu"] + ops["Gelu"] == 1 and ops["Tanh"] == 0, ops
    with torch.no_grad():
        expected = net(x)
    torch.testing.assert_close(_run(path, {"x": x}), expected, atol=1e-6, rtol=1e-5)


def test_shipped_graphs_fuse_every_rmsnorm_and_gelu(tiny_engines, tmp_path):
    """The tiny FLUX transformers: every q/k RMSNorm (18) and every tanh GELU (9) fused by ORT at load."""
    for k in (1, 2, 4):
        ops = ort_optimised_ops(tiny_engines / f"transformer_k{k}.onnx", tmp_path)
        assert ops["SimplifiedLayerNormalization"] == 18 and ops["Reciprocal"] == 0, (k, ops)
        assert ops["FastGelu"] == 9 and ops["Tanh"] == 0, (k, ops)


def test_float64_check_can_fail(tmp_path):
    node = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "d.onnx"))
    assert len(double_tensors(tmp_path / "d.onnx")) >= 2  # the output and the Cast


def test_graph_runs_at_shapes_it_was_not_traced_at(tiny_engines, tiny_spec, tiny_parts):
    """Batch 3 at 384x192 on every size: ONNX Runtime against the torch engine."""
    feeds = _feeds(tiny_spec, batch=3, height=384, width=192)
    transformer = tiny_parts["transformer"]
    from ddit_export.adapters import untrained_adapters

    adapters = untrained_adapters(transformer, tiny_spec, [1, 2, 4])
    for k in (1, 2, 4):
        with torch.no_grad(), size_variant(transformer, adapters, k) as adapter:
            ref = FluxEngine(transformer, tiny_spec, k, adapter)(*feeds.values())
        got = _run(tiny_engines / f"transformer_k{k}.onnx", feeds)
        assert (got - ref).abs().max() < tiny_spec.transformer_tolerance.bound(ref.abs().max().item())


def test_trained_adapters_export_matches_unmerged_student(tmp_path, tiny_spec, tiny_parts, tiny_engines):
    transformer = tiny_parts["transformer"]
    adapters = random_adapters(transformer, tiny_spec, [1, 2], rank=4, seed=1)
    adapters.save(tmp_path / "adapters.safetensors")
    out = tmp_path / "engines"
    manifest = export_flux(
        "tiny", tiny_spec, [1, 2], out, adapters_path=str(tmp_path / "adapters.safetensors"), progress=False
    )
    assert manifest["source"]["adapters_trained"] is True and manifest["sizes"] == [1, 2]
    feeds = _feeds(tiny_spec, batch=2)
    with torch.no_grad(), size_variant(transformer, adapters, 2, merge_lora=False) as adapter:
        student = FluxEngine(transformer, tiny_spec, 2, adapter)(*feeds.values())
    got = _run(out / "transformer_k2.onnx", feeds)
    assert (got - student).abs().max() < tiny_spec.transformer_tolerance.bound(student.abs().max().item())
    untrained = _run(tiny_engines / "transformer_k2.onnx", feeds)
    assert (got - untrained).abs().max() > 1e-3  # the adapters are really in the graph
    # the native engine stays the untouched base whatever the adapters hold
    torch.testing.assert_close(
        _run(out / "transformer_k1.onnx", feeds),
        _run(tiny_engines / "transformer_k1.onnx", feeds),
        atol=1e-5,
        rtol=1e-5,
    )


def test_export_from_a_local_diffusers_folder(tmp_path, tiny_spec, tiny_engines, tiny_parts):
    folder = save_components(tiny_parts, tmp_path / "tiny-flux")
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    out = tmp_path / "engines"
    export_flux(str(folder), tiny_spec, [1], out, adapters_path="none", progress=False)
    feeds = _feeds(tiny_spec)
    torch.testing.assert_close(
        _run(out / "transformer_k1.onnx", feeds),
        _run(tiny_engines / "transformer_k1.onnx", feeds),
        atol=1e-5,
        rtol=1e-5,
    )
    assert json.loads((out / "manifest.json").read_text())["source"]["model"] == str(folder)


def test_failed_export_leaves_no_folder_and_keeps_the_old_one(tmp_path, tiny_spec, monkeypatch):
    def boom(parts, spec, adapters, factor, folder, *args, **kwargs):
        (folder / f"transformer_k{factor}.onnx").write_bytes(b"half a graph")  # a file written before the failure
        raise DDiTError("simulated failure in the transformer export")

    monkeypatch.setattr(flux_export, "_export_transformer", boom)
    out = tmp_path / "engines"
    with pytest.raises(DDiTError, match="simulated"):
        export_flux("tiny", tiny_spec, [1], out, adapters_path="none", progress=False)
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "keep.txt").write_text("old export")
    with pytest.raises(DDiTError, match="simulated"):
        export_flux("tiny", tiny_spec, [1], out, adapters_path="none", force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]
    assert (out / "keep.txt").read_text() == "old export"


def test_hub_id_not_in_offline_cache_is_one_line_error(tmp_path, tiny_spec, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import: no network retries
    with pytest.raises(DDiTError) as err:
        load_flux("some-org/not-cached", tiny_spec)
    assert "HF_HUB_OFFLINE" in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_that_does_not_match_the_profile_is_refused(tmp_path, tiny_parts):
    from ddit_profiles import get_profile

    folder = save_components(tiny_parts, tmp_path / "tiny")
    with pytest.raises(DDiTError, match="joint_attention_dim is 64, expected 4096"):
        load_flux(str(folder), get_profile("flux"))
