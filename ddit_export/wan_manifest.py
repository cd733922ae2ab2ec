"""The Wan-specific sections of ``manifest.json``: the I/O contract, shapes, latent normalisation, the UniPC flow
sigmas, classifier-free guidance, and text handling. ``manifest.write_manifest`` adds the common sections.
"""

from __future__ import annotations

from ddit_profiles import WanSpec
from ddit_profiles.wan import PAD_MODE

from .manifest import scheduler_block

TIMESTEP_MEANING = (
    "diffusers' Wan timestep t = sigma * 1000 in [0, 1000], float32, one per sample; WanPipeline passes UniPC's "
    "int64 timesteps, i.e. trunc(sigma * 1000) (see sigmas.timestep_rounding)"
)


def io_contract(spec: WanSpec, components: dict) -> dict:
    """Names, dtypes and symbolic shapes of every graph's inputs and outputs."""
    f32, i64 = "float32", "int64"
    latent = ["batch", spec.latent_channels, "latent_frames", "latent_height", "latent_width"]
    text = components["text_encoder"]
    vae = components["vae_decoder"]
    frame = ["batch", spec.latent_channels, 1, "latent_height", "latent_width"]
    cache = [f32, ["batch", "channels_j", 2, "latent_height*scale_j", "latent_width*scale_j"]]  # see cache_shapes
    return {
        "transformer": {
            "inputs": {
                "latent": [f32, latent],
                "timestep": [f32, ["batch"]],
                "encoder_hidden_states": [f32, ["batch", text["max_length"], spec.text_dim]],
            },
            "outputs": {"velocity": [f32, latent]},
            "timestep_meaning": TIMESTEP_MEANING,
            "padding": (
                f"each engine pads latent H and W up to a multiple of its patch ({PAD_MODE}, ONNX Pad 'edge') and "
                "crops the velocity back, so every size takes any latent H x W in range"
            ),
        },
        "text_encoder": {
            "inputs": {
                "input_ids": [i64, ["batch", text["max_length"]]],
                "attention_mask": [i64, ["batch", text["max_length"]]],
            },
            "outputs": {"encoder_hidden_states": [f32, ["batch", text["max_length"], spec.text_dim]]},
            "output_meaning": "umT5 last_hidden_state with padded positions zeroed, as WanPipeline does",
        },
        "vae_decoder": {
            "first": {
                "inputs": {"latent": [f32, frame]},
                "outputs": {"video": [f32, ["batch", 3, 1, "height", "width"]]}
                | {name: cache for name in vae["cache_outputs"]},
            },
            "step": {
                "inputs": {"latent": [f32, frame]} | {name: cache for name in vae["cache_inputs"]},
                "outputs": {"video": [f32, ["batch", 3, spec.vae_temporal_factor, "height", "width"]]}
                | {name: cache for name in vae["cache_outputs"]},
            },
            "input_meaning": "one latent frame of latent * latents_std + latents_mean (the runtime applies it)",
            "output_meaning": "RGB in [-1, 1] (clamped); frames = 4 (latent_frames - 1) + 1",
        },
    }


def sigmas_block(spec: WanSpec, scheduler: dict) -> dict:
    """UniPC with flow sigmas, as diffusers' Wan 2.1 scheduler config says (the folder's, else the defaults)."""
    return {
        "type": "unipc_flow",
        "shift": "flow_shift by resolution: flow_shift_low up to flow_shift_area pixels (480p), else flow_shift_high",
        "flow_shift_low": spec.flow_shift_low,
        "flow_shift_high": spec.flow_shift_high,
        "flow_shift_area": spec.flow_shift_area,
        "formula": (
            "s = linspace(1, 1/N, steps+1)[:-1]; sigma = shift*s / (1 + (shift-1)*s); sigma[0] -= 1e-6 if it is 1; "
            "append a final sigma 0 (diffusers UniPCMultistepScheduler.set_timesteps with use_flow_sigmas)"
        ),
        "num_train_timesteps": scheduler.get("num_train_timesteps", spec.num_train_timesteps),
        "timestep_rounding": "truncate",
        "solver_order": scheduler.get("solver_order", 2),
        "solver_type": scheduler.get("solver_type", "bh2"),
        "predict_x0": scheduler.get("predict_x0", True),
        "lower_order_final": scheduler.get("lower_order_final", True),
        "final_sigmas_type": scheduler.get("final_sigmas_type", "zero"),
        "prediction_type": scheduler.get("prediction_type", "flow_prediction"),
        "scheduler_config": scheduler,
    }


def wan_blocks(spec: WanSpec, factors, components: dict, vae_config, scheduler: dict) -> dict:
    """Every Wan-specific manifest section, for ``manifest.write_manifest(..., blocks=...)``."""
    frames = [spec.min_frames, spec.opt_frames, spec.max_frames]
    return {
        "io": io_contract(spec, components),
        "shapes": {
            "batch": [1, 1, spec.max_batch],
            "height": [spec.min_size[0], spec.opt_size[0], spec.max_size[0]],
            "width": [spec.min_size[1], spec.opt_size[1], spec.max_size[1]],
            "frames": frames,
            "frames_rule": "4n+1",
            "latent_frames": [spec.latent_frames(f) for f in frames],
            "multiple": spec.resolution_multiple(tuple(factors)),
            "pad": {"mode": PAD_MODE, "onnx_mode": "edge", "sides": "bottom, right"},
        },
        "scheduler": scheduler_block(spec),
        "guidance": {
            "type": "classifier_free",
            "scale": spec.guidance_scale,
            "negative_prompt": spec.negative_prompt,
            "formula": "v = v_uncond + scale * (v_cond - v_uncond)",
        },
        "latent": {
            "channels": spec.latent_channels,
            "vae_scale_factor": spec.vae_scale_factor,
            "vae_temporal_factor": spec.vae_temporal_factor,
            "latents_mean": list(vae_config.latents_mean),
            "latents_std": list(vae_config.latents_std),
            "decode_input": "latent * latents_std + latents_mean, per channel",
        },
        "sigmas": sigmas_block(spec, scheduler),
    }
