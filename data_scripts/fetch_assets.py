#!/usr/bin/env python3
"""Put the offline assets into a data root and verify the SHA-256 of every file.

The data root (``--data-root`` or ``$ISCAM_DATA``) must end up holding::

    models/mobilenet_v2_1.0_224_quant.tflite      Coral test model, Apache-2.0
    models/mobilenet_v1_0.25_128_quant.tflite     Coral test model, Apache-2.0
    models/imagenet_labels.txt
    imagenet-val-sample/manifest.csv + 300 ILSVRC2012_val_*.JPEG
    imagenet-val-scorecam9/manifest.csv + 9 ILSVRC2012_val_*.JPEG

as listed, with hashes and sizes, in ``data_scripts/assets_sha256.csv``. Files missing from the data root are
copied (or symlinked, ``--link``) from ``--source``, a folder with the same layout (e.g. the project's
``../shared/assets``). With ``--download`` the three model files still missing are fetched from
``--url-base`` (default: the google-coral/test_data repository); the ImageNet images cannot be downloaded
(ImageNet's terms of access) and must come from a source folder. Nothing is ever overwritten: a file with a
wrong hash is reported, never replaced. Exit status 0 when every file is present and verified, 1 otherwise.

Examples::

    python data_scripts/fetch_assets.py --data-root ~/iscam-data --source ../shared/assets
    python data_scripts/fetch_assets.py --data-root ../shared/assets          # verify in place
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_HASHES = HERE / "assets_sha256.csv"
DEFAULT_URL_BASE = "https://github.com/google-coral/test_data/raw/master/"
DOWNLOADABLE_PREFIX = "models/"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_hashes(path: Path) -> list[tuple[str, str, int]]:
    with open(path, newline="") as handle:
        rows = [(r["path"], r["sha256"], int(r["bytes"])) for r in csv.DictReader(handle)]
    if not rows:
        raise SystemExit(f"error: no entries in {path}")
    return rows


def download(url: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    os.close(fd)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=os.environ.get("ISCAM_DATA"),
        help="destination folder (default: $ISCAM_DATA)",
    )
    parser.add_argument("--source", type=Path, help="folder with the assets in the same layout, to copy from")
    parser.add_argument("--link", action="store_true", help="symlink from --source instead of copying")
    parser.add_argument(
        "--download", action="store_true", help="download missing model files from --url-base"
    )
    parser.add_argument(
        "--url-base", default=DEFAULT_URL_BASE, help="base URL of the model files (%(default)s)"
    )
    parser.add_argument(
        "--hashes", type=Path, default=DEFAULT_HASHES, help="CSV path,sha256,bytes (%(default)s)"
    )
    args = parser.parse_args(argv)
    if args.data_root is None:
        parser.error("no data root: pass --data-root DIR or set ISCAM_DATA")
    root: Path = args.data_root.expanduser()
    if args.source is not None and not args.source.is_dir():
        parser.error(f"--source {args.source} is not a folder")
    root.mkdir(parents=True, exist_ok=True)

    entries = read_hashes(args.hashes)
    copied = downloaded = 0
    for rel, _digest, _size in entries:
        target = root / rel
        if target.exists():
            continue
        origin = args.source / rel if args.source is not None else None
        if origin is not None and origin.is_file() and origin.resolve() != target.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            if args.link:
                target.symlink_to(origin.resolve())
            else:
                shutil.copy2(origin, target)
            copied += 1
        elif args.download and rel.startswith(DOWNLOADABLE_PREFIX):
            url = args.url_base.rstrip("/") + "/" + rel[len(DOWNLOADABLE_PREFIX) :]
            print(f"downloading {url}")
            try:
                download(url, target)
                downloaded += 1
            except OSError as exc:
                print(f"  failed: {exc}", file=sys.stderr)

    missing, wrong = [], []
    for rel, digest, size in entries:
        target = root / rel
        if not target.is_file():
            missing.append(rel)
        elif target.stat().st_size != size or sha256(target) != digest:
            wrong.append(rel)
    print(
        f"{root}: {len(entries)} files listed, {copied} copied/linked, {downloaded} downloaded, "
        f"{len(entries) - len(missing) - len(wrong)} verified, {len(missing)} missing, "
        f"{len(wrong)} with a wrong hash"
    )
    for rel in missing:
        print(f"  missing: {rel}", file=sys.stderr)
    for rel in wrong:
        print(
            f"  WRONG SHA-256 (corrupt or different file; delete it and fetch again): {rel}", file=sys.stderr
        )
    return 0 if not missing and not wrong else 1


if __name__ == "__main__":
    sys.exit(main())
