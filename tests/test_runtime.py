"""The runtime on the shared tiny engines folder: images, seeds, schedules, engine switching, tokenisation parity,
import isolation from the exporter, and ddit-run end to end."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ddit_cli import run_main
from ddit_profiles import DDiTError
from ddit_runtime.pipeline import FluxRuntime
from ddit_runtime.text import PromptTokenizer

PROMPT = "a red circle on a black background"
STEPS = 6


@pytest.fixture(scope="module")
def runtime(tiny_engines):
    return FluxRuntime(tiny_engines, provider="cpu")


@pytest.fixture(scope="module")
def native(runtime):
    """The all-native generation at seed 0, shared by the comparisons."""
    return runtime.generate(PROMPT, steps=STEPS, seed=0, schedule=[1] * STEPS, progress=False)


def test_runtime_loads_the_folder(runtime, tiny_spec, tiny_parts):
    from ddit_export.loading import with_vae_normalisation

    assert runtime.sizes == (1, 2, 4)
    # the manifest carries the profile (minus tiny_configs), with the checkpoint VAE's own latent normalisation
    assert runtime.spec.to_dict() == with_vae_normalisation(tiny_spec, tiny_parts["vae"]).to_dict()
    assert sorted(runtime.engines) == [1, 2, 4]
    assert runtime.device.type == "cpu"


def test_unexported_size_is_refused(tiny_engines):
    with pytest.raises(DDiTError, match=r"\[8\] were not exported"):
        FluxRuntime(tiny_engines, provider="cpu", sizes=[1, 8])


def test_generate_returns_uint8_image(native):
    assert native.image.dtype == torch.uint8
    assert native.image.shape == (3, 256, 256)
    assert native.image.device.type == "cpu"
    assert native.schedule == [1] * STEPS
    assert len(native.step_ms) == STEPS and all(t > 0 for t in native.step_ms)
    assert all(0 < e < t for e, t in zip(native.engine_ms, native.step_ms, strict=True))  # engines: part of a step
    assert native.total_s > 0
    assert native.settings["schedule_mode"] == "fixed" and native.settings["steps"] == STEPS
    assert native.image.float().std() > 0  # not a blank image


def test_same_seed_same_image_other_seed_other_image(runtime, native):
    again = runtime.generate(PROMPT, steps=STEPS, seed=0, schedule=[1] * STEPS, progress=False)
    assert torch.equal(again.image, native.image)
    other = runtime.generate(PROMPT, steps=STEPS, seed=1, schedule=[1] * STEPS, progress=False)
    assert not torch.equal(other.image, native.image)


def _count_engine_calls(runtime, monkeypatch) -> dict:
    calls = {k: 0 for k in runtime.engines}
    for k, engine in runtime.engines.items():

        def counted(inputs, outputs, _k=k, _run=engine.run):
            calls[_k] += 1
            return _run(inputs, outputs)

        monkeypatch.setattr(engine, "run", counted)
    return calls


@pytest.mark.parametrize("cfg, per_step", [("batched", 1), ("two-pass", 2)])
def test_fixed_schedule_uses_only_that_engine(runtime, monkeypatch, cfg, per_step):
    assert runtime.spec.scheduler.true_cfg > 1.0  # flux-tiny guides: both passes in one call, or one call each
    calls = _count_engine_calls(runtime, monkeypatch)
    result = runtime.generate(PROMPT, steps=STEPS, schedule=[4] * STEPS, progress=False, cfg=cfg)
    assert result.schedule == [4] * STEPS and result.settings["cfg"] == cfg
    assert calls == {1: 0, 2: 0, 4: per_step * STEPS}


def test_explicit_schedule_is_followed_exactly(runtime, monkeypatch):
    calls = _count_engine_calls(runtime, monkeypatch)
    schedule = [1, 1, 2, 4, 2, 1]
    result = runtime.generate(PROMPT, steps=STEPS, schedule=schedule, progress=False, true_cfg=1.0)
    assert result.schedule == schedule
    assert calls == {1: 3, 2: 2, 4: 1}  # unguided: one call per step


def test_schedule_of_wrong_length_is_refused(runtime):
    with pytest.raises(DDiTError, match="3 entries for 6 steps"):
        runtime.generate(PROMPT, steps=STEPS, schedule=[1, 2, 4], progress=False)


def test_auto_schedule_with_huge_tau_warms_up_then_goes_coarsest(runtime, tiny_spec):
    warmup = tiny_spec.scheduler.warmup
    assert warmup == 3
    result = runtime.generate(PROMPT, steps=STEPS, tau=1e9, progress=False)
    assert result.schedule == [1] * warmup + [4] * (STEPS - warmup)
    assert result.settings["schedule_mode"] == "auto" and result.settings["tau"] == 1e9


def test_auto_schedule_with_zero_tau_stays_native(runtime, native):
    result = runtime.generate(PROMPT, steps=STEPS, seed=0, tau=0.0, progress=False)
    assert result.schedule == [1] * STEPS
    assert torch.equal(result.image, native.image)  # auto that stays native is the native baseline


def test_engine_switching_changes_the_image(runtime, native):
    coarse = runtime.generate(PROMPT, steps=STEPS, seed=0, schedule=[4] * STEPS, progress=False)
    mixed = runtime.generate(PROMPT, steps=STEPS, seed=0, schedule=[1, 1, 1, 4, 4, 2], progress=False)
    assert not torch.equal(coarse.image, native.image)
    assert not torch.equal(mixed.image, native.image)
    assert not torch.equal(mixed.image, coarse.image)


def test_non_default_resolution(runtime):
    result = runtime.generate(PROMPT, height=128, width=192, steps=2, schedule=[2, 4], progress=False)
    assert result.image.shape == (3, 128, 192) and result.schedule == [2, 4]


@pytest.mark.parametrize("steps", [0, -2])
def test_generate_refuses_steps_below_one(runtime, steps):
    with pytest.raises(DDiTError, match="steps"):
        runtime.generate(PROMPT, steps=steps, progress=False)


def _final_latent(runtime, monkeypatch, **kw) -> torch.Tensor:
    """The latent ``generate`` hands to the VAE (the decode is kept)."""
    seen = []
    decode = runtime.decode
    monkeypatch.setattr(runtime, "decode", lambda latent: (seen.append(latent.clone()), decode(latent))[1])
    runtime.generate(PROMPT, steps=4, seed=0, schedule=[1] * 4, progress=False, **kw)
    return seen[0]


@pytest.mark.parametrize("true_cfg, cfg", [(1.0, "batched"), (3.0, "batched"), (3.0, "two-pass")])
def test_true_cfg_matches_the_torch_sampler(runtime, tiny_spec, tiny_parts, monkeypatch, true_cfg, cfg):
    """The runtime's guidance (ONNX, batched or two-pass) against the recipe's batched one (torch,
    ``generate_latents``)."""
    import dataclasses

    from ddit_export.train_data import encode_prompts, generate_latents

    spec = dataclasses.replace(tiny_spec, scheduler=dataclasses.replace(tiny_spec.scheduler, true_cfg=true_cfg))
    t5, pooled = encode_prompts(tiny_parts, spec, [PROMPT], "cpu")
    empty = encode_prompts(tiny_parts, spec, [""], "cpu")
    h, w = spec.opt_size
    expected = generate_latents(tiny_parts, spec, t5, pooled, h, w, 4, 0, "cpu", False, empty)
    got = _final_latent(runtime, monkeypatch, true_cfg=true_cfg, cfg=cfg)
    assert torch.allclose(got, expected, atol=2e-4 * float(expected.abs().max())), (got - expected).abs().max()


def test_true_cfg_changes_the_sample_and_reads_the_negative_prompt(runtime, monkeypatch):
    off = _final_latent(runtime, monkeypatch, true_cfg=1.0)
    on = _final_latent(runtime, monkeypatch, true_cfg=3.0)
    other = _final_latent(runtime, monkeypatch, true_cfg=3.0, negative_prompt="a blue square")
    assert (on - off).abs().max() > 1e-2 and (other - on).abs().max() > 1e-2


def test_batched_and_two_pass_guidance_agree(runtime, monkeypatch):
    batched = _final_latent(runtime, monkeypatch, true_cfg=3.0, cfg="batched")
    two = _final_latent(runtime, monkeypatch, true_cfg=3.0, cfg="two-pass")
    assert torch.allclose(batched, two, atol=1e-5 * float(two.abs().max())), (batched - two).abs().max()
    with pytest.raises(DDiTError, match="unknown --cfg 'fancy'"):
        runtime.generate(PROMPT, steps=2, cfg="fancy", progress=False)


def test_true_cfg_below_one_is_refused(runtime):
    with pytest.raises(DDiTError, match="--true-cfg must be at least 1"):
        runtime.generate(PROMPT, steps=2, true_cfg=0.5, progress=False)


def test_runtime_does_not_import_the_exporter():
    code = (
        "import sys, ddit_runtime.pipeline, ddit_runtime.image, ddit_runtime.scheduler; "
        "bad=[m for m in sys.modules if m.split('.')[0] in ('ddit_export','diffusers','transformers','peft')]; "
        "print(bad); assert not bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "[]"


PARITY_PROMPTS = [
    PROMPT,
    "Many SMALL striped blue squares, top-left!",  # case, punctuation
    "a zebra on a red circle",  # 'zebra' is not in the vocabulary
    " ".join(["red circle blue square"] * 10),  # 40 words: truncated by T5 (32), not by CLIP (77)
    " ".join(["red circle blue square"] * 25),  # 100 words: truncated by both
]


@pytest.mark.parametrize("name", ["text_encoder", "text_encoder_2"])
def test_tokenization_matches_transformers(tiny_engines, tiny_spec, runtime, name):
    from ddit_export.tiny import tiny_tokenizers

    clip, t5 = tiny_tokenizers(tiny_spec)
    reference = clip if name == "text_encoder" else t5
    meta = runtime.manifest.component(name)
    assert meta["max_length"] == (tiny_spec.clip_max_length if name == "text_encoder" else tiny_spec.t5_max_length)
    tok = PromptTokenizer(tiny_engines / meta["tokenizer"], meta["max_length"], meta["pad_id"], meta["pad_token"], name)
    unk = reference.unk_token_id
    for prompt in PARITY_PROMPTS:
        want = reference(prompt, padding="max_length", max_length=meta["max_length"], truncation=True).input_ids
        got = tok(prompt)
        assert got.dtype == torch.int64 and got.shape == (1, meta["max_length"])
        assert got[0].tolist() == want, prompt
    assert unk in tok("a zebra on a red circle")[0].tolist()


def test_runtime_tokenizers_are_the_folders(runtime):
    ids = runtime.text["text_encoder_2"][0]("a red circle")[0].tolist()
    assert ids[3] == 1 and set(ids[4:]) == {0}  # 3 words, </s> (1), then <pad> (0) up to 32
    ids = runtime.text["text_encoder"][0]("a red circle")[0].tolist()
    assert ids[0] == 0 and ids[4] == 1 and len(ids) == 77


# ---- ddit-run end to end ----------------------------------------------------------------------------------------


def _run_json(tiny_engines, out, *extra):
    result = CliRunner().invoke(
        run_main, [str(tiny_engines), "--prompt", PROMPT, "-o", str(out), "--steps", str(STEPS), "--json", *extra]
    )
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


def test_cli_json_and_png(tiny_engines, tmp_path):
    out = tmp_path / "sub" / "x.png"
    data = _run_json(tiny_engines, out, "--seed", "7", "--tau", "1e9", "--rho", "0.5")
    assert {"schedule", "step_ms", "total_s", "output", "engines"} <= set(data)
    assert data["schedule"] == [1, 1, 1, 4, 4, 4]
    assert len(data["step_ms"]) == STEPS and all(t > 0 for t in data["step_ms"])
    assert all(0 < e < t for e, t in zip(data["engine_ms"], data["step_ms"], strict=True))
    assert data["total_s"] > 0 and data["output"] == str(out) and data["engines"] == [1, 2, 4]
    assert out.is_file() and not [p for p in out.parent.iterdir() if ".partial-" in p.name]

    png = Image.open(out)
    assert png.size == (256, 256)
    text = png.text
    assert text["prompt"] == PROMPT and text["seed"] == "7" and text["steps"] == str(STEPS)
    assert float(text["tau"]) == 1e9 and float(text["rho"]) == 0.5
    assert json.loads(text["schedule"]) == data["schedule"]
    assert json.loads(text["ddit"])["schedule"] == data["schedule"]


def test_cli_non_square_resolution_and_fixed_schedule(tiny_engines, tmp_path):
    out = tmp_path / "wide.png"
    data = _run_json(tiny_engines, out, "--height", "128", "--width", "192", "--schedule", "2", "--cfg", "two-pass")
    assert data["schedule"] == [2] * STEPS and data["height"] == 128 and data["width"] == 192
    assert data["cfg"] == "two-pass"
    png = Image.open(out)
    assert png.size == (192, 128)
    assert json.loads(png.text["schedule"]) == [2] * STEPS


def test_cli_matches_the_api(tiny_engines, tmp_path, runtime):
    out = tmp_path / "api.png"
    schedule = [1, 1, 2, 4, 2, 1]
    _run_json(tiny_engines, out, "--seed", "3", "--schedule", ",".join(map(str, schedule)), "--provider", "cpu")
    expected = runtime.generate(PROMPT, steps=STEPS, seed=3, schedule=schedule, progress=False).image
    written = torch.from_numpy(np.array(Image.open(out).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(written, expected)


# ---- --sizes: a subset of the folder's engines -------------------------------------------------------------------


def test_sizes_load_only_those_engines_and_ddit_chooses_among_them(tiny_engines, runtime):
    """With 1p and 2p loaded, a tau that sends every step after the warm-up to 4p on the whole folder sends it to
    2p, and each step is the one the full folder computes with that schedule (same engines, same latent)."""
    subset = FluxRuntime(tiny_engines, provider="cpu", sizes=[2, 1, 2])
    assert subset.sizes == (1, 2) and sorted(subset.engines) == [1, 2]
    assert "transformer_k2" in subset.loader.resident and "transformer_k4" not in subset.loader.resident
    result = subset.generate(PROMPT, steps=STEPS, seed=0, tau=1e9, progress=False)
    assert result.schedule == [1, 1, 1, 2, 2, 2] and result.settings["sizes"] == [1, 2]
    full = runtime.generate(PROMPT, steps=STEPS, seed=0, schedule=result.schedule, progress=False)
    assert torch.equal(result.image, full.image)
    assert runtime.generate(PROMPT, steps=STEPS, tau=1e9, progress=False).schedule == [1, 1, 1, 4, 4, 4]


def test_sizes_without_the_native_one_run_fixed_schedules_only(tiny_engines):
    coarse = FluxRuntime(tiny_engines, provider="cpu", sizes=[4])
    assert coarse.generate(PROMPT, steps=2, schedule=[4, 4], progress=False).schedule == [4, 4]
    with pytest.raises(DDiTError, match=r"needs the native size 1 .* only 4 are loaded: add 1 to --sizes"):
        coarse.generate(PROMPT, steps=2, progress=False)
    with pytest.raises(DDiTError, match=r"schedule uses patch sizes \[1\], but only \[4\] are loaded"):
        coarse.generate(PROMPT, steps=2, schedule=[1, 4], progress=False)
    with pytest.raises(DDiTError, match=r"no patch sizes given: pick some of \[1, 2, 4\]"):
        FluxRuntime(tiny_engines, provider="cpu", sizes=[])


def test_cli_sizes(tiny_engines, tmp_path):
    out = tmp_path / "12.png"
    data = _run_json(tiny_engines, out, "--sizes", "1,2", "--tau", "1e9")
    assert data["engines"] == [1, 2] and data["sizes"] == [1, 2] and data["schedule"] == [1, 1, 1, 2, 2, 2]
    assert json.loads(Image.open(out).text["ddit"])["sizes"] == [1, 2]
    for args, words in [
        (["--sizes", "1,8"], ["[8] were not exported", "(it has [1, 2, 4])"]),
        (["--sizes", "2,4"], ["needs the native size 1", "add 1 to --sizes, or give a fixed --schedule"]),
        (["--sizes", "1,2", "--schedule", "4"], ["patch size 4, which was not loaded (--sizes)", "1, 2"]),
        (["--sizes", "one"], ["cannot parse --sizes 'one'"]),
    ]:
        bad = tmp_path / "bad.png"
        result = CliRunner().invoke(run_main, [str(tiny_engines), "--prompt", PROMPT, "-o", str(bad), *args])
        assert result.exit_code == 2 and all(w in result.output for w in words), result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert "Traceback" not in result.output and len(errors) == 1, result.output
        assert not bad.exists()


# ---- output paths -----------------------------------------------------------------------------------------------


def test_check_writable_probes_the_nearest_folder_and_creates_nothing(tmp_path):
    from ddit_runtime.outputs import check_writable

    out = tmp_path / "a" / "b" / "out.png"
    assert check_writable(out, "-o") == out
    assert not list(tmp_path.iterdir())  # neither the folders nor the probe file are left
    (tmp_path / "file").write_text("x")
    with pytest.raises(DDiTError, match=r"cannot write -o .*'.*file' is a file, not a folder"):
        check_writable(tmp_path / "file" / "out.png", "-o")
    with pytest.raises(DDiTError, match="is a folder"):
        check_writable(tmp_path, "--json")


def test_check_frames_dir_takes_new_empty_or_earlier_frames_folders_only(tmp_path):
    from ddit_runtime.outputs import check_frames_dir

    assert check_frames_dir(tmp_path / "new") == tmp_path / "new" and not (tmp_path / "new").exists()
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for name in ("frame_0000.png", "frame_0001.png", "ddit.json"):
        (earlier / name).write_bytes(b"")
    assert check_frames_dir(earlier) == earlier
    (earlier / "frame_1.png").write_bytes(b"")  # not a name save_frames writes
    with pytest.raises(DDiTError, match=r"holds other files \(frame_1.png\)"):
        check_frames_dir(earlier)
    with pytest.raises(DDiTError, match="names no folder of its own"):
        check_frames_dir(".")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DDiTError, match="is a file"):
        check_frames_dir(tmp_path / "file")


def test_readme_python_api_runs(tiny_engines, tmp_path, monkeypatch):
    """The README's Python API block, run as written on the tiny engines (its folder name swapped for theirs): one
    PNG per prompt, each carrying its schedule."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'engines = "engines/"' in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('"engines/"', repr(str(tiny_engines))), "README.md", "exec"), {})
    for seed in (0, 1):
        image = Image.open(tmp_path / f"out_{seed}.png")
        assert image.size == (256, 256) and len(json.loads(image.info["schedule"])) == 20
