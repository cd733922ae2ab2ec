"""The Wan runtime on the shared tiny Wan engines: CFG, UniPC sampling, engine switching, MP4/frames output, and
the CLI's Wan options and errors."""

import json
import subprocess

import imageio.v3 as iio
import imageio_ffmpeg
import pytest
import torch
from click.testing import CliRunner

from ddit_cli import run_main
from ddit_profiles import DDiTError
from ddit_runtime.wan_pipeline import WanRuntime

PROMPT = "a red circle moving from left to right on a black background"


@pytest.fixture(scope="module")
def runtime(wan_engines):
    return WanRuntime(wan_engines, provider="cpu")


def test_video_shape_and_determinism(runtime):
    a = runtime.generate(PROMPT, frames=5, steps=4, seed=1, schedule=[1] * 4, progress=False)
    b = runtime.generate(PROMPT, frames=5, steps=4, seed=1, schedule=[1] * 4, progress=False)
    assert a.image.shape == (5, 3, 256, 256) and a.image.dtype == torch.uint8
    assert torch.equal(a.image, b.image)


def test_batched_and_two_pass_cfg_agree(runtime):
    kw = dict(frames=5, steps=4, seed=2, schedule=[1, 1, 2, 4], progress=False)
    batched = runtime.generate(PROMPT, cfg="batched", **kw)
    two = runtime.generate(PROMPT, cfg="two-pass", **kw)
    assert (batched.image.int() - two.image.int()).abs().max() <= 1
    no_cfg = runtime.generate(PROMPT, guidance_scale=1.0, **kw)
    assert not torch.equal(no_cfg.image, batched.image)  # guidance really changes the result


def test_auto_schedule_switches_after_warmup(runtime):
    result = runtime.generate(PROMPT, frames=5, steps=6, tau=1e9, progress=False)
    assert result.schedule == [1, 1, 1, 4, 4, 4]
    assert runtime.generate(PROMPT, frames=5, steps=6, tau=0.0, progress=False).schedule == [1] * 6


def test_sizes_leave_a_size_out_of_ddits_choice(wan_engines, runtime):
    subset = WanRuntime(wan_engines, provider="cpu", sizes=[1, 2])
    assert sorted(subset.engines) == [1, 2]
    result = subset.generate(PROMPT, frames=5, steps=6, seed=4, tau=1e9, progress=False)
    assert result.schedule == [1, 1, 1, 2, 2, 2] and result.settings["sizes"] == [1, 2]
    full = runtime.generate(PROMPT, frames=5, steps=6, seed=4, schedule=result.schedule, progress=False)
    assert torch.equal(result.image, full.image)
    with pytest.raises(DDiTError, match=r"uses patch sizes \[4\], but only \[1, 2\] are loaded"):
        subset.generate(PROMPT, frames=5, steps=2, schedule=[1, 4], progress=False)


def test_non_square_and_padded_sizes(runtime):
    """144 px rows give a latent of 18: the 4p engine pads to 24 and crops back."""
    result = runtime.generate(PROMPT, frames=5, height=144, width=192, steps=3, schedule=[4, 4, 4], progress=False)
    assert result.image.shape == (5, 3, 144, 192)
    # The scheduler tiles the ragged latent as the engines pad it (it once refused: Wan at 480p, 60 rows, crashed
    # at the first scheduled step).
    auto = runtime.generate(PROMPT, frames=5, height=144, width=192, steps=5, tau=1e9, progress=False)
    assert auto.schedule == [1, 1, 1, 4, 4] and auto.image.shape == (5, 3, 144, 192)


def test_bad_frames_and_sizes(runtime):
    with pytest.raises(DDiTError, match="4n\\+1"):
        runtime.generate(PROMPT, frames=8, steps=2, progress=False)
    with pytest.raises(DDiTError):
        runtime.generate(PROMPT, frames=5, height=100, width=256, steps=2, progress=False)
    with pytest.raises(DDiTError, match="--cfg"):
        runtime.generate(PROMPT, frames=5, steps=2, cfg="fancy", progress=False)


