"""The embedded-model recipe (smoke version, as CI runs it) and the tiny FLUX shipped in the package."""

import dataclasses
import json
import platform
import resource

import pytest
import torch
from safetensors.torch import load_file

from ddit_export.adapters import load_adapters
from ddit_export.cpu_memory import keep_freed_memory
from ddit_export.loading import load_flux
from ddit_export.recipe import Recipe, RecipeSteps, cpu_has_bf16
from ddit_export.tiny import PACKAGE_MODELS, build_tiny_flux, shipped_adapters, shipped_model


def test_smoke_recipe_builds_a_loadable_model_and_resumes(tmp_path, tiny_spec, capsys):
    out = tmp_path / "recipe"
    summary = Recipe(tiny_spec, out, RecipeSteps.smoke(), seed=0, progress=False).run()
    model = out / "model"
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert (model / part).is_dir(), part
    parts = load_flux(str(model), tiny_spec)  # the real from_pretrained path
    assert parts["vae"].config.scaling_factor != tiny_spec.tiny_configs["vae"]["scaling_factor"]  # measured
    adapters = load_adapters(out / "adapters" / "adapters.safetensors", parts["transformer"], tiny_spec, [1, 2, 4])
    assert adapters.factors == [2, 4] and set(summary["adapters_eval"]) == {"2", "4"}
    assert json.loads((out / "finetune.json").read_text())["steps"] == 2 and "finetune_seconds" in summary
    assert not (model / ".transformer.partial").exists()
    capsys.readouterr()
    Recipe(tiny_spec, out, RecipeSteps.smoke(), seed=0, progress=False).run()  # every stage's output exists
    log = capsys.readouterr().out
    assert "training" not in log and "encoding" not in log and "fine-tuning" not in log, log


def test_smoke_recipe_installs_atomically(tmp_path, tiny_spec):
    out = tmp_path / "recipe"
    steps = dataclasses.replace(RecipeSteps.smoke(), transformer_bf16=True)  # what --fast asks for, less compile
    recipe = Recipe(tiny_spec, out, steps, seed=1, progress=False)
    summary = recipe.run()
    assert summary["transformer_training"] == dict(bf16_autocast=cpu_has_bf16(), compiled=False)
    target = recipe.install(tmp_path / "pkg" / "flux")
    assert (target / "model_index.json").is_file() and (target / "adapters.safetensors").is_file()
    assert not any(p.name.startswith(".") for p in target.parent.iterdir())
    configs = list(target.glob("*/config.json"))  # the fine-tune reloads the transformer: no local path ships
    assert configs and not any("_name_or_path" in json.loads(c.read_text()) for c in configs)


def test_smoke_wan_recipe_builds_a_loadable_model_and_resumes(tmp_path, capsys):
    from diffusers import AutoencoderKLWan

    from ddit_export.wan_loading import load_wan
    from ddit_export.wan_recipe import WanRecipe, WanRecipeSteps
    from ddit_profiles import get_profile

    spec, out = get_profile("wan-tiny"), tmp_path / "wan"
    summary = WanRecipe(spec, out, WanRecipeSteps.smoke(), seed=0, progress=False).run()
    parts = load_wan(str(out / "model"), spec)  # the real from_pretrained path, checked against the profile
    defaults = AutoencoderKLWan(
        **{k: list(v) if isinstance(v, tuple) else v for k, v in spec.tiny_configs["vae"].items()}
    )
    assert parts["vae"].config.latents_mean != defaults.config.latents_mean  # measured on the trained VAE
    assert all(s > 0 for s in parts["vae"].config.latents_std)
    data = load_file(str(out / "latents.safetensors"))
    assert data["latent"].shape == (6, 16, spec.latent_frames(spec.opt_frames), 32, 32)
    assert data["negative"].shape == (1, spec.t5_max_length, spec.text_dim)
    adapters = load_adapters(out / "adapters" / "adapters.safetensors", parts["transformer"], spec, [1, 2, 4])
    assert adapters.factors == [2, 4] and set(summary["adapters_eval"]) == {"2", "4"}
    assert set(summary["text_encoders"]) == {"umt5_accuracy"}
    capsys.readouterr()
    WanRecipe(spec, out, WanRecipeSteps.smoke(), seed=0, progress=False).run()
    log = capsys.readouterr().out
    assert "training" not in log and "encoding" not in log, log


shipped = pytest.mark.skipif(shipped_model() is None, reason="no trained tiny model in the package yet")


@shipped
def test_shipped_tiny_model_is_small_and_trained(tiny_spec):
    folder = shipped_model()
    size = sum(p.stat().st_size for p in PACKAGE_MODELS.rglob("*") if p.is_file())
    assert size <= 40 * 2**20, f"{size / 2**20:.1f} MiB"
    parts = load_flux("tiny", tiny_spec)
    random_init = build_tiny_flux(tiny_spec)["transformer"].state_dict()
    trained = parts["transformer"].state_dict()
    assert any(not torch.equal(trained[k], random_init[k]) for k in trained)
    load_adapters(shipped_adapters(), parts["transformer"], tiny_spec, [1, 2, 4])
    recipe = json.loads((folder / "recipe.json").read_text())
    for k in ("2", "4"):
        assert recipe["adapters_eval"][k]["trained"] < recipe["adapters_eval"][k]["init"]


