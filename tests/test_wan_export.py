"""Wan 2.1 export: spec arithmetic, PI-resized Conv3d, RoPE from positions, pad-and-crop, LoRA, one tiny export
(sizes 1, 2, 4) checked for parity, dtypes and its manifest, and the text encoder and VAE against diffusers."""

import copy
import json

import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import ort_optimised_ops, random_adapters
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from onnx import TensorProto, helper

from ddit_export.adapters import bilinear_matrix, load_adapters, lora_targets, untrained_adapters
from ddit_export.onnx_io import complex_tensors, double_tensors, ort_session
from ddit_export.wan_export import Umt5Embeds
from ddit_export.wan_loading import load_wan, save_wan_components
from ddit_export.wan_model import WanEngine, WanPositionRope, pad_to_multiple, token_positions, wan_size_variant
from ddit_export.wan_vae import decode_chunked, decode_unclamped, init_per_frame
from ddit_profiles import DDiTError, get_profile, spec_from_dict
from ddit_runtime.manifest import load_manifest


def _inputs(spec, batch=2, latent_frames=3, lh=18, lw=26, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 16, latent_frames, lh, lw, generator=g),
        torch.rand(batch, generator=g) * 1000,
        torch.randn(batch, spec.t5_max_length, spec.text_dim, generator=g),
    )


def _run(path, names, args):
    return torch.from_numpy(ort_session(path).run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})[0])


# ---- spec ---------------------------------------------------------------------------------------------------------


def test_wan_spec_arithmetic():
    spec = get_profile("wan")
    assert (spec.inner_dim, spec.num_layers, spec.ffn_dim, spec.text_dim, spec.t5_max_length) == (
        1536,
        30,
        8960,
        4096,
        512,
    )
    assert spec.latent_frames(81) == 21 and spec.video_frames(21) == 81 and spec.latent_hw(480, 832) == (60, 104)
    assert [spec.patch_pixels(k) for k in (1, 2, 4)] == [2, 4, 8]
    assert spec.padded_latent_hw(4, 480, 832) == (64, 104) and spec.padded_latent_hw(2, 480, 832) == (60, 104)
    assert spec.tokens_for(1, 81, 480, 832) == 21 * 30 * 52 and spec.tokens_for(4, 81, 480, 832) == 21 * 8 * 13
    assert (spec.flow_shift(480, 832), spec.flow_shift(720, 1280)) == (3.0, 5.0)
    assert (spec.guidance_scale, spec.scheduler.steps, spec.negative_prompt) == (5.0, 50, "")
    assert spec_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    spec.check_frames(81)
    spec.check_resolution(480, 832, (1, 2, 4))  # 4p pads 60 -> 64 instead of refusing


@pytest.mark.parametrize("frames", [8, 1, 85])
def test_bad_frame_counts_are_one_line_errors(frames):
    with pytest.raises(DDiTError, match="4n\\+1") as err:
        get_profile("wan").check_frames(frames)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("size,match", [((480, 830), "multiple of 16"), ((2048, 832), "outside profile")])
def test_bad_resolutions_are_one_line_errors(size, match):
    with pytest.raises(DDiTError, match=match) as err:
        get_profile("wan").check_resolution(*size, (1, 2, 4))
    assert "\n" not in str(err.value)


# ---- adapters -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4])
def test_conv3d_pi_resize_preserves_inner_products(wan_parts, wan_spec, k):
    """<x, w> == <B x, w_new>: the native Conv3d on a (1,2,2) patch equals the new one on its bilinear upsample."""
    transformer = wan_parts["transformer"]
    adapter = untrained_adapters(transformer, wan_spec, [1, k]).sizes[k]
    q = wan_spec.patch_pixels(k)
    x = torch.randn(5, 16, 1, 2, 2, dtype=torch.float64)
    bx = (x.reshape(5, 16, 4) @ bilinear_matrix(2, q).T).reshape(5, 16, 1, q, q)
    torch.testing.assert_close(bx[:, :, 0], F.interpolate(x[:, :, 0], size=(q, q), mode="bilinear"))
    native = F.conv3d(x, transformer.patch_embedding.weight.double(), stride=(1, 2, 2))
    coarse = F.conv3d(bx, adapter.embed.proj.weight.double(), stride=(1, q, q))
    torch.testing.assert_close(coarse, native, atol=1e-5, rtol=1e-5)
    assert torch.equal(adapter.embed.proj.bias, transformer.patch_embedding.bias)


