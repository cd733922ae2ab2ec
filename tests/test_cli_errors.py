"""Every bad input of ddit-export and ddit-run: exit status 2, one 'error:' line naming the problem, no traceback,
and nothing written. Export errors are caught before any graph is exported."""

import json
import shutil
import time

import pytest
from click.testing import CliRunner
from PIL import Image

from ddit_cli import bench_main, export_main, run_main

PROMPT = "a red circle on a black background"


def _invoke(command, args):
    return CliRunner().invoke(command, [str(a) for a in args])


def _one_line_error(result, *words) -> str:
    """Assert the CLI refused the input the documented way; return the error line."""
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output!r} {result.exception!r}"
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]  # the last thing said
    assert "error:" not in result.stdout
    for word in words:
        assert word in errors[0], f"{word!r} not in {errors[0]!r}"
    return errors[0]


def _no_leftovers(folder):
    assert not [p.name for p in folder.iterdir() if ".partial-" in p.name]


# ---- ddit-run: a broken engines folder --------------------------------------------------------------------------


@pytest.fixture
def engines_copy(tiny_engines, tmp_path):
    """A private copy of the shared engines folder that a test may corrupt."""
    return shutil.copytree(tiny_engines, tmp_path / "engines")


def _edit_manifest(folder, edit):
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _run_on(folder, tmp_path, *extra):
    out = tmp_path / "out.png"
    result = _invoke(run_main, [folder, "--prompt", PROMPT, "-o", out, "--steps", 2, *extra])
    return result, out


def _assert_run_refused(result, out, *words):
    line = _one_line_error(result, *words)
    assert not out.exists()
    _no_leftovers(out.parent)
    return line


def test_run_missing_engines_folder(tmp_path):
    result, out = _run_on(tmp_path / "nope", tmp_path)
    _assert_run_refused(result, out, "nope", "does not exist")


def test_run_folder_without_manifest(tmp_path):
    (tmp_path / "empty").mkdir()
    result, out = _run_on(tmp_path / "empty", tmp_path)
    _assert_run_refused(result, out, "has no manifest.json")


def test_run_corrupt_manifest(engines_copy, tmp_path):
    (engines_copy / "manifest.json").write_text('{"format": "ddit-engines", "sizes": [1, 2')
    result, out = _run_on(engines_copy, tmp_path)
    _assert_run_refused(result, out, "corrupt manifest.json")


@pytest.mark.parametrize("key", ["sizes", "files", "profile", "components"])
def test_run_manifest_missing_a_required_key(engines_copy, tmp_path, key):
    _edit_manifest(engines_copy, lambda d: d.pop(key))
    result, out = _run_on(engines_copy, tmp_path)
    _assert_run_refused(result, out, "without", key)


def test_run_wrong_format_version(engines_copy, tmp_path):
    _edit_manifest(engines_copy, lambda d: d.update(format_version=2))
    result, out = _run_on(engines_copy, tmp_path)
    _assert_run_refused(result, out, "v2", "v1", "re-export")


def test_run_unknown_family(engines_copy, tmp_path):
    _edit_manifest(engines_copy, lambda d: d.update(family="sdxl"))
    result, out = _run_on(engines_copy, tmp_path)
    _assert_run_refused(result, out, "unknown family 'sdxl'")


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_run_file_of_wrong_size(engines_copy, tmp_path, verify):
    path = engines_copy / "transformer_k2.onnx"
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\0")
    result, out = _run_on(engines_copy, tmp_path, *([] if verify else ["--no-verify"]))
    _assert_run_refused(result, out, "transformer_k2.onnx", f"{size + 1} bytes", str(size))


def test_run_same_size_corruption_is_a_sha256_mismatch(engines_copy, tmp_path):
    path = engines_copy / "transformer_k2.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    result, out = _run_on(engines_copy, tmp_path)
    _assert_run_refused(result, out, "transformer_k2.onnx", "sha256")


def test_run_missing_file_listed_in_manifest(engines_copy, tmp_path):
    (engines_copy / "vae_decoder.onnx").unlink()
    result, out = _run_on(engines_copy, tmp_path)
    _assert_run_refused(result, out, "missing vae_decoder.onnx")


