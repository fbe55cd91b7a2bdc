"""One benchmark configuration per clean child process: wall, user and system CPU time and page faults.

A benchmark script hands :func:`run_in_child` a JSON-able spec; the child (the same script, started with
``--child SPEC``) sets the allocator first (:func:`apply_allocator`), does its work, measures the timed
block with :func:`measured` (``resource.getrusage`` of its own process) and hands its result back with
:func:`report_to_parent`. Each configuration thus runs in a process of its own: page faults, heap growth
and allocator settings never carry over from one configuration to the next.

Every child starts without the glibc variables of :data:`ALLOCATOR_VARIABLES`, so ``"default"`` means
glibc's own defaults and ``"tuned"`` means :func:`iscam.allocator.tune_allocator`, whatever the parent's
environment holds.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from iscam.allocator import tune_allocator

__all__ = [
    "ALLOCATORS",
    "ALLOCATOR_VARIABLES",
    "DEFAULT_ALLOCATORS",
    "Cost",
    "apply_allocator",
    "digest",
    "measured",
    "report_to_parent",
    "run_in_child",
]

#: ``"default"``: glibc's malloc as it starts; ``"tuned"``: :func:`iscam.allocator.tune_allocator`;
#: ``"thresholds"``: the rejected alternative, mmap and trim thresholds raised to 1 GiB (still trims).
ALLOCATORS: tuple[str, ...] = ("default", "tuned", "thresholds")
#: What a benchmark compares unless told otherwise.
DEFAULT_ALLOCATORS: tuple[str, ...] = ("default", "tuned")
# mallopt(3) numbers of M_TRIM_THRESHOLD and M_MMAP_THRESHOLD, and the value of "thresholds"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _ONE_GIB = -1, -3, 2**30
#: Removed from every child's environment, so that a child's allocator is exactly the one it was told.
ALLOCATOR_VARIABLES: tuple[str, ...] = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
    "MALLOC_ARENA_MAX",
    "GLIBC_TUNABLES",
)
# The one stdout line of a child that carries its result.
_RESULT_PREFIX = "BENCHMARK-RESULT "


@dataclass
class Cost:
    """What a block cost its process: wall seconds, user and system CPU seconds, page faults, and the peak
    resident memory of the whole process so far (MiB; it includes what came before the block)."""

    wall_s: float = 0.0
    user_s: float = 0.0
    sys_s: float = 0.0
    minor_faults: int = 0
    major_faults: int = 0
    peak_rss_mib: float = 0.0


@contextmanager
def measured() -> Iterator[Cost]:
    """The cost of the ``with`` block, filled in when it ends (``resource.getrusage`` of this process)."""
    cost = Cost()
    before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    try:
        yield cost
    finally:
        after = resource.getrusage(resource.RUSAGE_SELF)
        cost.wall_s = time.perf_counter() - wall
        cost.user_s = after.ru_utime - before.ru_utime
        cost.sys_s = after.ru_stime - before.ru_stime
        cost.minor_faults = after.ru_minflt - before.ru_minflt
        cost.major_faults = after.ru_majflt - before.ru_majflt
        cost.peak_rss_mib = after.ru_maxrss / 1024  # Linux reports KiB


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def apply_allocator(name: str) -> dict[str, int]:
    """Set this process's allocator to ``name`` (see :data:`ALLOCATORS`); returns what was set."""
    if name not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {ALLOCATORS}, got {name!r}")
    if name == "thresholds":
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        settings = {"M_MMAP_THRESHOLD": (_M_MMAP_THRESHOLD, _ONE_GIB),
                    "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, _ONE_GIB)}
        return {key: value for key, (number, value) in settings.items() if mallopt(number, value) == 1}
    return tune_allocator() if name == "tuned" else {}


def digest(values: torch.Tensor) -> str:
    """A short SHA-256 of a tensor's dtype, shape and bytes: equal digests mean bit-identical results."""
    tensor = values.detach().cpu().contiguous()
    content = f"{tensor.dtype} {tuple(tensor.shape)} ".encode() + tensor.numpy().tobytes()
    return hashlib.sha256(content).hexdigest()[:16]


def report_to_parent(result: dict[str, Any]) -> None:
    """Print the child's result as the line :func:`run_in_child` reads back."""
    print(_RESULT_PREFIX + json.dumps(result), flush=True)


def run_in_child(script: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``script --child SPEC`` in a fresh interpreter and return the result it reported."""
    env = {key: value for key, value in os.environ.items() if key not in ALLOCATOR_VARIABLES}
    process = subprocess.run(
        [sys.executable, str(script), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = [line for line in process.stdout.splitlines() if line.startswith(_RESULT_PREFIX)]
    if process.returncode != 0 or len(lines) != 1:
        raise RuntimeError(
            f"benchmark child {spec} exited with {process.returncode} and {len(lines)} result lines:\n"
            f"{process.stderr[-4000:]}"
        )
    return json.loads(lines[0][len(_RESULT_PREFIX) :])