def test_cli_writes_mp4_with_metadata(wan_engines, tmp_path):
    out = tmp_path / "clip.mp4"
    result = CliRunner().invoke(
        run_main,
        [
            str(wan_engines),
            "--prompt",
            PROMPT,
            "-o",
            str(out),
            "--frames",
            "9",
            "--steps",
            "4",
            "--schedule",
            "1,1,2,4",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schedule"] == [1, 1, 2, 4] and report["frames"] == 9 and len(report["step_ms"]) == 4
    assert all(0 < e < t for e, t in zip(report["engine_ms"], report["step_ms"], strict=True))
    video = iio.imread(out)
    assert video.shape == (9, 256, 256, 3)
    sidecar = json.loads((tmp_path / "clip.mp4.json").read_text())
    assert sidecar["schedule"] == [1, 1, 2, 4] and sidecar["prompt"] == PROMPT and sidecar["seed"] == 0
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(out)], capture_output=True, text=True)
    comment = next(line for line in probe.stderr.splitlines() if line.strip().startswith("comment"))
    assert '"schedule":[1,1,2,4]' in comment and '"seed":0' in comment


def test_cli_frames_dir(wan_engines, tmp_path):
    folder = tmp_path / "frames"
    result = CliRunner().invoke(
        run_main,
        [
            str(wan_engines),
            "--prompt",
            PROMPT,
            "--frames-dir",
            str(folder),
            "--frames",
            "5",
            "--steps",
            "2",
            "--schedule",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"frame_{i:04d}.png" for i in range(5)] + ["ddit.json"])


def test_cli_frames_dir_holding_other_files_is_refused_before_generating(wan_engines, tmp_path, monkeypatch):
    """Writing frames replaces the folder whole, so a folder of the user's own files is never taken."""
    from ddit_runtime.wan_pipeline import WanRuntime

    def refuse(*args, **kwargs):
        raise AssertionError("the generation ran before the bad --frames-dir was refused")

    monkeypatch.setattr(WanRuntime, "generate", refuse)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    (folder / "frame_0000.png").write_bytes(b"earlier frame")
    args = [str(wan_engines), "--prompt", PROMPT, "--frames-dir", str(folder), "--steps", "2"]
    result = CliRunner().invoke(run_main, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("error: --frames-dir") and "notes.txt" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["frame_0000.png", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frames", "8"], "4n+1"),
        (["--frames", "3"], "4n+1"),
        (["-o", "clip.png"], ".mp4"),
        (["--guidance", "3.5"], "--guidance-scale"),
        (["--height", "2048"], "outside"),
    ],
)
def test_cli_wan_errors_are_one_line(wan_engines, tmp_path, args, message):
    result = CliRunner().invoke(run_main, [str(wan_engines), "--prompt", PROMPT, "--steps", "2", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and message in lines[-1], result.stderr
    assert "Traceback" not in result.output


def test_flux_only_options_are_refused_for_wan_and_back(tiny_engines, tmp_path):
    result = CliRunner().invoke(
        run_main, [str(tiny_engines), "--prompt", "a red circle", "--frames", "9", "-o", str(tmp_path / "x.png")]
    )
    assert result.exit_code == 2 and "applies to Wan engines" in result.stderr


def test_a_tau_calibrated_for_a_shape_is_used_there(wan_engines, tmp_path):
    """A tau recorded in the manifest (as ddit-bench --save-tau does) for 5 frames at 6 steps: taken there, and
    the profile's at 7 steps."""
    import shutil

    from ddit_export.manifest import save_calibrated_tau
    from ddit_profiles import CalibratedTau

    engines = tmp_path / "engines"
    shutil.copytree(wan_engines, engines)
    spec = WanRuntime(engines, provider="cpu").spec
    h, w = spec.opt_size
    save_calibrated_tau(engines, CalibratedTau(h, w, 5, 6, (1, 2, 4), spec.scheduler.rho, 1e9, "test"))
    calibrated = WanRuntime(engines, provider="cpu")
    at = calibrated.generate(PROMPT, frames=5, steps=6, progress=False)
    assert at.schedule == [1, 1, 1, 4, 4, 4] and at.settings["tau"] == 1e9
    assert at.settings["tau_source"].startswith("calibrated: 5 frames of")
    off = calibrated.generate(PROMPT, frames=5, steps=7, progress=False)
    assert (off.settings["tau"], off.settings["tau_source"]) == (spec.scheduler.tau, "profile")
