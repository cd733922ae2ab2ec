"""ddit-train wan on the tiny model: base-model videos as diffusers samples them, a short run that lowers the
held-out error, resume after an interruption, --eval, the adapters feeding ddit-export wan, and bad input."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ddit_cli import train_main
from ddit_export.adapters import load_adapters, lora_targets, resolve_adapters
from ddit_export.onnx_io import ort_session
from ddit_export.train import TrainConfig, Trainer
from ddit_export.train_data import builtin_clip_captions, encode_wan_prompts, generate_wan_latents
from ddit_export.wan_export import _export_transformer, transformer_inputs
from ddit_export.wan_loading import save_wan_components
from ddit_export.wan_model import WanEngine, WanSizeAdapter, wan_size_variant

# 6 clip captions (5 train, 1 held out), 5 frames (2 latent frames of 32 x 32), 4 UniPC steps with CFG.
# AdamW at lr 1e-3 instead of the Wan default 1e-4: 30 steps at 1e-4 lower the error only by about 12 %.
SMALL = ["--rank", "4", "--builtin-prompts", "6", "--frames", "5", "--gen-steps", "4", "--batch-size", "4"]


def _cli(*args):
    return CliRunner().invoke(train_main, ["wan", "--quiet", *map(str, args)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``ddit-train wan --sizes 2,4``, 30 steps per size (about 15 s on 2 cores)."""
    out = tmp_path_factory.mktemp("wan-train") / "adapters"
    result = _cli("--sizes", "2,4", "-o", out, "--steps", 30, "--lr", "1e-3", "--checkpoint-every", 10, *SMALL)
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "adapters.json").read_text()), result.stderr


def test_training_lowers_heldout_error_below_the_pi_resize_init(trained, wan_spec):
    out, report, stderr = trained
    assert report["config"]["optimizer"] == "adamw" and report["config"]["frames"] == 5  # the Wan defaults resolved
    for k in ("2", "4"):
        row = report["eval"][k]
        assert row["trained"] < 0.9 * row["init"], (k, row)
        assert f"size {k}: PI-resize init" in stderr
    assert not (out / "checkpoint.safetensors").exists()
    shards = list((out / "cache").glob("*.safetensors"))
    data = load_file(str(shards[0]))
    assert data["latent"].shape == (6, 16, 2, 32, 32) and data["text"].shape == (
        6,
        wan_spec.t5_max_length,
        wan_spec.text_dim,
    )


def test_eval_reproduces_the_report(trained):
    out, report, _ = trained
    result = _cli("--sizes", "2,4", "-o", out, "--eval", *SMALL)
    assert result.exit_code == 0, result.output
    for k, row in report["eval"].items():
        assert f"size {k}: PI-resize init {row['init']:.4g} -> trained {row['trained']:.4g}" in result.stderr


def test_adapters_load_with_lora_for_every_ffn(trained, wan_parts, wan_spec):
    path = trained[0] / "adapters.safetensors"
    adapters = load_adapters(path, wan_parts["transformer"], wan_spec, [1, 2, 4])
    assert all(isinstance(a, WanSizeAdapter) for a in adapters.sizes.values()) and adapters.rank == 4
    for k in (2, 4):
        bs = [t for n, t in adapters.lora[k].items() if "lora_B" in n]
        assert len(bs) == len(lora_targets(wan_parts["transformer"])) > 0
        assert all(t.abs().max() > 0 for t in bs)  # peft inits B = 0: training moved every one


def test_trained_adapters_export(trained, wan_parts, wan_spec, tmp_path):
    """The trained file through ``ddit-export wan --adapters FILE``'s own steps (``resolve_adapters``, then the k = 2
    transformer and its TeaCache probe, with the exporter's parity check; the text encoder and VAE, which the
    adapters do not touch, are left out to save 70 s): the graph is the trained student (unmerged LoRA) as the
    trainer ran it."""
    path = trained[0] / "adapters.safetensors"
    transformer = wan_parts["transformer"]
    adapters, used, is_trained = resolve_adapters("tiny", str(path), transformer, wan_spec, [1, 2])
    assert used == path and is_trained
    entry = _export_transformer(wan_parts, wan_spec, adapters, 2, tmp_path)
    assert entry["teacache"] and (tmp_path / "transformer_k2.onnx").is_file()
    adapters = load_adapters(path, transformer, wan_spec, [1, 2])
    feeds = transformer_inputs(wan_spec, 2, 5, 144, 208, torch.Generator().manual_seed(5))
    with torch.no_grad(), wan_size_variant(transformer, adapters, 2, merge_lora=False) as adapter:
        student = WanEngine(transformer, wan_spec, 2, adapter)(*feeds)
    session = ort_session(tmp_path / "transformer_k2.onnx")
    got = session.run(None, {n: a.numpy() for n, a in zip(wan_spec.transformer_inputs, feeds, strict=True)})[0]
    bound = wan_spec.transformer_tolerance.bound(student.abs().max().item())
    assert (torch.from_numpy(got) - student).abs().max() < bound