@pytest.mark.parametrize("k", [2, 4])
def test_deembedding_init_is_bilinear_upsample_in_wan_order(wan_parts, wan_spec, k):
    transformer = wan_parts["transformer"]
    adapter = untrained_adapters(transformer, wan_spec, [1, k]).sizes[k]
    q, h = wan_spec.patch_pixels(k), torch.randn(7, wan_spec.num_heads * wan_spec.head_dim)
    with torch.no_grad():
        native = transformer.proj_out(h).reshape(7, 2, 2, 16).permute(0, 3, 1, 2)  # (ph, pw, c) -> [7, C, 2, 2]
        coarse = adapter.unembed(h).reshape(7, q, q, 16).permute(0, 3, 1, 2)
    ref = F.interpolate(native.double(), size=(q, q), mode="bilinear", align_corners=False)
    torch.testing.assert_close(coarse.double(), ref, atol=1e-5, rtol=1e-5)


def test_lora_targets_are_the_blocks_ffn_linears(wan_parts, wan_spec):
    targets = lora_targets(wan_parts["transformer"])
    assert targets == [f"blocks.{i}.ffn.{n}" for i in range(wan_spec.num_layers) for n in ("net.0.proj", "net.2")]
    for name in targets:
        assert isinstance(wan_parts["transformer"].get_submodule(name), torch.nn.Linear)


# ---- RoPE ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim,grid", [(128, (21, 30, 52)), (32, (3, 9, 13))])
def test_rope_at_native_size_equals_diffusers_table(head_dim, grid):
    frames, rows, cols = grid
    ref_cos, ref_sin = WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)(torch.zeros(1, 16, frames, 2 * rows, 2 * cols))
    cos, sin = WanPositionRope(head_dim)(frames, rows, cols, 1)
    assert cos.dtype == torch.float32 and cos.shape == ref_cos.shape == (1, frames * rows * cols, 1, head_dim)
    torch.testing.assert_close(cos, ref_cos.float(), atol=2e-5, rtol=0)
    torch.testing.assert_close(sin, ref_sin.float(), atol=2e-5, rtol=0)


def test_coarse_rope_positions_are_fine_grid_centres():
    t, h, w = token_positions(2, 2, 3, 4)
    assert t.tolist() == [0, 1] and h.tolist() == [1.5, 5.5] and w.tolist() == [1.5, 5.5, 9.5]
    for k in (2, 4):  # the centre of the k fine rows a coarse row covers, not the integer index
        _, h, _ = token_positions(1, 5, 1, k)
        assert h.tolist() == [sum(range(k * i, k * i + k)) / k for i in range(5)]
    cos, _ = WanPositionRope(32)(1, 2, 1, 4)  # h-axis angles of row 1 sit at position 5.5
    freqs = WanPositionRope(32).freqs_h
    torch.testing.assert_close(cos[0, 1, 0, 12:22:2], torch.cos(5.5 * freqs))


# ---- engines ------------------------------------------------------------------------------------------------------


def test_native_engine_equals_untouched_diffusers_forward(wan_parts, wan_spec):
    transformer = wan_parts["transformer"]
    latent, t, text = _inputs(wan_spec)
    with torch.no_grad():
        ref = transformer(hidden_states=latent, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        got = WanEngine(transformer, wan_spec, 1)(latent, t, text)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [2, 4])
