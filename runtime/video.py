"""Video output: MP4 through imageio-ffmpeg's bundled ffmpeg (settings in its comment tag and a sidecar JSON),
or a folder of PNG frames. Both are written to a temporary name and renamed, so nothing half-written is left."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from PIL import Image

from ddit_profiles import DDiTError

from .outputs import FRAMES_SETTINGS, check_frames_dir, check_writable, discard


def check_video_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise DDiTError(f"output '{path}' must end in .mp4 for Wan engines (or pass --frames-dir DIR for PNG frames)")
    if path.is_dir():
        raise DDiTError(f"output '{path}' is a folder: give a file name ending in .mp4")
    return check_writable(path, "-o")


def save_mp4(frames: torch.Tensor, path: str | Path, settings: dict, fps: int = 16) -> Path:
    """frames [F, 3, H, W] uint8 -> H.264 MP4 at ``path`` plus ``path.json`` with the settings and schedule."""
    import imageio_ffmpeg

    path = check_video_path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}.mp4")
    _, _, height, width = frames.shape
    first = ("schedule", "seed", "steps", "tau", "rho", "frames")  # what a reader of the tag wants first
    ordered = {k: settings[k] for k in first if k in settings} | settings
    comment = json.dumps(ordered, separators=(",", ":"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = imageio_ffmpeg.write_frames(
            str(tmp),
            (width, height),
            fps=fps,
            codec="libx264",
            quality=8,
            macro_block_size=1,
            output_params=["-metadata", f"comment={comment}"],
            ffmpeg_log_level="error",
        )
        writer.send(None)
        for frame in frames:
            writer.send(frame.permute(1, 2, 0).contiguous().numpy().tobytes())
        writer.close()
        tmp.replace(path)
        path.with_name(path.name + ".json").write_text(json.dumps(settings, indent=1) + "\n")
    except OSError as e:
        discard(tmp)
        raise DDiTError(f"cannot write '{path}' ({e.strerror or e}): pick a writable -o") from None
    return path


def save_frames(frames: torch.Tensor, folder: str | Path, settings: dict) -> Path:
    """frames [F, 3, H, W] uint8 -> ``folder/frame_0000.png`` ... plus ``folder/ddit.json``. The folder is replaced
    whole, so one that holds other files is refused (``check_frames_dir``)."""
    folder = check_frames_dir(folder)
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i, frame in enumerate(frames):
            Image.fromarray(frame.permute(1, 2, 0).numpy()).save(tmp / f"frame_{i:04d}.png")
        (tmp / FRAMES_SETTINGS).write_text(json.dumps(settings, indent=1) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DDiTError(
            f"cannot write frames to '{folder}' ({e.strerror or e}): pick a writable --frames-dir"
        ) from None
    return folder
