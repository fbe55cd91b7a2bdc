"""Which target-layer channels the Score family never forwards: constant maps and duplicates, per image.

A Score-family method forwards one perturbed input per scored channel (N for SS-CAM / IS-CAM), so the
channels it can leave out bound what skipping and deduplication save. This script counts them with the
methods' own rules (``ScoreCAM(...)._masks`` marks constant upsampled maps, ``_dedup_keys`` /
``_canonical`` find channels whose min-max normalised map equals an earlier channel's) on real sample
images, from one clean forward per image: no perturbed forwards, seconds on a CPU.

``--model`` is ``NAME`` or ``NAME:WEIGHTS`` of ``iscam.models`` (see ``benchmarks/workload.py``); a bare
torchvision name means random weights (``--random-weights``, or ``NAME:random``, makes any model random).

    python benchmarks/channel_shares.py                      # Coral MobileNetV2, 32 sample images
    python benchmarks/channel_shares.py --images 300 --out /tmp/shares.json
    python benchmarks/channel_shares.py --model squeezenet1_0:deepcompression --images 300
    python benchmarks/channel_shares.py --model vgg16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from workload import BenchModel, model_argument, parse_model

from iscam import methods, models
from iscam.data import ManifestDataset, iter_batches, sample_manifest

RESULTS = REPO / "benchmarks" / "results"


def channel_shares(model: str | BenchModel, images: int, data_root: str | None = None, *,
                   batch: int = 16) -> dict[str, Any]:
    """Shares of (image, channel) pairs that are constant, duplicates, or either, over ``images`` images of
    the sample manifest, for ``model`` (``NAME`` or ``NAME:WEIGHTS``)."""
    bench = parse_model(model) if isinstance(model, str) else model
    loaded = bench.load(data_root=data_root)
    dataset = ManifestDataset(sample_manifest(data_root), loaded.preprocess, limit=images)
    counts = {"pairs": 0, "constant": 0, "duplicate": 0}
    with methods.ScoreCAM(loaded.model.eval(), loaded.target_layer) as cam:
        for part in iter_batches(dataset, batch_size=batch):
            with torch.no_grad():
                _, activation = cam._hooked_forward(part.x, grad=False)
            _, valid = cam._masks(activation, tuple(part.x.shape[-2:]))
            canonical = cam._canonical(cam._dedup_keys(activation), valid)
            own = torch.arange(activation.shape[1])
            counts["pairs"] += valid.numel()
            counts["constant"] += int((~valid).sum())
            counts["duplicate"] += int((valid & (canonical != own)).sum())
    pairs = counts["pairs"]
    return {
        "model": bench.name,
        "weights": "random" if bench.weights is None else bench.weights,
        "weights_label": models.weights_label(bench.name, bench.weights),
        "layer": loaded.target_layer,
        "images": pairs // activation.shape[1],
        "channels": int(activation.shape[1]),
        "constant_share": counts["constant"] / pairs,
        "duplicate_share": counts["duplicate"] / pairs,
        "skipped_or_duplicate_share": (counts["constant"] + counts["duplicate"]) / pairs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=parse_model("mobilenet_v2_coral"), type=model_argument,
                        help="NAME or NAME:WEIGHTS of iscam.models (default mobilenet_v2_coral)")
    parser.add_argument("--images", type=int, default=32, help="first N images of the sample manifest")
    parser.add_argument("--random-weights", action="store_true",
                        help="random initialisation of any model")
    parser.add_argument("--data-root", default=None, help="data root (default: $ISCAM_DATA)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/channel_shares-<model>[-<weights>]-"
                             "<images>.json, the weights named unless they are the model's default)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)  # random-weight models (no weights file) must count the same channels every run
    bench = BenchModel(args.model.name, None) if args.random_weights else args.model
    report = channel_shares(bench, args.images, args.data_root)
    print(f"{report['model']} {report['layer']} ({report['channels']} channels), {report['images']} images: "
          f"constant {report['constant_share']:.1%}, duplicate {report['duplicate_share']:.1%}, "
          f"either {report['skipped_or_duplicate_share']:.1%}")
    named = bench.spec.replace(":", "-")
    out = args.out or RESULTS / f"channel_shares-{named}-{report['images']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
