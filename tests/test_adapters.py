"""PI-resize, de-embedding init, packing, RoPE, LoRA merge, and the k=1 engine against the untouched diffusers model."""

import pytest
import torch
import torch.nn.functional as F
from conftest import random_adapters
from diffusers import FluxPipeline
from diffusers.models.transformers.transformer_flux import FluxPosEmbed
from peft.tuners.lora import LoraLayer

from ddit_export.adapters import (
    SIGMA_FLOOR,
    DDiTAdapters,
    SizeAdapter,
    bilinear_matrix,
    load_adapters,
    lora_targets,
    pi_resize_embedding,
    untrained_adapters,
    upsample_deembedding,
)
from ddit_export.flux_model import Float32FluxPosEmbed, FluxEngine, applied_lora, image_ids, size_variant
from ddit_runtime.patchify import pack, unpack


@pytest.mark.parametrize("p,q", [(2, 4), (2, 8), (3, 6)])
def test_bilinear_matrix_upsamples_images(p, q):
    b = bilinear_matrix(p, q)
    assert b.shape == (q * q, p * p)
    img = torch.randn(p, p, dtype=torch.float64)
    ref = F.interpolate(img[None, None], size=(q, q), mode="bilinear", align_corners=False).reshape(-1)
    torch.testing.assert_close(b @ img.reshape(-1), ref)
    torch.testing.assert_close(b.sum(dim=1), torch.ones(q * q, dtype=torch.float64))  # constants stay constant


@pytest.mark.parametrize("k", [2, 4])
def test_pi_resize_preserves_inner_products(k):
    """<x, w> == <B x, w_new> for every channel-stacked patch x, with FLUX's (c, ph, pw) token order."""
    c, p, d = 16, 2, 24
    q = p * k
    w = torch.randn(d, c * p * p)
    w_new = pi_resize_embedding(w, c, p, q)
    assert w_new.shape == (d, c * q * q)
    x = torch.randn(5, c, p * p, dtype=torch.float64)  # 5 patches
    bx = x @ bilinear_matrix(p, q).T  # [5, C, q^2]: each channel upsampled
    torch.testing.assert_close(
        (x.reshape(5, -1) @ w.double().T), bx.reshape(5, -1) @ w_new.double().T, atol=1e-5, rtol=1e-5
    )


def test_pi_resize_is_not_plain_upsampling():
    """A naive resize of the weights breaks the identity: the test above must be able to fail."""
    c, p, q, d = 4, 2, 4, 3
    w = torch.randn(d, c * p * p, dtype=torch.float64)
    naive = (w.reshape(d, c, p * p) @ bilinear_matrix(p, q).T).reshape(d, -1)
    x = torch.randn(c, p * p, dtype=torch.float64)
    bx = x @ bilinear_matrix(p, q).T
    assert not torch.allclose(w @ x.reshape(-1), naive @ bx.reshape(-1))


