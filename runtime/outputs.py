"""Output paths checked before any work: a generation or a benchmark can take minutes, and its result must not be
lost to a folder that cannot be written, found only when the file is saved."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from ddit_profiles import DDiTError

FRAME_FILE = re.compile(r"frame_\d{4,}\.png")  # what save_frames writes
FRAMES_SETTINGS = "ddit.json"


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_writable(path: str | Path, option: str) -> Path:
    """Refuse ``path`` (a file to be written later) unless its folder exists and takes a new file, or can be created.
    ``option`` names the flag in the one-line error."""
    path = Path(path)
    if path.is_dir():
        raise DDiTError(f"{option} '{path}' is a folder: give a file name")
    check_folder_writable(path.absolute().parent, option, path)
    return path


def check_folder_writable(folder: Path, option: str, shown: Path) -> None:
    """Refuse unless ``folder`` takes a new file or can be created. Probes the nearest existing folder with a
    temporary file that is removed at once, so nothing is left behind (``os.access`` alone passes anything for
    root). ``shown`` is the path the user gave, named in the error."""
    folder = _nearest_existing(folder)
    if not folder.is_dir():
        raise DDiTError(f"cannot write {option} '{shown}': '{folder}' is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ddit-write-test-"):
            pass
    except OSError as e:
        raise DDiTError(f"cannot write {option} '{shown}' ({e.strerror or e}): pick a writable path") from None


def check_frames_dir(folder: str | Path) -> Path:
    """Refuse a ``--frames-dir`` that cannot be written, or that holds anything but an earlier frames output:
    writing the frames replaces the whole folder, so a folder of other files is never taken."""
    folder = Path(folder)
    if folder.name in ("", ".", ".."):  # "." or "..": the folder would be replaced from inside itself
        raise DDiTError(f"--frames-dir '{folder}' names no folder of its own: give a new folder such as frames/")
    if folder.exists():
        if not folder.is_dir():
            raise DDiTError(f"--frames-dir '{folder}' is a file: give a folder")
        others = sorted(
            p.name for p in folder.iterdir() if not (FRAME_FILE.fullmatch(p.name) or p.name == FRAMES_SETTINGS)
        )
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise DDiTError(
                f"--frames-dir '{folder}' holds other files ({shown}), and writing frames replaces the folder: "
                "give a new or empty folder"
            )
    check_writable(folder / FRAMES_SETTINGS, "--frames-dir")
    return folder


def discard(path: Path) -> None:
    """Remove a temporary file if it is there; a failed write must report its own error, not this one's."""
    try:
        path.unlink()
    except OSError:
        pass
