"""Keep freed CPU memory inside the process while training on the CPU (glibc only; a no-op elsewhere).

glibc serves an allocation above its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh ``mmap`` and hands
it back with ``munmap`` when freed. A training or encoding loop frees and reallocates activations of tens or
hundreds of MiB at every call, so the kernel maps and zeroes those pages again each time. Encoding the tiny Wan's
9-frame 256x256 clips spent two thirds of its wall time in the kernel that way (0.85 s per clip; 0.28 s with this
and ``channels_last_3d``). Raising the mmap and trim thresholds keeps freed blocks in the heap for reuse. The cost
is that the process's resident memory stays at its peak until it exits, which is what a training run does anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_KEEP = 1 << 30  # 1 GiB: any single activation tensor of the recipes is below it


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if glibc accepted both."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP)) & bool(mallopt(_M_TRIM_THRESHOLD, _KEEP))
