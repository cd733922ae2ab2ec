"""Model-family specs: one per family, all shape arithmetic in one place. Installed as ``ddit_profiles``."""

from .errors import DDiTError
from .flux import FLUX, FLUX_DEV_SHAPE, FLUX_TINY
from .spec import (
    FP8_MIN_CC,
    PRECISIONS,
    CalibratedTau,
    FittedTeaCache,
    FlowShift,
    FluxSpec,
    SchedulerDefaults,
    TeaCacheSpec,
    Tolerance,
)
from .wan import WAN, WAN_13B_SHAPE, WAN_TINY, WanSpec

#: Any family's spec (they share ``name``, ``family``, ``check_factors``, ``patch_pixels``, ``to_dict``...).
Spec = FluxSpec | WanSpec

PROFILES: dict[str, Spec] = {
    spec.name: spec for spec in (FLUX, FLUX_TINY, FLUX_DEV_SHAPE, WAN, WAN_TINY, WAN_13B_SHAPE)
}

#: The family a CLI family name maps to, and the profile ``--model tiny`` selects in it.
FAMILIES = {"flux": {"default": "flux", "tiny": "flux-tiny"}, "wan": {"default": "wan", "tiny": "wan-tiny"}}

#: The spec class of each family, for rebuilding a spec from a manifest's profile block.
SPEC_CLASSES = {"flux": FluxSpec, "wan": WanSpec}


def get_profile(name: str) -> Spec:
    """Look a profile up by name, with a one-line error listing the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise DDiTError(f"unknown profile '{name}': known profiles are {', '.join(PROFILES)}") from None


def profile_for(family: str, model: str) -> Spec:
    """The profile that ``ddit-export FAMILY --model MODEL`` uses: the tiny variant for ``tiny`` and ``random``, else
    the full one."""
    if family not in FAMILIES:
        raise DDiTError(f"unknown model family '{family}': choose one of {', '.join(FAMILIES)}")
    return get_profile(FAMILIES[family]["tiny" if model in ("tiny", "random") else "default"])


def random_configs(spec: Spec) -> dict:
    """The diffusers/transformers configs ``--model random`` builds ``spec``'s components from (seeded random
    weights); a one-line error for a profile that has none (the real checkpoints' profiles)."""
    if not spec.tiny_configs:
        with_configs = ", ".join(name for name, p in PROFILES.items() if p.tiny_configs and p.family == spec.family)
        raise DDiTError(
            f"profile '{spec.name}' has no configs for random weights: use --model random with one of "
            f"{with_configs}, or load a checkpoint"
        )
    return spec.tiny_configs


def spec_from_dict(d: dict) -> Spec:
    """Rebuild a spec from ``spec.to_dict()`` (a manifest's profile block), by its ``family`` (FLUX if absent)."""
    family = d.get("family", "flux") if isinstance(d, dict) else None
    if family not in SPEC_CLASSES:
        raise DDiTError(
            f"the manifest's profile block names unknown family {family!r} (known: {', '.join(SPEC_CLASSES)}): "
            "re-export the engines folder, or use a matching ddit version"
        )
    return SPEC_CLASSES[family].from_dict(d)


__all__ = [
    "CalibratedTau",
    "DDiTError",
    "FAMILIES",
    "FittedTeaCache",
    "FlowShift",
    "FP8_MIN_CC",
    "PRECISIONS",
    "FluxSpec",
    "PROFILES",
    "SPEC_CLASSES",
    "SchedulerDefaults",
    "Spec",
    "TeaCacheSpec",
    "Tolerance",
    "WanSpec",
    "get_profile",
    "profile_for",
    "random_configs",
    "spec_from_dict",
]
