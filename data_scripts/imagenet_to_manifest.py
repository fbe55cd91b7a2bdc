#!/usr/bin/env python3
"""Turn an official ILSVRC2012 validation folder + bounding-box XML into an iscam manifest CSV.

Input (defaults under ``--data-root`` / ``$ISCAM_DATA``)::

    <root>/ILSVRC2012_img_val/ILSVRC2012_val_00000001.JPEG ...        (ILSVRC2012_img_val.tar)
    <root>/ILSVRC2012_bbox_val_v3/val/ILSVRC2012_val_00000001.xml ... (ILSVRC2012_bbox_val_v3.tgz)

Output: ``file,label,width,height,boxes`` (as ``iscam.data.ManifestDataset`` reads it): the label is the
XML's class mapped to torchvision's index, ``width``/``height`` the JPEG's size, ``boxes`` the boxes of that
class in continuous pixel coordinates (VOC's 1-based ``xmin..xmax`` becomes ``[xmin - 1, xmax)``), as
``x0 y0 x1 y1`` separated by ``;``. ``--files`` restricts it to a list, e.g. the paper's 2000 images::

    python data_scripts/imagenet_to_manifest.py --data-root ~/imagenet \\
        --files data_scripts/paper_2000.csv --out ~/imagenet/ILSVRC2012_img_val/manifest-paper2000.csv

The default output is ``<images>/manifest.csv``, beside the images, where ``ManifestDataset`` looks for them.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from PIL import Image

from iscam.data import (
    IMAGENET_VAL_BOXES,
    IMAGENET_VAL_IMAGES,
    MANIFEST_COLUMNS,
    ImageNetValDataset,
    Preprocess,
    format_boxes,
)


def read_file_list(path: Path) -> list[str]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if "file" not in (reader.fieldnames or []):
            raise SystemExit(f"error: {path} has no 'file' column")
        files = [row["file"] for row in reader]
    if not files:
        raise SystemExit(f"error: {path} lists no files")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=os.environ.get("ISCAM_DATA"),
        help="folder holding the official layout (default: $ISCAM_DATA)",
    )
    parser.add_argument("--images", type=Path, help=f"image folder (default: <root>/{IMAGENET_VAL_IMAGES})")
    parser.add_argument("--boxes", type=Path, help=f"XML folder (default: <root>/{IMAGENET_VAL_BOXES})")
    parser.add_argument("--files", type=Path, help="CSV with a 'file' column restricting the images")
    parser.add_argument("--out", type=Path, help="manifest to write (default: <images>/manifest.csv)")
    args = parser.parse_args(argv)
    if (args.images is None or args.boxes is None) and args.data_root is None:
        parser.error("pass --data-root (or set ISCAM_DATA), or both --images and --boxes")
    images = args.images or Path(args.data_root) / IMAGENET_VAL_IMAGES
    boxes = args.boxes or Path(args.data_root) / IMAGENET_VAL_BOXES
    files = read_file_list(args.files) if args.files else None
    try:
        dataset = ImageNetValDataset(images, boxes, Preprocess(), files=files)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    out = args.out or images / "manifest.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    resized = 0
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for index, name in enumerate(dataset.files):
            label, ann = dataset.annotation(index)
            with Image.open(images / name) as image:  # reads the header only
                width, height = image.size
            box = ann.boxes
            if (width, height) != (ann.width, ann.height):  # the XML describes another size: rescale
                resized += 1
                box = box * box.new_tensor([width / ann.width, height / ann.height] * 2)
            writer.writerow([name, label, width, height, format_boxes(box)])
    note = f" ({resized} XML sizes differed from the JPEG; boxes rescaled)" if resized else ""
    print(f"wrote {len(dataset)} rows to {out}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