def test_no_verify_skips_sha256_but_not_sizes(engines_copy, tmp_path):
    # Same size, still valid JSON: one indentation space of the tokenizer file becomes a tab.
    path = engines_copy / "tokenizer" / "tokenizer.json"
    text = path.read_bytes()
    at = text.index(b'\n  "') + 1
    path.write_bytes(text[:at] + b"\t" + text[at + 1 :])
    assert path.stat().st_size == len(text)

    result, out = _run_on(engines_copy, tmp_path)
    _assert_run_refused(result, out, "tokenizer/tokenizer.json", "sha256")

    result, out = _run_on(engines_copy, tmp_path, "--no-verify")
    assert result.exit_code == 0, result.output
    assert out.is_file() and Image.open(out).size == (256, 256)


# ---- ddit-run: bad arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--height", 2048, "--width", 2048], ["2048x2048", "outside", "128x128 to 512x512"]),
        (["--height", 128, "--width", 1024], ["128x1024", "outside"]),
        (["--height", 0], ["0x256", "outside"]),
        (["--height", 200, "--width", 256], ["200x256", "multiples of 64", "192 or 256x256"]),
        (["--schedule", "8"], ["patch size 8", "not exported", "1, 2, 4"]),
        (["--schedule", "1,2,4"], ["3 entries", "--steps is 2"]),
        (["--schedule", "abc"], ["cannot parse schedule 'abc'"]),
        (["--schedule", "1,x"], ["cannot parse schedule '1,x'"]),
        (["--rho", 1.5], ["rho", "[0, 1]", "1.5"]),
        (["--rho", -0.1], ["rho", "[0, 1]", "-0.1"]),
    ],
    ids=[
        "too-large",
        "too-wide",
        "zero-height",
        "not-multiple",
        "unexported-size",
        "schedule-length",
        "schedule-garbage",
        "schedule-partly-garbage",
        "rho-above-1",
        "rho-below-0",
    ],
)
def test_run_bad_arguments(tiny_engines, tmp_path, extra, words):
    result, out = _run_on(tiny_engines, tmp_path, *extra)
    _assert_run_refused(result, out, *words)


@pytest.mark.parametrize("steps", [0, -1])
def test_run_steps_below_one(tiny_engines, tmp_path, steps):
    out = tmp_path / "out.png"
    result = _invoke(run_main, [tiny_engines, "--prompt", PROMPT, "-o", out, "--steps", steps])
    _assert_run_refused(result, out, "--steps", str(steps))


@pytest.mark.parametrize("prompt", ["", "   "], ids=["empty", "whitespace"])
def test_run_empty_prompt(tiny_engines, tmp_path, prompt):
    out = tmp_path / "out.png"
    result = _invoke(run_main, [tiny_engines, "--prompt", prompt, "-o", out])
    _assert_run_refused(result, out, "prompt is empty")


@pytest.mark.parametrize("name", ["out.jpg", "out", "out.png.txt"])
def test_run_output_not_png(tiny_engines, tmp_path, name):
    out = tmp_path / name
    result = _invoke(run_main, [tiny_engines, "--prompt", PROMPT, "-o", out, "--steps", 2])
    _assert_run_refused(result, out, name, "must end in .png")
    assert not list(tmp_path.iterdir())


def test_run_output_is_a_folder(tiny_engines, tmp_path):
    out = tmp_path / "dir.png"
    out.mkdir()
    result = _invoke(run_main, [tiny_engines, "--prompt", PROMPT, "-o", out, "--steps", 2])
    _one_line_error(result, "dir.png", "is a folder")
    assert out.is_dir() and not list(out.iterdir())


@pytest.fixture
def no_generation(monkeypatch):
    """Fail the test loudly if ddit-run starts generating before the bad input was refused."""
    from ddit_runtime.pipeline import FluxRuntime

    def refuse(*args, **kwargs):
        raise AssertionError("the generation ran before the bad output path was refused")

    monkeypatch.setattr(FluxRuntime, "generate", refuse)


