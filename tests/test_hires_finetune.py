"""benchmarks/hires_finetune.py: the shipped tiny FLUX fine-tuned at another resolution, at smoke scale."""

import importlib.util
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ddit_export.recipe import RecipeSteps
from ddit_export.tiny import PACKAGE_MODELS

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "hires_finetune.py"


@pytest.fixture(scope="module")
def hires():
    spec = importlib.util.spec_from_file_location("hires_finetune", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_arguments_are_one_line_errors_and_write_nothing(hires, tmp_path, capsys):
    out = tmp_path / "out"
    assert hires.main(["-o", str(out), "--size", "500"]) == 2
    assert "multiples of 64 pixels" in capsys.readouterr().err
    assert hires.main(["-o", str(out), "--model", str(tmp_path)]) == 2
    assert "has no transformer/ folder" in capsys.readouterr().err
    assert hires.main(["-o", str(out), "--steps", "0"]) == 2
    assert hires.main(["-o", str(out), "--lr", "0"]) == 2
    assert "--lr must be positive" in capsys.readouterr().err
    assert hires.main(["-o", str(out), "--adapter-prompts", "1"]) == 2
    assert "--adapter-prompts must be at least 2" in capsys.readouterr().err
    assert not out.exists()


def test_fine_tunes_the_shipped_model_and_trains_adapters_at_the_new_size(hires, tmp_path, monkeypatch):
    # eager float32 steps: torch.compile would cost minutes here and is not what is under test
    monkeypatch.setattr(hires.RecipeSteps, "fast", classmethod(lambda cls: RecipeSteps()))
    out = tmp_path / "ft"
    args = ["-o", str(out), "--size", "128", "--steps", "2", "--batch", "2", "--examples", "4"]
    assert hires.main([*args, "--adapter-steps", "1", "--adapter-prompts", "2"]) == 0
    latents = load_file(str(out / "latents.safetensors"))["latent"]
    assert tuple(latents.shape) == (4, 16, 16, 16)  # 128 pixels / the VAE's factor 8
    name = "transformer/diffusion_pytorch_model.safetensors"
    before, after = load_file(str(PACKAGE_MODELS / "flux" / name)), load_file(str(out / "model" / name))
    assert before.keys() == after.keys()
    assert any(not before[k].equal(after[k]) for k in before)  # the fine-tune moved the weights
    assert (out / "adapters" / "adapters.safetensors").is_file()
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["steps"]["finetune_steps"] == 2 and recipe["steps"]["examples"] == 4
    assert recipe["steps"]["finetune_lr"] == RecipeSteps.finetune_lr
    assert not (out / ".model.partial").exists()


def test_mix_size_arguments_are_checked(hires, tmp_path, capsys):
    out = tmp_path / "out"
    assert hires.main(["-o", str(out), "--mix-size", "300"]) == 2
    assert "multiples of 64 pixels" in capsys.readouterr().err
    assert hires.main(["-o", str(out), "--mix-size", "256", "--mix-every", "1"]) == 2
    assert "--mix-every must be at least 2" in capsys.readouterr().err
    assert hires.main(["-o", str(out), "--latents-from", str(tmp_path)]) == 2
    assert "has no latents.safetensors" in capsys.readouterr().err
    assert not out.exists()


def test_mix_size_trains_every_nth_step_on_the_second_size(hires, tmp_path, monkeypatch):
    monkeypatch.setattr(hires.RecipeSteps, "fast", classmethod(lambda cls: RecipeSteps()))
    draws = []
    original = hires.MixedSizeRecipe._draw

    def draw(self, data, gen, step, mu):
        idx, x0, mu_step = original(self, data, gen, step, mu)
        draws.append((step, idx.tolist(), tuple(x0.shape), mu_step))
        return idx, x0, mu_step

    monkeypatch.setattr(hires.MixedSizeRecipe, "_draw", draw)
    first = tmp_path / "first"
    small = ["--steps", "1", "--batch", "2", "--examples", "4", "--adapter-steps", "1", "--adapter-prompts", "2"]
    assert hires.main(["-o", str(first), "--size", "192", *small]) == 0
    out = tmp_path / "mixed"
    args = ["-o", str(out), "--model", str(first / "model"), "--latents-from", str(first), "--size", "192"]
    mix = ["--mix-size", "128", "--mix-every", "2", "--mix-examples", "3", "--shifted", "--steps", "4"]
    draws.clear()
    assert hires.main([*args, *mix, *small[2:]]) == 0
    # the main size's latents came from the first run, not encoded again; the second size's were encoded once
    assert load_file(str(out / "latents.safetensors"))["latent"].equal(
        load_file(str(first / "latents.safetensors"))["latent"]
    )
    assert tuple(load_file(str(out / "latents-128.safetensors"))["latent"].shape) == (3, 16, 16, 16)
    assert len(json.loads((out / "captions-128.json").read_text())) == 3
    fine_tune = draws[:4]
    assert [shape for _, _, shape, _ in fine_tune] == [(2, 16, 24, 24), (2, 16, 16, 16)] * 2
    assert all(max(idx) < 4 for _, idx, _, _ in fine_tune[0::2])  # the main size's conditioning rows
    assert all(4 <= i < 7 for _, idx, _, _ in fine_tune[1::2] for i in idx)  # the second size's, after them
    assert fine_tune[0][3] > fine_tune[1][3]  # each size at its own sigma shift (more tokens: a larger mu)
