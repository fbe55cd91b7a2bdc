#!/usr/bin/env python3
"""Put the offline assets into a data root and verify the SHA-256 of every file (a CLI over iscam.fetch).

The data root (``--data-root`` or ``$ISCAM_DATA``) must end up holding::

    models/mobilenet_v2_1.0_224_quant.tflite      Coral test model, Apache-2.0
    models/mobilenet_v1_0.25_128_quant.tflite     Coral test model, Apache-2.0
    models/compressed_SqueezeNet_v1.0.net, models/SqueezeNet_v1.0_deploy.prototxt   Deep Compression, BSD
    models/squeezenet_v1.1.ncnn.{param,bin}       torchvision weights exported to ncnn
    imagenet-val-sample/manifest.csv + 300 ILSVRC2012_val_*.JPEG
    imagenet-val-scorecam9/manifest.csv + 9 ILSVRC2012_val_*.JPEG

as listed, with hashes, sizes and sources, in the package's ``iscam/resources/assets.csv`` (or ``--hashes``).
Missing manifests are copied from the package; other missing files are copied (or symlinked,
``--link``) from ``--source``, a folder with the same layout (e.g. the project's ``../shared/assets``). With
``--download`` the files still missing are fetched, each verified by SHA-256: from ``--url-base`` (or
``$ISCAM_DOWNLOAD_BASE``), a mirror holding the files under their names in one flat folder, else from each
file's public source (models) or the companion's mirror (sample images). Nothing is ever overwritten: a file
with a wrong hash is reported, never replaced, and a download with a wrong hash is refused. ``--make-mirror
DIR`` writes the flat mirror of a verified data root (what a maintainer publishes). Exit status 0 when every
file is present and verified, 1 otherwise.

Examples::

    python data_scripts/fetch_assets.py --data-root ~/iscam-data --download
    python data_scripts/fetch_assets.py --data-root ~/iscam-data --source ../shared/assets
    python data_scripts/fetch_assets.py --data-root ../shared/assets          # verify in place
    python data_scripts/fetch_assets.py --data-root ../shared/assets --make-mirror mirror/
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# Run from a checkout, the script uses the package beside it (the registry and the code of the same commit),
# not whichever iscam the interpreter would find first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iscam import fetch


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
    parser.add_argument("--download", action="store_true", help="download the files still missing")
    parser.add_argument(
        "--url-base",
        help=f"mirror to download from: a flat folder of the file names (default: ${fetch.DOWNLOAD_ENV}, "
        "else each file's own source)",
    )
    parser.add_argument(
        "--hashes",
        type=Path,
        help="registry CSV path,sha256,bytes[,url] (default: the package's iscam/resources/assets.csv)",
    )
    parser.add_argument(
        "--make-mirror",
        type=Path,
        metavar="DIR",
        help="write the flat mirror of the verified data root to DIR",
    )
    args = parser.parse_args(argv)
    if args.data_root is None:
        parser.error("no data root: pass --data-root DIR or set ISCAM_DATA")
    if args.source is not None and not args.source.is_dir():
        parser.error(f"--source {args.source} is not a folder")
    if args.make_mirror is not None and args.hashes is not None:
        parser.error("--make-mirror publishes the package's registry: it cannot be combined with --hashes")
    try:
        fetch.download_base(args.url_base)
    except ValueError as exc:
        parser.error(str(exc))
    root: Path = args.data_root.expanduser()
    try:
        assets = fetch.read_registry(args.hashes) if args.hashes is not None else fetch.registry()
    except (OSError, fetch.FetchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    progress = logging.StreamHandler(sys.stdout)  # one line per download, for this call only
    logger = logging.getLogger("iscam.fetch")
    logger.addHandler(progress)
    logger.setLevel(logging.INFO)
    try:
        report = fetch.sync(
            root, assets, source=args.source, link=args.link, download=args.download, base=args.url_base
        )
    finally:
        logger.removeHandler(progress)
    print(
        f"{report.root}: {report.listed} files listed, {report.copied} copied/linked, {report.downloaded} "
        f"downloaded, {report.verified} verified, {len(report.missing)} missing, {len(report.wrong)} with a "
        f"wrong hash, {len(report.failed)} failed"
    )
    for rel in report.missing:
        print(f"  missing: {rel}", file=sys.stderr)
    for problem in report.wrong:
        print(
            f"  WRONG SHA-256 (corrupt or different file; delete it and fetch again): {problem.path} "
            f"(expected {problem.expected}, found {problem.actual})",
            file=sys.stderr,
        )
    for problem in report.failed:
        print(f"  failed: {problem}", file=sys.stderr)
    if not report.ok:
        return 1
    if args.make_mirror is not None:
        written = fetch.build_mirror(root, args.make_mirror)
        print(f"{args.make_mirror}: {len(written)} files, the mirror of {report.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