def test_pad_and_crop_equals_a_padded_reference(wan_parts, wan_spec, k):
    """18 x 26 tiles neither 4 nor 8: the engine's output equals running it on the padded latent and cropping."""
    transformer = wan_parts["transformer"]
    adapters = random_adapters(transformer, wan_spec, [1, k], rank=4)
    latent, t, text = _inputs(wan_spec)
    q = wan_spec.patch_pixels(k)
    ph, pw = (-18) % q, (-26) % q
    padded = F.pad(latent, (0, pw, 0, ph, 0, 0), mode="replicate")
    assert torch.equal(pad_to_multiple(latent, q), padded) and torch.equal(padded[..., -1, :26], latent[..., -1, :])
    with torch.no_grad(), wan_size_variant(transformer, adapters, k) as adapter:
        engine = WanEngine(transformer, wan_spec, k, adapter)
        got, ref = engine(latent, t, text), engine(padded, t, text)[..., :18, :26]
    assert got.shape == latent.shape
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_adapters_file_round_trip_and_lora_merge(tmp_path, wan_parts, wan_spec):
    transformer = wan_parts["transformer"]
    adapters = random_adapters(transformer, wan_spec, [1, 2], rank=4, seed=1)
    adapters.save(tmp_path / "a.safetensors")
    loaded = load_adapters(tmp_path / "a.safetensors", transformer, wan_spec, [1, 2])
    args = _inputs(wan_spec, batch=1)
    outs = []
    for ad, merge in ((adapters, False), (loaded, True)):
        with torch.no_grad(), wan_size_variant(transformer, ad, 2, merge_lora=merge) as adapter:
            outs.append(WanEngine(transformer, wan_spec, 2, adapter)(*args))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    with torch.no_grad(), wan_size_variant(transformer, untrained_adapters(transformer, wan_spec, [1, 2]), 2) as a:
        assert (WanEngine(transformer, wan_spec, 2, a)(*args) - outs[0]).abs().max() > 1e-3
    with pytest.raises(DDiTError, match="trained for another model"):
        load_adapters(tmp_path / "a.safetensors", transformer, get_profile("flux-tiny"), [1, 2])


# ---- loading ------------------------------------------------------------------------------------------------------


def test_local_folder_loads_the_same_model(tmp_path, wan_parts, wan_spec):
    folder = save_wan_components(wan_parts, tmp_path / "tiny-wan")
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    parts = load_wan(str(folder), wan_spec)
    assert parts["scheduler"]["flow_shift"] == 3.0 and parts["scheduler"]["use_flow_sigmas"]
    for name in ("transformer", "text_encoder", "vae"):
        a, b = wan_parts[name].state_dict(), parts[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), name
    with pytest.raises(DDiTError, match=f"num_layers is {wan_spec.num_layers}, expected 30") as err:
        load_wan(str(folder), get_profile("wan"))
    assert "\n" not in str(err.value)


