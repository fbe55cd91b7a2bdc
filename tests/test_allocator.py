"""iscam.allocator: what tune_allocator sets, what it leaves to the user, and that it is a no-op elsewhere."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from iscam import allocator

REPO = Path(__file__).resolve().parents[1]
MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
# mallopt(3) parameter numbers of <malloc.h>
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


class RecordingMallopt:
    """Stands in for glibc's mallopt: records (param, value) and answers ``result``."""

    def __init__(self, result: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.result = result

    def __call__(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


@pytest.fixture
def glibc(monkeypatch: pytest.MonkeyPatch) -> RecordingMallopt:
    """A glibc Linux process with no malloc variables set, whose mallopt only records."""
    for variable in MALLOC_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(allocator, "allocator_supported", lambda: True)
    recorder = RecordingMallopt()
    monkeypatch.setattr(allocator, "_mallopt", lambda: recorder)
    return recorder


def test_disables_mapping_and_trimming_and_is_idempotent(glibc: RecordingMallopt) -> None:
    expected = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": -1}
    assert allocator.tune_allocator() == expected == allocator.ALLOCATOR_SETTINGS
    assert glibc.calls == [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)]
    assert allocator.tune_allocator() == expected
    assert glibc.calls == [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)] * 2


@pytest.mark.parametrize(
    ("variable", "value", "left_alone"),
    [
        ("MALLOC_TRIM_THRESHOLD_", "1000", "M_TRIM_THRESHOLD"),
        ("MALLOC_MMAP_MAX_", "65536", "M_MMAP_MAX"),
        ("MALLOC_MMAP_THRESHOLD_", "1048576", "M_MMAP_MAX"),  # a threshold of the user's own: no override
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=4096", "M_TRIM_THRESHOLD"),
        ("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=65536", "M_MMAP_MAX"),
    ],
)
def test_leaves_the_users_own_settings_alone(
    glibc: RecordingMallopt, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, left_alone: str
) -> None:
    monkeypatch.setenv(variable, value)
    expected = {key: setting for key, setting in allocator.ALLOCATOR_SETTINGS.items() if key != left_alone}
    assert allocator.tune_allocator() == expected
    assert len(glibc.calls) == 1


def test_unrelated_tunables_do_not_count_as_the_users_choice(
    glibc: RecordingMallopt, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert allocator.tune_allocator() == allocator.ALLOCATOR_SETTINGS


def test_a_refused_parameter_is_not_reported(glibc: RecordingMallopt) -> None:
    glibc.result = 0
    assert allocator.tune_allocator() == {}
    assert len(glibc.calls) == 2


@pytest.mark.parametrize("platform_name", ["darwin", "win32", "linux"])
def test_no_op_where_glibc_is_not_the_allocator(monkeypatch: pytest.MonkeyPatch, platform_name: str) -> None:
    """macOS, Windows and musl Linux (no glibc version string): nothing is loaded or called."""

    def no_mallopt() -> None:
        raise AssertionError("mallopt must not be looked up here")

    monkeypatch.setattr(sys, "platform", platform_name)
    monkeypatch.setattr(platform, "libc_ver", lambda *args, **kwargs: ("", ""))
    monkeypatch.setattr(allocator, "_mallopt", no_mallopt)
    assert not allocator.allocator_supported()
    assert allocator.tune_allocator() == {}


MAPPED_AND_TRIMMED = """
import ctypes
import json
from iscam.allocator import tune_allocator

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
fields = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
MallInfo2 = type("MallInfo2", (ctypes.Structure,), {"_fields_": [(f, ctypes.c_size_t) for f in fields]})
libc.mallinfo2.restype = MallInfo2

def block_of(nbytes):
    '''(mapped blocks it added, heap bytes still held once it is freed) for one block of nbytes.'''
    heap = libc.mallinfo2().arena
    block = libc.malloc(nbytes)
    mapped = libc.mallinfo2().hblks
    libc.free(block)
    return mapped - libc.mallinfo2().hblks, libc.mallinfo2().arena - heap

print(json.dumps([block_of(256 << 20), tune_allocator(), block_of(256 << 20)]))
"""


@pytest.mark.skipif(not allocator.allocator_supported(), reason="needs glibc on Linux")
def test_on_glibc_a_large_block_comes_from_the_heap_and_stays_once_tuned() -> None:
    """In a fresh process, a 256 MiB block: by default glibc maps it and unmaps it on free; once tuned it
    comes from the heap, which keeps it after the free for the next request (``mallinfo2``)."""
    env = {key: value for key, value in os.environ.items() if key not in MALLOC_VARIABLES}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, "-c", MAPPED_AND_TRIMMED], capture_output=True, text=True, env=env, check=True,
        timeout=60,
    )
    (mapped_before, kept_before), settings, (mapped_after, kept_after) = json.loads(result.stdout)
    assert (mapped_before, kept_before) == (1, 0)
    assert settings == {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": -1}
    assert mapped_after == 0 and kept_after >= 256 << 20
