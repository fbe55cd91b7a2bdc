"""Fill a data root with the models and sample images the project reads, each verified by its SHA-256.

The registry ``iscam/resources/assets.csv`` (``path,sha256,bytes,url``) lists every file a data root holds:
the two Coral MobileNets, the four SqueezeNet files, and the 300 + 9 sample images with
their manifests. ``url`` says where a missing file comes from:

- a URL: the file's public source (the Coral and SqueezeNet repositories, at pinned commits where known);
- ``package``: the file ships inside this package under ``iscam/resources/data/<path>`` (the two
  manifests: labels and boxes from MIT-licensed metadata, small text files);
- ``mirror``: the file exists nowhere public in this form (the sample JPEGs are ILSVRC2012 validation
  images stored stretched to 227x227 / 224x224); it is fetched from the companion's mirror,
  :data:`COMPANION_MIRROR`.

A *mirror* is one flat folder of the registry's file names (``ILSVRC2012_val_00000347.JPEG``,
``mobilenet_v2_1.0_224_quant.tflite``, ...) served over HTTP(S) or as a ``file://`` URL: a GitHub release,
a Zenodo record and ``python -m http.server`` in a folder all have that shape (:func:`build_mirror` writes
one). ``base=`` or ``$ISCAM_DOWNLOAD_BASE`` sends every download to such a mirror instead of the sources.

Downloads go through :func:`pooch.retrieve` with the registry's hash, so a file whose bytes differ is never
written (:class:`ChecksumError` names the file, the expected and the actual hash). A file already in the data
root is hashed and kept when it matches; one that does not match is reported and never overwritten (it may
be the user's own file): delete it and fetch again.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import pooch
import requests

from iscam import paths

__all__ = [
    "ALL_GROUPS",
    "COMPANION_MIRROR",
    "DEFAULT_GROUPS",
    "DOWNLOAD_ENV",
    "GROUPS",
    "MIRROR",
    "PACKAGE",
    "Asset",
    "ChecksumError",
    "FetchError",
    "SyncReport",
    "build_mirror",
    "default_data_root",
    "download_base",
    "ensure_assets",
    "read_registry",
    "registry",
    "select",
    "sha256",
    "sync",
]

#: Environment variable naming a mirror that replaces every download source (e.g. a test's 127.0.0.1 server).
DOWNLOAD_ENV = "ISCAM_DOWNLOAD_BASE"
#: Where the files nobody else publishes (the sample JPEGs) are served: a GitHub release of the companion's
#: repository holding the flat mirror that ``build_mirror`` writes. The repository URL also appears in
#: book/_config.yml, CITATION.cff and .zenodo.json; tests/test_release.py checks that they agree.
COMPANION_MIRROR = "https://github.com/iscam-companion/iscam/releases/download/data-v1"
#: Asset groups, by the data-root folder their files live in.
GROUPS: dict[str, str] = {
    "models": "models/",
    "sample": "imagenet-val-sample/",
    "scorecam9": "imagenet-val-scorecam9/",
}
ALL_GROUPS: tuple[str, ...] = tuple(GROUPS)
#: What a chapter needs: every model and the 300-image sample.
DEFAULT_GROUPS: tuple[str, ...] = ("models", "sample")

#: ``url`` markers: the file ships in the package / is served only by the companion's mirror.
PACKAGE = "package"
MIRROR = "mirror"
_COLUMNS = ("path", "sha256", "bytes")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SCHEMES = ("http", "https", "file")
_log = logging.getLogger("iscam.fetch")


class FetchError(RuntimeError):
    """An asset is missing, cannot be downloaded, or the registry itself is malformed."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path  #: the asset's path in the data root, when the error is about one file


class ChecksumError(FetchError):
    """A file's SHA-256 is not the registry's: a corrupt download (refused) or a wrong local file (kept)."""

    def __init__(self, path: str, expected: str, actual: str, origin: str) -> None:
        super().__init__(
            f"{path}: SHA-256 {actual} does not match the registry's {expected} ({origin})", path
        )
        self.expected, self.actual, self.origin = expected, actual, origin


@dataclass(frozen=True)
class Asset:
    """One registry row: where the file lives in the data root, its SHA-256 and size, and its source."""

    path: str  #: relative POSIX path inside the data root, e.g. ``models/mobilenet_v2_1.0_224_quant.tflite``
    sha256: str  #: 64 lowercase hex digits
    size: int  #: bytes
    url: str  #: public URL, ``"package"`` or ``"mirror"`` (see the module docstring)

    @property
    def name(self) -> str:
        """The file name, which is also its name on a (flat) mirror."""
        return PurePosixPath(self.path).name

    @property
    def group(self) -> str:
        return next(name for name, prefix in GROUPS.items() if self.path.startswith(prefix))