def test_hub_id_not_in_offline_cache_is_one_line_error(tmp_path, wan_spec, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import: no network retries
    with pytest.raises(DDiTError) as err:
        load_wan("some-org/not-cached", wan_spec)
    assert "HF_HUB_OFFLINE" in str(err.value) and "\n" not in str(err.value)


# ---- the exported folder ------------------------------------------------------------------------------------------


def test_manifest_loads_and_records_what_the_runtime_needs(wan_engines, wan_spec, wan_parts):
    m = load_manifest(wan_engines, verify=True)
    assert m.spec == wan_spec and m.sizes == (1, 2, 4) and m.data["family"] == "wan"
    d = m.data
    for k in ("1", "2", "4"):
        assert d["components"]["transformer"][k]["max_abs_error"] <= wan_spec.transformer_tolerance.bound(1.0)
    assert d["components"]["text_encoder"]["max_abs_error"] < 1e-3
    assert d["components"]["vae_decoder"]["max_abs_error"] < 1e-3
    assert (
        d["latent"]["latents_mean"] == list(wan_parts["vae"].config.latents_mean)
        and len(d["latent"]["latents_std"]) == 16
    )
    assert d["sigmas"]["type"] == "unipc_flow" and (d["sigmas"]["flow_shift_low"], d["sigmas"]["flow_shift_high"]) == (
        3.0,
        5.0,
    )
    assert d["guidance"]["scale"] == 5.0 and d["guidance"]["negative_prompt"] == ""
    assert d["shapes"]["frames"] == [5, 9, 17] and d["shapes"]["multiple"] == 16
    assert list(d["io"]["transformer"]["inputs"]) == list(wan_spec.transformer_inputs)
    assert (wan_engines / d["components"]["text_encoder"]["tokenizer"]).is_file()


def test_graphs_have_no_float64_and_no_complex_tensors(wan_engines):
    graphs = sorted(wan_engines.glob("*.onnx"))
    assert len(graphs) == 9  # 3 transformer sizes, 3 TeaCache probes, text encoder, VAE first + step
    for path in graphs:
        assert double_tensors(path) == [] and complex_tensors(path) == [], path.name


def test_complex_check_can_fail(tmp_path):
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.COMPLEX64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.COMPLEX64, [1])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "c.onnx"))
    assert complex_tensors(tmp_path / "c.onnx") == ["x", "y"] and double_tensors(tmp_path / "c.onnx") == []


def test_every_size_runs_at_untraced_padded_shapes(wan_engines, wan_spec, wan_parts):
    """Batch 3, 4 latent frames, latent 22 x 18 (176 x 144 pixels): padded by k = 2 and 4, one dynamic contract."""
    args = _inputs(wan_spec, batch=3, latent_frames=4, lh=22, lw=18, seed=5)
    transformer = wan_parts["transformer"]
    adapters = untrained_adapters(transformer, wan_spec, [1, 2, 4])
    for k in (1, 2, 4):
        graph = onnx.load(str(wan_engines / f"transformer_k{k}.onnx"), load_external_data=False)
        assert [v.name for v in list(graph.graph.input) + list(graph.graph.output)] == [
            "latent",
            "timestep",
            "encoder_hidden_states",
            "velocity",
            "residual",  # what the blocks added: TeaCache's cache, at the size's own token grid
        ]
        with torch.no_grad(), wan_size_variant(transformer, adapters, k) as adapter:
            ref = WanEngine(transformer, wan_spec, k, adapter)(*args)
        got = _run(wan_engines / f"transformer_k{k}.onnx", wan_spec.transformer_inputs, args)
        assert (got - ref).abs().max() < wan_spec.transformer_tolerance.bound(ref.abs().max().item()), k


def test_text_graph_and_tokenizer_match_the_wan_pipeline(wan_engines, wan_parts, wan_spec):
    from diffusers import UniPCMultistepScheduler, WanPipeline
    from tokenizers import Tokenizer

    meta = load_manifest(wan_engines).component("text_encoder")
    pipe = WanPipeline(
        tokenizer=wan_parts["tokenizer"],
        text_encoder=wan_parts["text_encoder"],
        transformer=wan_parts["transformer"],
        vae=wan_parts["vae"],
        scheduler=UniPCMultistepScheduler(**{k: v for k, v in wan_parts["scheduler"].items() if k[0] != "_"}),
    )
    prompts = ["two red circles on a  white background", ""]
    with torch.no_grad():
        ref = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=meta["max_length"], device=torch.device("cpu"))
    tok = Tokenizer.from_file(str(wan_engines / meta["tokenizer"]))
    tok.enable_padding(length=meta["max_length"], pad_id=meta["pad_id"], pad_token=meta["pad_token"])
    tok.enable_truncation(meta["max_length"])
    enc = tok.encode_batch([" ".join(p.split()) for p in prompts])
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    assert mask[1].sum() == 1  # the empty negative prompt is just </s>
    got = _run(wan_engines / meta["onnx"], ("input_ids", "attention_mask"), (ids, mask))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(Umt5Embeds(wan_parts["text_encoder"])(ids, mask), ref, atol=1e-5, rtol=1e-4)


