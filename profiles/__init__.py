"""Model-family specs: one per family, all shape arithmetic in one place. Installed as ``ddit_profiles``."""

from .errors import DDiTError
from .flux import FLUX, FLUX_TINY
from .spec import FlowShift, FluxSpec, SchedulerDefaults, Tolerance

PROFILES: dict[str, FluxSpec] = {spec.name: spec for spec in (FLUX, FLUX_TINY)}

#: The family a CLI family name maps to, and the profile ``--model tiny`` selects in it.
FAMILIES = {"flux": {"default": "flux", "tiny": "flux-tiny"}}


def get_profile(name: str) -> FluxSpec:
    """Look a profile up by name, with a one-line error listing the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise DDiTError(f"unknown profile '{name}': known profiles are {', '.join(PROFILES)}") from None


def profile_for(family: str, model: str) -> FluxSpec:
    """The profile that ``ddit-export FAMILY --model MODEL`` uses: the tiny variant for ``tiny``, else the full one."""
    if family not in FAMILIES:
        raise DDiTError(f"unknown model family '{family}': choose one of {', '.join(FAMILIES)}")
    return get_profile(FAMILIES[family]["tiny" if model == "tiny" else "default"])


__all__ = [
    "DDiTError",
    "FlowShift",
    "FluxSpec",
    "PROFILES",
    "SchedulerDefaults",
    "Tolerance",
    "get_profile",
    "profile_for",
]
