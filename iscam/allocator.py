"""Tune glibc's malloc from inside the process so that large, short-lived tensors are reused, not remapped.

PyTorch takes CPU tensors from ``malloc``. glibc serves a block above its mmap threshold (128 KiB at
start, raised by each freed mapping up to 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``, and it
gives the top of its heap back to the system whenever more than the trim threshold is free there. A
forward pass of a chunk of perturbed inputs or metric frames allocates activations of tens of MB to a few
GB, so every chunk maps them, the kernel zero-fills them page by page (one minor page fault per 4 KiB)
and unmaps them again: on the Coral MobileNetV2 at 224x224 this "page-fault storm" makes the system time
exceed the user time. Raising the thresholds is not enough: once a forward's working set exceeds the trim
threshold, the heap is trimmed after every chunk and refilled by the next.

:func:`tune_allocator` therefore makes two documented ``mallopt(3)`` settings, the run-time equivalents of
the environment variables ``MALLOC_MMAP_MAX_=0`` and ``MALLOC_TRIM_THRESHOLD_=-1``:

- ``M_MMAP_MAX = 0``: large blocks come from the heap instead of a mapping of their own;
- ``M_TRIM_THRESHOLD = -1``: the heap is never trimmed, so the next chunk reuses pages already mapped.

After the first chunks the forwards then fault no page at all. It changes no result, only where the
memory comes from. The price: the process keeps its peak heap until it exits instead of handing freed
memory back, and that peak can be higher than with mappings (a freed block does not always fit the next
request). glibc still maps a block when the heap cannot grow, and other threads' arenas still map what
their heaps cannot hold.

A setting the user already made in the environment (those variables, ``MALLOC_MMAP_THRESHOLD_`` or
``GLIBC_TUNABLES``) is left as the user chose it. Elsewhere (macOS, Windows, musl) nothing is done.
Measured effect: ``benchmarks/README.md``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Callable

__all__ = ["ALLOCATOR_SETTINGS", "allocator_supported", "tune_allocator"]

#: What :func:`tune_allocator` sets: ``mallopt`` parameter -> value (see the module docstring).
ALLOCATOR_SETTINGS: dict[str, int] = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": -1}

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
_PARAMETER_NUMBERS = {"M_TRIM_THRESHOLD": -1, "M_MMAP_MAX": -4}
# parameter -> the environment settings that mean the user chose it (or a neighbour) already
_USER_SETTINGS = {
    "M_MMAP_MAX": ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_max",
                   "glibc.malloc.mmap_threshold"),
    "M_TRIM_THRESHOLD": ("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
}


def allocator_supported() -> bool:
    """Whether this process runs on Linux with glibc, the one allocator :func:`tune_allocator` knows."""
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _mallopt() -> Callable[[int, int], int]:
    """glibc's ``int mallopt(int param, int value)``; returns 1 on success, 0 on error."""
    function = ctypes.CDLL("libc.so.6").mallopt
    function.argtypes = (ctypes.c_int, ctypes.c_int)
    function.restype = ctypes.c_int
    return function


def _set_by_user(parameter: str) -> bool:
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(name in os.environ or name in tunables for name in _USER_SETTINGS[parameter])


def tune_allocator() -> dict[str, int]:
    """Stop glibc from mapping and trimming large blocks in this process; return what it set.

    ``{"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": -1}`` (:data:`ALLOCATOR_SETTINGS`) on glibc Linux with nothing
    set by the user; a parameter the user set through the environment (``MALLOC_MMAP_MAX_`` or
    ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or their ``GLIBC_TUNABLES`` names) is left out
    and left alone; ``{}`` where glibc is not the allocator. Idempotent: a second call sets the same values
    again. Call it once where a process starts its work (a runner, a benchmark, a notebook); the library's
    methods and metrics never call it themselves, since it changes the whole process.
    """
    if not allocator_supported():
        return {}
    mallopt = _mallopt()
    applied: dict[str, int] = {}
    for parameter, value in ALLOCATOR_SETTINGS.items():
        if not _set_by_user(parameter) and mallopt(_PARAMETER_NUMBERS[parameter], value) == 1:
            applied[parameter] = value
    return applied
