"""Provenance: what a stored number depends on and where it was computed.

The runner stamps every row with :func:`row_stamp` (package, torch and per-method algorithm versions, and a
hash of the weights) so a rerun never mixes rows computed by different code or weights, and writes one
:func:`run_record` per invocation into the store's ``run.json`` / ``runs.jsonl`` (config, versions, git
commit, device, host, times, images and cost).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["REPO", "device_name", "file_sha256", "git_commit", "now", "package_version", "row_stamp",
           "run_record", "versions", "weights_id"]

#: The checkout the package was imported from (for the git commit); a wheel install has none.
REPO = Path(__file__).resolve().parents[1]


def git_commit(repo: Path = REPO) -> str | None:
    """``HEAD`` of the checkout at ``repo`` (``-dirty`` when tracked files changed), or None outside git."""
    if not (repo / ".git").exists():
        return None
    try:
        result = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10, check=False)
    return result.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_version(package: str) -> str | None:
    """The installed version of ``package`` (None when it is not installed)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    """A human name of ``device``: the GPU's model, or the CPU's architecture and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str | None]:
    """Versions of the packages a result depends on."""
    return {
        "iscam": package_version("iscam"),
        "torch": torch.__version__,
        "torchvision": package_version("torchvision"),
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) for the life of the process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def weights_id(model: str, weights: str | None, *, seed: int, data_root: Path | None) -> str:
    """What a model's numbers come from, cheaply and without loading it: the SHA-256 of its weights file,
    the hash torchvision puts in its download's name, or ``random-init(seed=S)`` for ``weights=None``."""
    from . import models

    if weights is None:
        return f"random-init(seed={seed})"
    source = models.weights_source(model, weights, data_root=data_root)
    if isinstance(source, Path):
        return f"sha256:{file_sha256(source)}"
    return source


def row_stamp(method: str, *, model: str, weights: str | None, seed: int,
              data_root: Path | None) -> dict[str, Any]:
    """The :data:`iscam.store.STAMP_COLUMNS` of a row of ``method``: rows whose stamps differ were computed by
    other code (the method's or the metrics' algorithm version, torch) or other weights, and are stale."""
    from .config import method_class
    from .metrics import METRICS_VERSION

    return {
        "iscam_version": package_version("iscam") or "unknown",
        "algorithm_version": int(method_class(method).algorithm_version),
        "metrics_version": METRICS_VERSION,
        "torch_version": torch.__version__,
        "weights_id": weights_id(model, weights, seed=seed, data_root=data_root),
    }


def run_record(config: Mapping[str, Any], *, metrics_key: str, started: str, finished: str,
               device: torch.device, world_size: int, root: Path | None, manifest: Path | str,
               num_images: int, per_image: Mapping[str, float], images: Mapping[str, int],
               written: int) -> dict[str, Any]:
    """The ``run.json`` record of one runner invocation."""
    return {
        "config": dict(config),
        "metrics_key": metrics_key,
        "versions": versions(),
        "git_commit": git_commit(),
        "device": device_name(device),
        "device_type": device.type,
        "world_size": world_size,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "data_root": None if root is None else str(root),
        "manifest": str(manifest),
        "num_images": num_images,
        "started": started,
        "finished": finished,
        "rows_written": written,
        "images_computed": dict(images),
        "seconds_per_image": dict(per_image),
    }