def test_run_output_that_cannot_be_written_is_refused_before_generating(tiny_engines, tmp_path, no_generation):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    out = blocker / "sub" / "out.png"
    result = _invoke(run_main, [tiny_engines, "--prompt", PROMPT, "-o", out, "--steps", 2])
    _one_line_error(result, "cannot write -o", "notes.txt' is a file, not a folder")
    assert blocker.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_run_output_in_new_folders_creates_them(tiny_engines, tmp_path):
    out = tmp_path / "a" / "b" / "out.png"
    result = _invoke(run_main, [tiny_engines, "--prompt", PROMPT, "-o", out, "--steps", 2])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (256, 256) and sorted(p.name for p in out.parent.iterdir()) == ["out.png"]


def test_run_overlong_prompt_is_truncated_with_a_warning(tiny_engines, tmp_path):
    prompt = " ".join(["red circle blue square"] * 10)  # 40 words: over T5's 32 tokens, under CLIP's 77
    out = tmp_path / "long.png"
    result = _invoke(run_main, [tiny_engines, "--prompt", prompt, "-o", out, "--steps", 2])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    warnings = [line for line in result.stderr.splitlines() if "truncated" in line]
    assert len(warnings) == 1 and "T5" in warnings[0] and "32" in warnings[0], result.stderr
    assert not any(line.startswith("error:") for line in result.stderr.splitlines())
    assert out.is_file() and Image.open(out).text["prompt"] == prompt


def test_run_short_prompt_has_no_truncation_warning(tiny_engines, tmp_path):
    out = tmp_path / "short.png"
    result = _invoke(run_main, [tiny_engines, "--prompt", PROMPT, "-o", out, "--steps", 2])
    assert result.exit_code == 0, result.output
    assert "truncated" not in result.stderr and out.is_file()


# ---- ddit-export ------------------------------------------------------------------------------------------------


@pytest.fixture
def no_export(monkeypatch):
    """Fail the test loudly if the exporter gets as far as staging a folder or exporting a graph."""
    from ddit_export import flux_export

    def refuse(*args, **kwargs):
        raise AssertionError("the export started before the bad input was refused")

    monkeypatch.setattr(flux_export, "export_onnx", refuse)
    monkeypatch.setattr(flux_export, "staging_folder", refuse)


def _export(tmp_path, *args):
    out = tmp_path / "out"
    started = time.perf_counter()
    result = _invoke(export_main, [*args, "-o", out, "--quiet"])
    assert time.perf_counter() - started < 30, "refusing a bad input must not take an export's time"
    return result, out


def _assert_export_refused(result, out, *words):
    line = _one_line_error(result, *words)
    assert not out.exists()
    _no_leftovers(out.parent)
    assert not list(out.parent.glob(".out.*"))
    return line


@pytest.mark.parametrize(
    "args, words",
    [
        (["sdxl"], ["unknown model family 'sdxl'", "flux"]),
        (["flux", "--sizes", "1,3"], ["powers of two", "[3]"]),
        (["flux", "--sizes", "2,4"], ["native size 1", "add 1"]),
        (["flux", "--sizes", "a,b"], ["cannot parse --sizes 'a,b'"]),
        (["flux", "--sizes", "1,8"], ["[8]", "not offered by profile 'flux-tiny'", "[1, 2, 4]"]),
        (["flux", "--sizes", ","], ["no patch sizes"]),
        (["flux", "--profile", "nope"], ["unknown profile 'nope'", "flux-tiny"]),
        (["flux", "--model", "not a hub id at all!"], ["'not a hub id at all!'", "neither a local diffusers folder"]),
    ],
    ids=["family", "not-power-of-two", "without-1", "unparsable", "not-offered", "empty", "profile", "model-id"],
)
def test_export_bad_arguments(tmp_path, no_export, args, words):
    result, out = _export(tmp_path, *args)
    _assert_export_refused(result, out, *words)


