#!/usr/bin/env python3
"""Select the paper's 2000 random ILSVRC2012 validation images with a fixed, documented seed.

The paper evaluates on "2000 random images" of the 50 000 ILSVRC2012 validation images without saying which.
Our published protocol:

1. list the 50 000 names ``ILSVRC2012_val_00000001.JPEG`` ... ``ILSVRC2012_val_00050000.JPEG`` in order;
2. ``order = numpy.random.default_rng(2020).permutation(50000)``;
3. the images at ``order[:2000]`` are selected; ``rank`` is their position in that permutation, so the first
   ``k`` ranks are themselves a uniform random subset (e.g. the 100 images of the Win % experiment).

The result is committed as ``data_scripts/paper_2000.csv`` (columns ``rank,file``, sorted by rank), so the
list never depends on a NumPy version; ``--check`` regenerates it and compares.

Labels: the ILSVRC2012 validation ground truth is not shipped with this project, so the committed list has
no labels. They come from the bounding-box XML files when you build the manifest
(``imagenet_to_manifest.py --files data_scripts/paper_2000.csv``), or here with ``--data-root`` (reads
``<root>/ILSVRC2012_bbox_val_v3/val/*.xml``) or ``--labels FILE`` (lines ``<file name> <torchvision index>``,
the common ``val.txt`` format), which add a ``label`` column.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "paper_2000.csv"
SEED = 2020
TOTAL = 50_000
COUNT = 2000


def val_name(number: int) -> str:
    return f"ILSVRC2012_val_{number:08d}.JPEG"


def select(count: int = COUNT, seed: int = SEED, total: int = TOTAL) -> list[str]:
    """File names in rank order (see the module docstring)."""
    if not 0 < count <= total:
        raise ValueError(f"count must be in 1..{total}, got {count}")
    names = [val_name(i) for i in range(1, total + 1)]
    order = np.random.default_rng(seed).permutation(total)
    return [names[i] for i in order[:count]]


def labels_from_file(path: Path) -> dict[str, int]:
    labels = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            labels[Path(parts[0].split("@")[-1]).name] = int(parts[1])
    if not labels:
        raise SystemExit(f"error: no '<file> <label>' lines in {path}")
    return labels


def labels_from_xml(boxes: Path, files: list[str]) -> dict[str, int]:
    from iscam.data import imagenet_wnids, read_bbox_xml

    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    return {f: index[read_bbox_xml(boxes / (Path(f).stem + ".xml")).wnid] for f in files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="CSV to write (%(default)s)")
    parser.add_argument("--count", type=int, default=COUNT, help="images to select (%(default)s)")
    parser.add_argument("--seed", type=int, default=SEED, help="numpy default_rng seed (%(default)s)")
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="data root with ILSVRC2012_bbox_val_v3/val/*.xml, to add labels (default: none)",
    )
    parser.add_argument(
        "--labels", type=Path, help="ground-truth file '<file> <label>' per line, to add labels"
    )
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args(argv)

    files = select(args.count, args.seed)
    labels: dict[str, int] | None = None
    if args.labels is not None:
        labels = labels_from_file(args.labels)
    elif args.data_root is not None:
        boxes = args.data_root / "ILSVRC2012_bbox_val_v3" / "val"
        if not boxes.is_dir():
            parser.error(f"no bounding-box folder {boxes} under --data-root {args.data_root}")
        labels = labels_from_xml(boxes, files)
    rows = [{"rank": str(r), "file": f} for r, f in enumerate(files)]
    if labels is not None:
        absent = [f for f in files if f not in labels]
        if absent:
            parser.error(f"{len(absent)} selected images have no label, e.g. {absent[:3]}")
        for row in rows:
            row["label"] = str(labels[row["file"]])

    if args.check:
        if not args.out.is_file():
            print(f"{args.out} does not exist", file=sys.stderr)
            return 1
        with open(args.out, newline="") as handle:
            committed = [{"rank": r["rank"], "file": r["file"]} for r in csv.DictReader(handle)]
        same = committed == [{"rank": r["rank"], "file": r["file"]} for r in rows]
        print(
            f"{args.out}: {'matches' if same else 'DIFFERS FROM'} the selection "
            f"(seed {args.seed}, {args.count} images)"
        )
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    print(
        f"wrote {len(rows)} images to {args.out}" + (" with labels" if labels is not None else " (no labels)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
