"""The engines folder's ``manifest.json``: its format, and the validation the runtime runs before loading anything."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ddit_profiles import DDiTError, Spec, spec_from_dict

FORMAT = "ddit-engines"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FAMILIES = {"flux", "wan"}
#: Components besides the transformer engines that each family's manifest must list.
FAMILY_COMPONENTS = {"flux": ("text_encoder", "text_encoder_2", "vae_decoder"), "wan": ("text_encoder", "vae_decoder")}
REQUIRED = (
    "format",
    "format_version",
    "family",
    "profile",
    "sizes",
    "files",
    "components",
    "io",
    "shapes",
    "scheduler",
    "latent",
    "sigmas",
)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """A validated engines folder."""

    folder: Path
    data: dict
    spec: Spec

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(self.data["sizes"])

    def path(self, name: str) -> Path:
        return self.folder / name

    def transformer_path(self, factor: int) -> Path:
        return self.path(self.data["components"]["transformer"][str(factor)]["onnx"])

    def component(self, name: str) -> dict:
        return self.data["components"][name]


def _fail(folder: Path, what: str) -> DDiTError:
    return DDiTError(f"engines folder '{folder}' {what}: re-export it with ddit-export")


def load_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """Read and check ``folder/manifest.json``: format, family, sizes, components, and every file's sha256."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DDiTError(f"engines folder '{folder}' does not exist: run ddit-export first, or check the path")
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise _fail(folder, f"has no {MANIFEST}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(folder, f"has a corrupt {MANIFEST} ({e})") from None
    if not isinstance(data, dict) or (missing := [k for k in REQUIRED if k not in data]):
        raise _fail(folder, f"has a manifest without {', '.join(missing) if isinstance(data, dict) else 'fields'}")
    if data["format"] != FORMAT or data["format_version"] != FORMAT_VERSION:
        raise DDiTError(
            f"engines folder '{folder}' has format {data['format']} v{data['format_version']}, but this "
            f"runtime reads {FORMAT} v{FORMAT_VERSION}: re-export it, or use a matching ddit version"
        )
    if data["family"] not in FAMILIES:
        raise _fail(
            folder, f"is for unknown family '{data['family']}' (this runtime knows {', '.join(sorted(FAMILIES))})"
        )
    spec = spec_from_dict(data["profile"])
    _check_components(folder, data)
    _check_files(folder, data, verify)
    return Manifest(folder, data, spec)


def _check_components(folder: Path, data: dict) -> None:
    sizes, comps = data["sizes"], data["components"]
    if not sizes or 1 not in sizes or any(not isinstance(k, int) or k < 1 or k & (k - 1) for k in sizes):
        raise _fail(folder, f"lists invalid sizes {sizes}")
    missing = [f"transformer k={k}" for k in sizes if str(k) not in comps.get("transformer", {})]
    missing += [c for c in FAMILY_COMPONENTS[data["family"]] if c not in comps]
    if missing:
        raise _fail(folder, f"lacks {', '.join(missing)} in its manifest")


def _check_files(folder: Path, data: dict, verify: bool) -> None:
    files = data["files"]
    if not isinstance(files, dict) or not files:
        raise _fail(folder, "lists no files")
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            raise _fail(folder, f"is missing {name}")
        if path.stat().st_size != meta.get("bytes"):
            raise _fail(folder, f"has {name} of {path.stat().st_size} bytes, the manifest says {meta.get('bytes')}")
        if verify and sha256_file(path) != meta.get("sha256"):
            raise _fail(folder, f"has {name} with a sha256 that does not match the manifest (corrupt or modified)")


def peek_family(folder: str | Path) -> str | None:
    """The manifest's family, read without validation (None if unreadable; ``load_manifest`` then says why)."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
        return data.get("family") if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None