def test_generated_latents_match_diffusers_wan_pipeline(wan_parts, wan_spec):
    """The training videos are what diffusers' WanPipeline samples: UniPC flow sigmas, CFG with the empty negative."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    prompt = builtin_clip_captions(1)[0]
    text = encode_wan_prompts(wan_parts, wan_spec, [prompt], "cpu")
    negative = encode_wan_prompts(wan_parts, wan_spec, [wan_spec.negative_prompt], "cpu")
    ours = generate_wan_latents(wan_parts, wan_spec, text, negative, 5, 128, 128, 4, 3, "cpu", False)
    pipe = WanPipeline(
        tokenizer=wan_parts["tokenizer"],
        text_encoder=wan_parts["text_encoder"],
        vae=wan_parts["vae"],
        transformer=wan_parts["transformer"],
        scheduler=UniPCMultistepScheduler.from_config(wan_parts["scheduler"]),
    )
    noise = torch.randn(ours.shape, generator=torch.Generator().manual_seed(3 * 1_000_003))
    ref = pipe(
        prompt=prompt,
        negative_prompt=wan_spec.negative_prompt,
        height=128,
        width=128,
        num_frames=5,
        num_inference_steps=4,
        guidance_scale=wan_spec.guidance_scale,
        latents=noise,
        output_type="latent",
        max_sequence_length=wan_spec.t5_max_length,
    ).frames
    assert ours.shape == ref.shape == (1, 16, 2, 16, 16)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_a_model_folder_with_a_prompt_file(tmp_path, wan_parts, wan_spec):
    """``--model PATH --prompts FILE``: the diffusers folder is trained like ``tiny`` and the result fits it."""
    folder = save_wan_components(wan_parts, tmp_path / "model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(builtin_clip_captions(3, seed=1)) + "\n")
    out = tmp_path / "out"
    result = _cli(
        "--model", folder, "--profile", "wan-tiny", "--prompts", prompts, "--sizes", "2", "-o", out, "--steps", 2,
        "--frames", 5, "--gen-steps", 2, "--rank", 4, "--height", 128, "--width", 128, "--holdout", 0.34,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    adapters = load_adapters(out / "adapters.safetensors", wan_parts["transformer"], wan_spec, [1, 2])
    assert adapters.meta["model"] == str(folder) and adapters.meta["family"] == "wan"
    report = json.loads((out / "adapters.json").read_text())
    assert report["config"]["prompts"] == str(prompts) and set(report["eval"]) == {"2"}


@pytest.mark.parametrize("base_dtype", ["fp32", "bf16"])
def test_interrupted_run_resumes_to_the_same_adapters(tmp_path, wan_spec, monkeypatch, capsys, base_dtype):
    """Bit for bit, also over a bf16 base (``--base-dtype bf16``: bf16 autocast, fp32 LoRA and adapters)."""

    def cfg(out):
        return TrainConfig(
            model="tiny", sizes=(2,), output=out, steps=6, checkpoint_every=3, rank=4, builtin_prompts=6, frames=5,
            gen_steps=4, batch_size=2, height=128, width=128, base_dtype=base_dtype,
        )  # fmt: skip

    Trainer(cfg(tmp_path / "straight"), wan_spec, progress=False).run()
    original = Trainer._checkpoint

    def checkpoint_then_die(self, *args):
        original(self, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_checkpoint", checkpoint_then_die)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg(tmp_path / "killed"), wan_spec, progress=False).run()
    monkeypatch.undo()
    assert (tmp_path / "killed" / "checkpoint.safetensors").exists()
    capsys.readouterr()
    Trainer(cfg(tmp_path / "killed"), wan_spec, progress=False).run()
    assert "resuming from" in (printed := capsys.readouterr().out) and "size 2, step 3/6" in printed
    a = load_file(str(tmp_path / "killed" / "adapters.safetensors"))
    b = load_file(str(tmp_path / "straight" / "adapters.safetensors"))
    assert a.keys() == b.keys() and {t.dtype for t in a.values()} == {torch.float32}
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)
    assert any(t.abs().max() > 0 for n, t in a.items() if "lora_B" in n)


@pytest.mark.parametrize(
    "family, args, message",
    [
        ("wan", ["--frames", "8"], "4n+1"),
        ("wan", ["--sizes", "1,2"], "size 1 is the untouched base"),
        ("wan", ["--images", "EMPTY"], "--images is for FLUX"),
        ("wan", ["--height", "200"], "multiple of 16"),
        ("wan", ["--model", "/some/folder"], "no training data: pass --prompts FILE"),
        ("flux", ["--frames", "9"], "--frames applies to Wan"),
    ],
)
def test_bad_wan_training_input_is_one_line(tmp_path, family, args, message):
    (tmp_path / "EMPTY").mkdir()
    args = [str(tmp_path / a) if a == "EMPTY" else a for a in args]
    result = CliRunner().invoke(train_main, [family, "-o", str(tmp_path / "out"), "--quiet", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.output
