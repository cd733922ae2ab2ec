"""PNG output with the generation settings and the patch schedule in its text chunks, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from ddit_profiles import DDiTError

from .outputs import check_writable, discard


def check_png_path(path: str | Path) -> Path:
    """Refuse an output that is not a .png or sits in a folder that cannot be created, before any work is done."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise DDiTError(f"output '{path}' must end in .png")
    if path.is_dir():
        raise DDiTError(f"output '{path}' is a folder: give a file name ending in .png")
    return check_writable(path, "-o")


def save_png(image: torch.Tensor, path: str | Path, settings: dict, schedule: list[int]) -> Path:
    """image [3, H, W] uint8 -> PNG at ``path``; each setting becomes a text chunk, plus ``schedule`` and ``ddit``."""
    path = check_png_path(path)
    info = PngImagePlugin.PngInfo()
    for key, value in settings.items():
        info.add_text(key, str(value))
    info.add_text("schedule", json.dumps(schedule))
    info.add_text("ddit", json.dumps(dict(settings, schedule=schedule)))
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG", pnginfo=info)
        tmp.replace(path)
    except OSError as e:
        discard(tmp)
        raise DDiTError(f"cannot write '{path}' ({e.strerror or e}): pick a writable -o") from None
    return path
