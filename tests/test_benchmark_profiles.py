"""The real-width benchmark profiles (flux-dev-shape, wan-1.3b-shape) and ``--model random``: the shape facts the
benchmarks rely on, and random components of the real diffusers classes built at those widths."""

import pytest
from click.testing import CliRunner

from ddit_cli import export_main
from ddit_profiles import FLUX, WAN, DDiTError, get_profile, profile_for, random_configs


def test_flux_dev_shape_has_flux_dev_widths_and_the_papers_token_counts():
    spec = get_profile("flux-dev-shape")
    assert (spec.inner_dim, spec.num_heads, spec.head_dim) == (FLUX.inner_dim, 24, 128) == (3072, 24, 128)
    assert (spec.joint_attention_dim, spec.pooled_dim, spec.t5_max_length) == (4096, 768, 512)
    assert [spec.tokens_for(k, 1024, 1024) for k in (1, 2, 4)] == [4096, 1024, 256]
    # Per block the FLOPs are FLUX.1-dev's; at depth 1 + 1 the embeddings weigh a little more, so the ideal
    # ratios sit just under the full model's 3.46x / 7.2x.
    ideal = [spec.step_flops(1, 1024, 1024) / spec.step_flops(k, 1024, 1024) for k in (2, 4)]
    full = [FLUX.step_flops(1, 1024, 1024) / FLUX.step_flops(k, 1024, 1024) for k in (2, 4)]
    assert ideal[0] == pytest.approx(3.41, abs=0.01) and ideal[1] == pytest.approx(6.94, abs=0.01)
    assert ideal[0] < full[0] and ideal[1] < full[1]


def test_wan_shape_has_wan_13b_widths_and_pads_4p_at_480p():
    spec = get_profile("wan-1.3b-shape")
    assert (spec.inner_dim, spec.ffn_dim, spec.text_dim, spec.t5_max_length) == (WAN.inner_dim, 8960, 4096, 512)
    assert spec.opt_size == (480, 832) and spec.latent_frames(spec.opt_frames) == 2
    assert [spec.tokens_for(k, 5, 480, 832) for k in (1, 2, 4)] == [3120, 780, 208]  # 60 rows pad to 64 at 4p
    assert spec.padded_latent_hw(4, 480, 832) == (64, 104)


def test_random_model_builds_the_real_classes_at_the_profile_widths():
    from ddit_export.loading import load_flux

    spec = get_profile("flux-dev-shape")
    parts = load_flux("random", spec)  # also runs check_against_profile
    cfg = parts["transformer"].config
    assert type(parts["transformer"]).__name__ == "FluxTransformer2DModel"
    assert (cfg.num_attention_heads, cfg.attention_head_dim, cfg.joint_attention_dim) == (24, 128, 4096)
    assert parts["text_encoder_2"].config.d_model == 4096 and parts["text_encoder"].config.hidden_size == 768
    assert 5.4e8 < sum(p.numel() for p in parts["transformer"].parameters()) < 5.6e8  # METHOD.md's 545M


def test_random_wan_shape_builds_the_real_classes_and_exports_its_text_encoder(tmp_path):
    from ddit_export.wan_export import _export_text
    from ddit_export.wan_loading import load_wan

    spec = get_profile("wan-1.3b-shape")
    parts = load_wan("random", spec)
    cfg = parts["transformer"].config
    assert type(parts["transformer"]).__name__ == "WanTransformer3DModel"
    assert (cfg.num_attention_heads, cfg.attention_head_dim, cfg.ffn_dim, cfg.text_dim) == (12, 128, 8960, 4096)
    # The real Wan profiles allow a batch of 2 (one guidance pair): the export must trace and check within it
    # (it once traced a batch of 3, and every real-width Wan export failed at the text encoder).
    assert spec.max_batch == 2
    meta = _export_text(parts, spec, tmp_path)
    assert (tmp_path / meta["onnx"]).is_file() and meta["max_abs_error"] <= spec.text_tolerance.bound(1.0)


def test_random_without_configs_is_a_one_line_error():
    with pytest.raises(DDiTError, match="no configs for random weights") as err:
        random_configs(get_profile("flux"))
    assert "flux-dev-shape" in str(err.value) and "\n" not in str(err.value)
    assert profile_for("flux", "random").name == "flux-tiny" and profile_for("wan", "random").name == "wan-tiny"
    result = CliRunner().invoke(export_main, ["flux", "--model", "random", "--profile", "flux", "-o", "never"])
    assert result.exit_code == 2 and "no configs for random weights" in result.output
    assert result.output.count("\n") == 1


def test_wan_flops_count_the_quadratic_attention():
    spec = get_profile("wan")
    native = spec.step_flops(1, 81, 480, 832)
    n, d = spec.tokens_for(1, 81, 480, 832), spec.inner_dim
    attention = spec.num_layers * 2 * (2 * n * n * d)  # self-attention scores and sums, 2 FLOPs per multiply-add
    assert 0.6 < attention / native < 0.8  # at 81 frames (32760 tokens) attention dominates
    # Fewer tokens cut attention quadratically: 2p is more than the 4x token ratio; 4p pads 60 rows to 64.
    assert 8.0 < native / spec.step_flops(2, 81, 480, 832) < 9.0
    assert 40 < native / spec.step_flops(4, 81, 480, 832) < 45
    assert spec.step_flops(1, 81, 480, 832, batch=2) == 2 * native
