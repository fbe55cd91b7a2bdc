"""Where iscam finds its data and keeps its caches (the data root, the cache folder).

The data root holds the models and images the project reads but never ships: a user points it at their
own ImageNet, CI at ``../shared/assets``. It is taken, in order, from an explicit argument, the
``ISCAM_DATA`` environment variable, or fails with a message that says how to set it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "DATA_ENV", "RESULTS_ENV", "DataRootError", "cache_dir", "data_root", "optional_data_root", "results_dir"]

DATA_ENV = "ISCAM_DATA"
CACHE_ENV = "ISCAM_CACHE"
RESULTS_ENV = "ISCAM_RESULTS"


class DataRootError(FileNotFoundError):
    """The data root is not configured or does not exist."""


def data_root(path: str | os.PathLike[str] | None = None) -> Path:
    """Return the data root: ``path`` if given, else ``$ISCAM_DATA``; it must be an existing folder."""
    source = "the data_root argument"
    if path is None:
        env = os.environ.get(DATA_ENV)
        if not env:
            raise DataRootError(
                f"no data root configured: set {DATA_ENV}=/path/to/assets (a folder holding models/ and "
                "imagenet-val-sample/, e.g. ../shared/assets) or pass data_root= / --data-root"
            )
        path, source = env, f"${DATA_ENV}"
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataRootError(f"data root {str(root)!r} (from {source}) is not an existing folder")
    return root.resolve()


def optional_data_root(path: str | os.PathLike[str] | None = None) -> Path | None:
    """:func:`data_root` when one is given or configured, else None (for runs that need none: torchvision
    weights and your own images given by path)."""
    if path is None and not os.environ.get(DATA_ENV):
        return None
    return data_root(path)


def cache_dir() -> Path:
    """Folder for converted models and other derived files: ``$ISCAM_CACHE`` or ``~/.cache/iscam``."""
    env = os.environ.get(CACHE_ENV)
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "iscam"
    source = f"${CACHE_ENV}" if env else "the default cache folder"
    if root.exists() and not root.is_dir():
        raise DataRootError(f"cache folder {str(root)!r} (from {source}) is a file, not a folder: point "
                            f"{CACHE_ENV} at a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataRootError(f"cannot create the cache folder {str(root)!r} (from {source}): "
                            f"{error.strerror}") from None
    return root


def results_dir() -> Path:
    """The folder holding one results store per config, for the CLI, the runner and the book alike:
    ``$ISCAM_RESULTS``, or ``results`` in the working directory (``make`` sets it to ``<checkout>/results``)."""
    env = os.environ.get(RESULTS_ENV)
    return Path(env).expanduser() if env else Path("results")