def test_export_existing_output_is_left_untouched(tmp_path, no_export):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _invoke(export_main, ["flux", "-o", out, "--quiet"])
    _one_line_error(result, "already exists", "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    _no_leftovers(tmp_path)


def test_export_output_under_a_file_says_which_path_is_a_file(tmp_path, no_export):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    result = _invoke(export_main, ["flux", "-o", blocker / "engines", "--quiet"])
    _one_line_error(result, "cannot write -o", "notes.txt' is a file, not a folder")
    assert blocker.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_export_model_folder_that_is_not_diffusers(tmp_path, no_export):
    model = tmp_path / "model"
    model.mkdir()
    (model / "random.bin").write_bytes(b"\x00\x01garbage")
    result, out = _export(tmp_path, "flux", "--model", model)
    _assert_export_refused(result, out, "not a diffusers FLUX folder", "transformer")


def test_export_adapters_file_missing(tmp_path, no_export):
    result, out = _export(tmp_path, "flux", "--adapters", tmp_path / "missing.safetensors")
    _assert_export_refused(result, out, "missing.safetensors", "does not exist")


def test_export_adapters_file_not_safetensors(tmp_path, no_export):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x13\x37 this is not a safetensors file " * 4)
    result, out = _export(tmp_path, "flux", "--adapters", path)
    _assert_export_refused(result, out, "garbage.safetensors", "not a readable safetensors file")


def test_export_adapters_for_another_model(tmp_path, tiny_spec, no_export):
    from diffusers import FluxTransformer2DModel

    from ddit_export.adapters import untrained_adapters

    other = FluxTransformer2DModel(**dict(tiny_spec.tiny_configs["transformer"], num_layers=1))
    path = tmp_path / "other.safetensors"
    untrained_adapters(other, tiny_spec, [1, 2, 4]).save(path)
    result, out = _export(tmp_path, "flux", "--adapters", path)
    _assert_export_refused(
        result,
        out,
        "other.safetensors",
        "another model",
        f"num_layers 1 != {tiny_spec.tiny_configs['transformer']['num_layers']}",
    )


def test_export_adapters_without_a_requested_size(tmp_path, tiny_spec, tiny_parts, no_export):
    from ddit_export.adapters import untrained_adapters

    path = tmp_path / "two.safetensors"
    untrained_adapters(tiny_parts["transformer"], tiny_spec, [1, 2]).save(path)
    result, out = _export(tmp_path, "flux", "--sizes", "1,2,4", "--adapters", path)
    _assert_export_refused(result, out, "two.safetensors", "has sizes [2] but not [4]")


# ---- help ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, options",
    [
        (export_main, ["FAMILY", "--sizes", "--model", "--profile", "--adapters", "--output", "--force", "--quiet"]),
        (
            run_main,
            [
                "ENGINES_DIR",
                "--prompt",
                "--output",
                "--steps",
                "--seed",
                "--height",
                "--width",
                "--tau",
                "--rho",
                "--schedule",
                "--sizes",
                "--backend",
                "--no-verify",
                "--json",
            ],
        ),
        (
            bench_main,
            ["ENGINES_DIR", "--count", "--seeds", "--taus", "--sizes", "--json", "--plot", "--save-tau", "--min-ssim"],
        ),
    ],
    ids=["ddit-export", "ddit-run", "ddit-bench"],
)
def test_help(command, options):
    for flag in ("--help", "-h"):
        result = _invoke(command, [flag])
        assert result.exit_code == 0, result.output
        for option in options:
            assert option in result.stdout, option


# ---- ddit-recipe ------------------------------------------------------------------------------------------------


def test_recipe_fast_is_refused_for_wan_before_anything_is_written(tmp_path):
    from ddit_cli import recipe_main

    out = tmp_path / "wan"
    _one_line_error(_invoke(recipe_main, ["wan", "--fast", "--smoke", "-o", out]), "--fast", "flux")
    assert not out.exists()


def test_recipe_output_under_a_file_is_one_line(tmp_path):
    from ddit_cli import recipe_main

    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    _one_line_error(_invoke(recipe_main, ["flux", "--smoke", "-o", blocker / "tiny"]), "cannot create output folder")
    assert blocker.read_text() == "mine"