def read_registry(path: str | os.PathLike[str]) -> tuple[Asset, ...]:
    """Read and check a registry CSV (``path,sha256,bytes[,url]``; a missing ``url`` column means mirror).

    Raises :class:`FetchError` naming the row when a path is absolute, leaves the data root or lies outside
    the known groups, a hash is not 64 hex digits, a size is not a positive integer, a path repeats, or two
    downloadable files share a name (a flat mirror could not hold both).
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if any(c not in columns for c in _COLUMNS):
            raise FetchError(f"{path}: columns must include {','.join(_COLUMNS)} (found {','.join(columns)})")
        rows = list(reader)
    if not rows:
        raise FetchError(f"{path}: no entries")
    assets: list[Asset] = []
    for number, row in enumerate(rows, start=2):
        where = f"{path}, line {number}"
        rel = row["path"]
        parts = PurePosixPath(rel).parts
        if (
            not rel
            or rel.startswith("/")
            or "\\" in rel
            or ".." in parts
            or not any(rel.startswith(prefix) and len(rel) > len(prefix) for prefix in GROUPS.values())
        ):
            raise FetchError(
                f"{where}: path {rel!r} must be a relative path under one of {list(GROUPS.values())}"
            )
        digest = row["sha256"].strip().lower()
        if not _HEX64.fullmatch(digest):
            raise FetchError(f"{where}: sha256 {row['sha256']!r} of {rel} is not 64 hex digits")
        if not row["bytes"].strip().isdigit() or int(row["bytes"]) < 1:
            raise FetchError(f"{where}: bytes {row['bytes']!r} of {rel} is not a positive integer")
        url = (row.get("url") or MIRROR).strip()
        if url not in (PACKAGE, MIRROR) and urlparse(url).scheme not in _SCHEMES:
            raise FetchError(
                f"{where}: url {url!r} of {rel} is neither an http(s)/file URL, 'package' nor 'mirror'"
            )
        assets.append(Asset(rel, digest, int(row["bytes"]), url))
    _check_unique([a.path for a in assets], path, "path")
    _check_unique([a.name for a in assets if a.url != PACKAGE], path, "downloadable file name")
    return tuple(assets)


def _check_unique(values: Sequence[str], path: Path, what: str) -> None:
    seen: set[str] = set()
    repeated = sorted({v for v in values if v in seen or seen.add(v)})
    if repeated:
        raise FetchError(f"{path}: {what}s must be unique, repeated: {repeated[:5]}")


@lru_cache(maxsize=1)
def registry() -> tuple[Asset, ...]:
    """The package's registry, ``iscam/resources/assets.csv``."""
    with resources.as_file(resources.files("iscam.resources").joinpath("assets.csv")) as path:
        return read_registry(path)


def select(assets: Sequence[Asset], what: str | Iterable[str]) -> tuple[Asset, ...]:
    """The assets of the groups ``what`` (names from :data:`GROUPS`), in registry order."""
    wanted = (what,) if isinstance(what, str) else tuple(what)
    unknown = [w for w in wanted if w not in GROUPS]
    if unknown or not wanted:
        raise ValueError(f"what must name groups among {list(GROUPS)}, got {list(wanted)}")
    return tuple(a for a in assets if a.group in wanted)


def sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, as 64 lowercase hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def download_base(base: str | None = None) -> str | None:
    """The mirror that replaces every source: ``base``, else ``$ISCAM_DOWNLOAD_BASE``, else ``None``."""
    origin, chosen = (
        ("base", base) if base is not None else (f"${DOWNLOAD_ENV}", os.environ.get(DOWNLOAD_ENV))
    )
    if not chosen:
        return None
    parsed = urlparse(chosen)
    if parsed.scheme not in _SCHEMES or not (parsed.netloc or parsed.path.strip("/")):
        raise ValueError(
            f"{origin} {chosen!r} must be an http://, https:// or file:// URL of a mirror folder"
        )
    return chosen.rstrip("/")


def default_data_root() -> Path:
    """``$ISCAM_DATA`` when set, else ``<cache>/data`` (``paths.cache_dir()``); the folder need not exist."""
    env = os.environ.get(paths.DATA_ENV)
    return Path(env).expanduser() if env else paths.cache_dir() / "data"


