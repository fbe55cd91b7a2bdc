"""The on-disk cache of converted models: one entry per source-file hash and converter version.

The converters (:mod:`iscam.tflite`, :mod:`iscam.ncnn`, :mod:`iscam.deepcompression`) turn a foreign weight
file into a payload of tensors and plain values. :func:`cached_conversion` keeps that payload at
``<cache_dir>/<kind>/<key>-v<version>.pt`` (``key`` = the source's SHA-256, see :func:`sha256_file`), writes
it atomically so concurrent runs never read half a file, and converts again when an entry cannot be read or
restored. Bumping a converter's version makes every old entry stale without deleting anything.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from iscam.paths import cache_dir
from iscam.store import atomic_write_bytes

__all__ = ["cached_conversion", "sha256_file", "verified_sha256"]

log = logging.getLogger("iscam.cache")

T = TypeVar("T")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verified_sha256(
    path: str | os.PathLike[str], what: str, expected: str | None, error: type[Exception]
) -> str:
    """The SHA-256 of the source file ``path`` (described as ``what``), checked against ``expected``.

    A missing file raises :class:`FileNotFoundError`, a different hash ``error`` -- both naming the path.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {os.fspath(path)}")
    digest = sha256_file(path)
    if expected is not None and digest != expected:
        raise error(
            f"{os.fspath(path)} has SHA-256 {digest}, expected {expected}: the file is corrupt or a "
            "different model (re-fetch it with data_scripts/fetch_assets.py, or pass your own file "
            "explicitly)"
        )
    return digest


def cached_conversion(
    kind: str,
    key: str,
    version: int,
    convert: Callable[[], dict[str, Any]],
    restore: Callable[[dict[str, Any]], T],
    *,
    use_cache: bool = True,
) -> T:
    """``restore(payload)`` of the cached payload, or of ``convert()`` (then cached) when there is none.

    ``kind`` names the converter's folder, ``key`` identifies the source (its SHA-256), ``version`` is the
    converter's version. A damaged or stale entry -- ``torch.load`` or ``restore`` raising -- is logged on
    ``iscam.cache`` and rebuilt; errors of ``convert`` itself (a bad source file) propagate.
    """
    entry = cache_dir() / kind / f"{key}-v{version}.pt"
    if use_cache and entry.is_file():
        try:
            return restore(torch.load(entry, map_location="cpu", weights_only=True))
        except Exception as exc:  # noqa: BLE001 -- any damaged or stale entry: convert again
            log.warning("ignoring unreadable cache entry %s (%r); converting again", entry, exc)
    payload = convert()
    if use_cache:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        # atomic (concurrent runs never see half a file) and with the umask's mode, like every file we write
        atomic_write_bytes(entry, buffer.getvalue())
    return restore(payload)