@pytest.mark.parametrize("k", [2, 4])
def test_deembedding_init_is_bilinear_upsample_of_native_output(k):
    c, p, d = 16, 2, 24
    q = p * k
    w, b = torch.randn(c * p * p, d), torch.randn(c * p * p)
    w_new, b_new = upsample_deembedding(w, b, c, p, q)
    h = torch.randn(7, d)
    native = (h @ w.T + b).reshape(7, c, p, p).double()
    ref = F.interpolate(native, size=(q, q), mode="bilinear", align_corners=False).reshape(7, -1)
    torch.testing.assert_close((h @ w_new.T + b_new).double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("patch", [2, 4, 8])
def test_pack_unpack_round_trip(patch):
    x = torch.randn(2, 16, 32, 48)
    tokens = pack(x, patch)
    assert tokens.shape == (2, (32 // patch) * (48 // patch), 16 * patch * patch)
    assert torch.equal(unpack(tokens, patch, 32, 48), x)


def test_pack_matches_diffusers_flux_packing():
    x = torch.randn(2, 16, 32, 48)
    ref = FluxPipeline._pack_latents(x, 2, 16, 32, 48)
    assert torch.equal(pack(x, 2), ref)
    assert torch.equal(unpack(ref, 2, 32, 48), FluxPipeline._unpack_latents(ref, 256, 384, 8))


def test_float32_rope_matches_diffusers():
    ids = torch.cat([torch.zeros(20, 3), torch.rand(300, 3) * 128], dim=0)
    ids[:, 0] = 0
    ref_cos, ref_sin = FluxPosEmbed(10000, [16, 56, 56])(ids)
    cos, sin = Float32FluxPosEmbed(10000, [16, 56, 56])(ids)
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos, ref_cos, atol=5e-5, rtol=0)
    torch.testing.assert_close(sin, ref_sin, atol=5e-5, rtol=0)


def test_coarse_image_ids_sit_at_fine_grid_centres():
    ids = image_ids(2, 3, 4)
    assert ids.shape == (6, 3)
    assert torch.equal(ids[:, 0], torch.zeros(6))
    assert ids[:, 1].tolist() == [1.5] * 3 + [5.5] * 3
    assert ids[:, 2].tolist() == [1.5, 5.5, 9.5] * 2
    native = image_ids(2, 2, 1)
    assert native[:, 1:].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def test_image_ids_are_interpolated_onto_the_reference_span_beyond_it():
    # Up to the reference grid: the absolute ids, exactly (the shipped tiny FLUX at 256 is unchanged).
    for rows, cols, k in ((16, 16, 1), (8, 4, 2), (4, 4, 4), (8, 16, 1)):
        assert torch.equal(image_ids(rows, cols, k, reference=16), image_ids(rows, cols, k))
    # Beyond it: every position scaled by reference / longer side, on both axes (the aspect ratio is kept).
    ids = image_ids(32, 16, 1, reference=16)
    assert torch.equal(ids, image_ids(32, 16, 1) * 0.5)
    assert ids[:, 1].max().item() == 15.5 and ids[:, 2].max().item() == 7.5
    coarse = image_ids(8, 8, 4, reference=16)  # 32 fine tokens a side: centres (4i + 1.5) / 2
    assert coarse[:8, 2].tolist() == [(4 * i + 1.5) / 2 for i in range(8)]


def _inputs(spec, batch=2, height=128, width=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    lh, lw = spec.latent_hw(height, width)
    return (
        torch.randn(batch, 16, lh, lw, generator=g),
        torch.rand(batch, generator=g),
        torch.full((batch,), 3.5),
        torch.randn(batch, spec.t5_max_length, spec.joint_attention_dim, generator=g),
        torch.randn(batch, spec.pooled_dim, generator=g),
    )


def test_native_engine_equals_untouched_diffusers_forward(tiny_parts, tiny_spec):
    transformer = tiny_parts["transformer"]
    latent, t, g, t5, pooled = _inputs(tiny_spec)
    b, _, lh, lw = latent.shape
    with torch.no_grad():
        ref = transformer(
            hidden_states=FluxPipeline._pack_latents(latent, b, 16, lh, lw),
            encoder_hidden_states=t5,
            pooled_projections=pooled,
            timestep=t,
            img_ids=FluxPipeline._prepare_latent_image_ids(b, lh // 2, lw // 2, "cpu", torch.float32),
            txt_ids=torch.zeros(t5.shape[1], 3),
            guidance=g,
            return_dict=False,
        )[0]
        ref = FluxPipeline._unpack_latents(ref, lh * 8, lw * 8, 8)
        with size_variant(transformer, None, 1):
            got = FluxEngine(transformer, tiny_spec, 1)(latent, t, g, t5, pooled)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_size_variant_restores_the_base(tiny_parts, tiny_spec):
    transformer = tiny_parts["transformer"]
    before = {n: m for n, m in transformer.named_children()}
    adapters = untrained_adapters(transformer, tiny_spec, [1, 2, 4])
    with size_variant(transformer, adapters, 4) as adapter:
        assert transformer.x_embedder is adapter.embed and transformer.proj_out is adapter.unembed
        assert isinstance(transformer.pos_embed, Float32FluxPosEmbed)
    assert {n: m for n, m in transformer.named_children()} == before


@pytest.mark.parametrize("k", [2, 4])
def test_coarse_engine_runs_at_every_size(tiny_parts, tiny_spec, k):
    transformer = tiny_parts["transformer"]
    adapters = untrained_adapters(transformer, tiny_spec, [1, 2, 4])
    args = _inputs(tiny_spec, height=128, width=256)
    with torch.no_grad(), size_variant(transformer, adapters, k) as adapter:
        out = FluxEngine(transformer, tiny_spec, k, adapter)(*args)
    assert out.shape == args[0].shape and torch.isfinite(out).all()


def test_lora_merge_equals_w_plus_scaled_ba(tiny_parts, tiny_spec):
    transformer = tiny_parts["transformer"]
    adapters = random_adapters(transformer, tiny_spec, [1, 2], rank=4)
    scale = adapters.alpha / adapters.rank
    targets = lora_targets(transformer)
    assert "proj_out" not in targets and any(t.endswith(".proj_out") for t in targets)
    before = {n: transformer.get_submodule(n).weight.detach().clone() for n in targets}
    state = adapters.lora[2]
    with applied_lora(transformer, adapters, 2, merge=True):
        assert not any(isinstance(m, LoraLayer) for m in transformer.modules())
        for name in targets:
            a, b = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
            merged = transformer.get_submodule(name).weight
            torch.testing.assert_close(merged, before[name] + scale * b @ a, atol=1e-6, rtol=1e-6)
    for name in targets:  # unmerged and unwrapped again
        assert not isinstance(transformer.get_submodule(name), LoraLayer)
        torch.testing.assert_close(transformer.get_submodule(name).weight, before[name], atol=1e-6, rtol=0)


def test_merged_and_unmerged_lora_agree(tiny_parts, tiny_spec):
    transformer = tiny_parts["transformer"]
    adapters = random_adapters(transformer, tiny_spec, [1, 2], rank=4)
    args = _inputs(tiny_spec)
    outs = []
    for merge in (False, True):
        with torch.no_grad(), size_variant(transformer, adapters, 2, merge_lora=merge) as adapter:
            outs.append(FluxEngine(transformer, tiny_spec, 2, adapter)(*args))
    without = DDiTAdapters(adapters.sizes, {2: {}}, adapters.rank, adapters.alpha, adapters.meta)
    with torch.no_grad(), size_variant(transformer, without, 2) as adapter:
        no_lora = FluxEngine(transformer, tiny_spec, 2, adapter)(*args)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    assert (outs[0] - no_lora).abs().max() > 1e-3  # the LoRA really changes the output


def test_sigma_residual_scales_the_latent_by_one_over_sigma(tiny_spec):
    """The 1/sigma residual: z_t's detail / sigma is the velocity's detail where the image is flat."""
    adapter = SizeAdapter(tiny_spec, 4, 128)
    latent = torch.randn(2, 16, 8, 8)
    sigma = torch.tensor([0.5, 0.001])
    assert torch.equal(adapter.residual_velocity(latent, sigma), torch.zeros_like(latent))  # zero at init
    with torch.no_grad():
        adapter.residual_sigma.weight.copy_(torch.eye(16))
    out = adapter.residual_velocity(latent, sigma)
    torch.testing.assert_close(out[0], latent[0] / 0.5)
    torch.testing.assert_close(out[1], latent[1] / SIGMA_FLOOR)  # capped, not 1000x


def test_adapters_file_without_the_sigma_residual_loads_it_as_zero(tmp_path, tiny_parts, tiny_spec):
    """Files written before the 1/sigma residual existed still load, and behave as they did."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    adapters = random_adapters(tiny_parts["transformer"], tiny_spec, [2, 4])
    adapters.save(tmp_path / "new.safetensors")
    tensors = load_file(str(tmp_path / "new.safetensors"))
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:
        meta = f.metadata()
    old = {k: v for k, v in tensors.items() if "residual_sigma" not in k}
    assert len(old) == len(tensors) - 2
    save_file(old, str(tmp_path / "old.safetensors"), metadata=meta)
    loaded = load_adapters(tmp_path / "old.safetensors", tiny_parts["transformer"], tiny_spec, [1, 2, 4])
    for k in (2, 4):
        assert torch.equal(loaded.sizes[k].residual_sigma.weight, torch.zeros(16, 16))
        torch.testing.assert_close(loaded.sizes[k].residual.weight, adapters.sizes[k].residual.weight)