def _source_url(asset: Asset, base: str | None) -> str | None:
    """Where a missing ``asset`` is downloaded from (``None``: it ships in the package)."""
    if asset.url == PACKAGE:
        return None
    if base is not None:
        return f"{base}/{asset.name}"
    if asset.url == MIRROR:
        return f"{COMPANION_MIRROR}/{asset.name}"
    return asset.url


@dataclass
class SyncReport:
    """What :func:`sync` did to a data root, and what is still wrong there."""

    root: Path
    listed: int = 0
    copied: int = 0  #: from the package or a source folder (copied or linked)
    downloaded: int = 0
    verified: int = 0  #: present with the registry's hash after the sync
    missing: list[str] = field(default_factory=list)  #: absent after the sync (``failed`` says why, if known)
    wrong: list[ChecksumError] = field(default_factory=list)  #: local files kept although their hash differs
    failed: list[FetchError] = field(default_factory=list)  #: failed or refused copies and downloads

    @property
    def ok(self) -> bool:
        return not self.missing and not self.wrong

    def error(self) -> FetchError:
        """One error naming every problem (the first checksum error itself when it is the only one)."""
        problems: list[FetchError] = [*self.wrong, *self.failed]
        explained = {p.path for p in problems}
        unexplained = [rel for rel in self.missing if rel not in explained]
        if len(problems) == 1 and not unexplained:
            return problems[0]
        lines = [str(p) for p in problems] + [f"{rel}: missing" for rel in unexplained]
        shown = "\n  ".join(lines[:20]) + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else "")
        return FetchError(
            f"data root {self.root}: {len(lines)} of {self.listed} files not usable:\n  {shown}"
        )


def sync(
    root: str | os.PathLike[str],
    assets: Sequence[Asset],
    *,
    source: str | os.PathLike[str] | None = None,
    link: bool = False,
    download: bool = True,
    base: str | None = None,
) -> SyncReport:
    """Put every missing asset into ``root`` and hash every file; collects problems instead of raising.

    Order of sources for a missing file: the package (``url == "package"``), then ``source`` (a folder with
    the data-root layout; ``link`` symlinks instead of copying), then, when ``download``, the mirror
    ``download_base(base)`` or the file's own URL. Present files are never replaced.
    """
    mirror = download_base(base)
    source_dir = Path(source).expanduser() if source is not None else None
    if source_dir is not None and not source_dir.is_dir():
        raise ValueError(f"source {str(source_dir)!r} is not a folder")
    root_dir = Path(root).expanduser()
    root_dir.mkdir(parents=True, exist_ok=True)
    report = SyncReport(root=root_dir.resolve(), listed=len(assets))
    for asset in assets:
        target = root_dir / asset.path
        if target.exists():
            problem = _check(asset, target, "the file in the data root, kept")
            report.wrong += [problem] if problem else []
            report.verified += problem is None
            continue
        try:
            copied = _copy_in(asset, target, source_dir, link)
        except OSError as exc:
            report.failed.append(
                FetchError(f"{asset.path}: cannot copy it into {root_dir}: {exc}", asset.path)
            )
            report.missing.append(asset.path)
            continue
        if copied:
            report.copied += 1
            origin = "the package" if asset.url == PACKAGE else str(source_dir)
            problem = _check(asset, target, f"copied from {origin}, removed again")
            if problem is not None:
                target.unlink()
                report.failed.append(problem)
                report.missing.append(asset.path)
                continue
        elif download and (url := _source_url(asset, mirror)) is not None:
            try:
                _download(asset, url, target)
            except FetchError as exc:
                report.failed.append(exc)
                report.missing.append(asset.path)
                continue
            report.downloaded += 1
        else:
            report.missing.append(asset.path)
            continue
        report.verified += 1
    return report


def _check(asset: Asset, target: Path, origin: str) -> ChecksumError | None:
    actual = sha256(target)
    return None if actual == asset.sha256 else ChecksumError(asset.path, asset.sha256, actual, origin)


def _copy_in(asset: Asset, target: Path, source: Path | None, link: bool) -> bool:
    """Copy (or link) ``asset`` from the package or ``source``; False when neither holds it."""
    if asset.url == PACKAGE:
        packaged = resources.files("iscam.resources").joinpath("data", *PurePosixPath(asset.path).parts)
        if not packaged.is_file():
            raise FileNotFoundError(f"the package has no iscam/resources/data/{asset.path}")
        _atomic_write(target, packaged.read_bytes())
        return True
    origin = source / asset.path if source is not None else None
    if origin is None or not origin.is_file() or origin.resolve() == target.resolve():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    if link:
        target.symlink_to(origin.resolve())
    else:
        _atomic_write(target, origin.read_bytes())
    return True


