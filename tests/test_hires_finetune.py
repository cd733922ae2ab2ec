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
    assert not (out / ".model.partial").exists()