@pytest.mark.skipif(shipped_model("wan") is None, reason="no trained tiny Wan in the package yet")
def test_shipped_tiny_wan_is_trained_and_matches_its_profile():
    from ddit_export.wan_loading import build_tiny_wan, load_wan
    from ddit_profiles import get_profile

    spec = get_profile("wan-tiny")
    parts = load_wan("tiny", spec)  # the shipped folder, through from_pretrained; checked against the profile
    random_init = build_tiny_wan(spec)["transformer"].state_dict()
    trained = parts["transformer"].state_dict()
    assert trained.keys() == random_init.keys()
    assert any(not torch.equal(trained[k], random_init[k]) for k in trained)
    load_adapters(shipped_adapters("wan"), parts["transformer"], spec, [1, 2, 4])
    recipe = json.loads((shipped_model("wan") / "recipe.json").read_text())
    assert recipe["steps"]["finetune_steps"] > 0
    for k in ("2", "4"):
        assert recipe["adapters_eval"][k]["trained"] < recipe["adapters_eval"][k]["init"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_stops_big_tensors_faulting_in_fresh_pages():
    """After keep_freed_memory, a freed 64 MiB tensor's pages are reused; without it glibc mmaps fresh zeroed pages
    for every one (16384 page faults each: 81925 for the five here, measured)."""
    assert keep_freed_memory()
    torch.ones(16 << 20)  # the first one may grow the heap
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(16 << 20)  # 16 Mi float32 = 64 MiB, written, then freed
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 2 * 16384, f"{faults} page faults for 5 reused 64 MiB tensors: at most one should fault in"


def test_the_shipped_tiny_flux_was_built_by_the_fast_recipe_steps_then_fine_tuned_at_512():
    """``ddit-recipe flux --fast`` built the base model (its recorded steps are ``RecipeSteps.fast()``, at the
    profile's ``recipe_size``); the shipped weights are the last of a chain of ``hires_finetune.py`` runs from it,
    each recorded with its command and steps, at the profile's default shape."""
    from ddit_profiles import get_profile

    recorded = json.loads((PACKAGE_MODELS / "flux" / "recipe.json").read_text())
    assert recorded["steps"] == dataclasses.asdict(RecipeSteps.fast())
    assert recorded["transformer_training"] == {"bf16_autocast": True, "compiled": True}
    spec = get_profile("flux-tiny")
    assert spec.recipe_size == 256 and spec.opt_size == (512, 512)
    chain = recorded["fine_tunes"]
    assert [run["name"] for run in chain] == ["pi1", "pi2", "pi3", "pi4"]
    previous = None
    for run in chain:
        words = run["command"].split()
        assert words[:2] == ["python", "benchmarks/hires_finetune.py"] and run["size"] == spec.opt_size[0]
        assert words[words.index("-o") + 1] == f"build/{run['name']}"
        base = "build/tiny-flux-fast/model"  # ddit-recipe flux --fast's -o, the first fine-tune's start
        assert words[words.index("--model") + 1] == (base if previous is None else f"build/{previous}/model")
        assert int(words[words.index("--steps") + 1]) == run["steps"]["finetune_steps"]
        previous = run["name"]
    for k in ("2", "4"):  # the shipped adapters are the last run's, trained at 512
        assert chain[-1]["adapters_eval"][k]["trained"] < chain[-1]["adapters_eval"][k]["init"]


def test_profile_calibrations_go_only_into_exports_of_the_shipped_weights(tmp_path, tiny_engines):
    """The flux-tiny profile's calibrated tau and fitted TeaCache polynomials were measured on the shipped weights
    and adapters in float32: an export of those carries them, one with other adapters (``tiny_engines``: untrained)
    does not."""
    from ddit_export.flux_export import export_flux
    from ddit_profiles import get_profile
    from ddit_runtime.manifest import load_manifest
    from ddit_runtime.scheduler import tau_and_source

    profile = dataclasses.replace(get_profile("flux-tiny"), opt_size=(256, 256))  # traced at 256: faster
    assert profile.scheduler.calibrated and profile.teacache.fitted
    shipped = export_flux("tiny", profile, [1], tmp_path / "shipped", progress=False)
    assert shipped["profile"]["scheduler"]["calibrated"] and shipped["profile"]["teacache"]["fitted"]
    spec = load_manifest(tmp_path / "shipped").spec
    assert tau_and_source(spec.scheduler, None, 512, 512, None, 20, (1, 2), 0.7)[0] == 0.02
    assert tau_and_source(spec.scheduler, None, 512, 512, None, 20, (1, 2, 4), 0.7) == (spec.scheduler.tau, "profile")
    assert spec.teacache.fitted_for(512, 512, None, 20).coefficients.keys() == {1, 2, 4}
    other = load_manifest(tiny_engines).spec
    assert other.scheduler.calibrated == () and other.teacache.fitted_for(512, 512, None, 20) is None
