#!/usr/bin/env python3
"""Select the paper's 2000 random ILSVRC2012 validation images with a fixed, documented seed.

The paper evaluates on "2000 random images" of the 50 000 ILSVRC2012 validation images without saying which.
Our published protocol:

1. list the 50 000 names ``ILSVRC2012_val_00000001.JPEG`` ... ``ILSVRC2012_val_00050000.JPEG`` in order;
2. ``order = numpy.random.default_rng(2020).permutation(50000)``;
3. the images at ``order[:2000]`` are selected; ``rank`` is their position in that permutation, so the first
   ``k`` ranks are themselves a uniform random subset (e.g. the 100 images of the Win % experiment).

The result is committed as ``data_scripts/paper_2000.csv`` (columns ``rank,file,label``, sorted by rank), so
the list never depends on a NumPy version; ``--check`` regenerates it and compares.

The committed list has a ``label`` column: each image's ILSVRC2012 ground-truth class as a torchvision class
index (0..999, the 1000 WordNet ids sorted, ``iscam/resources/imagenet_wnids.txt``). It was written with

    python data_scripts/select_paper_images.py --synset-labels validation_labels.txt

from the public ground truth ``validation_labels.txt``: 50 000 WordNet ids, one per line, for validation
images 1..50000 in order. That file ships inside the ``tensorflow-datasets`` wheel on PyPI
(``tensorflow_datasets/datasets/imagenet2012/validation_labels.txt``, version 4.9.10, SHA-256 below); the
same list is published as TensorFlow slim's ``imagenet_2012_validation_synset_labels.txt``. Provenance and
the check against the shipped sample manifests are in ``data_scripts/README.md``. The file is third-party
data and is not committed here.

Other label sources, each adding the same ``label`` column: ``--data-root`` (reads the devkit bounding-box
XML files ``<root>/ILSVRC2012_bbox_val_v3/val/*.xml``) or ``--labels FILE`` (lines
``<file name> <torchvision index>``, the common Caffe ``val.txt`` format). With ``--check`` and a label
source, the committed labels are compared too.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "paper_2000.csv"
SEED = 2020
TOTAL = 50_000
COUNT = 2000
#: SHA-256 of tensorflow-datasets 4.9.10's imagenet2012/validation_labels.txt (see the module docstring).
SYNSET_LABELS_SHA256 = "313fc3f23c864dde9183c9a368809065765dd1b657a6904fded44e3e46d34604"


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


def labels_from_synsets(path: Path) -> dict[str, int]:
    """Labels from a file of 50 000 WordNet ids in validation order (``--synset-labels``)."""
    from iscam.data import imagenet_wnids

    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SYNSET_LABELS_SHA256:
        print(f"note: {path} has SHA-256 {digest}, not the recorded {SYNSET_LABELS_SHA256}", file=sys.stderr)
    wnids = [line.strip() for line in data.decode("ascii").splitlines() if line.strip()]
    if len(wnids) != TOTAL:
        raise SystemExit(f"error: {path} has {len(wnids)} WordNet ids, expected {TOTAL} (one per image)")
    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    unknown = sorted(set(wnids) - set(index))
    if unknown:
        raise SystemExit(f"error: {path} has {len(unknown)} unknown WordNet ids, e.g. {unknown[:3]}")
    return {val_name(number): index[wnid] for number, wnid in enumerate(wnids, start=1)}


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
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="data root with ILSVRC2012_bbox_val_v3/val/*.xml, to add labels (default: none)",
    )
    source.add_argument(
        "--labels", type=Path, help="ground-truth file '<file> <label>' per line, to add labels"
    )
    source.add_argument(
        "--synset-labels",
        type=Path,
        help="ground-truth file of 50000 WordNet ids in validation order (tensorflow-datasets' "
        "imagenet2012/validation_labels.txt), to add labels",
    )
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args(argv)

    files = select(args.count, args.seed)
    labels: dict[str, int] | None = None
    if args.labels is not None:
        labels = labels_from_file(args.labels)
    elif args.synset_labels is not None:
        labels = labels_from_synsets(args.synset_labels)
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
        keys = list(rows[0])  # rank, file and, with a label source, label
        with open(args.out, newline="") as handle:
            committed = [{k: r.get(k) for k in keys} for r in csv.DictReader(handle)]
        same = committed == rows
        print(
            f"{args.out}: {'matches' if same else 'DIFFERS FROM'} the selection "
            f"(seed {args.seed}, {args.count} images{', with labels' if labels is not None else ''})"
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