def test_chunked_vae_graphs_decode_like_diffusers(wan_engines, wan_parts):
    meta = load_manifest(wan_engines).component("vae_decoder")
    first, step = ort_session(wan_engines / meta["onnx"]), ort_session(wan_engines / meta["step_onnx"])

    def run_first(z):
        return [torch.from_numpy(o) for o in first.run(None, {"latent": z.numpy()})]

    def run_step(z, *caches):
        feeds = {"latent": z.numpy()} | {n: c.numpy() for n, c in zip(meta["cache_inputs"], caches, strict=True)}
        return [torch.from_numpy(o) for o in step.run(None, feeds)]

    z = torch.randn(1, 16, 4, 16, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = wan_parts["vae"].decode(z, return_dict=False)[0]
    got = decode_chunked(run_first, run_step, z)
    assert got.shape == ref.shape == (1, 3, 13, 128, 192)
    caches = run_first(z[:, :, :1])[1:]
    assert [tuple(c.shape) for c in caches] == [
        (1, s["channels"], 2, 16 * s["scale"], 24 * s["scale"]) for s in meta["cache_shapes"]
    ]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-3)


# ---- the recipe's video-VAE training helpers -------------------------------------------------------------------------


def test_per_frame_init_makes_the_video_vae_a_per_frame_image_vae(wan_parts):
    """After init_per_frame, latent frame i of a clip is frame 4 i encoded alone, and each latent frame decodes to
    four copies of its own single-frame decode: the 2D warm-up then trains a good VAE for static clips."""
    vae = copy.deepcopy(wan_parts["vae"])
    clip = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        before = vae.encode(clip).latent_dist.mean
        alone_before = vae.encode(clip[:, :, 4:5]).latent_dist.mean
    assert not torch.allclose(before[:, :, 1], alone_before[:, :, 0], atol=1e-3)  # the loaded VAE mixes frames
    assert init_per_frame(vae) > 0
    with torch.no_grad():
        z = vae.encode(clip).latent_dist.mean
        for i in range(3):
            alone = vae.encode(clip[:, :, 4 * i : 4 * i + 1]).latent_dist.mean
            torch.testing.assert_close(z[:, :, i], alone[:, :, 0], atol=1e-5, rtol=1e-4)
        video = vae.decode(z).sample
        assert video.shape == (1, 3, 9, 32, 32)
        for i in range(3):
            single = vae.decode(z[:, :, i : i + 1]).sample[:, :, 0]
            for t in [0] if i == 0 else range(4 * i - 3, 4 * i + 1):
                torch.testing.assert_close(video[:, :, t], single, atol=1e-5, rtol=1e-4)


def test_unclamped_decode_is_decode_before_its_clamp(wan_parts):
    vae = copy.deepcopy(wan_parts["vae"])
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(10)  # so that the decoder overshoots [-1, 1], as a trained one does
    z = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        raw, ref = decode_unclamped(vae, z), vae.decode(z).sample
    assert raw.shape == ref.shape == (1, 3, 5, 32, 32)
    torch.testing.assert_close(raw.clamp(-1, 1), ref)
    assert raw.abs().max() > 1  # the clamp matters


def test_wan_graphs_fuse_every_rmsnorm_and_gelu(wan_engines, tmp_path):
    """The tiny Wan's transformers: ORT fuses every q/k RMSNorm and tanh GELU (``onnx_io.fusable_forms``)."""
    for k in (1, 2, 4):
        ops = ort_optimised_ops(wan_engines / f"transformer_k{k}.onnx", tmp_path)
        assert ops["SimplifiedLayerNormalization"] > 0 and ops["Reciprocal"] == 0, (k, ops)
        assert ops["FastGelu"] > 0 and ops["Tanh"] == 0, (k, ops)