def _atomic_write(target: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder, so a reader never sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _copy_file_url(url: str, output_file: str, pooch_object: object) -> None:
    """A pooch downloader for ``file://`` URLs (pooch itself speaks http, https, ftp, sftp and doi)."""
    shutil.copyfile(url2pathname(unquote(urlparse(url).path)), output_file)


@contextmanager
def _quiet_pooch() -> Iterator[None]:
    """Pooch logs every download at INFO on its own handler; we log ours on ``iscam.fetch`` instead."""
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _download(asset: Asset, url: str, target: Path) -> None:
    """Download ``url`` to ``target`` through pooch, which writes the file only if its SHA-256 matches."""
    transfer = _copy_file_url if urlparse(url).scheme == "file" else pooch.HTTPDownloader(timeout=60)
    received: dict[str, str] = {}

    def downloader(source: str, output_file: str, pooch_object: object) -> None:
        transfer(source, output_file, pooch_object)
        received["sha256"] = sha256(output_file)  # pooch only says "does not match": keep the actual hash

    _log.info("downloading %s -> %s", url, asset.path)
    try:
        with _quiet_pooch():
            pooch.retrieve(
                url,
                known_hash=f"sha256:{asset.sha256}",
                fname=target.name,
                path=target.parent,
                downloader=downloader,
                progressbar=False,
            )
    except ValueError as exc:
        if "sha256" not in received:
            raise FetchError(f"{asset.path}: cannot download {url}: {exc}", asset.path) from exc
        raise ChecksumError(
            asset.path, asset.sha256, received["sha256"], f"downloaded from {url}, refused"
        ) from exc
    except (requests.RequestException, OSError) as exc:
        raise FetchError(f"{asset.path}: cannot download {url}: {exc}", asset.path) from exc


def ensure_assets(
    data_root: str | os.PathLike[str] | None = None,
    *,
    what: str | Iterable[str] = DEFAULT_GROUPS,
    base: str | None = None,
    source: str | os.PathLike[str] | None = None,
) -> Path:
    """Make ``data_root`` hold the groups ``what``, every file verified; return the data root (resolved).

    ``data_root`` defaults to :func:`default_data_root` (``$ISCAM_DATA``, else ``<cache>/data``). Missing
    files come from the package, ``source`` (a folder with the data-root layout, copied), or are
    downloaded from the mirror ``base`` / ``$ISCAM_DOWNLOAD_BASE`` or their public sources. Files already
    there with the right hash are not downloaded again. Raises :class:`ChecksumError` for the one bad file
    (a refused download, or a local file with another hash, which is kept) and :class:`FetchError` listing
    every file when more than one is missing or wrong; ``ValueError`` for bad arguments, before any work.

    A chapter's first cell (in a checkout ``$ISCAM_DATA`` names the data root, and this only verifies it;
    launched anywhere else it fills ``<cache>/data``)::

        os.environ["ISCAM_DATA"] = str(fetch.ensure_assets())
    """
    assets = select(registry(), what)
    download_base(base)  # argument check before any work
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    report = sync(root, assets, source=source, base=base)
    if not report.ok:
        raise report.error()
    _log.info(
        "%s: %d files verified (%d copied, %d downloaded)",
        report.root,
        report.verified,
        report.copied,
        report.downloaded,
    )
    return report.root


def build_mirror(
    data_root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    what: str | Iterable[str] = ALL_GROUPS,
    link: bool = False,
) -> list[Path]:
    """Write the flat mirror of ``data_root``: every downloadable asset of ``what`` under its file name.

    For a maintainer publishing :data:`COMPANION_MIRROR` (``gh release upload data-v1 <out>/*``) and for
    tests serving a mirror. Each file is verified first: a corrupt file is never published
    (:class:`ChecksumError`). ``link`` symlinks instead of copying. Returns the files written.
    """
    root = paths.data_root(data_root)
    assets = [a for a in select(registry(), what) if a.url != PACKAGE]
    for asset in assets:
        if not (root / asset.path).is_file():
            raise FetchError(f"{asset.path}: not in the data root {root}")
        problem = _check(asset, root / asset.path, f"in {root}, not mirrored")
        if problem is not None:
            raise problem
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for asset in assets:
        target = out_dir / asset.name
        if target.exists() or target.is_symlink():
            target.unlink()
        if link:
            target.symlink_to((root / asset.path).resolve())
        else:
            shutil.copyfile(root / asset.path, target)
        written.append(target)
    return written
